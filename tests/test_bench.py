"""The load-test harness's own logic: its audit, its scenarios, its results (not its speed)."""

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import ray
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import ADMIN, Server, free_port

import bench.__main__ as bench_main
from bench.audit import ProductFacts, judge
from bench.core import (
    BATCH_SIZE,
    RESERVING_STOCK,
    CoreResult,
    CpuPerReservation,
    define,
    print_table,
    product_call,
    reservation_batches,
    start_rows_alone,
)
from bench.load import Shopper, fire
from bench.scenarios import build
from flashsale.actors.product import STOCK_MAX
from flashsale.actors.product_actor import ActorConfig
from flashsale.actors.registry import product_actor

STOCKS = {"p": 10}
CLEAN = {"p": ProductFacts(stock=10, available=0, reserved=6, sold=4)}


def verdict_for(counts: dict[str, ProductFacts], created: int = 10,
                per_user: Counter[tuple[str, str]] | None = None, unreadable: int = 0,
                errors_5xx: int = 0) -> tuple[bool, int, list[str]]:
    verdict = judge(STOCKS, counts, Counter({"p": created}),
                    per_user or Counter({("u", "p"): 1}), 1, unreadable, errors_5xx)
    return verdict.ok, verdict.oversold, verdict.problems


def test_a_clean_run_passes_the_audit() -> None:
    assert verdict_for(CLEAN) == (True, 0, [])


def test_the_audit_catches_a_planted_oversell() -> None:
    oversold = {"p": ProductFacts(stock=10, available=-1, reserved=7, sold=4)}
    ok, units, problems = verdict_for(oversold, created=11)
    assert not ok and units == 1
    assert any("oversold by 1" in p for p in problems)


def test_the_audit_catches_acknowledged_orders_the_server_forgot() -> None:
    ok, _, problems = verdict_for(CLEAN, created=12)
    assert not ok and any("12 units acknowledged but 10" in p for p in problems)


def test_the_audit_catches_limits_unreadable_orders_and_5xx() -> None:
    ok, _, problems = verdict_for(CLEAN, per_user=Counter({("u", "p"): 2}), unreadable=3,
                                  errors_5xx=1)
    assert not ok and len(problems) == 3


def test_scenarios_have_the_promised_shape() -> None:
    hot = build("hot", shoppers=2_000, stock=200, quick=True)
    assert hot.stocks == [200] and len(hot.shopper_products) == 2_000 and not hot.crash
    assert build("crash", 2_000, 200, quick=True).crash
    assert build("flow", 2_000, 200, quick=True).pay_fraction == 0.5
    wide = build("wide", shoppers=10_000, stock=1_000, quick=False)
    assert len(wide.stocks) == 100 and sum(wide.stocks) == 1_000
    popularity = Counter(wide.shopper_products)
    assert popularity[0] > 5 * popularity[99]  # uneven: a few products draw the crowd
    with pytest.raises(ValueError):
        build("flood", 1, 1, quick=True)


def test_the_core_table_says_call_times_cores_busy_and_the_engines_share_of_the_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cpu = CpuPerReservation(actor=9.0, wal_service=2.0, postgres=4.0, driver=1.5, ray=0.5)
    print_table(CoreResult(
        reservations_per_s=100_000, calls_in_flight=8, call_p50_ms=80.4, call_p99_ms=120.6,
        rows_alone_per_s=160_000, batch_size=1_000,
        reservations=1_000_000, cpu_us_per_reservation=cpu, pgbench_tps=2_500, ratio=40.0,
        recovery_s=0.5, recovery_events=1_000_000, actor_rss_mb=90, actor_uss_mb=49,
        running_actor_uss_mb=57, reserving_actor_recovery_s=3.5,
        reserving_actor_events=1_000_001, reserving_actor_uss_mb=677, wal_service_uss_mb=40,
        bare_ray_actor_uss_mb=43))
    lines = capsys.readouterr().out.splitlines()
    busy = next(line for line in lines if line.startswith("cores busy while reserving"))
    assert f"actor 0.90, WAL service 0.20, all 1.70 of {os.cpu_count()}" in busy
    rows_alone = next(line for line in lines if line.startswith("the orders rows alone"))
    assert "160,000 (the engine: 62% of it)" in rows_alone
    call = next(line for line in lines if line.startswith("a call, sent to answered"))
    assert "p50 80, p99 121 ms (8 in flight)" in call


async def test_the_rows_alone_actor_answers_a_batch_only_with_all_its_rows_committed(
    ray_session: None, database_dsn: str,
) -> None:
    product_id = str(uuid.uuid4())
    rows_alone = await start_rows_alone(database_dsn, product_id)
    batches = reservation_batches(3 * BATCH_SIZE)
    reserved: list[int] = await asyncio.gather(*(rows_alone.handle.remote(b) for b in batches))
    conn = await asyncpg.connect(database_dsn)
    try:
        rows = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE product_id = $1 AND status = 'pending'",
            product_id)
    finally:
        await conn.close()
        ray.kill(rows_alone)
    assert reserved == [BATCH_SIZE] * 3 and rows == 3 * BATCH_SIZE


async def test_the_reserving_sale_takes_reservations_and_a_refused_sale_stops_the_bench(
    ray_session: None, database_dsn: str,
) -> None:
    product_id = str(uuid.uuid4())
    actor = product_actor(product_id, ActorConfig(database_dsn))
    try:
        with pytest.raises(RuntimeError, match="the sale was refused"):
            await define(actor, product_id, stock=STOCK_MAX + 1)
        await define(actor, product_id, stock=RESERVING_STOCK)
        assert await product_call(actor)(reservation_batches(BATCH_SIZE)[0]) == BATCH_SIZE
    finally:
        ray.kill(actor, no_restart=True)


@pytest.mark.parametrize(("args", "error"), [
    (["run", "--shoppers", "0"], "--shoppers, --stock and --connections must be positive"),
    (["run", "--connections", "0"], "--shoppers, --stock and --connections must be positive"),
    (["run", "--rate", "0"], "--rate must be positive"),
    (["run", "--duration", "-1"], "--duration must be positive"),
    (["run", "--out", "{file}/out"], "--out {file}/out: Not a directory"),
    (["core", "--out", "{file}/out"], "--out {file}/out: Not a directory"),
    (["core", "--calls-in-flight", "0"], "--calls-in-flight must be positive"),
])
def test_bad_arguments_stop_the_bench_before_it_measures(
    args: list[str], error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started: list[object] = []
    monkeypatch.setattr(bench_main, "run_bench", started.append)
    monkeypatch.setattr(bench_main, "run_core", lambda *a: started.append(a))
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench_main.main([arg.format(file=file) for arg in args])
    assert exit_info.value.code == 2 and not started
    assert capsys.readouterr().err.splitlines()[-1].endswith(error.format(file=file))


def quick_hot_run(out: Path, *args: str,
                  env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """A small `bench run --scenario hot`: its results.json, and what it printed."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items()
           if k not in ("RAY_ADDRESS", "FLASHSALE_DATABASE_URL")}
    run = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--scenario", "hot", "--quick", "--shoppers",
         "300", "--stock", "30", "--connections", "16", "--out", str(out), *args],
        env=env, capture_output=True, text=True, timeout=280,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return json.loads((out / "results.json").read_text()), run.stdout


@pytest.mark.timeout(300)
def test_a_quick_hot_run_writes_results_and_plots(tmp_path: Path) -> None:
    results, printed = quick_hot_run(tmp_path)
    assert results["scenario"] == "hot" and results["machine"]["cpus"] >= 1
    assert results["params"]["shoppers"] == 300
    fields = {"orders_per_s", "p50_ms", "p99_ms", "max_ms", "created", "rejected",
              "errors_5xx", "oversold", "audit_ok"}
    for side in ("engine", "baseline"):
        assert fields <= set(results[side])
        assert results[side]["audit_ok"] and results[side]["oversold"] == 0
        assert results[side]["created"] == 30
        assert results[side]["rejected"] == {"out_of_stock": 270}
    assert results["ratio_throughput"] > 0
    for plot in ("throughput.png", "latency.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert "throughput ratio engine/baseline" in printed


async def test_a_duration_stops_the_shoppers_not_reached_by_then() -> None:
    """`--duration`: nothing is sent (or due) after it, in either loop. The target is a bare
    HTTP server taking 10 ms per order: the client is what is under test."""
    received = 0

    async def take(_: web.Request) -> web.Response:
        nonlocal received
        received += 1
        await asyncio.sleep(0.01)
        return web.json_response({"order_id": str(uuid.uuid4())}, status=201)

    app = web.Application()
    app.router.add_post("/orders", take)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        shoppers = [Shopper("token", "product", str(n)) for n in range(10_000)]
        url = str(server.make_url("")).rstrip("/")
        closed = await fire(url, shoppers, connections=4, duration_s=0.5)
        assert 0 < closed.answered == len(closed.created) == received < len(shoppers)
        received = 0
        opened = await fire(url, shoppers, connections=4, rate=100.0, duration_s=0.5)
        assert opened.answered == received == 50  # due at 0, 10, ..., 490 ms
    finally:
        await server.close()


@pytest.mark.timeout(300)
def test_a_run_targets_a_running_engine_with_url(tmp_path: Path) -> None:
    """`--url`: the engine is one a user started (its JWT key, its admin); the bench creates
    the sale through its API, fires, and audits it through its API."""
    engine_env = {"FLASHSALE_JWT_SECRET": "a-running-engine's-own-key-0123456789abcdef",
                  "FLASHSALE_RATE_LIMITS": "off"}
    port = free_port()
    engine = Server(tmp_path / "engine", port, env=engine_env)
    try:
        results, _ = quick_hot_run(tmp_path / "out", "--url", engine.url, env={
            **engine_env, "FLASHSALE_ADMIN_EMAIL": ADMIN["email"],
            "FLASHSALE_ADMIN_PASSWORD": ADMIN["password"]})
        assert results["params"]["url"] == engine.url
        assert results["engine"]["audit_ok"] and results["engine"]["created"] == 30
        assert results["engine"]["oversold"] == 0 and results["baseline"]["created"] == 30
        status, products = engine.call("GET", "/products")
        assert status == 200 and [p["sold"] + p["reserved"] for p in products] == [30]
    finally:
        engine.stop()
