"""A product's log through the WAL service's link, against a real PostgreSQL, driven as the
product actor drives it: appends that queue behind a commit go out together, a failed commit
fails every append waiting, and a link holds its product's writer lock while it lives."""

import asyncio
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import msgspec
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
from flashsale.actors.product_actor import changed_orders, counts_of, now_ms, writer_lock_key
from flashsale.actors.wal_service import socket_path
from flashsale.ids import uuid7
from flashsale.persistence.replay import encode_state, rebuild
from flashsale.persistence.wal import _joined
from flashsale.persistence.wal_link import (
    OpenLog,
    WalBroken,
    WalClient,
    WalUnavailable,
    serve_product_log,
)

PRICE = 1_000


class Product:
    """A product's state and its log, appended to as the actor appends: each call decides a
    batch of commands and hands its events to the log."""

    def __init__(self, log: WalClient, product_id: str) -> None:
        self.log = log
        self.state = ProductState()
        self.product_id = product_id

    def append(self, *commands: Command, snapshot: bool = False) -> asyncio.Future[None]:
        events = [event for cmd in commands
                  for event in execute(self.state, cmd, now_ms(), Policy())[1]]
        first_seq = self.state.last_seq + 1
        self.state.last_seq += len(events)
        return self.log.append(
            first_seq, events, changed_orders(self.state, events), counts_of(self.state),
            "INR", (self.state.last_seq, encode_state(self.state)) if snapshot else None)


class Links:
    """The WAL service's socket, served in the test's own process: opens links as actors do."""

    def __init__(self, path: str, dsn: str) -> None:
        self.path = path
        self.dsn = dsn
        self.opened: list[WalClient] = []

    async def open(self, product_id: str, dsn: str | None = None) -> WalClient:
        link = await WalClient.open(self.path, OpenLog(product_id, dsn or self.dsn,
                                                       writer_lock_key(product_id)))
        self.opened.append(link)
        return link


@pytest.fixture
async def links(database_dsn: str, tmp_path: Path) -> AsyncIterator[Links]:
    path = str(tmp_path / "wal.sock")
    server = await asyncio.start_unix_server(serve_product_log, path)
    links = Links(path, database_dsn)
    yield links
    for link in links.opened:
        await link.close()
    server.close()
    await server.wait_closed()


@pytest.fixture
async def product(links: Links) -> Product:
    product_id = str(uuid.uuid4())
    product = Product(await links.open(product_id), product_id)
    now = now_ms()
    terms = ProductTerms(product_id, PRICE, "INR", now - 1_000, now + 3_600_000, 2)
    await product.append(DefineProduct(terms, 10))
    return product


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
    assert not product.log.has_room()
    with pytest.raises(WalBroken):
        product.append(PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1))


async def test_a_products_second_link_opens_only_once_the_first_has_ended(
    product: Product, links: Links
) -> None:
    """A second link is a new incarnation of the product's actor: it may read the log to
    recover only once the older one can no longer commit."""
    opening = asyncio.ensure_future(links.open(product.product_id))
    await asyncio.sleep(0.5)
    assert not opening.done()
    await product.append(PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1))  # the first commits
    await product.log.close()
    async with asyncio.timeout(10):
        second = await opening
    assert second.has_room()


async def test_a_log_that_cannot_be_opened_says_why(links: Links) -> None:
    unreachable = "postgresql://flashsale:secret@127.0.0.1:1/flashsale"
    with pytest.raises(WalUnavailable, match="could not open the log: ") as refused:
        await links.open(str(uuid.uuid4()), unreachable)
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize("sizes", [[1, 2], [3, 20, 1], [70_000, 5]],
                         ids=["small", "array 16", "array 32"])
def test_joined_appends_decode_as_one_array_of_their_events(sizes: list[int]) -> None:
    arrays = [[f"{n}-{i}" for i in range(size)] for n, size in enumerate(sizes)]
    joined = _joined([msgspec.msgpack.encode(a) for a in arrays], sum(sizes))
    assert msgspec.msgpack.decode(joined) == [item for a in arrays for item in a]


async def test_a_message_the_service_cannot_read_ends_the_link_and_frees_the_product(
    links: Links, caplog: pytest.LogCaptureFixture
) -> None:
    product_id = str(uuid.uuid4())
    reader, writer = await asyncio.open_unix_connection(links.path)
    for body in (msgspec.msgpack.encode(OpenLog(product_id, links.dsn,
                                                writer_lock_key(product_id))), b"\xc1"):
        writer.write(len(body).to_bytes(4, "big") + body)
    async with asyncio.timeout(10):
        opened = await reader.readexactly(4)
        await reader.readexactly(int.from_bytes(opened, "big"))
        assert await reader.read() == b""  # the service ended the link
        assert (await links.open(product_id)).has_room()  # and the product's writer lock
    writer.close()
    assert f"product {product_id}: the link to its actor failed" in caplog.text


def test_a_wal_service_removes_the_sockets_of_services_gone_before_it_adds_its_own() -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    directory = Path(socket_path()).parent
    gone, running = directory / f"{int(ended.stdout)}.sock", directory / f"{os.getpid()}.sock"
    for socket in (gone, running):
        socket.touch()
    try:
        assert socket_path() == str(running)
        assert (gone.exists(), running.exists()) == (False, True)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    finally:
        gone.unlink(missing_ok=True)
        running.unlink()
