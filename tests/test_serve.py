"""`flashsale serve` as a user runs it: embedded PostgreSQL, its own Ray, a restart."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import free_port

ADMIN = {"email": "ops@example.com", "password": "ops-pass-1"}


class Server:
    def __init__(self, data_dir: Path, port: int, *args: str,
                 env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "FLASHSALE_ADMIN_EMAIL": ADMIN["email"],
               "FLASHSALE_ADMIN_PASSWORD": ADMIN["password"], "FLASHSALE_BCRYPT_ROUNDS": "4",
               **(env or {})}
        env.pop("FLASHSALE_DATABASE_URL", None)
        env.pop("RAY_ADDRESS", None)
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flashsale.cli", "serve", "--port", str(port),
             "--data-dir", str(data_dir), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self.wait_for("listening on")

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The next line of output that matches `pattern`."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError("the server exited:\n" + "".join(self.output))

    def call(self, method: str, path: str, body: object = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {token}"}
                                                     if token else {}), **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def login(self, email: str, password: str) -> str:
        status, body = self.call("POST", "/auth/login", {"email": email, "password": password})
        assert status == 200, body
        return str(body["access_token"])

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        rest, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, "".join(self.output) + rest
        return "".join(self.output) + rest


@pytest.mark.timeout(240)
def test_a_restart_on_the_same_data_dir_keeps_users_sales_and_orders(tmp_path: Path) -> None:
    port = free_port()
    server = Server(tmp_path, port, "--demo")
    try:
        assert "demo seeded" in "".join(server.output)
        status, health = server.call("GET", "/health")
        assert (status, health) == (200, {"status": "ok"})
        admin = server.login(**ADMIN)
        status, sale = server.call("POST", "/products", {
            "name": "Restart-proof sale", "price": 1000, "stock": 3,
            "sale_starts_at": "2026-01-01T00:00:00Z", "sale_ends_at": "2099-01-01T00:00:00Z"},
            admin)
        assert status == 201, sale
        status, _ = server.call("POST", "/auth/register", {
            "email": "kept@example.com", "password": "kept-pass-1", "full_name": "Kept"})
        assert status == 201
        shopper = server.login("kept@example.com", "kept-pass-1")
        status, placed = server.call("POST", "/orders", {"product_id": sale["id"], "quantity": 1},
                                     shopper, {"X-Idempotency-Key": "before-restart"})
        assert status == 201, placed
    finally:
        log = server.stop()
    assert "stopped" in log

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
        server.stop()


def _listening(server: Server, port: int) -> set[int]:
    """The server's processes that accept connections on `port`."""
    parent = psutil.Process(server.process.pid)
    return {p.pid for p in [parent, *parent.children(recursive=True)]
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in p.net_connections("tcp"))}


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
