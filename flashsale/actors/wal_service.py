"""The WAL service: one Ray actor per node, which writes the logs of the node's product actors.

A product actor decides; the service group-commits what it decided (`wal_link`). In one process
the two took turns at the interpreter lock; apart, `bench core`'s sale took 1.1-1.3x as many
reservations a second. One service per node, not per sale, so that a sale's memory stays one
actor process.
"""

import asyncio
import gc
import os
import tempfile

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flashsale.actors import NAMESPACE
from flashsale.heap import keep_batch_buffers
from flashsale.persistence.wal_link import serve_product_log
from flashsale.tasks import LoopThread


class WalService:
    def __init__(self) -> None:
        # A directory only this user may enter: whoever reaches the socket can write any log.
        self._path = os.path.join(tempfile.mkdtemp(prefix="flashsale-wal-"), "wal.sock")
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
