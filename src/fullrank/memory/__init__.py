"""Memory: the traced peak of real training steps (``trace``, on fake tensors) and the optimizer
state's bytes and the paper's estimate (``estimate``, appendix A.8); see the two modules."""
from .estimate import (
    ESTIMATE_METHODS,
    GB,
    GIB,
    PAPER_CONVENTION,
    PAPER_TABLE2,
    element_counts,
    estimate,
    format_paper_comparison,
    optimizer_state_bytes,
    paper_comparison,
    projected_state_bytes,
)
from .tracer import CATEGORIES, MemoryTrace, adamw_settings, largest_batch, trace

__all__ = [
    "ESTIMATE_METHODS", "GB", "GIB", "PAPER_CONVENTION", "PAPER_TABLE2", "element_counts", "estimate",
    "format_paper_comparison", "optimizer_state_bytes", "paper_comparison", "projected_state_bytes",
    "CATEGORIES", "MemoryTrace", "adamw_settings", "largest_batch", "trace",
]
