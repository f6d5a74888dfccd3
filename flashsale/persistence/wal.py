"""Group commit: a product's appended events go to PostgreSQL, many appends a transaction.

Appends that queue up while a commit is in flight go out together in the next transaction, as
one WAL record plus the orders read-model rows they change and the product's counts after them.
The committer runs in the node's WAL service (`wal_link`), apart from the product actor that
decides: the two work side by side instead of taking turns at one interpreter lock.
"""

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

import asyncpg
import msgspec

from flashsale.actors.messages import (
    Event,
    OrderPlaced,
    OrderRecord,
    OrderStatus,
    ProductCounts,
)
from flashsale.persistence.frames import frame

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


class Append(NamedTuple):
    first_seq: int
    events: list[Event]
    payload: bytes  # the same events as the actor encoded them: one msgpack array
    changed: list[OrderRecord]  # orders the events change, as they stand after them
    counts: ProductCounts  # after these events
    currency: str
    snapshot: tuple[int, bytes] | None

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.events) - 1


# The size of a msgpack array's header, by its first byte: fixarray, array 16, array 32.
_ARRAY_HEADER_SIZE = {**dict.fromkeys(range(0x90, 0xa0), 1), 0xdc: 3, 0xdd: 5}


def _joined(payloads: list[bytes], count: int) -> bytes:
    """The elements of several msgpack arrays as one array of `count`, without decoding them."""
    if len(payloads) == 1:
        return payloads[0]
    if count < 16:
        header = bytes([0x90 | count])
    elif count < 1 << 16:
        header = b"\xdc" + count.to_bytes(2, "big")
    else:
        header = b"\xdd" + count.to_bytes(4, "big")
    return header + b"".join(payload[_ARRAY_HEADER_SIZE[payload[0]]:] for payload in payloads)


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


class GroupCommitter:
    """Commits one product's appends in order on the connection that holds its writer lock, and
    reports each commit's last sequence number to `committed`. Its task ends with the error of
    a flush that failed: the actor's state is then ahead of the log, and it recovers."""

    def __init__(self, conn: asyncpg.Connection, product_id: str,
                 committed: Callable[[int], object]) -> None:
        self.conn = conn
        self._product_id = product_id
        self._committed = committed
        self._queue: deque[Append] = deque()
        self._wakeup = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def add(self, append: Append) -> None:
        self._queue.append(append)
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._take_batch()
                await self._flush(batch)
                self._committed(batch[-1].last_seq)
                del batch  # an idle committer keeps no events alive

    def _take_batch(self) -> list[Append]:
        batch = [self._queue.popleft()]
        events = len(batch[0].events)
        while self._queue and events + len(self._queue[0].events) <= EVENTS_PER_FLUSH_MAX:
            item = self._queue.popleft()
            batch.append(item)
            events += len(item.events)
            if item.snapshot is not None:
                break
        return batch

    async def _flush(self, batch: list[Append]) -> None:
        count = sum(len(item.events) for item in batch)
        placed = [e for item in batch for e in item.events if type(e) is OrderPlaced]
        # Each order updated once, to where the last append left it; an order placed and
        # changed in one flush is inserted, then updated.
        changed = {order.order_id: order for item in batch for order in item.changed}
        first_seq = batch[0].first_seq
        async with self.conn.transaction():
            if count:
                await self.conn.execute(
                    _LOG_AND_COUNT, self._product_id, *msgspec.structs.astuple(batch[-1].counts),
                    first_seq, first_seq + count - 1,
                    frame(_joined([item.payload for item in batch], count)))
            if placed:
                await insert_new_orders(self.conn, self._product_id, batch[-1].currency, placed)
            if changed:
                await self.conn.execute(_UPDATE_ORDERS, *_changed_columns(changed.values()))
            for item in batch:
                if item.snapshot is not None:
                    await self._write_snapshot(*item.snapshot)

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
