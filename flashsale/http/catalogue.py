"""The front end's view of the sales: catalogue rows and counts from PostgreSQL, so a product
read costs no Ray call (≤ 1 s stale). Counts arrive with every batch a sale's actor answers,
and every commit of a sale's write-ahead log records them in `product_counts`. Twice a second
the front end reads the sales and counts written since its last read, so its cost follows the
sales that change, not all those ever made; only a sale with no counts there is asked directly."""

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from flashsale.actors.batching import ProductRouter
from flashsale.actors.messages import DefineProduct, ProductCounts
from flashsale.actors.product_actor import ProductUnavailable
from flashsale.http.problems import ApiError
from flashsale.http.schemas import ProductView, rfc3339
from flashsale.persistence.database import DATABASE_DOWN
from flashsale.persistence.products import (
    ProductRow,
    counts_written_since,
    product_by_id,
    products_written_since,
)
from flashsale.tasks import Outage, repeat, stop_task

log = logging.getLogger(__name__)

COUNTS_REFRESH_S = 0.5

T = TypeVar("T")


def sale_status(row: ProductRow, now: dt.datetime) -> str:
    if now < row.sale_starts_at:
        return "scheduled"
    return "active" if now < row.sale_ends_at else "ended"


class Catalogue:
    def __init__(self, db: asyncpg.Pool, router: ProductRouter) -> None:
        self._db = db
        self._router = router
        self._rows: dict[str, ProductRow] = {}
        self._counts: dict[str, ProductCounts] = {}
        self._task: asyncio.Task[None] | None = None
        self._rows_horizon = self._counts_horizon = 0  # see `_read_from`
        router.on_counts = self._hear

    async def start(self) -> None:
        await self._refresh()
        outage = Outage(log, "catalogue refresh", "counts shown may be stale", DATABASE_DOWN)
        self._task = asyncio.get_running_loop().create_task(
            repeat(self._refresh, COUNTS_REFRESH_S, outage))

    async def stop(self) -> None:
        await stop_task(self._task)

    async def row(self, product_id: str) -> ProductRow | None:
        """The sale, from the cache or (for a sale created by another front end) the database."""
        row = self._rows.get(product_id)
        if row is None:
            row = await product_by_id(self._db, product_id)
            if row is not None:
                self._rows[product_id] = row
        return row

    async def define(self, row: ProductRow) -> ProductView:
        """Make the sale's actor exist and know its terms (idempotent), then show it."""
        self._rows[row.id] = row
        await self._router.define(row.id, DefineProduct(row.terms, row.initial_stock))
        await self.refresh(row.id)
        return self.view(row)

    async def refresh(self, product_id: str) -> None:
        self._hear(product_id, await self._router.counts(product_id))

    def _hear(self, product_id: str, counts: ProductCounts) -> None:
        self._counts[product_id] = counts

    def view(self, row: ProductRow) -> ProductView:
        counts = self._counts.get(row.id)
        if counts is None:  # its actor has not answered since this front end started
            raise ApiError("unavailable", f"product {row.id} is recovering")
        return ProductView(
            id=row.id, name=row.name, price=row.price_minor, currency=row.currency,
            stock=counts.stock, available=counts.available, reserved=counts.reserved,
            sold=counts.sold, sale_starts_at=rfc3339(row.sale_starts_at),
            sale_ends_at=rfc3339(row.sale_ends_at), per_user_limit=row.per_user_limit,
            status=sale_status(row, dt.datetime.now(dt.UTC)),
        )

    def views(self) -> list[ProductView]:
        """The sales whose counts are known (a recovering one reappears within a second)."""
        return [self.view(row) for row in self._rows.values() if row.id in self._counts]

    async def _refresh(self) -> None:
        """The sales (new ones made elsewhere) and the counts written since the last refresh."""
        rows, self._rows_horizon = await _read_from(products_written_since, self._db,
                                                    self._rows_horizon)
        self._rows.update({row.id: row for row in rows})
        counts, self._counts_horizon = await _read_from(counts_written_since, self._db,
                                                        self._counts_horizon)
        self._counts.update(counts)
        await self._ask_actors([row for row in self._rows.values() if row.id not in self._counts])

    async def _ask_actors(self, rows: list[ProductRow]) -> None:
        """Sales whose definition was never committed, or whose actor has not run since the
        counts table exists."""
        results = await asyncio.gather(*(self._router.counts(row.id) for row in rows),
                                       return_exceptions=True)
        for row, counts in zip(rows, results, strict=True):
            if isinstance(counts, ProductUnavailable):
                continue  # keep the last known counts while the actor recovers
            if isinstance(counts, BaseException):
                raise counts
            if counts.last_seq == 0:  # created, but its actor never logged the definition
                with contextlib.suppress(ProductUnavailable):
                    await self.define(row)
                continue
            self._hear(row.id, counts)


async def _read_from(read: Callable[[asyncpg.Pool, int], Awaitable[tuple[T, int]]],
                     db: asyncpg.Pool, horizon: int) -> tuple[T, int]:
    """What `read` finds from `horizon` on. Horizons only move forward: one that went back means
    the database did (restored from a backup, say), and everything is read again."""
    found, reached = await read(db, horizon)
    if reached < horizon:
        found, reached = await read(db, 0)
    return found, reached
