"""Sales: admins create and restock them; anyone reads them (from the catalogue cache)."""

import datetime as dt
import uuid

from aiohttp import web

from flashsale.actors.messages import Rejection, Restock
from flashsale.actors.product import STOCK_MAX
from flashsale.actors.product_actor import ProductUnavailable
from flashsale.http.engine import ENGINE
from flashsale.http.problems import ApiError, rejected
from flashsale.http.schemas import (
    ProductCreate,
    RestockRequest,
    json_response,
    read_body,
    rfc3339,
)
from flashsale.money import MINOR_DIGITS
from flashsale.persistence.products import ProductRow, insert_product

# A sale's terms hold its times as milliseconds since the Unix epoch, and asyncpg would store the
# ends of Python's datetime range as PostgreSQL's -infinity and infinity.
SALE_TIMES_FROM = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
SALE_TIMES_UNTIL = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)


async def _existing(request: web.Request) -> ProductRow:
    raw = request.match_info["product_id"]
    try:
        product_id = str(uuid.UUID(raw))
    except ValueError:
        raise ApiError("not_found", "no such product") from None
    row = await request.app[ENGINE].catalogue.row(product_id)
    if row is None:
        raise ApiError("not_found", "no such product")
    return row


async def create_product(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    await engine.admin(request)
    body = await read_body(request, ProductCreate)
    if body.currency not in MINOR_DIGITS:
        raise ApiError("validation_error", "currency must be an ISO 4217 code with a minor unit, "
                                           "such as INR, USD or JPY")
    if body.sale_ends_at <= body.sale_starts_at:
        raise ApiError("validation_error", "sale_ends_at must be after sale_starts_at")
    if body.sale_starts_at < SALE_TIMES_FROM or body.sale_ends_at > SALE_TIMES_UNTIL:
        window = f"{rfc3339(SALE_TIMES_FROM)} and {rfc3339(SALE_TIMES_UNTIL)}"
        raise ApiError("validation_error", f"sale times must fall between {window}")
    if body.sale_ends_at <= dt.datetime.now(dt.UTC):  # surely a typo: it could sell nothing
        raise ApiError("validation_error", "sale_ends_at is in the past")
    row = await insert_product(engine.db, body.name, body.price, body.currency, body.stock,
                               body.sale_starts_at, body.sale_ends_at, body.per_user_limit)
    try:
        view = await engine.catalogue.define(row)
    except ProductUnavailable:
        # The sale is stored; the catalogue defines its actor on its next refresh.
        raise ApiError("unavailable", f"product {row.id} was created but is not live yet") from None
    return json_response(view, status=201)


async def restock(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    await engine.admin(request)
    row = await _existing(request)
    body = await read_body(request, RestockRequest)
    try:
        reply = await engine.router.submit(row.id, Restock(body.quantity))
        await engine.catalogue.refresh(row.id)
    except ProductUnavailable as error:
        raise ApiError("unavailable", str(error)) from None
    if reply is Rejection.VALIDATION_ERROR:
        raise rejected(reply, f"a sale holds at most {STOCK_MAX} units in all")
    if isinstance(reply, Rejection):
        raise rejected(reply)
    return json_response(engine.catalogue.view(row))


async def list_products(request: web.Request) -> web.Response:
    return json_response(request.app[ENGINE].catalogue.views())


async def get_product(request: web.Request) -> web.Response:
    row = await _existing(request)
    return json_response(request.app[ENGINE].catalogue.view(row))
