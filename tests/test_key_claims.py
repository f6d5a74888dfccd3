"""Idempotency key claims on a real PostgreSQL: one product per key, whatever the timing."""

import asyncio
import uuid

import pytest
from helpers import set_database_default

from flashsale.ids import uuid7
from flashsale.persistence.database import create_pool
from flashsale.persistence.orders import claim_keys


@pytest.mark.parametrize("database_isolation", ["read committed", "serializable"])
async def test_batches_claiming_shared_keys_in_opposite_orders_split_them_cleanly(
        database_dsn: str, database_isolation: str) -> None:
    """Two products' batches claim the same keys at once, listed in opposite orders: no
    deadlock (which would fail a whole batch), and every key goes to exactly one product,
    whatever isolation the database's sessions default to."""
    await set_database_default(database_dsn, "default_transaction_isolation", database_isolation)
    db = await create_pool(database_dsn, init_size=2, max_size=2)
    try:
        for _ in range(10):
            users = [str(uuid.uuid4()) for _ in range(300)]
            keys = ["cart"] * len(users)
            first, second = str(uuid.uuid4()), str(uuid.uuid4())
            taken_from_first, taken_from_second = await asyncio.gather(
                claim_keys(db, first, users, keys, [uuid7() for _ in users]),
                claim_keys(db, second, users[::-1], keys, [uuid7() for _ in users]))
            lost_by_first = {users[i] for i in taken_from_first}
            lost_by_second = {users[::-1][i] for i in taken_from_second}
            assert lost_by_first.isdisjoint(lost_by_second)
            assert lost_by_first | lost_by_second == set(users)
            holders = dict(await db.fetch(
                "SELECT user_id::text, product_id::text FROM key_claims WHERE user_id = ANY($1)",
                users))
            assert {u for u, p in holders.items() if p == second} == lost_by_first
    finally:
        await db.close()
