"""A product's writer cut off from the database by the network, for real: the writer runs in a
network namespace of its own, joined to this host by a veth pair, and the pair's far end loses
its address, as a machine that dies does. No packet crosses after that, not even a FIN."""

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import asyncpg
import pytest
import ray
from helpers import free_port, live_state
from test_product_actor import CallFailed, ProductFactory, _actor_log, place, send_until_decided

from flashsale.actors.messages import OrderRecord, ProductCounts
from flashsale.actors.product_actor import ActorConfig, send
from flashsale.actors.registry import product_actor
from flashsale.actors.wal_service import wal_service_here
from flashsale.persistence.embedded import POSTGRES_BIN_PATH, EmbeddedPostgres

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="network namespaces need root and iproute2")

HOST_IP, FAR_IP = "10.213.7.1", "10.213.7.2"

# The engine's writer on the far machine: a real product actor's code and its WAL service's,
# run there without Ray.
FAR_WRITER = """
import asyncio, sys, time, uuid
from flashsale.actors.messages import DefineProduct, PlaceOrder, ProductTerms
from flashsale.actors.product_actor import (ActorConfig, ProductActor, decode_decided,
                                            encode_commands)
from flashsale.ids import uuid7
from flashsale.actors.wal_service import socket_path
from flashsale.persistence.wal_link import serve_product_log

SOCKET = socket_path()

class FarProductActor(ProductActor):
    async def _wal_address(self) -> str:
        return SOCKET

async def main(dsn: str, product_id: str) -> None:
    await asyncio.start_unix_server(serve_product_log, SOCKET)
    writer = FarProductActor(product_id, ActorConfig(dsn))
    now = time.time_ns() // 1_000_000
    terms = ProductTerms(product_id, 1_000, "INR", now - 1_000, now + 3_600_000, 1)
    order = PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1)
    decided = await writer.handle(encode_commands([DefineProduct(terms, 10), order]))
    print(decode_decided(decided).counts.last_seq, flush=True)
    await asyncio.sleep(3_600)

asyncio.run(main(*sys.argv[1:]))
"""


class FarMachine:
    """A network namespace joined to this host by a veth pair: a machine that can vanish."""

    def __init__(self) -> None:
        name = f"fs{os.getpid()}"
        self.there = ["ip", "netns", "exec", name]  # runs a command on it
        self._near, self._far = f"{name}n", f"{name}f"
        _run("ip", "netns", "add", name)
        try:
            _run("ip", "link", "add", self._near, "type", "veth", "peer", "name", self._far,
                 "netns", name)
            _run("ip", "addr", "add", f"{HOST_IP}/30", "dev", self._near)
            _run("ip", "link", "set", self._near, "up")
            _run(*self.there, "ip", "link", "set", self._far, "up")
            self.come_back()
        except subprocess.CalledProcessError:
            self.remove()
            raise

    def vanish(self) -> None:
        """Its address goes: what it sends is dropped, and what is sent to it goes unanswered."""
        _run(*self.there, "ip", "addr", "flush", "dev", self._far)

    def come_back(self) -> None:
        _run(*self.there, "ip", "addr", "add", f"{FAR_IP}/30", "dev", self._far)

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.there[-1]], check=False)
        subprocess.run(["ip", "link", "del", self._near], check=False, capture_output=True)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def far_machine() -> Iterator[FarMachine]:
    machine = FarMachine()
    try:
        yield machine
    finally:
        machine.remove()


@contextmanager
def _on_the_network(server: EmbeddedPostgres, listen_on: str, client: str,
                    there: Sequence[str] = ()) -> Iterator[int]:
    """The test's own server listening on TCP, as a database on the network does (the embedded
    one listens on a Unix socket only), started `there`; yields its port."""
    with (server.pgdata / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {client}/32 trust\n")
    server.stop()
    port = free_port()
    user = server.server.system_user  # the tests here run as root only
    assert user is not None
    pg_ctl = ["runuser", "-u", user, "--",
              str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(server.pgdata), "-w"]
    _run(*there, *pg_ctl, "-l", str(server.pgdata / "log"),
         "-o", f"-h '{listen_on}' -p {port} -k ''", "start")
    try:
        yield port
    finally:
        _run(*pg_ctl, "-m", "immediate", "stop")
        server.restart()  # as the fixture that stops it expects


@pytest.fixture
def database_here(own_database: EmbeddedPostgres, far_machine: FarMachine) -> Iterator[int]:
    with _on_the_network(own_database, f"127.0.0.1,{HOST_IP}", FAR_IP) as port:
        yield port


@pytest.fixture
def database_far_away(own_database: EmbeddedPostgres,
                      far_machine: FarMachine) -> Iterator[int]:
    with _on_the_network(own_database, FAR_IP, HOST_IP, far_machine.there) as port:
        yield port


async def test_a_writer_whose_machine_vanished_holds_its_product_for_seconds_not_hours(
    ray_session: None, far_machine: FarMachine, database_here: int
) -> None:
    """Ray starts a product's actor again elsewhere when the machine of the old one dies. The
    old one's database session, which holds the product's writer lock, has no one to close it:
    the server must find the client gone on its own (TCP keepalives and a user timeout set by
    the engine's sessions) and end it, and the new actor must say what it waits for."""
    port = database_here
    product_id = str(uuid.uuid4())
    far = await asyncio.create_subprocess_exec(
        *far_machine.there, sys.executable, "-c", FAR_WRITER,
        f"postgresql://postgres@{HOST_IP}:{port}/postgres", product_id,
        stdout=subprocess.PIPE)
    try:
        assert far.stdout is not None and (await far.stdout.readline()).strip() == b"2"
        far_machine.vanish()
    finally:
        far.kill()
        await far.wait()
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    admin = await asyncpg.connect(dsn)
    try:
        assert await admin.fetchval("SELECT count(*) FROM pg_stat_activity "
                                    "WHERE client_addr = $1", FAR_IP) == 1
    finally:
        await admin.close()
    actor = product_actor(product_id, ActorConfig(dsn))
    try:
        started = time.monotonic()
        [reply] = await send_until_decided(actor, [place()], timeout_s=60)
        waited_s = time.monotonic() - started
        assert isinstance(reply, OrderRecord)
        assert await actor.counts.remote() == ProductCounts(10, 8, 2, 0, 3)
        said = _actor_log(await wal_service_here().pid.remote())
        assert f"product {product_id}: waiting for the session of its earlier writer" in said
        assert f"from {FAR_IP}" in said
        print(f"the new actor served {waited_s:.1f} s after the old one's machine vanished")
    finally:
        ray.kill(actor, no_restart=True)


async def test_an_actor_whose_database_vanished_mid_commit_fails_it_and_recovers(
    products: ProductFactory, far_machine: FarMachine, database_far_away: int
) -> None:
    """The database's machine dies, or the network to it fails, in the middle of a commit:
    nothing answers, not even a reset. The actor must fail the batch, which its callers retry
    by idempotency key, and recover, which reaches a server that took over, instead of waiting
    out the system's TCP retries for a quarter of an hour."""
    dsn = f"postgresql://postgres@{FAR_IP}:{database_far_away}/postgres"
    product_id, actor = await products(stock=10, dsn=dsn)
    [first] = await send(actor, [place()])
    far_machine.vanish()
    async with asyncio.timeout(60):
        with pytest.raises(CallFailed):
            await send(actor, [place()])
    assert (f"product {product_id}: writing its log failed"
            in _actor_log(await actor.pid.remote()))
    far_machine.come_back()
    [second] = await send_until_decided(actor, [place()])
    assert isinstance(first, OrderRecord) and isinstance(second, OrderRecord)
    assert {first.order_id, second.order_id} <= (await live_state(actor)).orders.keys()
