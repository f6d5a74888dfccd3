"""The baseline server: the same HTTP stack, JWT auth and problem+json errors as the engine, but
each order is one PostgreSQL transaction that locks the product row (`SELECT … FOR UPDATE`),
checks the window, the per-user limit and the idempotency key in SQL, decrements, and inserts."""

import datetime as dt
import uuid
from importlib import resources

import asyncpg
from aiohttp import web

from flashsale.http.app import settle_collector
from flashsale.http.auth import DeactivatedUsers, Tokens, bearer_user
from flashsale.http.problems import ApiError, problem_middleware
from flashsale.http.schemas import OrderCreate, json_response, read_body, rfc3339
from flashsale.ids import uuid7
from flashsale.persistence.database import create_pool

HOLD_TTL = dt.timedelta(seconds=900)
POOL_SIZE = 32  # the hot row serializes writers; more connections only queue on its lock
TOKENS = web.AppKey("tokens", Tokens)
DB = web.AppKey("db", asyncpg.Pool)
NOBODY_DEACTIVATED = web.AppKey("deactivated", DeactivatedUsers)


def schema() -> str:
    return resources.files("bench.baseline").joinpath("schema.sql").read_text()


def _placed(order_id: str, expires_at: dt.datetime) -> web.Response:
    return json_response({"order_id": order_id, "status": "pending",
                          "payment_url": f"/pay/{order_id}", "expires_at": rfc3339(expires_at)},
                         status=201)


async def place_order(request: web.Request) -> web.Response:
    user_id = bearer_user(request, request.app[TOKENS], request.app[NOBODY_DEACTIVATED])
    key = request.headers.get("X-Idempotency-Key", "").strip()
    if not key:
        raise ApiError("idempotency_key_missing")
    body = await read_body(request, OrderCreate)
    try:
        async with request.app[DB].acquire() as conn, conn.transaction():
            return await _place(conn, user_id, key, str(body.product_id), body.quantity)
    except asyncpg.UniqueViolationError:  # the same key raced itself: answer the first
        async with request.app[DB].acquire() as conn:
            return await _replay(conn, user_id, key, str(body.product_id), body.quantity)


async def _replay(conn: asyncpg.Connection, user_id: str, key: str, product_id: str,
                  quantity: int) -> web.Response:
    first = await conn.fetchrow(
        "SELECT id::text, product_id::text, quantity, expires_at FROM orders "
        "WHERE user_id = $1 AND idempotency_key = $2", user_id, key)
    if (first["product_id"], first["quantity"]) != (product_id, quantity):
        raise ApiError("idempotency_key_reused")
    return _placed(first["id"], first["expires_at"])


async def _place(conn: asyncpg.Connection, user_id: str, key: str, product_id: str,
                 quantity: int) -> web.Response:
    if await conn.fetchval("SELECT 1 FROM orders WHERE user_id = $1 AND idempotency_key = $2",
                           user_id, key):
        return await _replay(conn, user_id, key, product_id, quantity)
    product = await conn.fetchrow(
        "SELECT available, price_minor, per_user_limit, sale_starts_at <= now() "
        "AND now() < sale_ends_at AS active FROM products WHERE id = $1 FOR UPDATE", product_id)
    if product is None:
        raise ApiError("not_found", "no such product")
    if not product["active"]:
        raise ApiError("sale_not_active")
    held = await conn.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM orders WHERE product_id = $1 AND user_id = $2 "
        "AND status IN ('pending', 'confirmed')", product_id, user_id)
    if held + quantity > product["per_user_limit"]:
        raise ApiError("purchase_limit_exceeded")
    if product["available"] < quantity:
        raise ApiError("out_of_stock")
    await conn.execute("UPDATE products SET available = available - $2, reserved = reserved + $2 "
                       "WHERE id = $1", product_id, quantity)
    order_id = uuid7()
    expires_at = await conn.fetchval(
        "INSERT INTO orders (id, product_id, user_id, idempotency_key, quantity, "
        "unit_price_minor, status, expires_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, 'pending', now() + $7::interval) RETURNING expires_at",
        order_id, product_id, user_id, key, quantity, product["price_minor"], HOLD_TTL)
    return _placed(order_id, expires_at)


async def get_order(request: web.Request) -> web.Response:
    user_id = bearer_user(request, request.app[TOKENS], request.app[NOBODY_DEACTIVATED])
    try:
        order_id = uuid.UUID(request.match_info["order_id"])
    except ValueError:
        raise ApiError("not_found") from None
    row = await request.app[DB].fetchrow(
        "SELECT id::text, status, quantity FROM orders WHERE id = $1 AND user_id = $2",
        order_id, user_id)
    if row is None:
        raise ApiError("not_found", "no such order")
    return json_response(dict(row))


async def get_product(request: web.Request) -> web.Response:
    row = await request.app[DB].fetchrow(
        "SELECT id::text, stock, available, reserved, sold, per_user_limit FROM products "
        "WHERE id = $1", request.match_info["product_id"])
    if row is None:
        raise ApiError("not_found", "no such product")
    return json_response(dict(row))


async def create_app(dsn: str, jwt_secret: str) -> web.Application:
    db = await create_pool(dsn, init_size=POOL_SIZE, max_size=POOL_SIZE)
    async with db.acquire() as conn:
        await conn.execute(schema())
    app = web.Application(middlewares=[problem_middleware])
    app[DB] = db
    app[TOKENS] = Tokens(jwt_secret)
    app[NOBODY_DEACTIVATED] = DeactivatedUsers(db)
    app.router.add_post("/orders", place_order)
    app.router.add_get("/orders/{order_id}", get_order)
    app.router.add_get("/products/{product_id}", get_product)
    app.on_cleanup.append(lambda _: db.close())
    settle_collector()  # as the engine's front ends do
    return app
