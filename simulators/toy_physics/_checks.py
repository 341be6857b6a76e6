"""Validation of the toys' constructor options (expected yields)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from sbi_engine.errors import ConfigError


def expected_yield(name: str, value: Any, *, zero: bool = False) -> float:
    """``value`` as a float if it is a finite number > 0 (``>= 0`` with ``zero``).

    Raises:
        ConfigError: naming ``name``, otherwise.
    """
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{name}: expected a finite number {'>=' if zero else '>'} 0, "
                          f"got {value!r}")
    return float(value)
