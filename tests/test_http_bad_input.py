"""Input no client should send is refused with a 4xx, never a 500: bytes that are not UTF-8 or
ASCII where tokens, keys and signatures go, and NUL, which PostgreSQL text cannot hold."""

import asyncio
import json
import logging
import uuid

import pytest
import yarl
from helpers import Api


async def raw_reply(api: Api, method: str, path: str, headers: dict[str, bytes],
                    body: object = None) -> bytes:
    """Sends header bytes as given (aiohttp's client would refuse them)."""
    url = yarl.URL(api.engine.base_url)
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: x", b"Connection: close",
            b"Content-Type: application/json", f"Content-Length: {len(payload)}".encode()]
    head += [name.encode() + b": " + value for name, value in headers.items()]
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + payload)
    reply = await reader.read()
    writer.close()
    return reply


async def raw_status(api: Api, method: str, path: str, headers: dict[str, bytes],
                     body: object = None) -> tuple[int, str]:
    """(status, problem code) of `raw_reply`."""
    reply = await raw_reply(api, method, path, headers, body)
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.partition(b"\r\n\r\n")[2] or b"{}").get("code", "")


async def test_malformed_header_bytes_are_refused(api: Api) -> None:
    product_id = await api.sale(stock=5)
    _, token = await api.register()
    order = {"product_id": product_id, "quantity": 1}
    bearer = b"Bearer " + token.encode()
    for key in (b"\xff\xfe", "ключ".encode(), b"tab\there"):
        assert await raw_status(api, "POST", "/orders", {
            "Authorization": bearer, "X-Idempotency-Key": key}, order) == (400, "validation_error")
    assert await raw_status(api, "POST", "/orders", {
        "Authorization": bearer, "X-Idempotency-Key": b"fine-1"}, order) == (201, "")
    for bad in (b"Bearer \xff", "Bearer токен".encode()):
        assert await raw_status(api, "GET", "/orders", {"Authorization": bad}) == (
            401, "invalid_token")
    for signature in (b"\xff", "подпись".encode()):
        assert await raw_status(api, "POST", "/webhooks/sandbox",
                                {"X-Sandbox-Signature": signature}, {"type": "x"}) == (
            401, "invalid_token")
    status, body, _ = await api.call("GET", "/orders?limit=²", token)
    assert (status, body["code"]) == (400, "validation_error")


async def test_nul_in_text_is_refused(api: Api) -> None:
    good = {"email": f"nul-{uuid.uuid4().hex[:6]}@example.com", "password": "sale-day-1",
            "full_name": "Nul Tester"}
    for field in good:
        status, body, _ = await api.call("POST", "/auth/register",
                                         body={**good, field: good[field] + "\x00"})
        assert (status, body["code"]) == (400, "validation_error"), field
    status, body, _ = await api.call("POST", "/auth/login",
                                     body={"email": "a\x00@example.com", "password": "x"})
    assert (status, body["code"]) == (400, "validation_error")
    sale = {"name": "bad\x00name", "price": 1, "stock": 1,
            "sale_starts_at": "2026-01-01T00:00:00Z", "sale_ends_at": "2030-01-01T00:00:00Z"}
    status, body, _ = await api.call("POST", "/products", await api.admin(), sale)
    assert (status, body["code"]) == (400, "validation_error")
    assert (await api.call("POST", "/auth/register", body=good))[0] == 201


async def test_sale_times_the_engine_cannot_keep_are_refused(api: Api) -> None:
    admin = await api.admin()

    async def create(starts_at: str, ends_at: str) -> tuple[int, str]:
        status, body, _ = await api.call("POST", "/products", admin, {
            "name": "Odd times", "price": 1, "stock": 1,
            "sale_starts_at": starts_at, "sale_ends_at": ends_at})
        return status, body.get("code", "")

    # asyncpg stores the first and last moments Python knows as PostgreSQL's infinities.
    assert await create("0001-01-01T00:00:00Z", "2030-01-01T00:00:00Z") == (
        400, "validation_error")
    assert await create("2029-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z") == (
        400, "validation_error")
    assert await create("1969-12-31T23:59:59Z", "2030-01-01T00:00:00Z") == (
        400, "validation_error")
    assert await create("2029-01-01T00:00:00Z", "9998-12-31T00:00:00Z") == (201, "")
    status, listed, _ = await api.call("GET", "/products")
    assert status == 200 and [p["name"] for p in listed] == ["Odd times"]


async def test_a_request_aiohttp_cannot_parse_is_a_400_logged_in_one_line(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiohttp.server")
    for path, headers in [("/products?q=" + "x" * 9_000, {}),
                          ("/health", {"X-Long": b"y" * 9_000})]:
        reply = await raw_reply(api, "GET", path, headers)
        assert reply.startswith(b"HTTP/1.0 400 Bad Request"), reply[:100]
    logged = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [(r.levelname, r.exc_info) for r in logged] == [("WARNING", None)] * 2
    assert "Got more than 8190 bytes" in logged[0].getMessage()
