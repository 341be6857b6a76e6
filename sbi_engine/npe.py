"""Neural posterior estimation (NPE): train a conditional flow ``q(θ | x)`` on simulations.

Loss (Papamakarios & Murray 2016; Greenberg et al. 2019, with proposal = prior):

    L(φ) = - 1/N Σ_i log q_φ(θ_i | x_i),   (θ_i, x_i) ~ p(θ) p(x | θ),

whose minimiser is the posterior ``p(θ | x)``. Training follows sbi 0.27's defaults so
comparisons are fair: Adam (lr 5e-4), minibatches of 200, gradient clipping at global
norm 5, 10 % of the rows held out for validation, stop after 20 epochs without a
validation improvement, keep the best weights.

Every epoch is **one** compiled call: a ``lax.scan`` over the epoch's minibatches
(shuffled on device) followed by the validation loss, so there is no Python loop per
batch, and the epoch function compiles once (``TrainResult.compilations``). Rows whose
``x`` or ``θ`` is not finite are excluded and counted. Arrays larger than
``NPEConfig.max_device_rows`` are streamed: each epoch scans over equal device-sized
blocks drawn from a fresh permutation of the rows.
A dataset in the store that does not fit in memory is streamed from disk by
:func:`train_npe_from_dataset` (the CLI's ``train``).

Checkpoints (``checkpoint=PATH``): every ``checkpoint_every`` epochs the training
state — weights, optimiser state, epoch, best weights, loss histories — is written to
one file atomically (temporary file, fsync, rename), so a run killed at any moment
(``kill -9`` included) resumes from its last checkpoint when called again with the same
arguments, and ends with exactly the :class:`TrainResult` of an uninterrupted run:
epoch ``e`` shuffles with ``fold_in(key, e)``, so it does not depend on the epochs
before it except through the saved state. The file is one line of JSON (format, engine
version, the *identity* of the training: sha256 digests of the config, key, data,
flow, prior and initial weights; then the progress: epochs, best epoch, whether it
finished) followed by the msgpack-encoded state, whose sha256 the header holds. Nothing
is unpickled. A checkpoint of another training is refused (:class:`ConfigError`), a
damaged one too (:class:`CheckpointError`); neither is deleted.

Divergence: when the training or validation loss of an epoch is not finite, training
stops with a warning and keeps the best weights so far (``TrainResult.diverged_at``);
the checkpoint keeps the last state written before it, never non-finite weights.

Compile time: the first epoch traces and compiles the epoch program (a few seconds of
CPU for the default flows, more on a loaded machine); later epochs reuse it. So do later
trainings in the same process: the compiled programs take the standardisation
statistics as arguments and are kept by flow structure (config, shapes, prior
bijection) and optimiser settings (:mod:`sbi_engine.programs`), so the seeds of a sweep
or an experiment's runs on data of one size compile once (and their posteriors share
one compiled ``sample`` and ``log_prob``)
(``TrainResult.compilations`` is 0 for a training that reused a program;
:func:`~sbi_engine.programs.clear_compiled_programs` frees them). Separate processes
can share compilations through JAX's persistent compilation cache: the ``sbi-engine``
command turns it on (``~/.cache/sbi-engine/xla``), the library leaves it off (it is
process-wide state, so the choice is the user's):
:func:`sbi_engine.runtime.enable_compile_cache` turns it on in a script.

Truncated sequential NPE (TSNPE, Deistler, Goncalves & Macke 2022) for one observation
``x_o`` is in :func:`train_tsnpe`: round r simulates from the prior truncated to the
highest-probability region of the round r-1 posterior (``1 - epsilon`` mass), and since
that proposal is the prior restricted to a set containing the posterior's support, the
plain NPE loss on all rounds' data stays valid (no atomic correction).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.flows import ConditionalFlow, FlowConfig, build_flow_from_data
from sbi_engine.interrupt import ctrl_c_latch
from sbi_engine.posterior import Posterior, PosteriorFileError
from sbi_engine.priors import Prior
from sbi_engine.programs import RUN_ONCE, ProgramCache
from sbi_engine.store import atomic_write_bytes, json_sha256, jsonable

__all__ = [
    "CheckpointError",
    "NPEConfig",
    "TrainResult",
    "remove_checkpoint",
    "train_npe",
    "train_npe_from_dataset",
    "train_tsnpe",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NPEConfig:
    """NPE training configuration. Defaults are sbi 0.27's ``NPE.train`` defaults.

    Attributes:
        flow: the density estimator (default: sbi's ``nsf``).
        learning_rate: Adam step size.
        batch_size: rows per minibatch.
        clip_norm: clip gradients to this global norm (``None``: no clipping).
        validation_fraction: share of rows held out for early stopping.
        stop_after_epochs: patience of early stopping, in epochs.
        max_epochs: hard cap on epochs.
        max_device_rows: above this many training rows the data are streamed to the
            device chunk by chunk instead of held there whole.
    """

    flow: FlowConfig = dataclasses.field(default_factory=lambda: FlowConfig(kind="nsf"))
    learning_rate: float = 5e-4
    batch_size: int = 200
    clip_norm: float | None = 5.0
    validation_fraction: float = 0.1
    stop_after_epochs: int = 20
    max_epochs: int = 100_000
    max_device_rows: int = 5_000_000

    def __post_init__(self):
        if not isinstance(self.flow, FlowConfig):
            raise ConfigError(f"npe flow: expected a FlowConfig, got {type(self.flow).__name__}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"npe learning_rate: expected > 0, got {self.learning_rate!r}")
        for name in ("batch_size", "stop_after_epochs", "max_epochs", "max_device_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"npe {name}: expected a positive int, got {value!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"npe clip_norm: expected > 0 or None, got {self.clip_norm!r}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError("npe validation_fraction: expected 0 < fraction < 1, got "
                              f"{self.validation_fraction!r}")

    @classmethod
    def for_estimator(cls, estimator: str, **overrides: Any) -> NPEConfig:
        """Config with ``FlowConfig(kind=estimator)`` (``"nsf"``, ``"maf"``, ``"nsf_ar"``)."""
        flow_keys = {f.name for f in dataclasses.fields(FlowConfig)}
        flow_kw = {k: overrides.pop(k) for k in list(overrides) if k in flow_keys}
        return cls(flow=FlowConfig(kind=estimator, **flow_kw), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable), inverted by :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        out["flow"] = self.flow.to_dict()
        return out

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> NPEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"npe: unknown key {unknown[0]!r}; allowed: {sorted(known)}")
        spec = dict(spec)
        if "flow" in spec and not isinstance(spec["flow"], FlowConfig):
            spec["flow"] = FlowConfig.from_dict(spec["flow"])
        return cls(**spec)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_npe` returns besides the posterior.

    Attributes:
        posterior: the trained :class:`~sbi_engine.posterior.Posterior` (best weights).
        train_loss, val_loss: per-epoch mean losses (negative log-likelihood).
        best_epoch: index of the epoch whose weights were kept.
        epochs: epochs run.
        excluded: rows dropped because ``x`` or ``θ`` was not finite.
        seconds: wall time of training in this call (compilation included).
        compilations: times this call traced (compiled) the epoch function: 1, or 0
            when an earlier training in this process compiled the same program (same
            flow structure, data sizes and optimiser settings) or a finished checkpoint
            was returned; more only if shapes changed between epochs.
        resumed_from: epochs taken from a checkpoint (0: trained from scratch).
        diverged_at: the epoch whose loss was not finite, where training stopped
            (``None``: it did not diverge).
    """

    posterior: Posterior
    train_loss: list[float]
    val_loss: list[float]
    best_epoch: int
    epochs: int
    excluded: int
    seconds: float
    compilations: int
    resumed_from: int = 0
    diverged_at: int | None = None

    @property
    def best_val_loss(self) -> float:
        return self.val_loss[self.best_epoch]

    def summary(self) -> dict[str, Any]:
        """The scalars of the training (epochs, losses, rows used, times), for JSON; no curves."""
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "final_train_loss": self.train_loss[-1],
            "excluded_rows": self.excluded,
            "seconds": self.seconds,
            "seconds_per_epoch": self.seconds / max(self.epochs - self.resumed_from, 1),
            "compilations": self.compilations,
            "resumed_from": self.resumed_from,
            "diverged_at": self.diverged_at,
        }


def _finite_rows(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1)
    return np.isfinite(theta).all(axis=1) & np.isfinite(flat).all(axis=1)


def check_training_data(theta: Any, x: Any) -> tuple[np.ndarray, np.ndarray]:
    """``theta (n, D)`` and ``x (n, *X)`` as float32 arrays; a ShapeError names the bad one."""
    theta = np.asarray(theta, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    if theta.ndim != 2:
        raise ShapeError(f"theta: expected shape (n, D), got {theta.shape}")
    if x.ndim < 2 or x.shape[0] != theta.shape[0]:
        raise ShapeError(f"x: expected shape ({theta.shape[0]}, X...), one row per theta row, "
                         f"got {x.shape}")
    return theta, x


#: Up to this many validation rows, the validation loss is computed inside the epoch
#: program (one compilation, one dispatch per epoch); above it, in chunks.
_MAX_FOLDED_VALIDATION = 100_000


class _EpochPrograms:
    """The compiled epoch and validation programs of one flow structure and optimiser.

    Inside the epoch the parameters are one flat vector (``ravel_pytree``): Adam and
    global-norm clipping are elementwise / a global norm, so this is the same update,
    but the optimiser becomes a handful of fused kernels instead of a handful per
    parameter leaf (the NSF epoch program drops from ~400 to ~330 kernels and compiles
    ~10 % faster; the step time is unchanged within noise). The optimiser state
    therefore lives on the flat vector (``init_opt_state``).

    The programs take the standardisation statistics as arguments, so they serve every
    flow with the same :meth:`~ConditionalFlow.structure_key` and one set of optimiser
    settings: they are shared through :data:`_EPOCH_PROGRAMS`.
    """

    def __init__(self, flow: ConditionalFlow, config: NPEConfig):
        self.flow, self.batch_size = flow, config.batch_size
        self.traces = 0  # epoch traces, ever: each is one compilation
        parts = []
        if config.clip_norm is not None:
            parts.append(optax.clip_by_global_norm(config.clip_norm))
        parts.append(optax.adam(config.learning_rate))
        self.optimizer = optax.chain(*parts)
        self.epoch = jax.jit(self._epoch_impl, donate_argnums=(0, 1))
        self.val = jax.jit(self._val_impl)
        self.init_opt_state = jax.jit(lambda p: self.optimizer.init(ravel_pytree(p)[0]),
                                      compiler_options=RUN_ONCE)

    @staticmethod
    def key(flow: ConditionalFlow, config: NPEConfig) -> str:
        return json_sha256([flow.structure_key(), config.learning_rate, config.clip_norm,
                            config.batch_size])

    @staticmethod
    def _loss(flow, params, theta, x):
        return -jnp.mean(flow.log_prob(params, theta, x))

    def _epoch_impl(self, params, opt_state, key, theta, x, stats, theta_val=None,
                    x_val=None):
        self.traces += 1  # runs only while tracing: counts compilations
        flow = self.flow.with_statistics(stats)
        bs = self.batch_size
        n = theta.shape[0]
        n_batches = max(n // bs, 1)
        bs = min(bs, n)
        idx = jax.random.permutation(key, n)[: n_batches * bs].reshape(n_batches, bs)
        flat, unravel = ravel_pytree(params)

        def flat_loss(flat, theta_b, x_b):
            return self._loss(flow, unravel(flat), theta_b, x_b)

        def step(carry, batch_idx):
            flat, opt_state = carry
            loss, grads = jax.value_and_grad(flat_loss)(flat, theta[batch_idx], x[batch_idx])
            updates, opt_state = self.optimizer.update(grads, opt_state, flat)
            return (optax.apply_updates(flat, updates), opt_state), loss

        (flat, opt_state), losses = jax.lax.scan(step, (flat, opt_state), idx)
        params = unravel(flat)
        if theta_val is None:
            return params, opt_state, jnp.mean(losses)
        # Validation of the updated weights in the same program: one compilation and
        # one dispatch per epoch instead of two.
        return params, opt_state, jnp.mean(losses), self._loss(flow, params, theta_val, x_val)

    def _val_impl(self, params, theta, x, stats):
        return self._loss(self.flow.with_statistics(stats), params, theta, x)


#: Compiled epoch programs, shared by the trainings of one process (the seeds of a
#: sweep, an experiment's runs): each flow structure and optimiser compiles once.
_EPOCH_PROGRAMS = ProgramCache("NPE epoch")


class _EpochRunner:
    """One training's view of the compiled epoch: its flow's standardisation statistics.

    The epoch program shuffles on device, runs a ``lax.scan`` over the minibatches and
    then the validation loss (:class:`_EpochPrograms`); :attr:`traces` counts the
    compilations this training caused (0 when an earlier training compiled the program).
    """

    def __init__(self, flow: ConditionalFlow, config: NPEConfig):
        self.programs = _EPOCH_PROGRAMS.get(_EpochPrograms.key(flow, config),
                                            lambda: _EpochPrograms(flow, config))
        self._traces_before = self.programs.traces
        self._stats = flow.statistics()

    @property
    def traces(self) -> int:
        return self.programs.traces - self._traces_before

    def init_opt_state(self, params):
        """Optimiser state for ``params`` (on their flattened vector)."""
        return self.programs.init_opt_state(params)

    def epoch(self, params, opt_state, key, theta, x):
        """One epoch over ``(theta, x)``: ``(params, opt_state, mean train loss)``."""
        return self.programs.epoch(params, opt_state, key, theta, x, self._stats)

    def epoch_and_validation(self, params, opt_state, key, theta, x, theta_val, x_val):
        """One epoch, then the validation loss of the new weights, in one compiled call."""
        return self.programs.epoch(params, opt_state, key, theta, x, self._stats,
                                   theta_val, x_val)

    def validation(self, params, theta, x, chunk: int = 50_000) -> float:
        n = theta.shape[0]
        total = 0.0
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            total += float(self.programs.val(params, theta[a:b], x[a:b], self._stats)) * (b - a)
        return total / n


# -- checkpoints -------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "sbi-engine-npe-checkpoint"
CHECKPOINT_VERSION = 1
_REMOVE = "remove it to train from scratch, or pass another checkpoint path"


class CheckpointError(PosteriorFileError):
    """A training checkpoint is truncated, corrupted, or from an incompatible version."""


@dataclasses.dataclass
class _TrainState:
    """The epoch loop's state, and what a checkpoint holds (host arrays).

    ``params`` and ``opt_state`` are the weights and optimiser state after ``epoch``
    epochs as of the last checkpoint write (the loop holds the current ones on device),
    so never non-finite ones: after a divergence the histories run past ``epoch``.
    ``stop`` says why training ended (``"early_stop"``, ``"max_epochs"``,
    ``"diverged"``; ``""`` while it runs).
    """

    params: Any
    opt_state: Any
    best_params: Any
    epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = 0
    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    stop: str = ""
    diverged_at: int | None = None

    def to_tree(self) -> dict[str, Any]:
        tree = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("train_loss", "val_loss"):
            tree[name] = np.asarray(tree[name], np.float64)  # float() of float32: exact
        return tree


def _array_digest(*arrays: np.ndarray) -> str:
    """sha256 of the arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


def _same_leaves(a: Any, b: Any) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(np.shape(u) == np.shape(v) and
                                    np.result_type(u) == np.result_type(v)
                                    for u, v in zip(leaves_a, leaves_b))


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    """A training checkpoint file: one line of JSON header, then the msgpack state.

    Attributes:
        path: the file.
        identity: what must agree to resume: component name → sha256.
        every: write every this many epochs (and when training stops).
    """

    path: Path
    identity: dict[str, str]
    every: int = 1

    @classmethod
    def create(cls, path: str | os.PathLike, every: int, *, key: jax.Array,
               config: NPEConfig, flow: ConditionalFlow, prior: Prior | None, data: str,
               init_params: Any = None) -> _Checkpoint:
        """The checkpoint of one training; ``data`` is the digest of its data."""
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"checkpoint_every: expected a positive int, got {every!r}")
        init = None if init_params is None else hashlib.sha256(
            serialization.to_bytes(jax.tree.map(np.asarray, init_params))).hexdigest()
        identity = {
            "config": json_sha256(config.to_dict()),
            "key": json_sha256(np.asarray(jax.random.key_data(key))),
            "data": data,
            "flow": json_sha256([flow.config.to_dict(), flow.standardization.to_dict()]),
            "prior": json_sha256(None if prior is None else prior.to_dict()),
            "init_params": json_sha256(init),
        }
        return cls(Path(path), identity, every)

    def save(self, state: _TrainState) -> None:
        from sbi_engine import __version__

        blob = serialization.to_bytes(state.to_tree())
        header = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "engine_version": __version__,
            "identity": self.identity,
            "sha256": hashlib.sha256(blob).hexdigest(),
            # For people and tools; loading reads the state.
            "epochs": len(state.train_loss),
            "best_epoch": state.best_epoch,
            "best_val_loss": state.best_val,
            "stop": state.stop or None,
        }
        line = json.dumps(jsonable(header, nan_to_none=True), sort_keys=True).encode()
        atomic_write_bytes(self.path, line + b"\n" + blob)

    def load(self, template: _TrainState) -> _TrainState | None:
        """The saved state (shaped as ``template``), or ``None`` when there is none yet.

        Raises:
            ConfigError: the checkpoint is another training's (the differing parts named).
            CheckpointError: it is truncated, corrupted, or of another format version.
        """
        where = f"checkpoint {self.path}"
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise CheckpointError(f"{where}: cannot be read ({err}); {_REMOVE}") from None
        head, _, blob = raw.partition(b"\n")
        try:
            header = json.loads(head)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{where}: not an NPE training checkpoint; {_REMOVE}")
        if header.get("format_version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{where}: format version {header.get('format_version')!r} written by engine "
                f"{header.get('engine_version')!r}; this engine reads version "
                f"{CHECKPOINT_VERSION}; {_REMOVE}")
        found = header.get("identity") if isinstance(header.get("identity"), dict) else {}
        differ = [k for k, v in self.identity.items() if found.get(k) != v]
        if differ:
            raise ConfigError(f"{where}: written for a different training (different "
                              f"{', '.join(differ)}); {_REMOVE}")
        if hashlib.sha256(blob).hexdigest() != header.get("sha256"):
            raise CheckpointError(f"{where}: the saved state does not match its checksum "
                                  f"(truncated or corrupted); {_REMOVE}")
        try:
            tree = serialization.from_bytes(template.to_tree(), blob)
            state = _TrainState(**{**tree, "train_loss": tree["train_loss"].tolist(),
                                   "val_loss": tree["val_loss"].tolist()})
            ok = (all(_same_leaves(getattr(state, f), getattr(template, f))
                      for f in ("params", "opt_state", "best_params"))
                  and (state.stop != "" or state.epoch == len(state.train_loss)))
        except Exception as err:  # noqa: BLE001 - msgpack and flax raise many types
            raise CheckpointError(f"{where}: the saved state is unreadable "
                                  f"({type(err).__name__}); {_REMOVE}") from None
        if not ok:
            raise CheckpointError(f"{where}: the saved state does not fit this flow; {_REMOVE}")
        return state


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a finished training's checkpoint and the temporary files of writes that
    were killed midway (``.NAME.*.tmp`` beside it); call it when no training uses it."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def train_npe(
    key: jax.Array,
    theta: Any,
    x: Any,
    *,
    config: NPEConfig | None = None,
    prior: Prior | None = None,
    progress: bool = True,
    init_params: Any = None,
    flow: ConditionalFlow | None = None,
    callback: Callable[[int, float, float], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
) -> TrainResult:
    """Train NPE on simulated pairs.

    Args:
        key: PRNG key (initialisation, validation split, shuffling).
        theta: ``(N, D)`` parameters.
        x: ``(N, *X)`` simulated data; rows with NaN/inf are excluded and counted.
        config: training configuration (sbi defaults).
        prior: the prior θ was drawn from; the posterior rejects samples outside its
            support, and ``flow.z_score_theta="transform_to_unconstrained"`` uses its bijection.
        progress: show a progress bar (epoch, train/validation loss).
        init_params: start from these flow parameters (e.g. a previous round's).
        flow: reuse this built flow (and its standardisation) instead of fitting a new one.
        callback: ``callback(epoch, train_loss, val_loss)`` after every epoch (after
            the epoch's checkpoint; epochs taken from a checkpoint are not replayed).
        checkpoint: a file holding the training state, written atomically every
            ``checkpoint_every`` epochs and when training stops. If it exists, training
            resumes from it, with the result an uninterrupted run would give; if it
            records a finished training, that result is returned without training.
        checkpoint_every: epochs between checkpoint writes.

    Returns:
        A :class:`TrainResult` holding the posterior with the best validation weights.

    Raises:
        ShapeError: bad shapes, fewer than 2 usable rows, or no epoch with a finite
            validation loss.
        ConfigError: ``checkpoint`` was written by a different training.
        CheckpointError: ``checkpoint`` is truncated or corrupted.

    Warns:
        RuntimeWarning: a loss became non-finite; training stopped (``diverged_at``).
    """
    config = config or NPEConfig()
    theta, x = check_training_data(theta, x)
    data_digest = None if checkpoint is None else _array_digest(theta, x)
    keep = _finite_rows(theta, x)
    excluded = int((~keep).sum())
    theta, x = theta[keep], x[keep]
    n = theta.shape[0]
    n_val = max(1, int(config.validation_fraction * n))  # as sbi: floor
    if n - n_val < 2:  # the z-score needs two training rows
        raise ShapeError(f"theta/x: need at least 3 finite rows to train (2 to train on, 1 to "
                         f"validate), got {n}")
    k_split, k_init, k_epochs = jax.random.split(key, 3)
    perm = np.asarray(jax.random.permutation(k_split, n))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    theta_tr, x_tr = theta[train_idx], x[train_idx]
    theta_val, x_val = jnp.asarray(theta[val_idx]), jnp.asarray(x[val_idx])
    if flow is None:
        flow = build_flow_from_data(config.flow, theta_tr, x_tr, prior=prior)
    params = init_params if init_params is not None else flow.init(k_init)
    ckpt = None if checkpoint is None else _Checkpoint.create(
        checkpoint, checkpoint_every, key=key, config=config, flow=flow, prior=prior,
        data=data_digest, init_params=init_params)
    if theta_tr.shape[0] > config.max_device_rows:
        source = _block_source(theta_tr, x_tr, config.max_device_rows, config.batch_size)
    else:
        source = (jnp.asarray(theta_tr), jnp.asarray(x_tr))
    return _fit(flow, params, source, theta_val, x_val, k_epochs, config=config, prior=prior,
                progress=progress, callback=callback, excluded=excluded,
                num_train=int(n - n_val), checkpoint=ckpt)


def _eta(st: _TrainState, epoch: int, config: NPEConfig, stamps: list[float]) -> str:
    """The progress bar's ETA: when training stops if the validation loss does not improve.

    Early stopping makes the end unknowable in advance; what is known is the last epoch
    it can run without a new best (patience, or ``max_epochs``), so the bar shows that
    many epochs at the current pace, the first epoch (compilation) excluded.
    """
    if st.stop:
        return ""
    left = min(config.stop_after_epochs - (epoch - st.best_epoch), config.max_epochs - epoch - 1)
    steady = np.diff(stamps[1:]) if len(stamps) > 2 else np.diff(stamps)
    seconds = left * float(np.mean(steady[-20:]))
    return f", ETA {_clock(seconds)} ({left} epoch{'s' if left != 1 else ''}) unless val improves"


def _clock(seconds: float) -> str:
    """``75.0 -> '1:15'``, ``4000 -> '1:06:40'``."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


#: Streamed training data: ``source(epoch_key)`` yields equal-shaped ``(θ, x)`` blocks.
BlockSource = Callable[[jax.Array], Iterator[tuple[np.ndarray, np.ndarray]]]


def _fit(flow, params, source, theta_val, x_val, k_epochs, *, config, prior, progress,
         callback, excluded, num_train, checkpoint=None) -> TrainResult:
    """The epoch loop with early stopping shared by in-memory and streamed training.

    ``source`` is ``(θ, x)`` device arrays held whole, or a :data:`BlockSource`.
    ``checkpoint`` (a :class:`_Checkpoint`) is resumed from if it exists, and written
    every ``checkpoint.every`` epochs and when training stops.
    """
    # Strong float32 leaves: a weak-typed leaf would change type after one update and
    # force a second compilation of the epoch function.
    params = jax.tree.map(lambda a: jnp.array(a, dtype=jnp.float32), params)
    runner = _EpochRunner(flow, config)
    opt_state = runner.init_opt_state(params)

    def host(tree):  # copies: the epoch program consumes (donates) its input buffers
        return jax.tree.map(np.array, tree)

    initial = host(params)
    st = _TrainState(params=initial, opt_state=host(opt_state), best_params=initial)
    saved = checkpoint.load(st) if checkpoint is not None else None
    if saved is not None:
        st = saved
        params, opt_state = jax.tree.map(jnp.array, (st.params, st.opt_state))
    resumed = len(st.train_loss)
    stream = callable(source)
    fold_validation = not stream and theta_val.shape[0] <= _MAX_FOLDED_VALIDATION
    t0 = time.perf_counter()
    stamps = [t0]  # end of every epoch of this call, for the ETA
    bar = tqdm(total=config.max_epochs, initial=resumed, desc="train NPE", unit="epoch",
               disable=not progress or bool(st.stop), dynamic_ncols=True,
               bar_format="{desc}: {n_fmt} epochs [{elapsed}, {rate_fmt}] {postfix}")
    with ctrl_c_latch() as interrupted:
        try:
            epoch = resumed
            while not st.stop:
                k_epoch = jax.random.fold_in(k_epochs, epoch)
                if stream:
                    losses = []
                    for i, (theta_b, x_b) in enumerate(source(k_epoch)):
                        params, opt_state, loss = runner.epoch(
                            params, opt_state, jax.random.fold_in(k_epoch, i),
                            jnp.asarray(theta_b), jnp.asarray(x_b))
                        losses.append(loss)
                    train_loss = float(np.mean(jax.device_get(losses)))
                    val_loss = runner.validation(params, theta_val, x_val)
                elif fold_validation:
                    params, opt_state, loss, val = runner.epoch_and_validation(
                        params, opt_state, k_epoch, *source, theta_val, x_val)
                    train_loss, val_loss = float(loss), float(val)
                else:
                    params, opt_state, loss = runner.epoch(params, opt_state, k_epoch, *source)
                    train_loss = float(loss)
                    val_loss = runner.validation(params, theta_val, x_val)
                st.train_loss.append(train_loss)
                st.val_loss.append(val_loss)
                finite = math.isfinite(train_loss) and math.isfinite(val_loss)
                if finite and val_loss < st.best_val:
                    st.best_val, st.best_epoch, st.best_params = val_loss, epoch, host(params)
                if not finite:
                    st.stop, st.diverged_at = "diverged", epoch
                elif epoch - st.best_epoch >= config.stop_after_epochs:
                    st.stop = "early_stop"
                elif epoch + 1 == config.max_epochs:
                    st.stop = "max_epochs"
                if checkpoint is not None and (st.stop or (epoch + 1) % checkpoint.every == 0):
                    if finite:  # after a divergence, keep the last state written
                        st.params, st.opt_state, st.epoch = host(params), host(opt_state), epoch + 1
                    checkpoint.save(st)
                bar.update(1)
                stamps.append(time.perf_counter())
                bar.set_postfix_str(f"train {train_loss:.4f}, val {val_loss:.4f}, "
                                    f"best {st.best_val:.4f} @ {st.best_epoch}"
                                    + _eta(st, epoch, config, stamps))
                if callback is not None:
                    callback(epoch, train_loss, val_loss)
                epoch += 1
                interrupted()  # a Ctrl-C swallowed during the epoch stops here
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    if st.diverged_at is not None:
        e = st.diverged_at
        what = (f"training diverged at epoch {e} (train loss {st.train_loss[e]:.4g}, "
                f"validation loss {st.val_loss[e]:.4g})")
        advice = "lower the learning rate or check the data for extreme values"
        if not math.isfinite(st.best_val):
            raise ShapeError(f"{what}: the validation loss was never finite; {advice}")
        warnings.warn(f"{what}; stopped and kept the weights of epoch {st.best_epoch} "
                      f"(validation loss {st.best_val:.4f}); {advice}", RuntimeWarning,
                      stacklevel=3)
    posterior = Posterior(flow, st.best_params, prior=prior,
                          metadata={"npe": config.to_dict(), "best_epoch": st.best_epoch,
                                    "best_val_loss": st.best_val, "num_train": num_train})
    return TrainResult(posterior=posterior, train_loss=st.train_loss, val_loss=st.val_loss,
                       best_epoch=st.best_epoch, epochs=len(st.train_loss), excluded=excluded,
                       seconds=seconds, compilations=runner.traces, resumed_from=resumed,
                       diverged_at=st.diverged_at)


def train_npe_from_dataset(
    key: jax.Array,
    dataset: Any,
    *,
    config: NPEConfig | None = None,
    prior: Prior | None = None,
    progress: bool = True,
    callback: Callable[[int, float, float], None] | None = None,
    memory_rows: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
) -> TrainResult:
    """Train NPE on a simulated dataset in the store, streaming it if it is large.

    A dataset of at most ``memory_rows`` rows (default ``config.max_device_rows``) is
    read whole and passed to :func:`train_npe`. A larger one is never held in memory:

    - one verified pass over the store's chunks draws the validation rows (each valid
      row independently with probability ``config.validation_fraction``, so about 10 %;
      they are kept in memory) and fits the standardisation on the first
      ``memory_rows`` training rows (rows are i.i.d. simulations, so that is a random
      sample of them);
    - every epoch reads the chunks in a random order and trains on fixed-size blocks of
      ``⌊memory_rows / batch⌋ · batch`` valid training rows (one compiled epoch
      program serves every block); the rows left over at the end of an epoch (fewer
      than one block) are skipped in that epoch, and differ from epoch to epoch.

    Args:
        key: PRNG key (validation split, initialisation, shuffling).
        dataset: a :class:`~sbi_engine.store.Dataset` or the path of one.
        config: training configuration.
        prior: the prior; default: the one recorded in the dataset's manifest.
        progress: show a progress bar.
        callback: ``callback(epoch, train_loss, val_loss)`` after every epoch.
        memory_rows: most rows held in memory at once (and rows per streamed block).
        checkpoint, checkpoint_every: resume from / write a checkpoint, as
            :func:`train_npe`.

    Returns:
        A :class:`TrainResult`, as :func:`train_npe`.

    Raises:
        DatasetError: the dataset is missing, incomplete or a chunk is corrupted.
        ShapeError: too few valid rows to train, or no finite validation loss.
        ConfigError, CheckpointError: as :func:`train_npe`.
    """
    from sbi_engine.priors import prior_from_dict
    from sbi_engine.store import Dataset, load_dataset

    config = config or NPEConfig()
    if not isinstance(dataset, Dataset):
        dataset = load_dataset(dataset, lazy=True)
    if prior is None:
        prior = prior_from_dict(dataset.manifest["prior"])
    memory_rows = config.max_device_rows if memory_rows is None else int(memory_rows)
    if memory_rows < config.batch_size:
        raise ConfigError(f"memory_rows: expected at least one batch ({config.batch_size} rows), "
                          f"got {memory_rows}")
    if len(dataset) <= memory_rows:
        return train_npe(key, dataset.theta, dataset.x, config=config, prior=prior,
                         progress=progress, callback=callback, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every)

    k_split, k_init, k_epochs = jax.random.split(key, 3)

    def train_mask(chunk):
        """Rows of ``chunk`` that train, and rows that validate (both finite)."""
        finite = chunk.valid & np.all(np.isfinite(chunk.theta), axis=1)
        held = np.asarray(jax.random.uniform(jax.random.fold_in(k_split, chunk.index),
                                             (chunk.stop - chunk.start,)))
        held = held < config.validation_fraction
        return finite & ~held, finite & held

    val_theta, val_x, fit_theta, fit_x = [], [], [], []
    n_train = n_fit = excluded = 0
    for chunk in dataset.iter_chunks(verify=True):
        train, val = train_mask(chunk)
        excluded += int((~(train | val)).sum())
        n_train += int(train.sum())
        val_theta.append(chunk.theta[val])
        val_x.append(chunk.x[val])
        if n_fit < memory_rows:
            fit_theta.append(chunk.theta[train][: memory_rows - n_fit])
            fit_x.append(chunk.x[train][: memory_rows - n_fit])
            n_fit += fit_theta[-1].shape[0]
    theta_val, x_val = np.concatenate(val_theta), np.concatenate(val_x)
    if n_train < 1 or theta_val.shape[0] < 1:
        raise ShapeError(f"dataset {dataset.path}: {n_train} training and {theta_val.shape[0]} "
                         "validation rows with finite values; need at least one of each")
    flow = build_flow_from_data(config.flow, np.concatenate(fit_theta), np.concatenate(fit_x),
                                prior=prior)
    del fit_theta, fit_x
    bs = config.batch_size
    block = min((memory_rows // bs) * bs, (n_train // bs) * bs or n_train)

    def source(k_epoch):
        theta_buf, x_buf, held = [], [], 0
        for j in np.asarray(jax.random.permutation(k_epoch, dataset.num_chunks)):
            chunk = dataset.read_chunk(int(j), verify=False)  # verified by the first pass
            train, _ = train_mask(chunk)
            theta_buf.append(chunk.theta[train])
            x_buf.append(chunk.x[train])
            held += int(train.sum())
            while held >= block:
                theta_all, x_all = np.concatenate(theta_buf), np.concatenate(x_buf)
                yield theta_all[:block], x_all[:block]
                theta_buf, x_buf, held = [theta_all[block:]], [x_all[block:]], held - block

    ckpt = None if checkpoint is None else _Checkpoint.create(
        checkpoint, checkpoint_every, key=key, config=config, flow=flow, prior=prior,
        data=json_sha256({"chunk_sha256": dataset.manifest.get("chunk_sha256"),
                          "num": len(dataset), "memory_rows": memory_rows}))
    return _fit(flow, flow.init(k_init), source, jnp.asarray(theta_val), jnp.asarray(x_val),
                k_epochs, config=config, prior=prior, progress=progress, callback=callback,
                excluded=excluded, num_train=n_train, checkpoint=ckpt)


def _block_source(theta: np.ndarray, x: np.ndarray, max_rows: int, batch: int) -> BlockSource:
    """Stream in-memory rows ``theta (n, D)``, ``x (n, X)`` to the device in blocks.

    Every block has the same size, a multiple of ``batch`` of at most ``max_rows`` rows
    (one compilation serves all). Each epoch draws its blocks from a fresh permutation of
    the rows, so the rows left over (fewer than one block) differ from epoch to epoch
    instead of never training.
    """
    n = theta.shape[0]
    size = min(max(batch, (max_rows // batch) * batch), n)
    count = n // size

    def source(k_epoch):
        order = np.asarray(jax.random.permutation(k_epoch, n))
        for i in range(count):
            rows = np.sort(order[i * size:(i + 1) * size])  # in memory order: a faster copy
            yield theta[rows], x[rows]

    return source


def train_tsnpe(
    key: jax.Array,
    simulator,
    x_o: Any,
    *,
    rounds: int = 2,
    simulations_per_round: int | list[int] = 1000,
    config: NPEConfig | None = None,
    epsilon: float = 1e-4,
    progress: bool = True,
    simulate_fn: Callable | None = None,
) -> tuple[Posterior, list[dict[str, Any]]]:
    """Truncated sequential NPE for one observation (Deistler et al. 2022).

    Round 1 simulates from the prior; each later round from the prior truncated to
    the highest-probability region of the current posterior that holds ``1 - epsilon``
    of its mass (found by rejection from the prior with the posterior's log density
    threshold). All rounds' data train one NPE with the plain loss.

    Args:
        key: PRNG key.
        simulator: a :class:`~sbi_engine.simulator.Simulator` (its prior is used).
        x_o: ``(*X,)`` the observation.
        rounds: number of rounds (1 = amortised NPE).
        simulations_per_round: an int, or one int per round.
        config: NPE training configuration.
        epsilon: mass outside the truncation region.
        progress: progress bars.
        simulate_fn: ``simulate_fn(key, theta (n, D)) -> x (n, X)``; default
            ``simulator.simulate``.

    Returns:
        The final posterior and one summary dict per round.
    """
    from sbi_engine.posterior import hpd_threshold

    config = config or NPEConfig()
    prior = simulator.prior
    x_o = np.asarray(x_o, dtype=np.float32)
    if not np.isfinite(x_o).all():
        raise ShapeError("x_o: the observation contains NaN or inf")
    per_round = ([int(simulations_per_round)] * rounds
                 if isinstance(simulations_per_round, int) else list(simulations_per_round))
    if len(per_round) != rounds:
        raise ConfigError(f"simulations_per_round: expected {rounds} values, got {len(per_round)}")
    simulate_fn = simulate_fn or simulator.simulate
    thetas, xs, log = [], [], []
    posterior = None
    params = None
    for r in range(rounds):
        k_round = jax.random.fold_in(key, r)
        k_prop, k_sim, k_train = jax.random.split(k_round, 3)
        n = per_round[r]
        if posterior is None:
            theta_r = np.asarray(prior.sample(k_prop, n))
            accept_rate = 1.0
        else:
            threshold = hpd_threshold(posterior, k_prop, x_o, epsilon=epsilon)
            theta_r, accept_rate = _sample_truncated_prior(
                jax.random.fold_in(k_prop, 1), prior, posterior, x_o, threshold, n)
        x_r = np.asarray(simulate_fn(k_sim, theta_r))
        thetas.append(theta_r)
        xs.append(x_r)
        result = train_npe(k_train, np.concatenate(thetas), np.concatenate(xs), config=config,
                           prior=prior, progress=progress, init_params=params,
                           flow=None if posterior is None else posterior.flow)
        posterior, params = result.posterior, result.posterior.params
        log.append({"round": r + 1, "simulations": n, "proposal_acceptance": accept_rate,
                    **result.summary()})
    return posterior, log


def _sample_truncated_prior(key, prior, posterior, x_o, threshold, n, batch=100_000,
                            max_draws=100_000_000):
    """Draw ``n`` prior samples with ``log q(θ | x_o) >= threshold`` by rejection."""
    accepted, drawn, i = [], 0, 0
    total = 0
    while total < n:
        if drawn >= max_draws:
            raise ShapeError(
                f"truncated prior: acceptance {total / drawn:.2e} after {drawn} prior draws; "
                "the posterior region is too small to find by rejection")
        cand = prior.sample(jax.random.fold_in(key, i), batch)
        lp = np.asarray(posterior.log_prob(cand, x_o))
        keep = np.asarray(cand)[lp >= threshold]
        accepted.append(keep)
        total += keep.shape[0]
        drawn += batch
        i += 1
    return np.concatenate(accepted)[:n], total / drawn
