"""Conditional masked autoregressive flow (MAF).

Papamakarios, Pavlakou & Murray 2017, "Masked autoregressive flow for density
estimation" (NeurIPS). Each layer is an affine autoregressive transform whose shift
and scale come from a conditional MADE (Germain et al. 2015), followed by a feature
permutation; in the density direction

    u_i = y_i · s_i(y_{<i}, c) + m_i(y_{<i}, c),    log|det ∂u/∂y| = Σ_i log s_i,

with ``s = softplus(a + softplus⁻¹(1 - ε)) + ε``, ``ε = 1e-3``. nflows (used by sbi)
has ``softplus(a) + ε``; the constant offset only moves where the bias starts, so a
zero pre-activation is the identity scale. The architecture is sbi 0.27's
``build_maf``: ``transforms=5`` layers of MADE with ``hidden=50`` units, ``blocks=2``
masked hidden layers, ``tanh``, random permutations.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.flows.autoregressive import MADE, autoregressive_block, permutations
from sbi_engine.flows.base import Block, FlowConfig

__all__ = ["build_maf_block"]

Array = jax.Array

_EPS = 1e-3
_SCALE_OFFSET = float(np.log(np.expm1(1.0 - _EPS)))


def _scale(raw: Array) -> Array:
    return jax.nn.softplus(raw + _SCALE_OFFSET) + _EPS


def affine_forward(params: Array, y: Array) -> tuple[Array, Array]:
    """``params (D, 2)`` = (raw scale, shift); ``y (D,)`` → ``(u (D,), log s (D,))``."""
    scale = _scale(params[:, 0])
    return y * scale + params[:, 1], jnp.log(scale)


def affine_inverse(params: Array, u: Array) -> tuple[Array, Array]:
    """Inverse of :func:`affine_forward`: ``(y (D,), -log s (D,))``."""
    scale = _scale(params[:, 0])
    return (u - params[:, 1]) / scale, -jnp.log(scale)


def build_maf_block(
    config: FlowConfig, theta_dim: int, context_dim: int
) -> tuple[Block, dict[str, np.ndarray]]:
    """MAF layer (MADE-affine + permutation) and its stacked per-layer constants."""
    made = MADE(
        features=theta_dim,
        hidden=config.hidden,
        blocks=config.blocks,
        multiplier=2,
        activation=nn.tanh,
    )
    return autoregressive_block(
        made, affine_forward, affine_inverse, permutations(config, theta_dim), context_dim
    )
