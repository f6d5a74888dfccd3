"""Shared fixtures: one embedded PostgreSQL per session, a clean database per test."""

import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import ray
from aiohttp.test_utils import TestServer
from helpers import (
    CANCEL_WINDOW_MS,
    HOLD_TTL_MS,
    JWT_SECRET,
    SANDBOX_SECRET,
    Api,
    ProductFactory,
    free_port,
)
from ray.actor import ActorHandle

from flashsale.actors.messages import DefineProduct, ProductTerms
from flashsale.actors.product import Policy
from flashsale.actors.product_actor import ActorConfig, send
from flashsale.actors.registry import configure_ray, product_actor
from flashsale.config import Limit, Network
from flashsale.http.app import create_app
from flashsale.http.engine import Engine, start_engine
from flashsale.payments.provider import PaymentProvider
from flashsale.payments.sandbox import SandboxGateway
from flashsale.persistence.embedded import EmbeddedPostgres
from flashsale.persistence.migrate import migrate
from flashsale.persistence.products import products_written_since
from flashsale.persistence.replay import logged_products, reports

TEMPLATE = "flashsale_template"
_database_numbers = itertools.count()


@pytest.fixture(scope="session")
def embedded_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("server")).start()
    yield server
    server.close()


@pytest.fixture(scope="session")
async def template_database(embedded_pg: EmbeddedPostgres) -> str:
    """A migrated database that every test database is copied from (cheap: a file copy)."""
    admin = await asyncpg.connect(embedded_pg.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(embedded_pg.dsn(TEMPLATE))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return TEMPLATE


@pytest.fixture
async def database_dsn(request: pytest.FixtureRequest, embedded_pg: EmbeddedPostgres,
                       template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test. Afterwards every product in it must pass
    `flashsale replay --verify`'s checks, unless the test damages the WAL on purpose."""
    name = f"test_{next(_database_numbers)}"
    admin = await asyncpg.connect(embedded_pg.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        try:
            yield embedded_pg.dsn(name)
            if request.node.get_closest_marker("damages_wal") is None:
                assert await replay_problems(embedded_pg.dsn(name)) == []
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def replay_problems(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [problem async for report in reports(conn, await logged_products(conn),
                                                    verify=True)
                for problem in report.problems]
    finally:
        await conn.close()


@pytest.fixture
async def own_database(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A migrated server of the test's own, to stop and restart under a running engine."""
    server = EmbeddedPostgres(tmp_path).start()
    conn = await asyncpg.connect(server.dsn())
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield server
    server.close()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance for the whole session (it takes seconds to start)."""
    os.environ.pop("RAY_ADDRESS", None)
    configure_ray()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
async def products(ray_session: None, database_dsn: str) -> AsyncIterator[ProductFactory]:
    """Creates product actors on the test's database; kills them when the test ends."""
    handles: list[ActorHandle] = []

    async def create(stock: int = 100, limit: int = 1, hold_ttl_ms: int = 600_000,
                     forget_settled_after_ms: int = 600_000, snapshot_every_events: int = 100_000,
                     dsn: str | None = None) -> tuple[str, ActorHandle]:
        product_id = str(uuid.uuid4())
        policy = Policy(hold_ttl_ms=hold_ttl_ms, forget_settled_after_ms=forget_settled_after_ms)
        config = ActorConfig(dsn or database_dsn, policy,
                             snapshot_every_events=snapshot_every_events)
        actor = product_actor(product_id, config)
        handles.append(actor)
        now_ms = time.time_ns() // 1_000_000
        terms = ProductTerms(product_id, 1_000, "INR", now_ms - 1_000, now_ms + 3_600_000, limit)
        assert await send(actor, [DefineProduct(terms, stock)]) == [None]
        return product_id, actor

    yield create
    for actor in handles:
        ray.kill(actor, no_restart=True)


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(ray_session: None, database_dsn: str) -> AsyncIterator[ApiFactory]:
    """Starts real engines (aiohttp on a loopback port, Ray actors, PostgreSQL) with a client;
    `payments` builds the provider from the engine's base URL (default: the sandbox)."""
    running: list[tuple[TestServer, aiohttp.ClientSession, Engine]] = []

    async def make(payments: Callable[[str], PaymentProvider] | None = None,
                   hold_ttl_ms: int = HOLD_TTL_MS, forget_settled_after_ms: int = 600_000,
                   rate_limits: dict[str, Limit] | None = None, shared: bool = False,
                   dsn: str = database_dsn, trusted_proxies: tuple[Network, ...] = ()) -> Api:
        config = ActorConfig(dsn, Policy(hold_ttl_ms=hold_ttl_ms,
                                                  cancel_window_ms=CANCEL_WINDOW_MS,
                                                  forget_settled_after_ms=forget_settled_after_ms))
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        gateway = (payments(base_url) if payments else
                   SandboxGateway(SANDBOX_SECRET, f"{base_url}/webhooks/sandbox"))
        engine = await start_engine(dsn, config, JWT_SECRET, bcrypt_rounds=4,
                                    base_url=base_url, payments=gateway,
                                    rate_limits=rate_limits, shared_limits=shared,
                                    deactivated_refresh_s=0.2)
        server = TestServer(create_app(engine, trusted_proxies), host="127.0.0.1", port=port)
        await server.start_server()
        session = aiohttp.ClientSession(base_url=base_url)
        running.append((server, session, engine))
        return Api(session, engine)

    yield make
    for server, session, engine in running:
        await session.close()
        await server.close()
        for product_id in [row.id for row in (await products_written_since(engine.db, 0))[0]]:
            ray.kill(engine.router.actor(product_id), no_restart=True)
        await engine.stop()


@pytest.fixture
async def api(make_api: ApiFactory) -> Api:
    return await make_api()
