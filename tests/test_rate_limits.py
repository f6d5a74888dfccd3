"""Rate limits (SPEC §8): configuration, windows, and 429s over real HTTP."""

from typing import Any

import pytest

from flashsale.config import DEFAULT_LIMITS, ConfigError, Limit, parse_limits
from flashsale.http.problems import ApiError
from flashsale.http.ratelimit import RateLimiter


def test_limits_default_turn_off_and_override() -> None:
    assert parse_limits(None) == DEFAULT_LIMITS
    assert DEFAULT_LIMITS["ip"] == Limit(100, 60) and DEFAULT_LIMITS["order"] == Limit(10, 60)
    assert parse_limits("off") is None
    assert parse_limits("order=3/10, login=1/60") == {
        **DEFAULT_LIMITS, "order": Limit(3, 10), "login": Limit(1, 60)}
    for bad in ("order=3", "orders=3/10", "order=3/0", "ip=lots/60"):
        with pytest.raises(ConfigError, match="FLASHSALE_RATE_LIMITS"):
            parse_limits(bad)


def test_a_window_refuses_past_its_count_then_resets() -> None:
    now = [1000.0]
    limiter = RateLimiter({"order": Limit(2, 60)}, clock=lambda: now[0])
    limiter.check("order", "alice")
    limiter.check("order", "alice")
    with pytest.raises(ApiError) as refused:
        limiter.check("order", "alice")
    assert refused.value.code == "rate_limited"
    assert refused.value.headers["Retry-After"] == "20"  # the window ends at 1020
    limiter.check("order", "bob")  # counted per key
    now[0] = 1020.0
    limiter.check("order", "alice")


async def test_over_http_the_limits_answer_429_with_retry_after(make_api: Any) -> None:
    api = await make_api(rate_limits={**DEFAULT_LIMITS, "register": Limit(2, 60),
                                      "order": Limit(2, 60)})
    product_id = await api.sale(stock=10, limit=5)
    _, alice = await api.register()
    _, bob = await api.register()
    body = {"email": "third@example.com", "password": "sale-day-1", "full_name": "Third"}
    status, problem, headers = await api.call("POST", "/auth/register", body=body)
    assert (status, problem["code"]) == (429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1

    assert [(await api.order(alice, product_id))[0] for _ in range(3)] == [201, 201, 429]
    assert (await api.order(bob, product_id))[0] == 201  # another user's own limit


async def test_every_route_counts_against_the_address(make_api: Any) -> None:
    api = await make_api(rate_limits={**DEFAULT_LIMITS, "ip": Limit(3, 60)})
    statuses = [(await api.call("GET", "/webhooks/health"))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
