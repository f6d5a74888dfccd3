"""Stripe: a Checkout Session per order, refunds with an idempotency key, and webhooks verified
with the SDK (`Stripe-Signature`, 300 s tolerance). Uses the SDK's async client on aiohttp."""

import time
from collections.abc import Mapping

import msgspec
import stripe

from flashsale.payments.provider import (
    BadSignature,
    Checkout,
    EventKind,
    GatewayError,
    GatewayRefused,
    PaymentEvent,
    PaymentOrder,
)

SIGNATURE_TOLERANCE_S = 300
SESSION_LIFETIME_MIN_S = 30 * 60 + 60  # Stripe refuses sessions that expire within 30 minutes
REQUEST_TIMEOUT_S = 15


class _Object(msgspec.Struct):
    id: str
    metadata: dict[str, str] = {}
    client_reference_id: str | None = None
    payment_intent: str | None = None
    payment_status: str | None = None
    status: str | None = None
    amount_total: int | None = None
    amount: int | None = None
    currency: str | None = None


class _Data(msgspec.Struct):
    object: _Object


class _Event(msgspec.Struct):
    id: str
    type: str
    data: _Data


_SESSION_KINDS = {"checkout.session.completed": EventKind.CAPTURED,
                  "checkout.session.async_payment_succeeded": EventKind.CAPTURED,
                  "checkout.session.async_payment_failed": EventKind.FAILED,
                  "checkout.session.expired": EventKind.FAILED}
_REFUND_KINDS = {"succeeded": EventKind.REFUNDED, "failed": EventKind.REFUND_FAILED,
                 "canceled": EventKind.REFUND_FAILED}


class StripeGateway:
    name = "stripe"
    signature_header = "Stripe-Signature"

    def __init__(self, api_key: str, webhook_secret: str, api_base: str | None = None) -> None:
        self._webhook_secret = webhook_secret
        self._http = stripe.AIOHTTPClient(timeout=REQUEST_TIMEOUT_S)
        self._client = stripe.StripeClient(
            api_key, base_addresses={"api": api_base} if api_base else None,
            http_client=self._http, max_network_retries=0)

    async def close(self) -> None:
        await self._http.close_async()

    async def start_checkout(self, order: PaymentOrder, return_url: str) -> Checkout:
        expires_at_s = max(order.expires_at_ms // 1000, int(time.time()) + SESSION_LIFETIME_MIN_S)
        metadata = {"order_id": order.order_id}
        try:
            session = await self._client.v1.checkout.sessions.create_async(params={
                "mode": "payment",
                "line_items": [{"quantity": 1, "price_data": {
                    "currency": order.currency.lower(), "unit_amount": order.amount_minor,
                    "product_data": {"name": f"Order {order.order_id}"}}}],
                "client_reference_id": order.order_id,
                "metadata": metadata,
                "payment_intent_data": {"metadata": metadata},
                "expires_at": expires_at_s,
                "success_url": return_url,
                "cancel_url": return_url,
            }, options={"idempotency_key": f"checkout-{order.order_id}"})
        except stripe.InvalidRequestError as error:
            raise GatewayRefused(f"stripe: {error}") from None
        except stripe.StripeError as error:
            raise GatewayError(f"stripe: {error}") from None
        return Checkout(session.id, session.url)

    async def expire_checkout(self, session_id: str) -> None:
        try:
            await self._client.v1.checkout.sessions.expire_async(session_id)
        except stripe.InvalidRequestError:
            pass  # already expired or completed: nothing left to close
        except stripe.StripeError as error:
            raise GatewayError(f"stripe: {error}") from None

    async def refund(self, order_id: str, payment_id: str, amount_minor: int, currency: str,
                     idempotency_key: str) -> None:
        try:
            await self._client.v1.refunds.create_async(params={
                "payment_intent": payment_id, "amount": amount_minor,
                "metadata": {"order_id": order_id}}, options={"idempotency_key": idempotency_key})
        except stripe.StripeError as error:
            raise GatewayError(f"stripe: {error}") from None

    def verify_webhook(self, raw: bytes, headers: Mapping[str, str]) -> PaymentEvent | None:
        try:
            stripe.WebhookSignature.verify_header(raw, headers.get(self.signature_header),
                                                  self._webhook_secret, SIGNATURE_TOLERANCE_S)
        except stripe.SignatureVerificationError as error:
            raise BadSignature(str(error)) from None
        try:
            event = msgspec.json.decode(raw, type=_Event)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        return _payment_event(event)


def _payment_event(event: _Event) -> PaymentEvent | None:
    obj = event.data.object
    order_id = obj.metadata.get("order_id") or obj.client_reference_id
    if order_id is None or obj.currency is None:
        return None
    currency = obj.currency.upper()
    if event.type in _SESSION_KINDS:
        kind = _SESSION_KINDS[event.type]
        if kind is EventKind.CAPTURED and obj.payment_status != "paid":
            return None  # completed, but the money is still on its way
        return PaymentEvent(event.id, kind, order_id, obj.payment_intent or obj.id,
                            obj.amount_total or 0, currency)
    if event.type in ("refund.created", "refund.updated") and obj.status in _REFUND_KINDS:
        return PaymentEvent(event.id, _REFUND_KINDS[obj.status], order_id,
                            obj.payment_intent or obj.id, obj.amount or 0, currency)
    return None
