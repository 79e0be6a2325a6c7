"""A run directory's outputs (``fullrank pretrain`` and ``finetune``): removed for ``--overwrite``."""
from __future__ import annotations

import shutil
from pathlib import Path


def remove_outputs(run_dir: Path, names) -> None:
    """Delete a previous run's outputs ``names`` (files or folders) from ``run_dir`` (``--overwrite``)."""
    for name in names:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
