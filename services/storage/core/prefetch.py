"""A blocking iterator run ahead in a worker thread: the event loop takes its items while the thread already
produces the next ones, at most ``depth`` of them waiting, so a download reads and decrypts while gRPC sends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import closing
from typing import Any, TypeVar

__all__ = ["prefetched"]

_T = TypeVar("_T")
_END = object()


async def prefetched(produce: Callable[[], Iterator[_T]], executor: Executor, depth: int) -> AsyncGenerator[_T, None]:
    """The items of ``produce()``, iterated in ``executor``; its exception is raised here after the items before
    it. Closing this iterator early stops the producer, which closes its iterator in its own thread (so whatever
    it reads is never closed under a running read); closing waits for that."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    room = threading.Semaphore(depth)
    stop = threading.Event()

    def hand_over(item: Any, error: BaseException | None = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            stop.set()

    def run() -> None:
        try:
            with closing(produce()) as items:  # type: ignore[type-var]
                for item in items:
                    room.acquire()
                    if stop.is_set():
                        return
                    hand_over(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            hand_over(_END, exc)
        else:
            hand_over(_END)

    running = loop.run_in_executor(executor, run)
    try:
        while True:
            item, error = await queue.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            room.release()
            yield item
    finally:
        stop.set()
        room.release()  # wakes a producer waiting for room, which then sees the stop
        await asyncio.wait([running])
