"""`flashsale serve`: the database, Ray, the front end, and a clean stop on SIGINT/SIGTERM."""

import asyncio
import datetime as dt
import logging
import os
import secrets
import signal

import asyncpg
import ray
from aiohttp import web

from flashsale.actors.product import Policy
from flashsale.actors.product_actor import ActorConfig
from flashsale.actors.registry import NAMESPACE, configure_ray
from flashsale.config import ConfigError, Settings, stored_secret
from flashsale.http.app import create_app
from flashsale.http.engine import Engine, start_engine
from flashsale.payments.provider import PaymentProvider
from flashsale.payments.razorpay_gateway import RazorpayGateway
from flashsale.payments.sandbox import SandboxGateway
from flashsale.payments.stripe_gateway import StripeGateway
from flashsale.persistence.database import open_database
from flashsale.persistence.products import insert_product
from flashsale.persistence.users import create_user, ensure_admin

DEMO_ADMIN_EMAIL = "admin@flashsale.example"


class _DropRayNotices(logging.Filter):
    """Ray's start-up notices that are expected here and only alarm an operator."""

    NOTICES = ("SIGTERM handler is not set", "Token authentication is enabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self.NOTICES)


def start_ray(address: str | None) -> None:
    """Started off the main thread on purpose: on it, ray.init installs a SIGTERM handler that
    exits at once, racing ours (which stops the server cleanly). Ray notes that; we drop it."""
    for name in ("ray._private.worker",
                 "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).addFilter(_DropRayNotices())
    configure_ray()
    # "local" always starts a new instance: never join a Ray that happens to run here.
    ray.init(address=address or "local", namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
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


async def _bootstrap_admin(engine: Engine) -> None:
    email, password = (os.environ.get("FLASHSALE_ADMIN_EMAIL"),
                       os.environ.get("FLASHSALE_ADMIN_PASSWORD"))
    if email and password:
        await ensure_admin(engine.db, email, await engine.passwords.hash(password))
    elif email or password:
        raise ConfigError("set both FLASHSALE_ADMIN_EMAIL and FLASHSALE_ADMIN_PASSWORD, or neither")


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


async def serve(settings: Settings, demo: bool) -> None:
    stop = _stop_on_signals()
    database = await open_database(settings)
    where = f"embedded, data in {database.embedded.pgdata}" if database.embedded else "external"
    print(f"flashsale: PostgreSQL ready ({where})", flush=True)
    try:
        await asyncio.to_thread(start_ray, settings.ray_address)
        print(f"flashsale: Ray ready ({settings.ray_address or 'local instance'})", flush=True)
        secret = os.environ.get("FLASHSALE_JWT_SECRET") or stored_secret(settings.data_dir,
                                                                         "jwt_secret")
        policy = Policy(hold_ttl_ms=settings.hold_ttl_s * 1000,
                        cancel_window_ms=settings.cancel_window_s * 1000)
        engine = await start_engine(database.dsn, ActorConfig(database.dsn, policy), secret,
                                    settings.bcrypt_rounds, settings.base_url,
                                    payment_provider(settings), settings.rate_limits)
        runner = web.AppRunner(create_app(engine), access_log=None)
        try:
            await _bootstrap_admin(engine)
            await runner.setup()
            await web.TCPSite(runner, settings.host, settings.port).start()
            url = f"http://{settings.host}:{settings.port}"
            if demo:
                await _seed_demo(engine, url)
            print(f"flashsale: listening on {url} (Ctrl-C to stop)", flush=True)
            await stop.wait()
        except OSError as error:
            raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: "
                              f"{error.strerror}") from None
        finally:
            await runner.cleanup()
            await engine.stop()
    except (OSError, asyncpg.PostgresError) as error:
        raise ConfigError(f"stopped: {error}") from None
    finally:
        if ray.is_initialized():
            ray.shutdown()
        database.close()
        print("flashsale: stopped", flush=True)
