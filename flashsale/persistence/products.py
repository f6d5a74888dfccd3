"""The catalogue of sales."""

import datetime as dt
import uuid

import asyncpg
import msgspec

from flashsale.actors.messages import ProductCounts, ProductTerms


class ProductRow(msgspec.Struct, frozen=True):
    id: str
    name: str
    price_minor: int
    currency: str
    initial_stock: int
    sale_starts_at: dt.datetime
    sale_ends_at: dt.datetime
    per_user_limit: int

    @property
    def terms(self) -> ProductTerms:
        return ProductTerms(self.id, self.price_minor, self.currency,
                            _epoch_ms(self.sale_starts_at), _epoch_ms(self.sale_ends_at),
                            self.per_user_limit)


_COLUMNS = ("id::text, name, price_minor, currency, initial_stock, sale_starts_at, sale_ends_at,"
            " per_user_limit")


def _epoch_ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


def _row(record: asyncpg.Record) -> ProductRow:
    fields = {name: record[name] for name in ProductRow.__struct_fields__}
    for name in ("sale_starts_at", "sale_ends_at"):
        fields[name] = _aware(fields[name])
    return ProductRow(**fields)


def _aware(moment: dt.datetime) -> dt.datetime:
    """asyncpg reads PostgreSQL's -infinity and infinity (an open-ended sale, set by hand) as
    naive datetime.min and datetime.max: they stand for the first and last moments in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


async def insert_product(db: asyncpg.Pool, name: str, price_minor: int, currency: str,
                         stock: int, starts_at: dt.datetime, ends_at: dt.datetime,
                         per_user_limit: int) -> ProductRow:
    record = await db.fetchrow(
        f"""INSERT INTO products (id, name, price_minor, currency, initial_stock, sale_starts_at,
                                  sale_ends_at, per_user_limit)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_COLUMNS}""",
        uuid.uuid4(), name, price_minor, currency, stock, starts_at, ends_at, per_user_limit,
    )
    return _row(record)


async def _written_since(db: asyncpg.Pool, table: str, columns: str,
                         horizon: int) -> tuple[list[asyncpg.Record], int]:
    """The rows written from transaction `horizon` on (0: every row), and the horizon to read from
    next time: the oldest transaction still running as this read. A read from it finds every row
    written since, commits that were in flight included (migration 0013)."""
    records = await db.fetch(
        f"""SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS horizon,
                   written_by IS NOT NULL AS found, {columns}
            FROM (SELECT) AS reading LEFT JOIN {table} ON written_by >= $1::text::xid8""",
        str(horizon))
    return [r for r in records if r["found"]], records[0]["horizon"]


async def products_written_since(db: asyncpg.Pool,
                                 horizon: int) -> tuple[list[ProductRow], int]:
    records, reached = await _written_since(db, "products", _COLUMNS, horizon)
    return [_row(r) for r in records], reached


async def product_by_id(db: asyncpg.Pool, product_id: str) -> ProductRow | None:
    record = await db.fetchrow(f"SELECT {_COLUMNS} FROM products WHERE id = $1", product_id)
    return None if record is None else _row(record)


async def counts_written_since(db: asyncpg.Pool,
                               horizon: int) -> tuple[dict[str, ProductCounts], int]:
    """Sales' counts as their last commits left them (sales never defined have none)."""
    records, reached = await _written_since(
        db, "product_counts", "product_id::text, stock, available, reserved, sold, last_seq",
        horizon)
    return {r["product_id"]: ProductCounts(r["stock"], r["available"], r["reserved"], r["sold"],
                                           r["last_seq"]) for r in records}, reached
