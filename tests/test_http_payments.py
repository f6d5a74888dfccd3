"""Payments through the sandbox provider over real HTTP: the checkout page, its signed webhooks,
late payments, refunds, and forged or mismatched webhooks."""

import asyncio
import json
import re
import time
import uuid
from typing import Any

import pytest
from conftest import ApiFactory
from helpers import SANDBOX_SECRET, Api, forgotten, link_path

from flashsale.actors.messages import Rejection
from flashsale.http.routes_payments import decide_payment
from flashsale.payments.provider import EventKind, PaymentEvent
from flashsale.payments.sandbox import SandboxGateway
from flashsale.persistence.orders import order_by_id

PRICE = 49_900


async def checkout(api: Api, payment_url: str) -> tuple[str, dict[str, Any]]:
    """Open the payment link like a browser; returns the page and its pre-signed webhooks."""
    async with api.session.get(link_path(payment_url)) as reply:
        assert reply.status == 200 and reply.content_type == "text/html"
        page = await reply.text()
    match = re.search(r"const webhooks = (\{.*?\});\n", page)
    return page, json.loads(match[1]) if match else {}


async def send(api: Api, body: str | bytes, signature: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Sandbox-Signature"] = signature
    async with api.session.post("/webhooks/sandbox", data=body, headers=headers) as reply:
        return reply.status, await reply.json(content_type=None)


async def press(api: Api, webhooks: dict[str, Any], button: str) -> tuple[int, Any]:
    return await send(api, webhooks[button]["body"], webhooks[button]["signature"])


async def order_of(api: Api, token: str, order_id: str) -> dict[str, Any]:
    status, order, _ = await api.call("GET", f"/orders/{order_id}", token)
    assert status == 200
    return order


async def wait_for(api: Api, token: str, order_id: str, field: str, value: str,
                   timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        order = await order_of(api, token, order_id)
        if order[field] == value or time.monotonic() > deadline:
            return order
        await asyncio.sleep(0.1)


async def shopper_with_order(api: Api, product_id: str) -> tuple[str, dict[str, Any]]:
    _, token = await api.register()
    status, placed = await api.order(token, product_id)
    assert status == 201
    return token, placed


async def test_paying_on_the_checkout_page_confirms_the_order(api: Api) -> None:
    product_id = await api.sale(stock=3)
    token, placed = await shopper_with_order(api, product_id)
    page, webhooks = await checkout(api, placed["payment_url"])
    assert "Sandbox checkout" in page and placed["order_id"] in page and "499.00 INR" in page
    assert SANDBOX_SECRET not in page
    body = json.loads(webhooks["pay"]["body"])
    assert body["type"] == "payment.captured" and body["amount"] == PRICE
    assert body["order_id"] == placed["order_id"] and body["currency"] == "INR"

    status, reply = await press(api, webhooks, "pay")
    assert (status, reply["status"]) == (200, "processed")
    order = await order_of(api, token, placed["order_id"])
    assert (order["status"], order["payment_provider"], order["payment_id"]) == (
        "confirmed", "sandbox", body["payment_id"])
    assert order["confirmed_at"] is not None and order["payment_url"] is None
    # The session is created once: a second visit offers the same payment.
    _, again = await checkout(api, placed["payment_url"])
    assert again == {}  # the order is settled, so the page has nothing to pay


@pytest.mark.parametrize(("currency", "total"), [("JPY", "49900 JPY"), ("KWD", "49.900 KWD")])
async def test_the_checkout_page_reads_the_price_in_the_currency_s_own_units(
    api: Api, currency: str, total: str
) -> None:
    """A yen has no minor unit and a dinar has three: a price of 49,900 is neither 499.00."""
    product_id = await api.sale(stock=1, currency=currency)
    _, placed = await shopper_with_order(api, product_id)
    page, _ = await checkout(api, placed["payment_url"])
    assert f"= <strong>{total}</strong>" in page


async def test_the_fail_button_fails_the_order_and_releases_the_units(api: Api) -> None:
    product_id = await api.sale(stock=1)
    token, placed = await shopper_with_order(api, product_id)
    _, webhooks = await checkout(api, placed["payment_url"])
    status, reply = await press(api, webhooks, "fail")
    assert (status, reply["status"]) == (200, "processed")
    assert (await order_of(api, token, placed["order_id"]))["status"] == "failed"
    _, other = await api.register()
    assert (await api.order(other, product_id))[0] == 201  # the unit came back


async def test_a_late_payment_is_confirmed_when_units_remain(api: Api) -> None:
    product_id = await api.sale(stock=2)
    token, placed = await shopper_with_order(api, product_id)
    _, webhooks = await checkout(api, placed["payment_url"])
    await press(api, webhooks, "fail")
    status, reply = await press(api, webhooks, "pay")
    assert (status, reply["status"]) == (200, "processed")
    order = await order_of(api, token, placed["order_id"])
    assert (order["status"], order["refund_status"]) == ("confirmed", "none")


async def test_a_late_payment_is_refunded_when_the_units_are_gone(api: Api) -> None:
    product_id = await api.sale(stock=1)
    token, placed = await shopper_with_order(api, product_id)
    _, webhooks = await checkout(api, placed["payment_url"])
    await press(api, webhooks, "fail")
    await shopper_with_order(api, product_id)  # someone else takes the unit
    await press(api, webhooks, "pay")
    order = await wait_for(api, token, placed["order_id"], "refund_status", "processed")
    assert (order["status"], order["refund_status"], order["refund_amount"]) == (
        "failed", "processed", PRICE)


async def test_cancel_refunds_through_the_gateway(api: Api) -> None:
    product_id = await api.sale(stock=2)
    token, placed = await shopper_with_order(api, product_id)
    _, webhooks = await checkout(api, placed["payment_url"])
    await press(api, webhooks, "pay")
    status, cancelled, _ = await api.call("POST", f"/orders/{placed['order_id']}/cancel", token,
                                          {"reason": "duplicate purchase"})
    assert status == 200 and cancelled["refund_amount"] == PRICE
    order = await wait_for(api, token, placed["order_id"], "refund_status", "processed")
    assert (order["status"], order["refund_amount"]) == ("cancelled", PRICE)
    attempts = await api.engine.db.fetchval(
        "SELECT attempts FROM refund_attempts WHERE order_id = $1", placed["order_id"])
    assert attempts == 1  # one gateway call, one refund


async def test_a_refund_journaled_before_a_restart_is_still_made(api: Api) -> None:
    product_id = await api.sale(stock=2)
    token, placed = await shopper_with_order(api, product_id)
    _, webhooks = await checkout(api, placed["payment_url"])
    await press(api, webhooks, "pay")
    await api.engine.payment_worker.stop()  # the process dies after the journal, before the call
    await api.call("POST", f"/orders/{placed['order_id']}/cancel", token, {})
    await asyncio.sleep(0.5)
    assert (await order_of(api, token, placed["order_id"]))["refund_status"] == "pending"
    assert await api.engine.payment_worker.run_once() == 1  # a new worker finds it in the journal
    order = await wait_for(api, token, placed["order_id"], "refund_status", "processed")
    assert order["refund_amount"] == PRICE


async def test_a_refund_outcome_must_match_the_refund_and_changes_a_settled_one_nothing(
    make_api: ApiFactory,
) -> None:
    api = await make_api(forget_settled_after_ms=0)
    product_id = await api.sale(stock=2)
    token, placed = await shopper_with_order(api, product_id)
    order_id = placed["order_id"]
    _, webhooks = await checkout(api, placed["payment_url"])
    await press(api, webhooks, "pay")
    await api.engine.payment_worker.stop()  # the refund's outcomes come from this test instead
    await api.call("POST", f"/orders/{order_id}/cancel", token, {})
    gateway = SandboxGateway(SANDBOX_SECRET, "")

    async def outcome(kind: EventKind, amount: int) -> tuple[int, Any]:
        body = gateway.event(kind, order_id, "pay_r", amount, "INR")
        return await send(api, body, gateway.sign(body))

    assert await outcome(EventKind.REFUNDED, PRICE - 1) == (200, {
        "status": "ignored",
        "outcome": f"rejected: {PRICE - 1} INR does not match the order's {PRICE} INR"})
    assert (await order_of(api, token, order_id))["refund_status"] == "pending"
    assert await outcome(EventKind.REFUNDED, PRICE) == (
        200, {"status": "processed", "outcome": "processed"})
    await forgotten(api.engine.router.actor(product_id), order_id)
    # The refund reported again, as a new event, once its order's product has forgotten it.
    assert await outcome(EventKind.REFUNDED, PRICE) == (
        200, {"status": "processed", "outcome": "processed"})
    order = await order_of(api, token, order_id)
    assert (order["status"], order["refund_status"]) == ("cancelled", "processed")


async def test_forged_webhooks_are_refused_before_anything_else(api: Api) -> None:
    product_id = await api.sale(stock=2)
    token, placed = await shopper_with_order(api, product_id)
    _, webhooks = await checkout(api, placed["payment_url"])
    body = webhooks["pay"]["body"]
    forger = SandboxGateway("not-the-secret", "")
    for signature in (None, "", "00" * 32, forger.sign(body.encode())):
        status, reply = await send(api, body, signature)
        assert (status, reply["code"]) == (401, "invalid_token")
    tampered = body.replace(f'"amount":{PRICE}', '"amount":1')
    status, _ = await send(api, tampered, webhooks["pay"]["signature"])
    assert status == 401
    assert (await order_of(api, token, placed["order_id"]))["status"] == "pending"
    assert await api.engine.db.fetchval("SELECT count(*) FROM webhook_events") == 0


async def test_signed_events_that_do_not_match_the_order_or_hold_nul_confirm_nothing(
    api: Api,
) -> None:
    product_id = await api.sale(stock=2)
    token, placed = await shopper_with_order(api, product_id)
    gateway = SandboxGateway(SANDBOX_SECRET, "")
    for amount, currency in ((PRICE - 1, "INR"), (PRICE, "USD")):
        body = gateway.event(EventKind.CAPTURED, placed["order_id"], "pay_x", amount, currency)
        status, reply = await send(api, body, gateway.sign(body))
        assert (status, reply["status"]) == (200, "ignored")
        assert reply["outcome"].startswith("rejected")
    for order_id in (str(uuid.uuid4()), "not-an-order-id"):
        unknown = gateway.event(EventKind.CAPTURED, order_id, "pay_y", PRICE, "INR")
        status, reply = await send(api, unknown, gateway.sign(unknown))
        assert (status, reply["status"], reply["outcome"]) == (200, "ignored",
                                                               "ignored: unknown order")
    other_type = json.dumps({"id": "evt_z", "type": "payout.paid", "order_id": placed["order_id"],
                             "payment_id": "p", "amount": PRICE, "currency": "INR"}).encode()
    status, reply = await send(api, other_type, gateway.sign(other_type))
    assert (status, reply["status"]) == (200, "ignored")
    for field in ("id", "payment_id"):  # PostgreSQL text cannot hold NUL
        with_nul = json.dumps({"id": "evt_n", "type": "payment.captured", "currency": "INR",
                               "order_id": placed["order_id"], "payment_id": "pay_n",
                               "amount": PRICE, field: "nul\x00"}).encode()
        status, reply = await send(api, with_nul, gateway.sign(with_nul))
        assert (status, reply["status"]) == (200, "ignored"), reply
    assert (await order_of(api, token, placed["order_id"]))["status"] == "pending"
    assert await api.engine.db.fetchval("SELECT count(*) FROM webhook_events") == 7


async def test_the_same_webhook_ten_times_at_once_changes_the_order_once(api: Api) -> None:
    product_id = await api.sale(stock=5)
    token, placed = await shopper_with_order(api, product_id)
    _, webhooks = await checkout(api, placed["payment_url"])
    replies = await asyncio.gather(*(press(api, webhooks, "pay") for _ in range(10)))
    assert {status for status, _ in replies} == {200}
    status, reply = await press(api, webhooks, "fail")  # late and out of order: no effect
    assert status == 200
    order = await order_of(api, token, placed["order_id"])
    assert order["status"] == "confirmed"
    await asyncio.sleep(1.1)
    _, product, _ = await api.call("GET", f"/products/{product_id}")
    assert (product["sold"], product["reserved"], product["available"]) == (1, 0, 4)
    kept = await api.engine.db.fetchval("SELECT count(*) FROM webhook_events")
    assert kept == 2  # one payload per event id, redeliveries deduplicated


async def test_payment_links_are_signed_per_order(api: Api) -> None:
    product_id = await api.sale(stock=5, limit=2)
    _, first = await shopper_with_order(api, product_id)
    _, second = await shopper_with_order(api, product_id)
    token = second["payment_url"].split("token=", 1)[1]
    for path in (f"/pay/{first['order_id']}?token={token}", f"/pay/{first['order_id']}",
                 f"/pay/{first['order_id']}?token=garbage"):
        status, body, _ = await api.call("GET", path)
        assert (status, body["code"]) == (401, "invalid_token")
    assert (await api.call("GET", "/webhooks/health"))[:2] == (200, {"status": "ok"})


async def test_a_lapsed_payment_link_shows_how_its_order_ended(make_api: ApiFactory) -> None:
    """A shopper who opens the link after the hold lapsed sees a page, not a token error."""
    api = await make_api(hold_ttl_ms=1_000)
    token, placed = await shopper_with_order(api, await api.sale(stock=1))
    await wait_for(api, token, placed["order_id"], "status", "expired")
    page, webhooks = await checkout(api, placed["payment_url"])
    assert "Order expired" in page and placed["order_id"] in page and webhooks == {}


async def test_orders_the_product_forgot_still_answer_retries_payments_and_cancels(
    make_api: ApiFactory,
) -> None:
    api = await make_api(forget_settled_after_ms=0)
    product_id = await api.sale(stock=2)
    _, token = await api.register()
    status, placed = await api.order(token, product_id, key="forgotten-key")
    assert status == 201
    _, webhooks = await checkout(api, placed["payment_url"])
    await press(api, webhooks, "fail")
    actor = api.engine.router.actor(product_id)
    await forgotten(actor, placed["order_id"])

    # Idempotency keys outlive the product's memory: the read model answers for it.
    assert await api.order(token, product_id, key="forgotten-key") == (201, placed)
    status, body = await api.order(token, product_id, quantity=2, key="forgotten-key")
    assert (status, body["code"]) == (422, "idempotency_key_reused")
    status, body, _ = await api.call("POST", f"/orders/{placed['order_id']}/cancel", token, {})
    assert (status, body["code"]) == (409, "invalid_order_state")
    # The gateway reporting the failure again, as a new event, changes nothing, as in memory.
    gateway = SandboxGateway(SANDBOX_SECRET, "")
    again = gateway.event(EventKind.FAILED, placed["order_id"], "pay_f", PRICE, "INR")
    assert await send(api, again, gateway.sign(again)) == (
        200, {"status": "processed", "outcome": "processed"})
    # A late payment brings the order back: confirmed, the unit taken again.
    status, reply = await press(api, webhooks, "pay")
    assert (status, reply["status"]) == (200, "processed")
    order = await order_of(api, token, placed["order_id"])
    assert (order["status"], order["refund_status"]) == ("confirmed", "none")
    counts = await actor.counts.remote()
    assert (counts.available, counts.sold) == (1, 1)


async def test_a_payment_sent_with_a_row_older_than_the_products_memory_still_lands(
    make_api: ApiFactory,
) -> None:
    """The race a busy product allows: the webhook read the order while it was pending, and by
    the time the capture reached the product the order had failed and been forgotten."""
    api = await make_api(forget_settled_after_ms=0)
    product_id = await api.sale(stock=2)
    token, placed = await shopper_with_order(api, product_id)
    stale = await order_by_id(api.engine.db, placed["order_id"])
    _, webhooks = await checkout(api, placed["payment_url"])
    await press(api, webhooks, "fail")
    actor = api.engine.router.actor(product_id)
    await forgotten(actor, placed["order_id"])

    # A repeated failure read with the same old row changes nothing, and is not refused.
    failure = PaymentEvent("evt_stale_fail", EventKind.FAILED, placed["order_id"], "pay_stale",
                           PRICE, "INR")
    assert not isinstance(await decide_payment(api.engine, failure, stale), Rejection)
    capture = PaymentEvent("evt_stale", EventKind.CAPTURED, placed["order_id"], "pay_stale",
                           PRICE, "INR")
    reply = await decide_payment(api.engine, capture, stale)
    assert not isinstance(reply, Rejection)
    order = await order_of(api, token, placed["order_id"])
    assert (order["status"], order["payment_id"]) == ("confirmed", "pay_stale")


async def test_a_payment_id_confirms_one_order_even_across_products(api: Api) -> None:
    """Each product knows only its own orders: the read model keeps a payment id to one."""
    first_token, first = await shopper_with_order(api, await api.sale(stock=1))
    second_token, second = await shopper_with_order(api, await api.sale(stock=1))
    gateway = SandboxGateway(SANDBOX_SECRET, "")
    for placed in (first, second):
        body = gateway.event(EventKind.CAPTURED, placed["order_id"], "pay_shared", PRICE, "INR")
        status, reply = await send(api, body, gateway.sign(body))
        assert status == 200
    assert (reply["status"], reply["outcome"]) == (
        "ignored", "rejected: the payment id belongs to another order")
    assert (await order_of(api, first_token, first["order_id"]))["status"] == "confirmed"
    assert (await order_of(api, second_token, second["order_id"]))["status"] == "pending"


async def test_one_payment_id_sent_for_two_products_at_once_confirms_one_order(
    api: Api,
) -> None:
    """Both webhooks are checked before either is committed: the payment id must still go to
    one order, and the collision must cost the shoppers in the same batches nothing."""
    first, second = await api.sale(stock=100, limit=10), await api.sale(stock=100, limit=10)
    gateway = SandboxGateway(SANDBOX_SECRET, "")
    bystanders = [api.engine.tokens.access_token(str(uuid.uuid4())) for _ in range(10)]
    for round_ in range(5):
        payers = [await shopper_with_order(api, pid) for pid in (first, second)]
        bodies = [gateway.event(EventKind.CAPTURED, placed["order_id"], f"pay_both_{round_}",
                                PRICE, "INR") for _, placed in payers]
        replies = await asyncio.gather(
            *(send(api, body, gateway.sign(body)) for body in bodies),
            *(api.order(b, pid) for b in bystanders for pid in (first, second)))
        webhooks, theirs = replies[:2], replies[2:]
        assert [status for status, _ in webhooks] == [200, 200], webhooks
        assert sorted(reply["status"] for _, reply in webhooks) == ["ignored", "processed"]
        assert {status for status, _ in theirs} == {201}, theirs
        statuses = [(await order_of(api, token, placed["order_id"]))["status"]
                    for token, placed in payers]
        assert sorted(statuses) == ["confirmed", "pending"], statuses
