"""An upload's stored bytes on their way to the object store: whole parts sent in parallel, at most a few in flight,
so an upload of any size holds a bounded number of part buffers and the object store is written to on several
connections while the next parts are being sealed."""

from __future__ import annotations

import threading
from concurrent.futures import Executor, Future, wait
from typing import Protocol

__all__ = ["PartStore", "PartUploader"]

Buffer = bytes | bytearray | memoryview


class PartStore(Protocol):
    """What the uploader needs from the object store (services.storage.objectstore)."""

    def put(self, key: str, data: Buffer, content_type: str) -> None: ...

    def start_multipart(self, key: str, content_type: str) -> str: ...

    def put_part(self, key: str, upload_id: str, number: int, data: Buffer) -> str: ...

    def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None: ...

    def abort_multipart(self, key: str, upload_id: str) -> None: ...


class PartUploader:
    """Stores one object from its parts, in order of ``submit``; blocking calls, made from one writer thread.

    ``submit`` hands a part (never changed afterwards) to ``executor`` and returns at once unless ``parallel``
    parts are still being sent, then waits for one to finish; the first failure of any part is raised by the next
    call. An object that ``finish`` receives whole is stored in a single request.
    """

    def __init__(self, store: PartStore, key: str, content_type: str, executor: Executor, parallel: int) -> None:
        if parallel <= 0:
            raise ValueError("parallel must be positive")
        self._store = store
        self._key = key
        self._content_type = content_type
        self._executor = executor
        self._room = threading.BoundedSemaphore(parallel)
        self._upload_id: str | None = None
        self._etags: list[str] = []
        self._sending: list[Future[None]] = []
        self._error: BaseException | None = None
        self._aborted = False
        self.stored_bytes = 0

    def submit(self, data: Buffer) -> None:
        self._check()
        if self._upload_id is None:
            self._upload_id = self._store.start_multipart(self._key, self._content_type)
        self._room.acquire()
        try:
            self._check()
        except BaseException:
            self._room.release()
            raise
        number = len(self._etags) + 1
        self._etags.append("")
        self.stored_bytes += len(data)
        future = self._executor.submit(self._send, self._upload_id, number, data)
        future.add_done_callback(lambda _: self._room.release())
        self._sending = [f for f in self._sending if not f.done()] + [future]

    def _send(self, upload_id: str, number: int, data: Buffer) -> None:
        try:
            if not self._aborted:
                self._etags[number - 1] = self._store.put_part(self._key, upload_id, number, data)
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            raise

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._aborted:
            raise RuntimeError("the upload was aborted")

    def finish(self, last: Buffer) -> int:
        """Stores the last part (maybe the whole object) and completes the object; the stored size."""
        if self._upload_id is None:
            self._check()
            self._store.put(self._key, last, self._content_type)
            self.stored_bytes = len(last)
            return self.stored_bytes
        if len(last):
            self.submit(last)
        wait(self._sending)
        self._check()
        self._store.complete_multipart(self._key, self._upload_id, self._etags)
        return self.stored_bytes

    def stop(self) -> None:
        """No further part is sent; the writer's next call fails (callable from any thread)."""
        self._aborted = True

    def abort(self) -> None:
        """Stops sending, waits for the parts in flight and aborts the multipart upload (best effort: whatever
        stays behind is for the orphan clean-up)."""
        self._aborted = True
        wait(list(self._sending))
        if self._upload_id is not None:
            self._store.abort_multipart(self._key, self._upload_id)
