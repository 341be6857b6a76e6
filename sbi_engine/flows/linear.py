"""Invertible linear layer with an LU parametrisation.

``W = L U`` with ``L`` unit lower-triangular and ``U`` upper-triangular with positive
diagonal ``softplus(d) + ε``; ``log|det W| = Σ log diag U`` and the inverse is two
triangular solves (Kingma & Dhariwal 2018, Glow; Durkan et al. 2019 use it between
spline coupling layers, as does sbi's ``build_nsf`` via nflows ``LULinear`` with
``identity_init=True``). Only the free entries are parameters, so every parameter
element receives a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["lu_forward", "lu_init", "lu_inverse"]

Array = jax.Array

_EPS = 1e-3
_DIAG_IDENTITY = float(np.log(np.expm1(1.0 - _EPS)))


def lu_init(features: int) -> dict[str, Array]:
    """Identity-initialised parameters for ``features = D``."""
    n_tri = features * (features - 1) // 2
    return {
        "lower": jnp.zeros(n_tri),
        "upper": jnp.zeros(n_tri),
        "diag": jnp.full(features, _DIAG_IDENTITY),
        "bias": jnp.zeros(features),
    }


def _basis(d: int, lower: bool) -> np.ndarray:
    """``(d(d-1)/2, d, d)`` one-hot matrices of the strictly lower/upper entries."""
    rows, cols = np.tril_indices(d, -1) if lower else np.triu_indices(d, 1)
    basis = np.zeros((rows.size, d, d), np.float32)
    basis[np.arange(rows.size), rows, cols] = 1.0
    return basis


def _factors(params: dict[str, Array]) -> tuple[Array, Array, Array]:
    # Assembled by contraction with constant one-hot bases rather than scatters, which
    # compile slowly on CPU; full precision because GPUs default to TF32 contractions.
    d = params["bias"].shape[0]
    hi = jax.lax.Precision.HIGHEST
    diag = jax.nn.softplus(params["diag"]) + _EPS
    lower = jnp.eye(d) + jnp.tensordot(params["lower"], _basis(d, True), 1, precision=hi)
    upper = jnp.diag(diag) + jnp.tensordot(params["upper"], _basis(d, False), 1, precision=hi)
    return lower, upper, diag


def lu_forward(params: dict[str, Array], x: Array) -> tuple[Array, Array]:
    """``x (D,) → (W x + b, log|det W|)``."""
    lower, upper, diag = _factors(params)
    # Full float32 precision (GPUs default to TF32 matmuls), to match the solves below.
    hi = jax.lax.Precision.HIGHEST
    y = jnp.matmul(lower, jnp.matmul(upper, x, precision=hi), precision=hi)
    return y + params["bias"], jnp.sum(jnp.log(diag))


def lu_inverse(params: dict[str, Array], y: Array) -> tuple[Array, Array]:
    """``y (D,) → (W⁻¹ (y - b), -log|det W|)``."""
    lower, upper, diag = _factors(params)
    z = jax.scipy.linalg.solve_triangular(lower, y - params["bias"], lower=True, unit_diagonal=True)
    x = jax.scipy.linalg.solve_triangular(upper, z, lower=False)
    return x, -jnp.sum(jnp.log(diag))
