"""The product's brain: `decide` validates a command against the state and returns events or a
rejection; `apply` folds one event into the state and never fails. No I/O, no clock.
"""

import heapq
from itertools import repeat
from operator import attrgetter

import msgspec

from flashsale.actors.messages import (
    CancelOrder,
    CapturePayment,
    Command,
    DefineProduct,
    Event,
    ExpireHolds,
    FailPayment,
    ForgetSettled,
    OrderCancelled,
    OrderConfirmed,
    OrderExpired,
    OrderFailed,
    OrderPlaced,
    OrderRecalled,
    OrderRecord,
    OrdersForgotten,
    OrderStatus,
    PlaceOrder,
    ProductDefined,
    ProductTerms,
    RefundRequired,
    RefundSettled,
    RefundStatus,
    Rejection,
    Restock,
    Restocked,
    SettleRefund,
)

QUANTITY_MAX = 10
# The most units a sale ever holds: its counts are stored as PostgreSQL integers (int4).
STOCK_MAX = 1_000_000_000


class Policy(msgspec.Struct, frozen=True):
    """Decision parameters from configuration; events record their effect, so replay needs none."""

    hold_ttl_ms: int = 900_000
    cancel_window_ms: int = 86_400_000
    # Settled orders stay in memory this long; at 0, until the product's next batch or timer
    # tick. Only speed depends on it: the front end brings a forgotten order back with the
    # commands about it (it reads the read model for every order and webhook anyway). Short
    # keeps memory near the live orders, also when holds churn fast: `bench core`'s churned
    # sale left its actor at 83-84 MB with 1 s, 65-69 MB with 200 ms and 56-57 MB with 0.
    forget_settled_after_ms: int = 0


class Shopper(msgspec.Struct, gc=False):
    """One user of one sale: the units of their pending and confirmed orders, which the per-user
    limit counts, and their orders by idempotency key (keys are scoped to the user).

    Both sit under the user's id, so a new order looks up one table as large as the sale, not
    two. A first lookup there misses the CPU's caches: the second table cost 0.4 µs an order,
    measured apart. Most shoppers place one order, so its key is kept inline; a dict of keys for
    each would take more memory than the rest of their order."""

    units: int = 0
    # The earliest key still indexed and its order; None once the shopper has no key left.
    key: str | None = None
    order_id: str | None = None
    more: dict[str, str] | None = None  # later keys, in the order they were indexed

    def order_with(self, key: str) -> str | None:
        if key == self.key:
            return self.order_id
        return self.more.get(key) if self.more else None

    def index(self, key: str, order_id: str) -> None:
        """A key indexed already stays with its order (see `_index`)."""
        if self.key is None:
            self.key, self.order_id = key, order_id
        elif key != self.key:
            if self.more is None:
                self.more = {}
            self.more.setdefault(key, order_id)

    def unindex(self, key: str, order_id: str) -> None:
        """Drop a key if it is still this order's. The next key moves inline, so the layout
        depends only on the order keys were indexed in, as a snapshot's restore sees it."""
        if key == self.key and order_id == self.order_id:
            if self.more:
                self.key = next(iter(self.more))
                self.order_id = self.more.pop(self.key)
            else:
                self.key = self.order_id = None
        elif self.more and self.more.get(key) == order_id:
            del self.more[key]
        if not self.more:
            self.more = None

    @property
    def idle(self) -> bool:
        return not self.units and self.key is None


class ProductState(msgspec.Struct):
    terms: ProductTerms | None = None
    stock: int = 0
    reserved: int = 0
    sold: int = 0
    orders: dict[str, OrderRecord] = {}
    # By user id; a user with no units and no key indexed has none.
    shoppers: dict[str, Shopper] = {}
    order_by_payment: dict[str, str] = {}
    # (expires_at_ms, order_id) of pending orders; entries of orders that settled (or were
    # forgotten since) leave lazily, when they reach the top.
    holds: list[tuple[int, str]] = []
    # (settled_at_ms, order_id) in the order orders settled: what ForgetSettled works through.
    settled: list[tuple[int, str]] = []
    last_seq: int = 0

    @property
    def available(self) -> int:
        return self.stock - self.reserved - self.sold


Reply = OrderRecord | Rejection | None


class Snapshot(msgspec.Struct, array_like=True, gc=False):
    """A state as a snapshot keeps it: its orders, and its hold heap and settled queue as they are
    laid out. Every index is derived again on restore, sharing the orders' strings, so a restored
    state is no larger than the live one."""

    terms: ProductTerms | None
    stock: int
    last_seq: int
    orders: list[OrderRecord]
    holds: list[tuple[int, str]]  # a hold may outlive its order, forgotten since
    settled: list[tuple[int, str]]


def snapshot_of(state: ProductState) -> Snapshot:
    """No loop in Python: the product waits while its snapshot is taken and encoded."""
    return Snapshot(state.terms, state.stock, state.last_seq, list(state.orders.values()),
                    state.holds, state.settled)


def restore(snapshot: Snapshot) -> ProductState:
    """The state a snapshot was taken of, equal to it field by field."""
    orders = {o.order_id: o for o in snapshot.orders}
    state = ProductState(
        snapshot.terms,
        snapshot.stock,
        orders=orders,
        order_by_payment={o.payment_id: o.order_id for o in orders.values()
                          if o.payment_id is not None},
        holds=[(at, order.order_id if (order := orders.get(i)) else i)
               for at, i in snapshot.holds],
        settled=[(at, orders[i].order_id) for at, i in snapshot.settled],
        last_seq=snapshot.last_seq,
    )
    for o in snapshot.orders:
        shopper = _shopper(state, o.user_id)
        shopper.index(o.idempotency_key, o.order_id)  # as `_index` does
        if o.status is OrderStatus.PENDING:
            state.reserved += o.quantity
        elif o.status is OrderStatus.CONFIRMED:
            state.sold += o.quantity
        else:
            continue
        shopper.units += o.quantity
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
        case ForgetSettled():
            return _forget(state, now_ms, policy)
        case CancelOrder():
            return _cancel(state, cmd, now_ms, policy)
        case Restock(quantity=quantity):
            if not 1 <= quantity <= STOCK_MAX - state.stock:
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
        0 <= cmd.stock <= STOCK_MAX
        and terms.price_minor >= 0
        and terms.per_user_limit >= 1
        and terms.sale_starts_at_ms < terms.sale_ends_at_ms
    )
    return (ProductDefined(terms, cmd.stock, now_ms),) if valid else Rejection.VALIDATION_ERROR


def _place(
    state: ProductState, terms: ProductTerms, cmd: PlaceOrder, now_ms: int, policy: Policy
) -> tuple[OrderPlaced, ...] | Rejection:
    if not 1 <= cmd.quantity <= QUANTITY_MAX:
        return Rejection.VALIDATION_ERROR
    shopper = state.shoppers.get(cmd.user_id)
    earlier = _placed_with_key(state, cmd, shopper)
    if earlier is not None:
        return () if earlier.quantity == cmd.quantity else Rejection.IDEMPOTENCY_KEY_REUSED
    if cmd.order_id in state.orders:
        return Rejection.VALIDATION_ERROR
    if not terms.sale_starts_at_ms <= now_ms < terms.sale_ends_at_ms:
        return Rejection.SALE_NOT_ACTIVE
    if _units_held(shopper) + cmd.quantity > terms.per_user_limit:
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


def _placed_with_key(
    state: ProductState, cmd: PlaceOrder, shopper: Shopper | None
) -> OrderRecord | None:
    """The order this user placed with this key before, in memory or as the front end found it
    in the read model (the product may have forgotten it)."""
    existing = shopper.order_with(cmd.idempotency_key) if shopper is not None else None
    if existing is not None:
        return state.orders[existing]
    known = cmd.known
    if known and (known.user_id, known.idempotency_key) == (cmd.user_id, cmd.idempotency_key):
        return known
    return None


def _capture(
    state: ProductState, terms: ProductTerms, cmd: CapturePayment, now_ms: int
) -> tuple[Event, ...] | Rejection:
    order = state.orders.get(cmd.order_id)
    recalled: tuple[Event, ...] = ()
    if order is None:
        known = cmd.known  # only an order the product forgot may come back, and only settled
        if known is None or known.order_id != cmd.order_id or not known.settled:
            return Rejection.NOT_FOUND
        order, recalled = known, (OrderRecalled(known),)
    if cmd.amount_minor != order.total_minor or cmd.currency != terms.currency:
        return Rejection.PAYMENT_MISMATCH
    if order.payment_id == cmd.payment_id:
        return ()  # this payment is already recorded
    if cmd.payment_id in state.order_by_payment or order.payment_id is not None:
        return Rejection.INVALID_ORDER_STATE  # a payment of another order, or a second payment
    if order.status is OrderStatus.PENDING:
        return (OrderConfirmed(cmd.order_id, cmd.payment_id, now_ms, rereserved=False),)
    # A late payment: the hold lapsed. Take the units again if the rules still allow it.
    held_by_user = _units_held(state.shoppers.get(order.user_id))
    if state.available >= order.quantity and held_by_user + order.quantity <= terms.per_user_limit:
        return (*recalled, OrderConfirmed(cmd.order_id, cmd.payment_id, now_ms, rereserved=True))
    return (*recalled, RefundRequired(cmd.order_id, cmd.payment_id, cmd.amount_minor, now_ms))


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


def _forget(state: ProductState, now_ms: int, policy: Policy) -> tuple[Event, ...]:
    """Settled orders older than the policy's delay, taken from the front of the settled queue.
    Entries of orders that changed since they settled are consumed without forgetting."""
    cutoff = now_ms - policy.forget_settled_after_ms
    forgotten: list[str] = []
    consumed = 0
    for settled_at_ms, order_id in state.settled:
        if settled_at_ms > cutoff:
            break
        order = state.orders[order_id]
        if order.settled and order.updated_at_ms == settled_at_ms:
            forgotten.append(order_id)
        consumed += 1
    return (OrdersForgotten(forgotten, consumed, now_ms),) if consumed else ()


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
        if _pending(state, order_id):
            due.append(order_id)
        for child in (2 * index + 1, 2 * index + 2):
            if child < len(state.holds):
                heapq.heappush(frontier, (*state.holds[child], child))
    return due


def apply(state: ProductState, event: Event) -> None:
    """Fold one logged event into the state. Validation happened in `decide`: this never fails."""
    match event:
        case OrderPlaced():  # first: the most frequent event by far
            _add_order(state, event)
            return  # a new hold settles none
        case ProductDefined(terms=terms, stock=stock):
            state.terms = terms
            state.stock = stock
        case OrderRecalled(order=order):
            state.orders[order.order_id] = order
            _index(state, order)
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
            state.settled.append((at_ms, order_id))
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
            outcome = RefundStatus.PROCESSED if succeeded else RefundStatus.FAILED
            _update(state, state.orders[order_id], refund_status=outcome, updated_at_ms=at_ms)
            if state.orders[order_id].settled:
                state.settled.append((at_ms, order_id))
        case OrdersForgotten(order_ids=order_ids, consumed=consumed):
            gone = set(order_ids)
            state.settled = [entry for entry in state.settled[consumed:] if entry[1] not in gone]
            for order_id in order_ids:
                order = state.orders.pop(order_id)
                shopper = state.shoppers.get(order.user_id)
                if shopper is not None:  # gone if a later order took its key (see `_index`)
                    shopper.unindex(order.idempotency_key, order_id)
                    _let_go_if_idle(state, order.user_id, shopper)
                if order.payment_id is not None:
                    del state.order_by_payment[order.payment_id]
        case Restocked(quantity=quantity):
            state.stock += quantity
    _drop_settled_holds(state)


def apply_all(state: ProductState, events: list[Event]) -> None:
    """Fold logged events in order, as `apply` one by one would: how replay folds a record.
    Its runs of new orders are folded together (`_add_orders`)."""
    placed: list[OrderPlaced] = []
    for event in events:
        if type(event) is OrderPlaced:
            placed.append(event)
            continue
        if placed:
            _add_orders(state, placed)
            placed = []
        apply(state, event)
    if placed:
        _add_orders(state, placed)


_PLACED_COLUMNS = tuple(attrgetter(field) for field in (
    "order_id", "user_id", "idempotency_key", "quantity", "unit_price_minor", "at_ms",
    "expires_at_ms"))


def _add_orders(state: ProductState, placed: list[OrderPlaced]) -> None:
    """`_add_order` for each, in C loops over columns rather than a Python loop over events: a
    record of new orders from new shoppers, most of what a sale's recovery folds, took 1.0
    against 1.4 s per 1,000,000 orders. Orders of shoppers the state already has, or with two
    orders among these, go one by one."""
    order_ids, user_ids, keys, quantities, prices, at_ms, expires_at_ms = (
        list(map(column, placed)) for column in _PLACED_COLUMNS)
    shoppers = state.shoppers
    if len(set(user_ids)) < len(user_ids) or not shoppers.keys().isdisjoint(user_ids):
        for event in placed:
            _add_order(state, event)
        return
    state.orders.update(zip(order_ids, map(
        OrderRecord, order_ids, user_ids, keys, quantities, prices, repeat(OrderStatus.PENDING),
        at_ms, expires_at_ms, at_ms), strict=True))
    shoppers.update(zip(user_ids, map(Shopper, quantities, keys, order_ids), strict=True))
    state.reserved += sum(quantities)
    for hold in zip(expires_at_ms, order_ids, strict=True):
        heapq.heappush(state.holds, hold)


def _add_order(state: ProductState, event: OrderPlaced) -> OrderRecord:
    order = state.orders[event.order_id] = OrderRecord(
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
    shopper = state.shoppers.get(event.user_id)
    if shopper is None:  # a new shopper, most of a sale's orders: one insert, no dict
        state.shoppers[event.user_id] = Shopper(event.quantity, event.idempotency_key,
                                                event.order_id)
    else:
        shopper.units += event.quantity
        shopper.index(event.idempotency_key, event.order_id)
    heapq.heappush(state.holds, (event.expires_at_ms, event.order_id))
    return order


def _index(state: ProductState, order: OrderRecord) -> None:
    """Index an order that comes back; a key its order's absence let someone reuse stays theirs."""
    _shopper(state, order.user_id).index(order.idempotency_key, order.order_id)
    if order.payment_id is not None:
        state.order_by_payment[order.payment_id] = order.order_id


def _update(state: ProductState, order: OrderRecord, **changes: object) -> None:
    state.orders[order.order_id] = msgspec.structs.replace(order, **changes)


def _shopper(state: ProductState, user_id: str) -> Shopper:
    shopper = state.shoppers.get(user_id)
    if shopper is None:
        shopper = state.shoppers[user_id] = Shopper()
    return shopper


def _units_held(shopper: Shopper | None) -> int:
    return shopper.units if shopper is not None else 0


def _add_units(state: ProductState, user_id: str, delta: int) -> None:
    shopper = _shopper(state, user_id)  # a recalled order's shopper may have gone
    shopper.units += delta
    _let_go_if_idle(state, user_id, shopper)


def _let_go_if_idle(state: ProductState, user_id: str, shopper: Shopper) -> None:
    if shopper.idle:
        del state.shoppers[user_id]


def _pending(state: ProductState, order_id: str) -> bool:
    order = state.orders.get(order_id)
    return order is not None and order.status is OrderStatus.PENDING


def _drop_settled_holds(state: ProductState) -> None:
    holds = state.holds
    while holds and not _pending(state, holds[0][1]):
        heapq.heappop(holds)


def reply_for(state: ProductState, cmd: Command) -> OrderRecord | None:
    """The order a command concerns, as it stands after the command."""
    match cmd:
        case PlaceOrder(order_id=order_id):
            placed = state.orders.get(order_id)  # the common case: this command placed it
            if placed is not None and (placed.user_id == cmd.user_id
                                       and placed.idempotency_key == cmd.idempotency_key):
                return placed
            return _placed_with_key(state, cmd, state.shoppers.get(cmd.user_id))
        case CapturePayment(order_id=order_id, known=known):
            return state.orders.get(order_id, known)
        case FailPayment(order_id=order_id) | CancelOrder(order_id=order_id) | SettleRefund(
            order_id=order_id
        ):
            return state.orders[order_id]
    return None


def execute(
    state: ProductState, cmd: Command, now_ms: int, policy: Policy
) -> tuple[Reply, tuple[Event, ...]]:
    """Decide and apply one command; returns the caller's reply and the events to log.

    A new order, most of what a product hears, goes straight to `_place` and `_add_order`, the
    steps `decide`, `apply` and `reply_for` would take it through: a quarter of its time was
    their dispatch."""
    decision: tuple[Event, ...] | Rejection
    if type(cmd) is PlaceOrder and state.terms is not None:
        placed = _place(state, state.terms, cmd, now_ms, policy)
        if placed and not isinstance(placed, Rejection):
            return _add_order(state, placed[0]), placed
        decision = placed  # refused, or a duplicate answered with the earlier order
    else:
        decision = decide(state, cmd, now_ms, policy)
    if isinstance(decision, Rejection):
        return decision, ()
    for event in decision:
        apply(state, event)
    return reply_for(state, cmd), decision
