"""Restricted priors: learn where a simulator gives valid output, simulate only there.

Many mechanistic simulators return undefined summary features (NaN rows) for most of
the prior: for the pyloric circuit about 99 % of prior draws give no rhythm. Following
Deistler, Gonçalves & Macke (2022, PNAS, "Energy-efficient network activity from
disparate circuit parameters") and sbi's ``RestrictionEstimator``, this module

1. trains a classifier ``c(θ) ≈ P(x finite | θ)`` on simulations, NaN rows being the
   negatives (:func:`train_validity_classifier`: a flax MLP on z-scored θ, class-balanced
   binary cross-entropy, Adam, early stopping; each epoch is one compiled ``lax.scan``);
2. thresholds it, ``S = {θ : c(θ) >= τ}`` (:func:`choose_threshold`), and
3. samples the *restricted prior* ``p_S(θ) = p(θ) 1_S(θ) / Z``, ``Z = P_prior(S)``, by
   rejection from the prior (:class:`RestrictedPrior`; the acceptance rate is the
   estimate of ``Z``, and sampling stops with a :class:`RestrictionError` when it is
   hopeless). Further constraints ``θ ∈ C_k`` (e.g. the highest-posterior-density
   region of truncated sequential NPE, TSNPE) intersect the region.

Why the posterior stays correct (and when it does not)
------------------------------------------------------
Let round ``r`` draw ``N_r`` parameters from ``p(θ) 1_{S_r}(θ) / Z_r`` (round 0: the
prior, ``S_0`` = everything; round 1: the classifier region; later rounds: the
classifier region ∩ an HPD region). Training one NPE on the pooled valid rows with the
plain loss ``-Σ log q(θ_i | x_i)`` has the minimiser

    q*(θ | x) ∝ p(θ | x) w(θ),   w(θ) = Σ_r (N_r / N) 1_{S_r}(θ) / Z_r

(the pooled proposal is the prior reweighted by ``w``; keeping only rows with finite
``x`` does not change ``θ | x`` because a finite ``x`` already implies a valid ``θ``).
``w`` is constant on ``∩_r S_r``, so **q*(· | x_o) = p(· | x_o) exactly when the
posterior's support lies inside every region** — no importance weights or atomic
loss are needed (the argument of TSNPE, Deistler, Gonçalves & Macke 2022, NeurIPS).
Where the support leaves a region, the posterior is not truncated but *down-weighted*
by ``w(θ)/w_max``: with half the simulations from the prior and half from a region of
prior mass ``Z_1 = 0.1``, posterior mass outside the region is under-counted ~11×.
The exact correction, if that assumption is in doubt, is to weight each row's loss by
``1 / w(θ_i)`` (``Z_r`` estimated by the acceptance rates here); the pipelines built on
this module rely on the support assumption, as sbi and the papers do.

What the classifier's errors mean. A *false positive* (invalid θ inside ``S``) only
wastes a simulation. A *false negative* (valid θ outside ``S``) removes part of the
valid region, and any observation whose posterior reaches there is affected as above.
The threshold is therefore chosen from the false-negative rate: ``τ`` is the
``allowed_false_negatives`` quantile of ``c(θ)`` over the valid simulations
(sbi's ``restrict_prior(allowed_false_negatives=...)``; 0 keeps every valid
simulation inside ``S``). That rate is measured under the prior restricted to the
valid region, not under a particular posterior: a posterior concentrated in a rare
corner that the classifier scores low can lose more than that fraction, which is why
the rate is kept small and reported on held-out valid simulations
(:attr:`ClassifierResult.heldout_false_negative_rate`). Lower ``τ``: fewer false
negatives, lower acceptance gain; higher ``τ``: more valid simulations per round,
more risk.

Files: :meth:`ValidityClassifier.save` writes a directory with ``classifier.json``
(format, version, config, standardisation, threshold, metrics) and ``params.msgpack``
(flax-serialised arrays), atomically; :meth:`ValidityClassifier.load` never unpickles.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from sbi_engine.errors import ConfigError, SbiEngineError, ShapeError
from sbi_engine.priors import Prior
from sbi_engine.store import jsonable

__all__ = [
    "ClassifierConfig",
    "ClassifierResult",
    "RestrictedPrior",
    "RestrictionError",
    "ValidityClassifier",
    "choose_threshold",
    "train_validity_classifier",
]

FORMAT = "sbi-engine-validity-classifier"
FORMAT_VERSION = 1

#: ``constraint(theta (m, D) float32) -> (m,) bool``: True where θ is inside.
Constraint = Callable[[np.ndarray], np.ndarray]


class RestrictionError(SbiEngineError):
    """A restricted prior cannot be sampled (acceptance hopeless), or a classifier file
    is missing, corrupted or of another version."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Validity classifier and its training (defaults close to sbi's ``RestrictionEstimator``).

    Attributes:
        hidden: hidden units per layer of the MLP (ReLU).
        learning_rate: Adam step size.
        batch_size: rows per minibatch.
        validation_fraction: share of each class held out (early stopping, held-out
            false-negative rate).
        stop_after_epochs: patience of early stopping.
        max_epochs: hard cap on epochs.
        balance: weight the loss so that valid and invalid rows carry equal total weight
            (helps when valid rows are ~1 %).
        allowed_false_negatives: fraction of valid simulations allowed outside the
            restricted region (sets the threshold, see :func:`choose_threshold`).
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    learning_rate: float = 1e-3
    batch_size: int = 200
    validation_fraction: float = 0.1
    stop_after_epochs: int = 20
    max_epochs: int = 500
    balance: bool = True
    allowed_false_negatives: float = 0.01

    def __post_init__(self):
        hidden = tuple(self.hidden)
        if not hidden or any(not isinstance(h, int) or isinstance(h, bool) or h < 1
                             for h in hidden):
            raise ConfigError(f"hidden: expected a non-empty list of positive ints, got "
                              f"{list(self.hidden)!r}")
        object.__setattr__(self, "hidden", hidden)
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate: expected > 0, got {self.learning_rate!r}")
        for name in ("batch_size", "stop_after_epochs", "max_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: expected a positive int, got {value!r}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction: expected 0 < fraction < 1, got "
                              f"{self.validation_fraction!r}")
        if not 0 <= self.allowed_false_negatives < 1:
            raise ConfigError(f"allowed_false_negatives: expected 0 <= rate < 1, got "
                              f"{self.allowed_false_negatives!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        out["hidden"] = list(self.hidden)
        return out


class _MLP(nn.Module):
    """``θ (D,)`` standardised → validity logit ``()``. One example; callers ``vmap``."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        for h in self.hidden:
            z = nn.relu(nn.Dense(h)(z))
        return nn.Dense(1)(z)[0]


@dataclasses.dataclass
class ClassifierResult:
    """Training record of a :class:`ValidityClassifier`.

    Attributes:
        epochs, best_epoch: epochs run and the epoch whose weights were kept.
        train_loss, val_loss: per-epoch (balanced) binary cross-entropies.
        num_valid, num_invalid: training rows of each class (train + validation).
        heldout_false_negative_rate: fraction of held-out *valid* θ below the threshold.
        heldout_true_negative_rate: fraction of held-out *invalid* θ below it (rejected).
        heldout_accuracy: balanced accuracy on held-out rows at logit 0.
        seconds: wall time (compilation included).
        compilations: traces of the epoch function (1 unless shapes changed).
    """

    epochs: int
    best_epoch: int
    train_loss: list[float]
    val_loss: list[float]
    num_valid: int
    num_invalid: int
    heldout_false_negative_rate: float
    heldout_true_negative_rate: float
    heldout_accuracy: float
    seconds: float
    compilations: int

    def summary(self) -> dict[str, Any]:
        """The result's scalars for JSON: the loss curves replaced by the best validation loss."""
        out = dataclasses.asdict(self)
        out.pop("train_loss")
        out.pop("val_loss")
        out["best_val_loss"] = self.val_loss[self.best_epoch] if self.val_loss else None
        return out


class ValidityClassifier:
    """``c(θ) = P(valid | θ)``: a trained MLP with its input standardisation and threshold.

    Args:
        config: the architecture/training config.
        params: flax parameter tree of the MLP.
        mean, std: ``(D,)`` standardisation of θ (``z = (θ - mean) / std``).
        threshold: probability threshold ``τ`` of the region ``c(θ) >= τ`` (may be None
            until :func:`choose_threshold` sets it).
        metadata: JSON-serialisable facts (saved with the classifier).
    """

    def __init__(self, config: ClassifierConfig, params: Any, mean: Any, std: Any, *,
                 threshold: float | None = None, metadata: dict[str, Any] | None = None):
        self.config = config
        self.params = params
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise ShapeError(f"mean/std: expected two (D,) arrays, got {self.mean.shape} and "
                             f"{self.std.shape}")
        self.threshold = None if threshold is None else float(threshold)
        self.metadata = dict(metadata or {})
        module = _MLP(config.hidden)
        mean_j, std_j = jnp.asarray(self.mean), jnp.asarray(self.std)

        def logits(params, theta):
            return jax.vmap(lambda t: module.apply(params, (t - mean_j) / std_j))(theta)

        self._logits = jax.jit(logits)

    @property
    def dim(self) -> int:
        """D."""
        return int(self.mean.shape[0])

    def _check(self, theta: Any) -> np.ndarray:
        arr = np.asarray(theta, dtype=np.float32)
        if arr.ndim == 1 and arr.shape[0] == self.dim:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ShapeError(f"theta: expected shape (n, {self.dim}), got {arr.shape}")
        return arr

    def logits(self, theta: Any, *, chunk: int = 65_536) -> np.ndarray:
        """Validity logits of ``theta (n, D)``. Returns ``(n,)`` float32.

        Rows are evaluated in chunks of ``chunk`` (the last one padded, so one
        compilation serves all).
        """
        theta = self._check(theta)
        n = theta.shape[0]
        if n == 0:
            return np.zeros(0, np.float32)
        size = min(chunk, n)
        out = np.empty(n, np.float32)
        for a in range(0, n, size):
            b = min(a + size, n)
            part = theta[a:b]
            if b - a < size:
                part = np.concatenate([part, np.repeat(part[-1:], size - (b - a), axis=0)])
            out[a:b] = np.asarray(self._logits(self.params, jnp.asarray(part)))[: b - a]
        return out

    def predict(self, theta: Any) -> np.ndarray:
        """``c(θ) = P(valid | θ)`` of ``theta (n, D)``. Returns ``(n,)`` float32 in [0, 1]."""
        return np.asarray(jax.nn.sigmoid(self.logits(theta)))

    def accept(self, theta: Any) -> np.ndarray:
        """``c(θ) >= threshold`` for ``theta (n, D)``. Returns ``(n,)`` bool.

        Raises:
            ConfigError: no threshold set yet.
        """
        if self.threshold is None:
            raise ConfigError("threshold: the classifier has no threshold yet; call "
                              "choose_threshold(classifier, theta_valid, ...) first")
        # Compared as the float32 probabilities choose_threshold takes its quantile of, so
        # the valid θ that set τ stays inside (a cut on the logits at logit(τ) moves it by
        # the sigmoid's rounding and can drop that θ).
        return self.predict(theta) >= np.float32(self.threshold)

    # -- files -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the classifier directory atomically (``classifier.json`` + ``params.msgpack``)."""
        from sbi_engine import __version__

        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "engine_version": __version__,
            "config": self.config.to_dict(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "threshold": self.threshold,
            "metadata": jsonable(self.metadata),
        }
        from sbi_engine.posterior import write_model_dir

        return write_model_dir(path, header, self.params, header_name="classifier.json")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ValidityClassifier:
        """Read a directory written by :meth:`save` (no pickle involved).

        Raises:
            RestrictionError: missing files, corrupted content, another format or version.
        """
        from sbi_engine.posterior import read_model_header, read_model_weights

        path = Path(path)
        header = read_model_header(path, FORMAT, FORMAT_VERSION, "params.msgpack",
                                   "ValidityClassifier.save", header="classifier.json",
                                   what="classifier", error=RestrictionError)
        try:
            config = ClassifierConfig(**{**header["config"],
                                         "hidden": tuple(header["config"]["hidden"])})
            mean = np.asarray(header["mean"], np.float32)
            std = np.asarray(header["std"], np.float32)
        except (KeyError, TypeError, ValueError) as err:
            raise RestrictionError(f"classifier {path}: classifier.json is inconsistent "
                                   f"({type(err).__name__}: {err})") from None
        state = read_model_weights(path, header, header_name="classifier.json",
                                   what="classifier", error=RestrictionError)
        # shapes only: a header that asks for a huge network allocates nothing
        template = jax.eval_shape(_MLP(config.hidden).init, jax.random.PRNGKey(0),
                                  jax.ShapeDtypeStruct(mean.shape[:1], jnp.float32))
        try:
            params = serialization.from_state_dict(template, state)
            ok = jax.tree.all(jax.tree.map(lambda a, b: np.shape(a) == np.shape(b),
                                           template, params))
        except (KeyError, ValueError, TypeError) as err:
            raise RestrictionError(f"classifier {path}: parameters do not match the config "
                                   f"({err})") from None
        if not ok:
            raise RestrictionError(f"classifier {path}: parameter shapes do not match the config")
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
        return cls(config, params, mean, std, threshold=header.get("threshold"),
                   metadata=header.get("metadata") or {})

    def __repr__(self) -> str:
        return (f"ValidityClassifier(D={self.dim}, hidden={list(self.config.hidden)}, "
                f"threshold={self.threshold})")


def _check_training_data(theta: Any, valid: Any) -> tuple[np.ndarray, np.ndarray]:
    theta = np.asarray(theta, dtype=np.float32)
    if theta.ndim != 2:
        raise ShapeError(f"theta: expected shape (n, D), got {theta.shape}")
    if not np.isfinite(theta).all():
        raise ShapeError("theta: contains NaN or inf (the parameters must be finite; "
                         "invalid *simulations* are marked in `valid`)")
    valid = np.asarray(valid)
    if valid.shape != (theta.shape[0],):
        raise ShapeError(f"valid: expected shape ({theta.shape[0]},) (one flag per theta row), "
                         f"got {valid.shape}")
    valid = valid.astype(bool)
    n_pos, n_neg = int(valid.sum()), int((~valid).sum())
    if n_pos < 2 or n_neg < 2:
        raise ShapeError(f"valid: need at least 2 valid and 2 invalid simulations to train a "
                         f"validity classifier, got {n_pos} valid and {n_neg} invalid")
    return theta, valid


def _stratified_split(key: jax.Array, valid: np.ndarray, fraction: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation); each class contributes ``fraction`` to validation
    (at least one row when it has two or more)."""
    tr, va = [], []
    for k, cls in enumerate((True, False)):
        idx = np.flatnonzero(valid == cls)
        idx = idx[np.asarray(jax.random.permutation(jax.random.fold_in(key, k), idx.size))]
        n_val = max(1, round(fraction * idx.size)) if idx.size >= 2 else 0
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.concatenate(tr), np.concatenate(va)


def _balanced_bce(logits: jax.Array, y: jax.Array, w_pos: jax.Array, w_neg: jax.Array
                  ) -> jax.Array:
    """Weighted binary cross-entropy (mean over the batch's weights)."""
    w = jnp.where(y > 0.5, w_pos, w_neg)
    loss = optax.sigmoid_binary_cross_entropy(logits, y)
    return jnp.sum(w * loss) / jnp.maximum(jnp.sum(w), 1e-12)


def train_validity_classifier(
    key: jax.Array,
    theta: Any,
    valid: Any,
    *,
    config: ClassifierConfig | None = None,
) -> tuple[ValidityClassifier, ClassifierResult]:
    """Train ``c(θ) = P(valid | θ)`` and set its threshold.

    Args:
        key: PRNG key (split, initialisation, shuffling).
        theta: ``(n, D)`` simulated parameters (e.g. prior draws).
        valid: ``(n,)`` bool, True where the simulation's output is all finite.
        config: architecture and training (:class:`ClassifierConfig`).

    Returns:
        ``(classifier, result)``; the classifier's threshold is the
        ``config.allowed_false_negatives`` quantile of ``c`` over all valid rows
        (:func:`choose_threshold`), and ``result`` reports the held-out error rates.

    Raises:
        ShapeError: bad shapes, non-finite θ, fewer than 2 rows of a class.
    """
    config = config or ClassifierConfig()
    theta, valid = _check_training_data(theta, valid)
    t0 = time.perf_counter()
    k_split, k_init, k_epochs = jax.random.split(key, 3)
    tr, va = _stratified_split(k_split, valid, config.validation_fraction)
    mean = theta[tr].mean(axis=0)
    std = theta[tr].std(axis=0)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0).astype(np.float32)
    module = _MLP(config.hidden)
    params = module.init(k_init, jnp.zeros(theta.shape[1], jnp.float32))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)

    y = valid.astype(np.float32)
    n_pos = max(float(y[tr].sum()), 1.0)
    n_neg = max(float(tr.size - y[tr].sum()), 1.0)
    if config.balance:  # each class carries half of the total weight
        w_pos, w_neg = 0.5 * tr.size / n_pos, 0.5 * tr.size / n_neg
    else:
        w_pos = w_neg = 1.0
    weights = jnp.asarray([w_pos, w_neg], jnp.float32)
    z_tr = jnp.asarray((theta[tr] - mean) / std)
    y_tr = jnp.asarray(y[tr])
    z_va = jnp.asarray((theta[va] - mean) / std)
    y_va = jnp.asarray(y[va])
    opt = optax.adam(config.learning_rate)
    bs = min(config.batch_size, tr.size)
    n_batches = max(tr.size // bs, 1)
    traces = [0]

    def loss_fn(p, z, yb):
        logits = jax.vmap(lambda t: module.apply(p, t))(z)
        return _balanced_bce(logits, yb, weights[0], weights[1])

    def epoch_impl(p, opt_state, k):
        traces[0] += 1  # runs only while tracing
        idx = jax.random.permutation(k, z_tr.shape[0])[: n_batches * bs].reshape(n_batches, bs)

        def step(carry, b):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, z_tr[b], y_tr[b])
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (p, opt_state), losses = jax.lax.scan(step, (p, opt_state), idx)
        val = loss_fn(p, z_va, y_va) if z_va.shape[0] else jnp.mean(losses)
        return p, opt_state, jnp.mean(losses), val

    epoch = jax.jit(epoch_impl)
    opt_state = opt.init(params)
    best = (math.inf, 0, params)
    train_hist: list[float] = []
    val_hist: list[float] = []
    for e in range(config.max_epochs):
        params, opt_state, tl, vl = epoch(params, opt_state, jax.random.fold_in(k_epochs, e))
        tl, vl = float(tl), float(vl)
        train_hist.append(tl)
        val_hist.append(vl)
        if vl < best[0]:
            best = (vl, e, params)
        if not math.isfinite(tl) or e - best[1] >= config.stop_after_epochs:
            break
    if not math.isfinite(best[0]):
        raise ShapeError("validity classifier: the validation loss was never finite "
                         "(check theta for extreme values, or lower the learning rate)")
    clf = ValidityClassifier(config, best[2], mean, std)
    choose_threshold(clf, theta[valid], allowed_false_negatives=config.allowed_false_negatives)
    # held-out rates at the chosen threshold, and balanced accuracy at logit 0
    va_pos, va_neg = va[valid[va]], va[~valid[va]]
    acc_va = clf.accept(theta[va]) if va.size else np.zeros(0, bool)
    fnr = float(np.mean(~acc_va[valid[va]])) if va_pos.size else float("nan")
    tnr = float(np.mean(~acc_va[~valid[va]])) if va_neg.size else float("nan")
    lg = clf.logits(theta[va]) if va.size else np.zeros(0, np.float32)
    sens = float(np.mean(lg[valid[va]] >= 0)) if va_pos.size else float("nan")
    spec = float(np.mean(lg[~valid[va]] < 0)) if va_neg.size else float("nan")
    result = ClassifierResult(
        epochs=len(train_hist), best_epoch=best[1], train_loss=train_hist, val_loss=val_hist,
        num_valid=int(valid.sum()), num_invalid=int((~valid).sum()),
        heldout_false_negative_rate=fnr, heldout_true_negative_rate=tnr,
        heldout_accuracy=0.5 * (sens + spec), seconds=time.perf_counter() - t0,
        compilations=traces[0])
    clf.metadata.update({"training": result.summary()})
    return clf, result


def choose_threshold(classifier: ValidityClassifier, theta_valid: Any, *,
                     allowed_false_negatives: float = 0.0) -> float:
    """Set and return the threshold ``τ``: the ``allowed_false_negatives`` quantile of
    ``c(θ)`` over valid parameters (at most that fraction of them falls outside ``S``).

    Args:
        classifier: the classifier to update.
        theta_valid: ``(m, D)`` parameters whose simulations were valid.
        allowed_false_negatives: in ``[0, 1)``; 0 keeps every given valid θ inside.

    Raises:
        ShapeError: no valid parameters.
        ConfigError: rate outside ``[0, 1)``.
    """
    if not 0 <= allowed_false_negatives < 1:
        raise ConfigError(f"allowed_false_negatives: expected 0 <= rate < 1, got "
                          f"{allowed_false_negatives!r}")
    theta_valid = classifier._check(theta_valid)
    if theta_valid.shape[0] == 0:
        raise ShapeError("theta_valid: expected at least one valid parameter vector")
    p = classifier.predict(theta_valid)
    tau = float(np.quantile(p, allowed_false_negatives, method="lower"))
    classifier.threshold = tau
    classifier.metadata["allowed_false_negatives"] = float(allowed_false_negatives)
    return tau


class RestrictedPrior:
    """The prior restricted to ``{θ : c(θ) >= τ} ∩ C_1 ∩ ... ∩ C_k``, sampled by rejection.

    Not a :class:`~sbi_engine.priors.Prior` on purpose: it cannot be sampled inside
    ``jit`` (the number of prior draws is data-dependent), so the engine takes its
    samples as explicit θ (``simulate(..., theta=restricted.sample(key, n))``).

    Args:
        prior: the prior ``p(θ)`` (sampled in batches; its support bounds the region).
        classifier: a :class:`ValidityClassifier` with a threshold, or None (no
            validity restriction: only the constraints apply).
        constraints: callables ``theta (m, D) float32 -> (m,) bool`` (True = inside),
            evaluated only on the rows that passed the classifier, in order.
        batch_size: prior draws per rejection step at the start (grows with a low
            acceptance up to ``max_batch``).
        max_batch: cap of the batch size.
        max_draws: give up (:class:`RestrictionError`) after this many prior draws per
            :meth:`sample` call.
        min_acceptance: give up when, after at least ``min_draws`` draws, the acceptance
            rate is below this.
        min_draws: draws before the acceptance rate is judged.

    Attributes:
        acceptance: accepted / drawn over every :meth:`sample` and
            :meth:`estimate_acceptance` call so far (the estimate of ``Z``), or None.
        drawn, accepted: the counts behind it.
    """

    def __init__(self, prior: Prior, classifier: ValidityClassifier | None = None, *,
                 constraints: Sequence[Constraint] = (), batch_size: int = 10_000,
                 max_batch: int = 1_000_000, max_draws: int = 100_000_000,
                 min_acceptance: float = 1e-6, min_draws: int = 100_000):
        if not isinstance(prior, Prior):
            raise ConfigError(f"prior: expected a Prior, got {type(prior).__name__}")
        if classifier is not None:
            if classifier.dim != prior.dim:
                raise ShapeError(f"classifier: has dim {classifier.dim}, the prior {prior.dim}")
            if classifier.threshold is None:
                raise ConfigError("classifier: has no threshold; call choose_threshold first")
        for name, value in (("batch_size", batch_size), ("max_batch", max_batch),
                            ("max_draws", max_draws), ("min_draws", min_draws)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: expected a positive int, got {value!r}")
        if not 0 <= min_acceptance < 1:
            raise ConfigError(f"min_acceptance: expected 0 <= rate < 1, got {min_acceptance!r}")
        if not all(callable(c) for c in constraints):
            raise ConfigError("constraints: expected callables theta (m, D) -> (m,) bool")
        self.prior = prior
        self.classifier = classifier
        self.constraints = tuple(constraints)
        self.batch_size, self.max_batch = int(batch_size), int(max(max_batch, batch_size))
        self.max_draws, self.min_draws = int(max_draws), int(min_draws)
        self.min_acceptance = float(min_acceptance)
        self.drawn = 0
        self.accepted = 0

    @property
    def dim(self) -> int:
        """D."""
        return self.prior.dim

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drawn if self.drawn else None

    def in_support(self, theta: Any) -> np.ndarray:
        """Whether each row of ``theta (n, D)`` lies in the restricted region. ``(n,)`` bool."""
        theta = np.asarray(theta, np.float32)
        if theta.ndim != 2 or theta.shape[1] != self.dim:
            raise ShapeError(f"theta: expected shape (n, {self.dim}), got {theta.shape}")
        ok = np.asarray(self.prior.in_support(theta)) & np.isfinite(theta).all(axis=1)
        if self.classifier is not None and ok.any():
            idx = np.flatnonzero(ok)
            ok[idx] = self.classifier.accept(theta[idx])
        for constraint in self.constraints:
            if not ok.any():
                break
            idx = np.flatnonzero(ok)
            inside = np.asarray(constraint(theta[idx]), dtype=bool)
            if inside.shape != (idx.size,):
                raise ShapeError(f"constraints: a constraint returned shape {inside.shape} "
                                 f"for {idx.size} rows; expected ({idx.size},) bool")
            ok[idx] = inside
        return ok

    def log_prob(self, theta: Any) -> np.ndarray:
        """``log p(θ) - log Z`` inside the region, ``-inf`` outside. ``(n,)`` float32.

        ``Z`` is the acceptance-rate estimate; call :meth:`estimate_acceptance` (or
        :meth:`sample`) first.

        Raises:
            ConfigError: no acceptance estimate yet.
        """
        if not self.drawn:
            raise ConfigError("acceptance: no estimate of the region's prior mass yet; call "
                              "estimate_acceptance(key) or sample(key, n) first")
        if self.accepted == 0:
            raise RestrictionError("acceptance: no prior draw has been accepted, the "
                                   "normaliser of the restricted prior is unknown")
        theta = np.asarray(theta, np.float32)
        lp = np.asarray(self.prior.log_prob(theta), np.float32) - np.float32(
            math.log(self.acceptance))
        return np.where(self.in_support(theta), lp, -np.inf).astype(np.float32)

    def _draw(self, key: jax.Array, i: int, m: int) -> np.ndarray:
        return np.asarray(self.prior.sample(jax.random.fold_in(key, i), m), np.float32)

    def estimate_acceptance(self, key: jax.Array, num: int = 100_000) -> float:
        """Fraction of ``num`` prior draws inside the region (also added to the running
        :attr:`acceptance`). Returns the fraction of this call."""
        if not isinstance(num, int) or num < 1:
            raise ShapeError(f"num: expected a positive int, got {num!r}")
        acc, i, done = 0, 0, 0
        while done < num:
            m = min(self.max_batch, num - done)
            acc += int(self.in_support(self._draw(key, i, m)).sum())
            done += m
            i += 1
        self.drawn += num
        self.accepted += acc
        return acc / num

    def sample(self, key: jax.Array, n: int) -> np.ndarray:
        """Draw ``n`` samples ``(n, D)`` float32 of the restricted prior by rejection.

        The same key gives the same samples. The acceptance of this call is kept in
        ``last_acceptance``; the running one in :attr:`acceptance`.

        Raises:
            RestrictionError: acceptance below ``min_acceptance`` after ``min_draws``
                draws, or more than ``max_draws`` draws would be needed.
        """
        if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
            raise ShapeError(f"n: expected a positive integer, got {n!r}")
        n = int(n)
        kept: list[np.ndarray] = []
        total, drawn, i = 0, 0, 0
        batch = self.batch_size
        while total < n:
            cand = self._draw(key, i, batch)
            i += 1
            inside = cand[self.in_support(cand)]
            kept.append(inside)
            total += inside.shape[0]
            drawn += batch
            rate = total / drawn
            if total >= n:
                break
            if drawn >= self.min_draws and rate < self.min_acceptance:
                self._fail(n, total, drawn, f"is below min_acceptance={self.min_acceptance:g}")
            need = (n - total) / max(rate, 0.5 / drawn)
            if drawn + need > self.max_draws and drawn >= self.min_draws:
                self._fail(n, total, drawn, f"would need ~{drawn + need:.3g} prior draws, more "
                           f"than max_draws={self.max_draws:,}")
            if drawn >= self.max_draws:
                self._fail(n, total, drawn, f"reached max_draws={self.max_draws:,}")
            # grow the batch towards what is still needed (deterministic given the counts)
            batch = int(min(self.max_batch, max(self.batch_size, 1.2 * need)))
        self.drawn += drawn
        self.accepted += total
        self.last_acceptance = total / drawn
        return np.concatenate(kept)[:n]

    def _fail(self, n: int, total: int, drawn: int, why: str) -> None:
        self.drawn += drawn
        self.accepted += total
        raise RestrictionError(
            f"restricted prior: acceptance {total / drawn:.3g} ({total:,} of {drawn:,} prior "
            f"draws accepted, {n:,} wanted) {why}; the region is too small to sample by "
            "rejection from the prior. Widen it: a lower classifier threshold (a smaller "
            "allowed_false_negatives), looser constraints (e.g. a larger TSNPE epsilon), "
            "or a classifier/posterior trained on more simulations")

    def to_dict(self) -> dict[str, Any]:
        """A JSON description (prior, threshold, number of constraints, acceptance)."""
        return {"type": "restricted", "prior": self.prior.to_dict(),
                "threshold": None if self.classifier is None else self.classifier.threshold,
                "constraints": len(self.constraints), "acceptance": self.acceptance}

    def __repr__(self) -> str:
        return (f"RestrictedPrior(D={self.dim}, classifier={self.classifier is not None}, "
                f"constraints={len(self.constraints)}, acceptance={self.acceptance})")
