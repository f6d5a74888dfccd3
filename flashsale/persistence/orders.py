"""Queries on the orders read model (the WAL writer keeps it current)."""

import asyncpg

from flashsale.actors.messages import OrderRecord, OrderStatus, RefundStatus

_COLUMNS = """o.id::text, o.user_id::text, o.product_id::text, o.idempotency_key, o.quantity,
    o.unit_price_minor, o.currency, o.status, o.payment_id, o.refund_status,
    o.refund_amount_minor, o.expires_at_ms, o.confirmed_at_ms, o.created_at_ms, o.updated_at_ms"""
_ORDERS = f"""SELECT {_COLUMNS}, s.provider AS payment_provider
    FROM orders o LEFT JOIN payment_sessions s ON s.order_id = o.id"""


async def order_of_user(db: asyncpg.Pool, order_id: str, user_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(f"{_ORDERS} WHERE o.id = $1 AND o.user_id = $2", order_id, user_id)


async def order_by_id(db: asyncpg.Pool, order_id: str) -> asyncpg.Record | None:
    """Any user's order: for payment links (which carry their own proof) and webhooks."""
    return await db.fetchrow(f"{_ORDERS} WHERE o.id = $1", order_id)


async def orders_of_user(db: asyncpg.Pool, user_id: str, status: str | None, limit: int,
                         offset: int) -> tuple[list[asyncpg.Record], int]:
    where = "o.user_id = $1 AND ($2::text IS NULL OR o.status = $2)"
    rows = await db.fetch(f"{_ORDERS} WHERE {where} ORDER BY o.id DESC LIMIT $3 OFFSET $4",
                          user_id, status, limit, offset)
    total = await db.fetchval(f"SELECT count(*) FROM orders o WHERE {where}", user_id, status)
    return rows, total


async def order_paid_by(db: asyncpg.Pool, payment_id: str) -> str | None:
    """The id of the order that holds this payment id, if any."""
    return await db.fetchval("SELECT id::text FROM orders WHERE payment_id = $1", payment_id)


def order_record(row: asyncpg.Record) -> OrderRecord:
    """A row of the read model as the product actor knows orders."""
    return OrderRecord(
        row["id"], row["user_id"], row["idempotency_key"], row["quantity"],
        row["unit_price_minor"], OrderStatus(row["status"]), row["created_at_ms"],
        row["expires_at_ms"], row["updated_at_ms"], row["confirmed_at_ms"], row["payment_id"],
        RefundStatus(row["refund_status"]), row["refund_amount_minor"],
    )


async def orders_with_keys(db: asyncpg.Pool, user_ids: list[str],
                           keys: list[str]) -> dict[int, asyncpg.Record]:
    """The orders already placed with these (user, key) pairs, by the pair's 0-based position."""
    rows = await db.fetch(
        f"""SELECT k.position - 1 AS position, {_COLUMNS}
            FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS k(user_id, key, position)
            JOIN orders o ON o.user_id = k.user_id AND o.idempotency_key = k.key""",
        user_ids, keys,
    )
    return {row["position"]: row for row in rows}
