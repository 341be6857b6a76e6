"""Classifiers for signal/background events, their losses, and pure, vmappable trainers.

A classifier is a flax MLP ``f_φ(x) → logit`` with a fixed input standardisation; the
*nuisance-parameterised* variant takes ``(x, ν)`` as input (Baldi, Cranmer, Faucett,
Sadowski & Whiteson 2016, arXiv:1601.07913), and is trained on events whose ``ν`` is
drawn per event (backgrounds get random ``ν`` too). Losses, each written for one
minibatch (weights ``w`` are expected event counts, see :mod:`sbi_engine.events`):

- ``"bce"`` — weighted binary cross-entropy
  ``L = Σ_i w̃_i ℓ(f(x_i), y_i) / Σ_i w̃_i`` with ``w̃`` the yields rescaled so each
  class carries half the weight (``balance=True``, the default) or the yields
  themselves. With ν drawn from its prior per event (:func:`augmented_data`) this is
  *nuisance-augmented* training (train on the ν-marginal mixture).
- ``"asimov"`` — the Asimov-significance loss with background uncertainty (Elwood &
  Krücker 2018, arXiv:1806.00322): ``L = −Z_A(s, b, σ_b)``, with
  ``s = Σ_{y=1} w_i σ(f(x_i))``, ``b = Σ_{y=0} w_i σ(f(x_i))`` (the minibatch weights
  scaled to the full dataset's yields), ``σ_b = sigma_b · b`` and Cowan's ``Z_A``
  (:func:`~sbi_engine.significance.asimov_z_sigma_b`); ``b`` is floored at
  ``min_background`` expected events, so a minibatch that selects no background
  cannot send ``Z_A`` (and the gradient) to infinity.
- ``"inferno"`` — INFERNO's inference-aware loss (de Castro & Dorigo 2019,
  arXiv:1806.04743). The network outputs ``bins`` logits; a softmax with temperature
  ``T`` gives a soft histogram whose expected counts are
  ``n_j(θ) = Σ_p μ^{[p signal]} Y_p(ν) · mean_i softmax_j(f(x_{p,i}(ν))/T)`` with
  events simulated *inside* the loss at fixed keys (the generator's sampling is
  reparameterised, so ``x`` is differentiable in ``ν``). With ``θ = (μ, ν_free)``,
  the Fisher information is the Hessian at ``θ₀`` of the Poisson NLL of the Asimov
  counts ``n(θ₀)``, ``I = ∇²_θ Σ_j [n_j(θ) − n_j(θ₀) ln n_j(θ)]``, which at the Asimov
  point is exactly ``I = Jᵀ diag(1/n) J`` with ``J = ∂n/∂θ`` (``jax.jacfwd``: one
  forward pass per parameter instead of a Hessian; same value and, since the Asimov
  counts follow the network, the same gradient as the authors' un-stopped Hessian),
  plus ``1/σ_k²`` for each constrained nuisance (benchmarks B3/B4). The loss is
  ``(I⁻¹)_μμ``, the expected variance of the signal strength; ``σ_s = S·√(I⁻¹)_μμ``
  with ``S`` the nominal signal yield is the paper's "expected uncertainty on s".
  The INFERNO benchmarks B0–B4 are ``free_nuisances``/``constrain`` settings. A
  trained summary is evaluated as the paper does, on *hard* (argmax) bins:
  :func:`binned_fisher` builds the templates at the nominal ``ν`` and at ``ν ± h``
  (the same events, transformed) and takes the Poisson Fisher information of central
  differences (``experiments/bench_inferno.py`` reproduces the paper's table).
- ``"pivot"`` — adversarial training to a pivot (Louppe, Kagan & Cranmer 2017,
  arXiv:1611.01046): a mixture-density adversary ``r_ψ(ν | f(x))`` predicts the
  nuisances from the classifier output. The classifier minimises
  ``L_f − λ L_r`` (``L_f`` the BCE, ``L_r`` the adversary's NLL), the adversary
  minimises ``L_r``; updates alternate (``adv_steps`` adversary updates per
  classifier update), and for the first ``pretrain_steps`` the classifier uses ``λ = 0``.

Training is pure and compiled once: :func:`make_trainer` returns ``init(key, data,
hyper) -> state`` and ``step(state, batch) -> (state, metrics)``; a whole run is one
``lax.scan`` over steps inside one ``jax.jit``. :func:`train_many` trains ``M``
models (settings × seeds: one key each, datasets stacked ``(M, N, F)`` or shared,
numeric hyperparameters :data:`HYPER` per model) under ``jax.vmap`` in the same single
compiled loop; :func:`train_one` trains one.

Files: :func:`save_classifier` writes a directory with ``classifier.json`` (format,
version, structure, config, metadata, checksum) and ``weights.npz`` (plain float
arrays), atomically; :func:`load_classifier` never unpickles and refuses another format
version, a truncated or corrupted weights file, or arrays that do not match the
structure with a :class:`ClassifierFileError` that says which.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sbi_engine.errors import ConfigError, SbiEngineError, ShapeError
from sbi_engine.events import EventData, EventGenerator, _counts, make_dataset
from sbi_engine.programs import register_clear
from sbi_engine.significance import asimov_z_sigma_b
from sbi_engine.store import atomic_write_dir, jsonable

__all__ = [
    "FORMAT_VERSION",
    "HYPER",
    "LOSSES",
    "Batch",
    "ClassifierConfig",
    "ClassifierFileError",
    "ClassifierParams",
    "SavedClassifier",
    "TrainData",
    "TrainResult",
    "TrainState",
    "Trainer",
    "asimov_loss",
    "augmented_data",
    "bce_loss",
    "binned_fisher",
    "inferno_fisher",
    "load_classifier",
    "make_trainer",
    "mdn_nll",
    "predict",
    "predict_many",
    "roc_auc",
    "save_classifier",
    "select",
    "soft_summary",
    "train_data",
    "train_many",
    "train_one",
]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu, "tanh": jnp.tanh, "elu": nn.elu, "silu": nn.silu, "gelu": nn.gelu,
}
_ADV_ON = ("all", "signal", "background")
#: Numeric options that may differ between the models of one :func:`train_many` call.
HYPER = ("learning_rate", "sigma_b", "temperature", "adv_lambda")
_HYPER_ZERO = ("sigma_b", "adv_lambda")  # may be 0 (the others must be > 0)


# ------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any, *, zero: bool = False) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < (0 if zero else 1):
        what = "a non-negative int" if zero else "a positive int"
        raise ConfigError(f"classifier {name}: expected {what}, got {value!r}")


def _positive_float(name: str, value: Any, *, zero: bool = False) -> None:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        what = "a finite float >= 0" if zero else "a finite float > 0"
        raise ConfigError(f"classifier {name}: expected {what}, got {value!r}")


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    try:
        out = tuple(value)
    except TypeError:
        raise ConfigError(f"classifier {name}: expected a sequence of positive ints, "
                          f"got {value!r}") from None
    for v in out:
        _positive_int(name, v)
    return tuple(int(v) for v in out)


def _check_hyper(hyper: Mapping[str, Any] | None) -> None:
    """Overrides of :data:`HYPER`: known names, and values (scalars or ``(M,)``) that the
    :class:`ClassifierConfig` field accepts; traced values (inside ``jit``) are skipped."""
    unknown = sorted(set(hyper or {}) - set(HYPER))
    if unknown:
        raise ConfigError(f"hyper: unknown key {unknown[0]!r}; allowed: {list(HYPER)}")
    for name, value in (hyper or {}).items():
        if isinstance(value, jax.core.Tracer):
            continue
        try:
            values = np.asarray(value, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ConfigError(f"classifier hyper[{name!r}]: expected a number or an array "
                              f"of numbers, got {value!r}") from None
        for v in values:
            _positive_float(f"hyper[{name!r}]", float(v), zero=name in _HYPER_ZERO)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Classifier and training configuration (frozen, validated; hashable).

    Attributes:
        hidden: hidden-layer widths of the classifier MLP.
        activation: ``"relu" | "tanh" | "elu" | "silu" | "gelu"``.
        learning_rate: Adam step size of the classifier.
        steps: optimiser steps of a training run.
        batch_size: events per minibatch (drawn with replacement).
        clip_norm: clip classifier gradients to this global norm (``None``: off).
        loss: a key of :data:`LOSSES`.
        parameterised: feed ``ν`` as extra input (Baldi et al. 2016).
        balance: BCE with class-balanced weights (else the yields as weights).
        sigma_b: ``"asimov"``: relative background uncertainty, ``σ_b = sigma_b · b``.
        min_background: ``"asimov"``: floor on the soft-selected background (expected
            events, ``> 0``), so ``Z_A`` stays finite when a minibatch selects none.
        bins: ``"inferno"``: number of softmax bins (network outputs).
        temperature: ``"inferno"``: softmax temperature.
        free_nuisances: ``"inferno"``: nuisances profiled besides ``μ`` (B1: ``("r",)``).
        constrain: ``"inferno"``: add the generator's Gaussian constraints ``1/σ²``.
        inferno_events: ``"inferno"``: events per process simulated per step.
        adv_lambda: ``"pivot"``: λ, weight of the adversary's loss.
        adv_hidden: ``"pivot"``: hidden widths of the adversary.
        adv_components: ``"pivot"``: Gaussian components of the mixture density.
        adv_learning_rate: ``"pivot"``: Adam step size of the adversary.
        adv_steps: ``"pivot"``: adversary updates per classifier update.
        adv_on: ``"pivot"``: events the adversary sees: ``"all" | "signal" | "background"``.
        pretrain_steps: ``"pivot"``: first steps with ``λ = 0``.
    """

    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    learning_rate: float = 1e-3
    steps: int = 1000
    batch_size: int = 256
    clip_norm: float | None = None
    loss: str = "bce"
    parameterised: bool = False
    balance: bool = True
    sigma_b: float = 0.0
    min_background: float = 1.0
    bins: int = 10
    temperature: float = 0.1
    free_nuisances: tuple[str, ...] = ()
    constrain: bool = False
    inferno_events: int = 500
    adv_lambda: float = 1.0
    adv_hidden: tuple[int, ...] = (32, 32)
    adv_components: int = 5
    adv_learning_rate: float = 1e-3
    adv_steps: int = 5
    adv_on: str = "all"
    pretrain_steps: int = 0

    def __post_init__(self):
        object.__setattr__(self, "hidden", _int_tuple("hidden", self.hidden))
        object.__setattr__(self, "adv_hidden", _int_tuple("adv_hidden", self.adv_hidden))
        if isinstance(self.free_nuisances, str) or not isinstance(
                self.free_nuisances, Iterable) or not all(
                isinstance(n, str) for n in tuple(self.free_nuisances)):
            raise ConfigError(f"classifier free_nuisances: expected a sequence of nuisance "
                              f"names, got {self.free_nuisances!r}")
        object.__setattr__(self, "free_nuisances", tuple(self.free_nuisances))
        if not isinstance(self.activation, str) or self.activation not in _ACTIVATIONS:
            raise ConfigError(f"classifier activation: expected one of {sorted(_ACTIVATIONS)}, "
                              f"got {self.activation!r}")
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise ConfigError(f"classifier loss: expected one of {sorted(LOSSES)}, "
                              f"got {self.loss!r}")
        if not isinstance(self.adv_on, str) or self.adv_on not in _ADV_ON:
            raise ConfigError(f"classifier adv_on: expected one of {list(_ADV_ON)}, "
                              f"got {self.adv_on!r}")
        for name in ("steps", "batch_size", "inferno_events", "adv_components", "adv_steps"):
            _positive_int(name, getattr(self, name))
        _positive_int("pretrain_steps", self.pretrain_steps, zero=True)
        if not (isinstance(self.bins, int) and not isinstance(self.bins, bool)
                and self.bins >= 2):
            raise ConfigError(f"classifier bins: expected an int >= 2, got {self.bins!r}")
        for name in ("learning_rate", "temperature", "adv_learning_rate", "min_background"):
            _positive_float(name, getattr(self, name))
        for name in _HYPER_ZERO:
            _positive_float(name, getattr(self, name), zero=True)
        if self.clip_norm is not None:
            _positive_float("clip_norm", self.clip_norm)
        for name in ("parameterised", "balance", "constrain"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"classifier {name}: expected a bool, "
                                  f"got {getattr(self, name)!r}")
        if self.parameterised and self.loss in ("inferno", "pivot"):
            raise ConfigError(f"classifier parameterised: not supported with loss "
                              f"{self.loss!r} (use 'bce' or 'asimov')")

    @property
    def outputs(self) -> int:
        """Network outputs: ``bins`` for ``"inferno"``, else 1 (a logit)."""
        return self.bins if self.loss == "inferno" else 1

    def hyper(self) -> dict[str, float]:
        """The :data:`HYPER` values of this config."""
        return {name: float(getattr(self, name)) for name in HYPER}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable), inverted by :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ClassifierConfig:
        """Build from a mapping (e.g. a TOML table); an unknown key is a ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"classifier: unknown key {unknown[0]!r}; allowed: "
                              f"{sorted(known)}")
        return cls(**spec)


# ------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------


class MLP(nn.Module):
    """A multilayer perceptron ``(..., D) -> (..., outputs)``."""

    hidden: tuple[int, ...]
    outputs: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        for width in self.hidden:
            z = act(nn.Dense(width)(z))
        return nn.Dense(self.outputs)(z)


class MixtureDensity(nn.Module):
    """Gaussian mixture density network ``s (..., 1) -> (logits (C,), mean (C,K), log σ (C,K))``."""

    hidden: tuple[int, ...]
    components: int
    dim: int

    @nn.compact
    def __call__(self, s: jax.Array):
        h = s
        for width in self.hidden:
            h = jnp.tanh(nn.Dense(width)(h))
        c, k = self.components, self.dim
        logits = nn.Dense(c)(h)
        mean = nn.Dense(c * k)(h).reshape(*h.shape[:-1], c, k)
        log_sigma = jnp.clip(nn.Dense(c * k)(h), -5.0, 3.0).reshape(*h.shape[:-1], c, k)
        return logits, mean, log_sigma


@struct.dataclass
class ClassifierParams:
    """A classifier's parameters: the network and its fixed input standardisation.

    Attributes:
        net: flax parameters of the :class:`MLP` (the only trained part).
        loc: ``(D,)`` input shift; ``D = F`` (+ ``K`` if parameterised).
        scale: ``(D,)`` input scale.
        hidden, activation: the MLP's structure (static).
    """

    net: Any
    loc: jax.Array
    scale: jax.Array
    hidden: tuple[int, ...] = struct.field(pytree_node=False, default=(64, 64))
    activation: str = struct.field(pytree_node=False, default="relu")

    @property
    def outputs(self) -> int:
        last = max((k for k in self.net["params"] if k.startswith("Dense_")),
                   key=lambda k: int(k.split("_")[1]))
        return int(self.net["params"][last]["bias"].shape[-1])

    def logits(self, z: jax.Array) -> jax.Array:
        """Network outputs for standardised-on-the-fly inputs ``z (..., D)`` -> ``(..., O)``."""
        module = MLP(self.hidden, self.outputs, self.activation)
        return module.apply(self.net, (z - self.loc) / self.scale)


def _inputs(params: ClassifierParams, x: jax.Array, nu: Any) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ShapeError(f"x: expected shape (n, F), got {tuple(x.shape)}")
    if nu is not None:
        nu = jnp.asarray(nu, jnp.float32)
        nu = jnp.broadcast_to(nu, (x.shape[0], nu.shape[-1])) if nu.ndim == 1 else nu
        if nu.ndim != 2 or nu.shape[0] != x.shape[0]:
            raise ShapeError(f"nu: expected shape (K,) or ({x.shape[0]}, K), "
                             f"got {tuple(nu.shape)}")
        x = jnp.concatenate([x, nu], axis=-1)
    dim = params.loc.shape[-1]
    if x.shape[-1] != dim:
        raise ShapeError(f"x: the classifier takes {dim} inputs (features, then nuisances "
                         f"if parameterised), got {x.shape[-1]}"
                         + ("" if nu is not None else " (pass nu= for a parameterised one)"))
    return x


def predict(params: ClassifierParams, x: Any, nu: Any = None) -> jax.Array:
    """Classifier scores in ``[0, 1]``.

    For a one-output classifier the score is ``σ(f(x))``. For an INFERNO summary
    (``bins`` outputs) it is the centre of the hard bin ``(argmax_j f_j(x) + ½)/bins``,
    so a histogram with ``bins`` equal bins on ``[0, 1]`` is the hard-assigned summary
    (the soft one is :func:`soft_summary`).

    Args:
        params: trained :class:`ClassifierParams` (one model, not stacked).
        x: ``(n, F)`` features.
        nu: ``(K,)`` or ``(n, K)`` nuisances, only for a parameterised classifier.

    Returns:
        ``(n,)`` scores.
    """
    logits = params.logits(_inputs(params, x, nu))
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits[..., 0])
    return (jnp.argmax(logits, axis=-1) + 0.5) / logits.shape[-1]


def soft_summary(params: ClassifierParams, x: Any, temperature: float = 0.1) -> jax.Array:
    """INFERNO's soft summary ``softmax(f(x)/T)``: ``x (n, F)`` -> ``(n, bins)``."""
    return jax.nn.softmax(params.logits(_inputs(params, x, None)) / temperature, axis=-1)


def predict_many(params: ClassifierParams, x: Any, nu: Any = None) -> jax.Array:
    """:func:`predict` for ``M`` stacked models (from :func:`train_many`): ``(M, n)``."""
    x = jnp.asarray(x, jnp.float32)
    return jax.vmap(lambda p: predict(p, x, nu))(params)


def select(tree: Any, i: int) -> Any:
    """Model ``i`` of a stacked pytree (params, state or metrics of :func:`train_many`)."""
    return jax.tree.map(lambda a: a[i], tree)


def roc_auc(scores: Any, y: Any, w: Any = None) -> float:
    """Area under the ROC curve (weighted Mann–Whitney statistic, ties count half).

    Args:
        scores: ``(n,)`` classifier scores.
        y: ``(n,)`` labels (1 signal, 0 background).
        w: ``(n,)`` weights (``None``: all 1).

    Returns:
        AUC in ``[0, 1]``.

    Raises:
        ShapeError: if the arrays are not ``(n,)`` of one length, or a class has no
            (positive total) weight.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(y) > 0.5
    w = np.ones_like(s) if w is None else np.asarray(w, np.float64)
    if s.ndim != 1 or y.shape != s.shape or w.shape != s.shape:
        raise ShapeError(f"scores, y, w: expected equal shapes (n,), got {s.shape}, "
                         f"{y.shape}, {w.shape}")
    for label, mask in (("signal", y), ("background", ~y)):
        if not w[mask].sum() > 0:
            raise ShapeError(f"y, w: expected both classes with positive total weight, "
                             f"got {label} weight {float(w[mask].sum())}")
    _, group = np.unique(s, return_inverse=True)  # tied scores share a group
    w_sig = np.bincount(group, weights=w * y)
    w_bkg = np.bincount(group, weights=w * ~y)
    below = np.cumsum(w_bkg) - w_bkg  # background weight strictly below each group
    total = np.sum(w_sig * (below + 0.5 * w_bkg))
    return float(total / (w[y].sum() * w[~y].sum()))


# ------------------------------------------------------------------------------------
# Losses (one batch)
# ------------------------------------------------------------------------------------


def bce_loss(logits: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    """Weighted binary cross-entropy ``Σ w ℓ / Σ w``.

    Args:
        logits: ``(B,)`` classifier logits.
        y: ``(B,)`` labels in ``{0, 1}``.
        w: ``(B,)`` non-negative weights.

    Returns:
        ``()`` loss.
    """
    ell = optax.sigmoid_binary_cross_entropy(logits, y)
    return jnp.sum(w * ell) / jnp.maximum(jnp.sum(w), 1e-12)


def asimov_loss(probs: jax.Array, y: jax.Array, w: jax.Array, sigma_b: Any = 0.0, *,
                min_background: Any = 1.0
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Negative Asimov significance with relative background uncertainty (Elwood & Krücker).

    ``Z_A`` grows without bound as the selected background goes to zero, and a
    minibatch estimate of ``b`` hits zero whenever the soft selection keeps none of the
    batch's background events: the loss would then reward an empty-background selection
    with ``Z → ∞`` (and float32 gradients overflow). The background is therefore
    floored, ``b = max(Σ_{y=0} w σ(f), min_background)`` (expected events, like the
    ``min_background`` of :func:`~sbi_engine.significance.threshold_scan`); below the
    floor the loss only pushes the signal up. Value and gradient stay finite for any
    ``probs`` in ``[0, 1]``.

    Args:
        probs: ``(B,)`` classifier outputs in ``[0, 1]`` (a soft selection).
        y: ``(B,)`` labels.
        w: ``(B,)`` weights, scaled so their sums are the expected yields.
        sigma_b: relative background uncertainty (``σ_b = sigma_b · b``).
        min_background: floor on the selected background, ``> 0`` (expected events).

    Returns:
        ``(−Z_A, (s, b))`` with ``s, b`` the soft-selected yields (``b`` floored).
    """
    s = jnp.sum(w * y * probs)
    b = jnp.maximum(jnp.sum(w * (1.0 - y) * probs), min_background)
    return -asimov_z_sigma_b(s, b, sigma_b * b), (s, b)


def mdn_nll(logits: jax.Array, mean: jax.Array, log_sigma: jax.Array, target: jax.Array
            ) -> jax.Array:
    """Negative log density of a diagonal Gaussian mixture at ``target`` (one example).

    Args:
        logits: ``(C,)`` unnormalised component log-weights.
        mean: ``(C, K)`` component means.
        log_sigma: ``(C, K)`` component log standard deviations.
        target: ``(K,)`` the value whose density is evaluated.

    Returns:
        ``()`` NLL.
    """
    z = (target - mean) / jnp.exp(log_sigma)
    comp = jnp.sum(-0.5 * z**2 - log_sigma - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
    return -jax.scipy.special.logsumexp(jax.nn.log_softmax(logits) + comp)


def inferno_fisher(summary: Callable[[jax.Array], jax.Array], generator: EventGenerator,
                   key: jax.Array, *, n: int, nu0: jax.Array, free: tuple[int, ...] = (),
                   constraint: jax.Array | None = None) -> jax.Array:
    """Fisher information of ``θ = (μ, ν_free)`` for a soft-binned summary (INFERNO).

    Events of every process are simulated inside at the fixed keys
    ``fold_in(key, p)``, so the expected counts ``n(θ)`` are differentiable in ``ν``
    through the simulator. The Fisher matrix is the Hessian of the Poisson NLL of the
    Asimov counts at ``θ₀ = (1, ν0_free)``, computed as its exact equivalent there,
    ``Jᵀ diag(1/n(θ₀)) J`` with ``J = ∂n/∂θ`` (``jax.jacfwd``), plus
    ``diag(0, constraint)``. Bins with no expected events (a softmax that underflowed)
    contribute nothing instead of ``0/0``.

    Args:
        summary: ``x (n, F) -> (n, bins)`` soft assignments (rows sum to 1).
        generator: the event generator (reparameterised sampling).
        key: a ``jax.random`` key (fixed: the same events for every ``θ``).
        n: events simulated per process (static).
        nu0: ``(K,)`` the nuisance values of the Asimov dataset.
        free: indices of the nuisances profiled besides ``μ`` (static).
        constraint: ``(len(free),)`` Gaussian constraint terms ``1/σ²`` (0: free).

    Returns:
        ``(1 + len(free), 1 + len(free))`` Fisher matrix.
    """
    free_idx = jnp.asarray(free, jnp.int32)
    nu0 = jnp.asarray(nu0, jnp.float32)

    def counts(theta):
        nu = nu0.at[free_idx].set(theta[1:]) if free else nu0
        total = 0.0
        for p, proc in enumerate(generator.processes):
            x = generator.sample(jax.random.fold_in(key, p), n, p, nu)
            frac = jnp.mean(summary(x), axis=0)
            scale = theta[0] if proc.signal else 1.0
            total = total + scale * generator.expected_yield(p, nu) * frac
        return total, total

    theta0 = jnp.concatenate([jnp.ones((1,), jnp.float32), nu0[free_idx]])
    jac, asimov = jax.jacfwd(counts, has_aux=True)(theta0)  # (bins, P), (bins,)
    tiny = jnp.finfo(asimov.dtype).tiny
    inv = jnp.where(asimov > tiny, 1.0 / jnp.where(asimov > tiny, asimov, 1.0), 0.0)
    fisher = jac.T @ (jac * inv[:, None])
    if constraint is not None and free:
        fisher = fisher + jnp.diag(jnp.concatenate([jnp.zeros((1,)), constraint]))
    return fisher


def _default_step(generator: EventGenerator, k: int) -> float:
    width = generator.constraints[k]
    par = generator.nuisances[k]
    return 0.5 * width if width is not None else 0.05 * (par.high - par.low)


def binned_fisher(score: Callable[[jax.Array], Any], generator: EventGenerator,
                  key: jax.Array, *, n: int, edges: Any = 10, nu0: Any = None,
                  steps: Mapping[str, float] | None = None) -> np.ndarray:
    """Expected Fisher information of ``θ = (μ, ν)`` for a hard-binned summary (templates).

    How the INFERNO paper evaluates every summary (de Castro & Dorigo 2019, §5.1 and
    the authors' ``template_model.py`` / ``summary_statistic_computer.py``): ``n``
    events per process are simulated once at fixed keys (``fold_in(key, p)``); the
    score is histogrammed on ``edges``, weighted to the expected yields, at the
    nominal ``ν0`` and at ``ν0 ± h_k e_k`` for every nuisance — the *same* events,
    transformed (reparameterised sampling), so the template differences are smooth.
    With the expected counts ``n_j(θ) = μ S_j(ν) + B_j(ν)`` and central differences
    ``∂n/∂ν_k ≈ (n(ν0 + h_k) − n(ν0 − h_k)) / 2h_k`` (the derivative at ``ν0`` of the
    authors' quadratic three-point interpolation), the Fisher information of the
    Poisson counts on their Asimov dataset is ``I = Jᵀ diag(1/n(θ₀)) J``. As in the
    authors' code, bins with no nominal signal or no nominal background are dropped.

    Args:
        score: ``x (n, F) -> (n,)`` scores, or ``(M, n)`` for ``M`` stacked models (e.g.
            ``lambda x: predict_many(params, x)``; an INFERNO summary's :func:`predict`
            is its hard bin centre, so ``edges=bins`` gives the argmax histogram).
        generator: the event generator (reparameterised sampling).
        key: a ``jax.random`` key.
        n: events simulated per process (static).
        edges: ``(B+1,)`` increasing bin edges, or an int ``B`` for ``B`` equal bins on
            ``[0, 1]``.
        nu0: ``(K,)`` nominal nuisances of the Asimov dataset (``None``: the generator's).
        steps: ``{nuisance: h}`` finite-difference half-steps; default half the
            Gaussian constraint width (the authors' ``r ± 0.2``, ``λ ± 0.5`` on the
            INFERNO toy), or 5 % of the range for an unconstrained nuisance.

    Returns:
        ``(1 + K, 1 + K)`` float64 Fisher matrix in the order ``(μ, *nuisance_names)``
        (``(M, 1 + K, 1 + K)`` for stacked scores). For the signal yield ``s = μ S``
        instead of ``μ``, divide row and column 0 by ``S``.
    """
    if isinstance(edges, (int, np.integer)) and not isinstance(edges, bool):
        if edges < 1:
            raise ConfigError(f"edges: expected a positive number of bins, got {edges}")
        edges = np.linspace(0.0, 1.0, int(edges) + 1)
    edges = np.asarray(edges, np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ConfigError("edges: expected at least two increasing bin edges")
    _positive_int("n", n)
    steps = dict(steps or {})
    unknown = sorted(set(steps) - set(generator.nuisance_names))
    if unknown:
        raise ConfigError(f"steps: unknown nuisance(s) {unknown} for generator "
                          f"{generator.name!r}; known: {', '.join(generator.nuisance_names)}")
    h = np.array([steps.get(name, _default_step(generator, k))
                  for k, name in enumerate(generator.nuisance_names)], np.float64)
    if not np.all(np.isfinite(h) & (h > 0)):
        bad = {k: float(v) for k, v in zip(generator.nuisance_names, h)}
        raise ConfigError(f"steps: expected finite steps > 0, got {bad}")
    nu0 = np.asarray(generator._nu(nu0), np.float64)
    n_bins = edges.size - 1
    sample = jax.jit(generator.sample, static_argnums=(1, 2))

    def hist(scores: np.ndarray, weight: float) -> np.ndarray:  # (..., n) -> (..., B)
        lead = scores.shape[:-1]
        idx = np.clip(np.searchsorted(edges, scores.reshape(-1, n), side="right") - 1,
                      0, n_bins - 1)
        idx = idx + n_bins * np.arange(idx.shape[0])[:, None]
        counts = np.bincount(idx.reshape(-1), minlength=idx.shape[0] * n_bins)
        return counts.reshape(*lead, n_bins) * weight

    nominal_x = [sample(jax.random.fold_in(key, p), n, p, jnp.asarray(nu0, jnp.float32))
                 for p in range(len(generator.processes))]
    nominal_scores = [np.asarray(score(x), np.float64) for x in nominal_x]
    if any(sc.shape[-1] != n for sc in nominal_scores):
        raise ShapeError(f"score: expected scores of shape (n,) or (M, n) with n = {n}, "
                         f"got {nominal_scores[0].shape}")

    def counts(nu: np.ndarray, p: int) -> np.ndarray:
        nu32 = jnp.asarray(nu, jnp.float32)
        x = sample(jax.random.fold_in(key, p), n, p, nu32)
        same = bool(jnp.array_equal(x, nominal_x[p]))  # e.g. a signal ν does not move
        sc = nominal_scores[p] if same else np.asarray(score(x), np.float64)
        return hist(sc, float(generator.expected_yield(p, nu32)) / n)

    signal = [proc.signal for proc in generator.processes]
    per_process = [counts(nu0, p) for p in range(len(signal))]
    sig = sum(c for c, is_sig in zip(per_process, signal) if is_sig)
    bkg = sum(c for c, is_sig in zip(per_process, signal) if not is_sig)
    columns = [sig]
    for k in range(generator.dim_nu):
        shift = np.zeros_like(nu0)
        shift[k] = h[k]
        up = sum(counts(nu0 + shift, p) for p in range(len(signal)))
        down = sum(counts(nu0 - shift, p) for p in range(len(signal)))
        columns.append((up - down) / (2.0 * h[k]))
    jac = np.stack(columns, axis=-1)  # (..., B, P)
    keep = (sig > 0) & (bkg > 0)
    inv = np.where(keep, 1.0 / np.where(keep, sig + bkg, 1.0), 0.0)
    return np.einsum("...bi,...b,...bj->...ij", jac, inv, jac)


# ------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------


class TrainData(NamedTuple):
    """Training events with the nuisance values each was simulated at.

    Attributes:
        x: ``(N, F)`` features (``(M, N, F)`` when stacked for :func:`train_many`).
        y: ``(N,)`` labels.
        w: ``(N,)`` weights; per process they sum to its expected yield.
        nu: ``(N, K)`` nuisance values per event (``K`` may be 0).
    """

    x: jax.Array
    y: jax.Array
    w: jax.Array
    nu: jax.Array


class Batch(NamedTuple):
    """A minibatch: ``x (B, F)``, ``y (B,)``, ``w (B,)`` yields scaled to the dataset,
    ``wb (B,)`` BCE weights (class-balanced if configured), ``nu (B, K)``."""

    x: jax.Array
    y: jax.Array
    w: jax.Array
    wb: jax.Array
    nu: jax.Array


def train_data(events: EventData, nu: Any = None) -> TrainData:
    """:class:`TrainData` from an :class:`~sbi_engine.events.EventData`.

    Args:
        events: ``(x (N, F), y (N,), w (N,))``.
        nu: ``(K,)`` one setting for all events, ``(N, K)`` per event, or ``None``
            (``K = 0``: no nuisance column).
    """
    x, y, w = (jnp.asarray(a, jnp.float32) for a in events)
    if x.ndim != 2 or y.shape != (x.shape[0],) or w.shape != (x.shape[0],):
        raise ShapeError(f"events: expected x (N, F), y (N,), w (N,), got "
                         f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(w.shape)}")
    if nu is None:
        nu = jnp.zeros((x.shape[0], 0), jnp.float32)
    nu = jnp.asarray(nu, jnp.float32)
    if nu.ndim == 1:
        nu = jnp.broadcast_to(nu, (x.shape[0], nu.shape[0]))
    if nu.ndim != 2 or nu.shape[0] != x.shape[0]:
        raise ShapeError(f"nu: expected (K,) or ({x.shape[0]}, K), got {tuple(nu.shape)}")
    return TrainData(x, y, w, nu)


def augmented_data(key: jax.Array, generator: EventGenerator,
                   n_per_process: int | Mapping[str, int] = 1000, *, prior: Any = None
                   ) -> TrainData:
    """Nuisance-augmented events: ``ν`` drawn from its prior per event, then one event each.

    Args:
        key: a ``jax.random`` key.
        generator: the event generator.
        n_per_process: events per process (see :func:`~sbi_engine.events.make_dataset`).
        prior: prior over ``ν`` (default ``generator.nuisance_prior``), with
            ``sample(key, n) -> (n, K)``.

    Returns:
        :class:`TrainData` with per-event ``nu (N, K)``.
    """
    n_total = sum(_counts(generator, n_per_process))  # validated before any sampling
    prior = generator.nuisance_prior if prior is None else prior
    k_nu, k_ev = jax.random.split(key)
    nu = jnp.asarray(prior.sample(k_nu, n_total), jnp.float32).reshape(n_total, -1)
    return train_data(make_dataset(k_ev, generator, nu, n_per_process), nu)


def _bce_weights(data: TrainData, balance: bool) -> jax.Array:
    """Per-event BCE weights ``(N,)`` with mean 1: class-balanced, or the normalised yields."""
    n = data.x.shape[0]
    w_sig = jnp.sum(data.w * data.y)
    w_bkg = jnp.sum(data.w * (1.0 - data.y))
    if balance:
        per_class = jnp.where(data.y > 0.5, 2.0 * w_sig, 2.0 * w_bkg)
    else:
        per_class = jnp.full_like(data.w, w_sig + w_bkg)
    return data.w / jnp.maximum(per_class, 1e-30) * n


def _draw(key: jax.Array, data: TrainData, wb: jax.Array, batch_size: int) -> Batch:
    """A minibatch drawn with replacement; yields scaled so batch sums estimate totals."""
    n = data.x.shape[0]
    idx = jax.random.randint(key, (batch_size,), 0, n)
    return Batch(data.x[idx], data.y[idx], data.w[idx] * (n / batch_size), wb[idx],
                 data.nu[idx])


# ------------------------------------------------------------------------------------
# Trainers
# ------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """State of a training run (a pytree; stacked ``(M, ...)`` under :func:`train_many`).

    Attributes:
        params: the classifier's :class:`ClassifierParams`.
        opt_state: optax state of the classifier's optimiser.
        adv_params: the adversary's flax parameters (``None`` unless ``"pivot"``).
        adv_opt_state: optax state of the adversary (``None`` unless ``"pivot"``).
        step: ``()`` int32, steps taken.
        key: the run's ``jax.random`` key (split every step).
        hyper: ``{name: ()}`` the :data:`HYPER` values of this model.
        nu_loc, nu_scale: ``(K,)`` standardisation of the adversary's target.
    """

    params: ClassifierParams
    opt_state: Any
    adv_params: Any
    adv_opt_state: Any
    step: jax.Array
    key: jax.Array
    hyper: dict[str, jax.Array]
    nu_loc: jax.Array
    nu_scale: jax.Array


class Trainer(NamedTuple):
    """Pure training functions for one :class:`ClassifierConfig` (see :func:`make_trainer`).

    Attributes:
        init: ``init(key, data, hyper=None) -> TrainState``.
        draw: ``draw(key, data) -> batch`` (a :class:`Batch` of ``batch_size`` events drawn
            with replacement, or the key itself for ``"inferno"``, which simulates).
        step: ``step(state, batch) -> (state, metrics)``.
        fit: ``fit(state, data) -> (state, metrics (steps,))``, a ``lax.scan`` of
            ``draw`` + ``step``.
    """

    init: Callable[..., TrainState]
    draw: Callable[[jax.Array, TrainData], Any]
    step: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]
    fit: Callable[[TrainState, TrainData], tuple[TrainState, dict[str, jax.Array]]]


def _optimizer(clip_norm: float | None) -> optax.GradientTransformation:
    def factory(learning_rate):
        adam = optax.adam(learning_rate)
        return adam if clip_norm is None else optax.chain(
            optax.clip_by_global_norm(clip_norm), adam)
    return optax.inject_hyperparams(factory)(learning_rate=1e-3)


def _standardisation(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    loc = jnp.mean(z, axis=0)
    scale = jnp.std(z, axis=0)
    return loc, jnp.where(scale > 1e-6, scale, 1.0)


def _bce_objective(config, ctx):
    def loss(params, adv, batch, state):
        z = batch.x if not config.parameterised else jnp.concatenate([batch.x, batch.nu], -1)
        value = bce_loss(params.logits(z)[:, 0], batch.y, batch.wb)
        return value, {"bce": value}
    return loss


def _asimov_objective(config, ctx):
    def loss(params, adv, batch, state):
        z = batch.x if not config.parameterised else jnp.concatenate([batch.x, batch.nu], -1)
        probs = jax.nn.sigmoid(params.logits(z)[:, 0])
        value, (s, b) = asimov_loss(probs, batch.y, batch.w, state.hyper["sigma_b"],
                                    min_background=config.min_background)
        return value, {"z": -value, "s": s, "b": b}
    return loss


def _inferno_objective(config, ctx):
    generator: EventGenerator = ctx["generator"]
    if generator is None:
        raise ConfigError("classifier loss: 'inferno' needs the event generator "
                          "(pass generator=)")
    unknown = [n for n in config.free_nuisances if n not in generator.nuisance_names]
    if unknown:
        raise ConfigError(f"classifier free_nuisances: unknown nuisance(s) {unknown} for "
                          f"generator {generator.name!r}; known: "
                          f"{', '.join(generator.nuisance_names)}")
    free = tuple(generator.nuisance_names.index(n) for n in config.free_nuisances)
    constraint = None
    if config.constrain and free:
        widths = [generator.constraints[i] for i in free]
        constraint = jnp.asarray([0.0 if s is None else 1.0 / s**2 for s in widths],
                                 jnp.float32)
    nu0 = jnp.asarray(generator.nominal_nu())
    s_total = float(sum(generator.expected_yield(p, nu0)
                        for p in generator.signal_processes))

    def loss(params, adv, key, state):
        temp = state.hyper["temperature"]
        fisher = inferno_fisher(lambda x: jax.nn.softmax(params.logits(x) / temp, axis=-1),
                                generator, key, n=config.inferno_events, nu0=nu0,
                                free=free, constraint=constraint)
        var_mu = jnp.linalg.inv(fisher)[0, 0]
        return var_mu, {"sigma_mu": jnp.sqrt(var_mu),
                        "sigma_s": s_total * jnp.sqrt(var_mu)}
    return loss


def _adversary(config: ClassifierConfig, dim: int) -> MixtureDensity:
    return MixtureDensity(config.adv_hidden, config.adv_components, dim)


def _adversary_nll(config, params, adv_params, batch, state):
    probs = jax.nn.sigmoid(params.logits(batch.x))  # (B, 1)
    adv_module = _adversary(config, state.nu_loc.shape[-1])
    logits, mean, log_sigma = adv_module.apply(adv_params, probs)
    target = (batch.nu - state.nu_loc) / state.nu_scale
    nll = jax.vmap(mdn_nll)(logits, mean, log_sigma, target)
    mask = {"all": jnp.ones_like(batch.y), "signal": batch.y, "background": 1.0 - batch.y}
    weight = batch.wb * mask[config.adv_on]
    return jnp.sum(weight * nll) / jnp.maximum(jnp.sum(weight), 1e-12)


def _pivot_objective(config, ctx):
    def loss(params, adv_params, batch, state):
        bce = bce_loss(params.logits(batch.x)[:, 0], batch.y, batch.wb)
        nll = _adversary_nll(config, params, adv_params, batch, state)
        lam = jnp.where(state.step < config.pretrain_steps, 0.0, state.hyper["adv_lambda"])
        return bce - lam * nll, {"bce": bce, "adv_nll": nll}
    return loss


#: Loss registry: name -> builder ``(config, context) -> loss(params, adv, batch, state)``.
LOSSES: dict[str, Callable[..., Callable[..., Any]]] = {
    "bce": _bce_objective,
    "asimov": _asimov_objective,
    "inferno": _inferno_objective,
    "pivot": _pivot_objective,
}


def make_trainer(config: ClassifierConfig, generator: EventGenerator | None = None
                 ) -> Trainer:
    """Pure ``init``/``draw``/``step``/``fit`` functions for ``config``.

    Args:
        config: the :class:`ClassifierConfig` (static: closed over).
        generator: the event generator; required by ``"inferno"`` (events are simulated
            inside the loss), unused otherwise.

    Returns:
        A :class:`Trainer`. Nothing here is jitted; :func:`train_one` and
        :func:`train_many` put the whole ``fit`` under one ``jax.jit``.
    """
    if not isinstance(config, ClassifierConfig):
        raise ConfigError(f"config: expected a ClassifierConfig, got {type(config).__name__}")
    adversarial = config.loss == "pivot"
    objective = LOSSES[config.loss](config, {"generator": generator})
    opt = _optimizer(config.clip_norm)
    adv_opt = optax.adam(config.adv_learning_rate)
    inferno = config.loss == "inferno"

    def init(key: jax.Array, data: TrainData, hyper: Mapping[str, Any] | None = None
             ) -> TrainState:
        """Initial state; input standardisation from ``data``; ``hyper`` overrides :data:`HYPER`."""
        _check_hyper(hyper)
        values = {**config.hyper(), **(hyper or {})}
        hyp = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
        k_net, k_adv, k_run = jax.random.split(key, 3)
        z = data.x if not config.parameterised else jnp.concatenate([data.x, data.nu], -1)
        if config.parameterised and data.nu.shape[-1] == 0:
            raise ConfigError("classifier parameterised: the data have no nuisance column")
        loc, scale = _standardisation(z)
        net = MLP(config.hidden, config.outputs, config.activation).init(k_net, z[:1])
        params = ClassifierParams(net, loc, scale, config.hidden, config.activation)
        opt_state = opt.init(net)
        opt_state.hyperparams["learning_rate"] = hyp["learning_rate"]
        nu_loc, nu_scale = _standardisation(data.nu)
        adv_params = adv_state = None
        if adversarial:
            k = data.nu.shape[-1]
            if k == 0:
                raise ConfigError("classifier loss: 'pivot' needs per-event nuisances "
                                  "(TrainData.nu with K >= 1)")
            adv_params = _adversary(config, k).init(k_adv, jnp.zeros((1, 1)))
            adv_state = adv_opt.init(adv_params)
        return TrainState(params, opt_state, adv_params, adv_state, jnp.zeros((), jnp.int32),
                          k_run, hyp, nu_loc, nu_scale)

    def draw(key: jax.Array, data: TrainData, wb: jax.Array | None = None) -> Any:
        """A minibatch (``wb``: precomputed :func:`_bce_weights`), or a key for INFERNO."""
        if inferno:
            return key
        wb = _bce_weights(data, config.balance) if wb is None else wb
        return _draw(key, data, wb, config.batch_size)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """One classifier update (and ``adv_steps`` adversary updates for ``"pivot"``)."""
        def loss_net(net):
            return objective(state.params.replace(net=net), state.adv_params, batch, state)

        (value, metrics), grads = jax.value_and_grad(loss_net, has_aux=True)(
            state.params.net)
        updates, opt_state = opt.update(grads, state.opt_state, state.params.net)
        params = state.params.replace(net=optax.apply_updates(state.params.net, updates))
        adv_params, adv_state = state.adv_params, state.adv_opt_state
        if adversarial:
            def adv_update(carry, _):
                a_params, a_state = carry
                nll, g = jax.value_and_grad(
                    lambda a: _adversary_nll(config, params, a, batch, state)
                )(a_params)
                upd, a_state = adv_opt.update(g, a_state, a_params)
                return (optax.apply_updates(a_params, upd), a_state), nll

            carry = (adv_params, adv_state)
            if config.adv_steps == 1:
                carry, _ = adv_update(carry, None)
            else:
                carry, _ = jax.lax.scan(adv_update, carry, None, length=config.adv_steps)
            adv_params, adv_state = carry
        metrics = {"loss": value, **metrics}
        new = state._replace(params=params, opt_state=opt_state, adv_params=adv_params,
                             adv_opt_state=adv_state, step=state.step + 1)
        return new, metrics

    def fit(state: TrainState, data: TrainData) -> tuple[TrainState, dict[str, jax.Array]]:
        wb = None if inferno else _bce_weights(data, config.balance)  # once, not per step

        def body(st, _):
            key, sub = jax.random.split(st.key)
            return step(st._replace(key=key), draw(sub, data, wb))

        return jax.lax.scan(body, state, None, length=config.steps)

    return Trainer(init, draw, step, fit)


# ------------------------------------------------------------------------------------
# Training entry points
# ------------------------------------------------------------------------------------


class TrainResult(NamedTuple):
    """What :func:`train_one` / :func:`train_many` return.

    Attributes:
        params: :class:`ClassifierParams` (leaves stacked ``(M, ...)`` for ``train_many``).
        state: the final :class:`TrainState` (stacked likewise).
        metrics: ``{name: (steps,)}`` per-step metrics (``(M, steps)`` for ``train_many``).
        seconds: wall time, compilation included.
        compilations: times the training function was traced for this config so far.
    """

    params: ClassifierParams
    state: TrainState
    metrics: dict[str, np.ndarray]
    seconds: float
    compilations: int


_TRACES: dict[tuple[Any, ...], int] = {}


@functools.lru_cache(maxsize=64)
def _compiled(config: ClassifierConfig, generator: EventGenerator | None, many: bool,
              data_axis: int | None) -> Callable[..., Any]:
    trainer = make_trainer(config, generator)
    tag = (config, id(generator), many, data_axis)

    def run(key, data, hyper):
        return trainer.fit(trainer.init(key, data, hyper), data)

    if many:
        run = jax.vmap(run, in_axes=(0, data_axis, 0))

    def counted(*args):
        _TRACES[tag] = _TRACES.get(tag, 0) + 1  # trace-time side effect: counts compilations
        return run(*args)

    return tag, jax.jit(counted)


register_clear(_compiled.cache_clear)


def _full_hyper(config: ClassifierConfig, hyper: Mapping[str, Any] | None) -> dict[str, Any]:
    """All :data:`HYPER` values (config defaults, overridden), so the jitted pytree is fixed."""
    _check_hyper(hyper)
    return {**config.hyper(), **(hyper or {})}


def _as_train_data(data: Any) -> TrainData:
    if isinstance(data, TrainData):
        return TrainData(*(jnp.asarray(a, jnp.float32) for a in data))
    if isinstance(data, EventData):
        return train_data(data)
    raise ShapeError(f"data: expected TrainData or EventData, got {type(data).__name__}")


def _check_data(data: TrainData, lead: tuple[int, ...]) -> None:
    x, y, w, nu = data
    nd = len(lead)
    if x.ndim != nd + 2 or tuple(x.shape[:nd]) != lead:
        raise ShapeError(f"data.x: expected shape {(*lead, 'N', 'F')}, got {tuple(x.shape)}")
    n = x.shape[nd]
    for name, arr, shape in (("y", y, (*lead, n)), ("w", w, (*lead, n))):
        if tuple(arr.shape) != shape:
            raise ShapeError(f"data.{name}: expected shape {shape}, got {tuple(arr.shape)}")
    if nu.ndim != nd + 2 or tuple(nu.shape[:nd + 1]) != (*lead, n):
        raise ShapeError(f"data.nu: expected shape {(*lead, n, 'K')}, got {tuple(nu.shape)}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ShapeError("data.x: contains non-finite values")


def train_one(key: jax.Array, data: TrainData | EventData, config: ClassifierConfig, *,
              generator: EventGenerator | None = None,
              hyper: Mapping[str, float] | None = None) -> TrainResult:
    """Train one classifier: ``init`` then ``config.steps`` steps, one compiled call.

    Args:
        key: a ``jax.random`` key.
        data: training events (:class:`TrainData` ``x (N, F), y, w (N,), nu (N, K)``, or
            an :class:`~sbi_engine.events.EventData` without nuisances). For
            ``"inferno"`` they only set the input standardisation.
        config: the :class:`ClassifierConfig`.
        generator: the event generator (required for ``"inferno"``).
        hyper: overrides of the :data:`HYPER` values.

    Returns:
        A :class:`TrainResult` (metrics ``(steps,)``).
    """
    data = _as_train_data(data)
    _check_data(data, ())
    tag, fn = _compiled(config, generator, False, None)
    start = time.perf_counter()
    state, metrics = fn(key, data, {k: jnp.float32(v)
                                    for k, v in _full_hyper(config, hyper).items()})
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    return TrainResult(state.params, state, metrics, time.perf_counter() - start,
                       _TRACES.get(tag, 0))


def train_many(keys: jax.Array, data: TrainData | EventData, config: ClassifierConfig, *,
               generator: EventGenerator | None = None,
               hyper: Mapping[str, Any] | None = None) -> TrainResult:
    """Train ``M`` classifiers at once under ``jax.vmap``, in one compiled loop.

    The ``M`` models share ``config``'s structure (widths, loss, steps, batch size)
    and differ in their key, their data (stacked) and/or the numeric :data:`HYPER`
    values; with the same key, data and hyperparameters, model ``i`` equals
    :func:`train_one` (up to floating-point reassociation).

    Args:
        keys: ``(M,)`` typed keys or ``(M, 2)`` raw keys, one per model.
        data: a shared dataset (``x (N, F)`` ...) or one per model stacked
            (``x (M, N, F), y (M, N), w (M, N), nu (M, N, K)``), e.g. one per training
            nuisance setting of a systematics study.
        config: the :class:`ClassifierConfig`.
        generator: the event generator (required for ``"inferno"``).
        hyper: ``{name: scalar or (M,)}`` per-model :data:`HYPER` values (e.g. a λ scan).

    Returns:
        A :class:`TrainResult` whose params/state leaves lead with ``M`` and metrics
        are ``(M, steps)``.
    """
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    m = keys.shape[0]
    data = _as_train_data(data)
    stacked = data.x.ndim == 3
    _check_data(data, (m,) if stacked else ())
    hyp = {}
    for name, value in _full_hyper(config, hyper).items():
        arr = jnp.broadcast_to(jnp.asarray(value, jnp.float32), (m,)) if jnp.ndim(value) == 0 \
            else jnp.asarray(value, jnp.float32)
        if arr.shape != (m,):
            raise ShapeError(f"hyper[{name!r}]: expected a scalar or shape ({m},), "
                             f"got {tuple(arr.shape)}")
        hyp[name] = arr
    tag, fn = _compiled(config, generator, True, 0 if stacked else None)
    start = time.perf_counter()
    state, metrics = fn(keys, data, hyp)
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    return TrainResult(state.params, state, metrics, time.perf_counter() - start,
                       _TRACES.get(tag, 0))


# ------------------------------------------------------------------------------------
# Files (no pickle)
# ------------------------------------------------------------------------------------

FORMAT = "sbi-engine-classifier"
FORMAT_VERSION = 1
_HEADER, _WEIGHTS = "classifier.json", "weights.npz"


class ClassifierFileError(SbiEngineError):
    """A saved classifier is missing, corrupted, or from an incompatible format version."""


class SavedClassifier(NamedTuple):
    """What :func:`load_classifier` returns.

    Attributes:
        params: the :class:`ClassifierParams` (leaves stacked ``(M, ...)`` if saved so).
        config: the :class:`ClassifierConfig` it was trained with, or ``None``.
        metadata: the JSON metadata given to :func:`save_classifier`.
    """

    params: ClassifierParams
    config: ClassifierConfig | None
    metadata: dict[str, Any]


def _expected_arrays(hidden: tuple[int, ...], inputs: int, outputs: int,
                     stack: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {"loc": (*stack, inputs), "scale": (*stack, inputs)}
    widths = (inputs, *hidden, outputs)
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        shapes[f"net/Dense_{i}/kernel"] = (*stack, a, b)
        shapes[f"net/Dense_{i}/bias"] = (*stack, b)
    return shapes


def save_classifier(path: str | os.PathLike, params: ClassifierParams,
                    config: ClassifierConfig | None = None, *,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a classifier to the directory ``path`` atomically, without pickle.

    ``path/classifier.json`` holds the format and its version, the engine version, the
    network's structure (hidden widths, activation, inputs, outputs, stacked models),
    the :class:`ClassifierConfig`, the metadata, and the SHA-256 of
    ``path/weights.npz``, which holds the arrays (float32): ``loc``, ``scale`` and
    ``net/Dense_i/{kernel,bias}``. Both files are written to a temporary directory
    that is then renamed over ``path`` (:func:`~sbi_engine.store.atomic_write_dir`).

    Args:
        path: the model directory (created or replaced).
        params: :class:`ClassifierParams` of one model, or stacked ``(M, ...)`` from
            :func:`train_many`.
        config: the training config, stored for the record (optional).
        metadata: JSON-able extra information (arrays become lists).

    Returns:
        The directory's path.
    """
    from sbi_engine import __version__

    if not isinstance(params, ClassifierParams):
        raise ShapeError(f"params: expected ClassifierParams, got {type(params).__name__}")
    if config is not None and not isinstance(config, ClassifierConfig):
        raise ConfigError(f"config: expected a ClassifierConfig or None, got "
                          f"{type(config).__name__}")
    loc = np.asarray(params.loc)
    stack, inputs = tuple(int(d) for d in loc.shape[:-1]), int(loc.shape[-1])
    n_layers = len(params.hidden) + 1
    arrays = {"loc": loc, "scale": np.asarray(params.scale)}
    for i in range(n_layers):
        layer = params.net["params"][f"Dense_{i}"]
        arrays[f"net/Dense_{i}/kernel"] = np.asarray(layer["kernel"])
        arrays[f"net/Dense_{i}/bias"] = np.asarray(layer["bias"])
    outputs = int(arrays[f"net/Dense_{n_layers - 1}/bias"].shape[-1])
    expected = _expected_arrays(tuple(params.hidden), inputs, outputs, stack)
    for name, arr in arrays.items():
        if arr.shape != expected[name]:
            raise ShapeError(f"params {name}: expected shape {expected[name]} for hidden "
                             f"{tuple(params.hidden)}, got {arr.shape}")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v.astype(np.float32) for k, v in arrays.items()})
    weights = buffer.getvalue()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "engine_version": __version__,
        "hidden": list(params.hidden),
        "activation": params.activation,
        "inputs": inputs,
        "outputs": outputs,
        "stack": list(stack),
        "config": None if config is None else jsonable(config.to_dict()),
        "metadata": jsonable(dict(metadata or {})),
        "weights": {"file": _WEIGHTS, "sha256": hashlib.sha256(weights).hexdigest()},
    }
    from sbi_engine.posterior import seal_header

    seal_header(header)
    return atomic_write_dir(path, {
        _HEADER: (json.dumps(header, indent=1, sort_keys=True) + "\n").encode(),
        _WEIGHTS: weights,
    })


def load_classifier(path: str | os.PathLike) -> SavedClassifier:
    """Read a classifier written by :func:`save_classifier` (nothing is unpickled).

    Args:
        path: the model directory.

    Returns:
        :class:`SavedClassifier` ``(params, config, metadata)``.

    Raises:
        ClassifierFileError: a missing directory or file, invalid JSON, another format,
            a format version this engine does not read, a weights file that is truncated
            or corrupted (checksum), or arrays that do not match the stored structure.
    """
    from sbi_engine.posterior import read_model_header

    path = Path(path)
    wfile = path / _WEIGHTS
    header = read_model_header(path, FORMAT, FORMAT_VERSION, _WEIGHTS, "save_classifier",
                               header=_HEADER, what="classifier", error=ClassifierFileError)
    try:
        hidden = tuple(int(v) for v in header["hidden"])
        inputs, outputs = int(header["inputs"]), int(header["outputs"])
        stack = tuple(int(v) for v in header["stack"])
        activation = str(header["activation"])
        digest = str(header["weights"]["sha256"])
        config = None if header.get("config") is None else ClassifierConfig.from_dict(
            header["config"])
        metadata = dict(header.get("metadata") or {})
    except (KeyError, TypeError, ValueError) as err:  # ConfigError is a ValueError
        raise ClassifierFileError(f"classifier {path}: {_HEADER} is inconsistent "
                                  f"({type(err).__name__}: {err})") from None
    if activation not in _ACTIVATIONS:
        raise ClassifierFileError(f"classifier {path}: {_HEADER} activation: expected one "
                                  f"of {sorted(_ACTIVATIONS)}, got {activation!r}")
    raw = wfile.read_bytes()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise ClassifierFileError(f"classifier {path}: {_WEIGHTS} does not match the "
                                  f"checksum in {_HEADER} (truncated or corrupted)")
    expected = _expected_arrays(hidden, inputs, outputs, stack)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as err:  # noqa: BLE001 - zipfile/numpy raise many types on garbage
        raise ClassifierFileError(f"classifier {path}: {_WEIGHTS} cannot be read "
                                  f"({type(err).__name__}: {err})") from None
    if set(arrays) != set(expected):
        raise ClassifierFileError(f"classifier {path}: {_WEIGHTS} holds arrays "
                                  f"{sorted(arrays)}; expected {sorted(expected)}")
    for name, shape in expected.items():
        arr = arrays[name]
        if arr.shape != shape or arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
            raise ClassifierFileError(f"classifier {path}: {_WEIGHTS} array {name!r}: "
                                      f"expected finite floats of shape {shape}, got "
                                      f"{arr.dtype} {arr.shape}")
    net = {"params": {f"Dense_{i}": {
        "kernel": jnp.asarray(arrays[f"net/Dense_{i}/kernel"], jnp.float32),
        "bias": jnp.asarray(arrays[f"net/Dense_{i}/bias"], jnp.float32)}
        for i in range(len(hidden) + 1)}}
    params = ClassifierParams(net, jnp.asarray(arrays["loc"], jnp.float32),
                              jnp.asarray(arrays["scale"], jnp.float32), hidden, activation)
    return SavedClassifier(params, config, metadata)
