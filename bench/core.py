"""`python -m bench core`: one product actor and its WAL, without HTTP, next to pgbench.

Measures durable reservations per second (batches of 1,000 PlaceOrder commands, each answered
only after its COMMIT) and pgbench's hot-row UPDATE on the same server. Then the time an actor
with a long WAL takes to serve again after `kill -9`, and its memory, for two actors: the one
that took all those reservations (every order still a live hold) and a sale whose shoppers
reserve and fail to pay, round after round (a long history, few live orders).

First it runs the same batches through an actor that keeps no state, decides nothing and logs
no event, and only group-commits each reservation's orders row as the product actor writes it:
the part of the work that no engine keeping the read model in its commit can skip, and what the
prototype SPEC 7 quotes did.
"""

import asyncio
import os
import re
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import asyncpg
import msgspec
import psutil
import ray
import uvloop
from hdrh.histogram import HdrHistogram

from bench.load import LATENCY_MAX_US
from flashsale.actors.messages import (
    DefineProduct,
    FailPayment,
    OrderPlaced,
    OrderRecord,
    PlaceOrder,
    ProductTerms,
)
from flashsale.actors.product import STOCK_MAX, Policy
from flashsale.actors.product_actor import (
    ActorConfig,
    decode_commands,
    decode_decided,
    encode_commands,
    now_ms,
    send,
)
from flashsale.actors.registry import configure_ray, product_actor
from flashsale.actors.wal_service import wal_service_here
from flashsale.ids import uuid7
from flashsale.persistence.embedded import POSTGRES_BIN_PATH, EmbeddedPostgres
from flashsale.persistence.migrate import migrate
from flashsale.persistence.wal import insert_new_orders

BATCH_SIZE = 1_000
# What two front ends (`serve --workers 2`) send one product at full load: each keeps up to
# `batching.CALLS_IN_FLIGHT_MAX` full batches in flight.
CALLS_IN_FLIGHT = 8
PGBENCH_CLIENTS = 64
HOT_ROW_UPDATE = "UPDATE products SET stock = stock - 1 WHERE id = 1 AND stock >= 1;\n"
CHURN_LANES = 4  # shoppers' rounds in flight at once on the churned sale
PRICE_MINOR = 100
HOLD_TTL_MS = 86_400_000
RESERVING_STOCK = STOCK_MAX  # the reserving actor's sale: room for every reservation

# Sends one batch of encoded commands; returns how many of them reserved a unit.
BatchCall = Callable[[bytes], Awaitable[int]]


class CpuPerReservation(msgspec.Struct):
    """Microseconds of CPU per reservation while the reservations ran, by process."""

    actor: float
    wal_service: float  # the node's, which commits the actor's log
    postgres: float
    driver: float  # this process: sending batches and reading replies
    ray: float  # Ray's other processes: raylet, GCS, idle workers


class CpuMeter:
    """CPU time used by the processes of each part of the run, between `start` and `stop`."""

    def __init__(self, actor_pid: int, wal_service_pid: int, postmaster_pid: int) -> None:
        postmaster = psutil.Process(postmaster_pid)
        postgres = [postmaster, *postmaster.children()]
        driver = psutil.Process()
        skip = {actor_pid, wal_service_pid, *(p.pid for p in postgres)}
        ray_others = [p for p in driver.children(recursive=True) if p.pid not in skip]
        self._parts = {"actor": [psutil.Process(actor_pid)],
                       "wal_service": [psutil.Process(wal_service_pid)], "postgres": postgres,
                       "driver": [driver], "ray": ray_others}
        self._started: dict[str, float] = {}

    def _seconds(self) -> dict[str, float]:
        return {part: sum(_cpu_seconds(p) for p in processes)
                for part, processes in self._parts.items()}

    def start(self) -> None:
        self._started = self._seconds()

    def stop(self, reservations: int) -> CpuPerReservation:
        ended = self._seconds()
        return CpuPerReservation(**{
            part: (ended[part] - self._started[part]) / reservations * 1e6 for part in ended})


def _cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:  # a backend or worker that ended: its time is not counted
        return 0.0
    return times.user + times.system


class CoreResult(msgspec.Struct):
    reservations_per_s: float
    # Batches kept in flight, and how long each call took, from sent to answered after its
    # commit: a deeper pipeline groups more in a commit and waits longer for it.
    calls_in_flight: int
    call_p50_ms: float
    call_p99_ms: float
    # The same batches, where each reservation only group-commits its orders row (see above).
    rows_alone_per_s: float
    batch_size: int
    reservations: int
    cpu_us_per_reservation: CpuPerReservation
    pgbench_tps: float
    ratio: float
    # The churned sale: a long WAL, a state of a few thousand orders.
    recovery_s: float
    recovery_events: int
    # Memory unique to the actor process (USS) after recovery, and before the kill; RSS also
    # counts Ray's shared libraries.
    actor_rss_mb: float
    actor_uss_mb: float
    running_actor_uss_mb: float
    # The actor that took the reservations: every order in its WAL is a live hold.
    reserving_actor_recovery_s: float
    reserving_actor_events: int
    reserving_actor_uss_mb: float
    # The node's WAL service after all of this: one process shared by the node's sales.
    wal_service_uss_mb: float
    bare_ray_actor_uss_mb: float


def say(message: str) -> None:
    print(f"[bench core] {message}", flush=True)


def reservation_batches(reservations: int) -> list[bytes]:
    """Encoded batches of PlaceOrder commands, each for a new shopper; built before the clock
    starts."""
    return [
        encode_commands([PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1)
                         for _ in range(BATCH_SIZE)])
        for _ in range(reservations // BATCH_SIZE)
    ]


def product_call(actor: ray.actor.ActorHandle) -> BatchCall:
    async def call(blob: bytes) -> int:
        replies = decode_decided(await actor.handle.remote(blob)).replies
        return sum(isinstance(reply, OrderRecord) for reply in replies)
    return call


class Reserved(NamedTuple):
    per_s: float
    call_us: HdrHistogram  # each call's time


async def reserve(call: BatchCall, blobs: list[bytes], calls_in_flight: int) -> Reserved:
    """Durable reservations per second and each call's time, with `calls_in_flight` batches in
    flight so commits group."""
    reservations = len(blobs) * BATCH_SIZE
    gate = asyncio.Semaphore(calls_in_flight)
    call_us = HdrHistogram(1, LATENCY_MAX_US, 3)

    async def one(blob: bytes) -> None:
        async with gate:
            sent = time.perf_counter()
            reserved = await call(blob)
            call_us.record_value(round((time.perf_counter() - sent) * 1e6))
        if reserved != BATCH_SIZE:
            raise RuntimeError("a reservation was refused or lost")
        if call_us.get_total_count() % max(1, len(blobs) // 10) == 0:
            say(f"  {call_us.get_total_count() * BATCH_SIZE:,} of {reservations:,} reserved")

    started = time.perf_counter()
    await asyncio.gather(*(one(blob) for blob in blobs))
    return Reserved(reservations / (time.perf_counter() - started), call_us)


def pgbench(server: EmbeddedPostgres, seconds: int, workdir: Path) -> float:
    """pgbench's hot-row UPDATE on the same server, as the classic design would do it."""
    socket_dir = server.dsn().split("host=", 1)[1]
    psql = [str(POSTGRES_BIN_PATH / "psql"), "-q", "-h", socket_dir, "-U", "postgres"]
    subprocess.run([*psql, "-c", "CREATE DATABASE pgbench_hot"], check=True)
    subprocess.run([*psql, "-d", "pgbench_hot", "-c",
                    "CREATE TABLE products (id int PRIMARY KEY, stock int NOT NULL);"
                    "INSERT INTO products VALUES (1, 2000000000)"], check=True)
    script = workdir / "hot_row.sql"
    script.write_text(HOT_ROW_UPDATE)
    out = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pgbench"), "-n", "-c", str(PGBENCH_CLIENTS), "-j", "2",
         "-T", str(seconds), "-f", str(script), "-h", socket_dir, "-U", "postgres",
         "pgbench_hot"],
        check=True, capture_output=True, text=True,
    ).stdout
    match = re.search(r"tps = ([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"pgbench printed no tps:\n{out}")
    return float(match[1])


async def churn(actor: ray.actor.ActorHandle, events: int) -> None:
    """Rounds of 1,000 reservations whose payments then fail: two events per order, and the
    units come back for the next round."""
    rounds = events // (2 * BATCH_SIZE * CHURN_LANES)
    done = 0

    async def lane() -> None:
        nonlocal done
        for _ in range(rounds):
            placed = await send(actor, [PlaceOrder(uuid7(), str(uuid.uuid4()), "k", 1)
                                        for _ in range(BATCH_SIZE)])
            orders = [o for o in placed if isinstance(o, OrderRecord)]
            if len(orders) != BATCH_SIZE:
                raise RuntimeError(f"a churn round was refused: {placed[0]!r}")
            await send(actor, [FailPayment(o.order_id) for o in orders])
            done += 1
            if done % max(1, rounds * CHURN_LANES // 10) == 0:
                say(f"  {done * 2 * BATCH_SIZE:,} of {events:,} events")

    await asyncio.gather(*(lane() for _ in range(CHURN_LANES)))


async def define(actor: ray.actor.ActorHandle, product_id: str, stock: int) -> None:
    now = now_ms()
    terms = ProductTerms(product_id, PRICE_MINOR, "INR", now - 1_000, now + 86_400_000, 1)
    [reply] = await send(actor, [DefineProduct(terms, stock)])
    if reply is not None:
        raise RuntimeError(f"the sale was refused: {reply!r}")


async def recover_after_kill(actor: ray.actor.ActorHandle) -> tuple[float, int]:
    """Seconds from `kill -9` until the actor answers again, and the events it recovered."""
    os.kill(await actor.pid.remote(), signal.SIGKILL)
    started = time.perf_counter()
    while True:
        try:
            counts = await actor.counts.remote()
            return time.perf_counter() - started, counts.last_seq
        except ray.exceptions.RayError:
            await asyncio.sleep(0.01)


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, USS) of a process, in MB."""
    info = psutil.Process(pid).memory_full_info()
    return info.rss / 1e6, info.uss / 1e6


class RowsAlone:
    """Every reservation of a batch becomes its orders row, written as the WAL service writes
    it, group-committed, and nothing else happens."""

    def __init__(self, product_id: str) -> None:
        self._product_id = product_id
        self._waiting: list[tuple[list[OrderPlaced], asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly

    async def start(self, dsn: str) -> None:
        self._writer = asyncio.get_running_loop().create_task(
            self._write(await asyncpg.connect(dsn)))

    async def handle(self, blob: bytes) -> int:
        now = now_ms()
        placed = [OrderPlaced(cmd.order_id, cmd.user_id, cmd.idempotency_key, cmd.quantity,
                              PRICE_MINOR, now, now + HOLD_TTL_MS)
                  for cmd in decode_commands(blob) if isinstance(cmd, PlaceOrder)]
        committed = asyncio.get_running_loop().create_future()
        self._waiting.append((placed, committed))
        self._wakeup.set()
        await committed
        return len(placed)

    async def _write(self, conn: asyncpg.Connection) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._waiting = self._waiting, []
            try:
                async with conn.transaction():
                    await insert_new_orders(conn, self._product_id, "INR",
                                            [order for placed, _ in batch for order in placed])
            except Exception as error:  # the bench stops on the first batch that fails
                for _, committed in batch:
                    committed.set_exception(error)
                continue
            for _, committed in batch:
                committed.set_result(None)


_RemoteRowsAlone = ray.remote(RowsAlone)


async def start_rows_alone(dsn: str, product_id: str) -> ray.actor.ActorHandle:
    actor: ray.actor.ActorHandle = _RemoteRowsAlone.options(  # type: ignore[assignment]
        num_cpus=0).remote(product_id)
    await actor.start.remote(dsn)
    return actor


async def rows_alone(server: EmbeddedPostgres, blobs: list[bytes], calls_in_flight: int) -> float:
    """Reservations per second of the rows alone; it leaves the orders table as it found it,
    empty."""
    actor = await start_rows_alone(server.dsn(), str(uuid.uuid4()))
    per_s = (await reserve(actor.handle.remote, blobs, calls_in_flight)).per_s
    ray.kill(actor)
    conn = await asyncpg.connect(server.dsn())
    await conn.execute("TRUNCATE orders")
    await conn.execute("CHECKPOINT")  # the engine starts from a clean log too
    await conn.close()
    return per_s


@ray.remote(num_cpus=0)
class _BareActor:
    def pid(self) -> int:
        return os.getpid()


async def measure(server: EmbeddedPostgres, quick: bool, calls_in_flight: int,
                  workdir: Path) -> CoreResult:
    conn = await asyncpg.connect(server.dsn())
    await migrate(conn)
    await conn.close()
    config = ActorConfig(server.dsn(), Policy(hold_ttl_ms=HOLD_TTL_MS))
    reservations = 100_000 if quick else 1_000_000
    batches = reservation_batches(reservations)

    say(f"the orders rows alone: {reservations:,} of them, group-committed, in batches of "
        f"{BATCH_SIZE:,}, {calls_in_flight} in flight")
    rows_alone_per_s = await rows_alone(server, batches, calls_in_flight)
    say(f"  {rows_alone_per_s:,.0f} durable reservations/s")

    hot_id = str(uuid.uuid4())
    hot = product_actor(hot_id, config)
    await define(hot, hot_id, stock=RESERVING_STOCK)
    say(f"reserving {reservations:,} units in batches of {BATCH_SIZE:,}, {calls_in_flight} in "
        "flight")
    wal_service = wal_service_here()
    meter = CpuMeter(await hot.pid.remote(), await wal_service.pid.remote(), server.pid)
    meter.start()
    reserved = await reserve(product_call(hot), batches, calls_in_flight)
    cpu = meter.stop(reservations)
    per_s = reserved.per_s
    say(f"  {per_s:,.0f} durable reservations/s")

    seconds = 5 if quick else 15
    say(f"pgbench: hot-row UPDATE, {PGBENCH_CLIENTS} clients, {seconds} s")
    tps = await asyncio.to_thread(pgbench, server, seconds, workdir)
    say(f"  {tps:,.0f} tps")

    say("kill -9 of the reserving actor; timing until it serves again")
    hot_recovery_s, hot_events = await recover_after_kill(hot)
    _, hot_uss = memory_mb(await hot.pid.remote())
    say(f"  served again after {hot_recovery_s:.2f} s with {hot_events:,} events; "
        f"USS {hot_uss:.0f} MB")
    ray.kill(hot, no_restart=True)

    churned_id = str(uuid.uuid4())
    churned = product_actor(churned_id, ActorConfig(server.dsn()))
    await define(churned, churned_id, stock=BATCH_SIZE * CHURN_LANES)
    say(f"a sale of {BATCH_SIZE * CHURN_LANES:,} units: {reservations:,} events of "
        "reservations whose payments fail")
    await churn(churned, reservations)
    await asyncio.sleep(Policy().forget_settled_after_ms / 1000 + 1)  # the last are forgotten
    _, running_uss = memory_mb(await churned.pid.remote())
    say(f"  actor USS {running_uss:.0f} MB; kill -9 of it, timing until it serves again")
    recovery_s, events = await recover_after_kill(churned)
    actor_rss, actor_uss = memory_mb(await churned.pid.remote())
    say(f"  served again after {recovery_s:.2f} s with {events:,} events; "
        f"USS {actor_uss:.0f} MB, RSS {actor_rss:.0f} MB")
    _, wal_service_uss = memory_mb(await wal_service.pid.remote())
    say(f"the node's WAL service: USS {wal_service_uss:.0f} MB")
    bare = _BareActor.remote()
    _, bare_uss = memory_mb(await bare.pid.remote())
    for actor in (churned, bare):
        ray.kill(actor, no_restart=True)
    call_p50_ms, call_p99_ms = (reserved.call_us.get_value_at_percentile(p) / 1000
                                for p in (50, 99))
    return CoreResult(per_s, calls_in_flight, call_p50_ms, call_p99_ms, rows_alone_per_s,
                      BATCH_SIZE, reservations, cpu, tps, per_s / tps, recovery_s, events,
                      actor_rss, actor_uss, running_uss, hot_recovery_s, hot_events, hot_uss,
                      wal_service_uss, bare_uss)


def run_core(quick: bool, out_dir: Path, calls_in_flight: int = CALLS_IN_FLIGHT) -> CoreResult:
    """`out_dir` exists: `python -m bench` makes it before anything is measured."""
    with tempfile.TemporaryDirectory(prefix="bench-core-", dir=out_dir) as scratch:
        workdir = Path(scratch)
        server = EmbeddedPostgres(workdir).start()
        os.environ.pop("RAY_ADDRESS", None)  # measure on a local instance of our own
        configure_ray()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            result = uvloop.run(measure(server, quick, calls_in_flight, workdir))
        finally:
            ray.shutdown()
            server.close()
    (out_dir / "core.json").write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    print_table(result)
    say(f"wrote {out_dir / 'core.json'}")
    return result


def print_table(r: CoreResult) -> None:
    cpu = msgspec.structs.asdict(r.cpu_us_per_reservation)
    # The actor's threads share one interpreter lock: near 1 core, the actor is the limit.
    actor_cores, service_cores, all_cores = (
        us * r.reservations_per_s / 1e6 for us in (cpu["actor"], cpu["wal_service"],
                                                   sum(cpu.values())))
    rows = [
        ("durable reservations/s", f"{r.reservations_per_s:,.0f}", ">= 200,000"),
        ("a call, sent to answered", f"p50 {r.call_p50_ms:.0f}, p99 {r.call_p99_ms:.0f} ms "
         f"({r.calls_in_flight} in flight)", ""),
        ("the orders rows alone", f"{r.rows_alone_per_s:,.0f} (the engine: "
         f"{r.reservations_per_s / r.rows_alone_per_s:.0%} of it)", ""),
        ("CPU per reservation, µs", "actor {actor:.1f}, WAL service {wal_service:.1f}, "
         "PostgreSQL {postgres:.1f}, driver {driver:.1f}, Ray {ray:.1f}".format(**cpu), ""),
        ("cores busy while reserving", f"actor {actor_cores:.2f}, WAL service "
         f"{service_cores:.2f}, all {all_cores:.2f} of {os.cpu_count()}", ""),
        ("pgbench hot-row UPDATE tps", f"{r.pgbench_tps:,.0f}", ""),
        ("ratio", f"{r.ratio:.1f}x", ">= 40x"),
        ("churned sale: recovery", f"{r.recovery_s:.2f} s ({r.recovery_events:,} events)",
         "<= 2 s (1,000,000 events)"),
        ("churned sale: actor USS",
         f"{r.running_actor_uss_mb:.0f} MB; {r.actor_uss_mb:.0f} MB after recovery", "<= 60 MB"),
        ("reserving actor: recovery",
         f"{r.reserving_actor_recovery_s:.2f} s ({r.reserving_actor_events:,} events)",
         "<= 2 s (1,000,000 events)"),
        ("reserving actor: USS", f"{r.reserving_actor_uss_mb:.0f} MB", "<= 60 MB"),
        ("the node's WAL service: USS", f"{r.wal_service_uss_mb:.0f} MB", "one per node"),
        ("empty Ray actor USS", f"{r.bare_ray_actor_uss_mb:.0f} MB", ""),
    ]
    print(f"\n{'measure':30}  {'result':34}  bar")
    for name, value, bar in rows:
        print(f"{name:30}  {value:34}  {bar}")
    print()
