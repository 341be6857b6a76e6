"""SLCP: a simple likelihood with a complex posterior.

sbibm task ``slcp`` (Papamakarios, Sterratt & Murray 2019, "Sequential Neural
Likelihood", AISTATS; as benchmarked by Lueckmann et al. 2021, "Benchmarking
Simulation-Based Inference", AISTATS).

- Prior: ``θ ~ U(-3, 3)⁵``.
- Simulator: four i.i.d. draws ``x_j ~ N(m, S)``, ``j = 1..4``, with
  ``m = (θ₁, θ₂)``, ``s₁ = θ₃²``, ``s₂ = θ₄²``, ``ρ = tanh θ₅`` and
  ``S = [[s₁², ρ s₁ s₂], [ρ s₁ s₂, s₂²]] + 10⁻⁶ I`` (sbibm adds the jitter).

The output flattens the ``(4, 2)`` draws row-major, i.e. draw by draw:
``x = (x_{1,1}, x_{1,2}, x_{2,1}, x_{2,2}, ..., x_{4,2})`` — the order of the
stored sbibm observations. The posterior has four symmetric modes (signs of θ₃, θ₄).

Sampling uses ``x = m + (s₁ u₁, s₂ (ρ u₁ + sech(θ₅) u₂)) + 10⁻³ w`` with standard
normal ``u, w``: exactly ``N(m, S)`` (as ``ρ² + sech² θ₅ = 1``) without a Cholesky
factor that loses precision in float32 when ``|ρ| → 1``.
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

NAME = "slcp"
DIM = 5
NUM_DRAWS = 4
PRIOR_BOUND = 3.0
JITTER_VARIANCE = 1e-6

_REFERENCE = ReferenceData(NAME)
observation = _REFERENCE.observation
true_parameters = _REFERENCE.true_parameters
reference_posterior_samples = _REFERENCE.reference_posterior_samples


def simulate_one(key: jax.Array, theta: jax.Array, nu: None = None) -> jax.Array:
    """Simulate four 2-D Gaussian draws and flatten them draw by draw.

    Args:
        key: a ``jax.random`` key.
        theta: ``(5,)`` = ``(m₁, m₂, √s₁, √s₂, atanh ρ)``.
        nu: unused (the task has no nuisance parameters).

    Returns:
        ``x (8,)`` float32: ``(x_{1,1}, x_{1,2}, ..., x_{4,1}, x_{4,2})``.
    """
    theta = jnp.asarray(theta, jnp.float32)
    m = theta[:2]
    s1, s2 = theta[2] ** 2, theta[3] ** 2
    rho, sech = jnp.tanh(theta[4]), 1.0 / jnp.cosh(theta[4])
    key_u, key_w = jax.random.split(key)
    u = jax.random.normal(key_u, (NUM_DRAWS, 2), jnp.float32)
    w = jax.random.normal(key_w, (NUM_DRAWS, 2), jnp.float32)
    draws = m + jnp.stack([s1 * u[:, 0], s2 * (rho * u[:, 0] + sech * u[:, 1])], axis=-1)
    draws = draws + np.float32(np.sqrt(JITTER_VARIANCE)) * w
    return draws.reshape(2 * NUM_DRAWS)


def build() -> JaxSimulator:
    """The sbibm slcp task as a :class:`~sbi_engine.simulator.JaxSimulator` (D=5, X=8)."""
    return JaxSimulator(
        NAME,
        [Parameter(f"theta_{i + 1}", -PRIOR_BOUND, PRIOR_BOUND) for i in range(DIM)],
        [f"x_{j + 1}_{c + 1}" for j in range(NUM_DRAWS) for c in range(2)],
        simulate_one,
        prior=BoxUniform(-PRIOR_BOUND, PRIOR_BOUND, dim=DIM),
        description="sbibm slcp (Lueckmann et al. 2021; Papamakarios et al. 2019): "
                    "θ ~ U(-3,3)⁵; 4 draws of N((θ1,θ2), S) with std θ3², θ4², "
                    "correlation tanh θ5; x_j_c = coordinate c of draw j.",
    )
