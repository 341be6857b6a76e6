"""A seconds-long experiment type, ``toy_fit``, for tests of sweeps (registered on import).

Per seed: draw ``num`` points ``y = slope · x + 0.1 ε`` with ``jax.random`` and fit the
slope by least squares; metrics: the fitted slope and its absolute error.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np

from sbi_engine.experiment import ExperimentType, Stage, register_experiment_type, write_metrics


@dataclasses.dataclass(frozen=True)
class FitSection:
    slope: float = 1.0
    num: int = 200


def _fit(ctx, *, seed: int) -> dict:
    sec = ctx.config.section("fit")
    key = jax.random.PRNGKey(seed)
    x = np.asarray(jax.random.normal(key, (sec.num,)))
    y = sec.slope * x + 0.1 * np.asarray(jax.random.normal(jax.random.fold_in(key, 1),
                                                          (sec.num,)))
    slope = float(x @ y / (x @ x))
    return {"metrics": {"slope": slope, "slope_error": abs(slope - sec.slope)},
            "pid": os.getpid()}


def _report(ctx) -> dict:
    per_seed = {s: ctx.results[f"fit/seed{s}"]["metrics"] for s in ctx.config.seeds}
    write_metrics(ctx, per_seed, primary="slope_error", headline=["slope_error", "slope"])
    return {"figures": []}


def _stages(config) -> list[Stage]:
    return [*(Stage(f"fit/seed{s}", functools.partial(_fit, seed=s)) for s in config.seeds),
            Stage("report", _report)]


register_experiment_type(ExperimentType(
    name="toy_fit", sections={"fit": FitSection}, required=("fit",), stages=_stages,
    description="least-squares slope fit (tests)"), overwrite=True)
