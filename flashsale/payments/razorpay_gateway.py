"""Razorpay: an order in paise per engine order (receipt = our order id) paid on a checkout page,
refunds with `X-Refund-Idempotency`, and webhooks verified with the SDK on the raw body. The SDK
is blocking, so it runs in a small bounded thread pool with timeouts, never on the event loop."""

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
import razorpay
import razorpay.errors
import requests

from flashsale.payments.provider import (
    BadSignature,
    Checkout,
    EventKind,
    GatewayError,
    GatewayRefused,
    PaymentEvent,
    PaymentOrder,
)

SDK_THREADS = 4
REQUEST_TIMEOUT_S = 10.0

_KINDS = {"payment.captured": EventKind.CAPTURED, "payment.failed": EventKind.FAILED,
          "refund.processed": EventKind.REFUNDED, "refund.failed": EventKind.REFUND_FAILED}

T = TypeVar("T")


class _Entity(msgspec.Struct):
    id: str
    amount: int
    currency: str
    notes: dict[str, str] | list[str] = {}
    payment_id: str | None = None


class _Wrapped(msgspec.Struct):
    entity: _Entity


class _Payload(msgspec.Struct):
    payment: _Wrapped | None = None
    refund: _Wrapped | None = None


class _Event(msgspec.Struct):
    event: str
    payload: _Payload


class RazorpayGateway:
    name = "razorpay"
    signature_header = "X-Razorpay-Signature"

    def __init__(self, key_id: str, key_secret: str, webhook_secret: str,
                 api_base: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.key_id = key_id
        self._timeout_s = timeout_s
        self._webhook_secret = webhook_secret
        options = {"base_url": api_base} if api_base else {}
        self._client = razorpay.Client(auth=(key_id, key_secret), **options)
        self._pool = ThreadPoolExecutor(SDK_THREADS, thread_name_prefix="razorpay")

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, lambda: fn(*args, **kwargs, timeout=self._timeout_s))
        except razorpay.errors.BadRequestError as error:
            raise GatewayRefused(f"razorpay: {error}") from None
        except (razorpay.errors.GatewayError, razorpay.errors.ServerError,
                requests.RequestException, ValueError) as error:
            raise GatewayError(f"razorpay: {error!r}") from None

    async def start_checkout(self, order: PaymentOrder, return_url: str) -> Checkout:
        created = await self._call(self._client.order.create, {
            "amount": order.amount_minor, "currency": order.currency,
            "receipt": order.order_id, "notes": {"order_id": order.order_id}})
        return Checkout(str(created["id"]), redirect_url=None)

    async def expire_checkout(self, session_id: str) -> None:
        """Razorpay orders cannot be closed; a payment after the hold is a late payment."""

    async def refund(self, order_id: str, payment_id: str, amount_minor: int, currency: str,
                     idempotency_key: str) -> None:
        await self._call(self._client.payment.refund, payment_id,
                         {"amount": amount_minor, "notes": {"order_id": order_id}},
                         headers={"X-Refund-Idempotency": idempotency_key})

    def verify_webhook(self, raw: bytes, headers: Mapping[str, str]) -> PaymentEvent | None:
        signature = headers.get(self.signature_header, "")
        try:
            self._client.utility.verify_webhook_signature(raw.decode(), signature,
                                                          self._webhook_secret)
        except (razorpay.errors.SignatureVerificationError, UnicodeDecodeError) as error:
            raise BadSignature(f"X-Razorpay-Signature: {error}") from None
        try:
            event = msgspec.json.decode(raw, type=_Event)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        kind = _KINDS.get(event.event)
        refund_event = kind in (EventKind.REFUNDED, EventKind.REFUND_FAILED)
        wrapped = event.payload.refund if refund_event else event.payload.payment
        if kind is None or wrapped is None:
            return None
        entity = wrapped.entity
        order_id = entity.notes.get("order_id") if isinstance(entity.notes, dict) else None
        if order_id is None:
            return None
        payment_id = entity.payment_id or entity.id
        event_id = headers.get("X-Razorpay-Event-Id", "")  # outside the signature: checked
        if not (event_id and event_id.isascii() and event_id.isprintable()):
            event_id = f"{event.event}:{entity.id}"
        return PaymentEvent(event_id, kind, order_id, payment_id, entity.amount, entity.currency)

    async def close(self) -> None:
        self._pool.shutdown(wait=False)
