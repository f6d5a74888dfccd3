"""Helpers for tests that talk to a real engine over HTTP or to its product actors."""

import asyncio
import datetime as dt
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from multidict import CIMultiDictProxy
from ray.actor import ActorHandle

from flashsale.actors.product import ProductState
from flashsale.http.engine import Engine
from flashsale.persistence.replay import ProductReport, decode_state, reports
from flashsale.persistence.users import ensure_admin

JWT_SECRET = "test-secret-that-is-long-enough-for-hs256-keys"
SANDBOX_SECRET = "sandbox-webhook-secret-for-tests"
HOLD_TTL_MS = 600_000
CANCEL_WINDOW_MS = 2_000

# The `products` fixture: makes a product actor on the test's database, returns its id and handle.
ProductFactory = Callable[..., Awaitable[tuple[str, ActorHandle]]]


class Api:
    """A client of a real engine on a loopback port, with helpers for the usual set-up."""

    def __init__(self, session: aiohttp.ClientSession, engine: Engine) -> None:
        self.session = session
        self.engine = engine
        self._emails = itertools.count()

    async def call(self, method: str, path: str, token: str | None = None,
                   body: object = None, headers: dict[str, str] | None = None,
                   ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, path, json=body, headers=all_headers) as reply:
            if reply.content_type not in ("application/json", "application/problem+json"):
                raise AssertionError(f"{method} {path}: {reply.status} {reply.content_type}")
            return reply.status, await reply.json(content_type=None), reply.headers

    async def register(self, password: str = "sale-day-1") -> tuple[str, str]:
        """A new shopper; returns (email, access token)."""
        email = f"shopper{next(self._emails)}-{uuid.uuid4().hex[:6]}@example.com"
        status, body, _ = await self.call("POST", "/auth/register", body={
            "email": email, "password": password, "full_name": "Test Shopper"})
        assert status == 201, body
        status, body, _ = await self.call("POST", "/auth/login",
                                          body={"email": email, "password": password})
        assert status == 200, body
        return email, body["access_token"]

    async def admin(self) -> str:
        email = f"admin-{uuid.uuid4().hex[:8]}@example.com"
        await ensure_admin(self.engine.db, email, await self.engine.passwords.hash("admin-pass-1"))
        status, body, _ = await self.call("POST", "/auth/login",
                                          body={"email": email, "password": "admin-pass-1"})
        assert status == 200, body
        return body["access_token"]

    async def sale(self, stock: int = 10, limit: int = 1, starts_in_s: float = -60,
                   lasts_s: float = 3600, currency: str = "INR", price: int = 49_900) -> str:
        start = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=starts_in_s)
        status, body, _ = await self.call("POST", "/products", await self.admin(), {
            "name": "Test sale", "price": price, "currency": currency, "stock": stock,
            "per_user_limit": limit,
            "sale_starts_at": start.isoformat(),
            "sale_ends_at": (start + dt.timedelta(seconds=lasts_s)).isoformat()})
        assert status == 201, body
        return body["id"]

    async def order(self, token: str, product_id: str, quantity: int = 1,
                    key: str | None = None) -> tuple[int, Any]:
        status, body, _ = await self.call(
            "POST", "/orders", token, {"product_id": product_id, "quantity": quantity},
            {"X-Idempotency-Key": key or str(uuid.uuid4())})
        return status, body


def link_path(payment_url: str) -> str:
    """A payment link's path and token, to open on the test server."""
    return "/" + payment_url.split("127.0.0.1", 1)[1].split("/", 1)[1]


# Below Linux's ephemeral range (32768 and up) and above Ray's worker ports (10002-19999). A
# port the kernel hands out (bind to port 0) may be handed to a Ray process too: `flashsale serve`
# starts Ray before it listens, and Ray picks its own ports the same way.
_TEST_PORTS = range(20_000, 32_000)


def free_port() -> int:
    while True:
        port = random.choice(_TEST_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


async def live_state(actor: ActorHandle) -> ProductState:
    return decode_state(await actor.snapshot.remote())


def replay_cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`flashsale replay` on a database, as an operator runs it."""
    env = {**os.environ, "FLASHSALE_DATABASE_URL": dsn}
    return subprocess.run([sys.executable, "-m", "flashsale.cli", "replay", *args], env=env,
                          capture_output=True, text=True, timeout=60)


async def session_waiting_for_a_lock(conn: asyncpg.Connection, timeout_s: float = 10) -> int:
    """The pid of the session that waits for a lock in `conn`'s database, once one does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await conn.execute("SELECT pg_stat_clear_snapshot()")  # else a transaction sees no change
        pid = await conn.fetchval("SELECT pid FROM pg_stat_activity WHERE wait_event_type = "
                                  "'Lock' AND datname = current_database()")
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.02)
    raise AssertionError("no session waited for a lock")


async def verified(conn: asyncpg.Connection, product_id: str) -> ProductReport:
    """What `flashsale replay --verify` reports of one product."""
    [report] = [report async for report in reports(conn, [product_id], verify=True)]
    return report


async def forgotten(actor: ActorHandle, order_id: str, timeout_s: float = 15) -> ProductState:
    """The actor's state once it has forgotten the order (it forgets settled ones)."""
    deadline = time.monotonic() + timeout_s
    while (state := await live_state(actor)).orders.get(order_id) is not None:
        assert time.monotonic() < deadline, f"order {order_id} was never forgotten"
        await asyncio.sleep(0.1)
    return state


async def drop_sessions(dsn: str) -> int:
    """End every other session of the database `dsn` names, as a server or a network would;
    returns how many there were."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    finally:
        await conn.close()


async def set_database_default(dsn: str, setting: str, value: str) -> None:
    """Give the database `dsn` names a default for `setting`, as its operator may have: its
    sessions from now on start with it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"ALTER DATABASE {await conn.fetchval('SELECT current_database()')} "
                           f"SET {setting} = '{value}'")
    finally:
        await conn.close()


ADMIN = {"email": "ops@example.com", "password": "ops-pass-1"}


class Server:
    """`flashsale serve` as a user runs it: a process of its own, on its own data dir."""

    def __init__(self, data_dir: Path, port: int, *args: str,
                 env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "FLASHSALE_ADMIN_EMAIL": ADMIN["email"],
               "FLASHSALE_ADMIN_PASSWORD": ADMIN["password"], "FLASHSALE_BCRYPT_ROUNDS": "4",
               **(env or {})}
        env.pop("FLASHSALE_DATABASE_URL", None)
        env.pop("RAY_ADDRESS", None)
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flashsale.cli", "serve", "--port", str(port),
             "--data-dir", str(data_dir), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self.wait_for("listening on")

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The next line of output that matches `pattern`."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError("the server exited:\n" + "".join(self.output))

    def call(self, method: str, path: str, body: object = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {token}"}
                                                     if token else {}), **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def login(self, email: str, password: str) -> str:
        status, body = self.call("POST", "/auth/login", {"email": email, "password": password})
        assert status == 200, body
        return str(body["access_token"])

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        rest, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, "".join(self.output) + rest
        return "".join(self.output) + rest
