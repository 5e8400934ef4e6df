"""Keeps large messages from costing a page fault per 4 KiB, and a process's memory from ratcheting up.

Every process that moves objects handles megabyte buffers: gRPC hands each received message over as a new bytes
object (a download's ~3 MiB pieces, an upload's chunks, inference tensors), and the storage service passes
segment and part buffers between threads. glibc's malloc serves such a buffer with mmap until one is freed, then
raises its mmap threshold to that size (up to 32 MiB) and its trim threshold to twice it: with two such
messages alive at once, freeing them leaves more than that free at the top of the heap, which goes back to the
kernel, and the next message faults its pages in again. A gRPC client downloading spent about half its CPU time on
that (1.2-1.5 against 0.65-0.75 ms per MiB tuned, 256 MiB downloads from the storage service). A fixed threshold of
4 MiB keeps buffers below it on the heap, where they are reused, while anything larger goes to mmap and returns to
the system when freed; up to 16 MiB free at the top of each heap stay (setting one threshold pins the other at its
default, 128 KiB, which returns every freed buffer at the top). The storage service also bounds glibc's arenas
(one per thread by default), so freed transfer buffers do not stay scattered across them: its resident memory
tracks its live transfer buffers (a 1 GiB upload grew it by 59-69 MiB, a download by 44 MiB:
tests/storage/test_large_object.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune_allocator"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator(
    mmap_threshold: int = 4 * 1024 * 1024, trim_threshold: int = 16 * 1024 * 1024, arenas: int | None = None
) -> bool:
    """Applies the settings above (``arenas``: at most that many malloc arenas; None leaves glibc's default) when
    the C library is glibc; False (and no change) elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    options = [(_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)]
    if arenas is not None:
        options.append((_M_ARENA_MAX, arenas))
    ok = all(mallopt(option, value) for option, value in options)
    if not ok:
        log.info("could not tune the memory allocator")
    return ok
