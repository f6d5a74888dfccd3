"""The WAL writer against a real PostgreSQL, driven as the product actor drives it: appends that
queue behind a commit go out together, and a failed commit fails every append waiting."""

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from helpers import session_waiting_for_a_lock

from flashsale.actors.messages import (
    CancelOrder,
    CapturePayment,
    Command,
    DefineProduct,
    PlaceOrder,
    ProductTerms,
)
from flashsale.actors.product import Policy, ProductState, execute
from flashsale.actors.product_actor import _order_changes, counts_of, now_ms
from flashsale.ids import uuid7
from flashsale.persistence.replay import encode_state, rebuild
from flashsale.persistence.wal import WalBroken, WalWriter
from flashsale.tasks import LoopThread

PRICE = 1_000


class Product:
    """A product's state and its writer, appended to as the actor appends: each call decides a
    batch of commands and hands its events to the writer."""

    def __init__(self, writer: WalWriter, product_id: str) -> None:
        self.writer = writer
        self.state = ProductState()
        self.product_id = product_id

    def append(self, *commands: Command, snapshot: bool = False) -> asyncio.Future[None]:
        events = [event for cmd in commands
                  for event in execute(self.state, cmd, now_ms(), Policy())[1]]
        first_seq = self.state.last_seq + 1
        self.state.last_seq += len(events)
        return self.writer.append(
            first_seq, tuple(events), _order_changes(self.state, events), counts_of(self.state),
            "INR", (self.state.last_seq, encode_state(self.state)) if snapshot else None)


@pytest.fixture
async def product(database_dsn: str) -> AsyncIterator[Product]:
    io = LoopThread("wal-test")
    conn = await io.run(asyncpg.connect(database_dsn))
    product_id = str(uuid.uuid4())
    product = Product(WalWriter(conn, product_id, io), product_id)
    now = now_ms()
    terms = ProductTerms(product_id, PRICE, "INR", now - 1_000, now + 3_600_000, 2)
    await product.append(DefineProduct(terms, 10))
    yield product
    await product.writer.close()
    io.loop.call_soon_threadsafe(conn.terminate)
    io.loop.call_soon_threadsafe(io.loop.stop)


async def wal_held_by(conn: asyncpg.Connection) -> None:
    """Lock the log from another session, so the writer's next commit waits."""
    await conn.execute("BEGIN; LOCK TABLE wal IN ACCESS EXCLUSIVE MODE")


async def test_appends_queued_behind_a_commit_go_out_together_as_the_last_left_them(
    product: Product, database_dsn: str
) -> None:
    order = PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1)
    holder = await asyncpg.connect(database_dsn)
    try:
        await wal_held_by(holder)
        placing = product.append(order)
        await session_waiting_for_a_lock(holder)
        # Behind the waiting commit: a snapshot, then two changes of one order.
        paying = product.append(CapturePayment(order.order_id, "pay-1", PRICE, "INR"),
                                snapshot=True)
        snapshot_seq = product.state.last_seq
        cancelling = product.append(CancelOrder(order.order_id, order.user_id))
        assert not (placing.done() or paying.done() or cancelling.done())
        await holder.execute("COMMIT")
        async with asyncio.timeout(10):
            await asyncio.gather(placing, paying, cancelling)
        ranges = await holder.fetch("SELECT first_seq, last_seq FROM wal WHERE product_id = $1 "
                                    "ORDER BY first_seq", product.product_id)
        row = await holder.fetchrow("SELECT status, refund_status FROM orders WHERE id = $1",
                                    order.order_id)
        rebuilt = await rebuild(holder, product.product_id)
    finally:
        await holder.close()
    assert [tuple(r) for r in ranges] == [(1, 1), (2, 2), (3, 4)]  # one commit for both
    assert tuple(row) == ("cancelled", "pending")
    # The snapshot lies inside the last record: recovery applies only the events after it.
    assert snapshot_seq == 3 and (rebuilt.snapshot_seq, rebuilt.events_replayed) == (3, 1)
    assert rebuilt.state == product.state


async def test_a_failed_commit_fails_every_append_waiting_and_then_refuses_more(
    product: Product, database_dsn: str
) -> None:
    holder = await asyncpg.connect(database_dsn)
    try:
        await wal_held_by(holder)
        waiting = [product.append(PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1))
                   for _ in range(3)]
        writer_pid = await session_waiting_for_a_lock(holder)
        waiting += [product.append(PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1))
                    for _ in range(3)]
        await holder.execute("SELECT pg_terminate_backend($1)", writer_pid)
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        await holder.execute("ROLLBACK")
        logged = await holder.fetchval("SELECT max(last_seq) FROM wal WHERE product_id = $1",
                                       product.product_id)
    finally:
        await holder.close()
    assert [type(outcome) for outcome in outcomes] == [WalBroken] * 6
    assert logged == 1  # only the definition, committed before
    assert not product.writer.has_room()
    with pytest.raises(WalBroken):
        product.append(PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1))
