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


async def claim_keys(db: asyncpg.Pool, product_id: str, user_ids: list[str],
                     keys: list[str]) -> dict[int, tuple[bool, asyncpg.Record]]:
    """Claim these (user, key) pairs for `product_id` in one statement. Returns, by the pair's
    0-based position, whether another product holds the key, and the order placed with it if
    any. Pairs claimed now, or before by this product without an order yet, are left out.

    A claim another transaction is making is waited for, so of two batches sending one key to
    two products, exactly one claims it. Keys are claimed in a fixed order, so two batches
    sharing keys cannot deadlock."""
    rows = await db.fetch(
        f"""WITH batch AS (
                SELECT * FROM unnest($2::uuid[], $3::text[])
                    WITH ORDINALITY AS b(user_id, key, position)),
            claim AS (
                INSERT INTO key_claims (user_id, idempotency_key, product_id)
                SELECT DISTINCT user_id, key, $1::uuid FROM batch ORDER BY user_id, key
                ON CONFLICT (user_id, idempotency_key) DO UPDATE
                    SET product_id = key_claims.product_id  -- no change: only to return it
                    WHERE key_claims.product_id <> excluded.product_id
                RETURNING user_id, idempotency_key AS key, product_id)
            SELECT b.position - 1 AS position,
                   c.product_id <> $1::uuid OR o.product_id <> $1::uuid AS elsewhere, {_COLUMNS}
            FROM batch b
            LEFT JOIN claim c USING (user_id, key)
            LEFT JOIN orders o ON o.user_id = b.user_id AND o.idempotency_key = b.key
            WHERE c.product_id <> $1::uuid OR o.id IS NOT NULL""",
        product_id, user_ids, keys,
    )
    return {row["position"]: (bool(row["elsewhere"]), row) for row in rows}
