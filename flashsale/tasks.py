"""Background tasks: stopping one the same way everywhere, and an event loop of its own."""

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


async def stop_task(task: "asyncio.Task[None] | None") -> None:
    """Cancel a background task and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class LoopThread:
    """An event loop on a daemon thread of its own, for I/O that must not queue behind the
    CPU-bound callbacks of the caller's loop."""

    def __init__(self, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name=name, daemon=True).start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on this thread's loop; awaitable from any other loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))
