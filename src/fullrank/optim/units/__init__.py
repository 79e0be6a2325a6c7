"""The engine's units, each declaring its options and state (``base/units.py``): inner Adam, the
projection and where P comes from, SVD backends, the rank, the refresh schedule, the moments at a
switch, moment stores, update rules, limiters, pre-projection transforms and weight writers."""
