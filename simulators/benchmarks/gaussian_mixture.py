"""Gaussian Mixture: a broad and a narrow Gaussian sharing one mean.

sbibm task ``gaussian_mixture`` (Lueckmann et al. 2021, "Benchmarking Simulation-Based
Inference", AISTATS; a classic of the ABC literature, e.g. Sisson, Fan & Tanaka 2007,
"Sequential Monte Carlo without likelihoods", PNAS).

- Prior: ``θ ~ U(-10, 10)²``.
- Simulator: ``x ~ 0.5 N(θ, I₂) + 0.5 N(θ, 0.01 I₂)`` — one component is drawn per
  datum (shared by both coordinates); the standard deviations are 1 and 0.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sbi_engine.priors import BoxUniform
from sbi_engine.simulator import JaxSimulator, Parameter
from simulators.benchmarks.reference import ReferenceData

__all__ = ["NAME", "build", "observation", "reference_posterior_samples", "simulate_one",
           "true_parameters"]

NAME = "gaussian_mixture"
DIM = 2
PRIOR_BOUND = 10.0
MIXTURE_SCALES = (1.0, 0.1)  # standard deviations of the two components
MIXTURE_WEIGHT = 0.5  # probability of the first (broad) component

_REFERENCE = ReferenceData(NAME)
observation = _REFERENCE.observation
true_parameters = _REFERENCE.true_parameters
reference_posterior_samples = _REFERENCE.reference_posterior_samples


def simulate_one(key: jax.Array, theta: jax.Array, nu: None = None) -> jax.Array:
    """Simulate one datum from the two-component mixture centred at ``θ``.

    Args:
        key: a ``jax.random`` key.
        theta: ``(2,)`` common mean.
        nu: unused (the task has no nuisance parameters).

    Returns:
        ``x (2,)`` float32.
    """
    theta = jnp.asarray(theta, jnp.float32)
    key_c, key_n = jax.random.split(key)
    broad = jax.random.bernoulli(key_c, MIXTURE_WEIGHT)
    scale = jnp.where(broad, jnp.float32(MIXTURE_SCALES[0]), jnp.float32(MIXTURE_SCALES[1]))
    return theta + scale * jax.random.normal(key_n, (DIM,), jnp.float32)


def build() -> JaxSimulator:
    """The sbibm gaussian_mixture task as a :class:`~sbi_engine.simulator.JaxSimulator`.

    ``D = X = 2``; prior ``U(-10, 10)²``.
    """
    return JaxSimulator(
        NAME,
        [Parameter(f"theta_{i + 1}", -PRIOR_BOUND, PRIOR_BOUND) for i in range(DIM)],
        [f"x_{i + 1}" for i in range(DIM)],
        simulate_one,
        prior=BoxUniform(-PRIOR_BOUND, PRIOR_BOUND, dim=DIM),
        description="sbibm gaussian_mixture (Lueckmann et al. 2021): θ ~ U(-10,10)², "
                    "x ~ ½N(θ, I) + ½N(θ, 0.01·I).",
    )
