"""Summary features of a user's own pyloric recording (AB/PD, LP, PY voltage traces).

The features are computed with the same definitions as the simulator
(:mod:`simulators.pyloric.features`), from the whole trace with numpy. The reference
definitions depend on the sampling step ``dt``: the Savitzky–Golay window is
``int(0.5 ms / dt)`` made odd, all other thresholds are in ms (plateau sub-sampling
0.25 ms, plateau floor 2.5 ms), which at 40 kHz are exactly the reference's sample
counts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from simulators.pyloric.features import (
    feature_indices,
    features_from_trace,
)

__all__ = ["MIN_DURATION_MS", "MIN_SAMPLING_RATE_HZ", "features_from_recording",
           "load_recording"]

MIN_SAMPLING_RATE_HZ = 8000.0  # the 0.5 ms smoothing window needs ≥ 5 samples (> order 3)
MIN_DURATION_MS = 1000.0  # after the burn-in; a pyloric cycle is ~0.5–2 s, 10 s is typical


def _check_rate(sampling_rate_hz) -> float:
    try:
        rate = float(sampling_rate_hz)
    except (TypeError, ValueError):
        raise ValueError(f"sampling_rate_hz: expected a number in Hz, got "
                         f"{sampling_rate_hz!r}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"sampling_rate_hz: expected a positive number in Hz, got {rate}")
    if rate < MIN_SAMPLING_RATE_HZ:
        raise ValueError(
            f"sampling_rate_hz: {rate:g} Hz is too low; the features need at least "
            f"{MIN_SAMPLING_RATE_HZ:g} Hz (the 0.5 ms Savitzky–Golay window must span "
            f"≥ 5 samples; simulations use 40000 Hz). Is the rate in Hz (not kHz)?")
    return rate


def load_recording(source, *, layout: str = "auto") -> np.ndarray:
    """Voltage traces ``(3, N)`` [mV] (rows AB/PD, LP, PY) from a file or an array.

    Args:
        source: a path to a ``.csv``/``.txt`` file (three numeric columns, an optional
            header line; comma, semicolon, tab or whitespace separated), a ``.npy``
            file, a ``.npz`` file (array ``voltage`` or its only array), or an array of
            shape ``(N, 3)`` or ``(3, N)``.
        layout: ``"auto"``, ``"columns"`` (``(N, 3)``) or ``"rows"`` (``(3, N)``).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"recording: no such file {str(path)!r}")
        suffix = path.suffix.lower()
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "voltage" in z.files:
                    arr = z["voltage"]
                elif len(z.files) == 1:
                    arr = z[z.files[0]]
                else:
                    raise ValueError(f"recording {path.name}: expected an array named "
                                     f"'voltage' (or a single array), found {z.files}")
        elif suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".csv", ".txt", ".tsv", ".dat"):
            arr = _read_text(path)
        else:
            raise ValueError(f"recording {path.name}: expected .csv, .txt, .npy or .npz, "
                             f"got {suffix or 'no extension'!r}")
    else:
        arr = source
    try:
        arr = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("recording: expected numeric voltages") from None
    if arr.ndim != 2 or 3 not in arr.shape:
        raise ValueError(f"recording: expected three traces (AB/PD, LP, PY) as shape (N, 3) "
                         f"or (3, N), got shape {arr.shape}")
    if layout == "columns" or (layout == "auto" and arr.shape[1] == 3 and arr.shape[0] != 3):
        arr = arr.T
    elif layout not in ("auto", "rows", "columns"):
        raise ValueError(f"layout: expected 'auto', 'rows' or 'columns', got {layout!r}")
    if arr.shape[0] != 3:
        raise ValueError(f"recording: expected 3 traces, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        cell, k = np.argwhere(bad)[0]
        raise ValueError(f"recording: trace {('AB/PD', 'LP', 'PY')[cell]} sample {k} is "
                         f"{arr[cell, k]} (must be finite)")
    return arr


def _read_text(path: Path) -> np.ndarray:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    delim = next((d for d in (",", ";", "\t") if d in first), None)
    cells = first.replace(delim or " ", " ").split()
    try:
        [float(c) for c in cells]
        skip = 0
    except ValueError:
        skip = 1  # header
    try:
        return np.loadtxt(path, delimiter=delim, skiprows=skip, ndmin=2)
    except ValueError as err:
        raise ValueError(f"recording {path.name}: could not parse numeric columns: {err}"
                         ) from None


def features_from_recording(source, *, sampling_rate_hz: float, features: str = "18",
                            t_burn: float = 0.0, layout: str = "auto") -> np.ndarray:
    """Summary features ``(F,)`` (float64, NaN where undefined) of a recording.

    Args:
        source: see :func:`load_recording`.
        sampling_rate_hz: samples per second of each trace (≥ 8 kHz).
        features: "15", "18" or "full".
        t_burn: initial milliseconds to discard.
        layout: see :func:`load_recording`.
    """
    idx = feature_indices(features)
    rate = _check_rate(sampling_rate_hz)
    v = load_recording(source, layout=layout)
    dt = 1000.0 / rate
    if not t_burn >= 0:
        raise ValueError(f"t_burn: expected >= 0 ms, got {t_burn}")
    v = v[:, round(t_burn / dt):]
    duration = v.shape[1] * dt
    if duration < MIN_DURATION_MS:
        raise ValueError(
            f"recording: {duration:.1f} ms after the {t_burn:g} ms burn-in at "
            f"{rate:g} Hz ({v.shape[1]} samples) is too short; need at least "
            f"{MIN_DURATION_MS:g} ms (several pyloric cycles; simulations use 10 s)")
    return features_from_trace(v, dt)[list(idx)]

