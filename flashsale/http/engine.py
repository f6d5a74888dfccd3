"""What a front end holds: the database pool, the product router, the catalogue and auth."""

import asyncio
import logging

import asyncpg
import msgspec
from aiohttp import web

from flashsale.actors.batching import ProductRouter
from flashsale.actors.messages import Command, PlaceOrder, Rejection
from flashsale.actors.product_actor import ActorConfig
from flashsale.config import Limit
from flashsale.http.auth import (
    DEACTIVATED_REFRESH_S,
    DeactivatedUsers,
    Passwords,
    Tokens,
    bearer_user,
)
from flashsale.http.catalogue import Catalogue
from flashsale.http.problems import ApiError
from flashsale.http.ratelimit import SWEEP_INTERVAL_S, RateLimiter, SharedCounts
from flashsale.payments.provider import PaymentProvider
from flashsale.payments.worker import PaymentWorker
from flashsale.persistence.database import DATABASE_DOWN, create_pool
from flashsale.persistence.orders import claim_keys, drop_spent_claims, order_record
from flashsale.persistence.users import drop_spent_refresh_tokens
from flashsale.tasks import Outage, repeat, stop_task

log = logging.getLogger(__name__)

POOL_SIZE_MAX = 10
SPENT_SWEEP_S = 3600.0
# Soon after start, so that a server restarted more often than hourly still sweeps, but not in
# the start itself, which the first sweep of a large table would slow.
SPENT_FIRST_SWEEP_S = 60.0


class Engine:
    def __init__(self, db: asyncpg.Pool, actor_config: ActorConfig, jwt_secret: str,
                 bcrypt_rounds: int, base_url: str, payments: PaymentProvider,
                 rate_limits: dict[str, Limit] | None, *, shared_limits: bool = False,
                 upkeep: bool = True,
                 deactivated_refresh_s: float = DEACTIVATED_REFRESH_S) -> None:
        """`shared_limits`: other front ends serve the same clients, so rate limits are counted
        in the database. `upkeep`: this front end performs refunds, closes lapsed payment
        sessions and drops spent idempotency keys (one of several does)."""
        self.db = db
        self._upkeep = upkeep
        self._rounds: list[asyncio.Task[None]] = []  # background work of the engine's own
        self.limiter = (RateLimiter(rate_limits, SharedCounts(db) if shared_limits else None)
                        if rate_limits else None)
        self.payments = payments
        self.payment_worker = PaymentWorker(db, payments)
        self.router = ProductRouter(actor_config, screen=self._screen_keys)
        self.catalogue = Catalogue(db, self.router)
        self.passwords = Passwords(bcrypt_rounds)
        self.tokens = Tokens(jwt_secret)
        self.deactivated = DeactivatedUsers(db, deactivated_refresh_s)
        self.base_url = base_url.rstrip("/")

    def user(self, request: web.Request) -> str:
        return bearer_user(request, self.tokens, self.deactivated)

    async def limit(self, kind: str, key: str) -> None:
        """A 429 once `key` has spent its `kind` limit (no-op with limits off)."""
        if self.limiter is not None:
            await self.limiter.check((kind, key))

    async def admin(self, request: web.Request) -> str:
        user_id = self.user(request)
        if not await self.db.fetchval("SELECT is_admin FROM users WHERE id = $1", user_id):
            raise ApiError("forbidden", "only an admin may do this")
        return user_id

    def payment_url(self, order_id: str, expires_at_ms: int) -> str:
        token = self.tokens.payment_link_token(order_id, expires_at_ms // 1000)
        return f"{self.base_url}/pay/{order_id}?token={token}"

    async def _screen_keys(self, product_id: str,
                           commands: list[Command]) -> list[Command | Rejection]:
        """Idempotency keys are scoped to the user across products and kept longer than an actor
        remembers settled orders: one statement per batch claims the batch's keys for this
        product (see `claim_keys`). A key another product holds is refused; a key claimed here
        before sends its command with the claim's order id, and with the order if it was
        placed, for the actor to answer with if it has forgotten the order."""
        places = [(i, c) for i, c in enumerate(commands) if isinstance(c, PlaceOrder)]
        if not places:
            return list(commands)
        found = await claim_keys(self.db, product_id, [c.user_id for _, c in places],
                                 [c.idempotency_key for _, c in places],
                                 [c.order_id for _, c in places])
        screened: list[Command | Rejection] = list(commands)
        for position, claim in found.items():
            i, cmd = places[position]
            screened[i] = (
                Rejection.IDEMPOTENCY_KEY_REUSED if claim["claimed_for"] != product_id
                else msgspec.structs.replace(
                    cmd, order_id=claim["claimed_order"],
                    known=order_record(claim) if claim["id"] is not None else None))
        return screened

    async def start(self) -> None:
        await self.deactivated.start()
        await self.catalogue.start()
        if self._upkeep:
            self.payment_worker.start()
            outage = Outage(log, "sweep of spent keys and tokens", "they stay meanwhile",
                            DATABASE_DOWN)
            self._rounds.append(asyncio.get_running_loop().create_task(
                repeat(self._drop_spent, SPENT_SWEEP_S, outage,
                       first_after_s=SPENT_FIRST_SWEEP_S)))
        if self.limiter is not None:
            outage = Outage(log, "rate limit sweep", "ended windows stay meanwhile",
                            DATABASE_DOWN)
            self._rounds.append(asyncio.get_running_loop().create_task(
                repeat(self.limiter.sweep, SWEEP_INTERVAL_S, outage)))

    async def _drop_spent(self) -> None:
        await drop_spent_claims(self.db)
        await drop_spent_refresh_tokens(self.db)

    async def stop(self) -> None:
        for task in self._rounds:
            await stop_task(task)
        await self.payment_worker.stop()
        await self.payments.close()
        await self.catalogue.stop()
        await self.deactivated.stop()
        self.passwords.close()
        await self.db.close()


async def start_engine(dsn: str, actor_config: ActorConfig, jwt_secret: str, bcrypt_rounds: int,
                       base_url: str, payments: PaymentProvider,
                       rate_limits: dict[str, Limit] | None, *, shared_limits: bool = False,
                       upkeep: bool = True,
                       deactivated_refresh_s: float = DEACTIVATED_REFRESH_S) -> Engine:
    db = await create_pool(dsn, init_size=1, max_size=POOL_SIZE_MAX)
    engine = Engine(db, actor_config, jwt_secret, bcrypt_rounds, base_url, payments,
                    rate_limits, shared_limits=shared_limits, upkeep=upkeep,
                    deactivated_refresh_s=deactivated_refresh_s)
    await engine.start()
    return engine


ENGINE = web.AppKey("engine", Engine)
