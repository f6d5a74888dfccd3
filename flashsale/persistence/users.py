"""Users and refresh tokens."""

import datetime as dt
import hashlib
import secrets
import uuid

import asyncpg

from flashsale.persistence.database import SWEEP_WAIT_MAX_S

REFRESH_TTL = dt.timedelta(days=30)
USER_COLUMNS = "id::text, email, full_name, phone, address, is_active, is_admin, created_at"


class EmailTaken(Exception):
    pass


async def create_user(db: asyncpg.Pool | asyncpg.Connection, email: str, password_hash: str,
                      full_name: str, phone: str | None = None,
                      is_admin: bool = False) -> asyncpg.Record:
    try:
        return await db.fetchrow(
            f"""INSERT INTO users (id, email, password_hash, full_name, phone, is_admin)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING {USER_COLUMNS}""",
            uuid.uuid4(), email, password_hash, full_name, phone, is_admin,
        )
    except asyncpg.UniqueViolationError:
        raise EmailTaken(email) from None


async def credentials(db: asyncpg.Pool, email: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT id::text, password_hash, is_active FROM users WHERE lower(email) = lower($1)",
        email,
    )


async def user_by_id(db: asyncpg.Pool, user_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)


async def password_hash_of(db: asyncpg.Pool, user_id: str) -> str | None:
    return await db.fetchval("SELECT password_hash FROM users WHERE id = $1", user_id)


async def update_profile(db: asyncpg.Pool, user_id: str,
                         changes: dict[str, str | None]) -> asyncpg.Record:
    assignments = ", ".join(f"{column} = ${n}" for n, column in enumerate(changes, 2))
    return await db.fetchrow(
        f"UPDATE users SET {assignments} WHERE id = $1 RETURNING {USER_COLUMNS}",
        user_id, *changes.values(),
    )


async def set_password(db: asyncpg.Pool, user_id: str, password_hash: str) -> None:
    """A new password also ends every refresh token issued before it."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE users SET password_hash = $2 WHERE id = $1",
                           user_id, password_hash)
        await conn.execute("UPDATE refresh_tokens SET used_at = now() "
                           "WHERE user_id = $1 AND used_at IS NULL", user_id)


async def issue_refresh_token(db: asyncpg.Pool | asyncpg.Connection, user_id: str) -> str:
    token_id, secret = uuid.uuid4(), secrets.token_urlsafe(32)
    await db.execute(
        "INSERT INTO refresh_tokens (id, user_id, secret_sha256, expires_at) "
        "VALUES ($1, $2, $3, now() + $4::interval)",
        token_id, user_id, hashlib.sha256(secret.encode()).digest(), REFRESH_TTL,
    )
    return f"{token_id}.{secret}"


async def drop_spent_refresh_tokens(db: asyncpg.Pool) -> int:
    """Drop the refresh tokens that can no longer be used (spent, ended by a new password, or
    expired); returns how many. Every login and every refresh makes one, so a sale's crowd would
    otherwise leave rows behind for good."""
    status = await db.execute(
        "DELETE FROM refresh_tokens WHERE used_at IS NOT NULL OR expires_at <= now()",
        timeout=SWEEP_WAIT_MAX_S)
    return int(status.split()[-1])


def _token_id(token: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(token.partition(".")[0])
    except ValueError:
        return None


async def refresh_token_owner(db: asyncpg.Pool, token: str) -> str | None:
    """Whose token this claims to be (not yet proof: `use_refresh_token` checks the secret)."""
    token_id = _token_id(token)
    if token_id is None:
        return None
    return await db.fetchval("SELECT user_id::text FROM refresh_tokens WHERE id = $1", token_id)


async def use_refresh_token(db: asyncpg.Pool, token: str) -> str | None:
    """Spend a refresh token (each works once); returns its active user's id, or None."""
    parsed, secret = _token_id(token), token.partition(".")[2]
    if parsed is None:
        return None
    return await db.fetchval(
        """UPDATE refresh_tokens t SET used_at = now()
           FROM users u
           WHERE t.id = $1 AND t.secret_sha256 = $2 AND t.used_at IS NULL
             AND t.expires_at > now() AND u.id = t.user_id AND u.is_active
           RETURNING t.user_id::text""",
        parsed, hashlib.sha256(secret.encode()).digest(),
    )


async def deactivated_user_ids(db: asyncpg.Pool) -> set[str]:
    rows = await db.fetch("SELECT id::text FROM users WHERE NOT is_active")
    return {row["id"] for row in rows}


async def ensure_admin(db: asyncpg.Pool, email: str, password_hash: str) -> None:
    """Create the admin, or make the existing account an active admin (its password stays)."""
    updated = await db.execute(
        "UPDATE users SET is_admin = true, is_active = true WHERE lower(email) = lower($1)", email)
    if updated == "UPDATE 0":
        await create_user(db, email, password_hash, "Administrator", is_admin=True)
