"""Exceptions raised on bad user input.

Every error the engine raises because of something a user handed it (a file, a
config key, an array of the wrong shape) is a :class:`SbiEngineError`, with a
one-line message that names the field and what was expected. The CLI prints that
line and exits non-zero; it shows a traceback only with ``--debug``.
"""

from __future__ import annotations

__all__ = [
    "SEED_LIMIT",
    "ConfigError",
    "DatasetError",
    "SbiEngineError",
    "ShapeError",
    "UnknownSimulatorError",
    "check_seed",
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


#: Seeds are integers below this: a JAX key holds 32 bits, so seed 2**32 would repeat 0.
SEED_LIMIT = 2**32


def check_seed(field: str, value: object) -> int:
    """``value`` as an ``int`` seed in ``0..2**32-1``.

    Raises:
        ConfigError: naming ``field``, for anything else (bools, floats, out of range).
    """
    import numbers

    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
            or not 0 <= value < SEED_LIMIT):
        raise ConfigError(f"{field}: expected an integer in 0..2**32-1, got {value!r}")
    return int(value)
