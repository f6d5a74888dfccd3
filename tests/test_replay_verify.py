"""`flashsale replay --verify` against real logs: it names each product whose log breaks an
invariant or disagrees with its read model or snapshot, and reads the orders table once, however
many products there are."""

import uuid

import asyncpg
import msgspec
import pytest
import ray
from helpers import ProductFactory, replay_cli

from flashsale.actors.messages import OrderPlaced, PlaceOrder, event_encoder
from flashsale.actors.product_actor import now_ms, send
from flashsale.ids import uuid7
from flashsale.persistence.frames import frame, unframe
from flashsale.persistence.replay import decode_state, encode_state, logged_products, reports
from flashsale.persistence.wal import insert_new_orders


def place() -> PlaceOrder:
    return PlaceOrder(uuid7(), str(uuid.uuid4()), str(uuid.uuid4()), 1)


async def products_at_rest(products: ProductFactory, count: int,
                           **options: int) -> list[tuple[str, list[str]]]:
    """Products with a few orders each, and their order ids; their actors are gone, so nothing
    writes their logs or rows any more."""
    made = []
    for _ in range(count):
        product_id, actor = await products(stock=100, limit=5, **options)
        order_ids = []
        for _ in range(3):
            commands = [place() for _ in range(5)]
            await send(actor, commands)
            order_ids += [cmd.order_id for cmd in commands]
        ray.kill(actor, no_restart=True)
        made.append((product_id, order_ids))
    return made


@pytest.mark.damages_wal
async def test_verify_names_each_damaged_product_and_what_is_wrong(
    products: ProductFactory, database_dsn: str
) -> None:
    made = await products_at_rest(products, 6, snapshot_every_events=10)
    intact, changed, lost, extra, resnapped, overheld = (product_id for product_id, _ in made)
    changed_order, lost_order = made[1][1][4], made[2][1][7]
    stray, greedy = uuid7(), str(uuid.uuid4())
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("UPDATE orders SET status = 'confirmed' WHERE id = $1",
                           changed_order)
        await conn.execute("DELETE FROM orders WHERE id = $1", lost_order)
        await conn.execute(
            "INSERT INTO orders SELECT $1, product_id, user_id, 'stray', quantity, "
            "unit_price_minor, currency, 'pending', payment_id, refund_status, "
            "refund_amount_minor, expires_at_ms, confirmed_at_ms, created_at_ms, updated_at_ms "
            "FROM orders WHERE product_id = $2 LIMIT 1", stray, extra)
        seq, record = await conn.fetchrow(
            "SELECT seq, record FROM snapshots WHERE product_id = $1 ORDER BY seq DESC LIMIT 1",
            resnapped)
        state = decode_state(unframe(record))
        state.stock += 1  # a snapshot that decodes well but is not what its events made
        await conn.execute("UPDATE snapshots SET record = $1 WHERE product_id = $2 AND seq = $3",
                           frame(encode_state(state)), resnapped, seq)
        # An order above the per-user limit of 5, logged with its row as a commit writes them.
        over = OrderPlaced(uuid7(), greedy, "greedy", 6, 1_000, now_ms(), now_ms() + 600_000)
        await conn.execute("INSERT INTO wal (product_id, first_seq, last_seq, record) "
                           "VALUES ($1, 17, 17, $2)", overheld, frame(event_encoder.encode([over])))
        await insert_new_orders(conn, overheld, "INR", [over])
    finally:
        await conn.close()

    checked = replay_cli(database_dsn, "--verify", "--json")

    assert checked.returncode == 1, checked.stderr
    problems = {report["product_id"]: report["problems"]
                for report in msgspec.json.decode(checked.stdout)}
    assert problems == {
        intact: [],
        changed: [f"product {changed}: 1 orders differ between the WAL and the orders table, "
                  f"first {changed_order}"],
        lost: [f"product {lost}: 1 orders differ between the WAL and the orders table, "
               f"first {lost_order}"],
        extra: [f"product {extra}: 1 unsettled orders are in the orders table but not in the "
                f"WAL's state, first {stray}"],
        resnapped: [f"product {resnapped}: snapshot at seq {seq} disagrees with a replay of the "
                    "whole WAL"],
        overheld: [f"product {overheld}: user {greedy} holds 6 units, above the limit 5"],
    }


async def test_verify_reads_the_orders_table_once_however_many_products(
    products: ProductFactory, database_dsn: str
) -> None:
    """The table has no index by product: a query per product would read all of it each time."""
    await products_at_rest(products, 3)
    conn = await asyncpg.connect(database_dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            found = [report async for report in reports(conn, await logged_products(conn),
                                                        verify=True)]
            scans = await conn.fetchval("SELECT pg_stat_get_xact_numscans('orders'::regclass)")
    finally:
        await conn.close()
    assert [(report.reserved, report.problems) for report in found] == [(15, [])] * 3
    assert scans == 1
