"""Neural spline flows: monotonic rational-quadratic splines, coupling and autoregressive.

Durkan, Bekasov, Murray & Papamakarios 2019, "Neural spline flows" (NeurIPS). Each
transformed feature passes through a monotonic rational-quadratic spline
(Gregory & Delbourgo 1982) with ``K`` bins on ``[-B, B]`` and the identity outside
(linear tails: the boundary derivatives are fixed to 1, so the map is C¹). Per
feature the conditioner emits ``3K - 1`` numbers: ``K`` widths and ``K`` heights
(softmax, floored at ``min_bin_width/height``, divided by ``sqrt(hidden)`` before the
softmax as nflows does) and ``K - 1`` interior derivatives
(``min_derivative + softplus``).

- ``"nsf"`` (sbi's ``build_nsf``): coupling layers (Dinh et al. 2017) with alternating
  even/odd masks; the transformed half is conditioned on the other half and the
  context by a residual net (nflows ``ResidualNet``: ``blocks`` pre-activation ReLU
  residual blocks with a context GLU gate); an LU-linear layer follows each coupling
  when ``D > 1``. The mask is applied by zeroing the transformed features at the
  conditioner's input, so every layer has the same parameter shapes and the stack
  scans (the price: the conditioner has ``D`` inputs and ``D (3K - 1)`` outputs, of
  which those of the untransformed half are unused). With ``D = 1`` the spline
  depends on the context only (sbi uses a small MLP ``ContextSplineMap`` there; here
  it is the same residual net fed a zero input).
- ``"nsf_ar"`` (sbi's ``build_maf_rqs``): autoregressive spline layers with a MADE
  conditioner (``tanh``) and random permutations, like MAF.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.flows.autoregressive import MADE, autoregressive_block, permutations
from sbi_engine.flows.base import Block, FlowConfig
from sbi_engine.flows.embedding import torch_dense_init
from sbi_engine.flows.linear import lu_forward, lu_init, lu_inverse

__all__ = [
    "ResidualNet",
    "build_nsf_ar_block",
    "build_nsf_block",
    "rational_quadratic_spline",
]

Array = jax.Array


def rational_quadratic_spline(
    x: Array,
    widths: Array,
    heights: Array,
    derivatives: Array,
    *,
    inverse: bool = False,
    bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Array, Array]:
    """Monotonic rational-quadratic spline on ``[-B, B]``, identity outside; one scalar.

    Args:
        x: ``()`` input (data side if ``inverse`` is False, else the output side).
        widths: ``(K,)`` unnormalised bin widths.
        heights: ``(K,)`` unnormalised bin heights.
        derivatives: ``(K - 1,)`` unnormalised interior knot derivatives.
        inverse: evaluate the inverse map.
        bound: B.

    Returns:
        ``(y (), log|dy/dx| ())`` of the map evaluated (forward or inverse).
    """
    k = widths.shape[-1]
    bound_arr = jnp.full((1,), bound, x.dtype)

    def knots(raw, floor):
        # Knot positions: -B, interior cumulative sums, +B (exact ends, no scatter).
        p = floor + (1.0 - floor * k) * jax.nn.softmax(raw)
        inner = 2.0 * bound * jnp.cumsum(p[:-1]) - bound
        cum = jnp.concatenate([-bound_arr, inner, bound_arr])
        return cum[:-1], cum[1:] - cum[:-1], cum

    x0s, ws, cw = knots(widths, min_bin_width)
    y0s, hs, ch = knots(heights, min_bin_height)
    one = jnp.ones(1, derivatives.dtype)
    d = jnp.concatenate([one, min_derivative + jax.nn.softplus(derivatives), one])

    inside = (x >= -bound) & (x <= bound)
    xc = jnp.where(inside, x, 0.0)  # a safe point outside, so no NaN gradients leak
    # The bin: count interior knots at or below xc, select its row with a one-hot
    # mask (no gather/scatter, which compile slowly on CPU; no matmul, which may run
    # in reduced precision on GPUs).
    idx = jnp.sum(xc >= (ch if inverse else cw)[1:-1])
    onehot = jnp.arange(k) == idx
    table = jnp.stack([x0s, ws, y0s, hs, d[:-1], d[1:]])
    x0, wk, y0, hk, d0, d1 = jnp.sum(jnp.where(onehot, table, 0.0), axis=1)
    s = hk / wk

    if inverse:
        dy = xc - y0
        a = dy * (d0 + d1 - 2 * s) + hk * (s - d0)
        b = hk * d0 - dy * (d0 + d1 - 2 * s)
        c = -s * dy
        disc = jnp.maximum(b * b - 4 * a * c, 0.0)
        t = jnp.clip((2 * c) / (-b - jnp.sqrt(disc)), 0.0, 1.0)
        out = x0 + t * wk
    else:
        t = (xc - x0) / wk
    tt = t * (1 - t)
    denom = s + (d0 + d1 - 2 * s) * tt
    if not inverse:
        out = y0 + hk * (s * t * t + d0 * tt) / denom
    log_deriv = (
        2 * jnp.log(s) + jnp.log(d1 * t * t + 2 * s * tt + d0 * (1 - t) ** 2) - 2 * jnp.log(denom)
    )
    if inverse:
        log_deriv = -log_deriv
    return jnp.where(inside, out, x), jnp.where(inside, log_deriv, 0.0)


def _spline_fn(config: FlowConfig, hidden: int, inverse: bool):
    """``(params (D, 3K - 1), x (D,)) -> (y (D,), logdet (D,))`` for the config's splines."""
    k = config.bins
    scale = 1.0 / np.sqrt(hidden)

    def one(p, x):
        return rational_quadratic_spline(
            x,
            p[:k] * scale,
            p[k : 2 * k] * scale,
            p[2 * k :],
            inverse=inverse,
            bound=config.tail_bound,
            min_bin_width=config.min_bin_width,
            min_bin_height=config.min_bin_height,
            min_derivative=config.min_derivative,
        )

    return jax.vmap(one)


class ResidualNet(nn.Module):
    """Conditional residual MLP (nflows ``ResidualNet``) for one example.

    ``h = Dense([x, c])``; per block ``h += GLU(Dense(relu(Dense(relu(h)))), Dense(c))``
    with the block's last layer initialised in ``U(±1e-3)``; output ``Dense(h)``.
    """

    out_features: int
    hidden: int
    blocks: int

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """Args: x: ``(I,)``; context: ``(C,)``. Returns: ``(out_features,)``."""
        small = nn.initializers.uniform(2e-3)
        h = nn.Dense(self.hidden, kernel_init=torch_dense_init)(jnp.concatenate([x, context]))
        for _ in range(self.blocks):
            t = nn.Dense(self.hidden, kernel_init=torch_dense_init)(nn.relu(h))
            t = nn.Dense(
                self.hidden,
                kernel_init=lambda *a: small(*a) - 1e-3,
                bias_init=lambda *a: small(*a) - 1e-3,
            )(nn.relu(t))
            gate = nn.Dense(self.hidden, kernel_init=torch_dense_init)(context)
            h = h + t * jax.nn.sigmoid(gate)
        return nn.Dense(self.out_features, kernel_init=torch_dense_init)(h)


def coupling_masks(features: int, transforms: int) -> np.ndarray:
    """``(L, D)`` bool: which features layer ``l`` transforms (even ones when ``l`` is even)."""
    idx = np.arange(features)
    masks = np.stack([(idx % 2) == (layer % 2) for layer in range(transforms)])
    if features == 1:
        masks[:] = True
    return masks


def build_nsf_block(
    config: FlowConfig, theta_dim: int, context_dim: int
) -> tuple[Block, dict[str, np.ndarray]]:
    """Spline coupling layer (+ LU-linear when ``D > 1``) and its stacked masks."""
    d, k3 = theta_dim, 3 * config.bins - 1
    net = ResidualNet(out_features=d * k3, hidden=config.hidden, blocks=config.blocks)
    spline = _spline_fn(config, config.hidden, inverse=False)
    spline_inv = _spline_fn(config, config.hidden, inverse=True)

    def init(key):
        params = {"conditioner": net.init(key, jnp.zeros(d), jnp.zeros(context_dim))["params"]}
        if d > 1:
            params["lu"] = lu_init(d)
        return params

    def conditioner(params, mask, y, context):
        out = net.apply({"params": params["conditioner"]}, jnp.where(mask, 0.0, y), context)
        return out.reshape(d, k3)

    def forward(params, const, y, context):
        mask = const["mask"]
        u, logdet = spline(conditioner(params, mask, y, context), y)
        u, logdet = jnp.where(mask, u, y), jnp.sum(jnp.where(mask, logdet, 0.0))
        if d > 1:
            u, ld_lu = lu_forward(params["lu"], u)
            logdet = logdet + ld_lu
        return u, logdet

    def inverse(params, const, u, context):
        mask = const["mask"]
        logdet = jnp.zeros(())
        if d > 1:
            u, logdet = lu_inverse(params["lu"], u)
        y, ld = spline_inv(conditioner(params, mask, u, context), u)
        return jnp.where(mask, y, u), logdet + jnp.sum(jnp.where(mask, ld, 0.0))

    return Block(init, forward, inverse), {"mask": coupling_masks(d, config.transforms)}


def build_nsf_ar_block(
    config: FlowConfig, theta_dim: int, context_dim: int
) -> tuple[Block, dict[str, np.ndarray]]:
    """Autoregressive spline layer (MADE conditioner + permutation) and its constants."""
    made = MADE(
        features=theta_dim,
        hidden=config.hidden,
        blocks=config.blocks,
        multiplier=3 * config.bins - 1,
        activation=nn.tanh,
    )
    return autoregressive_block(
        made,
        _spline_fn(config, config.hidden, inverse=False),
        _spline_fn(config, config.hidden, inverse=True),
        permutations(config, theta_dim),
        context_dim,
    )
