"""Errors the CLI reports as one line (exit code 2 for bad input, 1 for a failed run) instead of a traceback."""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: a flag, a config key, a path, a model or method name, a run directory.

    The message names the parameter and the allowed values or range; ``fullrank.cli.main`` prints
    it as ``fullrank: error: <message>`` and exits with status 2.
    """


class TrainingError(RuntimeError):
    """Training could not go on (e.g. non-finite gradients); the CLI prints it and exits with 1."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line error reports."""
    lines = [s.strip() for s in str(err).strip().splitlines() if s.strip()]
    return lines[0] if lines else type(err).__name__
