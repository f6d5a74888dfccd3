"""The link between a product actor and the WAL service of its node, over a Unix socket.

The actor opens its product's log (the service connects to PostgreSQL and takes the product's
writer lock), then sends each append as one message and needs no answer to send the next. The
service group-commits them (`GroupCommitter`) and answers with the last sequence number each
commit holds. A failed commit, or either end going away, ends the link: the service's session
ends with it, which frees the writer lock for the actor's recovery.
"""

import asyncio
import logging
import struct
from collections import deque

import asyncpg
import msgspec

from flashsale.actors.messages import Event, OrderRecord, ProductCounts, event_encoder
from flashsale.persistence.database import log_session
from flashsale.persistence.wal import Append, GroupCommitter
from flashsale.tasks import stop_task

log = logging.getLogger(__name__)

QUEUE_DEPTH_MAX = 256  # appends waiting for their commit, per product
_LENGTH = struct.Struct(">I")
# How a link ends when its other end goes away.
_LINK_ENDED = (asyncio.IncompleteReadError, ConnectionError)

# The session holding a writer lock: PostgreSQL shows a bigint key as two 32-bit halves.
_WRITER_SESSION = """
SELECT pid, client_addr FROM pg_locks JOIN pg_stat_activity USING (pid)
WHERE locktype = 'advisory' AND granted AND objsubid = 1
  AND pg_locks.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = (($1::int8 >> 32) & 4294967295)::oid AND objid = ($1::int8 & 4294967295)::oid"""


class WalOverloaded(Exception):
    """Too many appends wait for their commit: shed load now rather than wait without bound."""


class WalBroken(Exception):
    """A commit failed or the link ended; the log accepts nothing until its owner recovers."""


class WalUnavailable(Exception):
    """The WAL service could not open the product's log (the database is down, say)."""


class OpenLog(msgspec.Struct, array_like=True):
    product_id: str
    dsn: str
    writer_lock_key: int


class Appended(msgspec.Struct, array_like=True):
    first_seq: int
    events: msgspec.Raw
    changed: list[OrderRecord]
    counts: ProductCounts
    currency: str
    snapshot: tuple[int, bytes] | None


class Committed(msgspec.Struct, array_like=True):
    """Every event up to `last_seq` is committed; or, with an error, the log failed."""

    last_seq: int
    error: str | None = None


_encoder = msgspec.msgpack.Encoder()
_open_decoder = msgspec.msgpack.Decoder(OpenLog)
_appended_decoder = msgspec.msgpack.Decoder(Appended)
_committed_decoder = msgspec.msgpack.Decoder(Committed)
_events_decoder = msgspec.msgpack.Decoder(list[Event])


def _send(writer: asyncio.StreamWriter, message: msgspec.Struct) -> None:
    if writer.is_closing():  # the other end went away, or this one is ending the link
        return
    body = _encoder.encode(message)
    writer.writelines((_LENGTH.pack(len(body)), body))


async def _receive(reader: asyncio.StreamReader) -> bytes:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return await reader.readexactly(length)


# ---- the service's end ----

async def serve_product_log(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One product's log, for as long as its actor keeps the link open."""
    conn: asyncpg.Connection | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        opened = _open_decoder.decode(await _receive(reader))
        try:
            conn = await _writer_session(opened)
        except Exception as error:  # noqa: BLE001 - the actor retries; it needs only the reason
            _send(writer, Committed(0, f"could not open the log: {error!r}"))
            return
        _send(writer, Committed(0))
        committer = GroupCommitter(conn, opened.product_id,
                                   lambda seq: _send(writer, Committed(seq)))
        receiving = asyncio.ensure_future(_receive_appends(reader, committer))
        tasks = [committer.task, receiving]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if committer.task.done():  # it ends only when a flush fails
            _send(writer, Committed(0, f"flush failed: {committer.task.exception()!r}"))
            await writer.drain()
        elif not isinstance(failure := receiving.exception(), _LINK_ENDED):
            log.error("product %s: the link to its actor failed; ending it", opened.product_id,
                      exc_info=failure)
    except _LINK_ENDED:
        pass  # the actor went away: nothing it sent since its last answer was acknowledged
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The writer lock goes with the session, which ends only after a commit in flight.
        if conn is not None:
            conn.terminate()
        writer.close()


async def _receive_appends(reader: asyncio.StreamReader, committer: GroupCommitter) -> None:
    while True:
        message = _appended_decoder.decode(await _receive(reader))
        committer.add(Append(message.first_seq, _events_decoder.decode(message.events),
                             bytes(message.events), message.changed, message.counts,
                             message.currency, message.snapshot))


async def _writer_session(opened: OpenLog) -> asyncpg.Connection:
    conn = await log_session(opened.dsn)
    try:
        await _take_writer_lock(conn, opened)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def _take_writer_lock(conn: asyncpg.Connection, opened: OpenLog) -> None:
    """Waits for an older incarnation's session to end: one writer ever appends. Its session
    outlives it where its machine died, until the server finds the client gone (see
    `configure_session`), so the wait is said, with the session to end by hand."""
    key = opened.writer_lock_key
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
        return
    holder = await conn.fetchrow(_WRITER_SESSION, key)
    if holder is not None:
        log.warning("product %s: waiting for the session of its earlier writer to end "
                    "(backend %s from %s; SELECT pg_terminate_backend(%s) ends it now)",
                    opened.product_id, holder["pid"], holder["client_addr"] or "this host",
                    holder["pid"])
    await conn.execute("SELECT pg_advisory_lock($1)", key)


# ---- the actor's end ----

class WalClient:
    """The actor's side of its product's log. `append` returns a future that resolves only
    after the COMMIT holding those events. At most `queue_depth_max` appends wait at once; after
    a failure every waiting append fails and the log refuses more, because the actor's state is
    ahead of it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 queue_depth_max: int) -> None:
        self._reader = reader
        self._writer = writer
        self._queue_depth_max = queue_depth_max
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._last: asyncio.Future[None] | None = None
        self.failure: BaseException | None = None
        self._reading = asyncio.get_running_loop().create_task(self._read_commits())

    @classmethod
    async def open(cls, path: str, opened: OpenLog,
                   queue_depth_max: int = QUEUE_DEPTH_MAX) -> "WalClient":
        """Returns once the service holds the product's writer lock: no older writer can
        commit after this, so the log may be read to recover."""
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            _send(writer, opened)
            answer = _committed_decoder.decode(await _receive(reader))
        except BaseException:
            writer.close()
            raise
        if answer.error is not None:
            writer.close()
            raise WalUnavailable(answer.error)
        return cls(reader, writer, queue_depth_max)

    def has_room(self) -> bool:
        return self.failure is None and len(self._waiting) < self._queue_depth_max

    def append(self, first_seq: int, events: list[Event], changed: list[OrderRecord],
               counts: ProductCounts, currency: str,
               snapshot: tuple[int, bytes] | None = None) -> asyncio.Future[None]:
        if self.failure is not None:
            raise WalBroken("the write-ahead log failed earlier") from self.failure
        if len(self._waiting) >= self._queue_depth_max:
            raise WalOverloaded(f"{len(self._waiting)} appends are waiting for the disk")
        _send(self._writer, Appended(first_seq, msgspec.Raw(event_encoder.encode(events)),
                                     changed, counts, currency, snapshot))
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((first_seq + len(events) - 1, durable))
        self._last = durable
        return durable

    def durable(self) -> asyncio.Future[None]:
        """Resolves once everything appended so far is committed."""
        if self._last is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._last

    async def close(self) -> None:
        """Accept no more appends and end the link; the service then ends its session."""
        self._fail(WalBroken("the write-ahead log was closed"))
        self._writer.close()
        await stop_task(self._reading)

    async def _read_commits(self) -> None:
        try:
            while True:
                committed = _committed_decoder.decode(await _receive(self._reader))
                if committed.error is not None:
                    raise WalBroken(committed.error)
                while self._waiting and self._waiting[0][0] <= committed.last_seq:
                    _, durable = self._waiting.popleft()
                    if not durable.done():  # its caller may have given up waiting
                        durable.set_result(None)
        except WalBroken as error:
            self._fail(error)
        except _LINK_ENDED:
            self._fail(WalBroken("the WAL service went away"))

    def _fail(self, error: BaseException) -> None:
        self.failure = self.failure or error
        for _, durable in self._waiting:
            if not durable.done():
                durable.set_exception(WalBroken(str(error)))
        self._waiting.clear()
