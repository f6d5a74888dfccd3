"""The WAL service: one Ray actor per node, which writes the logs of the node's product actors.

A product actor decides; the service group-commits what it decided (`wal_link`). In one process
the two took turns at the interpreter lock; apart, `bench core`'s sale took 1.1-1.3x as many
reservations a second. One service per node, not per sale, so that a sale's memory stays one
actor process.
"""

import asyncio
import gc
import logging
import os
import stat
import tempfile
from pathlib import Path

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flashsale.actors import NAMESPACE
from flashsale.heap import keep_batch_buffers
from flashsale.persistence.wal_link import serve_product_log
from flashsale.tasks import LoopThread

log = logging.getLogger(__name__)


def socket_path() -> str:
    """A socket for this process in a directory that only this user may enter: whoever reaches
    it can write any log. Ray ends its workers with SIGKILL, so a service removes the sockets
    of those gone before it adds its own."""
    directory = Path(tempfile.gettempdir()) / f"flashsale-wal-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    found = directory.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        log.warning("%s is not a directory of this user's alone; using a new one", directory)
        directory = Path(tempfile.mkdtemp(prefix="flashsale-wal-"))
    for socket in directory.glob("*.sock"):
        if socket.stem.isdigit() and not _running(int(socket.stem)):
            socket.unlink(missing_ok=True)
    return str(directory / f"{os.getpid()}.sock")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's
    return True


class WalService:
    def __init__(self) -> None:
        self._path = socket_path()
        keep_batch_buffers()
        gc.freeze()  # what the process made to start (Ray, the modules) is never garbage
        self._io = LoopThread("wal-service")
        asyncio.run_coroutine_threadsafe(
            asyncio.start_unix_server(serve_product_log, self._path), self._io.loop).result()

    def address(self) -> str:
        """The Unix socket that product actors open their logs on."""
        return self._path

    def pid(self) -> int:
        return os.getpid()


_RemoteWalService = ray.remote(WalService)


def wal_service_here() -> ActorHandle:
    """The WAL service of the node this runs on, started on first use; Ray restarts it on a
    crash, and its product actors then open their logs again."""
    node_id = ray.get_runtime_context().get_node_id()
    return _RemoteWalService.options(  # type: ignore[return-value]
        name=f"wal-service-{node_id}",
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote()
