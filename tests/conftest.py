"""Shared fixtures: one embedded PostgreSQL per session, a clean database per test."""

import itertools
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from flashsale.persistence.embedded import EmbeddedPostgres
from flashsale.persistence.migrate import migrate

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
async def database_dsn(embedded_pg: EmbeddedPostgres, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = f"test_{next(_database_numbers)}"
    admin = await asyncpg.connect(embedded_pg.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield embedded_pg.dsn(name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()
