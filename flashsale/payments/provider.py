"""The one interface every payment provider implements."""

import enum
from collections.abc import Mapping
from typing import NamedTuple, Protocol


class EventKind(enum.Enum):
    CAPTURED = "captured"
    FAILED = "failed"
    REFUNDED = "refunded"
    REFUND_FAILED = "refund_failed"


class PaymentOrder(NamedTuple):
    order_id: str
    amount_minor: int
    currency: str
    expires_at_ms: int


class Checkout(NamedTuple):
    """A provider session for one order: where to send the shopper (None: our own page)."""

    session_id: str
    redirect_url: str | None


class PaymentEvent(NamedTuple):
    event_id: str
    kind: EventKind
    order_id: str
    payment_id: str
    amount_minor: int
    currency: str


class BadSignature(Exception):
    """A webhook whose signature is missing, wrong or stale."""


class GatewayError(Exception):
    """The gateway refused or did not answer; the caller retries later."""


class GatewayRefused(GatewayError):
    """The gateway answered and refused the request as made (an amount out of its range, say):
    the same request will be refused again, so a shopper gains nothing by retrying it."""


class PaymentProvider(Protocol):
    name: str
    signature_header: str  # the webhook header holding the signature

    async def start_checkout(self, order: PaymentOrder, return_url: str) -> Checkout: ...

    async def expire_checkout(self, session_id: str) -> None:
        """Close a session whose order's hold lapsed, so it can no longer take money."""
        ...

    async def refund(self, order_id: str, payment_id: str, amount_minor: int, currency: str,
                     idempotency_key: str) -> None: ...

    def verify_webhook(self, raw: bytes, headers: Mapping[str, str]) -> PaymentEvent | None:
        """The event, None for a kind the engine does not act on; BadSignature if forged."""
        ...

    async def close(self) -> None: ...
