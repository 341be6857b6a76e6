"""Gaussian Linear: inferring the mean of a 10-D Gaussian under a Gaussian prior.

sbibm task ``gaussian_linear`` (Lueckmann et al. 2021, "Benchmarking Simulation-Based
Inference", AISTATS).

- Prior: ``θ ~ N(0, 0.1 I₁₀)``.
- Simulator: ``x ~ N(θ, 0.1 I₁₀)``.

Note that 0.1 is the *variance* (sbibm builds the precision ``(0.1 I)⁻¹``, although
its argument is called ``prior_scale``), so the standard deviations are ``√0.1``.
The posterior is Gaussian (conjugate): ``Σ = (Σ_p⁻¹ + Σ_l⁻¹)⁻¹ = 0.05 I`` and
``μ = Σ Σ_l⁻¹ x_o = x_o / 2`` — see :func:`analytic_posterior`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.priors import Gaussian
from sbi_engine.simulator import JaxSimulator, Parameter
from simulators.benchmarks.reference import ReferenceData

__all__ = ["NAME", "analytic_posterior", "build", "observation",
           "reference_posterior_samples", "simulate_one", "true_parameters"]

NAME = "gaussian_linear"
DIM = 10
PRIOR_VARIANCE = 0.1
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


def analytic_posterior(x_o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact posterior ``N(μ, Σ)`` given one observation.

    ``Σ = (Σ_p⁻¹ + Σ_l⁻¹)⁻¹``, ``μ = Σ (Σ_l⁻¹ x_o + Σ_p⁻¹ μ_p)`` with ``μ_p = 0``.

    Args:
        x_o: ``(10,)`` observation.

    Returns:
        ``(mean (10,), cov (10, 10))`` float64.
    """
    x_o = np.asarray(x_o, dtype=np.float64).reshape(DIM)
    prec_prior = np.eye(DIM) / PRIOR_VARIANCE
    prec_lik = np.eye(DIM) / NOISE_VARIANCE
    cov = np.linalg.inv(prec_prior + prec_lik)
    return cov @ (prec_lik @ x_o), cov


def build() -> JaxSimulator:
    """The sbibm gaussian_linear task as a :class:`~sbi_engine.simulator.JaxSimulator`.

    ``D = X = 10``; Gaussian prior with covariance ``0.1 I``.
    """
    return JaxSimulator(
        NAME,
        [Parameter(f"theta_{i + 1}", -np.inf, np.inf) for i in range(DIM)],
        [f"x_{i + 1}" for i in range(DIM)],
        simulate_one,
        prior=Gaussian(np.zeros(DIM), PRIOR_VARIANCE),
        description="sbibm gaussian_linear (Lueckmann et al. 2021): θ ~ N(0, 0.1·I₁₀), "
                    "x ~ N(θ, 0.1·I₁₀); Gaussian posterior N(x/2, 0.05·I).",
    )
