"""One example per rule and per rejection of the pure product core."""

import msgspec
import pytest

from flashsale.actors.invariants import check_invariants
from flashsale.actors.messages import (
    CancelOrder,
    CapturePayment,
    Command,
    DefineProduct,
    Event,
    ExpireHolds,
    FailPayment,
    ForgetSettled,
    OrderConfirmed,
    OrderExpired,
    OrderRecord,
    OrderStatus,
    PlaceOrder,
    ProductTerms,
    RefundRequired,
    RefundStatus,
    Rejection,
    Restock,
    SettleRefund,
)
from flashsale.actors.product import (
    STOCK_MAX,
    Policy,
    ProductState,
    Reply,
    execute,
)
from flashsale.persistence.replay import decode_state, encode_state

START_MS = 1_000_000
END_MS = START_MS + 3_600_000
PRICE = 49_900
POLICY = Policy(hold_ttl_ms=60_000, cancel_window_ms=300_000)


class Sale:
    """A product under test: runs commands and checks the invariants after each one."""

    def __init__(self, stock: int = 5, limit: int = 2) -> None:
        self.state = ProductState()
        self.now_ms = START_MS
        self.events: list[Event] = []
        self._ids = 0
        terms = ProductTerms("prod", PRICE, "INR", START_MS, END_MS, limit)
        reply, _ = self.run(DefineProduct(terms, stock))
        assert reply is None

    def run(self, cmd: Command, at_ms: int | None = None) -> tuple[Reply, tuple[Event, ...]]:
        reply, events = execute(self.state, cmd, self.now_ms if at_ms is None else at_ms, POLICY)
        self.events.extend(events)
        assert check_invariants(self.state) == []
        return reply, events

    def place(self, user: str = "alice", quantity: int = 1, key: str | None = None) -> Reply:
        self._ids += 1
        cmd = PlaceOrder(f"order-{self._ids}", user, key or f"key-{self._ids}", quantity)
        return self.run(cmd)[0]

    def capture(self, order_id: str, payment_id: str = "pay_1", amount: int | None = None,
                currency: str = "INR") -> tuple[Reply, tuple[Event, ...]]:
        order = self.state.orders[order_id]
        amount = order.total_minor if amount is None else amount
        return self.run(CapturePayment(order_id, payment_id, amount, currency))

    def counts(self) -> tuple[int, int, int]:
        return self.state.available, self.state.reserved, self.state.sold


def placed(reply: Reply) -> str:
    assert not isinstance(reply, Rejection) and reply is not None, reply
    return reply.order_id


def test_commands_before_the_product_exists_are_not_found() -> None:
    reply, events = execute(ProductState(), PlaceOrder("o", "u", "k", 1), START_MS, POLICY)
    assert (reply, events) == (Rejection.NOT_FOUND, ())


def test_defining_a_product_twice_with_other_terms_is_refused() -> None:
    sale = Sale()
    other = ProductTerms("prod", PRICE + 1, "INR", START_MS, END_MS, 2)
    assert sale.run(DefineProduct(other, 5))[0] is Rejection.VALIDATION_ERROR
    assert sale.run(DefineProduct(sale.state.terms, 5)) == (None, ())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stock", "price", "limit", "ends_at_ms"),
    [(-1, PRICE, 2, END_MS), (STOCK_MAX + 1, PRICE, 2, END_MS), (5, -1, 2, END_MS),
     (5, PRICE, 0, END_MS), (5, PRICE, 2, START_MS)],
    ids=["negative-stock", "stock-too-large", "negative-price", "no-unit-per-user",
         "window-ends-as-it-starts"],
)
def test_a_product_with_impossible_terms_is_refused(
    stock: int, price: int, limit: int, ends_at_ms: int
) -> None:
    terms = ProductTerms("prod", price, "INR", START_MS, ends_at_ms, limit)
    state = ProductState()
    assert execute(state, DefineProduct(terms, stock), START_MS, POLICY) == (
        Rejection.VALIDATION_ERROR, ())
    assert state.terms is None


def test_a_new_order_under_an_id_already_taken_is_refused() -> None:
    sale = Sale(stock=5)
    first = sale.place(user="alice")
    reply, events = sale.run(PlaceOrder(placed(first), "bob", "k", 1))
    assert (reply, events) == (Rejection.VALIDATION_ERROR, ())
    assert sale.state.orders[placed(first)] == first and sale.counts() == (4, 1, 0)


def test_an_order_known_from_the_read_model_answers_only_its_own_user_and_key() -> None:
    sale = Sale(stock=5, limit=5)
    bobs = sale.place(user="bob", key="k")
    assert not isinstance(bobs, Rejection) and bobs is not None
    alices = sale.run(PlaceOrder("alice-1", "alice", "k", 1, known=bobs))[0]
    assert placed(alices) == "alice-1" and sale.counts() == (3, 2, 0)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(OrderStatus.PENDING, Rejection.NOT_FOUND), (OrderStatus.FAILED, OrderStatus.CONFIRMED)],
)
def test_only_a_settled_order_the_product_forgot_comes_back_with_its_payment(
    status: OrderStatus, expected: object
) -> None:
    """The product forgets settled orders only: one known as pending that it does not hold is
    not its own."""
    other = Sale()
    known = other.state.orders[placed(other.place())]
    known = msgspec.structs.replace(known, status=status)
    sale = Sale()
    reply, _ = sale.run(CapturePayment(known.order_id, "pay_1", PRICE, "INR", known))
    assert (reply.status if isinstance(reply, OrderRecord) else reply) == expected


@pytest.mark.parametrize("quantity", [0, -1, 11])
def test_quantity_outside_1_to_10_is_a_validation_error(quantity: int) -> None:
    assert Sale(stock=50, limit=20).place(quantity=quantity) is Rejection.VALIDATION_ERROR


@pytest.mark.parametrize("offset_ms", [-1, END_MS - START_MS])
def test_orders_outside_the_sale_window_are_refused(offset_ms: int) -> None:
    sale = Sale()
    sale.now_ms = START_MS + offset_ms
    assert sale.place() is Rejection.SALE_NOT_ACTIVE


def test_an_order_reserves_units_until_its_hold_expires() -> None:
    sale = Sale(stock=5)
    order = sale.place(quantity=2)
    assert not isinstance(order, Rejection) and order is not None
    assert order.status is OrderStatus.PENDING
    assert order.expires_at_ms == START_MS + POLICY.hold_ttl_ms
    assert order.total_minor == 2 * PRICE
    assert sale.counts() == (3, 2, 0)


def test_never_more_units_than_are_available() -> None:
    sale = Sale(stock=3, limit=10)
    placed(sale.place(user="a", quantity=2))
    assert sale.place(user="b", quantity=2) is Rejection.OUT_OF_STOCK
    placed(sale.place(user="b", quantity=1))
    assert sale.place(user="c") is Rejection.OUT_OF_STOCK
    assert sale.counts() == (0, 3, 0)


def test_per_user_limit_counts_pending_and_confirmed_orders() -> None:
    sale = Sale(stock=10, limit=2)
    first = placed(sale.place(user="alice"))
    sale.capture(first)
    placed(sale.place(user="alice"))
    assert sale.place(user="alice") is Rejection.PURCHASE_LIMIT_EXCEEDED
    assert sale.place(user="bob", quantity=3) is Rejection.PURCHASE_LIMIT_EXCEEDED
    placed(sale.place(user="bob", quantity=2))


def test_limit_is_checked_before_stock() -> None:
    sale = Sale(stock=1, limit=1)
    placed(sale.place(user="alice"))
    assert sale.place(user="alice") is Rejection.PURCHASE_LIMIT_EXCEEDED
    assert sale.place(user="bob") is Rejection.OUT_OF_STOCK


def test_an_expired_hold_frees_the_users_limit_and_the_units() -> None:
    sale = Sale(stock=1, limit=1)
    placed(sale.place(user="alice"))
    sale.now_ms += POLICY.hold_ttl_ms
    sale.run(ExpireHolds())
    assert sale.counts() == (1, 0, 0)
    placed(sale.place(user="alice"))


def test_same_key_same_request_returns_the_first_order_and_logs_nothing() -> None:
    sale = Sale(stock=5)
    first = sale.place(key="k", quantity=1)
    reply, events = sale.run(PlaceOrder("other-id", "alice", "k", 1), at_ms=sale.now_ms + 5)
    assert reply == first and events == ()
    assert sale.counts() == (4, 1, 0)


def test_same_key_returns_the_original_even_after_the_order_moved_on() -> None:
    sale = Sale(stock=5)
    order_id = placed(sale.place(key="k"))
    sale.now_ms += POLICY.hold_ttl_ms
    sale.run(ExpireHolds())
    reply, events = sale.run(PlaceOrder("retry", "alice", "k", 1))
    assert placed(reply) == order_id and events == ()


def test_same_key_different_request_is_refused() -> None:
    sale = Sale(stock=5)
    placed(sale.place(key="k", quantity=1))
    assert sale.place(key="k", quantity=2) is Rejection.IDEMPOTENCY_KEY_REUSED


def test_idempotency_keys_are_scoped_to_the_user() -> None:
    sale = Sale(stock=5)
    mine = placed(sale.place(user="alice", key="k"))
    theirs = placed(sale.place(user="bob", key="k"))
    assert mine != theirs and sale.counts() == (3, 2, 0)


def test_a_captured_payment_confirms_a_pending_order_once() -> None:
    sale = Sale(stock=5)
    order_id = placed(sale.place(quantity=2))
    reply, events = sale.capture(order_id, "pay_1")
    assert isinstance(events[0], OrderConfirmed) and not events[0].rereserved
    assert placed(reply) == order_id and sale.state.orders[order_id].status is OrderStatus.CONFIRMED
    assert sale.counts() == (3, 0, 2)
    reply, events = sale.capture(order_id, "pay_1")  # a redelivered webhook: no change
    assert placed(reply) == order_id and events == ()
    assert sale.capture(order_id, "pay_2")[0] is Rejection.INVALID_ORDER_STATE
    assert sale.counts() == (3, 0, 2)


@pytest.mark.parametrize(("amount_delta", "currency"), [(-1, "INR"), (1, "INR"), (0, "USD")])
def test_a_payment_that_does_not_match_the_order_confirms_nothing(
    amount_delta: int, currency: str
) -> None:
    sale = Sale()
    order_id = placed(sale.place())
    reply, events = sale.capture(order_id, amount=PRICE + amount_delta, currency=currency)
    assert (reply, events) == (Rejection.PAYMENT_MISMATCH, ())
    assert sale.state.orders[order_id].status is OrderStatus.PENDING


def test_a_payment_id_belongs_to_one_order() -> None:
    sale = Sale(stock=5, limit=5)
    first, second = placed(sale.place()), placed(sale.place())
    sale.capture(first, "pay_1")
    assert sale.capture(second, "pay_1")[0] is Rejection.INVALID_ORDER_STATE
    assert sale.state.orders[second].status is OrderStatus.PENDING


def test_capture_for_an_unknown_order_is_not_found() -> None:
    sale = Sale()
    cmd = CapturePayment("nope", "pay_1", PRICE, "INR")
    assert sale.run(cmd)[0] is Rejection.NOT_FOUND


def test_a_failed_payment_releases_the_units() -> None:
    sale = Sale(stock=2)
    order_id = placed(sale.place(quantity=2))
    reply, _ = sale.run(FailPayment(order_id))
    assert not isinstance(reply, Rejection) and reply is not None
    assert reply.status is OrderStatus.FAILED and sale.counts() == (2, 0, 0)


def test_a_failure_reported_after_capture_changes_nothing() -> None:
    sale = Sale()
    order_id = placed(sale.place())
    sale.capture(order_id)
    assert sale.run(FailPayment(order_id))[1] == ()
    assert sale.state.orders[order_id].status is OrderStatus.CONFIRMED


def test_holds_expire_exactly_at_expires_at_and_not_before() -> None:
    sale = Sale(stock=5, limit=5)
    early = placed(sale.place())
    sale.now_ms += 1_000
    late = placed(sale.place())
    expiry = sale.state.orders[early].expires_at_ms
    assert sale.run(ExpireHolds(), at_ms=expiry - 1)[1] == ()
    _, events = sale.run(ExpireHolds(), at_ms=expiry)
    assert events == (OrderExpired(early, expiry),)
    assert sale.state.orders[late].status is OrderStatus.PENDING
    later = expiry + 10_000
    assert sale.run(ExpireHolds(), at_ms=later)[1] == (OrderExpired(late, later),)


def test_a_late_payment_rereserves_when_units_are_available() -> None:
    sale = Sale(stock=5)
    order_id = placed(sale.place(quantity=2))
    sale.now_ms += POLICY.hold_ttl_ms
    sale.run(ExpireHolds())
    _, events = sale.capture(order_id)
    assert isinstance(events[0], OrderConfirmed) and events[0].rereserved
    assert sale.state.orders[order_id].status is OrderStatus.CONFIRMED
    assert sale.counts() == (3, 0, 2)


def test_a_late_payment_is_refunded_when_the_units_are_gone() -> None:
    sale = Sale(stock=1)
    order_id = placed(sale.place(user="alice"))
    sale.run(FailPayment(order_id))
    placed(sale.place(user="bob"))
    reply, events = sale.capture(order_id, "pay_late")
    assert events == (RefundRequired(order_id, "pay_late", PRICE, sale.now_ms),)
    assert not isinstance(reply, Rejection) and reply is not None
    assert reply.status is OrderStatus.FAILED
    assert (reply.refund_status, reply.refund_amount_minor) == (RefundStatus.PENDING, PRICE)
    assert sale.counts() == (0, 1, 0)
    assert sale.capture(order_id, "pay_late")[1] == ()  # redelivery: one refund only


def test_a_late_payment_is_refunded_when_it_would_break_the_user_limit() -> None:
    sale = Sale(stock=5, limit=1)
    order_id = placed(sale.place(user="alice"))
    sale.now_ms += POLICY.hold_ttl_ms
    sale.run(ExpireHolds())
    placed(sale.place(user="alice"))
    _, events = sale.capture(order_id, "pay_late")
    assert isinstance(events[0], RefundRequired)


def test_cancel_within_the_window_returns_units_and_owes_a_refund() -> None:
    sale = Sale(stock=5)
    order_id = placed(sale.place(quantity=2))
    sale.capture(order_id)
    sale.now_ms += POLICY.cancel_window_ms
    reply, _ = sale.run(CancelOrder(order_id, "alice"))
    assert not isinstance(reply, Rejection) and reply is not None
    assert reply.status is OrderStatus.CANCELLED
    assert (reply.refund_status, reply.refund_amount_minor) == (RefundStatus.PENDING, 2 * PRICE)
    assert sale.counts() == (5, 0, 0)
    assert sale.run(CancelOrder(order_id, "alice"))[0] is (
        Rejection.INVALID_ORDER_STATE
    )


def test_cancel_after_the_window_is_refused() -> None:
    sale = Sale()
    order_id = placed(sale.place())
    sale.capture(order_id)
    sale.now_ms += POLICY.cancel_window_ms + 1
    cmd = CancelOrder(order_id, "alice")
    assert sale.run(cmd)[0] is Rejection.CANCELLATION_WINDOW_CLOSED


def test_only_confirmed_orders_can_be_cancelled() -> None:
    sale = Sale()
    order_id = placed(sale.place())
    assert sale.run(CancelOrder(order_id, "alice"))[0] is (
        Rejection.INVALID_ORDER_STATE
    )


def test_another_users_order_does_not_exist_for_them() -> None:
    sale = Sale()
    order_id = placed(sale.place(user="alice"))
    sale.capture(order_id)
    assert sale.run(CancelOrder(order_id, "mallory"))[0] is Rejection.NOT_FOUND
    assert sale.state.orders[order_id].status is OrderStatus.CONFIRMED


def test_restock_adds_units_and_rejects_nonsense() -> None:
    sale = Sale(stock=1, limit=5)
    placed(sale.place())
    sale.run(Restock(3))
    assert sale.counts() == (3, 1, 0) and sale.state.stock == 4
    assert sale.run(Restock(0))[0] is Rejection.VALIDATION_ERROR


def test_restock_stops_at_the_most_units_a_sale_holds() -> None:
    sale = Sale(stock=STOCK_MAX - 5)
    assert sale.run(Restock(6)) == (Rejection.VALIDATION_ERROR, ())
    sale.run(Restock(5))
    assert sale.state.stock == STOCK_MAX
    assert sale.run(Restock(1)) == (Rejection.VALIDATION_ERROR, ())


def test_a_refund_settles_once() -> None:
    sale = Sale()
    order_id = placed(sale.place())
    sale.capture(order_id)
    sale.run(CancelOrder(order_id, "alice"))
    assert sale.run(SettleRefund(order_id, True))[1] != ()
    assert sale.state.orders[order_id].refund_status is RefundStatus.PROCESSED
    assert sale.run(SettleRefund(order_id, False))[1] == ()
    assert sale.state.orders[order_id].refund_status is RefundStatus.PROCESSED


def test_a_settled_orders_hold_leaves_memory() -> None:
    sale = Sale(stock=5)
    paid, failed = placed(sale.place()), placed(sale.place())
    sale.capture(paid)
    sale.run(FailPayment(failed))
    assert sale.state.holds == []


def test_a_key_reused_while_its_order_was_forgotten_stays_with_the_new_order() -> None:
    """The old order may come back (a late payment) and be forgotten again; the key keeps
    answering with the order placed under it meanwhile, also after a snapshot."""
    sale = Sale(stock=5)
    old = placed(sale.place(key="k"))
    sale.run(FailPayment(old))
    known = sale.state.orders[old]
    sale.run(ForgetSettled())
    new = placed(sale.place(key="k"))
    assert new != old

    def answer_to_key(state: ProductState) -> str:
        return placed(execute(state, PlaceOrder("again", "alice", "k", 1), sale.now_ms,
                              POLICY)[0])

    sale.run(CapturePayment(old, "pay_late", PRICE, "INR", known))
    assert sale.state.orders[old].status is OrderStatus.CONFIRMED
    assert answer_to_key(sale.state) == new
    assert answer_to_key(decode_state(encode_state(sale.state))) == new
    sale.run(CancelOrder(old, "alice"))
    sale.run(SettleRefund(old, True))
    sale.run(ForgetSettled())
    assert old not in sale.state.orders
    assert answer_to_key(sale.state) == new


def test_folding_the_events_rebuilds_the_state_and_snapshots_round_trip() -> None:
    from flashsale.actors.product import apply

    sale = Sale(stock=3, limit=3)
    a, b = placed(sale.place(quantity=2)), placed(sale.place())
    sale.capture(a)
    sale.run(FailPayment(b))
    rebuilt = ProductState()
    for event in sale.events:
        apply(rebuilt, event)
    assert rebuilt == sale.state
    assert decode_state(encode_state(sale.state)) == sale.state
