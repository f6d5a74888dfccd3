"""The auditor itself: `check_invariants` names each broken invariant of SPEC §6 that a log can
hold. Only events that `decide` would have refused break one, so each case folds such events."""

import pytest

from flashsale.actors.invariants import check_invariants
from flashsale.actors.messages import (
    Event,
    OrderCancelled,
    OrderConfirmed,
    OrderPlaced,
    ProductDefined,
    ProductTerms,
)
from flashsale.actors.product import ProductState, Shopper, apply

STOCK = 3
LIMIT = 2
PRICE = 1_000


def folded(*events: Event) -> ProductState:
    state = ProductState()
    for event in (ProductDefined(ProductTerms("prod", PRICE, "INR", 0, 3_600_000, LIMIT), STOCK,
                                 0), *events):
        apply(state, event)
    return state


def placed(order_id: str, user_id: str, quantity: int = 1) -> OrderPlaced:
    return OrderPlaced(order_id, user_id, f"key-{order_id}", quantity, PRICE, 1, 600_000)


def paid(order_id: str, payment_id: str) -> OrderConfirmed:
    return OrderConfirmed(order_id, payment_id, 2, rereserved=False)


def test_a_state_within_the_rules_has_no_problem() -> None:
    state = folded(placed("a", "ann", 2), placed("b", "bob"), paid("a", "pay-a"),
                   OrderCancelled("a", 2 * PRICE, 3))
    assert check_invariants(state) == []


@pytest.mark.parametrize(
    ("events", "problem"),
    [
        ((placed("a", "ann", 2), placed("b", "bob", 2)),
         "negative count: available=-1 reserved=4 sold=0"),
        ((placed("a", "ann", 2), placed("b", "ann")), "user ann holds 3 units, above the limit 2"),
        ((placed("a", "ann"), placed("b", "bob"), paid("a", "pay-1"), paid("b", "pay-1")),
         "payment pay-1 is recorded for 2 orders"),
        ((placed("a", "ann"), paid("a", "pay-a"), OrderCancelled("a", PRICE + 1, 3)),
         "order a refunds more than it captured"),
    ],
    ids=["oversold", "over-the-limit", "one-payment-two-orders", "over-refunded"],
)
def test_each_broken_invariant_is_named(events: tuple[Event, ...], problem: str) -> None:
    assert check_invariants(folded(*events)) == [problem]


def test_counts_and_indexes_that_drift_from_the_orders_are_named() -> None:
    state = folded(placed("a", "ann"), placed("b", "bob"), paid("b", "pay-b"))
    state.reserved += 1
    state.shoppers["ann"].units += 1
    state.shoppers["cat"] = Shopper()
    state.order_by_payment["pay-b"] = "a"
    assert check_invariants(state) == [
        "orders hold 1 and sold 1 units but counters say reserved=2 sold=1",
        "per-user unit counts disagree with the orders",
        "user cat is kept with no units and no order",
        "the payment index disagrees with the orders",
    ]
