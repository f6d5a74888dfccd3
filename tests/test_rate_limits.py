"""Rate limits (SPEC §8): configuration, windows, and 429s over real HTTP."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flashsale.config import (
    DEFAULT_LIMITS,
    ConfigError,
    Limit,
    parse_limits,
    parse_trusted_proxies,
)
from flashsale.http.problems import ApiError
from flashsale.http.ratelimit import Counts, LocalCounts, RateLimiter, SharedCounts
from flashsale.persistence.database import create_pool


def test_limits_default_turn_off_and_override() -> None:
    assert parse_limits(None) == DEFAULT_LIMITS
    assert DEFAULT_LIMITS["ip"] == Limit(100, 60) and DEFAULT_LIMITS["order"] == Limit(10, 60)
    assert parse_limits("off") is None
    assert parse_limits("order=3/10, login=1/60") == {
        **DEFAULT_LIMITS, "order": Limit(3, 10), "login": Limit(1, 60)}
    for bad in ("order=3", "orders=3/10", "order=3/0", "ip=lots/60"):
        with pytest.raises(ConfigError, match="FLASHSALE_RATE_LIMITS"):
            parse_limits(bad)


@pytest.fixture(params=["local", "shared"])
async def counts(request: pytest.FixtureRequest, database_dsn: str) -> AsyncIterator[Counts]:
    """Each way a front end keeps its counters: in memory, or in PostgreSQL."""
    if request.param == "local":
        yield LocalCounts()
        return
    db = await create_pool(database_dsn, init_size=1, max_size=2)
    yield SharedCounts(db)
    await db.close()


async def test_a_window_refuses_past_its_count_then_resets(counts: Counts) -> None:
    now = [1000.0]
    limiter = RateLimiter({"order": Limit(2, 60), "ip": Limit(2, 60)}, counts,
                          clock=lambda: now[0])
    await limiter.check(("order", "alice"))
    await limiter.check(("order", "alice"), ("ip", "10.0.0.1"))
    with pytest.raises(ApiError) as refused:
        await limiter.check(("order", "alice"), ("ip", "10.0.0.1"))
    assert refused.value.code == "rate_limited"
    assert refused.value.headers["Retry-After"] == "20"  # the window ends at 1020
    await limiter.check(("order", "bob"))  # counted per key
    with pytest.raises(ApiError, match=r"\(ip\)"):  # each request counted against both
        await limiter.check(("ip", "10.0.0.1"), ("order", "carol"))
    now[0] = 1020.0
    await limiter.check(("order", "alice"))
    now[0] = 1019.0  # a front end whose clock lags counts in the newer window, not a fresh one
    await limiter.check(("order", "alice"))
    with pytest.raises(ApiError):
        await limiter.check(("order", "alice"))


async def test_a_sweep_drops_only_the_counts_of_ended_windows(counts: Counts) -> None:
    await counts.count([("order", "alice", 16), ("ip", "10.0.0.1", 17)])
    await counts.sweep({"order": 17, "ip": 17})
    # alice's window 16 is gone, so a late request in it starts over; the address's is kept
    assert await counts.count([("order", "alice", 16), ("ip", "10.0.0.1", 17)]) == [1, 2]


async def test_the_limiters_sweep_drops_the_windows_its_clock_has_left(counts: Counts) -> None:
    now = [1000.0]
    limiter = RateLimiter({"order": Limit(5, 60), "ip": Limit(5, 600)}, counts,
                          clock=lambda: now[0])
    await limiter.check(("order", "alice"), ("ip", "10.0.0.1"))
    now[0] = 1080.0  # the order window (16) has ended; the address's (1) has not
    await limiter.sweep()
    assert await counts.count([("order", "alice", 16), ("ip", "10.0.0.1", 1)]) == [1, 2]


async def test_concurrent_requests_each_get_a_count_of_their_own(counts: Counts) -> None:
    limiter = RateLimiter({"ip": Limit(30, 60), "order": Limit(2, 60)}, counts,
                          clock=lambda: 1000.0)

    async def allowed(user: str) -> bool:
        try:
            await limiter.check(("ip", "10.0.0.1"), ("order", user))
        except ApiError:
            return False
        return True

    users = [f"user{n % 20}" for n in range(50)]  # 20 users, the first ten thrice
    outcomes = await asyncio.gather(*(allowed(user) for user in users))
    # 30 requests pass the address's limit, in the order they came, each user at most twice
    assert sum(outcomes) == 30
    assert outcomes == [True] * 30 + [False] * 20


async def test_shared_counts_cost_a_statement_per_round_trip_not_per_request(
    database_dsn: str,
) -> None:
    pools = [await create_pool(database_dsn, init_size=1, max_size=2) for _ in range(2)]
    statements = 0

    class CountedPool:
        async def fetch(self, *args: Any) -> Any:
            nonlocal statements
            statements += 1
            return await pools[0].fetch(*args)

    try:
        # Two front ends count the same addresses at once, in opposite orders: no deadlock.
        fronts = [SharedCounts(CountedPool()), SharedCounts(pools[1])]
        addresses = [f"10.0.{n // 256}.{n % 256}" for n in range(2_000)]
        for _ in range(3):
            requests = [fronts[0].count([("ip", address, 7)]) for address in addresses]
            requests += [fronts[1].count([("ip", address, 7)]) for address in addresses[::-1]]
            await asyncio.gather(*requests)
        assert await fronts[0].count([("ip", addresses[0], 7)]) == [7]
        assert statements <= 4  # for the first front end's 3 x 2,000 requests and the last
    finally:
        for pool in pools:
            await pool.close()


async def test_requests_past_the_bound_of_those_waiting_for_a_shared_count_are_503(
    database_dsn: str,
) -> None:
    db = await create_pool(database_dsn, init_size=1, max_size=2)
    release = asyncio.Event()

    class SlowPool:  # the database answers once released
        async def fetch(self, *args: Any) -> Any:
            await release.wait()
            return await db.fetch(*args)

    counts = SharedCounts(SlowPool(), waiting_max=3)
    try:
        first = asyncio.ensure_future(counts.count([("ip", "a", 1)]))
        await asyncio.sleep(0.05)  # in flight: the next ones wait for it
        waiting = [asyncio.ensure_future(counts.count([("ip", "a", 1)])) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as refused:
            async with asyncio.timeout(5):  # refused at once, not left to wait
                await counts.count([("ip", "a", 1)])
        assert refused.value.code == "unavailable"
        release.set()
        assert [await first] + [await w for w in waiting] == [[1], [2], [3], [4]]
    finally:
        await db.close()


async def test_over_http_the_limits_answer_429_with_retry_after(make_api: Any) -> None:
    api = await make_api(rate_limits={**DEFAULT_LIMITS, "register": Limit(2, 60),
                                      "order": Limit(2, 60), "refresh": Limit(2, 60)})
    product_id = await api.sale(stock=10, limit=5)
    alices_email, alice = await api.register()
    _, bob = await api.register()
    body = {"email": "third@example.com", "password": "sale-day-1", "full_name": "Third"}
    status, problem, headers = await api.call("POST", "/auth/register", body=body)
    assert (status, problem["code"]) == (429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1

    assert [(await api.order(alice, product_id))[0] for _ in range(3)] == [201, 201, 429]
    assert (await api.order(bob, product_id))[0] == 201  # another user's own limit

    _, login, _ = await api.call("POST", "/auth/login",
                                 body={"email": alices_email, "password": "sale-day-1"})
    refreshed = []
    for _ in range(3):
        status, tokens, _ = await api.call("POST", "/auth/refresh",
                                           body={"refresh_token": login["refresh_token"]})
        refreshed.append(status)
        login = tokens if status == 200 else login
    assert refreshed == [200, 200, 429]


async def test_every_route_counts_against_the_address(make_api: Any) -> None:
    api = await make_api(rate_limits={**DEFAULT_LIMITS, "ip": Limit(3, 60)})
    statuses = [(await api.call("GET", "/webhooks/health"))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_front_ends_sharing_a_database_share_its_limits(make_api: Any) -> None:
    """As `flashsale serve --workers N` runs them: a client's requests land on any front end,
    and the limits hold across them."""
    limits = {**DEFAULT_LIMITS, "register": Limit(3, 60)}
    fronts = [await make_api(rate_limits=limits, shared=True) for _ in range(2)]
    statuses = []
    for n in range(6):
        body = {"email": f"shopper{n}@example.com", "password": "sale-day-1",
                "full_name": "Test Shopper"}
        statuses.append((await fronts[n % 2].call("POST", "/auth/register", body=body))[0])
    assert statuses == [201, 201, 201, 429, 429, 429]


async def test_behind_a_trusted_proxy_each_client_counts_by_its_forwarded_address(
    make_api: Any,
) -> None:
    """Behind a load balancer every request comes from its address: counted by that, a few
    shoppers would spend every shopper's limit. A client's own X-Forwarded-For counts for
    nothing, and what it writes before the proxy's entry is passed over."""
    limits = {**DEFAULT_LIMITS, "ip": Limit(2, 60)}
    direct = await make_api(rate_limits=limits)
    proxied = await make_api(rate_limits=limits,
                             trusted_proxies=parse_trusted_proxies("10.0.0.0/8, 127.0.0.1"))

    async def health(api: Any, forwarded: str) -> int:
        return int((await api.call("GET", "/webhooks/health",
                                   headers={"X-Forwarded-For": forwarded}))[0])

    assert [await health(direct, f"198.51.100.{n}") for n in range(3)] == [200, 200, 429]
    assert [await health(proxied, "198.51.100.7, 10.1.2.3") for _ in range(3)] == [200, 200, 429]
    assert await health(proxied, "198.51.100.8") == 200
    assert await health(proxied, "198.51.100.8, 198.51.100.7") == 429  # .8 is the client's word
    # Clients inside the proxies' own network: every hop is trusted, and the first is the client.
    assert [await health(proxied, f"10.9.9.{n}") for n in range(3)] == [200, 200, 200]
    for bad in ("10.0.0.0/33", "proxy.example.com"):
        with pytest.raises(ConfigError, match="FLASHSALE_TRUSTED_PROXIES"):
            parse_trusted_proxies(bad)
