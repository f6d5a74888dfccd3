"""Queries on the orders read model (the WAL writer keeps it current)."""

import asyncpg

ORDER_COLUMNS = """id::text, user_id::text, product_id::text, quantity, unit_price_minor,
    currency, status, payment_id, refund_status, refund_amount_minor, expires_at_ms,
    confirmed_at_ms, created_at_ms, updated_at_ms"""


async def order_of_user(db: asyncpg.Pool, order_id: str, user_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND user_id = $2", order_id, user_id)


async def orders_of_user(db: asyncpg.Pool, user_id: str, status: str | None, limit: int,
                         offset: int) -> tuple[list[asyncpg.Record], int]:
    where = "user_id = $1 AND ($2::text IS NULL OR status = $2)"
    rows = await db.fetch(
        f"SELECT {ORDER_COLUMNS} FROM orders WHERE {where} ORDER BY id DESC LIMIT $3 OFFSET $4",
        user_id, status, limit, offset,
    )
    total = await db.fetchval(f"SELECT count(*) FROM orders WHERE {where}", user_id, status)
    return rows, total


async def keys_used_elsewhere(db: asyncpg.Pool, product_id: str, user_ids: list[str],
                              keys: list[str]) -> set[int]:
    """Positions (0-based) of (user, key) pairs already used for an order of another product."""
    rows = await db.fetch(
        """SELECT k.position - 1 AS position
           FROM unnest($2::uuid[], $3::text[]) WITH ORDINALITY AS k(user_id, key, position)
           JOIN orders o ON o.user_id = k.user_id AND o.idempotency_key = k.key
           WHERE o.product_id <> $1""",
        product_id, user_ids, keys,
    )
    return {row["position"] for row in rows}
