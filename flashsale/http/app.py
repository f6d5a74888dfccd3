"""The aiohttp application: every route in one place."""

import asyncio
import gc
import logging
from collections.abc import Sequence

import asyncpg
import ray
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.typedefs import Middleware

from flashsale.config import Network
from flashsale.http import routes_auth, routes_orders, routes_payments, routes_products
from flashsale.http.engine import ENGINE, Engine
from flashsale.http.problems import problem, problem_middleware
from flashsale.http.ratelimit import rate_limit_middleware
from flashsale.http.schemas import json_response

BODY_BYTES_MAX = 64 * 1024
HEALTH_TIMEOUT_S = 2.0
YOUNG_COLLECTION_THRESHOLD = 10_000  # objects; see `settle_collector`


class _MalformedRequestsInOneLine(logging.Filter):
    """aiohttp answers a request it cannot parse (a line over 8 KB, bytes that are not HTTP)
    with a 400 before any middleware runs, and logs an error with its traceback. The fault is
    the client's: one warning line says enough, and a stream of such requests cannot fill the
    log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BadHttpMessage):
            record.msg, record.args = f"{record.getMessage()}: {error.message}", None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_MALFORMED_REQUESTS = _MalformedRequestsInOneLine()


def settle_collector() -> None:
    """Call once a server has started. What it made to start (modules, clients, pools) lives as
    long as it does: frozen, Python's full collections no longer walk it. Requests leave few
    objects behind, so the youngest generation is collected less often than Python's default,
    every 700 objects. Timed in one `bench run --scenario hot` front end, collections took
    0.39 s of a 4.3 s run before, 0.01 s after."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD)


def own_ray_node_alive() -> bool:
    """Ray's control store marks a node dead about 20 s after its raylet dies. Until this
    process's node is back, running actors may still answer, but no sale can start an actor."""
    node_id = ray.get_runtime_context().get_node_id()
    return any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes())


async def health(request: web.Request) -> web.Response:
    """200 once the database and Ray answer; 503 otherwise."""
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            await request.app[ENGINE].db.fetchval("SELECT 1")
            if not await asyncio.to_thread(own_ray_node_alive):
                return problem("unavailable", "not ready: this front end's Ray node is dead")
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
            ray.exceptions.RayError) as error:
        return problem("unavailable", f"not ready: {type(error).__name__}")
    return json_response({"status": "ok"})


def create_app(engine: Engine, trusted_proxies: Sequence[Network] = ()) -> web.Application:
    middlewares: list[Middleware] = [problem_middleware]
    if engine.limiter is not None:
        middlewares.append(rate_limit_middleware(engine.limiter, trusted_proxies))
    app = web.Application(middlewares=middlewares, client_max_size=BODY_BYTES_MAX)
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUESTS)  # once, whatever the apps
    app[ENGINE] = engine
    app.router.add_get("/health", health)
    app.router.add_post("/auth/register", routes_auth.register)
    app.router.add_post("/auth/login", routes_auth.login)
    app.router.add_post("/auth/refresh", routes_auth.refresh)
    app.router.add_get("/auth/me", routes_auth.me)
    app.router.add_patch("/auth/me", routes_auth.patch_me)
    app.router.add_post("/auth/change-password", routes_auth.change_password)
    app.router.add_post("/products", routes_products.create_product)
    app.router.add_get("/products", routes_products.list_products)
    app.router.add_get("/products/{product_id}", routes_products.get_product)
    app.router.add_post("/products/{product_id}/restock", routes_products.restock)
    app.router.add_post("/orders", routes_orders.place_order)
    app.router.add_get("/orders", routes_orders.list_orders)
    app.router.add_get("/orders/{order_id}", routes_orders.get_order)
    app.router.add_post("/orders/{order_id}/cancel", routes_orders.cancel_order)
    app.router.add_get("/pay/{order_id}", routes_payments.pay)
    app.router.add_get("/webhooks/health", routes_payments.webhooks_health)
    app.router.add_post("/webhooks/{provider}", routes_payments.webhook)
    return app
