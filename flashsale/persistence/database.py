"""Where the database is: the embedded server by default, or FLASHSALE_DATABASE_URL."""

import asyncio
import logging
import socket

import asyncpg

from flashsale.config import ConfigError, Settings
from flashsale.persistence.embedded import EmbeddedPostgres, StartFailed
from flashsale.persistence.migrate import migrate

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "flashsale"
CONNECT_TIMEOUT_S = 10.0
LOG_CONNECT_TIMEOUT_S = 5.0  # a sale's recovery retries sooner

# The database cannot be reached or cannot serve this now (down, restarting, out of connections,
# a lock it would not wait for, a deadlock): the caller should retry. Other database errors are
# bugs. asyncpg raises InternalClientError on a pooled connection whose session the server ended
# while it was idle (asyncpg issue #1069).
DATABASE_DOWN = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                 asyncpg.exceptions.OperatorInterventionError,
                 asyncpg.exceptions.InsufficientResourcesError, asyncpg.InternalClientError,
                 asyncpg.exceptions.LockNotAvailableError,
                 asyncpg.exceptions.TransactionRollbackError)


class Database:
    """The engine's database: its DSN, and the embedded server when the engine runs one."""

    def __init__(self, dsn: str, embedded: EmbeddedPostgres | None = None) -> None:
        self.dsn = dsn
        self.embedded = embedded

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.close()


# A peer that vanished (its machine died, or the network between) is found out within about
# 10 s on both ends of a session, not after the system's TCP defaults: hours while the
# connection is idle, a quarter of an hour while data waits for an acknowledgement.
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3
UNACKNOWLEDGED_MAX_S = 10

# For the sessions that read or write a product's whole state: a product's writer, and replay.
# A database's default timeouts are meant for queries. They would cut short the writer's wait
# for its lock and a recovery of a large state, at every try, and fail a large commit.
NO_QUERY_TIMEOUTS = "SET statement_timeout = 0; SET lock_timeout = 0"

# How long a request waits for a lock (an operator's migration, a long report) before it is
# answered 503, where the database sets no lock_timeout of its own: as long as an actor call.
LOCK_WAIT_MAX_S = 5
# How long a pool's query may take before it fails as DATABASE_DOWN (a 503 for a request): a
# server that stops answering (a stalled disk, a frozen machine) is not waited for. asyncpg
# waits as long again for the server to take the cancel, so such a query fails within 10 s.
# The hourly sweeps, which may take longer, say how long they may take.
QUERY_WAIT_MAX_S = 5
SWEEP_WAIT_MAX_S = 600

# One statement, set where the server has the setting (idle_session_timeout came with
# PostgreSQL 14, tcp_user_timeout with 12), and where given only from the value in the third
# column: synchronous_commit only where it is off, so stronger settings stay, and lock_timeout
# only where the database sets none. The server applies the tcp_ ones to TCP sessions only.
_SESSION_SETTINGS = f"""
SELECT set_config(name, value, false)
FROM (VALUES ('synchronous_commit', 'on', 'off'),
             ('default_transaction_isolation', 'read committed', NULL),
             ('idle_session_timeout', '0', NULL),
             ('lock_timeout', '{LOCK_WAIT_MAX_S}s', '0'),
             ('tcp_keepalives_idle', '{KEEPALIVE_IDLE_S}s', NULL),
             ('tcp_keepalives_interval', '{KEEPALIVE_INTERVAL_S}s', NULL),
             ('tcp_keepalives_count', '{KEEPALIVE_PROBES}', NULL),
             ('tcp_user_timeout', '{UNACKNOWLEDGED_MAX_S}s', NULL))
     AS wanted(name, value, only_from)
WHERE name IN (SELECT name FROM pg_settings)
  AND (only_from IS NULL OR current_setting(name) = only_from)"""


async def configure_session(conn: asyncpg.Connection) -> None:
    """What the engine relies on in every session, whatever the database's defaults say.

    - The engine answers once a commit returns. On a server tuned with synchronous_commit = off
      (a common tuning) it returns before the commit is on disk, and a crash would lose what was
      acknowledged. Stronger settings (local, remote_apply, ...) are kept as they are.
    - Claims and counters (an idempotency key, a payment id, a webhook's event id, a rate limit)
      are INSERT ... ON CONFLICT statements that wait for a concurrent write of the same row and
      then see it. They need READ COMMITTED: under a default of REPEATABLE READ or SERIALIZABLE
      the second of two claims at once fails with a serialization error instead.
    - Its sessions are kept on purpose, idle or not: a sale's log session, in the WAL service,
      waits for the product's next order. A server that ends idle sessions would fail that
      order's commit.
    - A lock held long (an operator's migration, a long report) is waited for at most
      LOCK_WAIT_MAX_S, and then answered 503 (DATABASE_DOWN), not by a request that hangs.
      A product's writer waits as long as it takes (NO_QUERY_TIMEOUTS).
    - Either end finds the other gone within seconds. The server ends the session of a WAL
      service whose machine died, which holds its products' writer locks: each product's next
      actor waits for its lock before it serves. A commit whose server vanished in the middle
      of it fails, and its actor recovers, which reaches a server that took over.
    """
    await conn.execute(_SESSION_SETTINGS)
    _find_a_vanished_server(conn)


def _find_a_vanished_server(conn: asyncpg.Connection) -> None:
    """asyncpg sets no keepalive of its own; its transport's socket is the way in that its
    maintainers point to (asyncpg issue #606)."""
    sock = conn._transport.get_extra_info("socket")  # noqa: SLF001 - see above
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in [("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
                          ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                          ("TCP_KEEPCNT", KEEPALIVE_PROBES),
                          ("TCP_USER_TIMEOUT", UNACKNOWLEDGED_MAX_S * 1000)]:
        if hasattr(socket, option):  # TCP_USER_TIMEOUT is Linux's alone
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def warn_of_unsafe_settings(conn: asyncpg.Connection) -> None:
    """Server settings no session can undo, under which a crash of the database's machine may
    lose or corrupt orders the engine acknowledged: said at every start, as the engine runs on."""
    for row in await conn.fetch("""SELECT name FROM pg_settings
                                   WHERE name IN ('fsync', 'full_page_writes')
                                     AND setting = 'off'"""):
        log.warning("the database runs with %s = off: a crash of its machine may lose or "
                    "corrupt acknowledged orders", row["name"])


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to undo: the pool's users leave no session state behind (no SET, LISTEN,
    session-level advisory lock or open cursor), and asyncpg still rolls back a transaction
    left open. asyncpg's default reset is a query, a round trip on every release."""


async def create_pool(dsn: str, init_size: int, max_size: int) -> asyncpg.Pool:
    """`init_size` connections are opened at once, and later ones as they are needed. A pool
    with a floor restores it in the background and, through a database outage, logs a
    traceback at every failed try (5 in 20 s); the engine's own tasks say it once."""
    return await asyncpg.create_pool(dsn, init_size=init_size, min_size=0, max_size=max_size,
                                     timeout=CONNECT_TIMEOUT_S, command_timeout=QUERY_WAIT_MAX_S,
                                     init=configure_session, reset=_keep_session)


async def log_session(dsn: str) -> asyncpg.Connection:
    """A session that writes a product's log (in the WAL service) or reads it to recover (in the
    actor): set up as every session, with no query timeouts, as its wait for the writer lock
    and its reads of a long log are not queries to cut short."""
    conn = await asyncpg.connect(dsn, timeout=LOG_CONNECT_TIMEOUT_S)
    try:
        await configure_session(conn)
        await conn.execute(NO_QUERY_TIMEOUTS)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def connect(dsn: str) -> asyncpg.Connection:
    """Connect, turning an unreachable or misconfigured database into a one-line ConfigError."""
    try:
        return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as error:
        raise ConfigError(f"cannot reach the database: {error}") from None


async def open_database(settings: Settings) -> Database:
    """Start (or reach) the database, create the engine's database if needed, and migrate it."""
    if settings.database_url:
        database = Database(settings.database_url)
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        try:
            await asyncio.to_thread(embedded.start)
        except StartFailed as error:
            raise ConfigError(str(error)) from None
        admin = await connect(embedded.dsn())
        try:
            exists = await admin.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", EMBEDDED_DATABASE
            )
            if not exists:
                await admin.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
        finally:
            await admin.close()
        database = Database(embedded.dsn(EMBEDDED_DATABASE), embedded)
    conn = await connect(database.dsn)
    try:
        await _set_up(conn)
    except ConfigError:
        database.close()
        raise
    finally:
        await conn.close()
    return database


async def _set_up(conn: asyncpg.Connection) -> None:
    encoding = await conn.fetchval("SHOW server_encoding")
    if encoding != "UTF8":  # names in other scripts would fail to store, as 500s
        raise ConfigError(f"the database's encoding is {encoding}: the engine keeps names in "
                          "every language and needs a UTF8 database")
    try:
        await migrate(conn)
    except asyncpg.PostgresError as error:  # a read-only database, or no right to create tables
        raise ConfigError(f"cannot set up the database: {error}") from None
    await warn_of_unsafe_settings(conn)
