"""Rate limits (SPEC §8): fixed-window counters in the front-end process.

One `flashsale serve` runs one front-end process, so its counters see every request it serves.
They cost no database or Ray round trip, which the order path cannot afford.
"""

import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from flashsale.config import Limit
from flashsale.http.problems import ApiError

KEYS_MAX = 1_000_000  # counters kept before stale windows are swept


class RateLimiter:
    def __init__(self, limits: dict[str, Limit],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._windows: dict[tuple[str, str], tuple[int, int]] = {}

    def check(self, kind: str, key: str) -> None:
        """Count one request; a 429 with Retry-After once the window's count is spent."""
        limit = self._limits[kind]
        now = self._clock()
        window = int(now // limit.window_s)
        seen_window, count = self._windows.get((kind, key), (window, 0))
        count = count + 1 if seen_window == window else 1
        if len(self._windows) >= KEYS_MAX:
            self._sweep(now)
        self._windows[(kind, key)] = (window, count)
        if count > limit.requests:
            retry_after_s = math.ceil((window + 1) * limit.window_s - now)
            raise ApiError("rate_limited",
                           f"more than {limit.requests} requests in {limit.window_s} s ({kind})",
                           {"Retry-After": str(max(1, retry_after_s))})

    def _sweep(self, now: float) -> None:
        self._windows = {
            key: (window, count) for key, (window, count) in self._windows.items()
            if window == int(now // self._limits[key[0]].window_s)
        }


_PER_ADDRESS = {("POST", "/auth/login"): "login", ("POST", "/auth/register"): "register"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def rate_limit_middleware(limiter: RateLimiter) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        address = request.remote or "unknown"
        limiter.check("ip", address)
        kind = _PER_ADDRESS.get((request.method, request.path))
        if kind is not None:
            limiter.check(kind, address)
        return await handler(request)

    return middleware
