"""Finds or creates the product actors: one named, detached Ray actor per product."""

import logging
import os

import ray
from ray.actor import ActorHandle

from flashsale.actors import NAMESPACE
from flashsale.actors.product_actor import ActorConfig, ProductActor

__all__ = ["NAMESPACE", "actor_name", "configure_ray", "product_actor"]
# Calls only overlap while they await a commit; decisions themselves never interleave.
MAX_CONCURRENCY = 64

_RemoteProductActor = ray.remote(ProductActor)


class _DropRayNotices(logging.Filter):
    """Ray's start-up notices that are expected here and only alarm an operator: token
    authentication on a local instance, and `serve` starting Ray off its main thread."""

    NOTICES = ("SIGTERM handler is not set", "Token authentication is enabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self.NOTICES)


def configure_ray() -> None:
    """Call before ray.init in a process that calls product actors; an explicit setting in the
    environment wins.

    - By default Ray holds a call to an actor that died for up to a second, to learn why it
      died. A caller here answers 503 and the client retries by idempotency key, so it wants the
      failure at once. (KubeRay sets the same for Ray Serve.)
    - The replies to a batch of 1,000 commands take about 125 kB. Above 100 kB Ray passes a
      return through its object store instead of in the reply, which cost the raylet about
      1 µs of CPU per command in `bench core`.
    - Ray's processes started from here inherit a fixed glibc mmap threshold. By default glibc
      raises it after freeing a large block, so later batches, replies and WAL records (100 kB
      and up) come from the heap and leave it fragmented: a product actor kept about 100 MB
      after a churn of 200,000 events, against 80 MB with the threshold fixed. The product
      actors and the WAL service raise it for their own processes, whose every batch makes
      such buffers (see `heap.keep_batch_buffers`).
    - Ray reports usage statistics to its makers by default; a server the operator runs sends
      nothing they did not ask for (RAY_USAGE_STATS_ENABLED=1 turns it back on).
    - Ray's start-up notices that are expected here are dropped (`_DropRayNotices`).
    """
    for name in ("ray._private.worker",
                 "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).addFilter(_DropRayNotices())
    os.environ.setdefault("RAY_timeout_ms_task_wait_for_death_info", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_max_direct_call_object_size", str(1 << 20))
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 << 10))


def actor_name(product_id: str) -> str:
    return f"product-{product_id}"


def product_actor(product_id: str, config: ActorConfig) -> ActorHandle:
    """The product's actor, created on first use from any process; Ray restarts it on a crash."""
    return _RemoteProductActor.options(  # type: ignore[return-value]
        name=actor_name(product_id),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=MAX_CONCURRENCY,
        num_cpus=0,
    ).remote(product_id, config)
