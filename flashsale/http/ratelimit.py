"""Rate limits (SPEC §8): fixed-window counters, kept where every front end can see them.

One front end keeps its counters in its own memory, at no database or Ray round trip, which the
order path cannot afford. Several (`flashsale serve --workers N`) must share them, since a
client's connections land on any of them: they count in PostgreSQL. That is one statement per
request for its address (and login or register), and one more on the routes that count per user
once the token is read (orders, refresh).
"""

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Middleware

from flashsale.config import Limit
from flashsale.http.problems import ApiError
from flashsale.persistence.database import DATABASE_DOWN

SWEEP_INTERVAL_S = 60.0  # how often a front end drops the counts of ended windows

# (kind, key, window number): one request to count against a limit.
Counted = tuple[str, str, int]


class Counts(Protocol):
    async def count(self, requests: list[Counted]) -> list[int]:
        """Count each request in its window; the window's count so far, request by request."""
        ...

    async def sweep(self, windows: dict[str, int]) -> None:
        """Drop the counts of windows before each kind's current one."""
        ...


class LocalCounts:
    """This process's counters."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, str], tuple[int, int]] = {}

    async def count(self, requests: list[Counted]) -> list[int]:
        counts = []
        for kind, key, window in requests:
            seen_window, count = self._windows.get((kind, key), (window, 0))
            count = count + 1 if seen_window >= window else 1
            self._windows[(kind, key)] = (max(seen_window, window), count)
            counts.append(count)
        return counts

    async def sweep(self, windows: dict[str, int]) -> None:
        self._windows = {slot: (window, count) for slot, (window, count) in self._windows.items()
                         if window >= windows[slot[0]]}


_COUNT = """
INSERT INTO rate_counts AS c (kind, key, window_no, count)
SELECT kind, key, window_no, 1 FROM unnest($1::text[], $2::text[], $3::int8[])
    AS r(kind, key, window_no)
ON CONFLICT (kind, key) DO UPDATE
SET count = CASE WHEN c.window_no >= excluded.window_no THEN c.count + 1 ELSE 1 END,
    window_no = greatest(c.window_no, excluded.window_no)
RETURNING kind, count
"""
_SWEEP = """
DELETE FROM rate_counts c USING unnest($1::text[], $2::int8[]) AS w(kind, window_no)
WHERE c.kind = w.kind AND c.window_no < w.window_no
"""


class SharedCounts:
    """Counters in PostgreSQL, shared by every front end on the database. A window only moves
    forward, so a front end whose clock lags cannot reset another's count."""

    def __init__(self, db: asyncpg.Pool) -> None:
        self._db = db

    async def count(self, requests: list[Counted]) -> list[int]:
        kinds, keys, windows = (list(column) for column in zip(*requests, strict=True))
        rows = await self._db.fetch(_COUNT, kinds, keys, windows)  # down: a 503, as anywhere
        by_kind = {row["kind"]: row["count"] for row in rows}  # one key per kind in a request
        return [by_kind[kind] for kind in kinds]

    async def sweep(self, windows: dict[str, int]) -> None:
        with contextlib.suppress(*DATABASE_DOWN):  # the next sweep takes them
            await self._db.execute(_SWEEP, list(windows), list(windows.values()))


class RateLimiter:
    def __init__(self, limits: dict[str, Limit], counts: Counts | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._limits = limits
        self._counts = counts or LocalCounts()
        self._clock = clock  # wall time: front ends in several processes agree on windows
        self._swept_at = clock()

    async def check(self, *requests: tuple[str, str]) -> None:
        """Count one request against each (kind, key); a 429 with Retry-After once a window's
        count is spent."""
        now = self._clock()
        windows = [int(now // self._limits[kind].window_s) for kind, _ in requests]
        counts = await self._counts.count(
            [(kind, key, window) for (kind, key), window in zip(requests, windows, strict=True)])
        if now - self._swept_at >= SWEEP_INTERVAL_S:
            self._swept_at = now
            await self._counts.sweep({kind: int(now // limit.window_s)
                                      for kind, limit in self._limits.items()})
        for (kind, _), window, count in zip(requests, windows, counts, strict=True):
            limit = self._limits[kind]
            if count > limit.requests:
                retry_after_s = math.ceil((window + 1) * limit.window_s - now)
                raise ApiError("rate_limited",
                               f"more than {limit.requests} requests in {limit.window_s} s "
                               f"({kind})", {"Retry-After": str(max(1, retry_after_s))})


_PER_ADDRESS = {("POST", "/auth/login"): "login", ("POST", "/auth/register"): "register"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def rate_limit_middleware(limiter: RateLimiter) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        address = request.remote or "unknown"
        kind = _PER_ADDRESS.get((request.method, request.path))
        await limiter.check(("ip", address), *([(kind, address)] if kind else []))
        return await handler(request)

    return middleware
