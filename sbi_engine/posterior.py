"""The trained posterior ``q(θ | x)``: sampling, densities, MAP, and files without pickle.

``Posterior`` wraps a conditional flow and its parameters with the prior it was trained
under. Samples outside the prior's support are rejected (as sbi does for bounded
priors); the acceptance rate is recorded in ``posterior.acceptance_rate``. When it is
very low the flow leaks mass outside the prior and rejection would take forever:
below ``min_acceptance`` sampling stops with a clear message that offers the usual
fallbacks (``reject_outside_prior=False``, or training in unconstrained space with
``FlowConfig(z_score_theta="transform_to_unconstrained")``).

Files: a model is a directory ``MODEL/`` holding ``posterior.json`` (format, engine
version, flow config, standardisation, prior, shapes, metadata) and ``params.msgpack``
(the flax parameter tree, msgpack-encoded arrays). Loading never unpickles; a file from
an unknown format version or with a parameter tree that does not match its config is
refused with the reason.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from sbi_engine.errors import SbiEngineError, ShapeError
from sbi_engine.flows import ConditionalFlow, FlowConfig, Standardization, build_flow
from sbi_engine.priors import Prior, prior_from_dict
from sbi_engine.programs import ProgramCache
from sbi_engine.store import atomic_write_dir, json_sha256, jsonable

__all__ = [
    "BasePosterior",
    "Posterior",
    "PosteriorFileError",
    "SamplingError",
    "hpd_threshold",
    "jsonable",
    "load_posterior",
]

FORMAT = "sbi-engine-posterior"
FORMAT_VERSION = 1


class SamplingError(SbiEngineError):
    """Rejection sampling cannot make progress (the posterior leaks outside the prior)."""


class PosteriorFileError(SbiEngineError):
    """A model directory is missing, corrupted, or from an incompatible version."""


class BasePosterior(abc.ABC):
    """What every trained posterior offers: checks, densities, rejection sampling, MAP.

    Backends (JAX flows here, sbi's torch flows in :mod:`sbi_engine.interop.sbi`)
    implement three primitives — ``_draw`` (unconstrained draws), ``_log_prob_rows``
    and ``_climb`` (the MAP ascent) — and inherit the rest, so validation, rejection
    outside the prior and batching over observations behave identically.

    Attributes:
        prior: the training prior (support for rejection; may be None).
        metadata: JSON-serialisable facts about training (saved with the model).
        acceptance_rate: the fraction of draws inside the support in the last ``sample``.
    """

    prior: Prior | None
    metadata: dict[str, Any]
    acceptance_rate: float | None

    @property
    @abc.abstractmethod
    def theta_dim(self) -> int:
        """D."""

    @property
    @abc.abstractmethod
    def x_shape(self) -> tuple[int, ...]:
        """The shape of one observation, X."""

    @abc.abstractmethod
    def _draw(self, key: jax.Array, batch: int, x: np.ndarray) -> np.ndarray:
        """``batch`` draws for one checked observation ``x (*X,)``. Returns ``(batch, D)``."""

    @abc.abstractmethod
    def _log_prob_rows(self, theta: np.ndarray, x: np.ndarray, batched: bool) -> np.ndarray:
        """``log q`` of checked ``theta (m, D)`` given ``x (*X,)`` or ``(m, *X)``. ``(m,)``."""

    @abc.abstractmethod
    def _climb(self, theta0: np.ndarray, x: np.ndarray, low: np.ndarray, high: np.ndarray,
               steps: int, learning_rate: float) -> np.ndarray:
        """Projected Adam ascent of ``log q(θ | x)`` from ``theta0 (D,)``. Returns ``(D,)``."""

    # -- input checks --------------------------------------------------------------------

    def check_x(self, x: Any, *, field: str = "x") -> tuple[np.ndarray, bool]:
        """Validate an observation ``(*X,)`` or a batch ``(m, *X)``. Returns (array, batched).

        ``(1, *X)`` is read as one observation (as sbi does).

        Raises:
            ShapeError: wrong shape, or NaN/inf anywhere (naming ``field``).
        """
        try:
            raw = np.asarray(x)
            if raw.dtype.kind in "cUSVMm":  # complex, text, records, dates: not numbers
                raise TypeError(f"got dtype {raw.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
                arr = raw.astype(np.float32)
        except (TypeError, ValueError) as err:
            raise ShapeError(f"{field}: expected a numeric array ({err})") from None
        shape = self.x_shape
        if arr.shape == shape:
            batched = False
        elif arr.shape == (1, *shape):  # one observation with a batch axis, as sbi accepts
            arr, batched = arr[0], False
        elif arr.ndim == len(shape) + 1 and arr.shape[1:] == shape and arr.shape[0] > 0:
            batched = True
        else:
            raise ShapeError(f"{field}: expected shape {shape} or (m, {', '.join(map(str, shape))})"
                             f", got {arr.shape}")
        bad = ~np.isfinite(arr)
        if bad.any():
            where = np.argwhere(bad)[0].tolist()
            raise ShapeError(f"{field}: contains NaN or inf (first at index {where}; values "
                             "beyond float32 range count as inf); an observation must be "
                             "finite")
        return arr, batched

    def _check_theta(self, theta: Any) -> np.ndarray:
        try:
            arr = np.asarray(theta, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ShapeError(f"theta: expected a numeric array ({err})") from None
        if arr.ndim == 1 and arr.shape[0] == self.theta_dim:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != self.theta_dim:
            raise ShapeError(f"theta: expected shape (n, {self.theta_dim}), got {arr.shape}")
        return arr

    def _in_support(self, theta: np.ndarray) -> np.ndarray:
        ok = np.isfinite(theta).all(axis=1)
        if self.prior is not None:
            ok &= np.asarray(self.prior.in_support(theta))
        return ok

    # -- densities ---------------------------------------------------------------------------

    def log_prob(self, theta: Any, x: Any, *, chunk: int = 100_000) -> np.ndarray:
        """``log q(θ | x)``; ``-inf`` outside the prior's support.

        Args:
            theta: ``(n, D)``.
            x: one observation ``(*X,)`` for all rows, or ``(n, *X)``.
            chunk: rows per call of the estimator.

        Returns:
            ``(n,)`` float32 (not renormalised for the mass rejected outside the prior).
        """
        theta = self._check_theta(theta)
        x, batched = self.check_x(x)
        if batched and x.shape[0] != theta.shape[0]:
            raise ShapeError(f"x: {x.shape[0]} observations for {theta.shape[0]} theta rows")
        out = np.empty(theta.shape[0], np.float32)
        for a in range(0, theta.shape[0], chunk):
            b = min(a + chunk, theta.shape[0])
            out[a:b] = self._log_prob_rows(theta[a:b], x[a:b] if batched else x, batched)
        if self.prior is not None:
            out[~np.asarray(self.prior.in_support(theta))] = -np.inf
        return out

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, key: jax.Array, n: int, x: Any, *, reject_outside_prior: bool = True,
               min_acceptance: float = 1e-3, batch: int | None = None,
               field: str = "x") -> np.ndarray:
        """Draw ``n`` posterior samples for one observation or each of many.

        The same key gives the same samples.

        Args:
            key: PRNG key.
            n: samples per observation.
            x: ``(*X,)`` → returns ``(n, D)``; ``(m, *X)`` → returns ``(m, n, D)``.
            reject_outside_prior: drop samples outside the prior's support (default);
                the rate is kept in ``acceptance_rate``.
            min_acceptance: stop with :class:`SamplingError` when the acceptance rate
                falls below this (after at least 10,000 draws); warns below 10×.
            batch: draws per call (default ``max(n, 1024)`` rounded up to a power of two).
            field: the name the errors give ``x`` (the CLI passes ``--observation``).

        Raises:
            ShapeError: bad ``x``, or one so far outside the training data that the
                estimator returns no finite θ for it (its z-score overflows float32).
            SamplingError: acceptance below ``min_acceptance``.
        """
        if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
            raise ShapeError(f"n: expected a positive integer, got {n!r}")
        x, batched = self.check_x(x, field=field)
        if batched:
            keys = jax.random.split(key, x.shape[0])
            return np.stack([self._sample_one(keys[i], int(n), x[i], reject_outside_prior,
                                              min_acceptance, batch, f"{field}[{i}]")
                             for i in range(x.shape[0])])
        return self._sample_one(key, int(n), x, reject_outside_prior, min_acceptance, batch,
                                field)

    def _sample_one(self, key, n, x, reject, min_acceptance, batch, field):
        batch = int(batch or max(1024, 1 << (n - 1).bit_length()))

        def draw(i):
            cand = self._draw(jax.random.fold_in(key, i), batch, x)
            if i == 0 and not np.isfinite(cand).all(axis=1).any():
                raise ShapeError(
                    f"{field}: the estimator returns no finite θ for this observation "
                    f"(largest |value| {np.abs(x).max():.3g}); it lies too far outside the "
                    "simulations the estimator was trained on")
            return cand

        if not reject or self.prior is None:
            draws = [draw(i) for i in range(-(-n // batch))]
            self.acceptance_rate = 1.0
            return np.concatenate(draws)[:n]
        kept, total, drawn, i = [], 0, 0, 0
        warned = False
        while total < n:
            cand = draw(i)
            i += 1
            ok = self._in_support(cand)
            kept.append(cand[ok])
            total += int(ok.sum())
            drawn += batch
            rate = total / drawn
            if drawn >= 10_000 and rate < min_acceptance:
                self.acceptance_rate = rate
                raise SamplingError(
                    f"posterior sampling: only {rate:.2e} of samples fall inside the prior "
                    f"support after {drawn} draws (below {min_acceptance:g}); the estimator "
                    "puts its mass outside the prior. Use sample(..., "
                    "reject_outside_prior=False) to sample without rejection, or retrain with "
                    "FlowConfig(z_score_theta='transform_to_unconstrained') or more simulations")
            if drawn >= 10_000 and rate < 10 * min_acceptance and not warned:
                warnings.warn(f"posterior sampling: low acceptance {rate:.2e} inside the prior "
                              "support", stacklevel=4)
                warned = True
        self.acceptance_rate = total / drawn
        return np.concatenate(kept)[:n]

    def map(self, x: Any, *, key: jax.Array, num_init: int = 1000, steps: int = 300,
            learning_rate: float = 1e-2) -> np.ndarray:
        """Maximum a posteriori estimate for one observation ``x (*X,)``. Returns ``(D,)``.

        Starts from the best of ``num_init`` posterior samples and climbs ``log q(θ|x)``
        with Adam, projected onto the prior's support. A batch ``(m, *X)`` gives ``(m, D)``.
        """
        x, batched = self.check_x(x)
        if batched:
            keys = jax.random.split(key, x.shape[0])
            return np.stack([self.map(x[i], key=keys[i], num_init=num_init, steps=steps,
                                      learning_rate=learning_rate) for i in range(x.shape[0])])
        init = self.sample(key, num_init, x)
        theta0 = init[int(np.argmax(self.log_prob(init, x)))]
        low, high = (self.prior.support if self.prior is not None
                     else (np.full(self.theta_dim, -np.inf), np.full(self.theta_dim, np.inf)))
        theta = np.asarray(self._climb(theta0, x, np.asarray(low, np.float32),
                                       np.asarray(high, np.float32), steps, learning_rate))
        both = self.log_prob(np.stack([theta, theta0]), x)
        return theta if both[0] >= both[1] else np.asarray(theta0)


class _FlowPrograms:
    """``log_prob``, ``sample`` and the MAP ascent of one flow structure, compiled once
    per process (``climb_traces`` counts the ascent's compilations)."""

    def __init__(self, flow: ConditionalFlow):
        self.log_prob = jax.jit(lambda stats, params, theta, x:
                                flow.with_statistics(stats).log_prob(params, theta, x))
        self.sample = jax.jit(lambda stats, params, key, x, n:
                              flow.with_statistics(stats).sample(params, key, x, n),
                              static_argnums=(4,))
        self.climb_traces = 0

        def climb(stats, params, theta, x, low, high, learning_rate, steps):
            """Projected Adam ascent of ``log q(θ | x)`` from ``theta (D,)``; ``(D,)``."""
            self.climb_traces += 1  # runs only while tracing
            f = flow.with_statistics(stats)
            opt = optax.adam(learning_rate)

            def step(carry, _):
                t, s = carry
                g = jax.grad(lambda t: -f.log_prob(params, t[None], x)[0])(t)
                g = jnp.where(jnp.isfinite(g), g, 0.0)
                u, s = opt.update(g, s, t)
                return (jnp.clip(optax.apply_updates(t, u), low, high), s), None

            (t, _), _ = jax.lax.scan(step, (theta, opt.init(theta)), None, length=steps)
            return t

        self.climb = jax.jit(climb, static_argnums=(7,))


#: Compiled posterior programs by :meth:`ConditionalFlow.structure_key`.
_FLOW_PROGRAMS = ProgramCache("posterior")


class Posterior(BasePosterior):
    """A trained JAX posterior estimator (conditional flow + parameters).

    Args:
        flow: the built conditional flow (with its standardisation).
        params: the flow's parameter pytree.
        prior: the prior used in training (support for rejection; may be None).
        metadata: JSON-serialisable facts about training (saved with the model).
    """

    def __init__(self, flow: ConditionalFlow, params: Any, *, prior: Prior | None = None,
                 metadata: dict[str, Any] | None = None):
        self.flow = flow
        self.params = params
        self.prior = prior
        self.metadata = dict(metadata or {})
        self.acceptance_rate = None
        # Posteriors of one flow structure share their compiled programs (the
        # standardisation statistics are arguments): sampling the tenth model of a sweep
        # does not compile again.
        self._programs = _FLOW_PROGRAMS.get(flow.structure_key(), lambda: _FlowPrograms(flow))
        self._stats = flow.statistics()

    @property
    def theta_dim(self) -> int:
        return self.flow.theta_dim

    @property
    def x_shape(self) -> tuple[int, ...]:
        return self.flow.x_shape

    def _draw(self, key, batch, x):
        return np.asarray(self._programs.sample(self._stats, self.params, key, x, batch))

    def _log_prob_rows(self, theta, x, batched):
        return np.asarray(self._programs.log_prob(self._stats, self.params, theta, x))

    def _climb(self, theta0, x, low, high, steps, learning_rate):
        return np.asarray(self._programs.climb(
            self._stats, self.params, jnp.asarray(theta0), jnp.asarray(x), jnp.asarray(low),
            jnp.asarray(high), jnp.float32(learning_rate), int(steps)))

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model directory atomically (a temporary directory, then a rename)."""
        from sbi_engine import __version__

        path = Path(path)
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "engine_version": __version__,
            "flow": self.flow.config.to_dict(),
            "standardization": self.flow.standardization.to_dict(),
            "prior": None if self.prior is None else self.prior.to_dict(),
            "theta_dim": self.theta_dim,
            "x_shape": list(self.x_shape),
            "metadata": jsonable(self.metadata),
        }
        return write_model_dir(path, header, self.params)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Posterior:
        """Read a model directory written by :meth:`save` (no pickle involved).

        Raises:
            PosteriorFileError: missing files, corrupted content, or an incompatible version.
        """
        path = Path(path)
        header = read_model_header(path, FORMAT, FORMAT_VERSION, "params.msgpack",
                                   "Posterior.save / `sbi-engine train`")
        state = read_model_weights(path, header)
        try:
            flow_spec = dict(header["flow"])
            # written before FlowConfig.maf_scale existed: the MAF scale was then this one
            flow_spec.setdefault("maf_scale", "unit_softplus")
            config = FlowConfig.from_dict(flow_spec)
            theta_dim = int(header["theta_dim"])
            check_weight_sizes([np.shape(a) for a in jax.tree.leaves(state)],
                               {"flow.hidden": config.hidden, "theta_dim": theta_dim},
                               {"flow.transforms": config.transforms})
            std = Standardization.from_dict(header["standardization"])
            prior = None if header.get("prior") is None else prior_from_dict(header["prior"])
            flow = build_flow(config, theta_dim=theta_dim,
                              x_shape=tuple(header["x_shape"]), standardization=std)
        except (KeyError, TypeError, ValueError) as err:
            raise PosteriorFileError(f"model {path}: posterior.json is inconsistent "
                                     f"({type(err).__name__}: {err}); written by engine "
                                     f"{header.get('engine_version')!r}") from None
        # shapes only: a header that asks for a huge network allocates nothing
        template = jax.eval_shape(flow.init, jax.random.PRNGKey(0))
        try:
            params = serialization.from_state_dict(template, state)
            shapes_ok = jax.tree.all(jax.tree.map(
                lambda a, b: np.shape(a) == np.shape(b), template, params))
        except (KeyError, ValueError, TypeError) as err:
            raise PosteriorFileError(f"model {path}: parameters do not match the flow config "
                                     f"({err})") from None
        if not shapes_ok:
            raise PosteriorFileError(f"model {path}: parameter shapes do not match the flow "
                                     "config")
        params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
        return cls(flow, params, prior=prior, metadata=header.get("metadata") or {})

    def __repr__(self) -> str:
        return (f"Posterior({self.flow.config.kind}, D={self.theta_dim}, "
                f"x_shape={self.x_shape})")


def check_weight_sizes(shapes: Sequence[tuple[int, ...]], widths: Mapping[str, int],
                       counts: Mapping[str, int] | None = None) -> None:
    """Refuse a header whose network could not have produced these weights.

    Every width a config names (hidden units, θ's dimension) is a dimension of some
    weight array, and every transform owns at least one array. Checking this before the
    network is built means a lying header cannot make a loader allocate a huge network.

    Args:
        shapes: the shapes of the stored weight arrays.
        widths: ``{field: value}`` that must not exceed the largest stored dimension.
        counts: ``{field: value}`` that must not exceed the number of stored arrays.

    Raises:
        ValueError: naming the field.
    """
    largest = max((max(s) for s in shapes if len(s)), default=0)
    for name, value in widths.items():
        if value > largest:
            raise ValueError(f"{name} = {value}, but no weight array has a dimension that "
                             f"large (largest: {largest})")
    for name, value in (counts or {}).items():
        if value > len(shapes):
            raise ValueError(f"{name} = {value}, but the weights hold only {len(shapes)} "
                             "arrays")


#: Header fields left out of ``header_sha256``: free-form notes a user may edit.
_UNSEALED = ("metadata", "header_sha256")


def _header_digest(header: Mapping[str, Any]) -> str:
    return json_sha256({k: v for k, v in header.items() if k not in _UNSEALED})


def seal_header(header: dict[str, Any]) -> dict[str, Any]:
    """Add ``header_sha256``: a checksum of every field but ``metadata``, so a bit flip in
    a header number (a standardisation mean, a prior bound) is refused on load rather
    than silently changing the model. Returns ``header``."""
    header["header_sha256"] = _header_digest(header)
    return header


def read_model_header(path: Path, fmt: str, version: int, weights: str, writer: str, *,
                      header: str = "posterior.json", what: str = "model",
                      error: type[SbiEngineError] | None = None) -> dict:
    """Check a model directory's files, format and version; return its JSON header.

    Args:
        path: the directory.
        fmt, version: the ``format`` and ``format_version`` the header must have.
        weights: the weights file that must exist beside it.
        writer: what writes such directories (named in the error).
        header: the header file's name.
        what: the kind of model, for messages.
        error: the exception class raised (default :class:`PosteriorFileError`).

    Raises:
        ``error``: missing files, bad JSON, another format or version (named).
    """
    error = error or PosteriorFileError
    hfile = path / header
    if not path.is_dir() or not hfile.is_file() or not (path / weights).is_file():
        raise error(f"{what} {path}: expected a directory with {header} "
                    f"and {weights} (written by {writer})")
    try:
        found_header = json.loads(hfile.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{what} {path}: {header} is not valid JSON ({err})") from None
    if not isinstance(found_header, dict) or found_header.get("format") != fmt:
        raise error(f"{what} {path}: {header} is not an {fmt} file")
    found = found_header.get("format_version")
    if found != version:
        raise error(f"{what} {path}: format version {found!r} written by engine "
                    f"{found_header.get('engine_version')!r}; this engine reads version "
                    f"{version}")
    digest = found_header.get("header_sha256")  # absent in files written before it was added
    if digest is not None and digest != _header_digest(found_header):
        raise error(f"{what} {path}: {header} does not match its header_sha256 (a corrupted "
                    "file, or an edit outside 'metadata')")
    return found_header


def write_model_dir(path: str | os.PathLike, header: dict[str, Any], params: Any, *,
                    header_name: str = "posterior.json") -> Path:
    """Write ``header_name`` and ``params.msgpack`` atomically (no pickle).

    ``header`` gains ``params_sha256`` (catches bit flips in the weights) and
    ``header_sha256`` (:func:`seal_header`). Returns the directory.
    """
    state = serialization.to_state_dict(jax.tree.map(np.asarray, params))
    blob = serialization.msgpack_serialize(state)
    header["params_sha256"] = hashlib.sha256(blob).hexdigest()
    seal_header(header)
    return atomic_write_dir(Path(path), {
        header_name: json.dumps(header, indent=1, sort_keys=True).encode(),
        "params.msgpack": blob,
    })


def read_model_weights(path: Path, header: Mapping[str, Any], *,
                       header_name: str = "posterior.json", what: str = "model",
                       error: type[SbiEngineError] | None = None) -> dict:
    """The state dict in ``path/params.msgpack``, checked against ``params_sha256``.

    Raises:
        ``error`` (default :class:`PosteriorFileError`): a checksum mismatch or bytes
        that are not msgpack.
    """
    error = error or PosteriorFileError
    blob = (path / "params.msgpack").read_bytes()
    digest = header.get("params_sha256")  # absent in files written before it was added
    if digest is not None and hashlib.sha256(blob).hexdigest() != digest:
        raise error(f"{what} {path}: params.msgpack does not match the checksum in "
                    f"{header_name} (truncated or corrupted)")
    try:
        return serialization.msgpack_restore(blob)
    except Exception as err:  # noqa: BLE001 - msgpack raises many types on garbage
        raise error(f"{what} {path}: params.msgpack is corrupted "
                    f"({type(err).__name__})") from None


def hpd_threshold(posterior: Posterior, key: jax.Array, x_o: Any, *, epsilon: float = 1e-4,
                  num_samples: int = 10_000) -> float:
    """Log-density level whose super-level set holds ``1 - epsilon`` of the posterior mass.

    Estimated as the ``epsilon`` quantile of ``log q(θ_i | x_o)`` over posterior samples.
    """
    samples = posterior.sample(key, num_samples, x_o)
    lp = posterior.log_prob(samples, x_o)
    return float(np.quantile(lp[np.isfinite(lp)], epsilon))


def load_posterior(path: str | os.PathLike):
    """Load any saved posterior (JAX flows, or the sbi backend's) by its ``format`` field."""
    path = Path(path)
    hfile = path / "posterior.json"
    try:
        fmt = json.loads(hfile.read_text()).get("format")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise PosteriorFileError(f"model {path}: no posterior.json (expected a model "
                                 "directory written by `sbi-engine train`)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise PosteriorFileError(f"model {path}: posterior.json is not valid JSON "
                                 f"({err})") from None
    if fmt == "sbi-engine-sbi-posterior":
        from sbi_engine.interop.sbi import SbiPosterior

        return SbiPosterior.load(path)
    return Posterior.load(path)
