"""The sandbox provider: no network beyond the engine itself. Its checkout page carries
pre-signed webhooks for Pay and Fail, and its "gateway" accepts refunds and reports them with a
signed `refund.processed` webhook, exactly as SPEC's sandbox webhook describes."""

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping

import aiohttp
import msgspec

from flashsale.payments.provider import (
    BadSignature,
    Checkout,
    EventKind,
    PaymentEvent,
    PaymentOrder,
)

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Sandbox-Signature"
DELIVERY_ATTEMPTS = 5
DELIVERY_TIMEOUT_S = 10.0

_KINDS = {"payment.captured": EventKind.CAPTURED, "payment.failed": EventKind.FAILED,
          "refund.processed": EventKind.REFUNDED}
_TYPES = {kind: name for name, kind in _KINDS.items()}


class SandboxEvent(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    type: str
    order_id: str
    payment_id: str
    amount: int
    currency: str


class SandboxGateway:
    name = "sandbox"
    signature_header = SIGNATURE_HEADER

    def __init__(self, secret: str, webhook_url: str) -> None:
        self._key = secret.encode()
        self.webhook_url = webhook_url
        self._deliveries: set[asyncio.Task[None]] = set()

    def sign(self, raw: bytes) -> str:
        return hmac.new(self._key, raw, hashlib.sha256).hexdigest()

    def event(self, kind: EventKind, order_id: str, payment_id: str, amount_minor: int,
              currency: str) -> bytes:
        """A webhook body, as the gateway would send it."""
        return msgspec.json.encode(SandboxEvent(f"evt_{secrets.token_hex(12)}", _TYPES[kind],
                                                order_id, payment_id, amount_minor, currency))

    async def start_checkout(self, order: PaymentOrder, return_url: str) -> Checkout:
        return Checkout(f"pay_{secrets.token_hex(12)}", redirect_url=None)

    async def expire_checkout(self, session_id: str) -> None:
        """The sandbox page of a lapsed order offers nothing to pay: nothing to close."""

    async def refund(self, order_id: str, payment_id: str, amount_minor: int, currency: str,
                     idempotency_key: str) -> None:
        """Accepted at once; the gateway reports it with a refund.processed webhook."""
        body = self.event(EventKind.REFUNDED, order_id, payment_id, amount_minor, currency)
        task = asyncio.get_running_loop().create_task(self._deliver(body))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, body: bytes) -> None:
        headers = {SIGNATURE_HEADER: self.sign(body), "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_S)
        for attempt in range(1, DELIVERY_ATTEMPTS + 1):
            try:
                async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                    self.webhook_url, data=body, headers=headers
                ) as reply:
                    if reply.status == 200:
                        return
                    log.warning("sandbox webhook answered %s", reply.status)
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning("sandbox webhook delivery failed: %s", error)
            await asyncio.sleep(0.2 * 2**attempt)
        # The refund worker asks again later with the same idempotency key.

    def verify_webhook(self, raw: bytes, headers: Mapping[str, str]) -> PaymentEvent | None:
        given = headers.get(SIGNATURE_HEADER, "")
        if not hmac.compare_digest(self.sign(raw), given):
            raise BadSignature("X-Sandbox-Signature does not match the body")
        try:
            event = msgspec.json.decode(raw, type=SandboxEvent)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None  # signed, so not forged: kept, and ignored
        kind = _KINDS.get(event.type)
        if kind is None:
            return None
        return PaymentEvent(event.id, kind, event.order_id, event.payment_id, event.amount,
                            event.currency)

    async def close(self) -> None:
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
