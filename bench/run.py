"""`python -m bench run`: the engine and the classic baseline under the same crowd, one after the
other, on the same machine, each audited afterwards."""

import asyncio
import datetime as dt
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import aiohttp
import asyncpg
import ray
import uvloop

from bench.audit import Verdict, gather_facts, judge, tally
from bench.baseline.server import schema
from bench.load import LoadResult, Shopper, fire
from bench.report import Side, write_report
from bench.scenarios import Scenario, build
from flashsale.actors.registry import NAMESPACE, actor_name, configure_ray
from flashsale.http.auth import Tokens
from flashsale.payments.provider import EventKind
from flashsale.payments.sandbox import SIGNATURE_HEADER, SandboxGateway
from flashsale.persistence.embedded import EmbeddedPostgres

ADMIN = {"email": "bench-admin@example.com", "password": "bench-admin-1"}
PRICE_MINOR = 49_900
SALES_CREATED_AT_ONCE = 10
START_TIMEOUT_S = 120
CACHE_SETTLE_S = 1.2  # engine product reads lag the actors by at most a second
CRASH_AFTER_FRACTION = 0.3
# What `--url` needs from the environment: the running engine's JWT key, so that the crowd's
# tokens are its own, and its admin, to create the sales.
RUNNING_ENGINE_SETTINGS = ("FLASHSALE_JWT_SECRET", "FLASHSALE_ADMIN_EMAIL",
                           "FLASHSALE_ADMIN_PASSWORD")
FLOW_HOLD_TTL_S = {True: 8, False: 30}  # quick, full: long enough to pay before holds lapse


class Params(NamedTuple):
    scenario: str
    shoppers: int
    stock: int
    connections: int
    rate: float | None
    quick: bool
    out: Path
    duration_s: float | None = None
    url: str | None = None  # a running engine to target instead of starting one


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A server we start, wait for, and stop with SIGTERM."""

    def __init__(self, command: list[str], env: dict[str, str], ready_text: str,
                 log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in self.process.stdout:
            self._log.write(line)
            if ready_text in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError(f"{command[0]} exited; see {log_path}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        rest, _ = self.process.communicate(timeout=60)
        self._log.write(rest)
        self._log.close()


def progress(label: str, total: int) -> Callable[[LoadResult], None]:
    last = [0]

    def show(result: LoadResult) -> None:
        done = result.answered
        say(f"  {label}: {done:,}/{total:,} answered ({done - last[0]:,}/s), "
            f"{len(result.created):,} orders")
        last[0] = done

    return show


class Target(NamedTuple):
    label: str
    url: str
    product_ids: list[str]
    crash: Callable[[], Awaitable[None]] | None


async def drive(target: Target, scenario: Scenario, params: Params,
                tokens: Tokens) -> tuple[list[Shopper], LoadResult]:
    users = [str(uuid.uuid4()) for _ in scenario.shopper_products]
    shoppers = [Shopper(tokens.access_token(user), target.product_ids[product], str(uuid.uuid4()))
                for user, product in zip(users, scenario.shopper_products, strict=True)]
    say(f"{target.label}: {len(shoppers):,} shoppers over {params.connections} connections")
    result = LoadResult()
    run = fire(target.url, shoppers, params.connections, params.rate, params.duration_s,
               retry_unavailable=scenario.crash, progress=progress(target.label, len(shoppers)),
               result=result)
    if target.crash is None:
        await run
    else:
        async def crash_when_busy() -> None:
            # Part way through the shoppers, or through the time given, whichever comes first.
            crash_at = time.perf_counter() + CRASH_AFTER_FRACTION * (params.duration_s or math.inf)
            while (result.answered < len(shoppers) * CRASH_AFTER_FRACTION
                   and time.perf_counter() < crash_at):
                await asyncio.sleep(0.005)
            assert target.crash is not None
            await target.crash()
            result.crashed_at = time.perf_counter()

        await asyncio.gather(run, crash_when_busy())
    return shoppers, result


async def audit(target: Target, scenario: Scenario, shoppers: list[Shopper],
                load: LoadResult, paid: set[str] | None = None) -> Verdict:
    """With `paid` (flow), only the paid orders may hold units: the others must have expired."""
    await asyncio.sleep(CACHE_SETTLE_S)
    expected = None if paid is None else {
        c.order_id: "confirmed" if c.order_id in paid else "expired" for c in load.created}
    counts, unreadable = await gather_facts(target.url, target.product_ids, shoppers, load,
                                            expected)
    kept = load if paid is None else load.only(paid)
    per_product, per_user = tally(shoppers, kept)
    stocks = dict(zip(target.product_ids, scenario.stocks, strict=True))
    return judge(stocks, counts, per_product, per_user, scenario.per_user_limit, unreadable,
                 load.errors_5xx, allow_5xx=scenario.crash)


def replay_problems(dsn: str, env: dict[str, str]) -> list[str]:
    """The engine's own WAL must agree: `flashsale replay --verify`."""
    checked = subprocess.run([sys.executable, "-m", "flashsale.cli", "replay", "--verify",
                              "--json"], env={**env, "FLASHSALE_DATABASE_URL": dsn},
                             capture_output=True, text=True, timeout=600)
    if checked.returncode != 0:
        return [f"replay --verify failed: {checked.stderr.strip()[-500:]}"]
    return []


async def running_engine_side(params: Params, scenario: Scenario, env: dict[str, str],
                              tokens: Tokens) -> Side:
    """`--url`: an engine someone else started, audited through its API only."""
    assert params.url is not None
    url = params.url.rstrip("/")
    admin = {"email": env["FLASHSALE_ADMIN_EMAIL"], "password": env["FLASHSALE_ADMIN_PASSWORD"]}
    target = Target("engine", url, await create_engine_products(url, scenario, admin), None)
    shoppers, load = await drive(target, scenario, params, tokens)
    return Side(load, await audit(target, scenario, shoppers, load))


async def engine_side(params: Params, scenario: Scenario, dsn: str, env: dict[str, str],
                      tokens: Tokens, workdir: Path) -> Side:
    port = free_port()
    if scenario.pay_fraction:
        env = {**env, "FLASHSALE_HOLD_TTL_S": str(FLOW_HOLD_TTL_S[params.quick])}
    engine = Process([sys.executable, "-m", "flashsale.cli", "serve", "--port", str(port)],
                     {**env, "FLASHSALE_DATABASE_URL": dsn,
                      "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
                     "listening on", workdir / "engine.log")
    url = f"http://127.0.0.1:{port}"
    product_ids: list[str] = []
    try:
        product_ids = await create_engine_products(url, scenario, ADMIN)

        async def kill_hot_actor() -> None:
            actor = ray.get_actor(actor_name(product_ids[0]), namespace=NAMESPACE)
            pid = await actor.pid.remote()
            os.kill(pid, signal.SIGKILL)
            say(f"  engine: kill -9 of product {product_ids[0]}'s actor (pid {pid})")

        target = Target("engine", url, product_ids, kill_hot_actor if scenario.crash else None)
        shoppers, load = await drive(target, scenario, params, tokens)
        paid = None
        if scenario.pay_fraction:
            paid = await pay_and_let_expire(url, scenario, load, env, product_ids)
        verdict = await audit(target, scenario, shoppers, load, paid)
    finally:
        engine.stop()
        # Idle actors still cost CPU (~0.5% each here): the baseline must not run beside them.
        for product_id in product_ids:
            ray.kill(ray.get_actor(actor_name(product_id), namespace=NAMESPACE))
    verdict.problems += replay_problems(dsn, env)
    verdict.ok = not verdict.problems
    return Side(load, verdict)


async def pay_and_let_expire(url: str, scenario: Scenario, load: LoadResult,
                             env: dict[str, str], product_ids: list[str]) -> set[str]:
    """Pay a share of the orders through signed sandbox webhooks, as the checkout page's Pay
    button does, then wait until every other hold has lapsed and its units are back."""
    gateway = SandboxGateway(env["FLASHSALE_SANDBOX_WEBHOOK_SECRET"], f"{url}/webhooks/sandbox")
    to_pay = load.created[: int(len(load.created) * scenario.pay_fraction)]
    say(f"  engine: paying {len(to_pay):,} of {len(load.created):,} orders, the rest expire")
    async with aiohttp.ClientSession() as session:
        for created in to_pay:
            body = gateway.event(EventKind.CAPTURED, created.order_id,
                                 f"pay_{created.order_id[-12:]}", PRICE_MINOR, "INR")
            async with session.post(gateway.webhook_url, data=body, headers={
                SIGNATURE_HEADER: gateway.sign(body), "Content-Type": "application/json",
            }) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"the engine refused a payment: {await reply.text()}")
        deadline = time.monotonic() + FLOW_HOLD_TTL_S[False] + 30
        while time.monotonic() < deadline:
            reserved = 0
            for product_id in product_ids:
                async with session.get(f"{url}/products/{product_id}") as reply:
                    reserved += (await reply.json())["reserved"]
            if reserved == 0:
                break
            await asyncio.sleep(0.5)
    say("  engine: every unpaid hold has lapsed")
    return {created.order_id for created in to_pay}


async def create_engine_products(url: str, scenario: Scenario,
                                 admin: dict[str, str]) -> list[str]:
    now = dt.datetime.now(dt.UTC)
    gate = asyncio.Semaphore(SALES_CREATED_AT_ONCE)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/auth/login", json=admin) as reply:
            body = await reply.json()
            if reply.status != 200:
                raise RuntimeError(f"the engine refused the admin's login: {body}")
            token = body["access_token"]

        async def create(number: int, stock: int) -> str:
            async with gate, session.post(f"{url}/products", headers={
                "Authorization": f"Bearer {token}"}, json={
                "name": f"{scenario.name} sale {number}", "price": PRICE_MINOR, "stock": stock,
                "per_user_limit": scenario.per_user_limit,
                "sale_starts_at": (now - dt.timedelta(minutes=1)).isoformat(),
                "sale_ends_at": (now + dt.timedelta(hours=2)).isoformat()}) as reply:
                body = await reply.json()
                if reply.status != 201:
                    raise RuntimeError(f"the engine refused a sale: {body}")
                return str(body["id"])

        ids = await asyncio.gather(*(create(n, stock) for n, stock in enumerate(scenario.stocks)))
    say(f"engine: {len(ids)} sale(s) live")
    return list(ids)


async def baseline_side(params: Params, scenario: Scenario, dsn: str, env: dict[str, str],
                        tokens: Tokens, workdir: Path) -> Side:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(schema())
        product_ids = [str(uuid.uuid4()) for _ in scenario.stocks]
        await conn.executemany(
            "INSERT INTO products (id, price_minor, currency, stock, available, sale_starts_at, "
            "sale_ends_at, per_user_limit) VALUES ($1, 49900, 'INR', $2, $2, "
            "now() - interval '1 minute', now() + interval '2 hours', $3)",
            [(pid, stock, scenario.per_user_limit)
             for pid, stock in zip(product_ids, scenario.stocks, strict=True)])
    finally:
        await conn.close()
    port = free_port()
    server = Process([sys.executable, "-m", "bench.baseline", "--dsn", dsn, "--port", str(port)],
                     env, "listening on", workdir / "baseline.log")
    try:
        target = Target("baseline", f"http://127.0.0.1:{port}", product_ids, None)
        shoppers, load = await drive(target, scenario, params, tokens)
        verdict = await audit(target, scenario, shoppers, load)
    finally:
        server.stop()
    return Side(load, verdict)


async def measure(params: Params, server: EmbeddedPostgres, workdir: Path) -> dict[str, Side]:
    scenario = build(params.scenario, params.shoppers, params.stock, params.quick)
    settings = {"FLASHSALE_JWT_SECRET": secrets.token_urlsafe(48), "FLASHSALE_BCRYPT_ROUNDS": "4",
                "FLASHSALE_RATE_LIMITS": "off",  # the crowd comes from one address
                "FLASHSALE_SANDBOX_WEBHOOK_SECRET": secrets.token_urlsafe(32),
                "FLASHSALE_ADMIN_EMAIL": ADMIN["email"],
                "FLASHSALE_ADMIN_PASSWORD": ADMIN["password"]}
    if params.url is not None:  # the running engine's own: its shoppers' tokens, its admin
        settings |= {name: os.environ[name] for name in RUNNING_ENGINE_SETTINGS}
    env = {**os.environ, **settings}
    admin = await asyncpg.connect(server.dsn())
    try:
        for name in ("engine", "baseline"):
            await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    tokens = Tokens(env["FLASHSALE_JWT_SECRET"])
    engine = (await running_engine_side(params, scenario, env, tokens) if params.url else
              await engine_side(params, scenario, server.dsn("engine"), env, tokens, workdir))
    baseline = await baseline_side(params, scenario, server.dsn("baseline"), env, tokens, workdir)
    return {"engine": engine, "baseline": baseline}


def run_bench(params: Params) -> dict[str, object]:
    """`params.out` exists: `python -m bench` makes it before anything is measured."""
    with tempfile.TemporaryDirectory(prefix="bench-run-", dir=params.out) as scratch:
        workdir = Path(scratch)
        server = EmbeddedPostgres(workdir).start()
        if params.url is None:  # the engine we start joins the harness's own Ray instance
            os.environ.pop("RAY_ADDRESS", None)
            configure_ray()  # its actors then run as `flashsale serve` runs them
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     namespace=NAMESPACE)
        try:
            sides = uvloop.run(measure(params, server, workdir))
        finally:
            ray.shutdown()
            server.close()
            for log in ("engine.log", "baseline.log"):
                if (workdir / log).exists():
                    (workdir / log).replace(params.out / log)
    results = write_report(params, sides)
    say(f"wrote {params.out / 'results.json'} and plots; server logs in {params.out}")
    if not all(side.verdict.ok for side in sides.values()):
        say("AUDIT FAILED: " + json.dumps({k: s.verdict.problems for k, s in sides.items()}))
    return results
