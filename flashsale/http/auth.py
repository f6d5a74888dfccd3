"""Passwords (bcrypt, off the event loop), access tokens (HS256 JWT) and who is calling."""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import bcrypt
import jwt
from aiohttp import web

from flashsale.http.problems import ApiError
from flashsale.persistence.database import DATABASE_DOWN
from flashsale.persistence.users import deactivated_user_ids
from flashsale.tasks import Outage, repeat, stop_task

log = logging.getLogger(__name__)

ACCESS_TTL_S = 3600
PAYMENT_LINK_AUDIENCE = "pay"
BCRYPT_THREADS = 2
PASSWORD_BYTES_MIN, PASSWORD_BYTES_MAX = 8, 72  # bcrypt ignores bytes past 72
DEACTIVATED_REFRESH_S = 30.0
VERIFIED_TOKENS_MAX = 50_000  # about 22 MB, the tokens included
_BEARER = {"WWW-Authenticate": "Bearer"}


def password_problem(password: str) -> str | None:
    size = len(password.encode())
    if not PASSWORD_BYTES_MIN <= size <= PASSWORD_BYTES_MAX:
        return f"the password must be {PASSWORD_BYTES_MIN} to {PASSWORD_BYTES_MAX} bytes long"
    if not any(c.isdigit() for c in password):
        return "the password needs a digit"
    if all(c.isalnum() or c.isspace() for c in password):
        return "the password needs a special character"
    return None


class Passwords:
    """bcrypt in a small, bounded thread pool: hashing never blocks the event loop."""

    def __init__(self, rounds: int) -> None:
        self._rounds = rounds
        self._pool = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="bcrypt")
        self._decoy: bytes | None = None

    async def hash(self, password: str) -> str:
        salt = bcrypt.gensalt(self._rounds)
        hashed = await self._run(bcrypt.hashpw, password.encode(), salt)
        return hashed.decode()

    async def verify(self, password: str, hashed: str | None) -> bool:
        """False for a wrong password or no account; both take one bcrypt check."""
        candidate = password.encode()
        if len(candidate) > PASSWORD_BYTES_MAX:
            return False
        if hashed is None:
            if self._decoy is None:
                self._decoy = await self._run(bcrypt.hashpw, b"decoy", bcrypt.gensalt(self._rounds))
            await self._run(bcrypt.checkpw, candidate, self._decoy)
            return False
        return bool(await self._run(bcrypt.checkpw, candidate, hashed.encode()))

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class Tokens:
    def __init__(self, secret: str) -> None:
        self._secret = secret
        # Access tokens verified before, with their user and expiry, oldest first. Verifying a
        # token with PyJWT takes about a quarter of a request's time in the front end, and a
        # shopper sends the same token with every request, pressing Buy again included.
        self._verified: dict[str, tuple[str, int]] = {}

    def access_token(self, user_id: str) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "iat": now, "exp": now + ACCESS_TTL_S}
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def user_of(self, token: str) -> str:
        verified = self._verified.get(token)
        if verified is not None and time.time() < verified[1]:
            return verified[0]
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"],
                                options={"require": ["exp", "iat", "sub"]})
        except jwt.PyJWTError as error:
            raise ApiError("invalid_token", str(error), _BEARER) from None
        if len(self._verified) >= VERIFIED_TOKENS_MAX:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (claims["sub"], claims["exp"])
        return claims["sub"]

    def payment_link_token(self, order_id: str, expires_at_s: int) -> str:
        claims = {"sub": order_id, "aud": PAYMENT_LINK_AUDIENCE, "exp": expires_at_s}
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def check_payment_link(self, token: str, order_id: str) -> bool:
        """The link was signed by us, for this order; returns whether its hold is still on. A
        lapsed link may still show how its order ended, which its holder may know anyway."""
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"],
                                audience=PAYMENT_LINK_AUDIENCE,
                                options={"require": ["exp", "sub", "aud"], "verify_exp": False})
        except jwt.PyJWTError as error:
            raise ApiError("invalid_token", f"payment link: {error}") from None
        if claims["sub"] != order_id:
            raise ApiError("invalid_token", "the payment link is for another order")
        return bool(time.time() < claims["exp"])


class DeactivatedUsers:
    """Ids of deactivated users, reloaded every few seconds, so authenticating a request costs
    no database round trip and a deactivation takes effect within DEACTIVATED_REFRESH_S."""

    def __init__(self, db: asyncpg.Pool, refresh_s: float = DEACTIVATED_REFRESH_S) -> None:
        self._db = db
        self._refresh_s = refresh_s
        self.ids: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._refresh()
        outage = Outage(log, "deactivated users refresh", "deactivations wait", DATABASE_DOWN)
        self._task = asyncio.get_running_loop().create_task(
            repeat(self._refresh, self._refresh_s, outage))

    async def _refresh(self) -> None:
        self.ids = await deactivated_user_ids(self._db)

    async def stop(self) -> None:
        await stop_task(self._task)


def bearer_user(request: web.Request, tokens: Tokens, deactivated: DeactivatedUsers) -> str:
    """The calling user's id from `Authorization: Bearer …`; 401 otherwise."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError("invalid_token", "an Authorization: Bearer token is required", _BEARER)
    if not token.isascii():  # a JWT is ASCII; aiohttp passes other bytes on as surrogates
        raise ApiError("invalid_token", "the token is malformed", _BEARER)
    user_id = tokens.user_of(token.strip())
    if user_id in deactivated.ids:
        raise ApiError("invalid_token", "the account is deactivated", _BEARER)
    return user_id
