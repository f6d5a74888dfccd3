"""SPEC §6 invariants 1, 2 and 4 for one product, recomputed from its orders: what replay, the
simulation and the tests check after every step."""

from collections import Counter

from flashsale.actors.messages import OrderStatus
from flashsale.actors.product import ProductState


def check_invariants(state: ProductState) -> list[str]:
    """The broken invariants, each described in a line; empty when all hold."""
    problems: list[str] = []
    if min(state.available, state.reserved, state.sold) < 0:
        problems.append(
            f"negative count: available={state.available} reserved={state.reserved} "
            f"sold={state.sold}"
        )
    pending = confirmed = 0
    units: dict[str, int] = {}
    for order in state.orders.values():
        if order.refund_amount_minor > order.total_minor:
            problems.append(f"order {order.order_id} refunds more than it captured")
        if order.status is OrderStatus.PENDING:
            pending += order.quantity
        elif order.status is OrderStatus.CONFIRMED:
            confirmed += order.quantity
        else:
            continue
        units[order.user_id] = units.get(order.user_id, 0) + order.quantity
    if (pending, confirmed) != (state.reserved, state.sold):
        problems.append(
            f"orders hold {pending} and sold {confirmed} units but counters say "
            f"reserved={state.reserved} sold={state.sold}"
        )
    if units != {user_id: s.units for user_id, s in state.shoppers.items() if s.units}:
        problems.append("per-user unit counts disagree with the orders")
    problems += [f"user {user_id} is kept with no units and no order"
                 for user_id, s in state.shoppers.items() if s.idle]
    limit = state.terms.per_user_limit if state.terms else 0
    for user_id, held in units.items():
        if held > limit:
            problems.append(f"user {user_id} holds {held} units, above the limit {limit}")
    payments = Counter(o.payment_id for o in state.orders.values() if o.payment_id is not None)
    problems += [f"payment {payment_id} is recorded for {orders} orders"
                 for payment_id, orders in payments.items() if orders > 1]
    indexed = {o.payment_id: o.order_id for o in state.orders.values()
               if o.payment_id is not None}
    if indexed != state.order_by_payment:
        problems.append("the payment index disagrees with the orders")
    return problems
