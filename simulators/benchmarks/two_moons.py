"""Two Moons: a bimodal, crescent-shaped posterior in 2-D.

sbibm task ``two_moons`` (Greenberg, Nonnenmacher & Macke 2019, "Automatic Posterior
Transformation for Likelihood-Free Inference", ICML; as benchmarked by Lueckmann et al.
2021, "Benchmarking Simulation-Based Inference", AISTATS).

- Prior: ``θ ~ U(-1, 1)²``.
- Simulator: ``a ~ U(-π/2, π/2)``, ``r ~ N(0.1, 0.01²)``,
  ``p = (r cos a + 0.25, r sin a)`` and
  ``x = p + (-|θ₁ + θ₂| / √2, (-θ₁ + θ₂) / √2)``.

``x`` at fixed ``θ`` lies on a thin half-ring of radius 0.1; the absolute value makes
the posterior two crescents, mirror images under ``θ ↦ (-θ₂, -θ₁)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sbi_engine.priors import BoxUniform
from sbi_engine.simulator import JaxSimulator, Parameter
from simulators.benchmarks.reference import ReferenceData

__all__ = ["NAME", "build", "observation", "reference_posterior_samples", "simulate_one",
           "true_parameters"]

NAME = "two_moons"
_A_LOW, _A_HIGH = -math.pi / 2.0, math.pi / 2.0
_R_LOC, _R_SCALE = 0.1, 0.01
_BASE_OFFSET = 0.25

_REFERENCE = ReferenceData(NAME)
observation = _REFERENCE.observation
true_parameters = _REFERENCE.true_parameters
reference_posterior_samples = _REFERENCE.reference_posterior_samples


def simulate_one(key: jax.Array, theta: jax.Array, nu: None = None) -> jax.Array:
    """Simulate one two-moons datum.

    Args:
        key: a ``jax.random`` key.
        theta: ``(2,)`` parameters.
        nu: unused (the task has no nuisance parameters).

    Returns:
        ``x (2,)`` float32.
    """
    theta = jnp.asarray(theta, jnp.float32)
    key_a, key_r = jax.random.split(key)
    a = jax.random.uniform(key_a, (), jnp.float32, _A_LOW, _A_HIGH)
    r = _R_LOC + _R_SCALE * jax.random.normal(key_r, (), jnp.float32)
    p = jnp.stack([r * jnp.cos(a) + _BASE_OFFSET, r * jnp.sin(a)])
    shift = jnp.stack([-jnp.abs(theta[0] + theta[1]), theta[1] - theta[0]]) / math.sqrt(2.0)
    return (p + shift).astype(jnp.float32)


def build() -> JaxSimulator:
    """The sbibm two_moons task as a :class:`~sbi_engine.simulator.JaxSimulator` (D=2, X=2)."""
    prior = BoxUniform(-1.0, 1.0, dim=2)
    return JaxSimulator(
        NAME,
        [Parameter(f"theta_{i + 1}", -1.0, 1.0) for i in range(2)],
        [f"x_{i + 1}" for i in range(2)],
        simulate_one,
        prior=prior,
        description="sbibm two_moons (Lueckmann et al. 2021): θ ~ U(-1,1)², x on a noisy "
                    "half-ring of radius 0.1 shifted by (-|θ1+θ2|/√2, (θ2-θ1)/√2); "
                    "bimodal crescent posterior.",
    )
