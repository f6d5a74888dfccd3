"""After every run: what the server says must add up, from its API and (for the engine) its WAL.

`judge` is pure, so a test can plant an oversell and watch it get caught."""

import asyncio
from collections import Counter
from typing import NamedTuple

import aiohttp
import msgspec

from bench.load import LoadResult, Shopper


class ProductFacts(NamedTuple):
    stock: int
    available: int
    reserved: int
    sold: int


class Verdict(msgspec.Struct):
    ok: bool
    oversold: int
    problems: list[str]


def judge(stocks: dict[str, int], counts: dict[str, ProductFacts],
          created_units: Counter[str], orders_per_user: Counter[tuple[str, str]],
          per_user_limit: int, unreadable: int, errors_5xx: int,
          allow_5xx: bool = False) -> Verdict:
    problems: list[str] = []
    oversold = 0
    for product_id, stock in stocks.items():
        facts = counts[product_id]
        held = facts.reserved + facts.sold
        oversold += max(0, held - stock, created_units[product_id] - stock)
        if facts.available < 0 or facts.available + held != facts.stock:
            problems.append(f"product {product_id}: available {facts.available} + reserved "
                            f"{facts.reserved} + sold {facts.sold} != stock {facts.stock}")
        if created_units[product_id] != held:
            problems.append(f"product {product_id}: {created_units[product_id]} units "
                            f"acknowledged but {held} reserved or sold")
    if oversold:
        problems.append(f"oversold by {oversold} units")
    over_limit = sum(1 for units in orders_per_user.values() if units > per_user_limit)
    if over_limit:
        problems.append(f"{over_limit} shoppers hold more than {per_user_limit} units")
    if unreadable:
        problems.append(f"{unreadable} acknowledged orders are not readable")
    if errors_5xx and not allow_5xx:
        problems.append(f"{errors_5xx} server errors (5xx)")
    return Verdict(not problems, oversold, problems)


async def gather_facts(url: str, product_ids: list[str], shoppers: list[Shopper],
                       load: LoadResult, expected_status: dict[str, str] | None = None,
                       connections: int = 32) -> tuple[dict[str, ProductFacts], int]:
    """Product counts, and how many acknowledged orders cannot be read back with the status they
    should have (by default pending or confirmed), from the API."""
    async with aiohttp.ClientSession() as session:
        counts = {}
        for product_id in product_ids:
            async with session.get(f"{url}/products/{product_id}") as reply:
                body = await reply.json()
            counts[product_id] = ProductFacts(body["stock"], body["available"], body["reserved"],
                                              body["sold"])
        gate = asyncio.Semaphore(connections)

        async def readable(shopper: Shopper, order_id: str) -> bool:
            async with gate, session.get(
                f"{url}/orders/{order_id}", headers={"Authorization": f"Bearer {shopper.token}"}
            ) as reply:
                body = await reply.json(content_type=None)
                wanted = ({expected_status[order_id]} if expected_status
                          else {"pending", "confirmed"})
                return reply.status == 200 and body.get("status") in wanted

        answers = await asyncio.gather(*(readable(shoppers[c.shopper], c.order_id)
                                         for c in load.created))
    return counts, answers.count(False)


def tally(shoppers: list[Shopper], load: LoadResult) -> tuple[Counter[str],
                                                              Counter[tuple[str, str]]]:
    """Units acknowledged per product, and per (shopper token, product)."""
    per_product: Counter[str] = Counter()
    per_user: Counter[tuple[str, str]] = Counter()
    for created in load.created:
        shopper = shoppers[created.shopper]
        per_product[shopper.product_id] += shopper.quantity
        per_user[(shopper.token, shopper.product_id)] += shopper.quantity
    return per_product, per_user
