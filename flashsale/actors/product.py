"""The product's brain: `decide` validates a command against the state and returns events or a
rejection; `apply` folds one event into the state and never fails. No I/O, no clock.
"""

import enum
import heapq

import msgspec

from flashsale.actors.messages import (
    CancelOrder,
    CapturePayment,
    Command,
    DefineProduct,
    Event,
    ExpireHolds,
    FailPayment,
    OrderCancelled,
    OrderConfirmed,
    OrderExpired,
    OrderFailed,
    OrderPlaced,
    PlaceOrder,
    ProductDefined,
    ProductTerms,
    RefundRequired,
    RefundSettled,
    Rejection,
    Restock,
    Restocked,
    SettleRefund,
)

QUANTITY_MAX = 10
RESTOCK_MAX = 1_000_000_000


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


class Policy(msgspec.Struct, frozen=True):
    """Decision parameters from configuration; events record their effect, so replay needs none."""

    hold_ttl_ms: int = 900_000
    cancel_window_ms: int = 86_400_000


class OrderRecord(msgspec.Struct, frozen=True, array_like=True, gc=False):
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


class ProductState(msgspec.Struct):
    terms: ProductTerms | None = None
    stock: int = 0
    reserved: int = 0
    sold: int = 0
    orders: dict[str, OrderRecord] = {}
    # Units in pending and confirmed orders, per user (the per-user limit counts these).
    units_by_user: dict[str, int] = {}
    # (user_id, idempotency_key) -> order id; keys are scoped to the user.
    order_by_key: dict[tuple[str, str], str] = {}
    order_by_payment: dict[str, str] = {}
    # (expires_at_ms, order_id) of pending orders; entries of settled orders are dropped lazily.
    holds: list[tuple[int, str]] = []
    last_seq: int = 0

    @property
    def available(self) -> int:
        return self.stock - self.reserved - self.sold


Reply = OrderRecord | Rejection | None


class Snapshot(msgspec.Struct, array_like=True, gc=False):
    """A state as a snapshot keeps it: its orders and the layout of the hold heap. Every index is
    derived again on restore, sharing the orders' strings, so a restored state is no larger than
    the live one and the snapshot holds each id once."""

    terms: ProductTerms | None
    stock: int
    last_seq: int
    orders: list[OrderRecord]
    holds: list[tuple[int, int]]  # (expires_at_ms, position in `orders`), in heap order


def snapshot_of(state: ProductState) -> Snapshot:
    position = {order_id: i for i, order_id in enumerate(state.orders)}
    return Snapshot(state.terms, state.stock, state.last_seq, list(state.orders.values()),
                    [(expires_at, position[order_id]) for expires_at, order_id in state.holds])


def restore(snapshot: Snapshot) -> ProductState:
    """The state a snapshot was taken of, equal to it field by field."""
    orders = snapshot.orders
    state = ProductState(
        snapshot.terms,
        snapshot.stock,
        orders={o.order_id: o for o in orders},
        order_by_key={(o.user_id, o.idempotency_key): o.order_id for o in orders},
        order_by_payment={o.payment_id: o.order_id for o in orders if o.payment_id is not None},
        holds=[(expires_at_ms, orders[i].order_id) for expires_at_ms, i in snapshot.holds],
        last_seq=snapshot.last_seq,
    )
    units = state.units_by_user
    for o in orders:
        if o.status is OrderStatus.PENDING:
            state.reserved += o.quantity
        elif o.status is OrderStatus.CONFIRMED:
            state.sold += o.quantity
        else:
            continue
        units[o.user_id] = units.get(o.user_id, 0) + o.quantity
    return state


def decide(
    state: ProductState, cmd: Command, now_ms: int, policy: Policy
) -> tuple[Event, ...] | Rejection:
    """Validate `cmd`; an empty tuple means "accepted, nothing changes" (a duplicate)."""
    if isinstance(cmd, DefineProduct):
        return _define(state, cmd, now_ms)
    if state.terms is None:
        return Rejection.NOT_FOUND
    match cmd:
        case PlaceOrder():
            return _place(state, state.terms, cmd, now_ms, policy)
        case CapturePayment():
            return _capture(state, state.terms, cmd, now_ms)
        case FailPayment(order_id=order_id):
            order = state.orders.get(order_id)
            if order is None:
                return Rejection.NOT_FOUND
            if order.status is not OrderStatus.PENDING:
                return ()  # a failure reported after the order settled changes nothing
            return (OrderFailed(order_id, now_ms),)
        case ExpireHolds():
            return tuple(OrderExpired(order_id, now_ms) for order_id in due_holds(state, now_ms))
        case CancelOrder():
            return _cancel(state, cmd, now_ms, policy)
        case Restock(quantity=quantity):
            if not 1 <= quantity <= RESTOCK_MAX:
                return Rejection.VALIDATION_ERROR
            return (Restocked(quantity, now_ms),)
        case SettleRefund(order_id=order_id, succeeded=succeeded):
            order = state.orders.get(order_id)
            if order is None:
                return Rejection.NOT_FOUND
            if order.refund_status is not RefundStatus.PENDING:
                return ()
            return (RefundSettled(order_id, succeeded, now_ms),)
    raise TypeError(f"unknown command {cmd!r}")


def _define(
    state: ProductState, cmd: DefineProduct, now_ms: int
) -> tuple[Event, ...] | Rejection:
    terms = cmd.terms
    if state.terms is not None:
        same = state.terms == terms and state.stock == cmd.stock
        return () if same else Rejection.VALIDATION_ERROR
    valid = (
        cmd.stock >= 0
        and terms.price_minor >= 0
        and terms.per_user_limit >= 1
        and terms.sale_starts_at_ms < terms.sale_ends_at_ms
    )
    return (ProductDefined(terms, cmd.stock, now_ms),) if valid else Rejection.VALIDATION_ERROR


def _place(
    state: ProductState, terms: ProductTerms, cmd: PlaceOrder, now_ms: int, policy: Policy
) -> tuple[Event, ...] | Rejection:
    if not 1 <= cmd.quantity <= QUANTITY_MAX:
        return Rejection.VALIDATION_ERROR
    existing = state.order_by_key.get((cmd.user_id, cmd.idempotency_key))
    if existing is not None:
        same_request = state.orders[existing].quantity == cmd.quantity
        return () if same_request else Rejection.IDEMPOTENCY_KEY_REUSED
    if cmd.order_id in state.orders:
        return Rejection.VALIDATION_ERROR
    if not terms.sale_starts_at_ms <= now_ms < terms.sale_ends_at_ms:
        return Rejection.SALE_NOT_ACTIVE
    if state.units_by_user.get(cmd.user_id, 0) + cmd.quantity > terms.per_user_limit:
        return Rejection.PURCHASE_LIMIT_EXCEEDED
    if state.available < cmd.quantity:
        return Rejection.OUT_OF_STOCK
    expires_at_ms = now_ms + policy.hold_ttl_ms
    return (
        OrderPlaced(
            cmd.order_id,
            cmd.user_id,
            cmd.idempotency_key,
            cmd.quantity,
            terms.price_minor,
            now_ms,
            expires_at_ms,
        ),
    )


def _capture(
    state: ProductState, terms: ProductTerms, cmd: CapturePayment, now_ms: int
) -> tuple[Event, ...] | Rejection:
    order = state.orders.get(cmd.order_id)
    if order is None:
        return Rejection.NOT_FOUND
    if cmd.amount_minor != order.total_minor or cmd.currency != terms.currency:
        return Rejection.PAYMENT_MISMATCH
    owner = state.order_by_payment.get(cmd.payment_id)
    if owner is not None:
        return () if owner == cmd.order_id else Rejection.INVALID_ORDER_STATE
    if order.payment_id is not None:
        return Rejection.INVALID_ORDER_STATE  # a second, different payment for one order
    if order.status is OrderStatus.PENDING:
        return (OrderConfirmed(cmd.order_id, cmd.payment_id, now_ms, rereserved=False),)
    # A late payment: the hold lapsed. Take the units again if the rules still allow it.
    held_by_user = state.units_by_user.get(order.user_id, 0)
    if state.available >= order.quantity and held_by_user + order.quantity <= terms.per_user_limit:
        return (OrderConfirmed(cmd.order_id, cmd.payment_id, now_ms, rereserved=True),)
    return (RefundRequired(cmd.order_id, cmd.payment_id, cmd.amount_minor, now_ms),)


def _cancel(
    state: ProductState, cmd: CancelOrder, now_ms: int, policy: Policy
) -> tuple[Event, ...] | Rejection:
    order = state.orders.get(cmd.order_id)
    if order is None or order.user_id != cmd.user_id:
        return Rejection.NOT_FOUND  # another user's order does not exist for this caller
    if order.status is not OrderStatus.CONFIRMED or order.confirmed_at_ms is None:
        return Rejection.INVALID_ORDER_STATE
    if now_ms > order.confirmed_at_ms + policy.cancel_window_ms:
        return Rejection.CANCELLATION_WINDOW_CLOSED
    return (OrderCancelled(cmd.order_id, order.total_minor, now_ms),)


def due_holds(state: ProductState, now_ms: int) -> list[str]:
    """Pending orders whose hold has lapsed, oldest first, read from the heap without popping."""
    due: list[str] = []
    frontier: list[tuple[int, str, int]] = []
    if state.holds:
        frontier.append((*state.holds[0], 0))
    while frontier:
        expires_at_ms, order_id, index = heapq.heappop(frontier)
        if expires_at_ms > now_ms:
            break
        if state.orders[order_id].status is OrderStatus.PENDING:
            due.append(order_id)
        for child in (2 * index + 1, 2 * index + 2):
            if child < len(state.holds):
                heapq.heappush(frontier, (*state.holds[child], child))
    return due


def apply(state: ProductState, event: Event) -> None:
    """Fold one logged event into the state. Validation happened in `decide`: this never fails."""
    match event:
        case ProductDefined(terms=terms, stock=stock):
            state.terms = terms
            state.stock = stock
        case OrderPlaced():
            state.orders[event.order_id] = OrderRecord(
                event.order_id,
                event.user_id,
                event.idempotency_key,
                event.quantity,
                event.unit_price_minor,
                OrderStatus.PENDING,
                event.at_ms,
                event.expires_at_ms,
                event.at_ms,
            )
            state.reserved += event.quantity
            units = state.units_by_user
            units[event.user_id] = units.get(event.user_id, 0) + event.quantity
            state.order_by_key[event.user_id, event.idempotency_key] = event.order_id
            heapq.heappush(state.holds, (event.expires_at_ms, event.order_id))
            return  # a new hold settles none
        case OrderConfirmed(order_id=order_id, payment_id=payment_id, at_ms=at_ms):
            order = state.orders[order_id]
            if event.rereserved:
                _add_units(state, order.user_id, order.quantity)
            else:
                state.reserved -= order.quantity
            state.sold += order.quantity
            state.order_by_payment[payment_id] = order_id
            _update(state, order, status=OrderStatus.CONFIRMED, confirmed_at_ms=at_ms,
                    payment_id=payment_id, updated_at_ms=at_ms)
        case OrderFailed(order_id=order_id, at_ms=at_ms) | OrderExpired(
            order_id=order_id, at_ms=at_ms
        ):
            order = state.orders[order_id]
            state.reserved -= order.quantity
            _add_units(state, order.user_id, -order.quantity)
            status = OrderStatus.FAILED if isinstance(event, OrderFailed) else OrderStatus.EXPIRED
            _update(state, order, status=status, updated_at_ms=at_ms)
        case OrderCancelled(order_id=order_id, refund_amount_minor=amount, at_ms=at_ms):
            order = state.orders[order_id]
            state.sold -= order.quantity
            _add_units(state, order.user_id, -order.quantity)
            _update(state, order, status=OrderStatus.CANCELLED, refund_status=RefundStatus.PENDING,
                    refund_amount_minor=amount, updated_at_ms=at_ms)
        case RefundRequired(order_id=order_id, payment_id=payment_id, at_ms=at_ms):
            state.order_by_payment[payment_id] = order_id
            _update(state, state.orders[order_id], payment_id=payment_id,
                    refund_status=RefundStatus.PENDING, refund_amount_minor=event.amount_minor,
                    updated_at_ms=at_ms)
        case RefundSettled(order_id=order_id, succeeded=succeeded, at_ms=at_ms):
            settled = RefundStatus.PROCESSED if succeeded else RefundStatus.FAILED
            _update(state, state.orders[order_id], refund_status=settled, updated_at_ms=at_ms)
        case Restocked(quantity=quantity):
            state.stock += quantity
    _drop_settled_holds(state)


def _update(state: ProductState, order: OrderRecord, **changes: object) -> None:
    state.orders[order.order_id] = msgspec.structs.replace(order, **changes)


def _add_units(state: ProductState, user_id: str, delta: int) -> None:
    units = state.units_by_user.get(user_id, 0) + delta
    if units:
        state.units_by_user[user_id] = units
    else:
        del state.units_by_user[user_id]


def _drop_settled_holds(state: ProductState) -> None:
    holds = state.holds
    while holds and state.orders[holds[0][1]].status is not OrderStatus.PENDING:
        heapq.heappop(holds)


def reply_for(state: ProductState, cmd: Command) -> OrderRecord | None:
    """The order a command concerns, as it stands after the command."""
    match cmd:
        case PlaceOrder(user_id=user_id, idempotency_key=key):
            return state.orders[state.order_by_key[user_id, key]]
        case CapturePayment(order_id=order_id) | FailPayment(order_id=order_id) | CancelOrder(
            order_id=order_id
        ) | SettleRefund(order_id=order_id):
            return state.orders[order_id]
    return None


def execute(
    state: ProductState, cmd: Command, now_ms: int, policy: Policy
) -> tuple[Reply, tuple[Event, ...]]:
    """Decide and apply one command; returns the caller's reply and the events to log."""
    decision = decide(state, cmd, now_ms, policy)
    if isinstance(decision, Rejection):
        return decision, ()
    for event in decision:
        apply(state, event)
    return reply_for(state, cmd), decision
