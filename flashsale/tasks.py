"""Background tasks: stopping one the same way everywhere, repeating one through outages that
are logged once, and an event loop of its own."""

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")
log = logging.getLogger(__name__)


async def stop_task(task: "asyncio.Task[None] | None") -> None:
    """Cancel a background task and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception as error:  # noqa: BLE001 - stopping goes on whatever the task says
        # asyncpg, cancelled in the middle of some steps, raises an error of its own instead.
        log.warning("task %s ended with %r as it was stopped", task.get_name(), error)


class LoopThread:
    """An event loop on a daemon thread of its own, for I/O that must not queue behind the
    CPU-bound callbacks of the caller's loop."""

    def __init__(self, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on this thread's loop; awaitable from any other loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        """Stop the loop and wait for its thread. A process that exits while the thread is still
        inside the loop may crash as it exits: a segmentation fault, here in one exit of twenty."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Outage:
    """A background round that keeps failing is logged when it starts failing and when it works
    again, not at every round (a database outage would fill the log). An error other than the
    `expected` ones is logged with its traceback."""

    def __init__(self, logger: logging.Logger, what: str, meanwhile: str,
                 expected: tuple[type[BaseException], ...]) -> None:
        self._log = logger
        self._what = what
        self._meanwhile = meanwhile
        self._expected = expected
        self._failing = False

    def failed(self, error: BaseException) -> None:
        if not self._failing:
            self._log.warning("%s failed, %s: %s", self._what, self._meanwhile, error,
                              exc_info=None if isinstance(error, self._expected) else error)
        self._failing = True

    def worked(self) -> None:
        if self._failing:
            self._log.warning("%s works again", self._what)
        self._failing = False


async def repeat(work: Callable[[], Awaitable[object]], interval_s: float, outage: Outage,
                 first_after_s: float | None = None) -> None:
    """Run `work` every `interval_s` (the first time after `first_after_s`, by default the same),
    for ever. A round that fails, for whatever reason, is the outage's to log, and the next round
    runs: one bad round must not end the rounds."""
    await asyncio.sleep(interval_s if first_after_s is None else first_after_s)
    while True:
        try:
            await work()
        except Exception as error:  # noqa: BLE001 - see above
            outage.failed(error)
        else:
            outage.worked()
        await asyncio.sleep(interval_s)
