"""The `flashsale` command as a user runs it: a real process, real signals."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
from helpers import ProductFactory, free_port, set_database_default

from flashsale import cli
from flashsale.cli import build_parser
from flashsale.persistence.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent


def flashsale(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "flashsale.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("command", [[], ["serve"], ["replay"]])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: flashsale" in capsys.readouterr().out


def test_serve_uses_an_external_database_and_stops_on_sigterm_while_starting(
    database_dsn: str,
) -> None:
    env = {**os.environ, "FLASHSALE_DATABASE_URL": database_dsn}
    process = flashsale("serve", "--port", str(free_port()), env=env)
    assert process.stdout is not None
    assert "PostgreSQL ready (external)" in process.stdout.readline()
    process.send_signal(signal.SIGTERM)  # while Ray is still starting
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped" in out


def test_bad_configuration_stops_the_start_with_one_line() -> None:
    env = {**os.environ, "FLASHSALE_PAYMENT_PROVIDER": "paypal"}
    process = flashsale("serve", env=env)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip().count("\n") == 0 and "FLASHSALE_PAYMENT_PROVIDER" in err
    assert "Traceback" not in err


def test_an_unreachable_ray_cluster_stops_the_start_with_one_line(database_dsn: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    process = flashsale("serve", env={**os.environ, "FLASHSALE_DATABASE_URL": database_dsn,
                                      "RAY_ADDRESS": address})
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # still trying to reach it
            process.kill()
            process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.strip().startswith(f"flashsale: cannot reach the Ray cluster at {address}: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(("settings", "error"), [
    ({"FLASHSALE_ADMIN_EMAIL": "ops@example.com"},
     "set both FLASHSALE_ADMIN_EMAIL and FLASHSALE_ADMIN_PASSWORD, or neither"),
    ({"FLASHSALE_ADMIN_EMAIL": "ops@example.com", "FLASHSALE_ADMIN_PASSWORD": "secret"},
     "FLASHSALE_ADMIN_PASSWORD is too weak: the password must be 8 to 72 bytes long"),
    ({"FLASHSALE_ADMIN_EMAIL": "ops@example.com", "FLASHSALE_ADMIN_PASSWORD": "opspassword1"},
     "FLASHSALE_ADMIN_PASSWORD is too weak: the password needs a special character"),
    ({"FLASHSALE_JWT_SECRET": "x" * 31}, "FLASHSALE_JWT_SECRET must be at least 32 bytes long"),
    ({"FLASHSALE_SANDBOX_WEBHOOK_SECRET": "x" * 31},
     "FLASHSALE_SANDBOX_WEBHOOK_SECRET must be at least 32 bytes long"),
    ({"FLASHSALE_PAYMENT_PROVIDER": "stripe", "STRIPE_API_KEY": "sk_test_x",
      "STRIPE_WEBHOOK_SECRET": "whsec_x", "FLASHSALE_HOLD_TTL_S": "86401"},
     "FLASHSALE_HOLD_TTL_S is at most 86400 with stripe, whose checkout sessions last at most "
     "24 hours"),
    ({"FLASHSALE_TRUSTED_PROXIES": "10.0.0.1, lb.example.com"},
     "FLASHSALE_TRUSTED_PROXIES must list addresses or networks (such as 10.0.0.0/8), got "
     "'lb.example.com'"),
])
def test_admin_and_secret_settings_are_checked_before_anything_starts(
    settings: dict[str, str], error: str, tmp_path: Path,
) -> None:
    process = flashsale("serve", "--data-dir", str(tmp_path / "data"),
                        env={**os.environ, **settings})
    try:
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:  # it started serving instead: stop it cleanly
            process.terminate()
            process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.strip() == f"flashsale: {error}"
    assert out == "" and not (tmp_path / "data").exists()  # no database, no Ray


@pytest.mark.parametrize(("flag", "value", "bounds"), [
    ("--workers", "0", "1 and 64"), ("--workers", "65", "1 and 64"),
    ("--port", "0", "1 and 65535"), ("--port", "65536", "1 and 65535"),
])
def test_a_number_out_of_range_stops_the_start_with_one_line(
    flag: str, value: str, bounds: str, tmp_path: Path
) -> None:
    process = flashsale("serve", flag, value,
                        env={**os.environ, "FLASHSALE_DATA_DIR": str(tmp_path)})
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip() == f"flashsale: {flag} must be between {bounds}, got {value}"


@pytest.mark.parametrize("command", ["serve", "replay"])
def test_an_embedded_database_that_cannot_start_stops_the_start_with_one_line(
    command: str, tmp_path: Path,
) -> None:
    EmbeddedPostgres(tmp_path).start().close()
    pgdata = tmp_path / "pg"
    settings = pgdata / "postgresql.auto.conf"
    settings.write_text(settings.read_text() + "max_connections = 'lots'\n")
    env = {k: v for k, v in os.environ.items() if k != "FLASHSALE_DATABASE_URL"}
    process = flashsale(command, "--data-dir", str(tmp_path), env=env)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.strip() == (
        f"flashsale: the embedded PostgreSQL in {pgdata} did not start: FATAL: configuration "
        f'file "{settings}" contains errors (its log: {pgdata / "log"})')


def test_a_data_dir_the_embedded_database_cannot_be_created_in_stops_the_start_with_one_line(
    tmp_path: Path,
) -> None:
    pgdata = tmp_path / "pg"
    pgdata.mkdir()
    (pgdata / "notes.txt").write_text("not a database")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "FLASHSALE_DATABASE_URL"}
    for data_dir, error in [
        (tmp_path, f"the embedded PostgreSQL in {pgdata} did not start: "
                   f'initdb: error: directory "{pgdata}" exists but is not empty'),
        (not_a_dir / "data", f"cannot use the data dir {not_a_dir / 'data'}: Not a directory"),
    ]:
        process = flashsale("serve", "--data-dir", str(data_dir), env=env)
        out, err = process.communicate(timeout=60)
        assert (process.returncode, err.strip()) == (2, f"flashsale: {error}")


@pytest.mark.parametrize("command", ["serve", "replay"])
async def test_a_read_only_database_stops_the_start_with_one_line(
    command: str, database_dsn: str,
) -> None:
    await set_database_default(database_dsn, "default_transaction_read_only", "on")
    process = flashsale(command, env={**os.environ, "FLASHSALE_DATABASE_URL": database_dsn})
    out, err = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 2
    assert err.strip() == ("flashsale: cannot set up the database: cannot execute CREATE TABLE "
                           "in a read-only transaction")


@pytest.mark.parametrize("command", ["serve", "replay"])
async def test_a_database_that_cannot_hold_every_language_stops_the_start_with_one_line(
    command: str, embedded_pg: EmbeddedPostgres,
) -> None:
    """In a LATIN1 database a shopper named in Hindi would be a 500, at the first such name."""
    name = f"latin1_{command}"
    admin = await asyncpg.connect(embedded_pg.dsn())
    try:
        await admin.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' "
                            "LC_CTYPE 'C' TEMPLATE template0")
        process = flashsale(command, env={**os.environ,
                                          "FLASHSALE_DATABASE_URL": embedded_pg.dsn(name)})
        try:
            out, err = await asyncio.to_thread(process.communicate, timeout=60)
        finally:
            process.kill()  # a server that started after all
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    assert process.returncode == 2
    assert err.strip() == ("flashsale: the database's encoding is LATIN1: the engine keeps "
                           "names in every language and needs a UTF8 database")


def test_replay_of_a_data_dir_without_a_database_says_so_and_creates_none(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "typo"
    env = {k: v for k, v in os.environ.items() if k != "FLASHSALE_DATABASE_URL"}
    process = flashsale("replay", "--data-dir", str(missing), env=env)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip() == (f"flashsale: no database in {missing}: nothing to replay "
                           "(check --data-dir or FLASHSALE_DATA_DIR)")
    assert not missing.exists()


def test_replay_of_a_database_without_products_says_so(database_dsn: str) -> None:
    process = flashsale("replay", "--verify",
                        env={**os.environ, "FLASHSALE_DATABASE_URL": database_dsn})
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0  # nothing logged is nothing broken
    assert out == "" and err.strip() == "no product has events in the WAL: nothing to replay"


async def test_a_long_replay_says_how_far_it_has_got(
    products: ProductFactory, database_dsn: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    made = sorted([(await products())[0] for _ in range(2)], key=uuid.UUID)
    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.0)  # as if each product took a while
    monkeypatch.setenv("FLASHSALE_DATABASE_URL", database_dsn)
    assert await asyncio.to_thread(cli.main, ["replay", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [report["product_id"] for report in json.loads(out)] == made  # progress stays out
    assert err.splitlines() == ["replayed 1 of 2 products", "replayed 2 of 2 products"]
    assert await asyncio.to_thread(cli.main, ["replay", "--product", made[0]]) == 0
    assert capsys.readouterr().err == ""  # one product: nothing to count


async def test_replay_into_a_closed_pipe_stops_quietly(
    products: ProductFactory, database_dsn: str
) -> None:
    await products()
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `flashsale replay | head -1` once head has its line
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flashsale.cli", "replay", stdout=write_end,
            stderr=subprocess.PIPE, env={**os.environ, "FLASHSALE_DATABASE_URL": database_dsn})
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, err) == (1, b"")


def test_dev_help_into_a_closed_pipe_stops_quietly() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `python3 dev.py --help | head -3` once head has its lines
    try:
        process = subprocess.run([sys.executable, str(ROOT / "dev.py"), "--help"],
                                 stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write_end)
    assert (process.returncode, process.stderr) == (0, "")
