"""A bounded byte pipe between two threads: the encryptor writes ciphertext into it, the S3 uploader reads parts
from it. At most ``capacity`` bytes wait in it, so an upload of any size uses bounded memory."""

from __future__ import annotations

import io
import threading

__all__ = ["BoundedPipe", "PipeAborted", "PipeReader", "PipeWriter"]


class PipeAborted(Exception):
    """The other side gave up; the transfer is being aborted."""


class BoundedPipe:
    """One writer thread, one reader thread; ``write`` blocks while full, ``read`` while empty.

    ``close()`` ends the stream normally (the reader sees EOF); ``abort(error)`` ends it with an error that both
    sides then raise, which makes the S3 SDK abort its multipart upload instead of completing it.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._capacity = capacity
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None

    @property
    def aborted(self) -> bool:
        return self._error is not None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        with self._cond:
            while view:
                while len(self._buffer) >= self._capacity and self._error is None:
                    self._cond.wait()
                if self._error is not None:
                    raise PipeAborted(str(self._error))
                if self._closed:
                    raise ValueError("write to a closed pipe")
                n = min(self._capacity - len(self._buffer), len(view))
                self._buffer += view[:n]
                view = view[n:]
                self._cond.notify_all()
        return total

    def close(self) -> None:
        """End of stream: the reader drains what is left, then sees EOF."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self, error: BaseException) -> None:
        """Ends the stream with ``error``; pending and future reads and writes raise."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._buffer.clear()
            self._cond.notify_all()

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all until EOF for -1); blocks until that much is there, the pipe is full, or
        the stream ended. b"" means EOF."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise PipeAborted(str(self._error))
                want = self._capacity if size < 0 else min(size, self._capacity)
                if len(self._buffer) >= want or self._closed:
                    break
                self._cond.wait()
            n = len(self._buffer) if size < 0 else min(size, len(self._buffer))
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
            self._cond.notify_all()
            return data


class PipeWriter(io.RawIOBase):
    """The pipe's writing end as a file object, for Tink's encrypting stream (which closes its destination when
    it finishes). Closing after an abort does not end the stream normally."""

    def __init__(self, pipe: BoundedPipe) -> None:
        super().__init__()
        self._pipe = pipe
        self.bytes_written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._pipe.write(data)
        self.bytes_written += n
        return n

    def close(self) -> None:
        if not self.closed and not self._pipe.aborted:
            self._pipe.close()
        super().close()


class PipeReader(io.RawIOBase):
    """The pipe's reading end as a file object, for the S3 SDK's put_object."""

    def __init__(self, pipe: BoundedPipe) -> None:
        super().__init__()
        self._pipe = pipe

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        return self._pipe.read(size)
