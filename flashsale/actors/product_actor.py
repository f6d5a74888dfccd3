"""The product actor: a thin, single-writer shell around the pure core.

A call carries a batch of commands. The actor decides the whole batch synchronously, appends the
events to the WAL (the node's WAL service commits them), awaits the COMMIT, and only then
answers. Recovery (in the constructor, after a Ray restart, and after a failed flush) goes
through `rebuild`, the replay tool's own path.
"""

import asyncio
import gc
import logging
import os
import time
import uuid
from collections.abc import Sequence

import asyncpg
import msgspec
import ray
from ray.actor import ActorHandle

from flashsale.actors.messages import (
    Command,
    Event,
    ExpireHolds,
    ForgetSettled,
    OrderPlaced,
    OrderRecord,
    ProductCounts,
)
from flashsale.actors.product import Policy, ProductState, Reply, execute
from flashsale.actors.wal_service import wal_service_here
from flashsale.heap import keep_batch_buffers, return_free_pages
from flashsale.persistence.database import DATABASE_DOWN, log_session
from flashsale.persistence.replay import Rebuilt, encode_state, rebuild
from flashsale.persistence.wal import keep_counts
from flashsale.persistence.wal_link import (
    QUEUE_DEPTH_MAX,
    OpenLog,
    WalBroken,
    WalClient,
    WalUnavailable,
)
from flashsale.tasks import LoopThread, Outage, repeat, stop_task

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 0.2
RECOVERY_WAIT_S = 2.0
RECONNECT_BACKOFF_MAX_S = 2.0
# Whatever keeps the database or the node's WAL service from answering now, and any error of
# PostgreSQL's: a recovery that gave up would leave the product refusing every call while its
# process lives.
_RETRIED_IN_RECOVERY = (*DATABASE_DOWN, asyncpg.PostgresError, WalUnavailable,
                        asyncio.IncompleteReadError, ray.exceptions.RayError)

_commands_encoder = msgspec.msgpack.Encoder()
_commands_decoder = msgspec.msgpack.Decoder(list[Command])
_decided_encoder = msgspec.msgpack.Encoder()


class ProductUnavailable(Exception):
    """The product cannot decide now (recovering, overloaded, or its log is failing).
    Nothing in the batch was acknowledged: retry with the same idempotency keys."""


class ActorConfig(msgspec.Struct, frozen=True):
    dsn: str
    policy: Policy = Policy()
    snapshot_every_events: int = 10_000  # at least; more once the state is larger
    queue_depth_max: int = QUEUE_DEPTH_MAX
    # An ended sale's actor exits after this long without a call (see `_retirable`).
    retire_after_idle_s: float = 300.0
    # The actor's process collects cyclic garbage on this timer, not as it allocates (see
    # `ProductActor.__init__`), and hands its heap's free pages back.
    collect_garbage_every_s: float = 60.0


def encode_commands(commands: Sequence[Command]) -> bytes:
    return _commands_encoder.encode(commands)


def decode_commands(blob: bytes) -> list[Command]:
    return _commands_decoder.decode(blob)


class Decided(msgspec.Struct, array_like=True):
    """A batch's replies, in order, and the product's counts right after it."""

    replies: list[Reply]
    counts: ProductCounts


_decided_decoder = msgspec.msgpack.Decoder(Decided)


def decode_decided(blob: bytes) -> Decided:
    return _decided_decoder.decode(blob)


async def send_batch(actor: ActorHandle, commands: Sequence[Command]) -> Decided:
    """One actor call for a batch of commands; raises ProductUnavailable if none was decided."""
    return decode_decided(await actor.handle.remote(encode_commands(commands)))


async def send(actor: ActorHandle, commands: Sequence[Command]) -> list[Reply]:
    return (await send_batch(actor, commands)).replies


def counts_of(state: ProductState) -> ProductCounts:
    return ProductCounts(state.stock, state.available, state.reserved, state.sold,
                         state.last_seq)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def writer_lock_key(product_id: str) -> int:
    """The advisory lock that fences the product's single writer, from its id."""
    return int.from_bytes(uuid.UUID(product_id).bytes[:8], "big", signed=True)


def changed_orders(state: ProductState, events: list[Event]) -> list[OrderRecord]:
    """The orders these events change but do not place, each once, as it stands after them:
    the rows of the read model to update (those to insert come from the events)."""
    changed: dict[str, OrderRecord] = {}
    for event in events:
        if type(event) is not OrderPlaced and (order_id := getattr(event, "order_id", None)):
            changed[order_id] = state.orders[order_id]
    return list(changed.values())


class ProductActor:
    def __init__(self, product_id: str, config: ActorConfig) -> None:
        self._product_id = product_id
        self._config = config
        self._state = ProductState()
        self._writer: WalClient | None = None
        self._io = LoopThread(f"recovery-{product_id}")
        # Python's collector runs as objects are allocated, and each full pass walks every hold
        # and key of the state, a million of each for `bench core`'s sale, to find no cycle:
        # the core makes none. That was a sixth of the actor's CPU there. The little cyclic
        # garbage that libraries leave is collected on a timer instead, and what the process
        # made to start (Ray, the modules) is frozen out of its way: an idle actor's collection
        # took 11-19 ms with it, 0.01 ms without.
        gc.disable()
        gc.freeze()
        keep_batch_buffers()
        self._next_collection = time.monotonic() + config.collect_garbage_every_s
        self._events_since_snapshot = 0
        self._calls = 0  # calls being decided or waiting for their commit
        self._last_call = time.monotonic()
        loop = asyncio.get_running_loop()  # Ray runs an async actor's constructor in its loop
        self._recovery = loop.create_task(self._recover())
        # Said once when commits start failing (a full disk, a database refusing), not at every
        # batch that fails on it, and once when they go through again.
        self._commit_outage = Outage(log, f"product {product_id}: writing its log",
                                     "its calls answer 503 while it recovers",
                                     _RETRIED_IN_RECOVERY)
        outage = Outage(log, f"product {product_id}: housekeeping", "due chores wait",
                        (ProductUnavailable,))
        self._timer = loop.create_task(repeat(self._keep_house, HOUSEKEEPING_INTERVAL_S, outage))

    async def handle(self, blob: bytes) -> bytes:
        """Decide a batch of encoded commands; returns their encoded replies, in order, with
        the counts after them (front ends keep their product caches fresh from these)."""
        self._calls += 1
        self._last_call = time.monotonic()
        try:
            replies = await self._decide_durably(decode_commands(blob))
        finally:
            self._calls -= 1
        return _decided_encoder.encode(Decided(replies, counts_of(self._state)))

    async def counts(self) -> ProductCounts:
        await self._ready()
        return counts_of(self._state)

    async def snapshot(self) -> bytes:
        """The whole state, encoded as a snapshot (for audits and tests)."""
        await self._ready()
        return encode_state(self._state)

    def pid(self) -> int:
        return os.getpid()

    async def retire(self) -> None:
        """Exit for good if the product may still retire (a call may have come since it was
        found retirable). Ray fails the calls that come later, and the front end that gets such
        a failure starts the product again (`ProductRouter`)."""
        if not self._retirable():
            return
        log.info("product %s: sale ended and idle; retiring its actor", self._product_id)
        # Its tasks and its I/O thread end before its process does: asyncio would report the
        # tasks as an error, and the thread could crash the exit. The closed writer refuses a
        # call that comes meanwhile (a 503, and the retry finds the actor gone).
        assert self._writer is not None
        await self._writer.close()
        await stop_task(self._timer)
        self._io.stop()
        ray.actor.exit_actor()

    async def _decide_durably(self, commands: list[Command]) -> list[Reply]:
        writer = await self._ready()
        if writer.failure is not None:  # its link ended while no call waited on it
            self._start_recovery(writer)
            raise ProductUnavailable("the write-ahead log could not be written")
        if not writer.has_room():
            raise ProductUnavailable("the product is overloaded")
        state, policy, now = self._state, self._config.policy, now_ms()
        replies: list[Reply] = []
        events: list[Event] = []
        for chore in self._chores(now):  # due ones go first, so each batch sees them done
            events.extend(execute(state, chore, now, policy)[1])
        for cmd in commands:
            reply, new_events = execute(state, cmd, now, policy)
            replies.append(reply)
            events.extend(new_events)
        if events:
            first_seq = state.last_seq + 1
            state.last_seq += len(events)
            durable = writer.append(
                first_seq, events, changed_orders(state, events), counts_of(state),
                state.terms.currency if state.terms else "", self._maybe_snapshot(len(events)),
            )
        else:
            durable = writer.durable()  # a duplicate's answer may rest on events still in flight
        try:
            await durable
        except WalBroken:
            self._start_recovery(writer)
            raise ProductUnavailable("the write-ahead log could not be written") from None
        self._commit_outage.worked()
        return replies

    def _maybe_snapshot(self, new_events: int) -> tuple[int, bytes] | None:
        """A snapshot costs time in proportion to the state, so one is taken only after at least
        as many events as the state holds orders: a constant cost per event, and recovery never
        replays much more than one state's worth of events.

        While every event places an order, none comes due after the first, and rightly: a
        snapshot restores more slowly than its orders' placements replay (1.7 against 1.2 s for
        1,000,000 new orders, decoding included), so it would not shorten recovery. Taking
        them anyway, every time the state doubled, cost `bench core` 15-20% of its throughput."""
        self._events_since_snapshot += new_events
        due_after = max(self._config.snapshot_every_events, len(self._state.orders))
        if self._events_since_snapshot < due_after:
            return None
        self._events_since_snapshot = 0
        return self._state.last_seq, encode_state(self._state)

    async def _ready(self) -> WalClient:
        try:
            async with asyncio.timeout(RECOVERY_WAIT_S):
                await asyncio.shield(self._recovery)
        except TimeoutError:
            raise ProductUnavailable("the product is recovering") from None
        assert self._writer is not None
        return self._writer

    def _start_recovery(self, broken: WalClient) -> None:
        """After its log failed; said once, however many calls hear of it."""
        assert broken.failure is not None
        self._commit_outage.failed(broken.failure)
        if self._recovery.done() and self._writer is broken:
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """Forget the in-memory state and rebuild it from what the database holds, once the
        node's WAL service holds the product's writer lock: no older writer commits after."""
        if self._writer is not None:
            await self._writer.close()
        self._writer = None
        backoff_s = 0.05
        outage = Outage(log, f"product {self._product_id}: recovery", "retrying",
                        _RETRIED_IN_RECOVERY)
        while True:
            writer = None
            try:
                writer = await self._open_log()
                rebuilt = await self._io.run(self._rebuild())
                break
            except _RETRIED_IN_RECOVERY as error:
                if writer is not None:
                    await writer.close()
                outage.failed(error)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_MAX_S)
        outage.worked()
        if rebuilt.corruption is not None:
            await writer.close()
            log.error("%s; the product refuses every call until its log is mended "
                      "(`flashsale replay` shows where)", rebuilt.corruption)
            raise ProductUnavailable(str(rebuilt.corruption))
        self._state = rebuilt.state
        self._events_since_snapshot = rebuilt.events_replayed
        self._writer = writer

    async def _open_log(self) -> WalClient:
        opened = OpenLog(self._product_id, self._config.dsn, writer_lock_key(self._product_id))
        return await WalClient.open(await self._wal_address(), opened,
                                    self._config.queue_depth_max)

    async def _wal_address(self) -> str:
        """The Unix socket of this node's WAL service."""
        return str(await wal_service_here().address.remote())

    async def _rebuild(self) -> Rebuilt:
        """On the recovery loop, so that the housekeeping timer and calls are not held up."""
        conn = await log_session(self._config.dsn)
        try:
            rebuilt = await rebuild(conn, self._product_id)
            if rebuilt.corruption is None and rebuilt.state.last_seq:  # see `Catalogue`
                await keep_counts(conn, self._product_id, counts_of(rebuilt.state))
        except BaseException:
            conn.terminate()
            raise
        await conn.close()
        return rebuilt

    def _retirable(self) -> bool:
        """An ended sale's actor holds a process (about 45 MB) for nothing once no hold is
        left to expire: a late payment, a cancellation or a refund comes as a command, and a
        new actor recovers the state for it. Idle for a while first, as those calls cluster."""
        state, writer = self._state, self._writer
        return (self._recovery.done() and writer is not None and writer.failure is None
                and state.terms is not None
                and now_ms() >= state.terms.sale_ends_at_ms and state.reserved == 0
                and self._calls == 0 and writer.durable().done()
                and time.monotonic() - self._last_call >= self._config.retire_after_idle_s)

    async def _keep_house(self) -> None:
        """Run the chores that fall due while no batch arrives to run them; with none left,
        retire the actor if it may (an actor exits only from one of its own calls)."""
        if time.monotonic() >= self._next_collection:
            gc.collect()
            return_free_pages()
            self._next_collection = time.monotonic() + self._config.collect_garbage_every_s
        await asyncio.shield(self._recovery)  # nothing to do before the state is back
        assert self._writer is not None
        if self._writer.failure is not None:  # its link ended while no call waited on it
            self._start_recovery(self._writer)
        elif self._chores(now_ms()):
            await self._decide_durably([])
        elif self._retirable():
            ray.get_runtime_context().current_actor.retire.remote()

    def _chores(self, now: int) -> list[Command]:
        """Forgetting settled orders comes first: an order is never forgotten in the batch that
        settles it, whose commit still has to write the order's row as it ends."""
        state, chores = self._state, list[Command]()
        forget_before = now - self._config.policy.forget_settled_after_ms
        if state.settled and state.settled[0][0] <= forget_before:
            chores.append(ForgetSettled())
        if state.holds and state.holds[0][0] <= now:
            chores.append(ExpireHolds())
        return chores
