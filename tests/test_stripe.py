"""Stripe through the real stripe SDK, pointed at a local stub, with webhooks signed by the SDK's
own signature helper: checkout, confirmation, signatures, refunds under faults, session expiry."""

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import stripe
from helpers import Api, link_path
from stripe_stub import AMOUNT_MAX, StripeStub

from flashsale.payments.stripe_gateway import StripeGateway

WEBHOOK_SECRET = "whsec_test_secret"
PRICE = 49_900


@pytest.fixture
async def stub() -> AsyncIterator[StripeStub]:
    gateway = StripeStub()
    await gateway.server.start_server()
    yield gateway
    await gateway.server.close()


async def stripe_api(make_api: Any, stub: StripeStub, hold_ttl_ms: int = 600_000) -> Api:
    return await make_api(
        lambda _: StripeGateway("sk_test_key", WEBHOOK_SECRET, api_base=stub.url),
        hold_ttl_ms=hold_ttl_ms)


def event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"id": f"evt_{secrets.token_hex(8)}", "object": "event", "type": kind,
                       "data": {"object": obj}}).encode()


async def deliver(api: Api, body: bytes, secret: str = WEBHOOK_SECRET,
                  timestamp: int | None = None) -> tuple[int, Any]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp)
    async with api.session.post("/webhooks/stripe", data=body,
                                headers={"Stripe-Signature": header}) as reply:
        return reply.status, await reply.json(content_type=None)


async def visit(api: Api, payment_url: str) -> tuple[int, str]:
    async with api.session.get(link_path(payment_url), allow_redirects=False) as reply:
        return reply.status, reply.headers.get("Location", "")


def paid_session(session: dict[str, Any]) -> dict[str, Any]:
    return {**session, "status": "complete", "payment_status": "paid"}


async def opened_checkout(api: Api, stub: StripeStub,
                          stock: int = 5) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A shopper's pending order whose payment link was opened: (token, order, session)."""
    product_id = await api.sale(stock=stock)
    _, token = await api.register()
    _, placed = await api.order(token, product_id)
    await visit(api, placed["payment_url"])
    session = stub.sessions[f"checkout-{placed['order_id']}"]
    return token, placed, session


async def confirmed_order(api: Api, stub: StripeStub) -> tuple[str, dict[str, Any], str]:
    token, placed, session = await opened_checkout(api, stub)
    assert (await deliver(api, event("checkout.session.completed",
                                     paid_session(session))))[0] == 200
    return token, placed, session["payment_intent"]


async def test_checkout_redirects_to_one_session_and_payment_confirms(
    make_api: Any, stub: StripeStub
) -> None:
    api = await stripe_api(make_api, stub)
    product_id = await api.sale(stock=5)
    _, token = await api.register()
    _, placed = await api.order(token, product_id)
    order_id = placed["order_id"]
    first = await visit(api, placed["payment_url"])
    second = await visit(api, placed["payment_url"])
    assert first[0] == 303 and first == second
    assert list(stub.sessions) == [f"checkout-{order_id}"]  # one session, keyed by the order
    [session] = stub.sessions.values()
    assert first[1] == session["url"]
    assert (session["amount_total"], session["currency"]) == (PRICE, "inr")
    assert session["metadata"] == {"order_id": order_id}
    assert session["expires_at"] >= time.time() + 30 * 60  # Stripe's minimum, not our hold

    status, reply = await deliver(api, event("checkout.session.completed",
                                             paid_session(session)))
    assert (status, reply["status"]) == (200, "processed")
    _, order, _ = await api.call("GET", f"/orders/{order_id}", token)
    assert (order["status"], order["payment_provider"], order["payment_id"]) == (
        "confirmed", "stripe", session["payment_intent"])


async def test_a_gateway_outage_asks_for_a_retry_and_a_refusal_does_not(
    make_api: Any, stub: StripeStub
) -> None:
    """A 500 passes; a price above the most Stripe takes is refused again at every retry."""
    api = await stripe_api(make_api, stub)
    _, token = await api.register()
    payable, too_dear = [(await api.order(token, await api.sale(price=price)))[1]["payment_url"]
                         for price in (PRICE, AMOUNT_MAX + 1)]
    stub.fail_sessions = 1
    async with api.session.get(link_path(payable), allow_redirects=False) as reply:
        assert (reply.status, reply.headers.get("Retry-After")) == (503, "1")
    assert (await visit(api, payable))[0] == 303
    for _ in range(2):
        async with api.session.get(link_path(too_dear), allow_redirects=False) as reply:
            problem = await reply.json(content_type=None)
            assert (reply.status, problem["code"]) == (502, "payment_refused")
            assert "Retry-After" not in reply.headers
            assert f"no more than {AMOUNT_MAX}" in problem["detail"]


async def test_unsigned_forged_or_stale_webhooks_are_refused(
    make_api: Any, stub: StripeStub
) -> None:
    api = await stripe_api(make_api, stub)
    body = event("checkout.session.completed", {"id": "cs_x", "metadata": {"order_id": "x"},
                                                "currency": "inr", "amount_total": 1})
    stale = int(time.time()) - 301
    for status, reply in (await deliver(api, body, secret="whsec_other"),
                          await deliver(api, body, timestamp=stale)):
        assert (status, reply["code"]) == (401, "invalid_token")
    async with api.session.post("/webhooks/stripe", data=body) as unsigned:
        assert unsigned.status == 401
    async with api.session.post("/webhooks/sandbox", data=body) as other_provider:
        assert other_provider.status == 404


async def test_an_unpaid_or_mismatched_session_confirms_nothing(
    make_api: Any, stub: StripeStub
) -> None:
    api = await stripe_api(make_api, stub)
    token, placed, session = await opened_checkout(api, stub)
    unpaid = {**session, "status": "complete", "payment_status": "unpaid"}
    cheaper = {**paid_session(session), "amount_total": PRICE - 100}
    for obj in (unpaid, cheaper):
        status, reply = await deliver(api, event("checkout.session.completed", obj))
        assert (status, reply["status"]) == (200, "ignored")
    _, order, _ = await api.call("GET", f"/orders/{placed['order_id']}", token)
    assert order["status"] == "pending"


async def test_a_refund_survives_gateway_errors_and_a_lost_response(
    make_api: Any, stub: StripeStub
) -> None:
    api = await stripe_api(make_api, stub)
    worker = api.engine.payment_worker
    await worker.stop()  # driven by hand below, round by round
    token, placed, payment_intent = await confirmed_order(api, stub)
    order_id = placed["order_id"]
    status, _, _ = await api.call("POST", f"/orders/{order_id}/cancel", token, {})
    assert status == 200
    stub.fail_refunds = 2
    stub.lose_refund_responses = 1
    accepted = 0
    for _ in range(4):  # 500, 500, applied-but-lost, then the same key again
        await api.engine.db.execute("UPDATE refund_attempts SET next_attempt_at = now()")
        accepted += await worker.run_once()
    assert accepted == 1 and stub.refund_calls == 4
    assert list(stub.refunds) == [f"refund-{order_id}"]  # one refund, never two
    [refund] = stub.refunds.values()
    assert (refund["amount"], refund["payment_intent"]) == (PRICE, payment_intent)

    status, reply = await deliver(api, event("refund.updated", refund))
    assert (status, reply["status"]) == (200, "processed")
    _, order, _ = await api.call("GET", f"/orders/{order_id}", token)
    assert (order["status"], order["refund_status"], order["refund_amount"]) == (
        "cancelled", "processed", PRICE)
    assert await worker.run_once() == 0  # settled: nothing more to call


async def test_a_session_is_closed_once_the_hold_lapses(make_api: Any,
                                                        stub: StripeStub) -> None:
    # Long enough for the payment link to be opened first on a busy machine.
    api = await stripe_api(make_api, stub, hold_ttl_ms=3_000)
    token, placed, session = await opened_checkout(api, stub)
    for _ in range(100):
        if session["id"] in stub.expired:
            break
        await asyncio.sleep(0.1)
    assert stub.expired == [session["id"]]
    _, order, _ = await api.call("GET", f"/orders/{placed['order_id']}", token)
    assert order["status"] == "expired"


@pytest.mark.parametrize("kind", ["checkout.session.async_payment_failed",
                                  "checkout.session.expired"])
async def test_a_failed_or_expired_session_fails_the_order(make_api: Any, stub: StripeStub,
                                                           kind: str) -> None:
    api = await stripe_api(make_api, stub)
    token, placed, session = await opened_checkout(api, stub, stock=1)
    status, reply = await deliver(api, event(kind, {**session, "payment_status": "unpaid"}))
    assert (status, reply["status"]) == (200, "processed")
    _, order, _ = await api.call("GET", f"/orders/{placed['order_id']}", token)
    assert order["status"] == "failed"
    _, other = await api.register()
    assert (await api.order(other, order["product_id"]))[0] == 201  # the unit came back
