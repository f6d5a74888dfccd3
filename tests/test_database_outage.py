"""The API while its PostgreSQL is down: a 503 with Retry-After, never a 500, and service again
once the database is back."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from conftest import ApiFactory

from flashsale.persistence.embedded import EmbeddedPostgres
from flashsale.persistence.migrate import migrate


@pytest.fixture
async def own_database(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A server of the test's own, to stop under a running engine."""
    server = EmbeddedPostgres(tmp_path).start()
    conn = await asyncpg.connect(server.dsn())
    await migrate(conn)
    await conn.close()
    yield server
    server.close()


async def test_every_route_answers_503_while_the_database_is_down(
    own_database: EmbeddedPostgres, make_api: ApiFactory
) -> None:
    api = await make_api(dsn=own_database.dsn())
    product_id = await api.sale(stock=5)
    email, token = await api.register()
    calls = [
        ("POST", "/auth/register", None, {"email": "late@example.com",
                                          "password": "sale-day-1", "full_name": "Late"}),
        ("POST", "/auth/login", None, {"email": email, "password": "sale-day-1"}),
        ("GET", "/auth/me", token, None),
        ("PATCH", "/auth/me", token, {"address": "1 Sale St"}),
        ("GET", "/orders", token, None),
        ("POST", "/orders", token, {"product_id": product_id, "quantity": 1}),
        ("GET", "/health", None, None),
    ]
    await asyncio.to_thread(own_database.stop)
    try:
        for method, path, who, body in calls:
            headers = {"X-Idempotency-Key": "during-the-outage"}
            status, answer, reply_headers = await api.call(method, path, who, body, headers)
            assert (status, answer["code"]) == (503, "unavailable"), (method, path, answer)
            assert reply_headers["Retry-After"] == "1"
    finally:
        await asyncio.to_thread(own_database.restart)
    status, me, _ = await api.call("GET", "/auth/me", token)
    assert (status, me["email"]) == (200, email)
