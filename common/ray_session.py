"""Starting or joining Ray for a command line: one place for every entry point (training, pre-training)."""

from __future__ import annotations

import math
import os

_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")


def init_ray(address: str, *, local: bool, num_cpus: float) -> None:
    """Start a private single-node Ray (``local`` and no address) or join ``address`` / ``RAY_ADDRESS``.

    ``num_cpus`` is what the job's pools reserve together; a local Ray gets at
    least that many logical CPU slots (the pools share this machine's cores anyway).
    """
    import ray
    import torch

    if ray.is_initialized():
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU: gloo, no CUDA probing
    if local and not address and "RAY_ADDRESS" not in os.environ:
        # A private single-node Ray on loopback, no dashboard; workers inherit this environment.
        env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        ray.init(
            num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env_vars},
        )
    else:
        # Inside `ray job submit` (RAY_ADDRESS is set) or on a cluster node: the job's runtime_env applies.
        ray.init(address=address or "auto")
