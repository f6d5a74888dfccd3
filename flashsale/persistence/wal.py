"""The WAL writer: appends a product's events and group-commits them to PostgreSQL.

`append` returns a future that resolves only after the COMMIT holding those events. Appends that
queue up while a commit is in flight go out together in the next transaction (group commit), as
one WAL record plus the orders read-model rows they change and the product's counts after them.
The queue is bounded; after a failed flush the writer refuses everything, because the caller's
state is ahead of the log.
"""

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

import asyncpg
import msgspec

from flashsale.actors.messages import (
    Event,
    OrderPlaced,
    OrderRecord,
    OrderStatus,
    ProductCounts,
    event_encoder,
)
from flashsale.persistence.frames import frame
from flashsale.tasks import LoopThread, stop_task

QUEUE_DEPTH_MAX = 256
EVENTS_PER_FLUSH_MAX = 50_000
SNAPSHOTS_KEPT = 2

# A new order's row; the columns left out (payment, confirmation, refund) take their defaults.
NEW_ORDER_COLUMNS = (
    "id", "product_id", "user_id", "idempotency_key", "quantity", "unit_price_minor",
    "currency", "status", "expires_at_ms", "created_at_ms", "updated_at_ms",
)
_PENDING = OrderStatus.PENDING.value

_KEEP_COUNTS = """
INSERT INTO product_counts (product_id, stock, available, reserved, sold, last_seq)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (product_id) DO UPDATE SET stock = excluded.stock, available = excluded.available,
    reserved = excluded.reserved, sold = excluded.sold, last_seq = excluded.last_seq,
    written_by = pg_current_xact_id()
"""
# The flush's record and the counts after it, in one statement: no extra round trip.
_LOG_AND_COUNT = f"""
WITH logged AS (
    INSERT INTO wal (product_id, first_seq, last_seq, record) VALUES ($1, $7, $8, $9))
{_KEEP_COUNTS}"""

_UPDATE_ORDERS = """
UPDATE orders SET status = u.status, payment_id = u.payment_id, refund_status = u.refund_status,
                  refund_amount_minor = u.refund_amount_minor,
                  confirmed_at_ms = u.confirmed_at_ms, updated_at_ms = u.updated_at_ms
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[])
     AS u(id, status, payment_id, refund_status, refund_amount_minor, confirmed_at_ms,
          updated_at_ms)
WHERE orders.id = u.id
"""


async def keep_counts(conn: asyncpg.Connection, product_id: str, counts: ProductCounts) -> None:
    """Record the counts a product stands at outside a flush (after its recovery)."""
    await conn.execute(_KEEP_COUNTS, product_id, *msgspec.structs.astuple(counts))


class WalOverloaded(Exception):
    """The append queue is full: shed load now rather than wait without bound."""


class WalBroken(Exception):
    """An earlier flush failed; the writer accepts nothing until its owner recovers."""


class OrderChanges(NamedTuple):
    """The read-model rows an append writes: one per order it places, as placed, and one update
    per order it changes, as the order stands after it. An order placed and changed in one flush
    is inserted, then updated, in its transaction."""

    placed: list[OrderPlaced]
    changed: dict[str, OrderRecord]


class _Append(NamedTuple):
    first_seq: int
    events: tuple[Event, ...]
    orders: OrderChanges
    counts: ProductCounts  # after these events
    currency: str
    snapshot: tuple[int, bytes] | None
    durable: asyncio.Future[None]


def _merge(batch: list[_Append]) -> OrderChanges:
    """The rows of the whole flush: each order updated once, to where the last append left it."""
    merged = OrderChanges([], {})
    for item in batch:
        merged.placed.extend(item.orders.placed)
        merged.changed.update(item.orders.changed)
    return merged


async def insert_new_orders(conn: asyncpg.Connection, product_id: str, currency: str,
                            placed: Iterable[OrderPlaced]) -> None:
    """The read-model rows of newly placed orders. Built from the events rather than the
    orders: fewer columns, no enums to read, and this runs for every order the product takes."""
    await conn.copy_records_to_table("orders", columns=NEW_ORDER_COLUMNS, records=[
        (e.order_id, product_id, e.user_id, e.idempotency_key, e.quantity, e.unit_price_minor,
         currency, _PENDING, e.expires_at_ms, e.at_ms, e.at_ms)
        for e in placed
    ])


def _changed_columns(orders: Iterable[OrderRecord]) -> list[list[object]]:
    rows = [
        (o.order_id, o.status.value, o.payment_id, o.refund_status.value, o.refund_amount_minor,
         o.confirmed_at_ms, o.updated_at_ms)
        for o in orders
    ]
    return [list(column) for column in zip(*rows, strict=True)]


def _resolve(batch: list[_Append]) -> None:
    for item in batch:
        if not item.durable.done():  # its caller may have given up waiting
            item.durable.set_result(None)


class WalWriter:
    """Appends come from the owner's event loop. The connection lives on `io`, a loop of its own,
    so PostgreSQL works through one flush while the owner decides the next batches, instead of
    each step of a flush waiting for the owner to finish a batch."""

    def __init__(self, conn: asyncpg.Connection, product_id: str, io: LoopThread,
                 queue_depth_max: int = QUEUE_DEPTH_MAX) -> None:
        self.conn = conn
        self._product_id = product_id
        self._io = io
        self._owner = asyncio.get_running_loop()
        self._queue_depth_max = queue_depth_max
        self._queue: deque[_Append] = deque()
        self._wakeup = asyncio.Event()  # set and awaited on `io` only
        self._last: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        io.loop.call_soon_threadsafe(self._start)

    def has_room(self) -> bool:
        return self.failure is None and len(self._queue) < self._queue_depth_max

    def append(self, first_seq: int, events: tuple[Event, ...], orders: OrderChanges,
               counts: ProductCounts, currency: str,
               snapshot: tuple[int, bytes] | None = None) -> asyncio.Future[None]:
        if self.failure is not None:
            raise WalBroken("the write-ahead log failed earlier") from self.failure
        if len(self._queue) >= self._queue_depth_max:
            raise WalOverloaded(f"{len(self._queue)} appends are waiting for the disk")
        durable: asyncio.Future[None] = self._owner.create_future()
        self._queue.append(_Append(first_seq, events, orders, counts, currency, snapshot,
                                   durable))
        self._last = durable
        self._io.loop.call_soon_threadsafe(self._wakeup.set)
        return durable

    def durable(self) -> asyncio.Future[None]:
        """Resolves once everything appended so far is committed."""
        if self._last is None:
            done: asyncio.Future[None] = self._owner.create_future()
            done.set_result(None)
            return done
        return self._last

    async def close(self) -> None:
        """Stop flushing and accept no more appends; the caller owns the connection."""
        self.failure = self.failure or WalBroken("the write-ahead log was closed")
        await self._io.run(stop_task(self._task))

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._take_batch()
                try:
                    await self._flush(batch)
                except BaseException as error:  # noqa: BLE001 - every waiter must hear of it
                    self._owner.call_soon_threadsafe(self._fail, batch, error)
                    if not isinstance(error, Exception):
                        raise
                    return
                self._owner.call_soon_threadsafe(_resolve, batch)
                del batch  # an idle writer keeps no events alive

    def _take_batch(self) -> list[_Append]:
        batch = [self._queue.popleft()]
        events = len(batch[0].events)
        while self._queue and events + len(self._queue[0].events) <= EVENTS_PER_FLUSH_MAX:
            item = self._queue.popleft()
            batch.append(item)
            events += len(item.events)
            if item.snapshot is not None:
                break
        return batch

    async def _flush(self, batch: list[_Append]) -> None:
        events = [event for item in batch for event in item.events]
        orders = _merge(batch)
        snapshots = [item.snapshot for item in batch if item.snapshot is not None]
        first_seq = batch[0].first_seq
        async with self.conn.transaction():
            if events:
                await self.conn.execute(
                    _LOG_AND_COUNT, self._product_id, *msgspec.structs.astuple(batch[-1].counts),
                    first_seq, first_seq + len(events) - 1, frame(event_encoder.encode(events)))
            if orders.placed:
                await insert_new_orders(self.conn, self._product_id, batch[-1].currency,
                                        orders.placed)
            if orders.changed:
                await self.conn.execute(_UPDATE_ORDERS,
                                        *_changed_columns(orders.changed.values()))
            for seq, state in snapshots:
                await self._write_snapshot(seq, state)

    async def _write_snapshot(self, seq: int, state: bytes) -> None:
        await self.conn.execute(
            "INSERT INTO snapshots (product_id, seq, record) VALUES ($1, $2, $3)",
            self._product_id, seq, frame(state),
        )
        await self.conn.execute(
            """DELETE FROM snapshots WHERE product_id = $1 AND seq < (
                   SELECT min(seq) FROM (SELECT seq FROM snapshots WHERE product_id = $1
                                         ORDER BY seq DESC LIMIT $2) AS kept)""",
            self._product_id, SNAPSHOTS_KEPT,
        )

    def _fail(self, batch: list[_Append], error: BaseException) -> None:
        """On the owner's loop, so no append slips in between failing and refusing."""
        self.failure = error
        for item in [*batch, *self._queue]:
            if not item.durable.done():
                item.durable.set_exception(WalBroken(f"flush failed: {error!r}"))
        self._queue.clear()
