"""Contracts of the conditional flows: the estimator config and the per-layer bijection.

A conditional flow models the density of parameters ``θ ∈ R^D`` given data ``x`` as a
change of variables: an invertible map ``f_x`` takes ``θ`` to ``u = f_x(θ)`` with a
standard-normal base density, so

    log q(θ | x) = log N(f_x(θ); 0, I) + log|det ∂f_x/∂θ|

(Rezende & Mohamed 2015; Papamakarios et al. 2021, "Normalizing flows for
probabilistic modeling and inference", JMLR 22). Neural posterior estimation trains
``q`` by maximum likelihood on simulated pairs, i.e. minimises ``-E[log q(θ | x)]``
(Papamakarios & Murray 2016; Greenberg et al. 2019).

Direction convention (the one nflows and sbi use): a layer's ``forward`` maps data to
noise (the density direction, one pass for every layer family); ``inverse`` maps noise
to data (the sampling direction, ``D`` passes for autoregressive layers).

A flow is ``transforms`` copies of one :class:`Block`, each with its own parameters.
Parameters of the copies are stacked along a leading axis by ``jax.vmap(block.init)``
and the copies are applied with ``lax.scan``, so compile time does not grow with depth
(the flowjax layout). Per-layer integer constants (permutations, coupling masks) are
stacked the same way and scanned alongside, so the parameter pytree holds only floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from sbi_engine.errors import ConfigError, check_seed
from sbi_engine.flows.embedding import CNNEmbedding, EmbeddingConfig, MLPEmbedding

__all__ = ["FLOW_KINDS", "PERMUTATIONS", "Block", "FlowConfig"]

Array = jax.Array
Params = Any

#: Flow families: masked autoregressive flow (affine), neural spline flow with
#: coupling layers (sbi's ``"nsf"``), neural spline flow with autoregressive layers
#: (sbi's ``"maf_rqs"``).
FLOW_KINDS = ("maf", "nsf", "nsf_ar")
#: Feature orders between autoregressive layers (``FlowConfig.permutation``).
PERMUTATIONS = ("random_nonidentity", "random", "reverse")

_Z_SCORE_THETA = ("independent", "structured", "transform_to_unconstrained", "none")
_Z_SCORE_X = ("independent", "structured", "none")
_NSF_INITS = ("torch_bias", "nflows", "zero_bias")


class Block(NamedTuple):
    """One flow layer, written for a single example.

    Attributes:
        init: ``init(key) -> params`` of one layer.
        forward: ``forward(params, const, y (D,), context (C,)) -> (u (D,), logdet ())``,
            data to noise; ``logdet = log|det ∂u/∂y|``.
        inverse: ``inverse(params, const, u (D,), context (C,)) -> (y (D,), logdet ())``,
            noise to data; ``logdet = log|det ∂y/∂u|``.
    """

    init: Callable[[Array], Params]
    forward: Callable[[Params, Mapping[str, Array], Array, Array], tuple[Array, Array]]
    inverse: Callable[[Params, Mapping[str, Array], Array, Array], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """Hyperparameters of a conditional flow. Defaults match sbi 0.27 ``posterior_nn``.

    The defaults are those of ``sbi.neural_nets.net_builders.flow`` (``build_maf``,
    ``build_nsf``, ``build_maf_rqs``) as called by ``posterior_nn(model=...)``.

    Attributes:
        kind: ``"maf"`` (MADE + affine, random permutations), ``"nsf"`` (rational-
            quadratic spline coupling + LU-linear layers) or ``"nsf_ar"``
            (autoregressive rational-quadratic splines, random permutations).
        hidden: hidden units of every conditioner layer (sbi ``hidden_features=50``).
        transforms: number of flow layers (sbi ``num_transforms=5``).
        blocks: hidden blocks of the conditioner: MADE feed-forward blocks for
            ``maf``/``nsf_ar``, residual blocks for ``nsf`` (sbi ``num_blocks=2``).
        bins: spline bins (sbi ``num_bins=10``).
        tail_bound: splines act on ``[-B, B]``; identity outside (sbi ``tail_bound=3``).
        min_bin_width, min_bin_height, min_derivative: spline floors (nflows 1e-3).
        permutation: feature order between autoregressive layers (``maf``, ``nsf_ar``):
            ``"random_nonidentity"`` (random, never the identity, so consecutive layers
            never share an order), ``"random"`` (identity allowed, as nflows/sbi draw)
            or ``"reverse"`` (Papamakarios et al. 2017); see
            :func:`~sbi_engine.flows.autoregressive.permutations`.
        permutation_seed: seed of the random permutations (fixed at build time, so the
            parameter pytree stays float-only).
        embedding: embedding network for ``x``; ``None`` is the identity (sbi default).
        z_score_theta: ``"independent"``, ``"structured"``, ``"none"``, or
            ``"transform_to_unconstrained"`` (the prior's bijection to ``R^D``, then an
            independent z-score of the unconstrained training ``θ``).
        z_score_x: ``"independent"``, ``"structured"`` (one mean/std for all of ``x``,
            for raw time series) or ``"none"``.
        maf_scale: the MAF layers' scale ``s(a)`` of the MADE output ``a``:
            ``"softplus"`` = ``softplus(a) + 1e-3`` (nflows, so sbi's ``build_maf``), or
            ``"unit_softplus"`` = ``softplus(a + softplus⁻¹(1 - 1e-3)) + 1e-3``, the
            identity at ``a = 0`` (the engine's MAF before this option; model files
            written then load with it).
        nsf_init: initial weights of the ``nsf`` conditioner (the residual net):
            ``"torch_bias"`` (default): torch's ``nn.Linear`` init, weights and biases
            in U(±1/sqrt(fan_in)), the first layer's fan-in counting all its inputs;
            ``"nflows"``: the same, but that fan-in counts only the untransformed
            features and the context, as nflows (so sbi's ``build_nsf``) feeds them;
            ``"zero_bias"``: biases start at zero (the earlier default; the first
            layer's fan-in counts all inputs). Held-out NLL over eight training
            seeds at 10k simulations (lower is better; sbi 0.27's NSF in brackets):
            two_moons -3.511 / -3.518 / -3.490 (-3.503), gaussian_mixture 1.227 /
            1.228 / 1.245 (1.227), slcp 4.528 / 4.598 / 4.502 (4.627, three seeds),
            for ``torch_bias`` / ``nflows`` / ``zero_bias``: biases at zero learn the
            2-D tasks more slowly (19-24 % more epochs to early stopping) and end
            worse on gaussian_mixture; nflows' fan-in costs accuracy on slcp. It only
            sets initial values: the parameter tree is the same. The sbi backend
            always starts from nflows' own initialisation.
    """

    kind: Literal["maf", "nsf", "nsf_ar"] = "maf"
    hidden: int = 50
    transforms: int = 5
    blocks: int = 2
    bins: int = 10
    tail_bound: float = 3.0
    min_bin_width: float = 1e-3
    min_bin_height: float = 1e-3
    min_derivative: float = 1e-3
    permutation: Literal["random_nonidentity", "random", "reverse"] = "random_nonidentity"
    permutation_seed: int = 0
    embedding: EmbeddingConfig | None = None
    z_score_theta: Literal["independent", "structured", "transform_to_unconstrained", "none"] = (
        "independent"
    )
    z_score_x: Literal["independent", "structured", "none"] = "independent"
    maf_scale: Literal["softplus", "unit_softplus"] = "softplus"
    nsf_init: Literal["torch_bias", "nflows", "zero_bias"] = "torch_bias"

    def __post_init__(self) -> None:
        if self.kind not in FLOW_KINDS:
            raise ConfigError(f"flow kind: got {self.kind!r}, expected one of {FLOW_KINDS}")
        for name in ("hidden", "transforms", "bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"flow {name}: expected a positive int, got {value!r}")
        if not isinstance(self.blocks, int) or isinstance(self.blocks, bool) or self.blocks < 0:
            raise ConfigError(f"flow blocks: expected an int >= 0, got {self.blocks!r}")
        check_seed("flow permutation_seed", self.permutation_seed)
        for name in ("tail_bound", "min_bin_width", "min_bin_height", "min_derivative"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ConfigError(f"flow {name}: expected a number, got {value!r}")
        if not (np.isfinite(self.tail_bound) and self.tail_bound > 0):
            raise ConfigError(f"flow tail_bound: expected > 0, got {self.tail_bound!r}")
        for name in ("min_bin_width", "min_bin_height"):
            value = getattr(self, name)
            if not (0 < value and value * self.bins < 1):
                raise ConfigError(f"flow {name}: expected 0 < {name} * bins < 1, got {value!r}")
        if not self.min_derivative > 0:
            raise ConfigError(f"flow min_derivative: expected > 0, got {self.min_derivative!r}")
        if self.permutation not in PERMUTATIONS:
            raise ConfigError(
                f"flow permutation: got {self.permutation!r}, expected one of {PERMUTATIONS}"
            )
        if self.embedding is not None and not isinstance(self.embedding, EmbeddingConfig):
            raise ConfigError(
                f"flow embedding: expected None, MLPEmbedding or CNNEmbedding, "
                f"got {self.embedding!r}"
            )
        if self.z_score_theta not in _Z_SCORE_THETA:
            raise ConfigError(
                f"flow z_score_theta: got {self.z_score_theta!r}, expected one of {_Z_SCORE_THETA}"
            )
        if self.z_score_x not in _Z_SCORE_X:
            raise ConfigError(
                f"flow z_score_x: got {self.z_score_x!r}, expected one of {_Z_SCORE_X}"
            )
        if self.maf_scale not in ("softplus", "unit_softplus"):
            raise ConfigError(f"flow maf_scale: got {self.maf_scale!r}, expected 'softplus' "
                              "or 'unit_softplus'")
        if self.nsf_init not in _NSF_INITS:
            raise ConfigError(f"flow nsf_init: got {self.nsf_init!r}, expected one of "
                              f"{_NSF_INITS}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON/TOML-serialisable dict, inverted by :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        out["embedding"] = None if self.embedding is None else self.embedding.to_dict()
        return out

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> FlowConfig:
        """Parse a dict (e.g. a TOML table); an unknown key is a :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"flow config: unknown key {unknown[0]!r}; known: {sorted(known)}")
        kwargs = dict(spec)
        emb = kwargs.get("embedding")
        if isinstance(emb, Mapping):
            kwargs["embedding"] = embedding_from_dict(emb)
        return cls(**kwargs)


def embedding_from_dict(spec: Mapping[str, Any]) -> EmbeddingConfig:
    """Parse ``{"type": "mlp" | "cnn", ...}`` into an embedding config."""
    families = {"mlp": MLPEmbedding, "cnn": CNNEmbedding}
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in families:
        raise ConfigError(f"embedding type: got {kind!r}, expected one of {sorted(families)}")
    cls = families[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"embedding ({kind}): unknown key {unknown[0]!r}; known: {sorted(known)}")
    if "channels" in spec:
        spec["channels"] = tuple(spec["channels"])
    return cls(**spec)
