"""Rate limits (SPEC §8): fixed-window counters, kept where every front end can see them.

One front end keeps its counters in its own memory, at no database or Ray round trip, which the
order path cannot afford. Several (`flashsale serve --workers N`) must share them, since a
client's connections land on any of them: they count in PostgreSQL, and the counts of concurrent
requests go out together, one statement at a time, so a request costs no statement of its own.
"""

import asyncio
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Middleware

from flashsale.config import Limit, Network
from flashsale.http.problems import ApiError
from flashsale.persistence.database import SWEEP_WAIT_MAX_S

SWEEP_INTERVAL_S = 60.0  # how often a front end drops the counts of ended windows
COUNTS_WAITING_MAX = 10_000  # requests waiting for the next shared count; more are a 503

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


# Rows are locked in (kind, key) order, the same in every front end, so that two statements
# counting the same keys cannot deadlock.
_COUNT = """
INSERT INTO rate_counts AS c (kind, key, window_no, count)
SELECT kind, key, window_no, n FROM unnest($1::text[], $2::text[], $3::int8[], $4::int4[])
    AS r(kind, key, window_no, n)
ORDER BY kind, key
ON CONFLICT (kind, key) DO UPDATE
SET count = CASE WHEN c.window_no >= excluded.window_no THEN c.count + excluded.count
                 ELSE excluded.count END,
    window_no = greatest(c.window_no, excluded.window_no)
RETURNING kind, key, count
"""
_SWEEP = """
DELETE FROM rate_counts c USING unnest($1::text[], $2::int8[]) AS w(kind, window_no)
WHERE c.kind = w.kind AND c.window_no < w.window_no
"""


class SharedCounts:
    """Counters in PostgreSQL, shared by every front end on the database. A window only moves
    forward, so a front end whose clock lags cannot reset another's count.

    While a statement is in flight, new requests wait and are counted together in the next: a
    key that several of them count is one row, raised by their number, and each request gets
    the count it would have got alone. A request that raced its window's end is counted in the
    newer window, with the others of that key."""

    def __init__(self, db: asyncpg.Pool, waiting_max: int = COUNTS_WAITING_MAX) -> None:
        self._db = db
        self._waiting: list[tuple[list[Counted], asyncio.Future[list[int]]]] = []
        self._waiting_max = waiting_max
        self._flusher: asyncio.Task[None] | None = None

    async def count(self, requests: list[Counted]) -> list[int]:
        if len(self._waiting) >= self._waiting_max:
            raise ApiError("unavailable", "too many requests are waiting to be counted")
        loop = asyncio.get_running_loop()
        counted: asyncio.Future[list[int]] = loop.create_future()
        self._waiting.append((requests, counted))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())  # after this iteration's arrivals
        return await counted

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    counts = await self._count_together([requests for requests, _ in batch])
                except Exception as error:  # noqa: BLE001 - every waiter hears of it (a 503)
                    for _, counted in batch:
                        if not counted.done():
                            counted.set_exception(error)
                    continue
                for (_, counted), request_counts in zip(batch, counts, strict=True):
                    if not counted.done():  # its request may have been cancelled
                        counted.set_result(request_counts)
        finally:
            self._flusher = None

    async def _count_together(self, batch: list[list[Counted]]) -> list[list[int]]:
        keys: dict[tuple[str, str], list[int]] = {}  # (kind, key) -> [window, requests]
        for requests in batch:
            for kind, key, window in requests:
                slot = keys.setdefault((kind, key), [window, 0])
                slot[0] = max(slot[0], window)
                slot[1] += 1
        kinds, names = zip(*keys, strict=True)
        windows, numbers = zip(*keys.values(), strict=True)
        rows = await self._db.fetch(_COUNT, kinds, names, windows, numbers)
        # Each key's count before these requests; they take the counts after it in turn.
        before = {(row["kind"], row["key"]): row["count"] - keys[row["kind"], row["key"]][1]
                  for row in rows}
        counts = []
        for requests in batch:
            request_counts = []
            for kind, key, _ in requests:
                before[kind, key] += 1
                request_counts.append(before[kind, key])
            counts.append(request_counts)
        return counts

    async def sweep(self, windows: dict[str, int]) -> None:
        await self._db.execute(_SWEEP, list(windows), list(windows.values()),
                               timeout=SWEEP_WAIT_MAX_S)


class RateLimiter:
    def __init__(self, limits: dict[str, Limit], counts: Counts | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._limits = limits
        self._counts = counts or LocalCounts()
        self._clock = clock  # wall time: front ends in several processes agree on windows

    async def check(self, *requests: tuple[str, str]) -> None:
        """Count one request against each (kind, key); a 429 with Retry-After once a window's
        count is spent."""
        now = self._clock()
        windows = [int(now // self._limits[kind].window_s) for kind, _ in requests]
        counts = await self._counts.count(
            [(kind, key, window) for (kind, key), window in zip(requests, windows, strict=True)])
        for (kind, _), window, count in zip(requests, windows, counts, strict=True):
            limit = self._limits[kind]
            if count > limit.requests:
                retry_after_s = math.ceil((window + 1) * limit.window_s - now)
                raise ApiError("rate_limited",
                               f"more than {limit.requests} requests in {limit.window_s} s "
                               f"({kind})", {"Retry-After": str(max(1, retry_after_s))})

    async def sweep(self) -> None:
        """Drop the counts of ended windows: a background round every SWEEP_INTERVAL_S, off
        the requests' path."""
        now = self._clock()
        await self._counts.sweep({kind: int(now // limit.window_s)
                                  for kind, limit in self._limits.items()})


_PER_ADDRESS = {("POST", "/auth/login"): "login", ("POST", "/auth/register"): "register"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _client_address(request: web.Request, trusted_proxies: Sequence[Network]) -> str:
    """The peer's address, or, where the peer is a trusted proxy, the last address in
    X-Forwarded-For that is not a trusted proxy's: each proxy appends the address it heard from,
    and a client may write anything before that, never after."""
    peer = request.remote or "unknown"
    if not _among(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ())
            for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _among(hop, trusted_proxies):
            return hop
    return hops[0] if hops else peer


def _among(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def rate_limit_middleware(limiter: RateLimiter,
                          trusted_proxies: Sequence[Network] = ()) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        address = _client_address(request, trusted_proxies)
        kind = _PER_ADDRESS.get((request.method, request.path))
        await limiter.check(("ip", address), *([(kind, address)] if kind else []))
        return await handler(request)

    return middleware
