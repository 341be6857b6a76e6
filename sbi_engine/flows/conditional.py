"""Conditional flows ``q(θ | x)``: the built estimator the NPE trainer uses.

``build_flow(config, theta_dim=D, x_shape=X)`` returns a :class:`ConditionalFlow`
whose methods are pure functions of an explicit parameter pytree:

    params = flow.init(key)                                  # float pytree
    lp = flow.log_prob(params, theta (n, D), x (n, *X))      # (n,)
    th = flow.sample(params, key, x (*X,), n)                # (n, D)

The NPE loss (Papamakarios & Murray 2016; Greenberg et al. 2019) is
``-mean(flow.log_prob(params, θ, x))`` over simulated pairs. Many models train at once
with ``jax.vmap(flow.init)(keys)`` and a vmapped step. ``log_prob`` is the density of
θ itself: standardisation and a prior bijection are inside, with their log-dets.

The standardisation (and prior bijection) is a build-time constant of the flow, like
sbi's standardizing layers, not part of ``params``: models vmapped together share it.
``sample``'s ``n`` is a static shape (``static_argnums`` under ``jit``).

Layers are stacked by ``vmap`` over layer keys and applied with ``lax.scan``
(:mod:`sbi_engine.flows.base`), so the traced program does not grow with
``transforms``. The only loops unrolled at trace time are over the (few) conditioner
layers inside one block and the embedding network's layers.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.flows.base import FLOW_KINDS, Block, FlowConfig
from sbi_engine.flows.embedding import embedding_output_dim
from sbi_engine.flows.maf import build_maf_block
from sbi_engine.flows.spline import build_nsf_ar_block, build_nsf_block
from sbi_engine.flows.standardize import Standardization
from sbi_engine.priors import Prior
from sbi_engine.programs import RUN_ONCE, ProgramCache
from sbi_engine.store import json_sha256

__all__ = ["FLOWS", "ConditionalFlow", "build_flow", "build_flow_from_data"]

Array = jax.Array
Params = Any
BlockBuilder = Callable[[FlowConfig, int, int], tuple[Block, dict[str, np.ndarray]]]

#: Layer builders by lowercase flow kind: ``builder(config, theta_dim, context_dim)``.
FLOWS: dict[str, BlockBuilder] = {
    "maf": build_maf_block,
    "nsf": build_nsf_block,
    "nsf_ar": build_nsf_ar_block,
}
assert tuple(FLOWS) == FLOW_KINDS

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

#: The standardisation fields that compiled programs take as arguments.
STATISTICS = ("theta_mean", "theta_std", "x_mean", "x_std")

#: Compiled ``init`` programs by :meth:`ConditionalFlow.structure_key`.
_INIT_PROGRAMS = ProgramCache("flow init")


def _std_normal_logpdf(u: Array) -> Array:
    return -0.5 * jnp.sum(u * u, axis=-1) - u.shape[-1] * _HALF_LOG_2PI


@dataclasses.dataclass(frozen=True, eq=False)
class ConditionalFlow:
    """A built conditional flow; create with :func:`build_flow`. All methods are pure.

    Attributes:
        config: the hyperparameters.
        theta_dim: D.
        x_shape: shape X of one observation.
        standardization: fixed maps of θ and x (fitted on training data, or identity).
        context_dim: width of the (embedded) context the layers see.
    """

    config: FlowConfig
    theta_dim: int
    x_shape: tuple[int, ...]
    standardization: Standardization
    context_dim: int
    _block: Block = dataclasses.field(repr=False)
    _consts: Mapping[str, np.ndarray] = dataclasses.field(repr=False)
    _embedding: nn.Module | None = dataclasses.field(repr=False)

    # -- compiled-program identity -------------------------------------------------------

    def structure_key(self, *, standardization: bool = True) -> str:
        """sha256 of what this flow's traced programs depend on besides array arguments.

        Two flows with the same key trace to the same program once the standardisation
        statistics (``theta_mean``, ``theta_std``, ``x_mean``, ``x_std``) are passed as
        arguments: the config, ``theta_dim``, ``x_shape``, ``context_dim``, the shapes of
        the statistics and the prior bijection; everything else is built from these
        (as when a saved posterior is loaded). ``standardization=False`` leaves the
        standardisation out (for programs that do not use it, like :meth:`init`).
        """
        parts: list[Any] = [self.config.to_dict(), self.theta_dim, list(self.x_shape),
                            self.context_dim]
        if standardization:
            std = self.standardization
            parts.append([list(np.shape(getattr(std, f))) for f in STATISTICS])
            try:
                parts.append(None if std.prior is None else std.prior.to_dict())
            except Exception:  # noqa: BLE001 - a prior that cannot describe itself
                parts.append(f"not shared: {uuid.uuid4()}")  # gets programs of its own
        return json_sha256(parts)

    def statistics(self) -> tuple[Array, ...]:
        """The standardisation statistics as float32 arrays, in :data:`STATISTICS` order."""
        std = self.standardization
        return tuple(jnp.asarray(getattr(std, f), jnp.float32) for f in STATISTICS)

    def with_statistics(self, stats: tuple[Array, ...]) -> ConditionalFlow:
        """This flow with other standardisation statistics (traced arrays allowed).

        Programs traced through ``flow.with_statistics(stats)`` with ``stats`` as an
        argument serve every flow of the same :meth:`structure_key`.
        """
        std = dataclasses.replace(self.standardization, **dict(zip(STATISTICS, stats)))
        return dataclasses.replace(self, standardization=std)

    # -- parameters ----------------------------------------------------------------------

    def init(self, key: Array) -> Params:
        """Fresh parameters: ``{"embedding": ..., "layers": stacked over transforms}``.

        Args:
            key: PRNG key.
        """
        # One compiled program: run eagerly, the initialisers dispatch (and compile)
        # dozens of small ops one by one, which takes seconds on CPU. It runs once, so
        # XLA's backend optimisations would cost more compile time than they save.
        # Flows of one structure share the compiled program (sbi_engine.programs).
        if isinstance(key, jax.core.Tracer):  # already inside jit / vmap: trace inline
            return self._init(key)
        init = _INIT_PROGRAMS.get(self.structure_key(standardization=False),
                                  lambda: jax.jit(self._init, compiler_options=RUN_ONCE))
        return init(key)

    def _init(self, key: Array) -> Params:
        k_emb, k_layers = jax.random.split(key)
        layer_keys = jax.random.split(k_layers, self.config.transforms)
        embedding = (
            {}
            if self._embedding is None
            else self._embedding.init(k_emb, jnp.zeros(self.x_shape))["params"]
        )
        return {"embedding": embedding, "layers": jax.vmap(self._block.init)(layer_keys)}

    # -- single-example maps -------------------------------------------------------------

    def context(self, params: Params, x: Array) -> Array:
        """Standardised, embedded context of one observation ``x (*X,)``. Returns ``(C,)``."""
        x = self.standardization.x_forward(jnp.asarray(x, jnp.float32))
        if self._embedding is None:
            return jnp.ravel(x)
        return self._embedding.apply({"params": params["embedding"]}, x)

    def to_base(self, params: Params, theta: Array, x: Array) -> tuple[Array, Array]:
        """Map one θ to the base space. Density direction.

        Args:
            params: from :meth:`init`.
            theta: ``(D,)``.
            x: ``(*X,)``.

        Returns:
            ``(u (D,), log|det ∂u/∂θ| ())``.
        """
        return self._to_base(params, theta, self.context(params, x))

    def from_base(self, params: Params, u: Array, x: Array) -> tuple[Array, Array]:
        """Map one base point to θ. Sampling direction.

        Args:
            params: from :meth:`init`.
            u: ``(D,)``.
            x: ``(*X,)``.

        Returns:
            ``(θ (D,), log|det ∂θ/∂u| ())``.
        """
        return self._from_base(params, u, self.context(params, x))

    def _to_base(self, params, theta, context):
        y, logdet = self.standardization.theta_forward(theta)

        def step(carry, layer):
            y, logdet = carry
            p, const = layer
            y, ld = self._block.forward(p, const, y, context)
            return (y, logdet + ld), None

        layers = (params["layers"], self._consts)
        (u, logdet), _ = jax.lax.scan(step, (y, logdet), layers)
        return u, logdet

    def _from_base(self, params, u, context):
        def step(carry, layer):
            y, logdet = carry
            p, const = layer
            y, ld = self._block.inverse(p, const, y, context)
            return (y, logdet + ld), None

        layers = (params["layers"], self._consts)
        (w, logdet), _ = jax.lax.scan(step, (u, jnp.zeros((), u.dtype)), layers, reverse=True)
        theta, ld = self.standardization.theta_inverse(w)
        return theta, logdet + ld

    def _log_prob_one(self, params, theta, x):
        u, logdet = self.to_base(params, theta, x)
        lp = _std_normal_logpdf(u) + logdet
        return jnp.where(self.standardization.in_support(theta), lp, -jnp.inf)

    # -- batched API ---------------------------------------------------------------------

    def log_prob(self, params: Params, theta: Array, x: Array) -> Array:
        """Log density of θ given x (of θ itself, standardisation included).

        Args:
            params: from :meth:`init`.
            theta: ``(n, D)``.
            x: ``(n, *X)`` one observation per row, or ``(*X,)`` shared by all rows.

        Returns:
            ``(n,)``; ``-inf`` outside the prior's support when a prior bijection is used.
        """
        theta, x = jnp.asarray(theta, jnp.float32), jnp.asarray(x, jnp.float32)
        self._check_theta(theta, "theta")
        if x.shape == self.x_shape:
            return jax.vmap(self._log_prob_one, (None, 0, None))(params, theta, x)
        if x.shape != (theta.shape[0], *self.x_shape):
            raise ShapeError(
                f"x: expected shape ({theta.shape[0]}, {', '.join(map(str, self.x_shape))}) "
                f"or {self.x_shape}, got {x.shape}"
            )
        return jax.vmap(self._log_prob_one, (None, 0, 0))(params, theta, x)

    def sample(self, params: Params, key: Array, x: Array, n: int) -> Array:
        """Draw ``n`` samples from ``q(θ | x)`` for one observation.

        Args:
            params: from :meth:`init`.
            key: PRNG key.
            x: ``(*X,)``.
            n: number of samples (static).

        Returns:
            ``(n, D)``.
        """
        return self.sample_and_log_prob(params, key, x, n)[0]

    def sample_and_log_prob(
        self, params: Params, key: Array, x: Array, n: int
    ) -> tuple[Array, Array]:
        """Samples and their log densities in one pass: ``((n, D), (n,))``."""
        x = jnp.asarray(x, jnp.float32)
        self._check_x(x, "x")
        context = self.context(params, x)
        u = jax.random.normal(key, (n, self.theta_dim))
        theta, logdet = jax.vmap(self._from_base, (None, 0, None))(params, u, context)
        return theta, _std_normal_logpdf(u) - logdet

    def sample_batched(self, params: Params, key: Array, x: Array, n: int) -> Array:
        """``n`` samples for each of ``m`` observations ``x (m, *X)``. Returns ``(m, n, D)``."""
        x = jnp.asarray(x, jnp.float32)
        if x.shape[1:] != self.x_shape or x.ndim != len(self.x_shape) + 1:
            raise ShapeError(f"x: expected shape (m, {self.x_shape}), got {x.shape}")
        keys = jax.random.split(key, x.shape[0])
        return jax.vmap(self.sample, (None, 0, 0, None))(params, keys, x, n)

    # -- checks --------------------------------------------------------------------------

    def _check_theta(self, theta: Array, name: str) -> None:
        if theta.ndim != 2 or theta.shape[1] != self.theta_dim:
            raise ShapeError(f"{name}: expected shape (n, {self.theta_dim}), got {theta.shape}")

    def _check_x(self, x: Array, name: str) -> None:
        if x.shape != self.x_shape:
            raise ShapeError(
                f"{name}: expected one observation of shape {self.x_shape}, got {x.shape}"
            )


def _as_shape(x_shape: int | tuple[int, ...]) -> tuple[int, ...]:
    shape = (x_shape,) if isinstance(x_shape, int | np.integer) else tuple(int(s) for s in x_shape)
    if not shape or any(s < 1 for s in shape):
        raise ShapeError(f"x_shape: expected positive sizes, got {x_shape!r}")
    return shape


def build_flow(
    config: FlowConfig,
    *,
    theta_dim: int,
    x_shape: int | tuple[int, ...],
    standardization: Standardization | None = None,
) -> ConditionalFlow:
    """Build a conditional flow ``q(θ | x)``.

    Args:
        config: hyperparameters (kind looked up in :data:`FLOWS`).
        theta_dim: D >= 1.
        x_shape: shape of one observation (an int for a vector).
        standardization: fitted maps (:meth:`Standardization.fit`); identity if None.

    Returns:
        The built flow.
    """
    if not isinstance(config, FlowConfig):
        raise ConfigError(f"config: expected a FlowConfig, got {type(config).__name__}")
    if not isinstance(theta_dim, int | np.integer) or theta_dim < 1:
        raise ShapeError(f"theta_dim: expected a positive int, got {theta_dim!r}")
    theta_dim, shape = int(theta_dim), _as_shape(x_shape)
    if standardization is None:
        standardization = Standardization.identity(theta_dim, shape)
    if np.shape(standardization.theta_mean) not in ((), (theta_dim,)):
        raise ShapeError(
            f"standardization.theta_mean: shape {np.shape(standardization.theta_mean)} "
            f"does not fit theta_dim={theta_dim}"
        )
    try:
        np.broadcast_shapes(np.shape(standardization.x_mean), shape)
    except ValueError as err:
        raise ShapeError(
            f"standardization.x_mean: shape {np.shape(standardization.x_mean)} "
            f"does not fit x_shape={shape}"
        ) from err
    embedding = None if config.embedding is None else config.embedding.module(shape)
    context_dim = embedding_output_dim(config.embedding, shape)
    block, consts = FLOWS[config.kind](config, theta_dim, context_dim)
    return ConditionalFlow(
        config=config,
        theta_dim=theta_dim,
        x_shape=shape,
        standardization=standardization,
        context_dim=context_dim,
        _block=block,
        _consts={k: np.asarray(v) for k, v in consts.items()},
        _embedding=embedding,
    )


def build_flow_from_data(
    config: FlowConfig, theta: np.ndarray, x: np.ndarray, *, prior: Prior | None = None
) -> ConditionalFlow:
    """Fit the standardisation the config asks for on training pairs, then build.

    Args:
        config: hyperparameters.
        theta: ``(n, D)`` training parameters.
        x: ``(n, *X)`` training data; rows with NaN/inf are ignored by the fit.
        prior: needed for ``z_score_theta="transform_to_unconstrained"``.
    """
    std = Standardization.fit(
        theta,
        x,
        z_score_theta=config.z_score_theta,
        z_score_x=config.z_score_x,
        prior=prior if config.z_score_theta == "transform_to_unconstrained" else None,
    )
    theta = np.asarray(theta)
    return build_flow(
        config, theta_dim=theta.shape[1], x_shape=np.shape(x)[1:], standardization=std
    )
