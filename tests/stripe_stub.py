"""A local stand-in for Stripe's API, for the real stripe SDK to talk to. It checks what Stripe
checks (idempotency keys, amounts, currencies, session lifetimes) and can inject faults: 500s,
and a refund applied whose response is then lost."""

import secrets
import time
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

SESSION_LIFETIME_MIN_S = 30 * 60
AMOUNT_MAX = 99_999_999  # eight digits, in any currency


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"type": "invalid_request_error", "message": message}},
                             status=status)


def _server_error() -> web.Response:
    return web.json_response({"error": {"type": "api_error", "message": "boom"}}, status=500)


class StripeStub:
    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}  # by idempotency key
        self.refunds: dict[str, dict[str, Any]] = {}  # by idempotency key
        self.expired: list[str] = []
        self.refund_calls = 0
        self.fail_sessions = 0  # answer this many new checkout sessions with a 500
        self.fail_refunds = 0  # answer this many refund calls with a 500
        self.lose_refund_responses = 0  # apply, then drop the connection, this many times
        app = web.Application()
        app.router.add_post("/v1/checkout/sessions", self._create_session)
        app.router.add_post("/v1/checkout/sessions/{id}/expire", self._expire_session)
        app.router.add_post("/v1/refunds", self._create_refund)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def _create_session(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if not key:
            return _error(400, "an idempotency key is required here")
        if key in self.sessions:
            return web.json_response(self.sessions[key])
        if self.fail_sessions:
            self.fail_sessions -= 1
            return _server_error()
        form = await request.post()
        amount = int(str(form["line_items[0][price_data][unit_amount]"]))
        currency = str(form["line_items[0][price_data][currency]"])
        expires_at = int(str(form["expires_at"]))
        if amount <= 0 or currency != currency.lower() or len(currency) != 3:
            return _error(400, "bad amount or currency")
        if amount > AMOUNT_MAX:
            return _error(400, f"Amount must be no more than {AMOUNT_MAX}")
        if expires_at < time.time() + SESSION_LIFETIME_MIN_S:
            return _error(400, "expires_at must be at least 30 minutes away")
        session_id = f"cs_test_{secrets.token_hex(8)}"
        session = {
            "id": session_id, "object": "checkout.session", "mode": "payment",
            "url": f"https://checkout.stripe.test/c/{session_id}",
            "payment_intent": f"pi_{secrets.token_hex(8)}", "amount_total": amount,
            "currency": currency, "expires_at": expires_at, "status": "open",
            "client_reference_id": str(form["client_reference_id"]),
            "metadata": {"order_id": str(form["metadata[order_id]"])},
        }
        self.sessions[key] = session
        return web.json_response(session)

    async def _expire_session(self, request: web.Request) -> web.Response:
        session_id = request.match_info["id"]
        self.expired.append(session_id)
        return web.json_response({"id": session_id, "object": "checkout.session",
                                  "status": "expired"})

    async def _create_refund(self, request: web.Request) -> web.Response:
        self.refund_calls += 1
        key = request.headers.get("Idempotency-Key")
        if not key:
            return _error(400, "an idempotency key is required here")
        if self.fail_refunds:
            self.fail_refunds -= 1
            return _server_error()
        form = await request.post()
        if key not in self.refunds:  # a replayed key returns the first refund, never a second
            self.refunds[key] = {
                "id": f"re_{secrets.token_hex(8)}", "object": "refund", "status": "succeeded",
                "amount": int(str(form["amount"])), "currency": "inr",
                "payment_intent": str(form["payment_intent"]),
                "metadata": {"order_id": str(form["metadata[order_id]"])},
            }
        if self.lose_refund_responses:
            self.lose_refund_responses -= 1
            assert request.transport is not None
            request.transport.close()  # applied, but the answer never arrives
        return web.json_response(self.refunds[key])
