"""Finds or creates the product actors: one named, detached Ray actor per product."""

import os

import ray
from ray.actor import ActorHandle

from flashsale.actors.product_actor import ActorConfig, ProductActor

NAMESPACE = "flashsale"
# Calls only overlap while they await a commit; decisions themselves never interleave.
MAX_CONCURRENCY = 64

_RemoteProductActor = ray.remote(ProductActor)


def fail_calls_to_dead_actors_at_once() -> None:
    """Call before ray.init in a process that calls product actors. By default Ray holds a call
    to an actor that died for up to a second, to learn why it died; a caller here answers 503
    and the client retries by idempotency key, so it wants the failure at once. (KubeRay sets
    the same for Ray Serve.) An explicit setting in the environment wins."""
    os.environ.setdefault("RAY_timeout_ms_task_wait_for_death_info", "0")


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
