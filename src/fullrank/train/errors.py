"""The command line's errors (``fullrank.errors``), where ``fullrank pretrain``'s code has always imported them."""
from ..errors import ConfigError, TrainingError, first_line

__all__ = ["ConfigError", "TrainingError", "first_line"]
