"""Starting or joining Ray for a command line: one place for every entry point (training, pre-training).

Which Ray a job runs on is decided by an address only, never by discovery:

- ``--address`` (or the config's ``cluster.ray_address``), else ``RAY_ADDRESS`` (what ``ray job submit``
  sets): join that cluster and say which one it is;
- neither: start a private single-node Ray on loopback, even when another Ray runs on this host.

Before any pool is created, :func:`check_resources` compares what the pools ask for with what the
cluster has and fails at once, naming the pool (``--autoscale`` lets a job wait for an autoscaler
instead).  :func:`wait_placement_group` prints progress while a reservation waits and times out clearly.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError

# What ray.get raises when the actor behind a call is gone: killed, its node lost, or stopped by Ray's
# memory monitor (OutOfMemoryError is no RayActorError).  A RayTaskError, raised by the call itself, is not.
ACTOR_LOST = (RayActorError, NodeDiedError, OutOfMemoryError)

_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")
_EPS = 1e-9  # Ray's fractional resources are exact to 1e-4; this only absorbs float sums


class ResourceError(RuntimeError):
    """The cluster cannot hold a pool's request (or did not make room for it in time)."""


@dataclass(frozen=True)
class PoolRequest:
    """What one pool asks Ray for: ``count`` actors of ``per_actor`` resources each."""

    name: str
    count: int
    per_actor: Mapping[str, float]

    @property
    def total(self) -> dict[str, float]:
        return {k: v * self.count for k, v in self.per_actor.items()}


def pool_request(
    name: str, count: int, *, num_cpus: float, num_gpus: float, resources: Mapping[str, float]
) -> PoolRequest:
    """A pool's request from its config fields (GPU left out when 0, as Ray does)."""
    per_actor = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}
    return PoolRequest(name, count, per_actor)


def validate_custom_resources(resources: Mapping[str, float]) -> None:
    """A pool config's ``resources``: custom Ray resources per actor (node types declare them)."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"resources: {name} is set by num_cpus/num_gpus, not as a custom resource")
        if not amount > 0:
            raise ValueError(f"resources: {name} must be > 0, got {amount}")


@dataclass(frozen=True)
class RaySettings:
    """How a command line reaches Ray (from :func:`add_ray_arguments`)."""

    address: str = ""  # explicit address; "" = RAY_ADDRESS or a private local Ray
    autoscale: bool = False  # let pools wait for an autoscaler instead of failing at once


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default="",
        help="join this Ray cluster (its GCS address, e.g. head:6379); default: RAY_ADDRESS, else a private "
             "local Ray (never a running one found by discovery)",
    )  # fmt: skip
    parser.add_argument(
        "--autoscale", action="store_true",
        help="do not fail when the cluster is too small now: wait for an autoscaler (each pool's start_timeout_s)",
    )  # fmt: skip


def settings_from_args(args: argparse.Namespace, config_address: str) -> RaySettings:
    return RaySettings(address=args.address or config_address, autoscale=args.autoscale)


def init_ray(settings: RaySettings, pools: Sequence[PoolRequest]) -> str:
    """Join the named cluster or start a private one, then check ``pools`` fit; returns a one-line description."""
    import ray

    if ray.is_initialized():
        raise AssertionError("init_ray is called once, by a command line, before Ray is used")
    _cpu_only_deepspeed()
    address = settings.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        # `ray job submit` sets RAY_ADDRESS; its runtime_env applies to the job's workers.
        context = ray.init(address=address)
        via = "--address / cluster.ray_address" if settings.address else "RAY_ADDRESS"
        where = f"joined Ray cluster {context.address_info.get('gcs_address', address)} ({via}: {address})"
    else:
        _start_private_ray(pools)
        where = "started a private local Ray on 127.0.0.1 (no address given: --address or RAY_ADDRESS)"
    print(f"ray: {where}; {describe_cluster(ray.cluster_resources())}", flush=True)
    check_resources(pools, ray.cluster_resources(), _node_resources(), autoscale=settings.autoscale)
    return where


def _start_private_ray(pools: Sequence[PoolRequest]) -> None:
    """A single node that plays every role: as many CPU slots and custom resources as the pools ask for."""
    import ray

    needed = _sum([p.total for p in pools])
    custom = {k: float(math.ceil(v)) for k, v in needed.items() if k not in ("CPU", "GPU")}
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    _loopback_only()
    ray.init(
        address="local",  # never attach to an instance that happens to run on this host
        num_cpus=max(os.cpu_count() or 1, math.ceil(needed.get("CPU", 0.0))),
        resources=custom or None,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env_vars},
    )


def _loopback_only() -> None:
    """Keep every port of the private Ray on 127.0.0.1 (README "Ports").

    Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` into the host's routable IP and then binds its gRPC
    servers (GCS, raylet, workers) and the autoscaler, dashboard and agent metrics endpoints on every
    interface.  Its single-host mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by
    ``ray._private.services.get_node_ip_address``) keeps the node on loopback: the variable reaches every
    Ray process started from here, the constant this process read when it imported Ray is set to match.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _cpu_only_deepspeed() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU: gloo, no CUDA probing


def check_resources(
    pools: Sequence[PoolRequest],
    cluster: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]],
    *,
    autoscale: bool = False,
) -> None:
    """Raise :class:`ResourceError` naming the first pool the cluster cannot hold.

    Each pool's actor must fit on some node, each pool's total in the cluster, and all pools together
    too (they run at the same time).  With ``autoscale`` a shortfall is printed, not raised: the
    placement-group wait then times out if no node arrives.
    """
    problems = []
    for pool in pools:
        if not any(_fits(pool.per_actor, node) for node in nodes):
            problems.append(
                f"pool '{pool.name}' asks for {_fmt(pool.per_actor)} per actor, and no node has that much "
                f"(largest node: {_fmt(_largest(nodes, pool.per_actor))})"
            )
        elif not _fits(pool.total, cluster):
            problems.append(
                f"pool '{pool.name}' asks for {pool.count} x {_fmt(pool.per_actor)} = {_fmt(pool.total)}; "
                f"the cluster has {_fmt({k: cluster.get(k, 0.0) for k in pool.total})}"
            )
    together = _sum([p.total for p in pools])
    if not problems and not _fits(together, cluster):
        names = ", ".join(p.name for p in pools)
        problems.append(
            f"pools {names} together ask for {_fmt(together)}; the cluster has "
            f"{_fmt({k: cluster.get(k, 0.0) for k in together})}"
        )
    if not problems:
        return
    message = "; ".join(problems)
    if autoscale:
        print(f"ray: not enough resources yet ({message}); waiting for the autoscaler (--autoscale)", flush=True)
        return
    raise ResourceError(f"{message} (shrink the pools, add nodes, or pass --autoscale to wait for an autoscaler)")


def wait_placement_group(pg: Any, pool: PoolRequest, timeout_s: float, *, every_s: float = 10.0) -> None:
    """Wait for a placement group, printing progress every ``every_s``; :class:`ResourceError` on timeout."""
    import ray

    start = time.monotonic()
    while True:
        waited = time.monotonic() - start
        ready, _ = ray.wait([pg.ready()], timeout=max(0.0, min(every_s, timeout_s - waited)))
        if ready:
            return
        waited = time.monotonic() - start
        free = describe_cluster(ray.available_resources(), "free")
        if waited >= timeout_s:
            raise ResourceError(
                f"pool '{pool.name}' ({pool.count} x {_fmt(pool.per_actor)}) got no resources in {timeout_s:.0f} s; "
                f"{free}"
            )
        print(
            f"ray: waiting for pool '{pool.name}' ({pool.count} x {_fmt(pool.per_actor)}): "
            f"{waited:.0f} s of {timeout_s:.0f} s; {free}",
            flush=True,
        )


def describe_cluster(resources: Mapping[str, float], what: str = "cluster has") -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return f"{what} {_fmt(shown)}"


def _node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def _fits(need: Mapping[str, float], have: Mapping[str, float]) -> bool:
    return all(have.get(k, 0.0) + _EPS >= v for k, v in need.items() if v > 0)


def _largest(nodes: Sequence[Mapping[str, float]], keys: Mapping[str, float]) -> dict[str, float]:
    """The node with the most of the first resource the request lacks (what to compare with)."""
    if not nodes:
        return {}
    scarce = next((k for k in keys if not any(_fits({k: keys[k]}, n) for n in nodes)), next(iter(keys)))
    best = max(nodes, key=lambda n: n.get(scarce, 0.0))
    return {k: best.get(k, 0.0) for k in keys}


def _sum(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _fmt(resources: Mapping[str, float]) -> str:
    inner = ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()))
    return "{" + inner + "}"
