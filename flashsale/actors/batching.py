"""Micro-batching: concurrent commands for one product become one actor call.

While calls are in flight, new commands wait and go out together in the next call; an idle
product answers a lone command at once. Queues and batches are bounded: a full queue, an actor
that is down or a call that takes too long is a fast ProductUnavailable (a 503), never a hang.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import ray
from ray.actor import ActorHandle

from flashsale.actors.messages import Command, DefineProduct, ProductCounts, Rejection
from flashsale.actors.product import Reply
from flashsale.actors.product_actor import ActorConfig, ProductUnavailable, send, send_batch
from flashsale.actors.registry import product_actor
from flashsale.persistence.database import DATABASE_DOWN

log = logging.getLogger(__name__)

BATCH_SIZE_MAX = 1_000
QUEUE_DEPTH_MAX = 10_000
CALLS_IN_FLIGHT_MAX = 4
CALL_TIMEOUT_S = 5.0
# Defining a sale starts its actor: a new worker process, slow on a busy machine.
ACTOR_START_TIMEOUT_S = 60.0

# Refuses or completes commands before they reach the actor: one verdict per command, the
# command to send (perhaps with more facts) or its rejection.
Screen = Callable[[str, list[Command]], Awaitable[list[Command | Rejection]]]
# Hears each product's counts as they come back with its batches.
CountsListener = Callable[[str, ProductCounts], None]


class ProductBatcher:
    def __init__(self, product_id: str, actor: ActorHandle, screen: Screen | None,
                 on_counts: CountsListener,
                 on_actor_gone: Callable[[], None] = lambda: None) -> None:
        self._product_id = product_id
        self._actor = actor
        self._screen = screen
        self._on_counts = on_counts
        self._on_actor_gone = on_actor_gone  # for good: it retired, or was killed
        self._waiting: list[tuple[Command, asyncio.Future[Reply]]] = []
        self._in_flight = 0
        self._kick_scheduled = False

    async def submit(self, cmd: Command) -> Reply:
        if len(self._waiting) >= QUEUE_DEPTH_MAX:
            raise ProductUnavailable("too many requests are waiting for this product")
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Reply] = loop.create_future()
        self._waiting.append((cmd, reply))
        if not self._kick_scheduled:
            # Commands arriving in the same loop iteration leave in the same call.
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return await reply

    def _kick(self) -> None:
        self._kick_scheduled = False
        # A call costs the front end and the actor over a millisecond of CPU whatever its size,
        # so commands wait for the call in flight and leave together in the next. Only full
        # batches, which waiting cannot make larger, go out beside it.
        while self._waiting and (self._in_flight == 0 or (
                len(self._waiting) >= BATCH_SIZE_MAX and self._in_flight < CALLS_IN_FLIGHT_MAX)):
            batch = self._waiting[:BATCH_SIZE_MAX]
            del self._waiting[:BATCH_SIZE_MAX]
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._call(batch))

    async def _call(self, batch: list[tuple[Command, asyncio.Future[Reply]]]) -> None:
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):  # the screen's query, then the call
                replies = await self._decide([cmd for cmd, _ in batch])
            for (_, future), reply in zip(batch, replies, strict=True):
                if not future.done():
                    future.set_result(reply)
        except Exception as error:  # every waiter must be answered, whatever failed
            if isinstance(error, ray.exceptions.ActorDiedError):
                self._on_actor_gone()
            expected = (ProductUnavailable, ray.exceptions.RayError, *DATABASE_DOWN)
            if not isinstance(error, expected):
                log.warning("product %s: batch failed", self._product_id, exc_info=True)
            failure = ProductUnavailable(f"product {self._product_id} did not answer: "
                                         f"{type(error).__name__}")
            if isinstance(error, TimeoutError):
                # Those waiting behind the call have waited for it; in the next call they would
                # wait as long again before their 503. Nothing of theirs was sent.
                batch, self._waiting = batch + self._waiting, []
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
        finally:
            self._in_flight -= 1
            self._kick()

    async def _decide(self, commands: list[Command]) -> list[Reply]:
        """The screen's rejections, and the actor's replies to the commands it let through."""
        verdicts: list[Command | Rejection] = (
            await self._screen(self._product_id, commands) if self._screen else list(commands))
        to_send = [(i, v) for i, v in enumerate(verdicts) if not isinstance(v, Rejection)]
        replies: list[Reply] = [v if isinstance(v, Rejection) else None for v in verdicts]
        if to_send:
            decided = await send_batch(self._actor, [cmd for _, cmd in to_send])
            for (i, _), reply in zip(to_send, decided.replies, strict=True):
                replies[i] = reply
            self._on_counts(self._product_id, decided.counts)
        return replies


class ProductRouter:
    """Routes commands by product id to that product's batcher (one per product)."""

    def __init__(self, config: ActorConfig, screen: Screen | None = None) -> None:
        self._config = config
        self._screen = screen
        self.on_counts: CountsListener = lambda product_id, counts: None
        self._batchers: dict[str, ProductBatcher] = {}
        self._actors: dict[str, ActorHandle] = {}

    def actor(self, product_id: str) -> ActorHandle:
        if product_id not in self._actors:
            self._actors[product_id] = product_actor(product_id, self._config)
        return self._actors[product_id]

    async def submit(self, product_id: str, cmd: Command) -> Reply:
        batcher = self._batchers.get(product_id)
        if batcher is None:
            batcher = ProductBatcher(product_id, self.actor(product_id), self._screen,
                                     lambda pid, counts: self.on_counts(pid, counts),
                                     lambda: self._forget(product_id))
            self._batchers[product_id] = batcher
        return await batcher.submit(cmd)

    async def define(self, product_id: str, cmd: DefineProduct) -> Reply:
        """Define a sale on its (new) actor: not on the order path, so it waits for start-up."""
        try:
            async with asyncio.timeout(ACTOR_START_TIMEOUT_S):
                [reply] = await send(self.actor(product_id), [cmd])
        except (ray.exceptions.RayError, TimeoutError) as error:
            raise self._unavailable(product_id, error) from None
        return reply

    async def counts(self, product_id: str) -> ProductCounts:
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                return await self.actor(product_id).counts.remote()
        except (ray.exceptions.RayError, TimeoutError) as error:
            raise self._unavailable(product_id, error) from None

    def _unavailable(self, product_id: str, error: BaseException) -> ProductUnavailable:
        if isinstance(error, ray.exceptions.ActorDiedError):
            self._forget(product_id)
        return ProductUnavailable(f"product {product_id}: {type(error).__name__}")

    def _forget(self, product_id: str) -> None:
        """The product's actor is gone for good: an ended sale's actor retires when idle. The
        next command gets or creates another by name, which recovers the product from its log."""
        self._actors.pop(product_id, None)
        self._batchers.pop(product_id, None)
