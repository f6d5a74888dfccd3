"""Rebuild a product's state from its newest snapshot and the WAL after it.

The product actor recovers through `rebuild`, and so does `flashsale replay`: one recovery path.
A record that is torn, corrupt or out of sequence stops the fold; nothing past it is applied.
"""

import logging
import uuid
from collections.abc import AsyncIterator
from typing import NamedTuple

import asyncpg
import msgspec

from flashsale.actors.invariants import check_invariants
from flashsale.actors.messages import SETTLED_STATUSES, Event, OrderStatus, RefundStatus
from flashsale.actors.product import ProductState, Snapshot, apply_all, restore, snapshot_of
from flashsale.persistence.frames import CorruptRecord, unframe

log = logging.getLogger(__name__)

_events_decoder = msgspec.msgpack.Decoder(list[Event])
_snapshot_decoder = msgspec.msgpack.Decoder(Snapshot)
_snapshot_encoder = msgspec.msgpack.Encoder()

# A record can hold tens of thousands of events (megabytes): fetching 64 at a time left a
# churned sale's actor 64 MB after recovery, 16 at a time 57-59 MB, for the same recovery time.
RECORDS_PREFETCH = 16
ORDER_ROWS_PREFETCH = 10_000  # rows of about 100 bytes


class Corruption(NamedTuple):
    product_id: str
    seq: int
    reason: str

    def __str__(self) -> str:
        return f"product {self.product_id}: WAL corrupt at seq {self.seq}: {self.reason}"


class Rebuilt(NamedTuple):
    state: ProductState
    snapshot_seq: int
    events_replayed: int
    corruption: Corruption | None


def encode_state(state: ProductState) -> bytes:
    return _snapshot_encoder.encode(snapshot_of(state))


def decode_state(blob: bytes) -> ProductState:
    return restore(_snapshot_decoder.decode(blob))


async def load_snapshot(conn: asyncpg.Connection, product_id: str) -> ProductState | None:
    row = await conn.fetchrow(
        "SELECT seq, record FROM snapshots WHERE product_id = $1 ORDER BY seq DESC LIMIT 1",
        product_id,
    )
    if row is None:
        return None
    try:
        state = decode_state(unframe(row["record"]))
    except (CorruptRecord, msgspec.DecodeError) as error:
        # The WAL is never truncated, so a full replay still gets everything back.
        log.warning("product %s: snapshot at seq %s unusable (%s); replaying the whole WAL",
                    product_id, row["seq"], error)
        return None
    return state


async def rebuild(conn: asyncpg.Connection, product_id: str, *,
                  use_snapshot: bool = True) -> Rebuilt:
    state = (await load_snapshot(conn, product_id) if use_snapshot else None) or ProductState()
    snapshot_seq = state.last_seq
    replayed = 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        records = conn.cursor(
            "SELECT first_seq, last_seq, record FROM wal "
            "WHERE product_id = $1 AND last_seq > $2 ORDER BY first_seq",
            product_id, snapshot_seq, prefetch=RECORDS_PREFETCH,
        )
        async for first_seq, last_seq, record in records:
            expected = state.last_seq + 1
            # Each record follows on from the one before; only the first may begin before the
            # snapshot, which may have been taken inside a record that group-committed several
            # appends.
            follows = first_seq == expected or (not replayed and first_seq < expected <= last_seq)
            if not follows:
                reason = f"expected seq {expected}, found a record of {first_seq}..{last_seq}"
                return Rebuilt(state, snapshot_seq, replayed, Corruption(product_id, expected,
                                                                           reason))
            try:
                events = _events_decoder.decode(unframe(record))
                if len(events) != last_seq - first_seq + 1:
                    raise CorruptRecord(f"holds {len(events)} events, its range says "
                                        f"{last_seq - first_seq + 1}")
            except (CorruptRecord, msgspec.DecodeError) as error:
                return Rebuilt(state, snapshot_seq, replayed,
                               Corruption(product_id, first_seq, str(error)))
            apply_all(state, events[expected - first_seq:])
            replayed += last_seq - expected + 1
            state.last_seq = last_seq
    return Rebuilt(state, snapshot_seq, replayed, None)


class ProductReport(msgspec.Struct):
    product_id: str
    stock: int
    available: int
    reserved: int
    sold: int
    last_seq: int
    problems: list[str]


async def logged_products(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch("SELECT DISTINCT product_id FROM wal ORDER BY product_id")
    return [str(row["product_id"]) for row in rows]


async def reports(conn: asyncpg.Connection, products: list[str], *,
                  verify: bool) -> AsyncIterator[ProductReport]:
    """Rebuild each product, in id order; with `verify`, also check the invariants, that the
    snapshot agrees with a replay of the whole WAL, and that the orders read model agrees with
    the WAL.

    Everything is read in one transaction, so from one moment of the database: a running
    server may commit more of the products' logs meanwhile."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        stored = _StoredOrders(conn, products) if verify else None
        for product_id in sorted(products, key=uuid.UUID):  # the order the rows come in
            yield await _report(conn, product_id, stored)


async def _report(conn: asyncpg.Connection, product_id: str,
                  stored: "_StoredOrders | None") -> ProductReport:
    rebuilt = await rebuild(conn, product_id)
    state = rebuilt.state
    problems = [str(rebuilt.corruption)] if rebuilt.corruption else []
    if stored is not None:
        problems += [f"product {product_id}: {p}" for p in check_invariants(state)]
        if rebuilt.snapshot_seq and not rebuilt.corruption:
            full = await rebuild(conn, product_id, use_snapshot=False)
            if full.state != state:
                problems.append(f"product {product_id}: snapshot at seq "
                                f"{rebuilt.snapshot_seq} disagrees with a replay of the "
                                "whole WAL")
        problems += _read_model_problems(product_id, state, await stored.of(product_id))
    return ProductReport(product_id, state.stock, state.available, state.reserved, state.sold,
                         state.last_seq, problems)


# An order's row as `verify` compares it: status, refund status, payment id.
_StoredOrder = tuple[str, str, str | None]


class _StoredOrders:
    """The orders rows of the products being verified, read in one pass, in product id order.
    The table has no index by product (every commit writes it), so a query per product would
    read the whole table once per product."""

    def __init__(self, conn: asyncpg.Connection, products: list[str]) -> None:
        self._rows = conn.cursor(
            "SELECT product_id, id::text, status, refund_status, payment_id FROM orders "
            "WHERE product_id = ANY($1::uuid[]) ORDER BY product_id",
            products, prefetch=ORDER_ROWS_PREFETCH,
        ).__aiter__()
        self._next: asyncpg.Record | None = None

    async def of(self, product_id: str) -> dict[str, _StoredOrder]:
        """The rows of `product_id`; asked for in id order, as the rows come."""
        product, stored = uuid.UUID(product_id), {}
        row = self._next if self._next is not None else await anext(self._rows, None)
        while row is not None and row[0] == product:
            stored[row[1]] = (row[2], row[3], row[4])
            row = await anext(self._rows, None)
        self._next = row
        return stored


def _read_model_problems(product_id: str, state: ProductState,
                         stored: dict[str, _StoredOrder]) -> list[str]:
    """Every order in memory has its row, as it stands; a row without an order in memory is of
    an order the product forgot, which it does only once the order is settled."""
    problems = []
    differing = sorted(
        order_id for order_id, o in state.orders.items()
        if stored.get(order_id) != (o.status.value, o.refund_status.value, o.payment_id)
    )
    if differing:
        problems.append(f"product {product_id}: {len(differing)} orders differ between the WAL "
                        f"and the orders table, first {differing[0]}")
    unsettled = sorted(
        order_id for order_id, (status, refund_status, _) in stored.items()
        if order_id not in state.orders
        and (OrderStatus(status) not in SETTLED_STATUSES
             or refund_status == RefundStatus.PENDING.value)
    )
    if unsettled:
        problems.append(f"product {product_id}: {len(unsettled)} unsettled orders are in the "
                        f"orders table but not in the WAL's state, first {unsettled[0]}")
    return problems
