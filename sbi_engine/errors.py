"""Exceptions raised on bad user input.

Every error the engine raises because of something a user handed it (a file, a
config key, an array of the wrong shape) is a :class:`SbiEngineError`, with a
one-line message that names the field and what was expected. The CLI prints that
line and exits non-zero; it shows a traceback only with ``--debug``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatasetError",
    "SbiEngineError",
    "ShapeError",
    "UnknownSimulatorError",
]


class SbiEngineError(Exception):
    """Base class of the errors that describe bad input, not a bug."""


class ShapeError(SbiEngineError, ValueError):
    """An array has the wrong shape, dtype or contents (NaN, outside the prior)."""


class ConfigError(SbiEngineError, ValueError):
    """A configuration value or key is invalid."""


class UnknownSimulatorError(SbiEngineError, KeyError):
    """No simulator is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetError(SbiEngineError):
    """A dataset store is missing, corrupted, or does not match the request."""
