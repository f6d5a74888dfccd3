"""Orders: place (through the product's batcher), list, read, cancel. Only the caller's own."""

import uuid

import asyncpg
from aiohttp import web

from flashsale.actors.messages import (
    CancelOrder,
    Command,
    OrderRecord,
    OrderStatus,
    PlaceOrder,
    Rejection,
)
from flashsale.actors.product_actor import ProductUnavailable
from flashsale.http.engine import ENGINE, Engine
from flashsale.http.problems import ApiError, rejected
from flashsale.http.schemas import (
    CancelRequest,
    OrderCreate,
    OrderView,
    json_response,
    read_body,
    rfc3339_ms,
)
from flashsale.ids import uuid7
from flashsale.persistence.orders import order_of_user, orders_of_user

IDEMPOTENCY_KEY_BYTES_MAX = 255
PAGE_SIZE_MAX = 100
STATUSES = {status.value for status in OrderStatus}


async def _decide(engine: Engine, product_id: str, cmd: Command) -> OrderRecord:
    try:
        reply = await engine.router.submit(product_id, cmd)
    except ProductUnavailable as error:
        raise ApiError("unavailable", str(error)) from None
    if isinstance(reply, Rejection):
        raise rejected(reply)
    assert isinstance(reply, OrderRecord)
    return reply


def _idempotency_key(request: web.Request) -> str:
    key = request.headers.get("X-Idempotency-Key", "").strip()
    if not key:
        raise ApiError("idempotency_key_missing")
    if not (key.isascii() and key.isprintable()):  # a Structured Header String, as in the draft
        raise ApiError("validation_error", "X-Idempotency-Key must be printable ASCII")
    if len(key.encode()) > IDEMPOTENCY_KEY_BYTES_MAX:
        raise ApiError("validation_error",
                       f"X-Idempotency-Key is longer than {IDEMPOTENCY_KEY_BYTES_MAX} bytes")
    return key


async def place_order(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    user_id = engine.user(request)
    await engine.limit("order", user_id)
    key = _idempotency_key(request)
    body = await read_body(request, OrderCreate)
    row = await engine.catalogue.row(str(body.product_id))
    if row is None:
        raise ApiError("not_found", "no such product")
    order = await _decide(engine, row.id, PlaceOrder(uuid7(), user_id, key, body.quantity))
    return json_response({
        "order_id": order.order_id,
        "status": OrderStatus.PENDING.value,  # the first answer, also when replayed by key
        "payment_url": engine.payment_url(order.order_id, order.expires_at_ms),
        "expires_at": rfc3339_ms(order.expires_at_ms),
    }, status=201)


def order_view(engine: Engine, row: asyncpg.Record) -> OrderView:
    pending = row["status"] == OrderStatus.PENDING.value
    return OrderView(
        id=row["id"], user_id=row["user_id"], product_id=row["product_id"],
        quantity=row["quantity"], unit_price=row["unit_price_minor"],
        total_amount=row["quantity"] * row["unit_price_minor"], currency=row["currency"].strip(),
        status=row["status"], payment_provider=row["payment_provider"],
        payment_url=engine.payment_url(row["id"], row["expires_at_ms"]) if pending else None,
        payment_id=row["payment_id"], refund_status=row["refund_status"],
        refund_amount=row["refund_amount_minor"], expires_at=rfc3339_ms(row["expires_at_ms"]),
        confirmed_at=rfc3339_ms(row["confirmed_at_ms"]) if row["confirmed_at_ms"] else None,
        created_at=rfc3339_ms(row["created_at_ms"]), updated_at=rfc3339_ms(row["updated_at_ms"]),
    )


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ApiError("validation_error", f"{name} must be an integer from {low} to {high}")
    return int(raw)


async def list_orders(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    user_id = engine.user(request)
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        raise ApiError("validation_error", f"status must be one of {', '.join(sorted(STATUSES))}")
    limit = _int_param(request, "limit", 20, 1, PAGE_SIZE_MAX)
    offset = _int_param(request, "offset", 0, 0, 10**9)
    rows, total = await orders_of_user(engine.db, user_id, status, limit, offset)
    return json_response({"orders": [order_view(engine, r) for r in rows], "total": total,
                          "limit": limit, "offset": offset})


async def _own_order(request: web.Request, engine: Engine, user_id: str) -> asyncpg.Record:
    """The caller's order; another user's order is indistinguishable from none (404)."""
    try:
        order_id = str(uuid.UUID(request.match_info["order_id"]))
    except ValueError:
        raise ApiError("not_found", "no such order") from None
    row = await order_of_user(engine.db, order_id, user_id)
    if row is None:
        raise ApiError("not_found", "no such order")
    return row


async def get_order(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    row = await _own_order(request, engine, engine.user(request))
    return json_response(order_view(engine, row))


async def cancel_order(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    user_id = engine.user(request)
    row = await _own_order(request, engine, user_id)
    await read_body(request, CancelRequest)
    if row["status"] != OrderStatus.CONFIRMED.value:  # its product may have forgotten it
        raise ApiError("invalid_order_state", f"the order is {row['status']}")
    order = await _decide(engine, row["product_id"], CancelOrder(row["id"], user_id))
    return json_response({"order_id": order.order_id, "status": order.status.value,
                          "refund_initiated": True, "refund_amount": order.refund_amount_minor})
