"""`flashsale serve`: the database, Ray, the front ends, and a clean stop on SIGINT/SIGTERM."""

import asyncio
import datetime as dt
import fcntl
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import IO

import asyncpg
import ray
import uvloop
from aiohttp import web

from flashsale.actors.product import Policy
from flashsale.actors.product_actor import ActorConfig
from flashsale.actors.registry import NAMESPACE, configure_ray
from flashsale.config import ConfigError, Settings, stored_secret
from flashsale.http.app import create_app, own_ray_node_alive, settle_collector
from flashsale.http.auth import password_problem
from flashsale.http.engine import Engine, start_engine
from flashsale.payments.provider import PaymentProvider
from flashsale.payments.razorpay_gateway import RazorpayGateway
from flashsale.payments.sandbox import SandboxGateway
from flashsale.payments.stripe_gateway import StripeGateway
from flashsale.persistence.database import open_database
from flashsale.persistence.embedded import EmbeddedPostgres, StartFailed
from flashsale.persistence.products import insert_product
from flashsale.persistence.users import create_user, ensure_admin
from flashsale.tasks import Outage, repeat, stop_task

log = logging.getLogger(__name__)

DEMO_ADMIN_EMAIL = "admin@flashsale.example"
DATABASE_WATCH_S = 1.0
RAY_WATCH_S = 2.0
FRONT_END_WATCH_S = 1.0  # also the pace at which a front end that keeps failing is restarted
FRONT_END_STOP_S = 10.0
RAY_CONNECT_TIMEOUT_S = 5.0


def _check_reachable(ray_address: str) -> None:
    """ray.init retries a cluster it cannot reach for minutes, deaf to SIGTERM meanwhile. A
    cluster's GCS address (host:port) is tried first, so a wrong RAY_ADDRESS is one line."""
    host, _, port = ray_address.rpartition(":")
    if "://" in ray_address or not port.isdigit():
        return  # "auto", or a Ray Client address: left to ray.init
    try:
        socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(f"cannot reach the Ray cluster at {ray_address}: {error}") from None


def start_ray(address: str | None) -> None:
    """Started off the main thread on purpose: on it, ray.init installs a SIGTERM handler that
    exits at once, racing ours (which stops the server cleanly). Ray notes that;
    `configure_ray` drops the note."""
    if address:
        _check_reachable(address)
    configure_ray()
    if not sys.stdout.isatty():  # the actors' log lines, printed here, go to a file: no colours
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # "local" always starts a new instance: never join a Ray that happens to run here.
    ray.init(address=address or "local", namespace=NAMESPACE, include_dashboard=False,
             logging_level=logging.WARNING)


def _stop_on_signals(*signals: signal.Signals) -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    return stop


def payment_provider(settings: Settings) -> PaymentProvider:
    env = os.environ
    if settings.payment_provider == "stripe":
        return StripeGateway(env["STRIPE_API_KEY"], env["STRIPE_WEBHOOK_SECRET"],
                             env.get("FLASHSALE_STRIPE_API_BASE") or None)
    if settings.payment_provider == "razorpay":
        return RazorpayGateway(env["RAZORPAY_KEY_ID"], env["RAZORPAY_KEY_SECRET"],
                               env["RAZORPAY_WEBHOOK_SECRET"],
                               env.get("FLASHSALE_RAZORPAY_API_BASE") or None)
    secret = env.get("FLASHSALE_SANDBOX_WEBHOOK_SECRET") or stored_secret(
        settings.data_dir, "sandbox_webhook_secret")
    return SandboxGateway(secret, f"{settings.base_url}/webhooks/sandbox")


def _admin_from_env() -> tuple[str, str] | None:
    """FLASHSALE_ADMIN_EMAIL and FLASHSALE_ADMIN_PASSWORD, checked before anything starts."""
    email, password = (os.environ.get("FLASHSALE_ADMIN_EMAIL"),
                       os.environ.get("FLASHSALE_ADMIN_PASSWORD"))
    if not email and not password:
        return None
    if not email or not password:
        raise ConfigError("set both FLASHSALE_ADMIN_EMAIL and FLASHSALE_ADMIN_PASSWORD, or neither")
    if weakness := password_problem(password):  # the rule every shopper's password follows
        raise ConfigError(f"FLASHSALE_ADMIN_PASSWORD is too weak: {weakness}")
    return email, password


async def _seed_demo(engine: Engine, url: str) -> None:
    """A live sale, and an admin unless one exists, if the database has no sales yet."""
    if await engine.db.fetchval("SELECT count(*) FROM products"):
        print("flashsale: --demo: the database already has sales; nothing seeded", flush=True)
        return
    admin_line = "an admin exists already (FLASHSALE_ADMIN_EMAIL or earlier)"
    if not await engine.db.fetchval("SELECT count(*) FROM users WHERE is_admin"):
        password = secrets.token_urlsafe(9) + "-1"
        await create_user(engine.db, DEMO_ADMIN_EMAIL, await engine.passwords.hash(password),
                          "Demo admin", is_admin=True)
        admin_line = f"{DEMO_ADMIN_EMAIL} / {password}"
    now = dt.datetime.now(dt.UTC)
    row = await insert_product(engine.db, "Demo sneakers, limited run", 499_900, "INR", 100,
                               now - dt.timedelta(minutes=1), now + dt.timedelta(days=1), 2)
    await engine.catalogue.define(row)
    print(f"""
flashsale: demo seeded
  admin:    {admin_line}
  sale:     {row.id}  (100 units at 4999.00 INR, 2 per shopper, live for 24 h)

Try it:
  curl -s {url}/products/{row.id}
  curl -s -X POST {url}/auth/register -H 'Content-Type: application/json' \\
       -d '{{"email": "you@example.com", "password": "sale-day-1", "full_name": "You"}}'
  TOKEN=$(curl -s -X POST {url}/auth/login -H 'Content-Type: application/json' \\
       -d '{{"email": "you@example.com", "password": "sale-day-1"}}' \\
       | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -X POST {url}/orders -H "Authorization: Bearer $TOKEN" \\
       -H 'X-Idempotency-Key: my-first-order' -H 'Content-Type: application/json' \\
       -d '{{"product_id": "{row.id}", "quantity": 1}}'
  curl -s {url}/orders -H "Authorization: Bearer $TOKEN"

Open the order's payment_url in a browser to pay (or fail) on the sandbox checkout page.
""", flush=True)


async def _start_front_end(settings: Settings, dsn: str, *, shared_limits: bool,
                           upkeep: bool) -> tuple[Engine, web.AppRunner]:
    """A front end's engine and its HTTP application, not yet listening."""
    secret = os.environ.get("FLASHSALE_JWT_SECRET") or stored_secret(settings.data_dir,
                                                                     "jwt_secret")
    policy = Policy(hold_ttl_ms=settings.hold_ttl_s * 1000,
                    cancel_window_ms=settings.cancel_window_s * 1000)
    engine = await start_engine(dsn, ActorConfig(dsn, policy), secret, settings.bcrypt_rounds,
                                settings.base_url, payment_provider(settings),
                                settings.rate_limits, shared_limits=shared_limits,
                                upkeep=upkeep)
    runner = web.AppRunner(create_app(engine, settings.trusted_proxies), access_log=None)
    await runner.setup()
    settle_collector()
    return engine, runner


async def _listen(runner: web.AppRunner, settings: Settings, *, first: bool) -> None:
    """With several front ends each listens with SO_REUSEPORT and the kernel spreads the
    connections over them. That option would also let a second server share the port without
    a word, so the first front end checks the port is free as a plain bind would."""
    shared = settings.workers > 1
    try:
        if shared and first:
            family, kind, proto, _, address = socket.getaddrinfo(
                settings.host, settings.port, type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        await web.TCPSite(runner, settings.host, settings.port, reuse_port=shared).start()
    except OSError as error:
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: "
                          f"{error.strerror}") from None


def _run_other_front_end(settings: Settings, dsn: str, ray_address: str) -> None:
    """The entry of a spawned front-end process (`--workers N`)."""
    try:
        uvloop.run(_serve_other_front_end(settings, dsn, ray_address))
    except ConfigError as error:
        print(f"flashsale: front end {os.getpid()}: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


async def _serve_other_front_end(settings: Settings, dsn: str, ray_address: str) -> None:
    # Ctrl-C reaches the whole process group; the server stops its front ends itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = _stop_on_signals(signal.SIGTERM)
    _stop_once_orphaned(stop)
    await asyncio.to_thread(start_ray, ray_address)
    try:
        engine, runner = await _start_front_end(settings, dsn, shared_limits=True,
                                                upkeep=False)
        try:
            await _listen(runner, settings, first=False)
            print(f"flashsale: front end {os.getpid()} ready", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()
            await engine.stop()
    finally:
        ray.shutdown()


def _stop_once_orphaned(stop: asyncio.Event) -> None:
    """A front end whose server died without stopping it (`kill -9`, the OOM killer) would go on
    holding the port, answering 503 without Ray, and keep the next server from listening. The
    server's end of the pipe it spawned this process through closes when the server dies."""
    server = multiprocessing.parent_process()
    assert server is not None and server.sentinel is not None
    loop = asyncio.get_running_loop()

    def orphaned() -> None:
        loop.remove_reader(server.sentinel)
        print(f"flashsale: front end {os.getpid()}: its server is gone; stopping", flush=True)
        stop.set()

    loop.add_reader(server.sentinel, orphaned)


class OtherFrontEnds:
    """The front ends `--workers N` runs besides the server's own, each a process of its own on
    the same port. One that dies is started again; they stop with the server."""

    def __init__(self, count: int, settings: Settings, dsn: str, ray_address: str) -> None:
        self._spawn = multiprocessing.get_context("spawn")
        self._args = (settings, dsn, ray_address)
        self._processes = [self._start() for _ in range(count)]
        self._watch = asyncio.get_running_loop().create_task(self._keep_up())

    def _start(self) -> multiprocessing.process.BaseProcess:
        process = self._spawn.Process(target=_run_other_front_end, args=self._args,
                                      name="flashsale-front-end")
        process.start()
        return process

    async def _keep_up(self) -> None:
        while True:
            await asyncio.sleep(FRONT_END_WATCH_S)
            for i, process in enumerate(self._processes):
                if process.exitcode is not None:
                    print(f"flashsale: front end {process.pid} exited ({process.exitcode}); "
                          "starting another", flush=True)
                    self._processes[i] = self._start()

    async def stop(self) -> None:
        await stop_task(self._watch)
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            await asyncio.to_thread(process.join, FRONT_END_STOP_S)
            if process.exitcode is None:
                process.kill()


def _keep_embedded_database(embedded: EmbeddedPostgres) -> "asyncio.Task[None]":
    """The server owns its embedded database, as it owns its front ends: one whose postmaster
    died is started again. Every route answers 503 meanwhile."""
    async def start_again_if_dead() -> None:
        if await asyncio.to_thread(embedded.start_again_if_dead):
            print("flashsale: the embedded PostgreSQL had stopped; started it again", flush=True)

    # Its old backends may hold its shared memory for a moment, or its disk may be full: then a
    # start fails, and the next round tries again.
    outage = Outage(log, "starting the embedded PostgreSQL again", "retrying", (StartFailed,))
    return asyncio.get_running_loop().create_task(
        repeat(start_again_if_dead, DATABASE_WATCH_S, outage))


def _ray_node_alive() -> bool:
    try:
        return own_ray_node_alive()
    except ray.exceptions.RayError:
        return False


async def _stop_once_ray_dies(stop: asyncio.Event) -> None:
    """A Ray instance of the server's own that died (its raylet killed, or out of memory) is not
    started again in place: every actor, and every handle to one, died with it. The server
    stops instead, with a status on which a supervisor starts it again, and the new start
    recovers every sale from its log. Ray marks its node dead about 20 s after the raylet."""
    while True:
        await asyncio.sleep(RAY_WATCH_S)
        if not await asyncio.to_thread(_ray_node_alive):
            break
    print("flashsale: its Ray instance died; stopping", flush=True)
    stop.set()


def _claim_data_dir(data_dir: Path) -> IO[str]:
    """A second server on the same data dir would run a Ray instance of its own, whose actors
    wait for the first server's to end before they serve: every order of it would be a 503. The
    claim is held as long as the returned file stays open (the kernel drops it with the process,
    also after kill -9)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        claim = (data_dir / "server.pid").open("a+")
    except OSError as error:
        raise ConfigError(f"cannot use the data dir {data_dir}: {error.strerror}") from None
    try:
        fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        claim.seek(0)
        holder = claim.read().strip() or "?"
        claim.close()
        raise ConfigError(f"another server (pid {holder}) serves from {data_dir.resolve()}: "
                          "stop it, or give this one a --data-dir of its own") from None
    claim.truncate(0)
    claim.write(f"{os.getpid()}\n")
    claim.flush()
    return claim


async def serve(settings: Settings, demo: bool) -> int:
    """Serves until SIGINT or SIGTERM (exit status 0), or until its own Ray instance dies (1)."""
    admin = _admin_from_env()
    claim = _claim_data_dir(settings.data_dir)
    stop = _stop_on_signals(signal.SIGINT, signal.SIGTERM)
    database = await open_database(settings)
    where = f"embedded, data in {database.embedded.pgdata}" if database.embedded else "external"
    print(f"flashsale: PostgreSQL ready ({where})", flush=True)
    watch = _keep_embedded_database(database.embedded) if database.embedded else None
    ray_watch = None
    try:
        await asyncio.to_thread(start_ray, settings.ray_address)
        print(f"flashsale: Ray ready ({settings.ray_address or 'local instance'})", flush=True)
        engine, runner = await _start_front_end(settings, database.dsn,
                                                shared_limits=settings.workers > 1,
                                                upkeep=True)
        others = None
        try:
            if admin is not None:
                email, password = admin
                await ensure_admin(engine.db, email, await engine.passwords.hash(password))
            await _listen(runner, settings, first=True)
            url = f"http://{settings.host}:{settings.port}"
            if demo:
                await _seed_demo(engine, url)
            if settings.workers > 1:
                others = OtherFrontEnds(settings.workers - 1, settings, database.dsn,
                                        settings.ray_address
                                        or ray.get_runtime_context().gcs_address)
            fronts = f" with {settings.workers} front ends" if settings.workers > 1 else ""
            print(f"flashsale: listening on {url}{fronts} (Ctrl-C to stop)", flush=True)
            if settings.ray_address is None:
                ray_watch = asyncio.get_running_loop().create_task(_stop_once_ray_dies(stop))
            await stop.wait()
        finally:
            if others is not None:
                await others.stop()
            await runner.cleanup()
            await engine.stop()
    except (OSError, asyncpg.PostgresError) as error:
        raise ConfigError(f"stopped: {error}") from None
    finally:
        ray_died = ray_watch is not None and ray_watch.done()
        await stop_task(ray_watch)
        await stop_task(watch)
        if ray.is_initialized():
            ray.shutdown()
        database.close()
        print("flashsale: stopped", flush=True)
        claim.close()
    return 1 if ray_died else 0
