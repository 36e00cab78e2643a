"""The bitsandbytes "kernels" notice is dropped at its logger; its other warnings, and other loggers, still print."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import common  # noqa: F401 - installs the filter, as every process that imports common does
from common.quiet import BITSANDBYTES_CPU_LOGGER

REPO = Path(__file__).resolve().parents[2]
NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
          "`pip install kernels` and the kernels >= 0.11.1")  # fmt: skip


def test_only_the_kernels_notice_is_dropped(caplog):
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning(NOTICE, "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
        logging.getLogger("bitsandbytes.other").warning(NOTICE, "elsewhere")
    assert [r.getMessage() for r in caplog.records] == [
        "some other bitsandbytes warning",
        NOTICE % "elsewhere",
    ]


def test_importing_the_model_prints_no_kernels_notice():
    out = subprocess.run([sys.executable, "-c", "import common.naosd"], cwd=REPO, check=True, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert "gemm_4bit_forward" not in out.stderr + out.stdout
