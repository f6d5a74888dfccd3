"""What each scenario sells and who shops: products (stock, limit) and one attempt per shopper."""

import random
from typing import NamedTuple

SEED = 7
WIDE_PRODUCTS, WIDE_PRODUCTS_QUICK = 100, 10


class Scenario(NamedTuple):
    name: str
    stocks: list[int]  # one product per entry
    per_user_limit: int
    shopper_products: list[int]  # the product index each shopper tries to buy
    crash: bool = False
    pay_fraction: float = 0.0  # flow: this share of the orders is paid, the rest must expire


def build(name: str, shoppers: int, stock: int, quick: bool) -> Scenario:
    if name in ("hot", "crash"):
        return Scenario(name, [stock], 1, [0] * shoppers, crash=name == "crash")
    if name == "flow":
        return Scenario(name, [stock], 1, [0] * shoppers, pay_fraction=0.5)
    if name == "wide":
        count = WIDE_PRODUCTS_QUICK if quick else WIDE_PRODUCTS
        stocks = [max(1, stock // count)] * count
        # Uneven popularity: a few products draw most of the crowd (Zipf-like weights).
        weights = [1 / (rank + 1) ** 1.1 for rank in range(count)]
        chosen = random.Random(SEED).choices(range(count), weights=weights, k=shoppers)
        return Scenario(name, stocks, 1, chosen)
    raise ValueError(f"unknown scenario {name!r}")
