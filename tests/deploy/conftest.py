"""The promtool/prometheus binaries for the deploy tests (skipped with a reason when absent)."""

from __future__ import annotations

import shutil

import pytest

INSTALL_HINT = "Debian's `prometheus` package: apt-get install -y prometheus (.ci/run installs it)"


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(f"promtool is not installed ({INSTALL_HINT})")
    return path


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip(f"prometheus is not installed ({INSTALL_HINT})")
    return path
