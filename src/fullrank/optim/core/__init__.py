"""The engine: ``SubspaceAdamW`` (the torch contract) and its one step path: a group's plan, the
finiteness check, refresh, buckets, the pure per-bucket compute and the one writer."""
