"""Black-box simulator functions that fail in every way a real one can.

Module-level and importing only numpy, so that the worker processes that run them
(spawned, see :mod:`sbi_engine.workers`) start quickly when one has to be replaced.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np

#: what :func:`hostile_fn` does, by the range of ``theta[0]`` (the rest simulate).
RAISES, HANGS, SEGFAULTS, EXITS, WRONG_SHAPE = 0.9, 0.7, 0.5, 0.3, -0.9


def hostile_fn(theta, nu, rng):
    """x = θ + noise, except: a > 0.9 raises, 0.7 < a ≤ 0.9 hangs, 0.5 < a ≤ 0.7
    segfaults, 0.3 < a ≤ 0.5 exits its process, a < -0.9 returns the wrong shape,
    b > 0.9 returns NaN."""
    a, b = float(theta[0]), float(theta[1])
    if a > RAISES:
        raise RuntimeError("solver diverged")
    if a > HANGS:
        time.sleep(3600)
    if a > SEGFAULTS:
        ctypes.string_at(0)  # reads address 0: a real SIGSEGV
    if a > EXITS:
        os._exit(3)
    if a < WRONG_SHAPE:
        return np.zeros(3)
    x = np.asarray(theta, dtype=np.float64) + 0.1 * rng.normal(size=2)
    if b > 0.9:
        x[0] = np.nan
    return x


def hostile_batched_fn(theta, nu, rng):
    """Batched: hangs when any row has a > 0.7, else θ + noise."""
    if np.any(theta[:, 0] > HANGS):
        time.sleep(3600)
    return theta + 0.1 * rng.normal(size=theta.shape)


def expected_reason(theta_row) -> str | None:
    """The failure :func:`hostile_fn` produces for a row, as the engine reports it."""
    a, b = float(theta_row[0]), float(theta_row[1])
    if a > RAISES:
        return "RuntimeError"
    if a > HANGS:
        return "timeout"
    if a > SEGFAULTS:
        return "worker died (SIGSEGV)"
    if a > EXITS:
        return "worker died (exit code 3)"
    if a < WRONG_SHAPE:
        return "wrong shape (3,), expected (2,)"
    return "non-finite output" if b > 0.9 else None


def hang_reporting_pid(theta, nu, rng):
    """Writes its process id to ``$SBI_ENGINE_TEST_PIDFILE``, then hangs."""
    with open(os.environ["SBI_ENGINE_TEST_PIDFILE"], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(3600)
