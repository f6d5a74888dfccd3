"""`flashsale serve` as a user runs it: embedded PostgreSQL, its own Ray, a restart after
`kill -9`."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import ADMIN, Server, free_port

from flashsale.persistence.embedded import EmbeddedPostgres, PostmasterInfo


def _live_sale(server: Server, name: str, **terms: int) -> dict[str, Any]:
    """A sale open from 2026 to 2099, created by the admin."""
    status, sale = server.call("POST", "/products", {
        "name": name, "price": 1000, "sale_starts_at": "2026-01-01T00:00:00Z",
        "sale_ends_at": "2099-01-01T00:00:00Z", **terms}, server.login(**ADMIN))
    assert status == 201, sale
    return dict(sale)


@pytest.mark.timeout(240)
def test_a_server_killed_with_9_comes_back_with_users_sales_and_orders(tmp_path: Path) -> None:
    port = free_port()
    server = Server(tmp_path, port, "--demo")
    try:
        assert "demo seeded" in "".join(server.output)
        status, health = server.call("GET", "/health")
        assert (status, health) == (200, {"status": "ok"})
        sale = _live_sale(server, "Restart-proof sale", stock=3)
        status, _ = server.call("POST", "/auth/register", {
            "email": "kept@example.com", "password": "kept-pass-1", "full_name": "Kept"})
        assert status == 201
        shopper = server.login("kept@example.com", "kept-pass-1")
        status, placed = server.call("POST", "/orders", {"product_id": sale["id"], "quantity": 1},
                                     shopper, {"X-Idempotency-Key": "before-restart"})
        assert status == 201, placed
    finally:
        server.process.kill()  # its Ray dies with it; its embedded PostgreSQL does not
        server.process.communicate(timeout=60)

    server = Server(tmp_path, port, "--demo")
    try:
        assert "nothing seeded" in "".join(server.output)
        shopper = server.login("kept@example.com", "kept-pass-1")
        status, order = server.call("GET", f"/orders/{placed['order_id']}", token=shopper)
        assert (status, order["status"]) == (200, "pending")
        status, product = server.call("GET", f"/products/{sale['id']}")
        assert (product["available"], product["reserved"], product["sold"]) == (2, 1, 0)
        status, again = server.call("POST", "/orders", {"product_id": sale["id"], "quantity": 1},
                                    shopper, {"X-Idempotency-Key": "before-restart"})
        assert (status, again["order_id"]) == (201, placed["order_id"])
    finally:
        log = server.stop()
    assert "stopped" in log
    postmaster = PostmasterInfo.read_from_pgdata(tmp_path / "pg")
    outlived = postmaster is not None and postmaster.is_running()
    if postmaster is not None and outlived:
        psutil.Process(postmaster.pid).terminate()
    assert not outlived, "the database outlived the server"


@pytest.mark.timeout(240)
def test_a_second_server_on_the_same_data_dir_is_refused_with_one_line(tmp_path: Path) -> None:
    """Its own Ray's actors would wait for the first server's to end: every order a 503."""
    first = Server(tmp_path, free_port())
    try:
        env = {k: v for k, v in os.environ.items()
               if k not in ("FLASHSALE_DATABASE_URL", "RAY_ADDRESS")}
        second = subprocess.run([sys.executable, "-m", "flashsale.cli", "serve", "--port",
                                 str(free_port()), "--data-dir", str(tmp_path)],
                                env=env, capture_output=True, text=True, timeout=60)
    finally:
        assert "stopped" in first.stop()
    assert (second.returncode, second.stderr.strip()) == (
        2, f"flashsale: another server (pid {first.process.pid}) serves from {tmp_path}: stop "
           "it, or give this one a --data-dir of its own")


def _listening(server: Server, port: int) -> set[int]:
    """The server's processes that accept connections on `port`."""
    parent = psutil.Process(server.process.pid)
    found = set()
    for process in [parent, *parent.children(recursive=True)]:
        try:  # Ray starts and ends worker processes of its own meanwhile
            connections = process.net_connections("tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            found.add(process.pid)
    return found


@pytest.mark.timeout(240)
def test_workers_share_the_port_and_the_rate_limits_and_one_killed_is_replaced(
        tmp_path: Path) -> None:
    port = free_port()
    server = Server(tmp_path, port, "--workers", "2",
                    env={"FLASHSALE_RATE_LIMITS": "register=3/60"})
    try:
        other = int(server.wait_for(r"front end (\d+) ready")[1])
        assert _listening(server, port) == {server.process.pid, other}
        # Each request on a new connection: the kernel spreads them over both front ends.
        statuses = [server.call("POST", "/auth/register", {
            "email": f"shopper{n}@example.com", "password": "sale-day-1",
            "full_name": "Shopper"})[0] for n in range(8)]
        assert statuses == [201] * 3 + [429] * 5

        os.kill(other, signal.SIGKILL)
        server.wait_for(rf"front end {other} exited \(-9\); starting another")
        replacement = int(server.wait_for(r"front end (\d+) ready")[1])
        assert _listening(server, port) == {server.process.pid, replacement}
        assert [server.call("GET", "/health")[0] for _ in range(4)] == [200] * 4
    finally:
        log = server.stop()
    assert "stopped" in log
    assert not psutil.pid_exists(replacement)


@pytest.mark.timeout(240)
def test_front_ends_stop_once_their_server_is_killed_and_leave_the_port_free(
        tmp_path: Path) -> None:
    port = free_port()
    server = Server(tmp_path, port, "--workers", "2")
    other = int(server.wait_for(r"front end (\d+) ready")[1])
    server.process.kill()
    try:
        rest, _ = server.process.communicate(timeout=60)  # the front end shares its output
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(other).wait(timeout=30)  # its output is closed; it is exiting
    finally:
        if psutil.pid_exists(other):  # left behind: not to be left to the next tests
            psutil.Process(other).kill()
    assert f"front end {other}: its server is gone; stopping" in rest

    server = Server(tmp_path, port)  # would fail to listen beside a front end left behind
    assert "stopped" in server.stop()


@pytest.mark.timeout(240)
def test_a_server_whose_ray_died_stops_and_a_new_start_serves_again(
        tmp_path: Path) -> None:
    """Its raylet killed (or out of memory), every product actor dies with it. The server
    stops with status 1, for its supervisor to start it again."""
    port = free_port()
    server = Server(tmp_path, port)
    try:
        sale = _live_sale(server, "Ray-proof sale", stock=3)
        assert server.call("GET", "/health") == (200, {"status": "ok"})
        descendants = psutil.Process(server.process.pid).children(recursive=True)
        next(p for p in descendants if p.name() == "raylet").kill()
        server.wait_for("its Ray instance died; stopping")
        rest, _ = server.process.communicate(timeout=90)
        assert (server.process.returncode, rest.splitlines()[-1]) == (1, "flashsale: stopped")
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.communicate(timeout=60)
            EmbeddedPostgres(tmp_path).start().close()  # the killed server's database too

    server = Server(tmp_path, port)
    try:
        status, placed = server.call("POST", "/orders", {"product_id": sale["id"], "quantity": 1},
                                     server.login(**ADMIN), {"X-Idempotency-Key": "after"})
        assert (status, placed["status"]) == (201, "pending"), placed
    finally:
        assert "stopped" in server.stop()


@pytest.mark.timeout(240)
def test_the_embedded_database_is_started_again_as_soon_as_it_can_start(tmp_path: Path) -> None:
    """Its postmaster killed while its configuration is broken: the server says why it cannot
    start it, once, and starts it once the configuration is mended."""
    server = Server(tmp_path, free_port())
    try:
        admin = server.login(**ADMIN)
        sale = _live_sale(server, "Outage-proof sale", stock=5, per_user_limit=2)
        status, placed = server.call("POST", "/orders", {"product_id": sale["id"], "quantity": 1},
                                     admin, {"X-Idempotency-Key": "before"})
        assert status == 201, placed
        settings = tmp_path / "pg" / "postgresql.auto.conf"
        mended = settings.read_text()
        settings.write_text(mended + "max_connections = 'lots'\n")
        postmaster = PostmasterInfo.read_from_pgdata(tmp_path / "pg")
        assert postmaster is not None
        os.kill(postmaster.pid, signal.SIGKILL)
        server.wait_for(r"starting the embedded PostgreSQL again failed, retrying: the embedded "
                        r"PostgreSQL in \S+ did not start: FATAL: configuration file .* contains "
                        r"errors \(its log: \S+\)")
        time.sleep(3)  # three more tries, each failing the same way
        settings.write_text(mended)
        deadline = time.monotonic() + 30
        while (status := server.call("GET", "/health")[0]) != 200:
            assert time.monotonic() < deadline, f"/health answers {status} 30 s later"
            time.sleep(0.5)
        status, order = server.call("GET", f"/orders/{placed['order_id']}", token=admin)
        assert (status, order["status"]) == (200, "pending")
        # The actor's first flush since meets its dead connection: 503, and it recovers.
        while (status := server.call("POST", "/orders", {"product_id": sale["id"], "quantity": 1},
                                     admin, {"X-Idempotency-Key": "after"})[0]) == 503:
            assert time.monotonic() < deadline, "orders still answer 503 30 s later"
            time.sleep(0.5)
        assert status == 201
        # What the actor says reaches the server's output.
        server.wait_for(rf"product {sale['id']}: writing its log works again")
    finally:
        log = server.stop()
    assert "the embedded PostgreSQL had stopped; started it again" in log
    assert log.count("contains errors") == 1, log
    assert f"product {sale['id']}: writing its log failed" in log
    assert "stopped" in log
