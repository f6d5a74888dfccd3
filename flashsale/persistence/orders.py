"""Queries on the orders read model (the WAL service keeps it current)."""

import asyncpg

from flashsale.actors.messages import OrderRecord, OrderStatus, RefundStatus
from flashsale.persistence.database import SWEEP_WAIT_MAX_S

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
    """A user's orders, found through the keys they were placed with (see `claim_keys`)."""
    mine = "FROM key_claims c JOIN orders o ON o.id = c.order_id"
    where = "c.user_id = $1 AND ($2::text IS NULL OR o.status = $2)"
    rows = await db.fetch(
        f"""SELECT {_COLUMNS}, s.provider AS payment_provider
            {mine} LEFT JOIN payment_sessions s ON s.order_id = o.id
            WHERE {where} ORDER BY o.id DESC LIMIT $3 OFFSET $4""",
        user_id, status, limit, offset)
    total = await db.fetchval(f"SELECT count(*) {mine} WHERE {where}", user_id, status)
    return rows, total


async def claim_payment(db: asyncpg.Pool, payment_id: str, order_id: str) -> str:
    """Claim this payment id for `order_id` unless an order claimed it first; returns the
    claiming order's id. A claim another transaction is making is waited for, so of two
    webhooks carrying one payment id for two orders, exactly one claims it."""
    return await db.fetchval(
        """INSERT INTO payment_claims (payment_id, order_id) VALUES ($1, $2)
           ON CONFLICT (payment_id) DO UPDATE
               SET order_id = payment_claims.order_id  -- no change: only to return it
           RETURNING order_id::text""",
        payment_id, order_id)


def order_record(row: asyncpg.Record) -> OrderRecord:
    """A row of the read model as the product actor knows orders."""
    return OrderRecord(
        row["id"], row["user_id"], row["idempotency_key"], row["quantity"],
        row["unit_price_minor"], OrderStatus(row["status"]), row["created_at_ms"],
        row["expires_at_ms"], row["updated_at_ms"], row["confirmed_at_ms"], row["payment_id"],
        RefundStatus(row["refund_status"]), row["refund_amount_minor"],
    )


async def claim_keys(db: asyncpg.Pool, product_id: str, user_ids: list[str], keys: list[str],
                     order_ids: list[str]) -> dict[int, asyncpg.Record]:
    """Claim these (user, key) pairs for `product_id`, each with the order id its command would
    place, in one statement. Keys claimed before come back, by their 0-based position in the
    batch, with the product and order id of their claim (`claimed_for`, `claimed_order`) and
    that order's columns if it was placed (NULL if not yet); keys claimed now are left out.

    A claim another transaction is making is waited for, so of two batches sending one key to
    two products, exactly one claims it. Keys are claimed in a fixed order, so two batches
    sharing keys cannot deadlock."""
    return {row["position"]: row for row in await db.fetch(
        f"""WITH batch AS (
                SELECT * FROM unnest($2::uuid[], $3::text[], $4::uuid[])
                    WITH ORDINALITY AS b(user_id, key, order_id, position)),
            claim AS (
                INSERT INTO key_claims (user_id, idempotency_key, product_id, order_id)
                SELECT DISTINCT ON (user_id, key) user_id, key, $1::uuid, order_id FROM batch
                ORDER BY user_id, key
                ON CONFLICT (user_id, idempotency_key) DO UPDATE
                    SET product_id = key_claims.product_id  -- no change: only to return it
                RETURNING user_id, idempotency_key AS key, product_id, order_id)
            SELECT b.position - 1 AS position, c.product_id::text AS claimed_for,
                   c.order_id::text AS claimed_order, {_COLUMNS}
            FROM batch b
            JOIN claim c USING (user_id, key)
            LEFT JOIN orders o ON o.id = c.order_id
            WHERE c.order_id <> b.order_id""",
        product_id, user_ids, keys, order_ids,
    )}


async def drop_spent_claims(db: asyncpg.Pool) -> int:
    """Drop the claims of keys that placed no order (refused or unanswered attempts) in sales
    that ended over a day ago; returns how many. No order can come of them any more, the day
    keeps every key at least 24 h (SPEC §5), and a sold-out sale's refused attempts are most of
    its claims. Claims that placed an order stay: they are how a user's orders are found."""
    status = await db.execute(
        """DELETE FROM key_claims c USING products p
           WHERE p.id = c.product_id AND p.sale_ends_at < now() - interval '1 day'
             AND NOT EXISTS (SELECT FROM orders o WHERE o.id = c.order_id)""",
        timeout=SWEEP_WAIT_MAX_S)
    return int(status.split()[-1])
