"""`flashsale serve` as a user runs it: embedded PostgreSQL, its own Ray, a restart."""

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port

ADMIN = {"email": "ops@example.com", "password": "ops-pass-1"}


class Server:
    def __init__(self, data_dir: Path, port: int, *args: str) -> None:
        env = {**os.environ, "FLASHSALE_ADMIN_EMAIL": ADMIN["email"],
               "FLASHSALE_ADMIN_PASSWORD": ADMIN["password"], "FLASHSALE_BCRYPT_ROUNDS": "4"}
        env.pop("FLASHSALE_DATABASE_URL", None)
        env.pop("RAY_ADDRESS", None)
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flashsale.cli", "serve", "--port", str(port),
             "--data-dir", str(data_dir), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if "listening on" in line:
                return
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
