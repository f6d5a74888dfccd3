"""Payment sessions, received webhooks and the pacing of refund calls."""

import asyncpg

WEBHOOK_PAYLOAD_BYTES_MAX = 64 * 1024
REFUND_LEASE_S = 30
REFUND_RECHECK_S = 600  # accepted but never reported: ask the gateway again (same key)


async def payment_session(db: asyncpg.Pool, order_id: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT provider, session_id, checkout_url FROM payment_sessions "
                             "WHERE order_id = $1", order_id)


async def keep_payment_session(db: asyncpg.Pool, order_id: str, provider: str, session_id: str,
                               checkout_url: str | None) -> asyncpg.Record:
    """Store the order's session unless a concurrent first visit stored one: one per order."""
    await db.execute(
        "INSERT INTO payment_sessions (order_id, provider, session_id, checkout_url) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (order_id) DO NOTHING",
        order_id, provider, session_id, checkout_url)
    session = await payment_session(db, order_id)
    assert session is not None
    return session


async def record_webhook(db: asyncpg.Pool, provider: str, event_id: str,
                         payload: bytes) -> str | None:
    """Keep the delivery; returns the outcome of an earlier delivery of the same event, if it
    was processed (None: new, or earlier processing did not finish)."""
    await db.execute(
        "INSERT INTO webhook_events (provider, event_id, payload) VALUES ($1, $2, $3) "
        "ON CONFLICT (provider, event_id) DO NOTHING",
        provider, event_id, payload[:WEBHOOK_PAYLOAD_BYTES_MAX])
    return await db.fetchval("SELECT outcome FROM webhook_events WHERE provider = $1 "
                             "AND event_id = $2", provider, event_id)


async def set_webhook_outcome(db: asyncpg.Pool, provider: str, event_id: str,
                              outcome: str) -> None:
    await db.execute("UPDATE webhook_events SET outcome = $3 WHERE provider = $1 "
                     "AND event_id = $2", provider, event_id, outcome)


async def claim_due_refunds(db: asyncpg.Pool, limit: int) -> list[asyncpg.Record]:
    """Refunds journaled as pending whose gateway call is due, leased to this caller."""
    return await db.fetch(
        f"""WITH due AS (
                SELECT o.id FROM orders o LEFT JOIN refund_attempts r ON r.order_id = o.id
                WHERE o.refund_status = 'pending' AND o.payment_id IS NOT NULL
                  AND (r.order_id IS NULL OR r.next_attempt_at <= now())
                LIMIT $1),
            claimed AS (
                INSERT INTO refund_attempts (order_id, attempts, next_attempt_at)
                SELECT id, 1, now() + interval '{REFUND_LEASE_S} seconds' FROM due
                ON CONFLICT (order_id) DO UPDATE
                SET attempts = refund_attempts.attempts + 1,
                    next_attempt_at = now() + interval '{REFUND_LEASE_S} seconds'
                RETURNING order_id, attempts)
            SELECT o.id::text AS order_id, o.payment_id, o.refund_amount_minor, o.currency,
                   c.attempts
            FROM claimed c JOIN orders o ON o.id = c.order_id""",
        limit,
    )


async def refund_accepted(db: asyncpg.Pool, order_id: str) -> None:
    await db.execute(
        f"UPDATE refund_attempts SET accepted_at = now(), last_error = NULL, "
        f"next_attempt_at = now() + interval '{REFUND_RECHECK_S} seconds' WHERE order_id = $1",
        order_id)


async def refund_failed(db: asyncpg.Pool, order_id: str, error: str, retry_in_s: float) -> None:
    await db.execute(
        "UPDATE refund_attempts SET last_error = $2, "
        "next_attempt_at = now() + make_interval(secs => $3) WHERE order_id = $1",
        order_id, error[:500], retry_in_s)


async def lapsed_sessions(db: asyncpg.Pool, limit: int) -> list[asyncpg.Record]:
    """Open provider sessions of orders whose hold lapsed or whose payment failed."""
    return await db.fetch(
        """SELECT s.order_id::text, s.session_id FROM payment_sessions s
           JOIN orders o ON o.id = s.order_id
           WHERE s.expired_at IS NULL AND o.status IN ('expired', 'failed') LIMIT $1""", limit)


async def mark_session_expired(db: asyncpg.Pool, order_id: str) -> None:
    await db.execute("UPDATE payment_sessions SET expired_at = now() WHERE order_id = $1",
                     order_id)
