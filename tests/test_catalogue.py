"""The front end's catalogue: counts read from what the sales' commits record (no Ray call for a
sale that has them), across a PostgreSQL restart."""

import asyncio
import datetime as dt
import logging
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
import ray

from flashsale.actors.batching import ProductRouter
from flashsale.actors.messages import OrderRecord, PlaceOrder, ProductCounts
from flashsale.actors.product_actor import ActorConfig
from flashsale.http.catalogue import Catalogue
from flashsale.ids import uuid7
from flashsale.persistence.database import create_pool
from flashsale.persistence.embedded import EmbeddedPostgres
from flashsale.persistence.migrate import migrate
from flashsale.persistence.products import insert_product


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
        db = await create_pool(server.dsn(), min_size=1, max_size=2)
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
