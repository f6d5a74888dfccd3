"""The product actor: a thin, single-writer shell around the pure core.

A call carries a batch of commands. The actor decides the whole batch synchronously, appends the
events to the WAL, awaits the COMMIT, and only then answers. Recovery (in the constructor, after a
Ray restart, and after a failed flush) goes through `rebuild`, the replay tool's own path.
"""

import asyncio
import ctypes
import gc
import logging
import os
import sys
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
    ProductCounts,
)
from flashsale.actors.product import Policy, ProductState, Reply, execute
from flashsale.persistence.database import (
    DATABASE_DOWN,
    NO_QUERY_TIMEOUTS,
    configure_session,
)
from flashsale.persistence.replay import Rebuilt, encode_state, rebuild
from flashsale.persistence.wal import (
    QUEUE_DEPTH_MAX,
    OrderChanges,
    WalBroken,
    WalWriter,
    keep_counts,
)
from flashsale.tasks import LoopThread, Outage, repeat, stop_task

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 0.2
RECOVERY_WAIT_S = 2.0
RECONNECT_BACKOFF_MAX_S = 2.0
CONNECT_TIMEOUT_S = 5.0
GIL_SWITCH_INTERVAL_S = 0.000_5  # Python's default is 5 ms
# Buffers up to this size come from the heap in the actor's process (see `_keep_batch_buffers`):
# above what a flush of 50,000 events makes (about 5 MB of WAL record, 10 MB of COPY data).
HEAP_BUFFERS_MAX = 16 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_libc = ctypes.CDLL(None)
# Whatever keeps the database from answering now, and any error of PostgreSQL's: a recovery
# that gave up would leave the product refusing every call while its process lives.
_RETRIED_IN_RECOVERY = (*DATABASE_DOWN, asyncpg.PostgresError)

# The session holding a writer lock: PostgreSQL shows a bigint key as two 32-bit halves.
_WRITER_SESSION = """
SELECT pid, client_addr FROM pg_locks JOIN pg_stat_activity USING (pid)
WHERE locktype = 'advisory' AND granted AND objsubid = 1
  AND pg_locks.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = (($1::int8 >> 32) & 4294967295)::oid AND objid = ($1::int8 & 4294967295)::oid"""

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


def _order_changes(state: ProductState, events: list[Event]) -> OrderChanges:
    changes = OrderChanges([], {})
    for event in events:
        if isinstance(event, OrderPlaced):
            changes.placed.append(event)
        elif order_id := getattr(event, "order_id", None):
            changes.changed[order_id] = state.orders[order_id]
    return changes


def _keep_batch_buffers() -> None:
    """Each call makes and frees buffers of 0.1-1 MB: its commands and replies, its WAL record,
    the COPY data of its rows. Ray's processes start with glibc's mmap threshold fixed at 128 kB
    (`configure_ray`), so each got a mapping of its own, grown with mremap and unmapped when
    freed, and its pages faulted in again on every call: per call of 1,000 reservations, about
    4 mmaps, 13 mremaps and 4 munmaps (strace). The actor's process serves them from its heap,
    which keeps their pages: after `bench core`'s churned sale, its USS was 0.4-2.2 MB larger.
    Other C libraries have no mallopt, and nothing changes there."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, HEAP_BUFFERS_MAX)


def _return_free_pages() -> None:
    """Hand the heap's free pages back to the system: the heap keeps what a burst of batches
    freed (after `bench core`'s churned sale, 4.7 MB of its 59 MB). glibc only."""
    malloc_trim = getattr(_libc, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


class ProductActor:
    def __init__(self, product_id: str, config: ActorConfig) -> None:
        self._product_id = product_id
        self._config = config
        self._state = ProductState()
        self._writer: WalWriter | None = None
        self._io = LoopThread(f"wal-{product_id}")
        # The process is this actor's alone. Deciding a batch holds the GIL for milliseconds;
        # a shorter switch interval lets the WAL's loop answer PostgreSQL meanwhile.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # Python's collector runs as objects are allocated, and each full pass walks every hold
        # and key of the state, a million of each for `bench core`'s sale, to find no cycle:
        # the core makes none. That was a sixth of the actor's CPU there. The little cyclic
        # garbage that libraries leave is collected on a timer instead, and what the process
        # made to start (Ray, the modules) is frozen out of its way: an idle actor's collection
        # took 11-19 ms with it, 0.01 ms without.
        gc.disable()
        gc.freeze()
        _keep_batch_buffers()
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
        self._io.loop.call_soon_threadsafe(self._writer.conn.terminate)
        self._io.stop()
        ray.actor.exit_actor()

    async def _decide_durably(self, commands: list[Command]) -> list[Reply]:
        writer = await self._ready()
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
                first_seq, tuple(events), _order_changes(state, events), counts_of(state),
                state.terms.currency if state.terms else "", self._maybe_snapshot(len(events)),
            )
        else:
            durable = writer.durable()  # a duplicate's answer may rest on events still in flight
        try:
            await durable
        except WalBroken as broken:
            self._commit_outage.failed(writer.failure or broken)
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

    async def _ready(self) -> WalWriter:
        try:
            async with asyncio.timeout(RECOVERY_WAIT_S):
                await asyncio.shield(self._recovery)
        except TimeoutError:
            raise ProductUnavailable("the product is recovering") from None
        assert self._writer is not None
        return self._writer

    def _start_recovery(self, broken: WalWriter) -> None:
        if self._recovery.done() and self._writer is broken:
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """Forget the in-memory state and rebuild it from what the database holds."""
        if self._writer is not None:
            await self._writer.close()
            self._io.loop.call_soon_threadsafe(self._writer.conn.terminate)
        self._writer = None
        conn, rebuilt = await self._io.run(self._connect_and_rebuild())
        self._state = rebuilt.state
        self._events_since_snapshot = rebuilt.events_replayed
        self._writer = WalWriter(conn, self._product_id, self._io, self._config.queue_depth_max)

    async def _connect_and_rebuild(self) -> tuple[asyncpg.Connection, Rebuilt]:
        """On the I/O loop, which then owns the connection."""
        backoff_s = 0.05
        outage = Outage(log, f"product {self._product_id}: recovery", "retrying",
                        _RETRIED_IN_RECOVERY)
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self._config.dsn, timeout=CONNECT_TIMEOUT_S)
                await configure_session(conn)
                await conn.execute(NO_QUERY_TIMEOUTS)
                await self._take_writer_lock(conn)
                rebuilt = await rebuild(conn, self._product_id)
                if rebuilt.corruption is None and rebuilt.state.last_seq:  # see `Catalogue`
                    await keep_counts(conn, self._product_id, counts_of(rebuilt.state))
                break
            except _RETRIED_IN_RECOVERY as error:
                if conn is not None:
                    conn.terminate()
                outage.failed(error)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_MAX_S)
        outage.worked()
        if rebuilt.corruption is not None:
            conn.terminate()
            log.error("%s; the product refuses every call until its log is mended "
                      "(`flashsale replay` shows where)", rebuilt.corruption)
            raise ProductUnavailable(str(rebuilt.corruption))
        return conn, rebuilt

    async def _take_writer_lock(self, conn: asyncpg.Connection) -> None:
        """Waits for an older incarnation's session to end: one writer ever appends. Its session
        outlives it where its machine died, until the server finds the client gone (see
        `configure_session`), so the wait is said, with the session to end by hand."""
        key = writer_lock_key(self._product_id)
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            return
        holder = await conn.fetchrow(_WRITER_SESSION, key)
        if holder is not None:
            log.warning("product %s: waiting for the session of its earlier writer to end "
                        "(backend %s from %s; SELECT pg_terminate_backend(%s) ends it now)",
                        self._product_id, holder["pid"], holder["client_addr"] or "this host",
                        holder["pid"])
        await conn.execute("SELECT pg_advisory_lock($1)", key)

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
            _return_free_pages()
            self._next_collection = time.monotonic() + self._config.collect_garbage_every_s
        await asyncio.shield(self._recovery)  # nothing to do before the state is back
        if self._chores(now_ms()):
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
