"""Keeps the storage process's memory from ratcheting up under large transfers.

Transfers pass megabyte buffers between threads. glibc's malloc raises its mmap threshold after such a buffer
is freed (up to 32 MiB) and gives each thread its own arena, so freed transfer buffers stay in the process's
resident set, scattered across arenas. A fixed threshold of 4 MiB keeps the 1 MiB segment buffers on the heap,
where they are reused (an mmap'd buffer costs a page fault per 4 KiB every time it is allocated: with a 256 KiB
threshold a download ran at less than half the speed), while part buffers and anything larger go to mmap and
return to the system when freed; two arenas bound the fragmentation. Setting that threshold also pins glibc's trim
threshold at its default 128 KiB, so a freed segment buffer at the top of a heap went back to the system and the
next one faulted its pages in again (~225 page faults per MiB downloaded, a fifth of the process's CPU time): up
to 16 MiB free at the top of each heap stay. Resident memory tracks the live transfer
buffers (a 1 GiB upload grew it by 59-69 MiB, a download by 35-37 MiB: tests/storage/test_large_object.py).
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
    mmap_threshold: int = 4 * 1024 * 1024, arenas: int = 2, trim_threshold: int = 16 * 1024 * 1024
) -> bool:
    """Applies the settings above when the C library is glibc; False (and no change) elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(option, value)
        for option, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold),
            (_M_TRIM_THRESHOLD, trim_threshold),
            (_M_ARENA_MAX, arenas),
        )
    )
    if not ok:
        log.info("could not tune the memory allocator")
    return ok
