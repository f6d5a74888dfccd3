"""The shoppers: one asyncio client, C connections, one order attempt per shopper.

Closed loop by default: C connections each take the next shopper as soon as they are free, so
a request is due the moment a connection can send it. With `rate`, requests are due on a fixed
schedule (open loop) and latency counts from that moment, queueing included: a slow server
cannot hide its backlog by slowing the client (coordinated omission corrected, as in wrk2).
With `duration_s`, no request is sent (or due) after that long: the shoppers not reached by then
do not try.
"""

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import aiohttp
from hdrh.histogram import HdrHistogram

LATENCY_MAX_US = 120_000_000
RETRY_PAUSE_S = 0.05
RETRY_DEADLINE_S = 30.0


class Shopper(NamedTuple):
    token: str
    product_id: str
    key: str
    quantity: int = 1


class Created(NamedTuple):
    shopper: int
    order_id: str


class LoadResult:
    def __init__(self) -> None:
        self.latency_us = HdrHistogram(1, LATENCY_MAX_US, 3)
        self.statuses: Counter[int] = Counter()
        self.rejected: Counter[str] = Counter()
        self.created: list[Created] = []
        self.completed_at: list[float] = []  # seconds since the start, for throughput plots
        self.started_at = 0.0
        self.errors_5xx = 0
        self.transport_errors = 0
        self.retries = 0
        self.elapsed_s = 0.0
        self.crashed_at: float | None = None

    def only(self, order_ids: set[str]) -> "LoadResult":
        """The same run, keeping only the given acknowledged orders (for audits)."""
        kept = LoadResult()
        kept.created = [c for c in self.created if c.order_id in order_ids]
        return kept

    @property
    def answered(self) -> int:
        return len(self.completed_at)

    def percentile_ms(self, percentile: float) -> float:
        return float(self.latency_us.get_value_at_percentile(percentile)) / 1000

    @property
    def max_ms(self) -> float:
        return float(self.latency_us.get_max_value()) / 1000


async def _attempt(session: aiohttp.ClientSession, url: str,
                   shopper: Shopper) -> tuple[int, dict[str, object]]:
    async with session.post(
        f"{url}/orders", json={"product_id": shopper.product_id, "quantity": shopper.quantity},
        headers={"Authorization": f"Bearer {shopper.token}",
                 "X-Idempotency-Key": shopper.key},
    ) as reply:
        return reply.status, await reply.json(content_type=None)


async def fire(url: str, shoppers: list[Shopper], connections: int, rate: float | None = None,
               duration_s: float | None = None, retry_unavailable: bool = False,
               progress: Callable[[LoadResult], None] | None = None,
               result: LoadResult | None = None) -> LoadResult:
    """Every shopper tries once (and, with `retry_unavailable`, again after a 503 or a dropped
    connection, with the same idempotency key, as a real client would)."""
    result = result or LoadResult()
    queue = iter(enumerate(shoppers))
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    started = result.started_at = time.perf_counter()
    until = started + duration_s if duration_s is not None else math.inf

    async def one(index: int, shopper: Shopper, due: float) -> None:
        deadline = due + RETRY_DEADLINE_S
        while True:
            try:
                status, body = await _attempt(session, url, shopper)
            except (aiohttp.ClientError, TimeoutError):
                result.transport_errors += 1
                status, body = 0, {}
            if status >= 500:
                result.errors_5xx += 1
            retry = status == 0 or status == 503
            if retry and retry_unavailable and time.perf_counter() < deadline:
                result.retries += 1
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            break
        done = time.perf_counter()
        result.latency_us.record_value(max(1, min(int((done - due) * 1e6), LATENCY_MAX_US)))
        result.statuses[status] += 1
        result.completed_at.append(done - started)
        if status == 201:
            result.created.append(Created(index, str(body["order_id"])))
        elif "code" in body:
            result.rejected[str(body["code"])] += 1

    async def worker() -> None:
        for index, shopper in queue:
            due = time.perf_counter() if rate is None else started + index / rate
            if due >= until:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await one(index, shopper, due)

    async def report() -> None:
        while progress is not None:
            await asyncio.sleep(1.0)
            progress(result)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        reporter = asyncio.get_running_loop().create_task(report())
        await asyncio.gather(*(worker() for _ in range(connections)))
        reporter.cancel()
    result.elapsed_s = time.perf_counter() - started
    return result
