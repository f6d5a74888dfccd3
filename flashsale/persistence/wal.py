"""The WAL writer: appends a product's events and group-commits them to PostgreSQL.

`append` returns a future that resolves only after the COMMIT holding those events. Appends that
queue up while a commit is in flight go out together in the next transaction (group commit), as
one WAL record plus the orders read-model rows they change. The queue is bounded; after a failed
flush the writer refuses everything, because the caller's state is ahead of the log.
"""

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

import asyncpg

from flashsale.actors.messages import Event, event_encoder
from flashsale.actors.product import OrderRecord
from flashsale.persistence.frames import frame

QUEUE_DEPTH_MAX = 256
EVENTS_PER_FLUSH_MAX = 50_000
SNAPSHOTS_KEPT = 2

_UPSERT_ORDERS = """
INSERT INTO orders (id, product_id, user_id, idempotency_key, quantity, unit_price_minor,
                    currency, status, payment_id, refund_status, refund_amount_minor,
                    expires_at, confirmed_at, created_at, updated_at)
SELECT o.id, $1, o.user_id, o.idempotency_key, o.quantity, o.unit_price_minor, $2, o.status,
       o.payment_id, o.refund_status, o.refund_amount_minor,
       to_timestamp(o.expires_ms / 1000.0), to_timestamp(o.confirmed_ms / 1000.0),
       to_timestamp(o.created_ms / 1000.0), to_timestamp(o.updated_ms / 1000.0)
FROM unnest($3::uuid[], $4::uuid[], $5::text[], $6::int4[], $7::int8[], $8::text[], $9::text[],
            $10::text[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], $15::int8[])
     AS o(id, user_id, idempotency_key, quantity, unit_price_minor, status, payment_id,
          refund_status, refund_amount_minor, expires_ms, confirmed_ms, created_ms, updated_ms)
ON CONFLICT (id) DO UPDATE SET
    status = EXCLUDED.status, payment_id = EXCLUDED.payment_id,
    refund_status = EXCLUDED.refund_status, refund_amount_minor = EXCLUDED.refund_amount_minor,
    confirmed_at = EXCLUDED.confirmed_at, updated_at = EXCLUDED.updated_at
"""


class WalOverloaded(Exception):
    """The append queue is full: shed load now rather than wait without bound."""


class WalBroken(Exception):
    """An earlier flush failed; the writer accepts nothing until its owner recovers."""


class _Append(NamedTuple):
    first_seq: int
    events: tuple[Event, ...]
    orders: dict[str, OrderRecord]
    currency: str
    snapshot: tuple[int, bytes] | None
    durable: asyncio.Future[None]


def order_columns(orders: Iterable[OrderRecord]) -> list[list[object]]:
    """The read-model columns of `orders`, one list per column, in _UPSERT_ORDERS order."""
    rows = [
        (o.order_id, o.user_id, o.idempotency_key, o.quantity, o.unit_price_minor, o.status.value,
         o.payment_id, o.refund_status.value, o.refund_amount_minor, o.expires_at_ms,
         o.confirmed_at_ms, o.created_at_ms, o.updated_at_ms)
        for o in orders
    ]
    return [list(column) for column in zip(*rows, strict=True)]


class WalWriter:
    def __init__(self, conn: asyncpg.Connection, product_id: str,
                 queue_depth_max: int = QUEUE_DEPTH_MAX) -> None:
        self._conn = conn
        self._product_id = product_id
        self._queue_depth_max = queue_depth_max
        self._queue: deque[_Append] = deque()
        self._wakeup = asyncio.Event()
        self._last: asyncio.Future[None] | None = None
        self.failure: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    def has_room(self) -> bool:
        return self.failure is None and len(self._queue) < self._queue_depth_max

    def append(self, first_seq: int, events: tuple[Event, ...], orders: dict[str, OrderRecord],
               currency: str, snapshot: tuple[int, bytes] | None = None) -> asyncio.Future[None]:
        if self.failure is not None:
            raise WalBroken("the write-ahead log failed earlier") from self.failure
        if len(self._queue) >= self._queue_depth_max:
            raise WalOverloaded(f"{len(self._queue)} appends are waiting for the disk")
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Append(first_seq, events, orders, currency, snapshot, durable))
        self._last = durable
        self._wakeup.set()
        return durable

    def durable(self) -> asyncio.Future[None]:
        """Resolves once everything appended so far is committed."""
        if self._last is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._last

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._take_batch()
                try:
                    await self._flush(batch)
                except BaseException as error:  # noqa: BLE001 - every waiter must hear of it
                    self._fail(batch, error)
                    if not isinstance(error, Exception):
                        raise
                    return
                for item in batch:
                    item.durable.set_result(None)

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
        orders: dict[str, OrderRecord] = {}
        for item in batch:
            orders.update(item.orders)
        snapshots = [item.snapshot for item in batch if item.snapshot is not None]
        first_seq = batch[0].first_seq
        async with self._conn.transaction():
            if events:
                await self._conn.execute(
                    "INSERT INTO wal (product_id, first_seq, last_seq, record) "
                    "VALUES ($1, $2, $3, $4)",
                    self._product_id, first_seq, first_seq + len(events) - 1,
                    frame(event_encoder.encode(events)),
                )
            if orders:
                await self._conn.execute(_UPSERT_ORDERS, self._product_id, batch[-1].currency,
                                         *order_columns(orders.values()))
            for seq, state in snapshots:
                await self._write_snapshot(seq, state)

    async def _write_snapshot(self, seq: int, state: bytes) -> None:
        await self._conn.execute(
            "INSERT INTO snapshots (product_id, seq, record) VALUES ($1, $2, $3)",
            self._product_id, seq, frame(state),
        )
        await self._conn.execute(
            """DELETE FROM snapshots WHERE product_id = $1 AND seq < (
                   SELECT min(seq) FROM (SELECT seq FROM snapshots WHERE product_id = $1
                                         ORDER BY seq DESC LIMIT $2) AS kept)""",
            self._product_id, SNAPSHOTS_KEPT,
        )

    def _fail(self, batch: list[_Append], error: BaseException) -> None:
        self.failure = error
        for item in [*batch, *self._queue]:
            if not item.durable.done():
                item.durable.set_exception(WalBroken(f"flush failed: {error!r}"))
        self._queue.clear()
