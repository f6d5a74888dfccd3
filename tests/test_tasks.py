"""The background-task helpers that the actor and the WAL service share."""

import asyncio
import threading

from flashsale.tasks import LoopThread


async def test_a_stopped_loop_thread_has_ended_and_closed_its_loop() -> None:
    """A retiring actor stops its I/O thread before its process exits: an exit with the thread
    still inside its loop could crash the process."""
    io = LoopThread("io-under-test")
    assert await io.run(asyncio.sleep(0, "ran")) == "ran"
    io.stop()
    assert "io-under-test" not in [thread.name for thread in threading.enumerate()]
    assert io.loop.is_closed()
