"""While PostgreSQL is down or drops connections: the API answers 503 with Retry-After, never
500, and serves again once the database is back; background work logs the outage once."""

import asyncio
import logging
import time
from collections import Counter

import asyncpg
import psutil
import pytest
from conftest import ApiFactory
from helpers import drop_sessions, set_database_default

from flashsale.config import DEFAULT_LIMITS
from flashsale.http.auth import DeactivatedUsers
from flashsale.payments.sandbox import SandboxGateway
from flashsale.payments.worker import PaymentWorker
from flashsale.persistence.database import LOCK_WAIT_MAX_S, QUERY_WAIT_MAX_S, create_pool
from flashsale.persistence.embedded import EmbeddedPostgres


@pytest.mark.parametrize("shared_limits", [False, True], ids=["no limits", "shared limits"])
async def test_every_route_answers_503_while_the_database_is_down(
    own_database: EmbeddedPostgres, make_api: ApiFactory, shared_limits: bool
) -> None:
    # Shared rate limits are counted in the database before any route runs.
    limits = dict(DEFAULT_LIMITS) if shared_limits else None
    api = await make_api(dsn=own_database.dsn(), rate_limits=limits, shared=shared_limits)
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


async def test_connections_dropped_under_load_are_answered_503_never_500(
    make_api: ApiFactory, database_dsn: str
) -> None:
    """A pooled connection whose session the server ended while it was idle can fail its next
    query in a way of asyncpg's own (see DATABASE_DOWN)."""
    api = await make_api()
    product_id = await api.sale(stock=10_000, limit=10)
    tokens = [(await api.register())[1] for _ in range(8)]
    answers: Counter[tuple[str, int]] = Counter()
    shopping = True

    async def shop(token: str) -> None:
        for n in range(1_000_000):
            if not shopping:
                return
            for method, path, body in (("GET", "/orders", None), ("GET", "/auth/me", None),
                                       ("POST", "/orders", {"product_id": product_id,
                                                            "quantity": 1})):
                headers = {"X-Idempotency-Key": f"attempt-{n}"}
                status, _, _ = await api.call(method, path, token, body, headers)
                answers[method + " " + path, status] += 1

    shoppers = [asyncio.create_task(shop(token)) for token in tokens]
    try:
        for _ in range(6):
            await asyncio.sleep(0.3)
            assert await drop_sessions(database_dsn)
    finally:
        await asyncio.sleep(0.5)
        shopping = False
        await asyncio.gather(*shoppers)
    assert {status for _, status in answers} <= {200, 201, 409, 503}, answers
    assert answers["GET /orders", 200] and answers["POST /orders", 201], answers


@pytest.mark.parametrize("lock_timeout", ["20ms", None], ids=["the database's", "the engine's"])
async def test_a_lock_held_long_is_answered_503_never_500_and_never_a_hang(
    make_api: ApiFactory, database_dsn: str, lock_timeout: str | None
) -> None:
    """A request that meets a lock held long, by an operator's migration or a long report, is
    told to retry: after the database's lock_timeout, or where it sets none, after the
    engine's (LOCK_WAIT_MAX_S)."""
    if lock_timeout:
        await set_database_default(database_dsn, "lock_timeout", lock_timeout)
    api = await make_api()
    product_id = await api.sale(stock=5)
    email, token = await api.register()
    holder = await asyncpg.connect(database_dsn)
    try:
        for table, method, path, body in [
            ("users", "GET", "/auth/me", None),
            ("key_claims", "POST", "/orders", {"product_id": product_id, "quantity": 1}),
        ]:
            async with holder.transaction():
                await holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                async with asyncio.timeout(LOCK_WAIT_MAX_S + 10):
                    status, answer, headers = await api.call(method, path, token, body,
                                                             {"X-Idempotency-Key": "locked-out"})
            assert (status, answer["code"], headers["Retry-After"]) == (503, "unavailable", "1")
    finally:
        await holder.close()
    status, me, _ = await api.call("GET", "/auth/me", token)
    assert (status, me["email"]) == (200, email)


async def test_a_frozen_database_is_answered_503_never_a_hang(
    own_database: EmbeddedPostgres, make_api: ApiFactory
) -> None:
    """A database that stops answering (its disk stalls, say) is not waited for: reads as well
    as orders are told to retry. Every process of the server is stopped, then resumed."""
    api = await make_api(dsn=own_database.dsn())
    product_id = await api.sale(stock=5)
    email, token = await api.register()
    postmaster = psutil.Process(own_database.pid)
    frozen = [postmaster, *postmaster.children()]
    for process in frozen:
        process.suspend()
    try:
        for method, path, body in [
            ("GET", "/orders", None),
            ("POST", "/orders", {"product_id": product_id, "quantity": 1}),
        ]:
            async with asyncio.timeout(3 * QUERY_WAIT_MAX_S + 10):
                status, answer, headers = await api.call(method, path, token, body,
                                                         {"X-Idempotency-Key": "frozen"})
            assert (status, answer["code"], headers["Retry-After"]) == (503, "unavailable", "1")
    finally:
        for process in frozen:
            process.resume()
    status, me, _ = await api.call("GET", "/auth/me", token)
    assert (status, me["email"]) == (200, email)


@pytest.mark.parametrize("task", ["payment worker", "deactivated users refresh"])
async def test_background_work_logs_an_outage_once_and_its_end_and_the_pool_is_quiet(
    own_database: EmbeddedPostgres, caplog: pytest.LogCaptureFixture, task: str
) -> None:
    db = await create_pool(own_database.dsn(), init_size=1, max_size=2)
    worker: PaymentWorker | DeactivatedUsers
    if task == "payment worker":
        worker = PaymentWorker(db, SandboxGateway("secret", "http://127.0.0.1:9/webhooks/sandbox"),
                               poll_interval_s=0.05)
        worker.start()
    else:
        worker = DeactivatedUsers(db, refresh_s=0.05)
        await worker.start()
    logger = type(worker).__module__
    caplog.set_level(logging.WARNING)

    def logged() -> list[str]:
        return [r.getMessage().split(",")[0] for r in caplog.records if r.name == logger]

    async def until_logged(count: int) -> None:
        deadline = time.monotonic() + 15
        while len(logged()) < count:
            assert time.monotonic() < deadline, logged()
            await asyncio.sleep(0.05)

    await asyncio.to_thread(own_database.stop)
    try:
        await until_logged(1)
        await asyncio.sleep(0.5)  # ten more rounds fail
        await asyncio.to_thread(own_database.restart)
        await until_logged(2)
    finally:
        await worker.stop()
        await db.close()
    assert logged() == [f"{task} failed", f"{task} works again"]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("asyncpg")] == []
