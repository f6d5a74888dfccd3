"""Products and orders over real HTTP: every rule, every error code, the races."""

import asyncio
import time
import uuid
from typing import Any

import pytest
import ray
from helpers import CANCEL_WINDOW_MS, Api

from flashsale.actors.messages import CapturePayment
from flashsale.actors.product import STOCK_MAX
from flashsale.persistence.orders import drop_spent_claims


async def capture(api: Api, product_id: str, order_id: str, amount: int) -> None:
    """What a captured-payment webhook does (payments arrive with their own issue)."""
    await api.engine.router.submit(product_id,
                                   CapturePayment(order_id, f"pay_{uuid.uuid4().hex}", amount,
                                                  "INR"))


async def product(api: Api, product_id: str) -> dict[str, Any]:
    status, body, _ = await api.call("GET", f"/products/{product_id}")
    assert status == 200
    assert body["available"] + body["reserved"] + body["sold"] == body["stock"]
    return body


async def test_admins_create_sales_and_everyone_reads_them(api: Api) -> None:
    product_id = await api.sale(stock=7, limit=2)
    body = await product(api, product_id)
    assert {k: body[k] for k in ("stock", "available", "reserved", "sold", "per_user_limit",
                                 "status", "currency", "price")} == {
        "stock": 7, "available": 7, "reserved": 0, "sold": 0, "per_user_limit": 2,
        "status": "active", "currency": "INR", "price": 49_900}
    status, listing, _ = await api.call("GET", "/products")
    assert status == 200 and product_id in {p["id"] for p in listing}
    assert (await api.call("GET", f"/products/{uuid.uuid4()}"))[0] == 404
    assert (await api.call("GET", "/products/not-a-uuid"))[0] == 404
    status, body, _ = await api.call("POST", "/products/not-a-uuid/restock", await api.admin(),
                                     {"quantity": 1})
    assert (status, body["code"]) == (404, "not_found")

    scheduled = await api.sale(starts_in_s=3600)
    assert (await product(api, scheduled))["status"] == "scheduled"


async def test_only_admins_create_or_restock(api: Api) -> None:
    _, shopper = await api.register()
    sale = {"name": "x", "price": 1, "stock": 1, "sale_starts_at": "2026-01-01T00:00:00Z",
            "sale_ends_at": "2030-01-01T00:00:00Z"}
    status, body, _ = await api.call("POST", "/products", shopper, sale)
    assert (status, body["code"]) == (403, "forbidden")
    status, body, _ = await api.call("POST", "/products", None, sale)
    assert (status, body["code"]) == (401, "invalid_token")
    product_id = await api.sale(stock=1)
    status, body, _ = await api.call("POST", f"/products/{product_id}/restock", shopper,
                                     {"quantity": 5})
    assert (status, body["code"]) == (403, "forbidden")


@pytest.mark.parametrize("change", [
    {"sale_ends_at": "2020-01-01T00:00:00Z"},
    {"sale_starts_at": "2020-01-01T00:00:00Z", "sale_ends_at": "2021-01-01T00:00:00Z"},
    {"sale_starts_at": "2031-01-01T00:00:00Z"},  # ends before it starts
    {"stock": -1}, {"price": 1.5}, {"currency": "rupees"},
    {"currency": "ZZZ"}, {"currency": "inr"}, {"currency": "XAU"},  # XAU has no minor unit
    {"sale_starts_at": "2026-01-01T00:00:00"},  # no time zone
    {"available": 100}, {"sold": 0},  # read-only fields are refused, never applied
])
async def test_bad_sales_are_refused(api: Api, change: dict[str, Any]) -> None:
    sale = {"name": "x", "price": 100, "stock": 1, "sale_starts_at": "2026-01-01T00:00:00Z",
            "sale_ends_at": "2030-01-01T00:00:00Z"}
    status, body, _ = await api.call("POST", "/products", await api.admin(), {**sale, **change})
    assert (status, body["code"]) == (400, "validation_error")


async def test_restock_adds_units(api: Api) -> None:
    product_id = await api.sale(stock=1)
    status, body, _ = await api.call("POST", f"/products/{product_id}/restock",
                                     await api.admin(), {"quantity": 4})
    assert status == 200 and (body["stock"], body["available"]) == (5, 5)
    status, body, _ = await api.call("POST", f"/products/{product_id}/restock",
                                     await api.admin(), {"quantity": 0})
    assert (status, body["code"]) == (400, "validation_error")


async def test_restock_stops_at_the_most_units_a_sale_holds(api: Api) -> None:
    """Its counts are stored as PostgreSQL integers: a restock past them could not be logged,
    and answered 503 at every try."""
    product_id = await api.sale(stock=STOCK_MAX - 1)
    restock = f"/products/{product_id}/restock"
    status, body, _ = await api.call("POST", restock, await api.admin(), {"quantity": STOCK_MAX})
    assert (status, body["code"]) == (400, "validation_error")
    assert str(STOCK_MAX) in body["detail"]
    status, body, _ = await api.call("POST", restock, await api.admin(), {"quantity": 1})
    assert (status, body["stock"], body["available"]) == (200, STOCK_MAX, STOCK_MAX)
    _, token = await api.register()
    status, _ = await api.order(token, product_id)
    assert status == 201


async def test_an_order_is_readable_at_once_and_listed(api: Api) -> None:
    product_id = await api.sale(stock=5, limit=3)
    _, token = await api.register()
    status, placed = await api.order(token, product_id, quantity=2)
    assert status == 201
    assert set(placed) == {"order_id", "status", "payment_url", "expires_at"}
    assert placed["status"] == "pending"
    assert f"/pay/{placed['order_id']}?token=" in placed["payment_url"]

    status, order, _ = await api.call("GET", f"/orders/{placed['order_id']}", token)
    assert status == 200
    assert (order["quantity"], order["unit_price"], order["total_amount"], order["status"],
            order["currency"], order["refund_status"]) == (2, 49_900, 99_800, "pending", "INR",
                                                           "none")
    assert order["expires_at"] == placed["expires_at"]

    await api.order(token, product_id)
    status, page, _ = await api.call("GET", "/orders?limit=1", token)
    assert status == 200 and (page["total"], page["limit"], len(page["orders"])) == (2, 1, 1)
    status, page, _ = await api.call("GET", "/orders?status=confirmed", token)
    assert (status, page["total"]) == (200, 0)
    for query in ("limit=0", "limit=101", "offset=-1", "status=shipped"):
        status, body, _ = await api.call("GET", f"/orders?{query}", token)
        assert (status, body["code"]) == (400, "validation_error"), query


async def test_order_rejections_have_their_codes(api: Api) -> None:
    product_id = await api.sale(stock=2, limit=1)
    _, token = await api.register()

    async def code_of(status_and_body: tuple[int, dict[str, Any]]) -> tuple[int, str]:
        status, body = status_and_body
        return status, body.get("code", "")

    assert await code_of(await api.order(token, product_id, quantity=0)) == (
        400, "validation_error")
    assert await code_of(await api.order(token, product_id, quantity=11)) == (
        400, "validation_error")
    assert await code_of(await api.order(token, str(uuid.uuid4()))) == (404, "not_found")
    status, body, _ = await api.call("POST", "/orders", token,
                                     {"product_id": product_id, "quantity": 1})
    assert (status, body["code"]) == (400, "idempotency_key_missing")
    status, body, _ = await api.call("POST", "/orders", token,
                                     {"product_id": product_id, "quantity": 1,
                                      "price": 1}, {"X-Idempotency-Key": "k"})
    assert (status, body["code"]) == (400, "validation_error")
    assert await code_of(await api.order(token, product_id, key="k" * 256)) == (
        400, "validation_error")

    assert (await api.order(token, product_id, key="k" * 255))[0] == 201
    assert await code_of(await api.order(token, product_id)) == (409, "purchase_limit_exceeded")
    _, other = await api.register()
    assert (await api.order(other, product_id))[0] == 201
    _, third = await api.register()
    assert await code_of(await api.order(third, product_id)) == (409, "out_of_stock")

    later = await api.sale(starts_in_s=3600)
    assert await code_of(await api.order(token, later)) == (409, "sale_not_active")


async def test_idempotency_keys_replay_and_conflict(api: Api) -> None:
    product_id = await api.sale(stock=10, limit=5)
    other_product = await api.sale(stock=10, limit=5)
    _, token = await api.register()
    first = await api.order(token, product_id, quantity=2, key="checkout-1")
    again = await api.order(token, product_id, quantity=2, key="checkout-1")
    assert first[0] == again[0] == 201 and first[1] == again[1]
    status, body = await api.order(token, product_id, quantity=3, key="checkout-1")
    assert (status, body["code"]) == (422, "idempotency_key_reused")
    status, body = await api.order(token, other_product, quantity=2, key="checkout-1")
    assert (status, body["code"]) == (422, "idempotency_key_reused")
    _, page, _ = await api.call("GET", "/orders", token)
    assert page["total"] == 1


async def test_a_key_refused_once_places_its_order_on_retry_and_lists_it(api: Api) -> None:
    """A key keeps the order id of its first attempt: the order a retry places is the one the
    key names, and the user's list finds it."""
    product_id = await api.sale(stock=1, limit=1)
    _, first = await api.register()
    _, second = await api.register()
    assert (await api.order(first, product_id))[0] == 201
    status, body = await api.order(second, product_id, key="try-again")
    assert (status, body["code"]) == (409, "out_of_stock")
    status, _, _ = await api.call("POST", f"/products/{product_id}/restock", await api.admin(),
                                  {"quantity": 1})
    assert status == 200
    status, placed = await api.order(second, product_id, key="try-again")
    assert status == 201
    _, page, _ = await api.call("GET", "/orders", second)
    assert [o["id"] for o in page["orders"]] == [placed["order_id"]] and page["total"] == 1
    assert await api.order(second, product_id, key="try-again") == (201, placed)


async def test_identical_requests_at_the_same_instant_make_one_order(api: Api) -> None:
    product_id = await api.sale(stock=10, limit=10)
    _, token = await api.register()
    replies = await asyncio.gather(*(api.order(token, product_id, key="double-click")
                                     for _ in range(10)))
    assert {status for status, _ in replies} == {201}
    assert len({body["order_id"] for _, body in replies}) == 1
    _, page, _ = await api.call("GET", "/orders", token)
    assert page["total"] == 1


async def test_a_front_end_shows_the_counts_its_orders_left_at_once(api: Api) -> None:
    """The counts come back with every batch the product answers: the shopper who just ordered
    sees the units gone, without waiting for the catalogue's next refresh."""
    product_id = await api.sale(stock=5, limit=5)
    _, token = await api.register()
    for available in (4, 3, 2):
        assert (await api.order(token, product_id))[0] == 201
        assert (await product(api, product_id))["available"] == available


async def test_200_shoppers_race_for_20_units(api: Api) -> None:
    product_id = await api.sale(stock=20, limit=1)
    # Minted with the server's key: 200 bcrypt registrations would only slow the test.
    tokens = [api.engine.tokens.access_token(str(uuid.uuid4())) for _ in range(200)]
    replies = await asyncio.gather(*(api.order(token, product_id) for token in tokens))
    statuses = [status for status, _ in replies]
    assert statuses.count(201) == 20
    assert {body["code"] for status, body in replies if status != 201} == {"out_of_stock"}
    await asyncio.sleep(1.1)  # the catalogue refreshes within a second
    body = await product(api, product_id)
    assert (body["available"], body["reserved"], body["sold"]) == (0, 20, 0)


async def test_the_per_user_limit_holds_under_concurrent_requests(api: Api) -> None:
    product_id = await api.sale(stock=50, limit=2)
    _, token = await api.register()
    replies = await asyncio.gather(*(api.order(token, product_id) for _ in range(12)))
    statuses = sorted(status for status, _ in replies)
    assert statuses.count(201) == 2 and statuses.count(409) == 10


async def test_another_users_order_does_not_exist_for_them(api: Api) -> None:
    product_id = await api.sale(stock=5)
    _, alice = await api.register()
    _, mallory = await api.register()
    _, placed = await api.order(alice, product_id)
    order_id = placed["order_id"]
    status, body, _ = await api.call("GET", f"/orders/{order_id}", mallory)
    assert (status, body["code"]) == (404, "not_found")
    status, body, _ = await api.call("POST", f"/orders/{order_id}/cancel", mallory, {})
    assert (status, body["code"]) == (404, "not_found")
    _, page, _ = await api.call("GET", "/orders", mallory)
    assert page["total"] == 0
    assert (await api.call("GET", f"/orders/{order_id}", alice))[1]["status"] == "pending"
    for method, path in (("GET", "/orders/not-a-uuid"), ("POST", "/orders/not-a-uuid/cancel")):
        status, body, _ = await api.call(method, path, alice, {})
        assert (status, body["code"]) == (404, "not_found")


async def test_cancel_rules(api: Api) -> None:
    product_id = await api.sale(stock=5, limit=2)
    _, token = await api.register()
    _, placed = await api.order(token, product_id, quantity=2)
    order_id = placed["order_id"]
    status, body, _ = await api.call("POST", f"/orders/{order_id}/cancel", token, {})
    assert (status, body["code"]) == (409, "invalid_order_state")

    await capture(api, product_id, order_id, 2 * 49_900)
    assert (await api.call("GET", f"/orders/{order_id}", token))[1]["status"] == "confirmed"
    status, body, _ = await api.call("POST", f"/orders/{order_id}/cancel", token,
                                     {"reason": "changed my mind"})
    assert status == 200
    assert body == {"order_id": order_id, "status": "cancelled", "refund_initiated": True,
                    "refund_amount": 2 * 49_900}
    _, order, _ = await api.call("GET", f"/orders/{order_id}", token)
    assert (order["status"], order["refund_status"], order["refund_amount"]) == (
        "cancelled", "pending", 2 * 49_900)
    await asyncio.sleep(1.1)
    assert (await product(api, product_id))["available"] == 5
    status, body, _ = await api.call("POST", f"/orders/{order_id}/cancel", token, {})
    assert (status, body["code"]) == (409, "invalid_order_state")

    _, late = await api.order(token, product_id)
    await capture(api, product_id, late["order_id"], 49_900)
    await asyncio.sleep(CANCEL_WINDOW_MS / 1000 + 0.2)
    status, body, _ = await api.call("POST", f"/orders/{late['order_id']}/cancel", token, {})
    assert (status, body["code"]) == (409, "cancellation_window_closed")


async def test_an_unreachable_product_is_a_fast_503_with_retry_after(api: Api) -> None:
    product_id = await api.sale(stock=5)
    _, token = await api.register()
    ray.kill(api.engine.router.actor(product_id), no_restart=True)
    started = time.monotonic()
    status, body, headers = await api.call(
        "POST", "/orders", token, {"product_id": product_id, "quantity": 1},
        {"X-Idempotency-Key": "while-down"})
    assert (status, body["code"], headers["Retry-After"]) == (503, "unavailable", "1")
    assert time.monotonic() - started < 5  # refused at once, not after a wait


async def test_one_key_sent_to_two_products_at_once_places_one_order(api: Api) -> None:
    """The key holds across products even when both requests are decided at the same time, and
    the collision costs nobody else their answer."""
    first, second = await api.sale(stock=100, limit=10), await api.sale(stock=100, limit=10)
    _, token = await api.register()
    bystanders = [api.engine.tokens.access_token(str(uuid.uuid4())) for _ in range(10)]
    for round_ in range(5):
        key = f"both-{round_}"
        replies = await asyncio.gather(
            api.order(token, first, key=key), api.order(token, second, key=key),
            *(api.order(b, pid) for b in bystanders for pid in (first, second)))
        mine, theirs = replies[:2], replies[2:]
        assert sorted(status for status, _ in mine) == [201, 422], mine
        assert {status for status, _ in theirs} == {201}, theirs
    _, page, _ = await api.call("GET", "/orders", token)
    assert page["total"] == 5


async def test_keys_spent_in_a_sale_that_ended_over_a_day_ago_are_dropped(api: Api) -> None:
    ended, live = await api.sale(stock=1), await api.sale(stock=1)
    _, alice = await api.register()
    _, bob = await api.register()
    assert (await api.order(alice, ended, key="placed"))[0] == 201
    assert (await api.order(bob, ended, key="refused"))[0] == 409  # sold out
    assert (await api.order(bob, live, quantity=2, key="refused-live"))[0] == 409  # over the limit
    db = api.engine.db
    await db.execute("""UPDATE products SET sale_starts_at = now() - interval '3 days',
                            sale_ends_at = now() - interval '25 hours' WHERE id = $1""", ended)

    assert await drop_spent_claims(db) == 1
    kept = await db.fetch("SELECT idempotency_key FROM key_claims ORDER BY idempotency_key")
    assert [row["idempotency_key"] for row in kept] == ["placed", "refused-live"]
    status, mine, _ = await api.call("GET", "/orders", alice)  # found through its claim
    assert (status, mine["total"]) == (200, 1)
