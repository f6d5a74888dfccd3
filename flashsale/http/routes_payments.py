"""Payment links and gateway webhooks."""

import hashlib
import uuid

import asyncpg
from aiohttp import web

from flashsale.actors.messages import (
    CapturePayment,
    Command,
    FailPayment,
    OrderStatus,
    RefundStatus,
    Rejection,
    SettleRefund,
)
from flashsale.actors.product import Reply
from flashsale.actors.product_actor import ProductUnavailable
from flashsale.http.checkout_page import checkout_page, settled_page
from flashsale.http.engine import ENGINE, Engine
from flashsale.http.problems import ApiError
from flashsale.http.schemas import json_response, rfc3339_ms
from flashsale.payments.provider import (
    BadSignature,
    EventKind,
    GatewayError,
    GatewayRefused,
    PaymentEvent,
    PaymentOrder,
)
from flashsale.persistence.orders import claim_payment, order_by_id, order_record
from flashsale.persistence.payments import (
    keep_payment_session,
    payment_session,
    record_webhook,
    set_webhook_outcome,
)


async def pay(request: web.Request) -> web.StreamResponse:
    """The order's payment link: creates its provider session once, then sends the shopper on."""
    engine = request.app[ENGINE]
    order_id = request.match_info["order_id"]
    on_hold = engine.tokens.check_payment_link(request.query.get("token", ""), order_id)
    order = await order_by_id(engine.db, order_id)
    if order is None:
        raise ApiError("not_found", "no such order")
    pending = order["status"] == OrderStatus.PENDING.value
    if not (pending and on_hold):
        # A pending order whose hold lapsed is expired within a second, whatever its row says.
        status = OrderStatus.EXPIRED.value if pending else order["status"]
        return web.Response(text=settled_page(order_id, status), content_type="text/html")
    provider = engine.payments
    return_url = f"{engine.base_url}{request.path_qs}"  # public, as FLASHSALE_PUBLIC_URL says
    payment = PaymentOrder(order_id, order["quantity"] * order["unit_price_minor"],
                           order["currency"].strip(), order["expires_at_ms"])
    session = await payment_session(engine.db, order_id)
    if session is None:
        try:
            checkout = await provider.start_checkout(payment, return_url)
        except GatewayRefused as error:
            raise ApiError("payment_refused", f"the payment gateway refused it: {error}") from None
        except GatewayError as error:
            raise ApiError("unavailable", f"the payment gateway did not answer: {error}") from None
        session = await keep_payment_session(engine.db, order_id, provider.name,
                                             checkout.session_id, checkout.redirect_url)
    if session["checkout_url"]:
        raise web.HTTPSeeOther(session["checkout_url"])
    page = checkout_page(provider, payment, session["session_id"], order["quantity"],
                         rfc3339_ms(order["expires_at_ms"]), return_url)
    return web.Response(text=page, content_type="text/html")


def _command(event: PaymentEvent, order: asyncpg.Record) -> Command:
    match event.kind:
        case EventKind.CAPTURED:  # with the order, in case its product has forgotten it
            return CapturePayment(event.order_id, event.payment_id, event.amount_minor,
                                  event.currency, order_record(order))
        case EventKind.FAILED:
            return FailPayment(event.order_id)
        case EventKind.REFUNDED | EventKind.REFUND_FAILED:
            return SettleRefund(event.order_id, event.kind is EventKind.REFUNDED)


def _mismatch(event: PaymentEvent, order: asyncpg.Record) -> str | None:
    expected = (order["refund_amount_minor"] if event.kind in (EventKind.REFUNDED,
                                                               EventKind.REFUND_FAILED)
                else order["quantity"] * order["unit_price_minor"])
    if event.amount_minor != expected or event.currency != order["currency"].strip():
        return (f"{event.amount_minor} {event.currency} does not match the order's "
                f"{expected} {order['currency'].strip()}")
    return None


def _changes_nothing(event: PaymentEvent, order: asyncpg.Record) -> bool:
    """A failure reported once the order has left pending, or a refund's outcome once the
    refund has settled: the product would change nothing, and may have forgotten the order."""
    match event.kind:
        case EventKind.FAILED:
            return order["status"] != OrderStatus.PENDING.value
        case EventKind.REFUNDED | EventKind.REFUND_FAILED:
            return order["refund_status"] != RefundStatus.PENDING.value
    return False


async def _paid_for_another_order(engine: Engine, event: PaymentEvent,
                                  order: asyncpg.Record) -> str | None:
    """A product knows only the payment ids of the orders in its memory; the claims hold those
    of every order, on every product, before any product decides (see `claim_payment`)."""
    if event.kind is not EventKind.CAPTURED:
        return None
    if await claim_payment(engine.db, event.payment_id, order["id"]) == order["id"]:
        return None
    return "the payment id belongs to another order"


def _holds_nul(event: PaymentEvent) -> bool:
    """PostgreSQL text cannot hold NUL, and no gateway sends it: not an event to act on."""
    return any(isinstance(field, str) and "\x00" in field for field in event)


async def webhook(request: web.Request) -> web.Response:
    """Signature first; then dedupe, keep the payload, check it against the order, and hand
    the outcome to the product's actor, which changes an order once whatever the order."""
    engine = request.app[ENGINE]
    provider = engine.payments
    if request.match_info["provider"] != provider.name:
        raise ApiError("not_found", f"payments go through {provider.name} here")
    raw = await request.read()
    if not request.headers.get(provider.signature_header, "").isascii():
        # Signatures are hex or base64; the SDKs' hmac comparisons fail on anything else.
        raise ApiError("invalid_token", f"{provider.signature_header} is not a signature")
    try:
        event = provider.verify_webhook(raw, request.headers)
    except BadSignature as error:
        raise ApiError("invalid_token", str(error)) from None
    if event is not None and _holds_nul(event):
        event = None
    event_id = event.event_id if event else f"unparsed-{hashlib.sha256(raw).hexdigest()[:32]}"
    earlier = await record_webhook(engine.db, provider.name, event_id, raw)
    if earlier is not None:
        return json_response({"status": "duplicate", "outcome": earlier})
    outcome = await _process(request, event)
    await set_webhook_outcome(engine.db, provider.name, event_id, outcome)
    status = "processed" if outcome == "processed" else "ignored"
    return json_response({"status": status, "outcome": outcome})


async def _process(request: web.Request, event: PaymentEvent | None) -> str:
    engine = request.app[ENGINE]
    if event is None:
        return "ignored: not an event the engine acts on"
    try:
        order = await order_by_id(engine.db, str(uuid.UUID(event.order_id)))
    except ValueError:
        order = None
    if order is None:
        return "ignored: unknown order"
    problem = _mismatch(event, order) or await _paid_for_another_order(engine, event, order)
    if problem:
        return f"rejected: {problem}"
    try:
        reply = await decide_payment(engine, event, order)
    except ProductUnavailable as error:  # not recorded as done: the redelivery is processed
        raise ApiError("unavailable", str(error)) from None
    if isinstance(reply, Rejection):
        return f"rejected: {reply.value}"
    return "processed"


async def decide_payment(engine: Engine, event: PaymentEvent, order: asyncpg.Record) -> Reply:
    """Hand a verified payment event to the order's product, unless the order's row shows it
    would change nothing. A product forgets an order only once it has settled and its row says
    so; an event that finds its order forgotten was judged on an older row, so it is judged
    again on the row as it stands now."""
    reply = await _decide_on(engine, event, order)
    if reply is Rejection.NOT_FOUND:
        current = await order_by_id(engine.db, order["id"])
        if current is not None and current["updated_at_ms"] != order["updated_at_ms"]:
            reply = await _decide_on(engine, event, current)
    return reply


async def _decide_on(engine: Engine, event: PaymentEvent, order: asyncpg.Record) -> Reply:
    if _changes_nothing(event, order):
        return order_record(order)
    return await engine.router.submit(order["product_id"], _command(event, order))


async def webhooks_health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})
