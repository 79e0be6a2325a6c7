"""What an optimizer really holds: the bytes of its state tensors (re-exported by ``fullrank.memory``)."""
from __future__ import annotations

import torch

from ..base.shards import local
from .plan import is_projected


def _states(optimizer) -> list[tuple[torch.Tensor, dict]]:
    """(parameter, state) pairs of an optimizer (``layerwise``'s shares its optimizer's state)."""
    return list(optimizer.state.items())


def optimizer_state_bytes(optimizer, params=None) -> int:
    """Bytes held in the optimizer's state tensors (moments, projections, limiter norms, steps),
    each storage counted once and in full (a view keeps its whole storage alive); only the state of
    ``params`` when given. Of DTensor state (torch optimizers under FSDP2): this process's shards."""
    keep = None if params is None else {id(p) for p in params}
    seen, total = set(), 0
    for param, state in _states(optimizer):
        if keep is not None and id(param) not in keep:
            continue
        for t in (local(v) for v in state.values() if isinstance(v, torch.Tensor)):
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr(), storage.nbytes())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def projected_state_bytes(optimizer) -> int:
    """``optimizer_state_bytes`` of the projected matrices alone (the groups with a ``rank``): the
    part that GaLore, Fira and the adaptive methods shrink, without the plain AdamW group's."""
    return optimizer_state_bytes(optimizer, [p for g in optimizer.param_groups if is_projected(g) for p in g["params"]])
