import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The modules that start processes or train, longest first (their time in the suite, 2026-12-07). README's
# test command hands each module whole to the next free worker (--dist loadfile --no-loadscope-reorder),
# in this order: the long ones start first and the short ones fill the end, so neither worker finishes
# long before the other. The other modules follow in their usual order.
LONGEST_FIRST = ("test_memory_nproc", "test_fsdp", "test_train_fsdp", "test_train_usability", "test_train_methods",
                 "test_memory_trace", "test_quality_profile", "test_titan", "test_torch_conformance",
                 "test_fsdp_layerwise", "test_cli", "test_finetune_train", "test_capturable", "test_train_ddp",
                 "test_train_resume")


def pytest_collection_modifyitems(config, items):
    position = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: position.get(item.path.stem, len(position)))
