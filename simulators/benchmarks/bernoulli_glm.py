"""Bernoulli GLM: a spiking neuron's linear filter, from sufficient statistics.

sbibm task ``bernoulli_glm`` (Lueckmann et al. 2021, "Benchmarking Simulation-Based
Inference", AISTATS; the model of Lueckmann et al. 2017, "Flexible statistical
inference for mechanistic models of neural dynamics", NeurIPS).

- Parameters ``θ = (β₀, h₁..h₉)``: an offset and a 9-tap temporal filter.
- Prior: ``θ ~ N(0, B⁻¹)`` with precision ``B = diag(0.5, FᵀF)``, where
  ``F = D² + diag(√(i/9))``, ``i = 0..8``, and ``D = I - (sub-diagonal ones)`` is
  the 9x9 first-difference matrix (``D²`` penalises second differences, i.e. rough
  filters). The offset has variance 2 and is independent of the filter.
- Simulator: with the fixed ``100 x 10`` design matrix ``X`` (a column of ones, then
  a white-noise stimulus ``I ~ N(0, 1)`` delayed by ``0..8`` steps),
  ``y_t ~ Bernoulli(σ(X_t θ))`` for ``t = 1..100`` and
  ``x = Xᵀ y = (number of spikes, spike-triggered sums at lags 0..8)``: the
  sufficient statistics of the GLM (sbibm computes the same numbers with a padded
  ``conv1d`` of ``y`` with ``I``).

The design matrix is sbibm's ``design_matrix.pt`` (stimulus seed 42), shipped in
``data/bernoulli_glm.json``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.priors import Gaussian
from sbi_engine.simulator import JaxSimulator, Parameter
from simulators.benchmarks.reference import ReferenceData, load_task_json

__all__ = ["NAME", "build", "design_matrix", "observation", "prior_precision",
           "reference_posterior_samples", "simulate_one", "true_parameters"]

NAME = "bernoulli_glm"
DIM = 10
NUM_BINS = 100

_REFERENCE = ReferenceData(NAME)
observation = _REFERENCE.observation
true_parameters = _REFERENCE.true_parameters
reference_posterior_samples = _REFERENCE.reference_posterior_samples


@functools.lru_cache(maxsize=1)
def _design_matrix() -> np.ndarray:
    matrix = np.asarray(load_task_json(NAME)["design_matrix"], dtype=np.float32)
    if matrix.shape != (NUM_BINS, DIM):
        raise ValueError(f"bernoulli_glm design matrix: expected ({NUM_BINS}, {DIM}), "
                         f"got {matrix.shape}")
    matrix.setflags(write=False)
    return matrix


def design_matrix() -> np.ndarray:
    """The fixed GLM design matrix ``X``. Returns ``(100, 10)`` float32 (a copy)."""
    return _design_matrix().copy()


def prior_precision() -> np.ndarray:
    """The prior precision ``B = diag(0.5, FᵀF)``. Returns ``(10, 10)`` float64."""
    m = DIM - 1
    diff = np.eye(m) - np.eye(m, k=-1)
    f = diff @ diff + np.diag(np.sqrt(np.arange(m) / m))
    precision = np.zeros((DIM, DIM))
    precision[0, 0] = 0.5
    precision[1:, 1:] = f.T @ f
    return precision


def _prior_covariance() -> np.ndarray:
    cov = np.linalg.inv(prior_precision())
    return 0.5 * (cov + cov.T)


def simulate_one(key: jax.Array, theta: jax.Array, nu: None = None) -> jax.Array:
    """Simulate a 100-bin Bernoulli spike train and reduce it to ``Xᵀ y``.

    Args:
        key: a ``jax.random`` key.
        theta: ``(10,)`` = offset and 9 filter taps.
        nu: unused (the task has no nuisance parameters).

    Returns:
        ``x (10,)`` float32: spike count, then the 9 spike-triggered stimulus sums.
    """
    theta = jnp.asarray(theta, jnp.float32)
    matrix = jnp.asarray(_design_matrix())
    rate = jax.nn.sigmoid(matrix @ theta)
    spikes = jax.random.bernoulli(key, rate).astype(jnp.float32)
    return matrix.T @ spikes


def build() -> JaxSimulator:
    """The sbibm bernoulli_glm task as a :class:`~sbi_engine.simulator.JaxSimulator`.

    ``D = X = 10``; Gaussian prior with covariance ``B⁻¹``.
    """
    return JaxSimulator(
        NAME,
        [Parameter(f"theta_{i + 1}", -np.inf, np.inf) for i in range(DIM)],
        [f"x_{i + 1}" for i in range(DIM)],
        simulate_one,
        prior=Gaussian(np.zeros(DIM), _prior_covariance()),
        description="sbibm bernoulli_glm (Lueckmann et al. 2021): GLM with offset + 9-tap "
                    "filter, smoothness prior N(0, B⁻¹); 100 Bernoulli bins reduced to the "
                    "sufficient statistics Xᵀy (spike count, 9 spike-triggered sums).",
    )
