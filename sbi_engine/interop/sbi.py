"""The sbi (PyTorch) backend: NPE trained by sbi 0.27, behind our ``Posterior`` interface.

Neural posterior estimation (Papamakarios & Murray 2016; Greenberg et al. 2019, single
round, proposal = prior) minimises

    L(φ) = - 1/N Σ_i log q_φ(θ_i | x_i),   (θ_i, x_i) ~ p(θ) p(x | θ),

here with sbi's trainer (``sbi.inference.NPE``) and density estimators
(``sbi.neural_nets.posterior_nn``: nflows MAF, NSF, MAF-RQS), so that the JAX engine
(:mod:`sbi_engine.npe`) can be checked against the reference implementation users trust,
and so that users can train with either backend from the same config and data.

- :func:`to_sbi_prior` converts our priors to ``torch.distributions`` that sbi accepts.
- :func:`train_sbi` maps :class:`~sbi_engine.npe.NPEConfig` onto ``posterior_nn`` and
  ``NPE.train`` and returns an :class:`SbiTrainResult` (the surface of
  :class:`~sbi_engine.npe.TrainResult`).
- :class:`SbiPosterior` samples (rejecting draws outside the prior's support, as sbi's
  ``DirectPosterior`` does), evaluates ``log q(θ | x)``, finds the MAP, and saves to / loads
  from a model directory without pickle: ``posterior.json`` plus ``weights.npz`` (the
  network's ``state_dict`` as plain numeric arrays, read with ``allow_pickle=False``).

Randomness: sbi draws from torch's *global* generator (network initialisation, random
permutations, the train/validation split, minibatch order, base-distribution samples)
and accepts no ``torch.Generator``. Every torch draw here therefore runs inside
:func:`_seeded_torch`, which seeds the global CPU generator and restores its previous
state on exit (``torch.random.fork_rng``), so the caller's torch RNG is left as it was.

Differences from sbi's own defaults that this module makes on purpose:

- ``max_num_epochs``: sbi trains ``max_num_epochs + 1`` epochs (its loop runs while
  ``epoch <= max_num_epochs``); we pass ``config.max_epochs - 1`` so both backends run at
  most ``max_epochs`` epochs.
- Non-finite rows are excluded (and counted) before sbi sees the data.
- ``SbiPosterior.log_prob`` is not renormalised for the mass leaking outside the prior
  (sbi's ``DirectPosterior.log_prob`` is, by default); this matches our ``Posterior``.

sbi behaviour kept as is (it is the yardstick), which the JAX engine does differently:

- sbi splits ``n_val = N - int((1 - f) N)`` rows off for validation and evaluates them
  with ``drop_last=True`` in batches of ``min(batch_size, n_val)``, so each epoch's
  validation loss covers a random subset when ``n_val`` is not a multiple of the batch.
- nflows' MADE (sbi's ``maf`` and ``maf_rqs``) gives the first feature of every layer a
  context-free transform (bayesiains/nflows#85); only the random permutations between
  layers let every dimension depend on ``x``. With few transforms in low dimension a
  dimension can stay unconditioned for an unlucky seed.
- sbi draws its own random permutations (nflows' ``RandomPermutation``, identity
  included) from the seed, whichever random ``FlowConfig.permutation`` is asked for;
  ``"random_nonidentity"`` (the JAX default, which never repeats a layer's order) is
  accepted and trained as sbi's ``"random"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    import torch
    from sbi.inference import NPE
    from sbi.neural_nets import posterior_nn
    from sbi.utils import BoxUniform as SbiBoxUniform
    from sbi.utils import MultipleIndependent
    from torch.distributions import Distribution, MultivariateNormal, constraints
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the sbi backend needs torch and sbi: install torch==2.13.0 first, then "
        "`pip install 'sbi-engine[sbi]'`"
    ) from err

from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.flows import FlowConfig
from sbi_engine.npe import NPEConfig, TrainResult, check_training_data
from sbi_engine.posterior import (
    BasePosterior,
    PosteriorFileError,
    check_weight_sizes,
    jsonable,
    read_model_header,
    seal_header,
)
from sbi_engine.priors import (
    BoxUniform,
    Gaussian,
    LogUniform,
    Prior,
    ProductPrior,
    TruncatedGaussian,
    prior_from_dict,
    truncation_mass,
)
from sbi_engine.store import atomic_write_dir

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SbiPosterior",
    "SbiTrainResult",
    "TorchLogUniform",
    "TorchTruncatedNormal",
    "to_sbi_prior",
    "torch_device",
    "torch_device_like_jax",
    "train_sbi",
]

FORMAT = "sbi-engine-sbi-posterior"
FORMAT_VERSION = 1
_WEIGHTS = "weights.npz"

#: Our flow kinds -> sbi ``posterior_nn(model=...)`` names.
_SBI_MODELS = {"maf": "maf", "nsf": "nsf", "nsf_ar": "maf_rqs"}


# ------------------------------------------------------------------------------------
# Randomness
# ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded_torch(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the body with torch's global generators seeded by ``seed``, then restore them.

    sbi and nflows draw from the global generator and take no ``torch.Generator``; this
    is the one place the engine touches global RNG state, and it puts it back: the CPU
    generator, and the generator of ``device`` when it is a CUDA device
    (``torch.manual_seed`` seeds every device's).
    """
    cuda = [] if device is None or device.type != "cuda" else [device]
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(seed))
        yield


def _seed_from_key(key: jax.Array) -> int:
    """A 63-bit torch seed derived deterministically from a JAX PRNG key."""
    bits = np.asarray(jax.random.bits(key, (2,), jnp.uint32), dtype=np.uint64)
    return int((int(bits[0]) << 32) | int(bits[1])) & (2**63 - 1)


# ------------------------------------------------------------------------------------
# Priors
# ------------------------------------------------------------------------------------


def _t(a: Any, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _interval_support(low: torch.Tensor, high: torch.Tensor) -> constraints.Constraint:
    return constraints.independent(constraints.interval(low, high), 1)


class TorchLogUniform(Distribution):
    """Independent log-uniform ``log θ_i ~ U(log low_i, log high_i)`` on ``[low, high]``.

    Event shape ``(D,)``; ``log_prob`` is ``-inf`` outside the (closed) support, as for
    :class:`sbi_engine.priors.LogUniform`.

    Args:
        low: ``(D,)`` lower bounds, ``> 0``.
        high: ``(D,)`` upper bounds, ``> low``.
    """

    arg_constraints: dict[str, constraints.Constraint] = {}  # noqa: RUF012 - torch API
    has_rsample = False

    def __init__(self, low: Any, high: Any, validate_args: bool | None = False):
        self.low, self.high = _t(low), _t(high)
        self._log_norm = float(np.sum(np.log(np.log(np.asarray(high, np.float64))
                                             - np.log(np.asarray(low, np.float64)))))
        super().__init__(batch_shape=torch.Size(), event_shape=self.low.shape,
                         validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return _interval_support(self.low, self.high)

    def to(self, device: Any) -> TorchLogUniform:
        """Move the bounds to ``device`` (sbi moves its prior to the training device)."""
        self.low, self.high = self.low.to(device), self.high.to(device)
        return self

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        shape = torch.Size(sample_shape) + self.event_shape
        a, b = torch.log(self.low.double()), torch.log(self.high.double())
        u = torch.rand(shape, dtype=torch.float64, device=self.low.device)
        theta = torch.exp(a + (b - a) * u)
        return torch.minimum(torch.maximum(theta, self.low.double()), self.high.double()).float()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(value)
        inside = self.support.check(value)
        safe = torch.where(value > 0, value, torch.ones_like(value))
        lp = -torch.log(safe).sum(-1) - self._log_norm
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))


class TorchTruncatedNormal(Distribution):
    """Independent normals ``N(loc_i, scale_i²)`` truncated to ``[low_i, high_i]``.

    Exact inverse-CDF sampling in float64 (reflected so that the CDF is evaluated in
    the lower tail, where it keeps its relative precision); bounds may be infinite.
    Event shape ``(D,)``; ``log_prob`` is ``-inf`` outside the support.
    """

    arg_constraints: dict[str, constraints.Constraint] = {}  # noqa: RUF012 - torch API
    has_rsample = False

    def __init__(self, loc: Any, scale: Any, low: Any, high: Any,
                 validate_args: bool | None = False):
        loc64, scale64 = np.asarray(loc, np.float64), np.asarray(scale, np.float64)
        low64, high64 = np.asarray(low, np.float64), np.asarray(high, np.float64)
        a, b = (low64 - loc64) / scale64, (high64 - loc64) / scale64
        mass = truncation_mass(a, b)
        self._log_norm = float(np.sum(-np.log(scale64) - 0.5 * np.log(2 * np.pi)
                                      - np.log(mass)))
        self.loc, self.scale = _t(loc64), _t(scale64)
        self.low, self.high = _t(low64), _t(high64)
        self._a, self._b = _t(a, torch.float64), _t(b, torch.float64)
        super().__init__(batch_shape=torch.Size(), event_shape=self.loc.shape,
                         validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return _interval_support(self.low, self.high)

    def to(self, device: Any) -> TorchTruncatedNormal:
        """Move the parameters to ``device`` (sbi moves its prior to the training device)."""
        for name in ("loc", "scale", "low", "high", "_a", "_b"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def mean(self) -> torch.Tensor:
        # Truncated-normal mean: loc + scale (φ(a) - φ(b)) / (Φ(b) - Φ(a)).
        normal = torch.distributions.Normal(0.0, 1.0)
        pdf = lambda z: torch.exp(normal.log_prob(z))  # noqa: E731
        mass = torch.special.ndtr(self._b) - torch.special.ndtr(self._a)
        return (self.loc + self.scale * (pdf(self._a) - pdf(self._b)) / mass).float()

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        shape = torch.Size(sample_shape) + self.event_shape
        flip = self._a > 0  # sample -z from [-b, -a] so the CDF stays in the lower tail
        lo = torch.where(flip, -self._b, self._a)
        hi = torch.where(flip, -self._a, self._b)
        p_lo, p_hi = torch.special.ndtr(lo), torch.special.ndtr(hi)
        u = torch.rand(shape, dtype=torch.float64, device=self.loc.device)
        z = torch.special.ndtri(p_lo + (p_hi - p_lo) * u)
        z = torch.minimum(torch.maximum(z, lo), hi)
        z = torch.where(flip, -z, z)
        theta = self.loc.double() + self.scale.double() * z
        return torch.minimum(torch.maximum(theta, self.low.double()), self.high.double()).float()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(value)
        inside = self.support.check(value)
        z = (value - self.loc) / self.scale
        lp = self._log_norm - 0.5 * (z**2).sum(-1)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))


def _flatten_product(prior: Prior) -> list[Prior]:
    if isinstance(prior, ProductPrior):
        return [leaf for c in prior.components for leaf in _flatten_product(c)]
    return [prior]


def _to_torch_leaf(prior: Prior) -> Distribution:
    if isinstance(prior, BoxUniform):
        return SbiBoxUniform(_t(prior.low), _t(prior.high))
    if isinstance(prior, LogUniform):
        return TorchLogUniform(prior.low, prior.high)
    if isinstance(prior, Gaussian):
        return MultivariateNormal(_t(prior.loc), covariance_matrix=_t(prior.cov),
                                  validate_args=False)
    if isinstance(prior, TruncatedGaussian):
        return TorchTruncatedNormal(prior.loc, prior.scale, prior.low, prior.high)
    raise ConfigError(f"prior: no sbi conversion for {type(prior).__name__}; expected one "
                      "of BoxUniform, LogUniform, Gaussian, TruncatedGaussian, ProductPrior")


def to_sbi_prior(prior: Prior) -> Distribution:
    """Convert one of our priors to a ``torch.distributions.Distribution`` sbi accepts.

    ``BoxUniform`` → ``sbi.utils.BoxUniform``; ``Gaussian`` → ``MultivariateNormal``;
    ``LogUniform`` → :class:`TorchLogUniform`; ``TruncatedGaussian`` →
    :class:`TorchTruncatedNormal`; ``ProductPrior`` (nested products flattened) →
    ``sbi.utils.MultipleIndependent`` of the converted blocks.

    Args:
        prior: a prior over ``θ ∈ R^D``.

    Returns:
        A distribution with event shape ``(D,)``: ``sample((n,)) -> (n, D)`` float32,
        ``log_prob((n, D)) -> (n,)`` equal to ``prior.log_prob`` (``-inf`` outside the
        support, up to sbi's ``BoxUniform`` treating the upper bound as excluded), and
        ``support.check`` agreeing with ``prior.in_support``.

    Raises:
        ConfigError: a prior family without a conversion.
    """
    if not isinstance(prior, Prior):
        raise ConfigError(f"prior: expected an sbi_engine Prior, got {type(prior).__name__}")
    leaves = [_to_torch_leaf(p) for p in _flatten_product(prior)]
    if len(leaves) == 1:
        return leaves[0]
    return MultipleIndependent(leaves, validate_args=False)


# ------------------------------------------------------------------------------------
# Density estimator: our FlowConfig -> sbi's posterior_nn
# ------------------------------------------------------------------------------------

_NFLOWS_SPLINE_DEFAULT = 1e-3  # nflows' DEFAULT_MIN_BIN_WIDTH/HEIGHT/DERIVATIVE


def _posterior_nn_kwargs(flow: FlowConfig) -> dict[str, Any]:
    """``posterior_nn`` keyword arguments for ``flow``; unsupported options are errors."""
    if flow.embedding is not None:
        raise ConfigError("flow embedding: the sbi backend supports only the identity "
                          "embedding (embedding = None); train embeddings with the JAX backend")
    if flow.z_score_theta == "transform_to_unconstrained":
        raise ConfigError("flow z_score_theta: 'transform_to_unconstrained' is not supported "
                          "by sbi's nflows estimators; use 'independent', 'structured' or "
                          "'none', or the JAX backend")
    if flow.kind == "maf" and flow.maf_scale != "softplus":
        raise ConfigError(f"flow maf_scale: sbi's MAF uses softplus(a) + 1e-3, got "
                          f"{flow.maf_scale!r}; use maf_scale='softplus'")
    if flow.permutation not in ("random", "random_nonidentity"):
        raise ConfigError(f"flow permutation: sbi's flows use random permutations, got "
                          f"{flow.permutation!r}; use permutation='random_nonidentity' "
                          "or 'random'")
    kwargs: dict[str, Any] = dict(
        model=_SBI_MODELS[flow.kind],
        z_score_theta=flow.z_score_theta,
        z_score_x=flow.z_score_x,
        hidden_features=flow.hidden,
        num_transforms=flow.transforms,
        num_blocks=flow.blocks,
    )
    if flow.kind in ("nsf", "nsf_ar"):
        kwargs.update(num_bins=flow.bins, tail_bound=flow.tail_bound)
    if flow.kind == "nsf_ar":
        kwargs.update(min_bin_width=flow.min_bin_width, min_bin_height=flow.min_bin_height,
                      min_derivative=flow.min_derivative)
    elif flow.kind == "nsf":
        for name in ("min_bin_width", "min_bin_height", "min_derivative"):
            if getattr(flow, name) != _NFLOWS_SPLINE_DEFAULT:
                raise ConfigError(f"flow {name}: sbi's 'nsf' fixes it at "
                                  f"{_NFLOWS_SPLINE_DEFAULT:g}, got {getattr(flow, name)!r}")
    return kwargs


def _build_net(flow: FlowConfig, batch_theta: torch.Tensor, batch_x: torch.Tensor):
    """Build sbi's estimator for ``flow`` from a batch ``(n, D)``, ``(n, X)`` (z-scoring)."""
    builder = posterior_nn(**_posterior_nn_kwargs(flow))
    return builder(batch_theta, batch_x)


class _NullTracker:
    """An sbi ``Tracker`` that records nothing (sbi's default writes ./sbi-logs)."""

    log_dir = None

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def add_figure(self, name: str, figure: Any, step: int | None = None) -> None:
        pass

    def flush(self) -> None:
        pass


# ------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------


#: What :func:`train_sbi` returns: the same :class:`~sbi_engine.npe.TrainResult` as the JAX
#: trainer, holding an :class:`SbiPosterior`; ``compilations`` is 0 (torch runs eagerly).
SbiTrainResult = TrainResult


def train_sbi(
    theta: Any,
    x: Any,
    *,
    prior: Prior | None,
    config: NPEConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
) -> SbiTrainResult:
    """Train NPE with sbi's trainer and estimators, configured from our ``NPEConfig``.

    ``config.flow`` maps to ``posterior_nn(model=...)`` (``maf`` → ``"maf"``, ``nsf`` →
    ``"nsf"``, ``nsf_ar`` → ``"maf_rqs"``; ``hidden``, ``transforms``, ``blocks``,
    ``bins``, ``tail_bound``, spline floors, ``z_score_theta``, ``z_score_x``), and the
    training fields to ``NPE.train`` (``batch_size`` → ``training_batch_size``,
    ``learning_rate``, ``validation_fraction``, ``stop_after_epochs``, ``clip_norm`` →
    ``clip_max_norm``, ``max_epochs`` → ``max_num_epochs = max_epochs - 1``, because sbi
    runs one epoch more than its cap).

    Args:
        theta: ``(N, D)`` parameters drawn from ``prior``.
        x: ``(N, *X)`` simulated data; rows with NaN/inf (in ``x`` or ``θ``) are excluded
            and counted. ``x`` is flattened to ``(N, prod(X))`` for sbi's estimators.
        prior: the prior θ was drawn from (converted with :func:`to_sbi_prior`; the
            posterior rejects samples outside its support). ``None``: no rejection.
        config: training configuration (sbi defaults).
        seed: seeds network initialisation, permutations, the validation split and the
            minibatch order (torch's global generator, restored afterwards).
        progress: let sbi print its epoch counter.
        device: torch device sbi trains on (sbi's ``NPE(device=...)``): ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``. The trained network is moved back to the CPU, so
            the posterior samples and saves there whatever trained it.

    Returns:
        An :class:`SbiTrainResult` whose posterior holds the best validation weights.

    Raises:
        ShapeError: bad shapes, prior dimension mismatch, too few finite rows, or a
            validation loss that was never finite.
        ConfigError: a flow option sbi's estimators do not offer, ``max_epochs < 2``, or
            a device torch cannot name or does not see.
    """
    config = config or NPEConfig()
    if not isinstance(config, NPEConfig):
        raise ConfigError(f"config: expected an NPEConfig, got {type(config).__name__}")
    _posterior_nn_kwargs(config.flow)  # fail on unsupported options before any work
    dev = torch_device(device)
    if config.max_epochs < 2:
        raise ConfigError(f"npe max_epochs: the sbi backend needs at least 2 (sbi runs "
                          f"max_num_epochs + 1 epochs with max_num_epochs >= 1), got "
                          f"{config.max_epochs}")
    theta, x = check_training_data(theta, x)
    if prior is not None and prior.dim != theta.shape[1]:
        raise ShapeError(f"theta: {theta.shape[1]} columns but the prior has dimension "
                         f"{prior.dim}")
    x_shape = tuple(int(s) for s in x.shape[1:])
    x_flat = x.reshape(x.shape[0], -1)
    keep = np.isfinite(theta).all(axis=1) & np.isfinite(x_flat).all(axis=1)
    excluded = int((~keep).sum())
    theta, x_flat = theta[keep], x_flat[keep]
    n = theta.shape[0]
    n_train = int((1 - config.validation_fraction) * n)  # sbi's split
    if n_train < 1 or n - n_train < 1:
        raise ShapeError(f"theta/x: need enough finite rows for a training and a validation "
                         f"set (validation_fraction={config.validation_fraction}), got {n}")

    sbi_prior = None if prior is None else to_sbi_prior(prior)
    flow = config.flow

    def builder(batch_theta, batch_x):
        return _build_net(flow, batch_theta, batch_x)

    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())
    t0 = time.perf_counter()
    with _seeded_torch(seed, dev), quiet, warnings.catch_warnings():
        # We report epochs ourselves; sbi's warning about reaching the cap is noise here.
        warnings.filterwarnings("ignore", message="Maximum number of epochs")
        inference = NPE(prior=sbi_prior, density_estimator=builder, device=str(dev),
                        tracker=_NullTracker(), show_progress_bars=progress)
        inference.append_simulations(torch.from_numpy(theta), torch.from_numpy(x_flat),
                                     exclude_invalid_x=False)
        net = inference.train(
            training_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            validation_fraction=config.validation_fraction,
            stop_after_epochs=config.stop_after_epochs,
            max_num_epochs=config.max_epochs - 1,
            clip_max_norm=config.clip_norm,
            show_train_summary=False,
        )
    seconds = time.perf_counter() - t0
    if progress:
        print()  # sbi's counter ends with a carriage return, not a newline
    summary = inference.summary  # sbi's per-epoch history (its ``_summary`` dict)
    train_loss = [float(v) for v in summary["training_loss"]]
    val_loss = [float(v) for v in summary["validation_loss"]]
    finite = np.isfinite(val_loss)
    if not finite.any():
        raise ShapeError("training diverged: the validation loss was never finite "
                         "(check the data for extreme values, or lower the learning rate)")
    # sbi keeps the first epoch with the strictly smallest validation loss.
    best_epoch = int(np.argmin(np.where(finite, val_loss, np.inf)))
    net.to("cpu").eval()
    net.zero_grad(set_to_none=True)
    posterior = SbiPosterior(
        net, config=config, prior=prior, x_shape=x_shape,
        metadata={"npe": config.to_dict(), "backend": "sbi", "seed": int(seed),
                  "best_epoch": best_epoch, "best_val_loss": val_loss[best_epoch],
                  "num_train": n_train, "sbi_version": _sbi_version(),
                  "torch_version": torch.__version__, "device": str(dev)})
    return SbiTrainResult(posterior=posterior, train_loss=train_loss, val_loss=val_loss,
                          best_epoch=best_epoch, epochs=len(train_loss), excluded=excluded,
                          seconds=seconds, compilations=0)


def torch_device(device: str) -> torch.device:
    """The torch device ``device`` names, checked: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ConfigError: another device type, a name torch cannot parse, or a CUDA device
            this torch build or machine does not have.
    """
    bad = ConfigError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not isinstance(device, str):  # torch.device(3) would mean cuda:3
        raise bad
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise bad from err
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise bad
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"device {device!r}: torch {torch.__version__} sees no CUDA device "
                          "(a CPU-only build, or no GPU); use device='cpu'")
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {device!r}: torch sees {count} CUDA device(s), "
                          f"cuda:0 ... cuda:{count - 1}")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def torch_device_like_jax() -> tuple[str, str]:
    """Where the sbi backend trains when JAX's placement decides: ``(device, note)``.

    ``"cuda"`` when JAX's default device (``jax.default_device`` or its first device) is
    a GPU and torch sees a CUDA device, else ``"cpu"``. ``note`` is ``""``, or says why
    a run on a GPU trains sbi on the CPU (a CPU-only torch build).
    """
    dev = jax.config.jax_default_device or jax.devices()[0]
    if dev.platform != "gpu":
        return "cpu", ""
    if torch.cuda.is_available():
        return "cuda", ""
    return "cpu", (f"JAX runs on a GPU but torch {torch.__version__} sees none: the sbi "
                   "backend trains on the CPU")


def _sbi_version() -> str:
    from sbi import __version__

    return str(__version__)


# ------------------------------------------------------------------------------------
# Posterior
# ------------------------------------------------------------------------------------


class SbiPosterior(BasePosterior):
    """An sbi-trained posterior with the interface of :class:`sbi_engine.posterior.Posterior`.

    Args:
        net: sbi's conditional density estimator (``NFlowsFlow``) over ``θ (D,)`` given
            the flattened ``x (prod(X),)``.
        config: the :class:`~sbi_engine.npe.NPEConfig` it was trained with (its ``flow``
            rebuilds the network on load).
        prior: the training prior (support for rejection; may be None).
        x_shape: the shape of one observation, ``X``.
        metadata: JSON-serialisable facts about training (saved with the model).
    """

    def __init__(self, net: Any, *, config: NPEConfig, prior: Prior | None,
                 x_shape: tuple[int, ...], metadata: dict[str, Any] | None = None):
        self.net = net.eval()
        self.config = config
        self.prior = prior
        self._x_shape = tuple(int(s) for s in x_shape)
        self.metadata = dict(metadata or {})
        self.acceptance_rate = None

    @property
    def theta_dim(self) -> int:
        return int(self.net.input_shape.numel())

    @property
    def x_shape(self) -> tuple[int, ...]:
        return self._x_shape

    def _condition(self, x: np.ndarray) -> torch.Tensor:
        """``(*X,)`` -> ``(1, prod X)``; ``(m, *X)`` -> ``(m, prod X)``."""
        flat = int(np.prod(self.x_shape, dtype=np.int64))
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, flat))

    def _log_prob_rows(self, theta, x, batched):
        cond = self._condition(x)
        t = torch.from_numpy(np.ascontiguousarray(theta))
        with torch.no_grad():
            if batched:  # (1, m, D) against (m, X)
                return self.net.log_prob(t[None], cond)[0].numpy()
            return self.net.log_prob(t[:, None], cond)[:, 0].numpy()  # (m, 1, D) vs (1, X)

    def _draw(self, key, batch, x):
        cond = self._condition(x)
        with _seeded_torch(_seed_from_key(key)), torch.no_grad(), warnings.catch_warnings():
            # nflows' LULinear inverse (nsf sampling) calls a deprecated torch solver.
            warnings.filterwarnings("ignore", message="torch.triangular_solve is deprecated")
            return self.net.sample((batch,), cond)[:, 0].numpy()

    def _climb(self, theta0, x, low, high, steps, learning_rate):
        cond = self._condition(x)
        low_t, high_t = _t(low), _t(high)

        def neg_lp(t: torch.Tensor) -> torch.Tensor:
            return -self.net.log_prob(t[None, None], cond)[0, 0]

        t = torch.tensor(theta0, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([t], lr=learning_rate)
        with torch.enable_grad():
            for _ in range(steps):
                (g,) = torch.autograd.grad(neg_lp(t), t)
                t.grad = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
                opt.step()
                with torch.no_grad():
                    t.copy_(torch.minimum(torch.maximum(t, low_t), high_t))
        return t.detach().numpy().copy()

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model directory atomically (a temporary directory, then a rename).

        ``posterior.json`` holds the format, engine/sbi/torch versions, the NPEConfig,
        the prior, shapes, metadata and the SHA-256 of ``weights.npz``, which holds the
        network's ``state_dict`` (parameters and buffers: standardisation, masks,
        permutations) as plain numeric arrays.
        """
        from sbi_engine import __version__

        path = Path(path)
        buf = io.BytesIO()
        state = {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        np.savez(buf, **state)
        weights = buf.getvalue()
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "engine_version": __version__,
            "sbi_version": _sbi_version(),
            "torch_version": torch.__version__,
            "npe": self.config.to_dict(),
            "prior": None if self.prior is None else self.prior.to_dict(),
            "theta_dim": self.theta_dim,
            "x_shape": list(self.x_shape),
            "metadata": jsonable(self.metadata),
            "weights": {"file": _WEIGHTS, "sha256": hashlib.sha256(weights).hexdigest()},
        }
        seal_header(header)
        return atomic_write_dir(path, {
            "posterior.json": json.dumps(header, indent=1, sort_keys=True).encode(),
            _WEIGHTS: weights,
        })

    @classmethod
    def load(cls, path: str | os.PathLike) -> SbiPosterior:
        """Read a model directory written by :meth:`save`; nothing is unpickled.

        The network is rebuilt with the same ``posterior_nn`` builder on dummy data of
        the saved shapes, then every ``state_dict`` entry is checked (names, shapes,
        dtypes) and loaded strictly.

        Raises:
            PosteriorFileError: missing files, a wrong format or version, a checksum
                mismatch, corrupted weights, or weights that do not fit the config.
        """
        path = Path(path)
        header = read_model_header(path, FORMAT, FORMAT_VERSION, _WEIGHTS,
                                   "SbiPosterior.save / `sbi-engine train --backend sbi`")
        wfile = path / _WEIGHTS
        engine = header.get("engine_version")
        try:
            config = NPEConfig.from_dict(header["npe"])
            prior = None if header.get("prior") is None else prior_from_dict(header["prior"])
            theta_dim = header["theta_dim"]
            x_shape = tuple(header["x_shape"])
            digest = header["weights"]["sha256"]
            if not (isinstance(theta_dim, int) and theta_dim >= 1):
                raise ValueError(f"theta_dim {theta_dim!r} is not a positive int")
            if not all(isinstance(s, int) and s >= 1 for s in x_shape):
                raise ValueError(f"x_shape {list(x_shape)!r} is not a list of positive ints")
            if prior is not None and prior.dim != theta_dim:
                raise ValueError(f"prior dimension {prior.dim} != theta_dim {theta_dim}")
            _posterior_nn_kwargs(config.flow)
        except (KeyError, TypeError, ValueError) as err:  # ConfigError is a ValueError
            raise PosteriorFileError(f"model {path}: posterior.json is inconsistent "
                                     f"({type(err).__name__}: {err}); written by engine "
                                     f"{engine!r}") from None
        weights = wfile.read_bytes()
        if hashlib.sha256(weights).hexdigest() != digest:
            raise PosteriorFileError(f"model {path}: {_WEIGHTS} does not match the checksum "
                                     "in posterior.json (corrupted or replaced)")
        try:
            with np.load(io.BytesIO(weights), allow_pickle=False) as npz:
                state = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise PosteriorFileError(f"model {path}: {_WEIGHTS} is corrupted "
                                     f"({type(err).__name__}: {err})") from None
        x_dim = int(np.prod(x_shape, dtype=np.int64))
        try:  # before the network is built: a lying header must not allocate a huge one
            check_weight_sizes([a.shape for a in state.values()],
                               {"flow.hidden": config.flow.hidden, "theta_dim": theta_dim,
                                "x_shape (flattened)": x_dim},
                               {"flow.transforms": config.flow.transforms})
        except ValueError as err:
            raise PosteriorFileError(f"model {path}: posterior.json does not fit "
                                     f"{_WEIGHTS} ({err})") from None
        net = _rebuild_net(config.flow, theta_dim, x_shape)
        template = net.state_dict()
        missing = sorted(set(template) - set(state))
        extra = sorted(set(state) - set(template))
        if missing or extra:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
            raise PosteriorFileError(f"model {path}: {_WEIGHTS} does not match the network "
                                     f"of the saved config ({what})")
        for name, ref in template.items():
            arr = state[name]
            ref_dtype = ref.numpy().dtype
            if arr.shape != tuple(ref.shape) or arr.dtype != ref_dtype:
                raise PosteriorFileError(
                    f"model {path}: weight {name!r} has shape {arr.shape} and dtype "
                    f"{arr.dtype}, expected {tuple(ref.shape)} and {ref_dtype}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise PosteriorFileError(f"model {path}: weight {name!r} is not finite")
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                            strict=True)
        return cls(net, config=config, prior=prior, x_shape=x_shape,
                   metadata=header.get("metadata") or {})

    def __repr__(self) -> str:
        return (f"SbiPosterior({_SBI_MODELS[self.config.flow.kind]}, D={self.theta_dim}, "
                f"x_shape={self.x_shape})")


def _rebuild_net(flow: FlowConfig, theta_dim: int, x_shape: tuple[int, ...]):
    """The network's architecture from its config and shapes, with throwaway weights."""
    x_dim = int(np.prod(x_shape, dtype=np.int64))
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn((64, theta_dim), generator=gen)
    x = torch.randn((64, x_dim), generator=gen)
    with _seeded_torch(0), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sbi's shape warnings were shown at training
        return _build_net(flow, theta, x).eval()
