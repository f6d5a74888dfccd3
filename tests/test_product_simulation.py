"""Seeded simulation of one product: random command streams, invariants checked after every step.

Set FLASHSALE_SIM_SEEDS (a count or a comma-separated list) and FLASHSALE_SIM_STEPS to run more.
"""

import os
import random
from collections import Counter

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
    OrderRecord,
    OrderStatus,
    PlaceOrder,
    ProductTerms,
    Rejection,
    Restock,
    SettleRefund,
)
from flashsale.actors.product import (
    Policy,
    ProductState,
    apply,
    apply_all,
    execute,
)
from flashsale.persistence.replay import decode_state, encode_state

POLICY = Policy(hold_ttl_ms=60_000, cancel_window_ms=120_000, forget_settled_after_ms=20_000)
USERS = [f"user-{n}" for n in range(80)]


def _seeds() -> list[int]:
    raw = os.environ.get("FLASHSALE_SIM_SEEDS", "5")
    return [int(s) for s in raw.split(",")] if "," in raw else list(range(int(raw)))


STEPS = int(os.environ.get("FLASHSALE_SIM_STEPS", "10000"))


class Auditor:
    """Checks what the invariants alone cannot see: once-only confirmation, idempotent replies,
    and that folding the emitted events reproduces the live state. Also plays the front end and
    its orders read model, which outlives the product's memory of settled orders."""

    def __init__(self) -> None:
        self.read_model: dict[str, OrderRecord] = {}
        self.read_model_by_key: dict[tuple[str, str], OrderRecord] = {}
        self.shadow = ProductState()
        self.log: list[Event] = []
        self.confirmations: Counter[str] = Counter()
        self.first_reply: dict[tuple[str, str], tuple[str, int]] = {}
        self.seen: Counter[str] = Counter()

    def screen(self, cmd: Command) -> Command:
        """What the front end adds from the read model: the order a key or a payment is about."""
        if isinstance(cmd, PlaceOrder):
            known = self.read_model_by_key.get((cmd.user_id, cmd.idempotency_key))
            return msgspec.structs.replace(cmd, known=known)
        if isinstance(cmd, CapturePayment):
            return msgspec.structs.replace(cmd, known=self.read_model.get(cmd.order_id))
        return cmd

    def record(self, state: ProductState, cmd: Command, reply: object,
               events: tuple[Event, ...]) -> None:
        problems = check_invariants(state)
        assert problems == [], problems
        self._update_read_model(state, events)
        for event in events:
            apply(self.shadow, event)
            self.log.append(event)
            self.seen[type(event).__name__] += 1
            if isinstance(event, OrderConfirmed):
                self.confirmations[event.order_id] += 1
                assert self.confirmations[event.order_id] == 1, "order confirmed twice"
        # Every prefix of the log must replay to a state that keeps the invariants.
        assert check_invariants(self.shadow) == []
        if isinstance(reply, Rejection):
            self.seen[reply.value] += 1
            assert events == (), "a rejected command must log nothing"
        if isinstance(cmd, PlaceOrder):
            self._check_idempotency(cmd, reply)

    def _update_read_model(self, state: ProductState, events: tuple[Event, ...]) -> None:
        for event in events:
            order_id = getattr(event, "order_id", None)
            if order_id is not None:
                order = state.orders[order_id]
                self.read_model[order_id] = order
                self.read_model_by_key[order.user_id, order.idempotency_key] = order
        for order_id, order in self.read_model.items():
            if order_id in state.orders:
                assert state.orders[order_id] == order, "the read model lags the product"
            else:
                assert order.settled, f"order {order_id} was forgotten unsettled"

    def _check_idempotency(self, cmd: PlaceOrder, reply: object) -> None:
        slot = (cmd.user_id, cmd.idempotency_key)
        first = self.first_reply.get(slot)
        if first is None:
            if isinstance(reply, OrderRecord):
                self.first_reply[slot] = (reply.order_id, cmd.quantity)
            return
        order_id, quantity = first
        if cmd.quantity == quantity:
            assert isinstance(reply, OrderRecord) and reply.order_id == order_id
        elif 1 <= cmd.quantity <= 10:
            assert reply is Rejection.IDEMPOTENCY_KEY_REUSED


class Shoppers:
    """A random but reproducible crowd, with retries, conflicts, late and duplicate payments."""

    def __init__(self, rng: random.Random, start_ms: int) -> None:
        self.rng = rng
        self.now_ms = start_ms
        self.next_id = 0
        self.payments: list[tuple[str, str]] = []

    def _fresh(self, prefix: str) -> str:
        self.next_id += 1
        return f"{prefix}-{self.next_id}"

    def _tick_clock(self) -> None:
        roll = self.rng.random()
        if roll < 0.01:
            self.now_ms += self.rng.randint(POLICY.hold_ttl_ms // 2, POLICY.cancel_window_ms)
        elif roll < 0.015:
            self.now_ms -= self.rng.randint(0, 5_000)  # the wall clock stepped back
        elif roll < 0.3:
            pass  # the actor decides a whole batch at one instant
        else:
            self.now_ms += self.rng.randint(0, 800)

    def next_command(self, read_model: dict[str, OrderRecord]) -> Command:
        """A command about any order ever placed, forgotten by the product or not."""
        self._tick_clock()
        rng = self.rng
        orders = list(read_model.values())
        roll = rng.random()
        if roll < 0.45 or not orders:
            quantity = rng.choice([1, 1, 1, 2, 3, rng.randint(-1, 12)])
            key = f"key-{rng.randint(0, 6)}"
            return PlaceOrder(self._fresh("order"), rng.choice(USERS), key, quantity)
        order = rng.choice(orders)
        if roll < 0.65:
            return self._capture(order)
        if roll < 0.72:
            return FailPayment(order.order_id)
        if roll < 0.82:
            return ExpireHolds()
        if roll < 0.90:
            owner = order.user_id if rng.random() < 0.9 else rng.choice(USERS)
            return CancelOrder(order.order_id, owner)
        if roll < 0.95:
            return SettleRefund(order.order_id, rng.random() < 0.8)
        if roll < 0.99:
            return ForgetSettled()
        return Restock(rng.choice([1, 2, 5, 0]))

    def _capture(self, order: OrderRecord) -> Command:
        rng = self.rng
        amount, currency = order.total_minor, "INR"
        if rng.random() < 0.05:
            amount += rng.choice([-1, 1])
        if rng.random() < 0.02:
            currency = "USD"
        if self.payments and rng.random() < 0.3:
            order_id, payment_id = rng.choice(self.payments)  # a redelivered or stray webhook
            if rng.random() < 0.7:
                return CapturePayment(order_id, payment_id, amount, currency)
            return CapturePayment(order.order_id, payment_id, amount, currency)
        payment_id = self._fresh("pay")
        self.payments.append((order.order_id, payment_id))
        return CapturePayment(order.order_id, payment_id, amount, currency)


def simulate(seed: int, steps: int) -> Auditor:
    rng = random.Random(seed)
    start_ms = 1_700_000_000_000
    # The sale opens a little after the first command and closes before the last ones.
    terms = ProductTerms("product", rng.randint(1, 100_000), "INR", start_ms + 30_000,
                         start_ms + steps * 700, rng.randint(1, 4))
    state, auditor = ProductState(), Auditor()
    shoppers = Shoppers(rng, start_ms)
    commands: list[Command] = [DefineProduct(terms, rng.randint(3, 25))]
    for step in range(steps):
        cmd = auditor.screen(commands.pop() if commands else
                             shoppers.next_command(auditor.read_model))
        try:
            reply, events = execute(state, cmd, shoppers.now_ms, POLICY)
            auditor.record(state, cmd, reply, events)
            if step % 50 == 0:
                assert auditor.shadow == state, "folded events differ from the live state"
                assert decode_state(encode_state(state)) == state, "a snapshot differs"
        except AssertionError as error:
            raise AssertionError(f"seed={seed} step={step} command={cmd!r}: {error}") from error
    return auditor


def _fold_by_records(log: list[Event], rng: random.Random) -> ProductState:
    """Fold the log as replay does, a record of random length at a time through `apply_all`,
    checked after each record against folding its events one by one."""
    by_record, by_event = ProductState(), ProductState()
    start = 0
    while start < len(log):
        record = log[start:start + rng.randint(1, 40)]
        apply_all(by_record, record)
        for event in record:
            apply(by_event, event)
        assert by_record == by_event, f"the record of events {start}.. folds differently"
        start += len(record)
    return by_record


@pytest.mark.parametrize("seed", _seeds())
def test_random_shoppers_never_break_the_invariants(seed: int) -> None:
    auditor = simulate(seed, STEPS)
    state = auditor.shadow
    assert _fold_by_records(auditor.log, random.Random(seed)) == state, (
        f"seed={seed}: replay from scratch differs")
    assert decode_state(encode_state(state)) == state
    # The stream must have exercised every path, or the checks above proved little.
    expected = {
        "OrderPlaced", "OrderConfirmed", "OrderFailed", "OrderExpired", "OrderCancelled",
        "RefundRequired", "RefundSettled", "Restocked", "OrdersForgotten", "OrderRecalled",
        *(rejection.value for rejection in Rejection),
    }
    missing = expected - set(auditor.seen)
    assert not missing, f"seed={seed}: the stream never produced {sorted(missing)}"
    statuses = {order.status for order in state.orders.values()}
    assert OrderStatus.CONFIRMED in statuses or OrderStatus.CANCELLED in statuses
