"""Stepping across processes or during backward: FSDP2's DCP checkpoint state, and the layer-wise
mode (each parameter stepped in its post-accumulate-grad hook)."""
