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


# Commands -------------------------------------------------------------------------------------


class DefineProduct(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    terms: ProductTerms
    stock: int


class PlaceOrder(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    user_id: str
    idempotency_key: str
    quantity: int


class CapturePayment(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str
    payment_id: str
    amount_minor: int
    currency: str


class FailPayment(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    order_id: str


class ExpireHolds(msgspec.Struct, frozen=True, tag=True, array_like=True, gc=False):
    """Expire every pending order whose hold has lapsed (the actor's timer sends it)."""


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
    | Restocked
)

event_encoder = msgspec.msgpack.Encoder()
event_decoder = msgspec.msgpack.Decoder(Event)
