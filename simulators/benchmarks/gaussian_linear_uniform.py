"""Gaussian Linear Uniform: inferring the mean of a 10-D Gaussian under a box prior.

sbibm task ``gaussian_linear_uniform`` (Lueckmann et al. 2021, "Benchmarking
Simulation-Based Inference", AISTATS).

- Prior: ``θ ~ U(-1, 1)¹⁰``.
- Simulator: ``x ~ N(θ, 0.1 I₁₀)`` (0.1 is the variance).

The posterior is ``N(x_o, 0.1 I)`` truncated to the prior box.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.priors import BoxUniform
from sbi_engine.simulator import JaxSimulator, Parameter
from simulators.benchmarks.reference import ReferenceData

__all__ = ["NAME", "build", "observation", "reference_posterior_samples", "simulate_one",
           "true_parameters"]

NAME = "gaussian_linear_uniform"
DIM = 10
NOISE_VARIANCE = 0.1

_REFERENCE = ReferenceData(NAME)
observation = _REFERENCE.observation
true_parameters = _REFERENCE.true_parameters
reference_posterior_samples = _REFERENCE.reference_posterior_samples


def simulate_one(key: jax.Array, theta: jax.Array, nu: None = None) -> jax.Array:
    """Simulate one datum ``x ~ N(θ, 0.1 I)``.

    Args:
        key: a ``jax.random`` key.
        theta: ``(10,)`` mean.
        nu: unused (the task has no nuisance parameters).

    Returns:
        ``x (10,)`` float32.
    """
    theta = jnp.asarray(theta, jnp.float32)
    noise = jax.random.normal(key, (DIM,), jnp.float32)
    return theta + np.float32(np.sqrt(NOISE_VARIANCE)) * noise


def build() -> JaxSimulator:
    """The sbibm gaussian_linear_uniform task as a :class:`~sbi_engine.simulator.JaxSimulator`.

    ``D = X = 10``; prior ``U(-1, 1)¹⁰``.
    """
    return JaxSimulator(
        NAME,
        [Parameter(f"theta_{i + 1}", -1.0, 1.0) for i in range(DIM)],
        [f"x_{i + 1}" for i in range(DIM)],
        simulate_one,
        prior=BoxUniform(-1.0, 1.0, dim=DIM),
        description="sbibm gaussian_linear_uniform (Lueckmann et al. 2021): θ ~ U(-1,1)¹⁰, "
                    "x ~ N(θ, 0.1·I₁₀).",
    )
