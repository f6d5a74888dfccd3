"""Razorpay through the real razorpay SDK (in its thread pool), pointed at a local stub, with
webhooks signed as Razorpay signs them (HMAC-SHA256 of the raw body)."""

import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import Api, link_path
from razorpay_stub import RazorpayStub

from flashsale.payments.razorpay_gateway import RazorpayGateway

KEY_ID, KEY_SECRET, WEBHOOK_SECRET = "rzp_test_key", "rzp_test_secret", "rzp_webhook_secret"
PRICE = 49_900


@pytest.fixture
async def stub() -> AsyncIterator[RazorpayStub]:
    gateway = RazorpayStub(KEY_ID, KEY_SECRET)
    await gateway.server.start_server()
    yield gateway
    await gateway.server.close()


@pytest.fixture
async def api(make_api: Any, stub: RazorpayStub) -> Api:
    return await make_api(
        lambda _: RazorpayGateway(KEY_ID, KEY_SECRET, WEBHOOK_SECRET, api_base=stub.url,
                                  timeout_s=1.0))


def webhook(kind: str, entity_kind: str, entity: dict[str, Any]) -> bytes:
    return json.dumps({"entity": "event", "event": kind,
                       "payload": {entity_kind: {"entity": entity}}}).encode()


async def deliver(api: Api, body: bytes, event_id: str | None = None,
                  secret: str = WEBHOOK_SECRET) -> tuple[int, Any]:
    headers = {"X-Razorpay-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
               "X-Razorpay-Event-Id": event_id or f"evt_{secrets.token_hex(7)}"}
    async with api.session.post("/webhooks/razorpay", data=body, headers=headers) as reply:
        return reply.status, await reply.json(content_type=None)


def captured(order_id: str, razorpay_order: str, amount: int = PRICE) -> bytes:
    return webhook("payment.captured", "payment", {
        "id": f"pay_{secrets.token_hex(7)}", "entity": "payment", "order_id": razorpay_order,
        "amount": amount, "currency": "INR", "status": "captured",
        "notes": {"order_id": order_id}})


async def open_checkout(api: Api, payment_url: str) -> str:
    async with api.session.get(link_path(payment_url)) as reply:
        assert reply.status == 200 and reply.content_type == "text/html"
        return await reply.text()


async def placed_order(api: Api) -> tuple[str, dict[str, Any]]:
    product_id = await api.sale(stock=5)
    _, token = await api.register()
    status, placed = await api.order(token, product_id)
    assert status == 201
    return token, placed


async def test_checkout_uses_one_razorpay_order_per_order(api: Api, stub: RazorpayStub) -> None:
    _, placed = await placed_order(api)
    page = await open_checkout(api, placed["payment_url"])
    await open_checkout(api, placed["payment_url"])
    [order] = stub.orders
    assert (order["amount"], order["currency"], order["receipt"]) == (
        PRICE, "INR", placed["order_id"])
    assert "checkout.razorpay.com/v1/checkout.js" in page
    assert order["id"] in page and KEY_ID in page and KEY_SECRET not in page


async def test_an_amount_razorpay_refuses_is_not_an_outage(api: Api, stub: RazorpayStub) -> None:
    """Razorpay takes at least a rupee: a link to a cheaper order is refused, not retried."""
    _, token = await api.register()
    _, placed = await api.order(token, await api.sale(price=50))
    async with api.session.get(link_path(placed["payment_url"])) as reply:
        problem = await reply.json(content_type=None)
        assert (reply.status, problem["code"]) == (502, "payment_refused")
        assert "at least 100 paise" in problem["detail"] and "Retry-After" not in reply.headers
    assert stub.orders == []


async def test_a_captured_payment_confirms_once_per_event_id(api: Api,
                                                             stub: RazorpayStub) -> None:
    token, placed = await placed_order(api)
    await open_checkout(api, placed["payment_url"])
    body = captured(placed["order_id"], stub.orders[0]["id"])
    assert (await deliver(api, body, "evt_1"))[1]["status"] == "processed"
    status, reply = await deliver(api, body, "evt_1")
    assert (status, reply["status"]) == (200, "duplicate")
    _, order, _ = await api.call("GET", f"/orders/{placed['order_id']}", token)
    assert (order["status"], order["payment_provider"]) == ("confirmed", "razorpay")
    assert await api.engine.db.fetchval("SELECT count(*) FROM webhook_events") == 1


async def test_bad_signatures_and_wrong_amounts_change_nothing(api: Api,
                                                               stub: RazorpayStub) -> None:
    token, placed = await placed_order(api)
    await open_checkout(api, placed["payment_url"])
    body = captured(placed["order_id"], stub.orders[0]["id"])
    status, reply = await deliver(api, body, secret="not-the-secret")
    assert (status, reply["code"]) == (401, "invalid_token")
    async with api.session.post("/webhooks/razorpay", data=body) as unsigned:
        assert unsigned.status == 401
    cheaper = captured(placed["order_id"], stub.orders[0]["id"], amount=PRICE - 1)
    assert (await deliver(api, cheaper))[1]["status"] == "ignored"
    _, order, _ = await api.call("GET", f"/orders/{placed['order_id']}", token)
    assert order["status"] == "pending"


async def test_a_refund_survives_a_500_and_a_timeout_and_is_made_once(
    api: Api, stub: RazorpayStub
) -> None:
    worker = api.engine.payment_worker
    await worker.stop()  # driven by hand below, round by round
    token, placed = await placed_order(api)
    order_id = placed["order_id"]
    await open_checkout(api, placed["payment_url"])
    body = captured(order_id, stub.orders[0]["id"])
    payment_id = json.loads(body)["payload"]["payment"]["entity"]["id"]
    await deliver(api, body)
    assert (await api.call("POST", f"/orders/{order_id}/cancel", token, {}))[0] == 200
    stub.fail_refunds, stub.slow_refunds, stub.slow_s = 1, 1, 2.0
    accepted = 0
    for _ in range(3):  # a 500, a reply too slow to wait for (applied), then the same key
        await api.engine.db.execute("UPDATE refund_attempts SET next_attempt_at = now()")
        accepted += await worker.run_once()
    assert accepted == 1 and stub.refund_calls == 3
    [refund] = stub.refunds.values()
    assert list(stub.refunds) == [f"refund-{order_id}"]
    assert (refund["amount"], refund["payment_id"]) == (PRICE, payment_id)

    processed = webhook("refund.processed", "refund", refund)
    assert (await deliver(api, processed))[1]["status"] == "processed"
    _, order, _ = await api.call("GET", f"/orders/{order_id}", token)
    assert (order["status"], order["refund_status"], order["refund_amount"]) == (
        "cancelled", "processed", PRICE)


async def test_a_failed_payment_fails_the_order(api: Api, stub: RazorpayStub) -> None:
    token, placed = await placed_order(api)
    await open_checkout(api, placed["payment_url"])
    failed = webhook("payment.failed", "payment", {
        "id": f"pay_{secrets.token_hex(7)}", "entity": "payment",
        "order_id": stub.orders[0]["id"], "amount": PRICE, "currency": "INR",
        "status": "failed", "notes": {"order_id": placed["order_id"]}})
    assert (await deliver(api, failed))[1]["status"] == "processed"
    _, order, _ = await api.call("GET", f"/orders/{placed['order_id']}", token)
    assert order["status"] == "failed"
