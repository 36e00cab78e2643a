"""Shared test settings: offline hub, GPU tests opt-in, one Ray session for the whole run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups otherwise hang ~50 s with no network
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-gpu"):
        return
    skip = pytest.mark.skip(reason="GPU test: pass --run-gpu on a machine with CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_REPO_ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_torch() -> Iterator[None]:
    """Torch on one intra-op thread, like the Ray actors (Ray sets OMP_NUM_THREADS=num_cpus=1).

    The tiny model gains nothing from threads, and on the shared 2-core machine OpenMP spin-waits
    turned 0.05 s into seconds.  The thread count also changes how CPU kernels split their sums,
    which Adam magnifies for coordinates with gradients near eps: the same threads give the same
    arithmetic as the actors.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance for the whole test run (``ray.init`` costs ~7 s)."""
    import ray

    # Workers must import this repository wherever pytest was started from.
    pythonpath = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=8,  # logical slots: the end-to-end test runs 2 rollout + 2 reward + 2 learner actors
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        _node_ip_address="127.0.0.1",
    )
    try:
        yield
    finally:
        ray.shutdown()
