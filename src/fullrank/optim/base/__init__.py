"""The engine's base layer: option declarations and the unit registries, norms, seeds, step counters,
the step's host reads and FSDP2's row shards with their collectives. Imports no layer above it."""
