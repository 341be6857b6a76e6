"""MADE conditioners and the generic autoregressive layer.

MADE (Germain et al. 2015, "MADE: Masked autoencoder for distribution estimation")
masks a feed-forward network so output ``i`` depends only on inputs ``< i``; with a
context ``c`` added to the first hidden layer it parametrises a conditional
autoregressive transform ``u_i = τ(y_i; h_i(y_{<i}, c))`` whose Jacobian is
triangular (Papamakarios et al. 2017, "Masked autoregressive flow for density
estimation"; Kingma et al. 2016 for the inverse direction).

The architecture follows nflows' ``MADE`` as sbi builds it for ``maf``/``maf_rqs``:
sequential (non-random) degrees, a masked input layer plus ``act(Linear(c))``,
``blocks`` masked feed-forward hidden layers, a masked output layer with
``multiplier`` outputs per feature, ``tanh`` activations, weights and biases initialised
as torch's ``nn.Linear`` (U(±1/sqrt(fan_in))). One deliberate difference:
hidden degrees run over ``0 .. D-1`` (nflows: ``1 .. D-1``), so degree-0 units see
only the context and the first feature's transform depends on ``x`` (in nflows it is
a context-free bias in every layer). With ``D = 1`` every input weight would be
masked, so the input layer is dropped (nflows keeps an all-zero masked layer).

Each layer is ``y → τ(y; MADE(y, c)) → permutation``. The density direction is one
MADE pass; the sampling direction inverts feature by feature in ``D`` passes
(``lax.fori_loop``).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.flows.base import Block, FlowConfig
from sbi_engine.flows.embedding import torch_bias_init, torch_dense_init

__all__ = ["MADE", "autoregressive_block", "made_masks", "permutations"]

Array = jax.Array
#: ``elementwise(params (D, M), y (D,)) -> (u (D,), logdet (D,))`` and its inverse.
Elementwise = Callable[[Array, Array], tuple[Array, Array]]


def made_masks(features: int, hidden: int, blocks: int, multiplier: int) -> list[np.ndarray]:
    """Masks of the MADE layers: input, ``blocks`` hidden, output (sequential degrees).

    Returns:
        ``[m_in (D, H), m_hid (H, H) * blocks, m_out (H, D * multiplier)]`` float32,
        kernel layout ``(in, out)``; output column ``i * multiplier + j`` belongs to
        feature ``i``.
    """
    in_deg = np.arange(1, features + 1)
    hid_deg = np.arange(hidden) % features  # degrees 0 .. D-1; degree 0 sees only c
    m_in = (hid_deg[None, :] >= in_deg[:, None]).astype(np.float32)
    m_hid = (hid_deg[None, :] >= hid_deg[:, None]).astype(np.float32)
    out_deg = np.repeat(in_deg, multiplier)
    m_out = (out_deg[None, :] > hid_deg[:, None]).astype(np.float32)
    return [m_in] + [m_hid] * blocks + [m_out]


class MaskedDense(nn.Module):
    """Dense layer with a fixed binary mask on the kernel ``(in, out)``."""

    mask: np.ndarray

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", torch_dense_init, self.mask.shape)
        bias = self.param("bias", torch_bias_init(self.mask.shape[0]), self.mask.shape[1:])
        return x @ (kernel * jnp.asarray(self.mask)) + bias


class MADE(nn.Module):
    """Conditional MADE for one example (nflows ``MADE``, ``use_residual_blocks=False``).

    Attributes:
        features: D.
        hidden: hidden width H.
        blocks: masked hidden layers after the input layer.
        multiplier: outputs per feature M.
        activation: nonlinearity (sbi uses ``tanh`` for MAF).
    """

    features: int
    hidden: int
    blocks: int
    multiplier: int
    activation: Callable[[Array], Array] = nn.tanh

    @nn.compact
    def __call__(self, y: Array, context: Array) -> Array:
        """Args: y: ``(D,)``; context: ``(C,)``. Returns: ``(D, M)`` autoregressive params."""
        masks = made_masks(self.features, self.hidden, self.blocks, self.multiplier)
        h = self.activation(nn.Dense(self.hidden, kernel_init=torch_dense_init,
                                     bias_init=torch_bias_init(context.shape[-1]))(context))
        if self.features > 1:
            h = h + MaskedDense(masks[0])(y)
        h = self.activation(h)
        for mask in masks[1:-1]:
            h = self.activation(MaskedDense(mask)(h))
        return MaskedDense(masks[-1])(h).reshape(self.features, self.multiplier)


def permutations(config: FlowConfig, features: int) -> np.ndarray:
    """Feature permutations after each autoregressive layer, ``(transforms, D)`` int32.

    - ``"random_nonidentity"`` (default): draws from
      ``numpy.random.default_rng(config.permutation_seed)`` and redraws a permutation
      equal to the identity (``D > 1``), which would give the next layer the same
      autoregressive order as this one. With ``D = 2`` this is the reversal; with
      ``D >= 3`` it differs from ``"random"`` only where that draws the identity.
    - ``"random"``: the same draws, identity included (nflows' ``RandomPermutation``,
      as sbi uses it; how model files written before ``"random_nonidentity"`` existed
      were built, so they load unchanged).
    - ``"reverse"``: reverses the order (Papamakarios et al. 2017).

    Why it matters: with ``D = 2`` and ``permutation_seed = 0``, ``"random"`` draws
    identity, identity, identity, swap, swap, so four of five MAF layers share one
    order; on two_moons at 10k simulations that MAF's held-out NLL is -3.03 against
    -3.33 with alternating orders, and its C2ST on observations 1-3 0.636 against 0.567.
    """
    if config.permutation == "reverse":
        perm = np.arange(features)[::-1]
        return np.tile(perm, (config.transforms, 1)).astype(np.int32)
    rng = np.random.default_rng(config.permutation_seed)
    identity = np.arange(features)
    perms = []
    for _ in range(config.transforms):
        perm = rng.permutation(features)
        while (config.permutation == "random_nonidentity" and features > 1
               and np.array_equal(perm, identity)):
            perm = rng.permutation(features)
        perms.append(perm)
    return np.stack(perms).astype(np.int32)


def autoregressive_block(
    made: MADE,
    elementwise: Elementwise,
    elementwise_inverse: Elementwise,
    perms: np.ndarray,
    context_dim: int,
) -> tuple[Block, dict[str, np.ndarray]]:
    """Layer ``y → τ(y; MADE(y, c))[perm]`` and its stacked per-layer constants.

    Args:
        made: the conditioner.
        elementwise: data-to-noise transform ``(params (D, M), y (D,)) -> (u, logdet (D,))``.
        elementwise_inverse: its inverse, ``(params, u) -> (y, logdet (D,))``.
        perms: ``(L, D)`` permutations applied after each layer.
        context_dim: C.

    Returns:
        The block and ``{"perm": (L, D), "inv_perm": (L, D)}``.
    """
    d = made.features

    def init(key):
        return made.init(key, jnp.zeros(d), jnp.zeros(context_dim))["params"]

    def forward(params, const, y, context):
        u, logdet = elementwise(made.apply({"params": params}, y, context), y)
        return u[const["perm"]], jnp.sum(logdet)

    def inverse(params, const, u, context):
        u = u[const["inv_perm"]]

        def step(_, y):
            return elementwise_inverse(made.apply({"params": params}, y, context), u)[0]

        y = jax.lax.fori_loop(0, d - 1, step, jnp.zeros_like(u))
        y, logdet = elementwise_inverse(made.apply({"params": params}, y, context), u)
        return y, jnp.sum(logdet)

    consts = {"perm": perms, "inv_perm": np.argsort(perms, axis=1).astype(np.int32)}
    return Block(init, forward, inverse), consts
