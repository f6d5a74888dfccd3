"""The payment side's background work.

Refunds: performs those the WAL journals as pending, with one gateway idempotency key per order,
retrying with backoff until the gateway accepts and asking again if it never reports back. After
a restart the journal is still there, so nothing is lost between journal and call.
Sessions: closes the provider session of an order whose hold lapsed, so it takes no money."""

import asyncio
import logging

import aiohttp
import asyncpg

from flashsale.payments.provider import GatewayError, PaymentProvider
from flashsale.persistence.database import DATABASE_DOWN
from flashsale.persistence.payments import (
    claim_due_refunds,
    lapsed_sessions,
    mark_session_expired,
    refund_accepted,
    refund_failed,
)
from flashsale.tasks import Outage, repeat, stop_task

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
REFUNDS_PER_ROUND_MAX = 50
GATEWAY_TIMEOUT_S = 15.0
BACKOFF_MAX_S = 60.0


def refund_key(order_id: str) -> str:
    return f"refund-{order_id}"


class PaymentWorker:
    def __init__(self, db: asyncpg.Pool, provider: PaymentProvider,
                 poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self._db = db
        self._provider = provider
        self._poll_interval_s = poll_interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        outage = Outage(log, "payment worker", "refunds and lapsed sessions wait",
                        DATABASE_DOWN)
        self._task = asyncio.get_running_loop().create_task(
            repeat(self.run_once, self._poll_interval_s, outage))

    async def stop(self) -> None:
        await stop_task(self._task)

    async def run_once(self) -> int:
        """One round; returns how many refunds the gateway accepted."""
        await self._expire_lapsed_sessions()
        return await self._refund_due()

    async def _expire_lapsed_sessions(self) -> None:
        for session in await lapsed_sessions(self._db, REFUNDS_PER_ROUND_MAX):
            try:
                async with asyncio.timeout(GATEWAY_TIMEOUT_S):
                    await self._provider.expire_checkout(session["session_id"])
            except (GatewayError, TimeoutError, aiohttp.ClientError, OSError) as error:
                log.warning("could not close session %s: %s", session["session_id"], error)
                continue
            await mark_session_expired(self._db, session["order_id"])

    async def _refund_due(self) -> int:
        accepted = 0
        for row in await claim_due_refunds(self._db, REFUNDS_PER_ROUND_MAX):
            order_id = row["order_id"]
            try:
                async with asyncio.timeout(GATEWAY_TIMEOUT_S):
                    await self._provider.refund(order_id, row["payment_id"],
                                                row["refund_amount_minor"],
                                                row["currency"].strip(), refund_key(order_id))
            except (GatewayError, TimeoutError, aiohttp.ClientError, OSError) as error:
                retry_in_s = min(BACKOFF_MAX_S, 2.0 ** row["attempts"])
                log.warning("refund of order %s failed (%s); retrying in %.0f s", order_id,
                            error, retry_in_s)
                await refund_failed(self._db, order_id, repr(error), retry_in_s)
                continue
            await refund_accepted(self._db, order_id)
            accepted += 1
        return accepted

