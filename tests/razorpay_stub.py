"""A local stand-in for Razorpay's API, for the real razorpay SDK to talk to. It checks basic
auth, paise amounts, receipts and refund idempotency keys, and can inject faults: 500s and a
reply slower than the client waits."""

import asyncio
import base64
import secrets
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


def _error(status: int, code: str, description: str) -> web.Response:
    return web.json_response({"error": {"code": code, "description": description}},
                             status=status)


class RazorpayStub:
    def __init__(self, key_id: str, key_secret: str) -> None:
        self._auth = "Basic " + base64.b64encode(f"{key_id}:{key_secret}".encode()).decode()
        self.orders: list[dict[str, Any]] = []
        self.refunds: dict[str, dict[str, Any]] = {}  # by X-Refund-Idempotency
        self.refund_calls = 0
        self.fail_refunds = 0
        self.slow_refunds = 0  # answer after the client gave up, having applied the refund
        self.slow_s = 12.0
        app = web.Application()
        app.router.add_post("/v1/orders", self._create_order)
        app.router.add_post("/v1/payments/{payment_id}/refund", self._refund)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def _create_order(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != self._auth:
            return _error(401, "BAD_REQUEST_ERROR", "authentication failed")
        body = await request.json()
        if not isinstance(body.get("amount"), int) or body["amount"] < 100:
            return _error(400, "BAD_REQUEST_ERROR", "amount must be at least 100 paise")
        order = {"id": f"order_{secrets.token_hex(7)}", "entity": "order",
                 "amount": body["amount"], "currency": body["currency"],
                 "receipt": body["receipt"], "notes": body.get("notes", {}),
                 "status": "created"}
        self.orders.append(order)
        return web.json_response(order)

    async def _refund(self, request: web.Request) -> web.Response:
        self.refund_calls += 1
        if request.headers.get("Authorization") != self._auth:
            return _error(401, "BAD_REQUEST_ERROR", "authentication failed")
        key = request.headers.get("X-Refund-Idempotency")
        if not key:
            return _error(400, "BAD_REQUEST_ERROR", "X-Refund-Idempotency is required here")
        if self.fail_refunds:
            self.fail_refunds -= 1
            return _error(500, "SERVER_ERROR", "boom")
        body = await request.json()
        if key not in self.refunds:
            self.refunds[key] = {
                "id": f"rfnd_{secrets.token_hex(7)}", "entity": "refund",
                "amount": body["amount"], "currency": "INR",
                "payment_id": request.match_info["payment_id"],
                "notes": body.get("notes", {}), "status": "processed"}
        if self.slow_refunds:
            self.slow_refunds -= 1
            await asyncio.sleep(self.slow_s)
        return web.json_response(self.refunds[key])
