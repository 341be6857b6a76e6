"""Pyloric circuit of the crab stomatogastric ganglion (Prinz, Bucher & Marder 2004).

A JAX re-implementation of the reference simulator ``mackelab/pyloric`` (Gonçalves et
al. 2020, eLife; Deistler et al. 2022, PNAS): 31 parameters (24 membrane conductances
of AB/PD, LP, PY and 7 log synaptic conductances) → 15/18 summary features of the
simulated rhythm. See ``README.md`` in this folder for the model, the features, the
validation against the reference and the speed.

Entry points:

- :func:`build` → :class:`~sbi_engine.simulator.JaxSimulator` (registry name ``pyloric``);
- :func:`simulate_features` for batches outside the engine;
- :func:`simulate_traces` for (down-sampled) voltage traces;
- :func:`observation` — the experimental features of prep 845_082_0044;
- :func:`features_from_recording` — the same features from a user's recording.
"""

from __future__ import annotations

import json
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.simulator import JaxSimulator, Parameter
from simulators.pyloric.features import (
    FEATURE_NAMES,
    FEATURE_SETS,
    feature_indices,
    features_from_trace,
)
from simulators.pyloric.model import CELLS, CONDUCTANCES, DT, SYNAPSES, T_REF
from simulators.pyloric.recording import features_from_recording, load_recording
from simulators.pyloric.simulator import (
    check_durations,
    simulate_features,
    simulate_one,
    simulate_traces,
)

__all__ = [
    "DT",
    "FEATURE_NAMES",
    "FEATURE_SETS",
    "NAME",
    "PARAMETERS",
    "build",
    "features_from_recording",
    "features_from_trace",
    "load_recording",
    "observation",
    "simulate_features",
    "simulate_one",
    "simulate_traces",
]

NAME = "pyloric"

# Prior of Gonçalves et al. 2020 (box-uniform), in the order of the reference.
_MEMBRANE_BOUNDS = {
    "AB/PD": ((0, 500), (0, 7.5), (0, 8), (0, 60), (0, 15), (25, 150), (0, 0.02), (0, 0.01)),
    "LP": ((0, 200), (0, 2.5), (2, 12), (10, 60), (0, 10), (0, 125), (0, 0.06), (0.01, 0.04)),
    "PY": ((0, 600), (0, 12.5), (0, 4), (30, 60), (0, 5), (50, 150), (0, 0.06), (0, 0.04)),
}
_SYN_LOW = float(np.log(1e-8))
_SYN_HIGH = {"AB-LP": float(np.log(1e-2))}


def _parameters() -> tuple[Parameter, ...]:
    out = []
    for cell in CELLS:
        tag = cell.replace("/", "")
        for cond, (lo, hi) in zip(CONDUCTANCES, _MEMBRANE_BOUNDS[cell]):
            out.append(Parameter(f"{tag}_{cond}", float(lo), float(hi), unit="mS/cm^2"))
    for syn in SYNAPSES:
        out.append(Parameter(f"syn_{syn.replace('-', '_')}", _SYN_LOW,
                             _SYN_HIGH.get(syn, float(np.log(1e-3))), unit="ln(mS)"))
    return tuple(out)


PARAMETERS: tuple[Parameter, ...] = _parameters()
TEMPERATURE = Parameter("temperature", 283.0, 299.0, unit="K", nominal=T_REF)


def observation(features: str = "18") -> np.ndarray:
    """Experimental features of prep 845_082_0044 (Haddad & Marder 2018), ``(F,)`` float64.

    Available for the "15" and "18" feature sets (the recording's burst/spike counts
    were not published with it).
    """
    idx = feature_indices(features)
    data = json.loads(resources.files(__package__).joinpath(
        "data/observation_845_082_0044.json").read_text(encoding="utf-8"))
    values = np.asarray(data["values"], dtype=np.float64)
    if max(idx) >= len(values):
        raise ValueError(f"features: the observation has the '18' feature set only, "
                         f"got {features!r}")
    return values[list(idx)]


def build(noise_std: float = 0.001, *, features: str = "18", temperature_nuisance: bool = False,
          t_max: float = 11000.0, t_burn: float = 1000.0, dtype: str = "float32"
          ) -> JaxSimulator:
    """The pyloric simulator for the engine.

    Args:
        noise_std: std of the per-step Gaussian noise current (reference default 0.001;
            0 gives a deterministic simulator).
        features: "15", "18" (default; Deistler et al. 2022) or "full" (+ burst and
            spike counts per cell and the pyloric-like flag).
        temperature_nuisance: expose the temperature (283–299 K, nominal 283 K) as a
            nuisance parameter ν; Q10 factors as in the reference.
        t_max, t_burn: simulated and discarded duration [ms] (reference: 11000, 1000).
        dtype: "float32" (fast) or "float64" (needs 64-bit JAX at call time).
    """
    idx = feature_indices(features)
    if not float(noise_std) >= 0:
        raise ValueError(f"noise_std: expected >= 0, got {noise_std}")
    dt = jnp.dtype(dtype)
    if dt not in (jnp.float32, jnp.float64):
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    kwargs = {"noise_std": float(noise_std), "features": str(features), "t_max": float(t_max),
              "t_burn": float(t_burn), "dtype": dt}
    check_durations(float(t_max), float(t_burn))

    def fn(key: jax.Array, theta: jax.Array, nu: jax.Array | None = None) -> jax.Array:
        temperature = T_REF if nu is None else nu[0]
        return simulate_one(key, theta, temperature, **kwargs).astype(jnp.float32)

    return JaxSimulator(
        NAME,
        PARAMETERS,
        [FEATURE_NAMES[i] for i in idx],
        fn,
        nuisances=(TEMPERATURE,) if temperature_nuisance else (),
        version="1",
        description=(
            "Prinz et al. 2004 pyloric circuit (AB/PD, LP, PY; 31 conductances) with the "
            f"summary features of Gonçalves et al. 2020 ({len(idx)} features); "
            f"noise_std={noise_std}, dt={DT} ms, {t_max:g} ms simulated, first {t_burn:g} ms "
            "discarded."),
    )

