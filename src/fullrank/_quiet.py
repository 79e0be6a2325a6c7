"""Log lines of optional third-party packages that say nothing to a fullrank user, dropped at their source.

bitsandbytes (pulled in by peft, which ``transformers.Trainer`` imports, and by galore-torch) logs at
import, on CPUs with AVX512-BF16, that its optional 4-bit CPU kernel package ``kernels`` is missing.
fullrank never quantizes, so the command line drops exactly that record (a filter on the one logger
that emits it); every other bitsandbytes message still shows.
"""
from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropPrefix(logging.Filter):
    """Drops the records whose message template starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_optional_kernels() -> None:
    """Drop bitsandbytes' missing-``kernels`` warning (idempotent; call before bitsandbytes is imported)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropPrefix) and f.prefix == BNB_KERNELS_MESSAGE for f in logger.filters):
        logger.addFilter(_DropPrefix(BNB_KERNELS_MESSAGE))
