"""Third-party console output that says nothing to a fullrank user, silenced by logger name and level.

bitsandbytes is imported by peft, which ``transformers.Trainer`` imports (``fullrank finetune``,
``fullrank.hf``), and by galore-torch. At import, its CPU backend tries to load an optional 4-bit
kernel from the Hub through the ``kernels`` package, and both packages log warnings about it
(offline, missing, untrusted publisher, ...). fullrank never quantizes weights, so these loggers are
raised to ERROR, when nobody has set their level: errors still show, and a level the user chose is
kept. Nothing matches message texts, so a new message of theirs is silenced too.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")


def quiet_third_party() -> None:
    """Raise the loggers of ``QUIET_LOGGERS`` to ERROR unless their level was set (idempotent)."""
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


@contextlib.contextmanager
def no_hub_progress_bars():
    """transformers' own progress bars off (``save_pretrained``'s "Writing model shards"), restored after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def no_transformers_deprecations():
    """transformers' own FutureWarnings off, within the block: peft reads its deprecated
    ``is_gradient_checkpointing`` property when it wraps a model (by category and module, no text)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
        yield
