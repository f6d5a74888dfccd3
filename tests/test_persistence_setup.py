"""Embedded PostgreSQL, migrations and configuration errors."""

import asyncio
import os
import subprocess
from pathlib import Path

import asyncpg
import pytest
from helpers import set_database_default

from flashsale.config import ConfigError, load_settings, stored_secret
from flashsale.persistence.database import create_pool, open_database
from flashsale.persistence.embedded import MAX_CONNECTIONS, SERVER_SETTINGS, EmbeddedPostgres
from flashsale.persistence.migrate import migrate, migration_files


async def test_migrations_apply_exactly_once(database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        assert await migrate(conn) == []  # the template already holds every migration
        versions = [row["version"] for row in await conn.fetch(
            "SELECT version FROM schema_version ORDER BY version")]
        assert versions == [version for version, _, _ in migration_files()]
        assert await conn.fetchval("SELECT to_regclass('products') IS NOT NULL")
    finally:
        await conn.close()


async def test_concurrent_migrators_apply_each_migration_once(embedded_pg: object,
                                                              database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()

    async def run_one() -> list[int]:
        c = await asyncpg.connect(database_dsn)
        try:
            return await migrate(c)
        finally:
            await c.close()

    results = await asyncio.gather(*(run_one() for _ in range(4)))
    everything = [version for version, _, _ in migration_files()]
    assert sorted(sum(results, [])) == everything
    assert results.count([]) == 3


@pytest.mark.parametrize(("database_setting", "engine_setting"),
                         [("off", "on"), ("local", "local"), ("remote_apply", "remote_apply")])
async def test_the_engines_commits_wait_for_the_disk_whatever_the_database_says(
    database_dsn: str, database_setting: str, engine_setting: str
) -> None:
    await set_database_default(database_dsn, "synchronous_commit", database_setting)
    pool = await create_pool(database_dsn, init_size=1, max_size=1)
    try:
        assert await pool.fetchval("SHOW synchronous_commit") == engine_setting
    finally:
        await pool.close()


async def test_a_database_that_may_lose_commits_in_a_crash_is_warned_of_at_every_start(
    own_database: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(env={"FLASHSALE_DATABASE_URL": own_database.dsn()})
    await open_database(settings)
    assert "a crash of its machine may lose" not in caplog.text
    conn = await asyncpg.connect(own_database.dsn())
    try:
        await conn.execute("ALTER SYSTEM SET fsync = off")
    finally:
        await conn.close()
    await asyncio.to_thread(own_database.stop)
    await asyncio.to_thread(own_database.restart)
    await open_database(load_settings(env={"FLASHSALE_DATABASE_URL": own_database.dsn()}))
    assert caplog.messages == ["the database runs with fsync = off: a crash of its machine may "
                               "lose or corrupt acknowledged orders"]


async def test_the_directories_opened_for_the_embedded_servers_user_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    server = await asyncio.to_thread(EmbeddedPostgres(closed / "data").start)
    server.close()
    opened = closed.stat().st_mode & 0o055 == 0o055
    assert opened == (os.geteuid() == 0)  # only root's server runs as a user of its own
    assert (f"made readable and searchable by all users: {closed}" in caplog.text) == opened


def test_a_lock_file_naming_another_process_is_not_taken_for_the_server(tmp_path: Path) -> None:
    """After a crash of the machine, postmaster.pid may name a pid another process holds now:
    the server starts all the same, and that process is left alone."""
    server = EmbeddedPostgres(tmp_path).start()
    lock = server.pgdata / "postmaster.pid"
    after_the_pid = lock.read_text().partition("\n")[2]
    server.close()
    other = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(f"{other.pid}\n{after_the_pid}")
        server = EmbeddedPostgres(tmp_path).start()
        try:
            assert "1 row" in server.server.psql("SELECT 1;")
        finally:
            server.close()
        assert other.poll() is None, "the process the stale lock named was signalled"
    finally:
        other.kill()
        other.wait()


async def test_embedded_database_keeps_its_data_across_restarts(tmp_path: Path) -> None:
    settings = load_settings(env={"FLASHSALE_DATA_DIR": str(tmp_path)})
    database = await open_database(settings)
    try:
        conn = await asyncpg.connect(database.dsn)
        await conn.execute(
            """INSERT INTO products VALUES (gen_random_uuid(), 'Phone', 4990000, 'INR', 10,
                   now(), now() + interval '1 hour', 1)""")
        await conn.close()
    finally:
        database.close()
    assert (tmp_path / "pg" / "PG_VERSION").exists()

    database = await open_database(settings)
    try:
        conn = await asyncpg.connect(database.dsn)
        assert await conn.fetchval("SELECT name FROM products") == "Phone"
        # One connection per live sale's actor: room for many more than PostgreSQL's 100.
        assert int(await conn.fetchval("SHOW max_connections")) == MAX_CONNECTIONS
        # New files of its log begin without 16 MB of zeros written while a commit waits.
        assert await conn.fetchval("SHOW wal_init_zero") == "off"
        assert await conn.fetchval("SELECT count(*) FROM schema_version") == len(
            migration_files())
        await conn.close()
    finally:
        database.close()


async def test_an_unreachable_database_is_one_clear_error(tmp_path: Path) -> None:
    settings = load_settings(env={"FLASHSALE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x",
                                  "FLASHSALE_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="cannot reach the database"):
        await open_database(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLASHSALE_PAYMENT_PROVIDER": "paypal"}, "must be one of sandbox, stripe, razorpay"),
        ({"FLASHSALE_PAYMENT_PROVIDER": "stripe", "STRIPE_API_KEY": "sk"}, "STRIPE_WEBHOOK_SECRET"),
        ({"FLASHSALE_PAYMENT_PROVIDER": "razorpay", "RAZORPAY_KEY_ID": "k"}, "RAZORPAY_KEY_SECRET"),
        ({"FLASHSALE_HOLD_TTL_S": "soon"}, "FLASHSALE_HOLD_TTL_S must be an integer"),
        ({"FLASHSALE_BCRYPT_ROUNDS": "2"}, "between 4 and 31"),
        ({"FLASHSALE_PUBLIC_URL": "shop.example.com"}, "must be an http:// or https:// URL"),
        ({"FLASHSALE_PUBLIC_URL": "ftp://shop.example.com"}, "must be an http:// or https://"),
        ({"FLASHSALE_DATA_DIR": "/dev/null"}, "the data dir /dev/null is not a directory"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(env: dict[str, str],
                                                           message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_a_public_url_is_the_base_of_links_without_its_trailing_slash() -> None:
    settings = load_settings(env={"FLASHSALE_PUBLIC_URL": "https://shop.example.com/sale/"})
    assert settings.base_url == "https://shop.example.com/sale"


def test_flags_override_the_environment() -> None:
    settings = load_settings(env={"FLASHSALE_DATA_DIR": "/env"}, data_dir="/flag", port=9000)
    assert settings.data_dir == Path("/flag") and settings.base_url == "http://127.0.0.1:9000"


def test_generated_secrets_are_kept_private_and_reused(tmp_path: Path) -> None:
    first = stored_secret(tmp_path, "jwt_secret")
    assert stored_secret(tmp_path, "jwt_secret") == first and len(first) >= 48
    kept = tmp_path / "secrets" / "jwt_secret"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert list(kept.parent.iterdir()) == [kept]  # no draft left behind


def test_a_stored_secret_cut_short_is_refused_with_how_to_mend_it(tmp_path: Path) -> None:
    """An empty key would fail every login (PyJWT refuses it) and let anyone sign sandbox
    webhooks (HMAC does not)."""
    cut = tmp_path / "secrets" / "sandbox_webhook_secret"
    cut.parent.mkdir()
    cut.write_text("")
    with pytest.raises(ConfigError, match="cut short when it was written.*delete it"):
        stored_secret(tmp_path, "sandbox_webhook_secret")
    cut.unlink()
    assert len(stored_secret(tmp_path, "sandbox_webhook_secret")) >= 48


async def test_a_data_dir_made_before_a_setting_takes_it_at_its_next_start(tmp_path: Path) -> None:
    server = await asyncio.to_thread(EmbeddedPostgres(tmp_path).start)
    await asyncio.to_thread(server.stop)
    server.close()
    settings = server.pgdata / "postgresql.auto.conf"
    before = [line for line in settings.read_text().splitlines(keepends=True)
              if not line.startswith("wal_init_zero")]
    settings.write_text("".join(before))

    server = await asyncio.to_thread(EmbeddedPostgres(tmp_path).start)
    try:
        conn = await asyncpg.connect(server.dsn())
        try:
            for name, value in SERVER_SETTINGS.items():
                assert await conn.fetchval(f"SHOW {name}") == value
        finally:
            await conn.close()
    finally:
        server.close()
