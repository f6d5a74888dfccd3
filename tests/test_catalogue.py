"""The front end's catalogue: counts read from what the sales' commits record (no Ray call for a
sale that has them), across a PostgreSQL restart and a failed refresh, and sales whose times
were set by hand."""

import asyncio
import datetime as dt
import logging
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
import ray
from conftest import ApiFactory

from flashsale.actors.batching import ProductRouter
from flashsale.actors.messages import OrderRecord, PlaceOrder, ProductCounts
from flashsale.actors.product_actor import ActorConfig
from flashsale.http import catalogue as catalogue_module
from flashsale.http.catalogue import Catalogue
from flashsale.ids import uuid7
from flashsale.persistence.database import create_pool
from flashsale.persistence.embedded import EmbeddedPostgres
from flashsale.persistence.migrate import migrate
from flashsale.persistence.products import counts_written_since, insert_product
from flashsale.persistence.wal import keep_counts


async def test_counts_come_back_after_a_postgres_restart_and_the_outage_is_logged_once(
    ray_session: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedPostgres(tmp_path).start()
    db = None
    router = ProductRouter(ActorConfig(server.dsn()))
    try:
        conn = await asyncpg.connect(server.dsn())
        await migrate(conn)
        await conn.close()
        db = await create_pool(server.dsn(), init_size=1, max_size=2)
        now = dt.datetime.now(dt.UTC)
        row = await insert_product(db, "sale", 100, "INR", 10, now, now + dt.timedelta(hours=1), 5)
        catalogue = Catalogue(db, router)
        await catalogue.define(row)
        await catalogue.start()
        asked = 0
        ask_actor = router.counts

        async def counting(product_id: str) -> ProductCounts:
            nonlocal asked
            asked += 1
            return await ask_actor(product_id)

        router.counts = counting  # type: ignore[method-assign]

        caplog.set_level(logging.WARNING, logger="flashsale.http.catalogue")
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(2)  # four refreshes fail
        await asyncio.to_thread(server.restart)

        # Another front end's order: this catalogue hears of it only through the database.
        elsewhere = ProductRouter(ActorConfig(server.dsn()))
        deadline = time.monotonic() + 30
        while not isinstance(await _place(elsewhere, row.id), OrderRecord):
            assert time.monotonic() < deadline, "the sale did not serve again"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.1)
        view = catalogue.view(row)
        assert (view.available, view.reserved) == (9, 1)
        assert asked == 0  # a defined sale's counts cost no Ray call
        await catalogue.stop()
        logged = [r.getMessage().split(",")[0] for r in caplog.records
                  if r.name == "flashsale.http.catalogue"]
        assert logged == ["catalogue refresh failed", "catalogue refresh works again"]
    finally:
        ray.kill(router.actor(row.id), no_restart=True)
        if db is not None:
            await db.close()
        server.close()


async def _place(router: ProductRouter, product_id: str) -> object:
    try:
        return await router.submit(product_id, PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1))
    except Exception as error:  # noqa: BLE001 - a 503 while the sale recovers
        return error


async def test_a_refresh_that_fails_for_an_unknown_reason_does_not_end_the_refreshes(
    ray_session: None, database_dsn: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = await create_pool(database_dsn, init_size=1, max_size=2)
    router = ProductRouter(ActorConfig(database_dsn))
    now = dt.datetime.now(dt.UTC)
    row = await insert_product(db, "sale", 100, "INR", 10, now, now + dt.timedelta(hours=1), 5)
    try:
        catalogue = Catalogue(db, router)
        await catalogue.define(row)
        await catalogue.start()
        failures = 0

        async def failing_once(pool: asyncpg.Pool,
                               horizon: int) -> tuple[dict[str, ProductCounts], int]:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise RuntimeError("a bug in one refresh")
            return await counts_written_since(pool, horizon)

        monkeypatch.setattr(catalogue_module, "counts_written_since", failing_once)
        caplog.set_level(logging.WARNING, logger="flashsale.http.catalogue")
        await asyncio.sleep(0.7)  # the refresh fails once
        assert failures == 1
        elsewhere = ProductRouter(ActorConfig(database_dsn))  # another front end's order
        assert isinstance(await _place(elsewhere, row.id), OrderRecord)
        await asyncio.sleep(1.1)
        assert catalogue.view(row).reserved == 1
        await catalogue.stop()
        failed = [r for r in caplog.records if r.name == "flashsale.http.catalogue"]
        assert [r.getMessage() for r in failed] == [
            "catalogue refresh failed, counts shown may be stale: a bug in one refresh",
            "catalogue refresh works again"]
        assert failed[0].exc_info is not None  # a bug, not an outage: its traceback is logged
    finally:
        ray.kill(router.actor(row.id), no_restart=True)
        await db.close()


async def test_a_read_from_its_horizon_finds_every_write_since_commits_in_flight_too(
    database_dsn: str,
) -> None:
    """Front ends read only the counts written since their last read. A commit still in flight
    as they read (`slow`'s, begun before `brisk`'s, which has committed) is found the next time,
    and counts that did not change (`quiet`'s) are not read again."""
    db = await create_pool(database_dsn, init_size=1, max_size=2)
    first, second = await asyncpg.connect(database_dsn), await asyncpg.connect(database_dsn)
    quiet, slow, brisk = (str(uuid.uuid4()) for _ in range(3))
    new = ProductCounts(10, 9, 1, 0, 2)
    try:
        for product_id in (quiet, slow, brisk):
            await keep_counts(first, product_id, ProductCounts(10, 10, 0, 0, 1))
        everything, horizon = await counts_written_since(db, 0)
        assert everything.keys() == {quiet, slow, brisk}
        async with first.transaction():
            await keep_counts(first, slow, new)
            await keep_counts(second, brisk, new)
            during, horizon = await counts_written_since(db, horizon)
        after, horizon = await counts_written_since(db, horizon)
        again, _ = await counts_written_since(db, horizon)
        assert during == {brisk: new}
        assert after[slow] == new and quiet not in after  # `brisk` may be read twice
        assert again == {}
        # A horizon ahead of the database's (one restored from a backup) reads it all again.
        restored, _ = await catalogue_module._read_from(counts_written_since, db, 2**62)
        assert restored.keys() == {quiet, slow, brisk}
    finally:
        await first.close()
        await second.close()
        await db.close()


async def test_a_sale_whose_times_were_set_to_infinity_by_hand_is_served(
    database_dsn: str, make_api: ApiFactory
) -> None:
    conn = await asyncpg.connect(database_dsn)
    product_id = await conn.fetchval(
        """INSERT INTO products (id, name, price_minor, currency, initial_stock, sale_starts_at,
                                 sale_ends_at, per_user_limit)
           VALUES (gen_random_uuid(), 'open-ended', 100, 'INR', 5, '-infinity', 'infinity', 1)
           RETURNING id::text""")
    await conn.close()
    api = await make_api()  # its catalogue defines the sale's actor as it starts
    status, product, _ = await api.call("GET", f"/products/{product_id}")
    assert status == 200, product
    assert (product["status"], product["available"]) == ("active", 5)
    assert (product["sale_starts_at"], product["sale_ends_at"]) == (
        "0001-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z")
    _, token = await api.register()
    status, order = await api.order(token, product_id)
    assert (status, order["status"]) == (201, "pending")
