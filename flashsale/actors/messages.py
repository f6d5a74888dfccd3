"""Commands, events and rejections of one product: the vocabulary of the pure core.

Times are integer milliseconds since the Unix epoch and ids are strings; both come in from
the shell (the time as an argument of `decide`, so one clock, the actor's, orders a product's
decisions), and the core stays deterministic. Money is an integer in the currency's minor unit.
"""

import enum

import msgspec


class Rejection(enum.Enum):
    """Business outcomes that refuse a command. Values are the API's problem `code`s."""

    VALIDATION_ERROR = "validation_error"
    NOT_FOUND = "not_found"
    SALE_NOT_ACTIVE = "sale_not_active"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    PURCHASE_LIMIT_EXCEEDED = "purchase_limit_exceeded"
    OUT_OF_STOCK = "out_of_stock"
    INVALID_ORDER_STATE = "invalid_order_state"
    CANCELLATION_WINDOW_CLOSED = "cancellation_window_closed"
    PAYMENT_MISMATCH = "payment_mismatch"


class ProductTerms(msgspec.Struct, frozen=True, array_like=True, gc=False):
    product_id: str
    price_minor: int
    currency: str
    sale_starts_at_ms: int
    sale_ends_at_ms: int
    per_user_limit: int


# Orders ---------------------------------------------------------------------------------------


class OrderStatus(enum.Enum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class RefundStatus(enum.Enum):
    NONE = "none"
    PENDING = "pending"
    PROCESSED = "processed"
    FAILED = "failed"


class OrderRecord(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """An order as it stands; the orders read model holds the same facts, row for row."""

    order_id: str
    user_id: str
    idempotency_key: str
    quantity: int
    unit_price_minor: int
    status: OrderStatus
    created_at_ms: int
    expires_at_ms: int
    updated_at_ms: int
    confirmed_at_ms: int | None = None
    payment_id: str | None = None
    refund_status: RefundStatus = RefundStatus.NONE
    refund_amount_minor: int = 0

    @property
    def total_minor(self) -> int:
        return self.quantity * self.unit_price_minor

    @property
    def settled(self) -> bool:
        """Nothing more happens to it unless a payment arrives late: its units are back and
        no refund is outstanding. A product may forget such an order (see ForgetSettled)."""
        return (self.status in SETTLED_STATUSES
                and self.refund_status is not RefundStatus.PENDING)


SETTLED_STATUSES = frozenset({OrderStatus.FAILED, OrderStatus.EXPIRED, OrderStatus.CANCELLED})


class ProductCounts(msgspec.Struct, frozen=True):
    """A product's units, and the last event they include."""

    stock: int
    available: int
    reserved: int
    sold: int
    last_seq: int


# Commands -------------------------------------------------------------------------------------


class DefineProduct(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    terms: ProductTerms
    stock: int


class PlaceOrder(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    user_id: str
    idempotency_key: str
    quantity: int
    # The order this user already placed with this key, as the read model holds it, when the
    # front end found one: the product may have forgotten it.
    known: OrderRecord | None = None


class CapturePayment(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    payment_id: str
    amount_minor: int
    currency: str
    # The order as the read model holds it, for a payment that arrives after the product
    # forgot the order.
    known: OrderRecord | None = None


class FailPayment(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str


class ExpireHolds(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    """Expire every pending order whose hold has lapsed (the actor runs it before a batch, or
    on its timer)."""


class ForgetSettled(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    """Let go of orders settled a while ago (the actor runs it before a batch, or on its
    timer), so memory and snapshots follow the live orders, not the sale's history. They stay
    in the read model, and a command about one brings it back with `known`."""


class CancelOrder(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    user_id: str


class Restock(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    quantity: int


class SettleRefund(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    succeeded: bool


Command = (
    DefineProduct
    | PlaceOrder
    | CapturePayment
    | FailPayment
    | ExpireHolds
    | ForgetSettled
    | CancelOrder
    | Restock
    | SettleRefund
)


# Events: everything replay needs, nothing it would have to look up ---------------------------


class ProductDefined(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    terms: ProductTerms
    stock: int
    at_ms: int


class OrderPlaced(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    user_id: str
    idempotency_key: str
    quantity: int
    unit_price_minor: int
    at_ms: int
    expires_at_ms: int


class OrderConfirmed(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    payment_id: str
    at_ms: int
    # A late payment: the hold had lapsed, so the units come from `available` again.
    rereserved: bool


class OrderFailed(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    at_ms: int


class OrderExpired(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    at_ms: int


class OrderCancelled(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    refund_amount_minor: int
    at_ms: int


class RefundRequired(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    """A payment captured for a lapsed order when its units could not be re-reserved."""

    order_id: str
    payment_id: str
    amount_minor: int
    at_ms: int


class RefundSettled(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    succeeded: bool
    at_ms: int


class OrdersForgotten(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_ids: list[str]
    # How many entries of the settled queue this consumed, forgotten or not.
    consumed: int
    at_ms: int


class OrderRecalled(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    """A forgotten order, back in memory because a late payment changes it."""

    order: OrderRecord


class Restocked(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    quantity: int
    at_ms: int


Event = (
    ProductDefined
    | OrderPlaced
    | OrderConfirmed
    | OrderFailed
    | OrderExpired
    | OrderCancelled
    | RefundRequired
    | RefundSettled
    | OrdersForgotten
    | OrderRecalled
    | Restocked
)

event_encoder = msgspec.msgpack.Encoder()
event_decoder = msgspec.msgpack.Decoder(Event)
