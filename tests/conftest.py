"""Shared test settings: offline hub, GPU tests opt-in, one Ray session for the whole run."""

from __future__ import annotations

import os

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
