"""The product actor for real: Ray actors, PostgreSQL, kill -9, a database restart."""

import asyncio
import ctypes
import gc
import logging
import os
import signal
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

import asyncpg
import msgspec
import pytest
import ray
from helpers import (
    ProductFactory,
    drop_sessions,
    forgotten,
    live_state,
    replay_cli,
    session_waiting_for_a_lock,
    set_database_default,
    verified,
)
from ray.actor import ActorHandle

from flashsale.actors import batching
from flashsale.actors.messages import (
    CancelOrder,
    CapturePayment,
    Command,
    DefineProduct,
    FailPayment,
    OrderPlaced,
    OrderRecord,
    OrderStatus,
    PlaceOrder,
    ProductCounts,
    ProductDefined,
    ProductTerms,
    Rejection,
    event_encoder,
)
from flashsale.actors.product import Policy, Reply
from flashsale.actors.product_actor import (
    ActorConfig,
    ProductUnavailable,
    counts_of,
    now_ms,
    send,
    writer_lock_key,
)
from flashsale.actors.registry import product_actor
from flashsale.actors.wal_service import wal_service_here
from flashsale.ids import uuid7
from flashsale.persistence.embedded import EmbeddedPostgres
from flashsale.persistence.frames import frame
from flashsale.persistence.orders import order_by_id, order_record
from flashsale.persistence.replay import rebuild
from flashsale.persistence.wal import insert_new_orders

CallFailed = (ray.exceptions.RayError, ProductUnavailable)


async def committed_counts(conn: asyncpg.Connection, product_id: str) -> ProductCounts:
    row = await conn.fetchrow("SELECT stock, available, reserved, sold, last_seq "
                              "FROM product_counts WHERE product_id = $1", product_id)
    return ProductCounts(*row)


def place(quantity: int = 1) -> PlaceOrder:
    return PlaceOrder(uuid7(), str(uuid.uuid4()), str(uuid.uuid4()), quantity)


async def send_until_decided(actor: ActorHandle, commands: list[Command],
                             timeout_s: float = 60) -> list[Reply]:
    """What a client does after an unanswered request: retry with the same idempotency keys
    (a retry gets a fresh order id, as a new HTTP request would)."""
    deadline = time.monotonic() + timeout_s
    retried = [msgspec.structs.replace(c, order_id=uuid7())
               if isinstance(c, PlaceOrder) else c for c in commands]
    while True:
        try:
            return await send(actor, retried)
        except CallFailed:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


class Shoppers:
    """Batches of new orders sent while a fault strikes: what was acknowledged, what was not."""

    def __init__(self, actor: ActorHandle) -> None:
        self.actor = actor
        self.acknowledged: dict[str, OrderRecord] = {}
        self.unanswered: list[list[Command]] = []

    async def stream(self, batches: int, batch_size: int, pause_s: float) -> None:
        for _ in range(batches):
            batch: list[Command] = [place() for _ in range(batch_size)]
            try:
                replies = await send(self.actor, batch)
            except CallFailed:
                self.unanswered.append(batch)
                await asyncio.sleep(pause_s)
                continue
            for reply in replies:
                assert isinstance(reply, OrderRecord)
                self.acknowledged[reply.user_id] = reply
            await asyncio.sleep(pause_s)

    async def retry_unanswered(self) -> None:
        assert self.unanswered, "the fault should have left some batches unanswered"
        for batch in self.unanswered:
            for cmd, reply in zip(batch, await send_until_decided(self.actor, batch),
                                  strict=True):
                assert isinstance(cmd, PlaceOrder) and isinstance(reply, OrderRecord)
                self.acknowledged[cmd.user_id] = reply


async def test_concurrent_batches_never_oversell_and_the_log_has_no_gaps(
    products: ProductFactory, database_dsn: str
) -> None:
    product_id, actor = await products(stock=300, limit=2)

    async def shopper_stream() -> list[Reply]:
        replies: list[Reply] = []
        for _ in range(8):
            batch = [place(quantity=1 + n % 2) for n in range(25)]
            answers = await send(actor, batch)
            assert len(answers) == len(batch)
            for cmd, reply in zip(batch, answers, strict=True):  # replies come back in order
                if isinstance(reply, OrderRecord):
                    assert (reply.user_id, reply.quantity) == (cmd.user_id, cmd.quantity)
                else:
                    assert reply is Rejection.OUT_OF_STOCK
            replies += answers
        return replies

    streams = await asyncio.gather(*(shopper_stream() for _ in range(6)))
    accepted = [r for replies in streams for r in replies if isinstance(r, OrderRecord)]
    assert sum(order.quantity for order in accepted) == 300
    counts = await actor.counts.remote()
    assert (counts.available, counts.reserved, counts.sold) == (0, 300, 0)

    conn = await asyncpg.connect(database_dsn)
    try:
        ranges = await conn.fetch("SELECT first_seq, last_seq FROM wal WHERE product_id = $1 "
                                  "ORDER BY first_seq", product_id)
        expected_first = 1
        for row in ranges:
            assert row["first_seq"] == expected_first
            expected_first = row["last_seq"] + 1
        assert expected_first - 1 == counts.last_seq
        stored = await conn.fetchval("SELECT count(*) FROM orders WHERE product_id = $1",
                                     product_id)
        assert stored == len(accepted)
    finally:
        await conn.close()
    checked = replay_cli(database_dsn, "--verify", "--json")
    assert checked.returncode == 0, checked.stderr
    [report] = msgspec.json.decode(checked.stdout)
    assert report["reserved"] == 300 and report["problems"] == []


async def test_verify_finds_a_product_consistent_while_it_keeps_taking_orders(
    products: ProductFactory, database_dsn: str
) -> None:
    """`flashsale replay --verify` may run beside a live server: it must check one moment of
    the database, not a snapshot, a log and a read model each read at a different one."""
    product_id, actor = await products(stock=1_000_000, snapshot_every_events=40)
    shopping = True

    async def shop() -> None:
        while shopping:
            await send(actor, [place() for _ in range(10)])

    shoppers = asyncio.gather(*(shop() for _ in range(3)))
    conn = await asyncpg.connect(database_dsn)
    try:
        problems = [(await verified(conn, product_id)).problems for _ in range(25)]
    finally:
        shopping = False
        await shoppers
        await conn.close()
    assert problems == [[]] * 25


@pytest.mark.parametrize("victim", ["product actor", "WAL service"])
async def test_kill_9_loses_no_acknowledged_order_and_retries_create_no_second(
    products: ProductFactory, database_dsn: str, victim: str
) -> None:
    """The WAL service is the node's: Ray starts it again, and its products open their logs
    there again as they recover."""
    product_id, actor = await products(stock=100_000, limit=1, snapshot_every_events=150)
    shoppers = Shoppers(actor)
    process = actor if victim == "product actor" else wal_service_here()
    killed = await process.pid.remote()

    async def kill_mid_stream() -> None:
        while len(shoppers.acknowledged) < 300:
            await asyncio.sleep(0.01)
        os.kill(killed, signal.SIGKILL)

    await asyncio.gather(*(shoppers.stream(40, 10, 0.005) for _ in range(4)), kill_mid_stream())
    await shoppers.retry_unanswered()
    acknowledged = shoppers.acknowledged

    state = await live_state(actor)
    for user_id, order in acknowledged.items():
        assert state.orders[order.order_id].status is OrderStatus.PENDING
        assert state.orders[order.order_id].user_id == user_id
    # One order per idempotency key: retries of orders that had committed found them.
    assert len(state.orders) == len(acknowledged) == 4 * 40 * 10

    conn = await asyncpg.connect(database_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM snapshots WHERE product_id = $1",
                                   product_id) > 0
        from_scratch = await rebuild(conn, product_id, use_snapshot=False)
        assert from_scratch.corruption is None and from_scratch.state == state
        assert await committed_counts(conn, product_id) == counts_of(state)
    finally:
        await conn.close()
    assert await process.pid.remote() != killed


async def test_an_idle_product_whose_wal_service_died_recovers_on_its_own(
    products: ProductFactory
) -> None:
    """No call waits on its log when the link ends: the actor must still see it, and recover."""
    _, actor = await products(stock=10)
    [first] = await send(actor, [place()])
    service = wal_service_here()
    os.kill(await service.pid.remote(), signal.SIGKILL)
    await service.pid.remote()  # answered once Ray has started it again
    await asyncio.sleep(1)  # time enough to recover with no call to start it
    [second] = await send(actor, [place()])
    assert isinstance(first, OrderRecord) and isinstance(second, OrderRecord)


@pytest.mark.parametrize("fault", ["clean stop", "crash", "crash of a server tuned not to wait",
                                   "dropped connection"])
async def test_a_database_fault_mid_stream_acknowledges_nothing_unflushed(
    products: ProductFactory, own_database: EmbeddedPostgres, fault: str
) -> None:
    """After a crash (pg_ctl's "immediate" stop) only the commits PostgreSQL had flushed to its
    own log come back: an order answered before then would be lost here, also on a server whose
    commits do not wait for the disk (synchronous_commit = off, a common tuning). A dropped
    connection fails the flush in flight while the server stays up."""
    server = own_database
    if fault == "crash of a server tuned not to wait":
        conn = await asyncpg.connect(server.dsn())
        try:
            await conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
    product_id, actor = await products(stock=100_000, dsn=server.dsn())
    shoppers = Shoppers(actor)

    async def strike() -> None:
        while len(shoppers.acknowledged) < 50:
            await asyncio.sleep(0.01)
        if fault == "dropped connection":
            assert await drop_sessions(server.dsn())
            return
        await asyncio.to_thread(server.stop, "fast" if fault == "clean stop" else "immediate")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.restart)

    await asyncio.gather(shoppers.stream(100, 5, 0.01), strike())
    await shoppers.retry_unanswered()
    acknowledged = shoppers.acknowledged

    conn = await asyncpg.connect(server.dsn())
    try:
        durable = await rebuild(conn, product_id)
    finally:
        await conn.close()
    assert durable.corruption is None
    for order in acknowledged.values():
        assert durable.state.orders[order.order_id].status is OrderStatus.PENDING
    assert len(durable.state.orders) == len(acknowledged)
    assert durable.state == await live_state(actor)


async def test_an_actor_keeps_its_session_where_the_database_ends_idle_ones(
    products: ProductFactory, database_dsn: str
) -> None:
    """A server may end sessions idle for a while (idle_session_timeout). The actor's session,
    which waits for the product's next order, must not be one of them."""
    await set_database_default(database_dsn, "idle_session_timeout", "500ms")
    _, actor = await products(stock=10)
    [first] = await send(actor, [place()])
    await asyncio.sleep(1)  # idle for twice the server's limit
    [second] = await send(actor, [place()])
    assert isinstance(first, OrderRecord) and isinstance(second, OrderRecord)


def _actor_log(pid: int) -> str:
    """What a product actor's process logged: Ray keeps it in a file per worker."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return "".join(path.read_text() for path in logs.glob(f"worker-*-{pid}.err"))


async def test_an_outage_is_logged_by_the_actor_as_it_starts_and_ends_not_at_every_retry(
    products: ProductFactory, own_database: EmbeddedPostgres
) -> None:
    server = own_database
    product_id, actor = await products(stock=10, hold_ttl_ms=1_000, dsn=server.dsn())
    [order] = await send(actor, [place()])
    assert isinstance(order, OrderRecord)
    pid = await actor.pid.remote()
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(4)  # the hold falls due: its expiry fails, then every reconnection
    await asyncio.to_thread(server.restart)
    conn = await asyncpg.connect(server.dsn())
    try:
        deadline = time.monotonic() + 30
        while await conn.fetchval("SELECT status FROM orders WHERE id = $1",
                                  order.order_id) != "expired":
            assert time.monotonic() < deadline, "the hold did not expire after the outage"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    await asyncio.sleep(0.5)  # the round that expired it has logged by now
    said = [line.split(f"product {product_id}: ")[1].split(",")[0]
            for line in _actor_log(pid).splitlines() if f"product {product_id}: " in line]
    assert said == ["writing its log failed", "housekeeping failed", "recovery failed",
                    "recovery works again", "writing its log works again",
                    "housekeeping works again"]


@pytest.mark.damages_wal
@pytest.mark.parametrize(
    ("damage", "damaged_seq", "reason"),
    [
        ("UPDATE wal SET record = substring(record from 1 for length(record) - 3)", 10,
         "record is cut short"),
        ("UPDATE wal SET record = set_byte(record, length(record) / 2, "
         "get_byte(record, length(record) / 2) # 1)", 10, "record checksum does not match"),
        ("DELETE FROM wal", 6, "expected seq 6, found a record of 10..13"),  # a gap
        ("UPDATE wal SET first_seq = 4, last_seq = 7", 6, "expected seq 6, found a record of 4..7"),
        ("UPDATE wal SET last_seq = 14", 10, "holds 4 events, its range says 5"),
    ],
    ids=["last-cut-short", "last-with-a-flipped-byte", "one-missing", "one-overlapping",
         "last-with-a-range-too-long"],
)
async def test_a_damaged_record_stops_replay_there(
    products: ProductFactory, database_dsn: str, damage: str, damaged_seq: int, reason: str
) -> None:
    product_id, actor = await products(stock=100, limit=5)
    for _ in range(3):  # records of seq 1 (the product), 2..5, 6..9 and 10..13
        await send(actor, [place() for _ in range(4)])
    ray.kill(actor, no_restart=True)

    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(f"{damage} WHERE product_id = $1 AND first_seq = $2", product_id,
                           damaged_seq)
        rebuilt = await rebuild(conn, product_id)
    finally:
        await conn.close()
    assert rebuilt.corruption is not None and rebuilt.corruption.seq == damaged_seq
    assert rebuilt.state.last_seq == damaged_seq - 1
    assert rebuilt.state.reserved == damaged_seq - 2  # nothing from the damaged record on

    checked = replay_cli(database_dsn, "--product", product_id)
    assert checked.returncode == 1
    assert f"product {product_id}: WAL corrupt at seq {damaged_seq}: {reason}" in checked.stderr


async def test_replay_waits_out_a_lock_and_a_lost_session_stops_it_with_one_line(
    products: ProductFactory, database_dsn: str
) -> None:
    """Replay reads whole states: a database's default lock_timeout, meant for queries, must not
    cut it short; and a session lost mid-way (the database restarted, say) is one line."""
    _, actor = await products(stock=10)
    assert isinstance((await send(actor, [place()]))[0], OrderRecord)
    await set_database_default(database_dsn, "lock_timeout", "100ms")
    holder = await asyncpg.connect(database_dsn)
    try:
        for lost in (True, False):
            async with holder.transaction():
                await holder.execute("LOCK TABLE wal IN ACCESS EXCLUSIVE MODE")
                replay = asyncio.create_task(asyncio.to_thread(replay_cli, database_dsn))
                deadline = time.monotonic() + 30
                while not (waiting := await holder.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()")):
                    assert time.monotonic() < deadline and not replay.done()
                    await asyncio.sleep(0.05)
                    # Else the transaction would go on seeing the sessions as they first were.
                    await holder.execute("SELECT pg_stat_clear_snapshot()")
                await asyncio.sleep(0.3)  # three of the database's lock timeouts
                if lost:
                    await holder.execute("SELECT pg_terminate_backend($1)", waiting)
                    checked = await replay
            if not lost:
                checked = await replay
            assert (checked.returncode, checked.stderr.strip()) == (
                (2, "flashsale: replay stopped, the database failed: connection was closed in "
                    "the middle of operation: terminating connection due to administrator "
                    "command") if lost else (0, "")), checked.stderr
    finally:
        await holder.close()


@pytest.mark.damages_wal
async def test_an_actor_refuses_to_serve_from_a_corrupt_log(
    products: ProductFactory, database_dsn: str
) -> None:
    product_id, actor = await products(stock=10)
    await send(actor, [place()])
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("UPDATE wal SET record = substring(record from 1 for 5) "
                           "WHERE product_id = $1 AND first_seq = 2", product_id)
    finally:
        await conn.close()
    os.kill(await actor.pid.remote(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            await send(actor, [place()])
        except ProductUnavailable as error:
            assert f"product {product_id}: WAL corrupt at seq 2" in str(error)
            break
        except ray.exceptions.RayError:  # still restarting
            await asyncio.sleep(0.1)
            continue
        pytest.fail("the actor served from a corrupt log")
    else:
        pytest.fail("the actor never came back to refuse")
    said = _actor_log(await actor.pid.remote())
    assert f"product {product_id}: WAL corrupt at seq 2: " in said
    assert "the product refuses every call until its log is mended" in said


async def test_a_damaged_snapshot_is_passed_over_for_the_whole_wal(
    products: ProductFactory, database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    product_id, actor = await products(stock=100, limit=5, snapshot_every_events=10)
    for _ in range(4):
        await send(actor, [place() for _ in range(5)])
    conn = await asyncpg.connect(database_dsn)
    try:
        intact = await rebuild(conn, product_id)
        assert intact.snapshot_seq > 0
        await conn.execute("UPDATE snapshots SET record = set_byte(record, 20, "
                           "get_byte(record, 20) # 1) WHERE product_id = $1 AND seq = $2",
                           product_id, intact.snapshot_seq)
        with caplog.at_level(logging.WARNING):
            passed_over = await rebuild(conn, product_id)
    finally:
        await conn.close()
    assert passed_over.corruption is None and passed_over.snapshot_seq == 0
    assert passed_over.state == intact.state == await live_state(actor)
    assert f"snapshot at seq {intact.snapshot_seq} unusable" in caplog.text


async def test_a_duplicate_is_answered_only_once_the_order_it_repeats_is_committed(
    products: ProductFactory, database_dsn: str
) -> None:
    """A retry may reach the product while the commit of the order it repeats is in flight:
    answering it sooner would acknowledge an order that a crash could still lose."""
    _, actor = await products(stock=10)
    order = place()
    holder = await asyncpg.connect(database_dsn)
    try:
        await holder.execute("BEGIN; LOCK TABLE wal IN ACCESS EXCLUSIVE MODE")
        first = asyncio.ensure_future(send(actor, [order]))
        await session_waiting_for_a_lock(holder)
        retry = asyncio.ensure_future(send(actor, [msgspec.structs.replace(order,
                                                                           order_id=uuid7())]))
        await asyncio.sleep(1)  # long enough for the actor to decide the retry
        assert not (first.done() or retry.done())
        await holder.execute("COMMIT")
        [placed], [again] = await first, await retry
    finally:
        await holder.close()
    assert isinstance(placed, OrderRecord) and again == placed


async def test_a_restarted_actor_counts_the_events_it_replayed_toward_its_next_snapshot(
    products: ProductFactory, database_dsn: str
) -> None:
    product_id, actor = await products(stock=100, limit=5, snapshot_every_events=10)
    await send(actor, [place() for _ in range(5)])  # seq 1 defined it: 6 events so far
    os.kill(await actor.pid.remote(), signal.SIGKILL)
    await send_until_decided(actor, [place() for _ in range(4)])
    conn = await asyncpg.connect(database_dsn)
    try:
        snapshots = await conn.fetch("SELECT seq FROM snapshots WHERE product_id = $1",
                                     product_id)
    finally:
        await conn.close()
    assert [row["seq"] for row in snapshots] == [10]


@pytest.mark.parametrize("query_timeouts", [False, True],
                         ids=["no timeouts", "the database's query timeouts"])
async def test_a_new_incarnation_rebuilds_only_once_the_older_writer_is_gone(
    ray_session: None, database_dsn: str, query_timeouts: bool
) -> None:
    """Ray may start a product's actor again while the old process still holds its database
    session (a node cut off, say). The writer lock holds the new one back until that session
    ends, so it neither misses nor reuses the sequence numbers of the old one's last commit.
    The wait is said once, also where the database cuts statements and lock waits short by
    default: the writer's are not queries to cut."""
    if query_timeouts:
        await set_database_default(database_dsn, "lock_timeout", "50ms")
        await set_database_default(database_dsn, "statement_timeout", "100ms")
    product_id = str(uuid.uuid4())
    now = now_ms()
    terms = ProductTerms(product_id, 1_000, "INR", now - 1_000, now + 3_600_000, 1)
    placed = OrderPlaced(uuid7(), str(uuid.uuid4()), "k", 1, 1_000, now, now + 600_000)
    older = await asyncpg.connect(database_dsn)
    await older.execute("SELECT pg_advisory_lock($1)", writer_lock_key(product_id))
    actor = product_actor(product_id, ActorConfig(database_dsn))
    try:
        with pytest.raises(ProductUnavailable, match="recovering"):
            await actor.counts.remote()
        await asyncio.sleep(0.5)  # ten of the database's lock timeouts
        said = _actor_log(await wal_service_here().pid.remote())
        assert said.count(f"product {product_id}: waiting for the session of its earlier "
                          f"writer to end (backend {older.get_server_pid()} from this host;") == 1
        assert "recovery failed" not in _actor_log(await actor.pid.remote())
        async with older.transaction():  # the older writer's last commit, then its session ends
            await older.execute("INSERT INTO wal (product_id, first_seq, last_seq, record) "
                                "VALUES ($1, 1, 2, $2)", product_id,
                                frame(event_encoder.encode([ProductDefined(terms, 10, now),
                                                            placed])))
            await insert_new_orders(older, product_id, "INR", [placed])
        await older.close()
        assert (await actor.counts.remote()).last_seq == 2
        [reply] = await send(actor, [place()])
        assert isinstance(reply, OrderRecord)
        assert await actor.counts.remote() == ProductCounts(10, 8, 2, 0, 3)
    finally:
        ray.kill(actor, no_restart=True)
        await older.close()


async def test_holds_expire_within_a_second_with_no_request(
    products: ProductFactory, database_dsn: str
) -> None:
    product_id, actor = await products(stock=5, hold_ttl_ms=1_000)
    [order] = await send(actor, [place(quantity=1)])
    assert isinstance(order, OrderRecord)
    conn = await asyncpg.connect(database_dsn)
    try:
        deadline = time.monotonic() + 10
        while True:
            row = await conn.fetchrow(
                "SELECT status, (updated_at_ms - expires_at_ms) / 1000.0 AS late_s "
                "FROM orders WHERE id = $1", order.order_id)
            if row["status"] == "expired" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        # The expiry's commit also recorded the counts front ends show.
        assert await committed_counts(conn, product_id) == await actor.counts.remote()
    finally:
        await conn.close()
    assert row["status"] == "expired"
    assert 0 <= row["late_s"] <= 1.0
    counts = await actor.counts.remote()
    assert (counts.available, counts.reserved) == (5, 0)


async def test_orders_placed_and_settled_in_one_commit_are_stored_as_they_end(
    products: ProductFactory, database_dsn: str
) -> None:
    product_id, actor = await products(stock=3)
    paid, failed, waiting = place(), place(), place()
    replies = await send(actor, [paid, failed, waiting,
                                 CapturePayment(paid.order_id, "pay-1", 1_000, "INR"),
                                 FailPayment(failed.order_id)])
    assert [r.status for r in replies if isinstance(r, OrderRecord)] == [
        OrderStatus.PENDING, OrderStatus.PENDING, OrderStatus.PENDING,
        OrderStatus.CONFIRMED, OrderStatus.FAILED]
    conn = await asyncpg.connect(database_dsn)
    try:
        stored = {row["id"]: tuple(row.values())[1:] for row in await conn.fetch(
            "SELECT id::text, status, payment_id, confirmed_at_ms IS NOT NULL, refund_status, "
            "refund_amount_minor FROM orders WHERE product_id = $1", product_id)}
        assert (await verified(conn, product_id)).problems == []
    finally:
        await conn.close()
    assert stored == {
        paid.order_id: ("confirmed", "pay-1", True, "none", 0),
        failed.order_id: ("failed", None, False, "none", 0),
        waiting.order_id: ("pending", None, False, "none", 0),
    }


async def test_a_later_batch_forgets_a_settled_order_never_the_batch_that_settles_it(
    products: ProductFactory, database_dsn: str
) -> None:
    """Forgetting an order in the batch that settles it would lose the row its commit writes."""
    product_id, actor = await products(stock=2, forget_settled_after_ms=0)
    first, second = place(), place()
    await send(actor, [first, second])
    for order in (first, second):  # the second batch forgets the first, then fails the second
        [failed] = await send(actor, [FailPayment(order.order_id)])
        assert isinstance(failed, OrderRecord) and failed.status is OrderStatus.FAILED
    assert first.order_id not in (await live_state(actor)).orders
    conn = await asyncpg.connect(database_dsn)
    try:
        rows = await conn.fetch("SELECT status FROM orders WHERE product_id = $1", product_id)
        assert [row["status"] for row in rows] == ["failed", "failed"]
        assert (await verified(conn, product_id)).problems == []
    finally:
        await conn.close()


async def test_settled_orders_leave_memory_and_the_read_model_brings_them_back(
    products: ProductFactory, database_dsn: str
) -> None:
    product_id, actor = await products(stock=2, forget_settled_after_ms=0)
    first, second = place(), place()
    [order, kept] = await send(actor, [first, second])
    assert isinstance(order, OrderRecord) and isinstance(kept, OrderRecord)
    await send(actor, [FailPayment(order.order_id)])
    state = await forgotten(actor, order.order_id)
    assert kept.order_id in state.orders  # a pending order stays
    assert first.user_id not in state.shoppers  # nor its shopper, with no order left

    conn = await asyncpg.connect(database_dsn)
    try:
        report_now = await verified(conn, product_id)
        assert report_now.problems == []
        known = order_record(await order_by_id(conn, order.order_id))
        assert known.status is OrderStatus.FAILED
        # A retry of the same request, screened against the read model: the same order.
        [again] = await send(actor, [msgspec.structs.replace(first, order_id=uuid7(),
                                                             known=known)])
        assert isinstance(again, OrderRecord) and again.order_id == order.order_id
        # A late payment brings the order back and confirms it, durably.
        capture = CapturePayment(order.order_id, "pay-late", known.total_minor, "INR", known)
        [confirmed] = await send(actor, [capture])
        assert isinstance(confirmed, OrderRecord)
        assert confirmed.status is OrderStatus.CONFIRMED
        os.kill(await actor.pid.remote(), signal.SIGKILL)
        [duplicate] = await send_until_decided(actor, [capture])
        assert isinstance(duplicate, OrderRecord) and duplicate.payment_id == "pay-late"
        state = await live_state(actor)
        assert (state.sold, state.reserved, state.available) == (1, 1, 0)
        from_scratch = await rebuild(conn, product_id, use_snapshot=False)
        assert from_scratch.state == state
        assert (await verified(conn, product_id)).problems == []
    finally:
        await conn.close()


async def test_a_batch_whose_screen_hangs_is_answered_503_and_the_next_goes_through(
    products: ProductFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's time limit covers the claims' query too: one call is in flight per product,
    so a hung query must not hold every later command of the product. Those waiting behind the
    call are answered with it, not sent to wait as long again."""
    monkeypatch.setattr(batching, "CALL_TIMEOUT_S", 0.5)
    product_id, actor = await products(stock=10, limit=10)
    screened = 0

    async def screen(_: str, commands: list[Command]) -> list[Command | Rejection]:
        nonlocal screened
        screened += 1
        if screened == 1:
            await asyncio.Event().wait()  # a query that never returns
        return list(commands)

    batcher = batching.ProductBatcher(product_id, actor, screen, lambda *_: None)
    async with asyncio.timeout(10):
        in_flight = asyncio.ensure_future(batcher.submit(place()))
        await asyncio.sleep(0.05)  # its call has left
        waiting = asyncio.ensure_future(batcher.submit(place()))
        for answer in (in_flight, waiting):
            with pytest.raises(ProductUnavailable):
                await answer
        assert screened == 1
        assert isinstance(await batcher.submit(place()), OrderRecord)


async def test_commands_beyond_the_queue_bound_are_refused_at_once(
    products: ProductFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a product's call hangs, its commands wait up to a bound; the next is a fast 503."""
    monkeypatch.setattr(batching, "QUEUE_DEPTH_MAX", 3)
    monkeypatch.setattr(batching, "CALL_TIMEOUT_S", 1.0)
    product_id, actor = await products(stock=10, limit=10)

    async def hung_screen(_: str, commands: list[Command]) -> list[Command | Rejection]:
        await asyncio.Event().wait()
        return list(commands)

    batcher = batching.ProductBatcher(product_id, actor, hung_screen, lambda *_: None)
    in_flight = asyncio.ensure_future(batcher.submit(place()))
    await asyncio.sleep(0.05)  # its call has left
    waiting = [asyncio.ensure_future(batcher.submit(place())) for _ in range(3)]
    await asyncio.sleep(0.05)  # they wait behind it
    with pytest.raises(ProductUnavailable, match="too many requests are waiting"):
        await batcher.submit(place())
    async with asyncio.timeout(10):
        for answer in (in_flight, *waiting):
            with pytest.raises(ProductUnavailable, match="did not answer"):
                await answer


async def _exited(pid: int, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_an_ended_idle_sale_retires_its_actor_and_a_late_command_brings_it_back(
    ray_session: None, database_dsn: str
) -> None:
    """An ended sale keeps no process while no hold is live; a late cancellation (or payment,
    or refund) starts a new actor, which recovers the product from its log."""
    config = ActorConfig(database_dsn, Policy(hold_ttl_ms=4_000), retire_after_idle_s=0.5)
    router = batching.ProductRouter(config)
    product_id = str(uuid.uuid4())
    stored = await asyncpg.connect(database_dsn)
    try:
        pid = await router.actor(product_id).pid.remote()  # its start is not on the clock
        started = now_ms()
        terms = ProductTerms(product_id, 1_000, "INR", started - 1_000, started + 3_000, 2)
        assert await router.define(product_id, DefineProduct(terms, 10)) is None
        paid, failed, lapsing = [await router.submit(product_id, place()) for _ in range(3)]
        assert all(isinstance(o, OrderRecord) for o in (paid, failed, lapsing))
        await router.submit(product_id, CapturePayment(paid.order_id, "pay-1", 1_000, "INR"))
        await router.submit(product_id, FailPayment(failed.order_id))

        assert await _exited(pid), "the actor of an ended, idle sale did not retire"
        exit_log = _actor_log(pid)  # it stopped its tasks and its I/O thread first
        assert "Task was destroyed" not in exit_log and "Segmentation fault" not in exit_log
        assert now_ms() >= lapsing.expires_at_ms, "it retired while a hold was live"
        before = await committed_counts(stored, product_id)
        assert (before.reserved, before.sold) == (0, 1)  # the hold lapsed first

        cancel = CancelOrder(paid.order_id, paid.user_id)
        with pytest.raises(ProductUnavailable):  # this front end learns it retired
            await router.submit(product_id, cancel)
        cancelled = await router.submit(product_id, cancel)
        assert isinstance(cancelled, OrderRecord) and cancelled.status is OrderStatus.CANCELLED
        after = await router.counts(product_id)
        assert after == ProductCounts(10, 10, 0, 0, before.last_seq + 1)
        assert await router.actor(product_id).pid.remote() != pid
        assert (await verified(stored, product_id)).problems == []
    finally:
        await stored.close()
        ray.kill(router.actor(product_id), no_restart=True)


async def test_the_actor_collects_cyclic_garbage_on_its_timer_not_as_it_allocates(
    ray_session: None, database_dsn: str
) -> None:
    def tie_a_knot(actor: object) -> tuple[bool, bool]:
        """In the actor's process: leaves a reference cycle behind, watched by a weak
        reference, which only the cyclic collector can free. (Nested, so Ray ships it whole.)"""
        class Knot:
            pass
        knot = Knot()
        knot.itself = knot  # type: ignore[attr-defined]
        actor.knot = weakref.ref(knot)  # type: ignore[attr-defined]
        return gc.isenabled(), gc.get_freeze_count() > 0  # what it made to start is set aside

    def knot_freed(actor: object) -> bool:
        return actor.knot() is None  # type: ignore[attr-defined]

    actor = product_actor(str(uuid.uuid4()), ActorConfig(database_dsn, collect_garbage_every_s=0.5))
    try:
        assert await actor.__ray_call__.remote(tie_a_knot) == (False, True)
        deadline = time.monotonic() + 5.0
        while not await actor.__ray_call__.remote(knot_freed):
            assert time.monotonic() < deadline, "a cycle outlived the collection timer"
            await asyncio.sleep(0.1)
    finally:
        ray.kill(actor, no_restart=True)


def _large_buffer_probe() -> Callable[[object], int]:
    """What an actor's process runs to say how many mappings of its own glibc gives a 4 MB
    buffer (made here, so that Ray sends the function itself, not its module's name)."""
    def mappings_for_a_large_buffer(actor: object) -> int:
        class MallocInfo(ctypes.Structure):
            _fields_ = [(field, ctypes.c_size_t) for field in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallocInfo
        libc.malloc.restype = ctypes.c_void_p
        before = libc.mallinfo2().hblks
        buffer = libc.malloc(4 * 2**20)
        mapped = libc.mallinfo2().hblks - before
        libc.free(ctypes.c_void_p(buffer))
        return mapped
    return mappings_for_a_large_buffer


async def test_the_actor_serves_its_batches_large_buffers_from_its_heap(
    ray_session: None, database_dsn: str
) -> None:
    actor = product_actor(str(uuid.uuid4()), ActorConfig(database_dsn))
    try:
        assert await actor.__ray_call__.remote(_large_buffer_probe()) == 0
    finally:
        ray.kill(actor, no_restart=True)


async def test_the_wal_service_serves_its_flushes_large_buffers_from_its_heap(
    ray_session: None
) -> None:
    assert await wal_service_here().__ray_call__.remote(_large_buffer_probe()) == 0


async def test_the_actor_hands_its_heaps_free_pages_back_on_its_timer(
    ray_session: None, database_dsn: str
) -> None:
    block_size, blocks = 8 * 2**20, 6

    def free_blocks_between_kept_ones(actor: object) -> int:
        """In the actor's process: frees heap blocks it wrote to, each below a block it keeps,
        so that only a trim of the heap gives their pages back. Returns the process's RSS."""
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        freed, kept = [], []
        for _ in range(blocks):
            freed.append(libc.malloc(block_size))
            ctypes.memset(freed[-1], 1, block_size)
            kept.append(libc.malloc(block_size // 2))
        for block in freed:
            libc.free(ctypes.c_void_p(block))
        actor.kept = kept  # type: ignore[attr-defined]
        return rss(actor)

    def rss(actor: object) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    actor = product_actor(str(uuid.uuid4()), ActorConfig(database_dsn, collect_garbage_every_s=0.5))
    try:
        written = await actor.__ray_call__.remote(free_blocks_between_kept_ones)
        deadline = time.monotonic() + 5.0
        while written - await actor.__ray_call__.remote(rss) < blocks * block_size // 2:
            assert time.monotonic() < deadline, "the freed blocks' pages stayed in the process"
            await asyncio.sleep(0.1)
    finally:
        ray.kill(actor, no_restart=True)
