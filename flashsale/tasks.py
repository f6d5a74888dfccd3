"""Background tasks: stopping one the same way everywhere."""

import asyncio
import contextlib


async def stop_task(task: "asyncio.Task[None] | None") -> None:
    """Cancel a background task and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
