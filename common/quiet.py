"""Silence one third-party notice a user cannot act on, at its source, and nothing else.

bitsandbytes (imported by diffusers and peft) logs, on CPUs with AVX512-BF16, "Failed to load CPU
gemm_4bit_forward from kernels-community ..." when the optional ``kernels`` package is missing.  This
project never runs 4-bit layers, so every process printed a warning about a kernel it never uses.
The filter sits on that one logger and drops that one message; its other warnings still print.
"""

from __future__ import annotations

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOTICE)


def silence_bitsandbytes_kernels_notice() -> None:
    """Install the filter (idempotent); must run before bitsandbytes is imported, as its logger is shared."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelsNotice) for f in logger.filters):
        logger.addFilter(_DropKernelsNotice())
