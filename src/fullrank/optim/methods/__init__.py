"""Optimizers: presets of the engine (Fira, GaLore, AdaRankGrad, APOLLO, ...), FRUGAL and LDAdam built
from its units, SCALE, Flora and SGD with momentum beside it, and ``param_groups``."""
