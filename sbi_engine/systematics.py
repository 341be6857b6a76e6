"""Systematics study: how a classifier's discovery significance moves when nuisances move.

A *design* is a set of nuisance settings built from an event generator's nuisances
(:mod:`sbi_engine.events`). Each varied nuisance ``k`` has a *step* ``(lo_k, hi_k)``:
nominal ∓ 1σ for a Gaussian-constrained nuisance, the range ends otherwise.

- :func:`extremes` — ``2k`` settings, each nuisance at its low / high value, others nominal;
- :func:`one_at_a_time` — nominal plus the extremes, ``2k + 1``;
- :func:`corners` — the ``2^k`` corners of the box;
- :func:`fractional_factorial` — a ``2^(k−p)`` two-level fraction (full factorial in the
  first ``k − p`` nuisances, the other ``p`` set to products of base columns; the
  resolution, III or IV for the usual choices, is computed from the defining relation);
- :func:`prior_samples` — pseudo-experiments with ``ν`` drawn from the nuisance prior.

:func:`run_study` trains models and evaluates each on every test setting:

- ``"bce"``: one weighted-BCE classifier **per training setting**, all trained in one
  :func:`~sbi_engine.classify.train_many` call on stacked datasets (one per setting).
  The classical "train at one extreme, test at the other" is one row of it.
- robust rows, one model each: ``"augmented"`` (BCE on events whose ``ν`` is drawn per
  event from the prior), ``"pivot"`` (adversarial, Louppe et al. 2017), ``"parameterised"``
  (``ν`` as input, Baldi et al. 2016), ``"asimov"`` (Elwood & Krücker loss at nominal),
  ``"inferno"`` (inference-aware summary at nominal; its score is the hard bin centre).
  Following Ghosh & Nachman (2021, arXiv:2109.08159) the evaluation extremes are held out
  of the robust methods' training: their ``ν`` draws come from the prior restricted to the
  varied nuisances with every draw within ``holdout_width`` steps of an evaluation extreme
  (a low or high value of a varied nuisance) rejected, and the evaluation events are
  independent samples (other keys). Training on the two-point systematic itself would let
  the classifier hide it.
- The parameterised classifier is evaluated with the **test setting's ν as input**
  (``parameterised_eval = "test"``: the analysis conditions on the hypothesised ν, as in a
  profile fit; the matrix then shows how well it adapts), or with the nominal ν
  (``"nominal"``: what one gets without knowing the true ν).

Metric: the Asimov significance ``Z_A`` of the cut ``score >= t`` on an independent test
sample per setting (``n_test`` events per process, weights = expected yields). With
``threshold = "test"`` (default) ``t`` is the best threshold of
:func:`~sbi_engine.significance.threshold_scan` on that test sample (over 256 score
quantiles, selections with more than ``min_background`` expected background events); with
``"train"`` it is fixed to the best threshold on a validation sample at the model's training
setting (the nominal one for robust rows; if no simulated background passes it on a test
sample, ``b`` is floored at one event's weight) — the analyst's cut, frozen, then the world
shifts. The AUC is recorded too. Summary columns per row: ``nominal``, ``worst`` (min over
the test design), ``prior_avg`` (mean over ``n_prior`` prior pseudo-experiments) and,
optionally (slower), ``profiled``: the expected discovery Z0 of a pyhf HistFactory fit on
the binned score, with a ``histosys`` per varied nuisance from its low/high samples
(:func:`~sbi_engine.significance.profile_significance`). Its ``profile_bins`` bins have
edges at the nominal background's score quantiles ``0, 1/2, 3/4, 7/8, …, 1`` (finer where
the signal is); the low/high samples of an unconstrained nuisance (its range ends) are used
as its ±1σ variations, as HistFactory reads them. The profiled Z is a binned,
systematics-aware number and is not directly comparable with the single-cut ``Z_A`` of the
matrix. The INFERNO row's score is its hard bin centre (the bins are not ordered by
signal purity), so its single-cut ``Z_A`` understates it; its ``profiled`` column is the
fair number.

Everything takes explicit keys / integer seeds; the same config and seed give the same
numbers.

Resuming: with ``checkpoint=DIR`` each training step (the BCE batch, then each robust
method) writes its trained parameters to ``DIR/<step>/`` as soon as it ends (atomically:
``params.msgpack``, flax's msgpack of the stacked parameters, and ``step.json`` with the
format, the step, the sha256 of the parameters and the identity hash of the config);
``DIR/study.json`` records the config. Rerun with the same directory and config, a study
interrupted anywhere (even by ``kill -9``) loads the completed steps instead of training
them again, and since the evaluation is a deterministic function of the models and the
keys, it ends with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine import interrupt
from sbi_engine.classify import (
    ClassifierConfig,
    ClassifierFileError,
    ClassifierParams,
    TrainData,
    predict,
    roc_auc,
    select,
    train_data,
    train_many,
)
from sbi_engine.errors import ConfigError, SbiEngineError, check_seed
from sbi_engine.events import EventGenerator, get_generator, make_dataset, process_ids
from sbi_engine.programs import register_clear
from sbi_engine.significance import threshold_scan
from sbi_engine.store import json_sha256, read_toml

__all__ = [
    "DESIGNS",
    "METHODS",
    "Design",
    "SystematicsConfig",
    "SystematicsResult",
    "corners",
    "extremes",
    "fractional_factorial",
    "make_design",
    "nuisance_steps",
    "one_at_a_time",
    "plot_z_matrix",
    "prior_samples",
    "run_study",
]

DESIGNS = ("nominal", "extremes", "one_at_a_time", "corners", "fractional")
METHODS = ("bce", "augmented", "pivot", "parameterised", "asimov", "inferno")
SUMMARY = ("nominal", "worst", "prior_avg", "profiled")


# ------------------------------------------------------------------------------------
# Designs
# ------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:.4g}"


@dataclasses.dataclass(frozen=True)
class Design:
    """A set of nuisance settings (frozen, validated).

    Attributes:
        names: ``S`` setting names (unique), e.g. ``"nominal"``, ``"r=-0.4"``.
        nu: ``(S, K)`` full nuisance vectors (all ``K`` nuisances of the generator, in its
            order; those not varied sit at nominal).
        nuisances: the ``K`` nuisance names (the generator's order).
        varied: the nuisances the design varies.
        kind: how it was built (one of :data:`DESIGNS`, ``"prior"`` or ``"custom"``).
        resolution: for a fractional factorial, its resolution (``None`` otherwise).
    """

    names: tuple[str, ...]
    nu: np.ndarray
    nuisances: tuple[str, ...]
    varied: tuple[str, ...] = ()
    kind: str = "custom"
    resolution: int | None = None

    def __post_init__(self):
        names = tuple(str(n) for n in self.names)
        nu = np.asarray(self.nu, dtype=np.float32)
        if not names or nu.size == 0:
            raise ConfigError("design: empty (no settings)")
        if nu.ndim != 2 or nu.shape != (len(names), len(self.nuisances)):
            raise ConfigError(f"design nu: expected shape ({len(names)}, "
                              f"{len(self.nuisances)}), got {nu.shape}")
        if len(set(names)) != len(names):
            raise ConfigError(f"design names: duplicates in {list(names)}")
        if not np.all(np.isfinite(nu)):
            raise ConfigError("design nu: contains NaN or inf")
        unknown = sorted(set(self.varied) - set(self.nuisances))
        if unknown:
            raise ConfigError(f"design varied: unknown nuisance(s) {unknown}; known: "
                              f"{', '.join(self.nuisances)}")
        nu.setflags(write=False)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "nu", nu)
        object.__setattr__(self, "nuisances", tuple(self.nuisances))
        object.__setattr__(self, "varied", tuple(self.varied))

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable): kind, names, the settings ``nu (S, K)`` as lists."""
        return {"kind": self.kind, "names": list(self.names), "nuisances": list(self.nuisances),
                "varied": list(self.varied), "nu": self.nu.tolist(),
                "resolution": self.resolution}


def _varied(generator: EventGenerator, nuisances: Sequence[str] | None) -> tuple[str, ...]:
    names = generator.nuisance_names
    if nuisances is None:
        return tuple(names)
    if isinstance(nuisances, str):
        nuisances = (nuisances,)
    nuisances = tuple(nuisances)
    unknown = [n for n in nuisances if n not in names]
    if unknown:
        raise ConfigError(f"nuisances: unknown nuisance(s) {unknown} for generator "
                          f"{generator.name!r}; known: {', '.join(names)}")
    if not nuisances:
        raise ConfigError("nuisances: empty (vary at least one nuisance)")
    if len(set(nuisances)) != len(nuisances):
        raise ConfigError(f"nuisances: duplicates in {list(nuisances)}")
    return nuisances


def nuisance_steps(generator: EventGenerator, nuisances: Sequence[str] | None = None
                   ) -> dict[str, tuple[float, float]]:
    """``{nuisance: (low, high)}``: nominal ∓ 1σ if constrained (clipped to the range), else
    the range ends."""
    out = {}
    for name in _varied(generator, nuisances):
        i = generator.nuisance_names.index(name)
        par, width = generator.nuisances[i], generator.constraints[i]
        if width is None:
            out[name] = (float(par.low), float(par.high))
        else:
            out[name] = (max(float(par.low), par.nominal - width),
                         min(float(par.high), par.nominal + width))
    return out


def _setting(generator: EventGenerator, values: Mapping[str, float]) -> np.ndarray:
    nu = generator.nominal_nu().copy()
    for name, v in values.items():
        nu[generator.nuisance_names.index(name)] = v
    return nu


def _label(values: Mapping[str, float]) -> str:
    return ",".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "nominal"


def _from_levels(generator, varied, levels: np.ndarray, kind, resolution=None) -> Design:
    """Two-level design from a ``(S, k)`` matrix of ±1 levels."""
    steps = nuisance_steps(generator, varied)
    rows, names = [], []
    for lv in levels:
        values = {n: steps[n][0] if s < 0 else steps[n][1] for n, s in zip(varied, lv)}
        rows.append(_setting(generator, values))
        names.append(_label(values))
    return Design(tuple(names), np.stack(rows), generator.nuisance_names, varied, kind,
                  resolution)


def nominal_design(generator: EventGenerator) -> Design:
    """The nominal setting alone."""
    return Design(("nominal",), generator.nominal_nu()[None], generator.nuisance_names, (),
                  "nominal")


def extremes(generator: EventGenerator, nuisances: Sequence[str] | None = None) -> Design:
    """``2k`` settings: each varied nuisance at its low then high value, the others nominal."""
    varied = _varied(generator, nuisances)
    steps = nuisance_steps(generator, varied)
    names, rows = [], []
    for n in varied:
        for v in steps[n]:
            names.append(_label({n: v}))
            rows.append(_setting(generator, {n: v}))
    return Design(tuple(names), np.stack(rows), generator.nuisance_names, varied, "extremes")


def one_at_a_time(generator: EventGenerator, nuisances: Sequence[str] | None = None
                  ) -> Design:
    """``2k + 1`` settings: nominal first, then :func:`extremes`."""
    ext = extremes(generator, nuisances)
    return Design(("nominal", *ext.names), np.concatenate([generator.nominal_nu()[None],
                                                           ext.nu]),
                  generator.nuisance_names, ext.varied, "one_at_a_time")


def corners(generator: EventGenerator, nuisances: Sequence[str] | None = None) -> Design:
    """The ``2^k`` corners of the low/high box (full two-level factorial)."""
    varied = _varied(generator, nuisances)
    levels = np.array(list(itertools.product((-1, 1), repeat=len(varied))), dtype=np.int8)
    return _from_levels(generator, varied, levels, "corners")


def _resolution(words: Sequence[frozenset]) -> int:
    """Shortest word of the defining relation generated by ``words``."""
    best = None
    for r in range(1, len(words) + 1):
        for combo in itertools.combinations(words, r):
            w: frozenset = frozenset()
            for c in combo:
                w = w ^ c
            best = len(w) if best is None else min(best, len(w))
    return best if best is not None else 10**6


def _two_level_fraction(k: int, p: int) -> tuple[np.ndarray, int]:
    """Levels ``(2^(k−p), k)`` of a ``2^(k−p)`` fraction and its resolution.

    Base: full factorial in the first ``k − p`` factors; each of the ``p`` added factors is
    the product of a distinct subset (size ≥ 2) of base factors. The generators are chosen
    to maximise the resolution (the shortest word of the defining relation), searching
    all choices when there are few (else the first, largest-subset ones): e.g. ``2^(4−1)``
    D = ABC (IV), ``2^(6−2)`` E = ABC, F = BCD (IV), ``2^(5−2)`` (III).
    """
    base = k - p
    if p < 0 or base < 1:
        raise ConfigError(f"fraction: expected 0 <= p < k (k={k}), got p={p}")
    subsets = [s for r in range(base, 1, -1) for s in itertools.combinations(range(base), r)]
    if p > len(subsets):
        raise ConfigError(f"fraction: a 2^({k}-{p}) design needs {p} generators but only "
                          f"{len(subsets)} interactions of {base} base factors exist")
    full = np.array(list(itertools.product((-1, 1), repeat=base)), dtype=np.int8)
    if p == 0:
        return full, k + 1  # full factorial: no aliasing

    def words(gens):
        return [frozenset(s) | {base + j} for j, s in enumerate(gens)]

    gens, res = tuple(subsets[:p]), _resolution(words(subsets[:p]))
    if math.comb(len(subsets), p) <= 5000:
        for combo in itertools.combinations(subsets, p):
            r = _resolution(words(combo))
            if r > res:
                gens, res = combo, r
    cols = [full[:, list(s)].prod(axis=1) for s in gens]
    return np.concatenate([full, np.stack(cols, 1)], 1), res


def fractional_factorial(generator: EventGenerator, nuisances: Sequence[str] | None = None,
                         p: int | None = None) -> Design:
    """A ``2^(k−p)`` two-level fractional factorial over the varied nuisances.

    Args:
        generator: the event generator.
        nuisances: varied nuisances (default all).
        p: fraction; default the largest ``p`` keeping resolution ≥ IV when ``k ≥ 4``
            (``k = 4..5``: p=1; ``k = 6..8``: p=2 or more), else 0 (full factorial).
    """
    varied = _varied(generator, nuisances)
    k = len(varied)
    if p is None:
        p = 0
        while k - (p + 1) >= 1:
            try:
                _, res = _two_level_fraction(k, p + 1)
            except ConfigError:
                break
            if res < 4:
                break
            p += 1
    if not isinstance(p, int) or isinstance(p, bool):
        raise ConfigError(f"fraction: expected an int, got {p!r}")
    levels, res = _two_level_fraction(k, p)
    return _from_levels(generator, varied, levels, "fractional", res)


class _VariedPrior:
    """The generator's nuisance prior on the varied nuisances, the others at nominal;
    draws within ``holdout`` of an excluded value (per nuisance) are redrawn."""

    def __init__(self, generator: EventGenerator, varied: Sequence[str],
                 exclude: Mapping[str, tuple[float, float]] | None = None,
                 holdout_width: float = 0.0):
        self.generator, self.varied = generator, tuple(varied)
        self.idx = np.array([generator.nuisance_names.index(n) for n in self.varied])
        self.exclude = dict(exclude or {})
        self.holdout_width = float(holdout_width)

    def _ok(self, nu: np.ndarray) -> np.ndarray:
        ok = np.ones(nu.shape[0], bool)
        if self.holdout_width <= 0:
            return ok
        for name, (lo, hi) in self.exclude.items():
            i = self.generator.nuisance_names.index(name)
            band = self.holdout_width * (hi - lo) / 2.0
            for e in (lo, hi):
                ok &= np.abs(nu[:, i] - e) > band
        return ok

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        nominal = self.generator.nominal_nu()
        out = np.empty((0, nominal.shape[0]), np.float32)
        for attempt in range(20):
            draw = np.asarray(self.generator.nuisance_prior.sample(
                jax.random.fold_in(key, attempt), 2 * n), np.float32).reshape(2 * n, -1)
            nu = np.broadcast_to(nominal, draw.shape).copy()
            nu[:, self.idx] = draw[:, self.idx]
            out = np.concatenate([out, nu[self._ok(nu)]])
            if out.shape[0] >= n:
                return jnp.asarray(out[:n])
        raise ConfigError(f"holdout_width: {self.holdout_width} rejects almost every prior "
                          f"draw; use a smaller value")


def prior_samples(generator: EventGenerator, key: jax.Array, n: int,
                  nuisances: Sequence[str] | None = None) -> Design:
    """``n`` pseudo-experiments, ``ν`` drawn from the prior (varied nuisances; others nominal)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n_prior: expected a positive int, got {n!r}")
    varied = _varied(generator, nuisances)
    nu = np.asarray(_VariedPrior(generator, varied).sample(key, n))
    return Design(tuple(f"prior{i}" for i in range(n)), nu, generator.nuisance_names, varied,
                  "prior")


def make_design(kind: str, generator: EventGenerator, nuisances: Sequence[str] | None = None,
                *, fraction: int | None = None, field: str = "design") -> Design:
    """A design by name (one of :data:`DESIGNS`)."""
    if kind == "nominal":
        return nominal_design(generator)
    if kind == "extremes":
        return extremes(generator, nuisances)
    if kind == "one_at_a_time":
        return one_at_a_time(generator, nuisances)
    if kind == "corners":
        return corners(generator, nuisances)
    if kind == "fractional":
        return fractional_factorial(generator, nuisances, fraction)
    raise ConfigError(f"{field}: expected one of {list(DESIGNS)}, got {kind!r}")


# ------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------


_GENERATOR_CACHE: dict[tuple[Any, ...], EventGenerator] = {}


def _pos_int(field: str, v: Any, zero: bool = False) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if zero else 1):
        raise ConfigError(f"{field}: expected a {'non-negative' if zero else 'positive'} int, "
                          f"got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SystematicsConfig:
    """A systematics study (frozen, validated; every bad field is a ConfigError naming it).

    Attributes:
        generator: event-generator name (``inferno``, ``pivot``, ``higgs_like``, ...).
        yields: generator options (e.g. ``{"s_exp": 50, "b_exp": 1000}``); must be > 0.
        nuisances: nuisances varied by the designs (default: all of the generator's).
        train_design / test_design: one of :data:`DESIGNS` (training settings of the
            ``"bce"`` rows; test settings = matrix columns). The nominal setting is always
            evaluated too (the ``nominal`` summary column).
        fraction: ``p`` of a fractional design (``None``: automatic).
        methods: which rows, a subset of :data:`METHODS` (order kept).
        n_train / n_test: events per process of a training / test sample.
        n_prior: prior pseudo-experiments for the ``prior_avg`` column (0: skip).
        threshold: ``"test"`` (best cut per test sample) or ``"train"`` (cut fixed at the
            training setting).
        parameterised_eval: ``"test"`` (feed the test ν) or ``"nominal"``.
        holdout_width: robust methods' training ν within this many half-steps of an
            evaluation extreme are redrawn (0: no hold-out band).
        min_background: cuts keeping at most this background (expected events) are not
            considered by the threshold scan (very tight cuts are MC-statistics noise).
        profile: compute the pyhf ``profiled`` column (slower).
        profile_bins: bins of the score histogram for the profile fit.
        seed: integer seed.
        classifier: the :class:`~sbi_engine.classify.ClassifierConfig` of every row (its
            ``loss``/``parameterised`` are set per method).
        sigma_b: relative background uncertainty of the ``"asimov"`` row's loss.
    """

    generator: str
    yields: Mapping[str, float] = dataclasses.field(default_factory=dict)
    nuisances: tuple[str, ...] | None = None
    train_design: str = "one_at_a_time"
    test_design: str = "one_at_a_time"
    fraction: int | None = None
    methods: tuple[str, ...] = ("bce", "augmented")
    n_train: int = 2000
    n_test: int = 5000
    n_prior: int = 8
    threshold: str = "test"
    parameterised_eval: str = "test"
    holdout_width: float = 0.1
    min_background: float = 1.0
    profile: bool = False
    profile_bins: int = 5
    seed: int = 0
    classifier: ClassifierConfig = dataclasses.field(
        default_factory=lambda: ClassifierConfig(hidden=(32, 32), steps=500, batch_size=256,
                                                 learning_rate=3e-3))
    sigma_b: float = 0.1

    def __post_init__(self):
        if not isinstance(self.generator, str) or not self.generator:
            raise ConfigError(f"generator: expected a generator name, got {self.generator!r}")
        if not isinstance(self.yields, Mapping):
            raise ConfigError(f"yields: expected a table of positive numbers, got "
                              f"{self.yields!r}")
        for k, v in self.yields.items():
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v <= 0:
                raise ConfigError(f"yields.{k}: expected a positive number, got {v!r}")
        object.__setattr__(self, "yields", dict(self.yields))
        if self.nuisances is not None:
            if not isinstance(self.nuisances, (list, tuple)) or not all(
                    isinstance(n, str) for n in self.nuisances):
                raise ConfigError(f"nuisances: expected a list of names, got "
                                  f"{self.nuisances!r}")
            if not tuple(self.nuisances):
                raise ConfigError("nuisances: empty (vary at least one nuisance)")
            object.__setattr__(self, "nuisances", tuple(self.nuisances))
        for f in ("train_design", "test_design"):
            if not isinstance(getattr(self, f), str) or getattr(self, f) not in DESIGNS:
                raise ConfigError(f"{f}: expected one of {list(DESIGNS)}, "
                                  f"got {getattr(self, f)!r}")
        if self.test_design == "nominal" and self.n_prior == 0:
            pass
        if self.fraction is not None:
            _pos_int("fraction", self.fraction, zero=True)
        if not isinstance(self.methods, (str, list, tuple)):
            raise ConfigError(f"methods: expected a list of names from {list(METHODS)}, got "
                              f"{self.methods!r}")
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        if not methods:
            raise ConfigError(f"methods: empty; choose from {list(METHODS)}")
        bad = [m for m in methods if not isinstance(m, str) or m not in METHODS]
        if bad:
            raise ConfigError(f"methods: unknown {bad}; allowed: {list(METHODS)}")
        if len(set(methods)) != len(methods):
            raise ConfigError(f"methods: duplicates in {list(methods)}")
        object.__setattr__(self, "methods", methods)
        _pos_int("n_train", self.n_train)
        _pos_int("n_test", self.n_test)
        _pos_int("n_prior", self.n_prior, zero=True)
        _pos_int("profile_bins", self.profile_bins)
        check_seed("seed", self.seed)
        if self.threshold not in ("test", "train"):
            raise ConfigError(f"threshold: expected 'test' or 'train', got {self.threshold!r}")
        if self.parameterised_eval not in ("test", "nominal"):
            raise ConfigError(f"parameterised_eval: expected 'test' or 'nominal', got "
                              f"{self.parameterised_eval!r}")
        for f in ("holdout_width", "sigma_b", "min_background"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 \
                    or not math.isfinite(v):
                raise ConfigError(f"{f}: expected a finite number >= 0, got {v!r}")
        if not isinstance(self.profile, bool):
            raise ConfigError(f"profile: expected a bool, got {self.profile!r}")
        if isinstance(self.classifier, Mapping):
            object.__setattr__(self, "classifier", ClassifierConfig.from_dict(self.classifier))
        if not isinstance(self.classifier, ClassifierConfig):
            raise ConfigError(f"classifier: expected a table, got {self.classifier!r}")

    def build_generator(self) -> EventGenerator:
        """The generator (one instance per name and yields in a process, so the compiled
        training and sampling functions are reused by later studies)."""
        key = (self.generator.lower(), tuple(sorted(self.yields.items())))
        gen = _GENERATOR_CACHE.get(key)
        if gen is None:
            try:
                gen = get_generator(self.generator, **self.yields)
            except TypeError as err:
                raise ConfigError(f"yields: generator {self.generator!r} rejects them "
                                  f"({err})") from None
            _GENERATOR_CACHE[key] = gen
        _varied(gen, self.nuisances)
        return gen

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable), inverted by :meth:`from_dict`."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["classifier"] = self.classifier.to_dict()
        d["nuisances"] = None if self.nuisances is None else list(self.nuisances)
        d["methods"] = list(self.methods)
        return json.loads(json.dumps(d, default=list))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> SystematicsConfig:
        """From a mapping (a TOML document); an unknown key is a ConfigError naming it."""
        if not isinstance(spec, Mapping):
            raise ConfigError(f"config: expected a table, got {type(spec).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise ConfigError(f"config: unknown key {unknown[0]!r}; allowed: {sorted(known)}")
        if "generator" not in spec:
            raise ConfigError("config: missing key 'generator'")
        return cls(**spec)

    @classmethod
    def from_toml(cls, path: str | Path) -> SystematicsConfig:
        """Read a study file (TOML); a missing or unreadable file is a ConfigError."""
        return cls.from_dict(read_toml(path, "config"))


# ------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SystematicsResult:
    """The train × test matrix and summary columns of a study.

    Attributes:
        rows: ``R`` row names (``"bce@<setting>"`` per training setting, then one per
            robust method).
        methods: ``R`` method of each row.
        train_nu: ``(R, K)`` training setting of each row (nominal for robust rows).
        cols: ``C`` test-setting names (the test design).
        test_nu: ``(C, K)`` test settings.
        nuisances: the ``K`` nuisance names.
        z: ``(R, C)`` Asimov Z.
        auc: ``(R, C)`` ROC AUC.
        summary: ``{"nominal"|"worst"|"prior_avg"|"profiled": (R,)}`` (NaN where skipped).
        config: the config as a dict.
        seconds: wall time.
        params: ``R`` trained classifiers (:class:`~sbi_engine.classify.ClassifierParams`),
            one per row, for :func:`~sbi_engine.classify.save_classifier`; not in
            :meth:`to_dict`.
        classifier_configs: ``R`` :class:`~sbi_engine.classify.ClassifierConfig` they
            were trained with.
    """

    rows: tuple[str, ...]
    methods: tuple[str, ...]
    train_nu: np.ndarray
    cols: tuple[str, ...]
    test_nu: np.ndarray
    nuisances: tuple[str, ...]
    z: np.ndarray
    auc: np.ndarray
    summary: dict[str, np.ndarray]
    config: dict[str, Any]
    seconds: float
    params: tuple[Any, ...] = dataclasses.field(default=(), repr=False, compare=False)
    classifier_configs: tuple[Any, ...] = dataclasses.field(default=(), repr=False,
                                                            compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``results.json``: the matrices as nested lists, non-finite as None."""
        def clean(a):
            return [[None if not np.isfinite(v) else float(v) for v in r] for r in
                    np.atleast_2d(a)]

        return {
            "rows": list(self.rows), "methods": list(self.methods),
            "train_nu": np.asarray(self.train_nu).tolist(),
            "cols": list(self.cols), "test_nu": np.asarray(self.test_nu).tolist(),
            "nuisances": list(self.nuisances),
            "z": clean(self.z), "auc": clean(self.auc),
            "summary": {k: clean(v[None])[0] for k, v in self.summary.items()},
            "config": self.config, "seconds": self.seconds,
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON atomically; returns the path."""
        from sbi_engine.store import atomic_write_bytes

        path = Path(path)
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())
        return path

    def plot(self, path: str | Path | None = None):
        """Heatmap: the Z matrix, then the summary columns (:func:`plot_z_matrix`)."""
        return plot_z_matrix(self.z, self.summary, self.rows, self.cols,
                             "Asimov Z: train (rows) x test (columns)", path=path)

    def table(self) -> str:
        """A plain-text table of the matrix and summary columns; ``*`` marks each column's best."""
        cols = [*self.cols, *SUMMARY]
        m = np.column_stack([self.z, *(self.summary[k] for k in SUMMARY)])
        finite = np.isfinite(m)
        best = finite & (m == np.max(np.where(finite, m, -np.inf), axis=0))
        width = max(8, *(len(c) for c in cols))
        first = max(8, *(len(r) for r in self.rows))
        lines = [" " * first + " " + " ".join(c.rjust(width) + " " for c in cols).rstrip()]
        for i, r in enumerate(self.rows):
            lines.append(r.ljust(first) + " " + " ".join(
                (f"{v:.3f}" if ok else "-").rjust(width) + ("*" if top else " ")
                for v, ok, top in zip(m[i], finite[i], best[i], strict=True)).rstrip())
        lines.append("* the best Z of the column")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------


def plot_z_matrix(z: np.ndarray, summary: Mapping[str, np.ndarray], rows: Sequence[str],
                  cols: Sequence[str], title: str, *, path: str | Path | None = None):
    """Heatmap of a study's Z matrix and its summary columns, coloured per column.

    Each cell shows its Z; its colour is its distance to the best Z of its column, and
    the best cell of each column is outlined, so the most robust row on each test
    setting (and on the ``[worst]`` summary) stands out even where the test setting
    moves every row's Z together. A line separates the summary columns.

    Args:
        z: ``(R, C)`` Asimov Z of each row (training setting or method) on each test
            setting.
        summary: ``{name: (R,)}`` summary columns (the :data:`SUMMARY` keys); columns
            with no finite value are left out.
        rows: ``R`` row labels.
        cols: ``C`` test-setting labels.
        title: figure title.
        path: also save the figure there.

    Returns:
        The matplotlib figure.
    """
    from sbi_engine.plotting import plot_heatmap

    keys = [k for k in SUMMARY if k in summary and np.any(np.isfinite(summary[k]))]
    m = np.concatenate([np.asarray(z, np.float64)]
                       + [np.asarray(summary[k], np.float64)[:, None] for k in keys], axis=1)
    return plot_heatmap(m, list(rows), [*cols, *(f"[{k}]" for k in keys)],
                        f"{title}\n(colour: Z minus the best of its column; box: the best)",
                        colorbar_label="Z_A - best Z_A of the column", xlabel="test setting",
                        ylabel="training", by_column=True, best="max",
                        split=len(cols) if keys else None, path=path)


def _method_config(base: ClassifierConfig, method: str, sigma_b: float,
                   varied: Sequence[str]) -> ClassifierConfig:
    if method in ("bce", "augmented"):
        return dataclasses.replace(base, loss="bce", parameterised=False)
    if method == "parameterised":
        return dataclasses.replace(base, loss="bce", parameterised=True)
    if method == "pivot":
        return dataclasses.replace(base, loss="pivot", parameterised=False)
    if method == "asimov":
        # the minibatch Asimov loss can chase b -> 0 and blow up; clip unless configured
        return dataclasses.replace(base, loss="asimov", parameterised=False, sigma_b=sigma_b,
                                   clip_norm=base.clip_norm or 1.0)
    # INFERNO: the varied nuisances profiled, with their Gaussian constraints (B3/B4-like)
    return dataclasses.replace(base, loss="inferno", parameterised=False,
                               free_nuisances=tuple(varied), constrain=True)


_predict = jax.jit(predict)
#: thresholds scanned per test sample: this many score quantiles (a fixed shape, so the
#: significance is compiled once, not once per sample)
N_THRESHOLDS = 256


def _scores(params, x: np.ndarray, nu: np.ndarray | None) -> np.ndarray:
    return np.asarray(_predict(params, x, nu), np.float64)


def _scan(sc: np.ndarray, y: np.ndarray, w: np.ndarray, min_background: float = 0.0):
    grid = np.quantile(sc, np.linspace(0.0, 1.0, N_THRESHOLDS, endpoint=False))
    return threshold_scan(sc, y, w, thresholds=grid, min_background=min_background)


@functools.lru_cache(maxsize=32)
def _dataset_fn(gen: EventGenerator, n: int):
    return jax.jit(jax.vmap(lambda k, v: tuple(make_dataset(k, gen, v, n))))


register_clear(_dataset_fn.cache_clear)


def _datasets(gen: EventGenerator, key: jax.Array, nus: np.ndarray, n: int
              ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One :func:`make_dataset` per row of ``nus (S, K)``, key ``fold_in(key, j)``; one
    compiled, vmapped call."""
    nus = jnp.asarray(np.asarray(nus, np.float32))
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(nus.shape[0]))
    x, y, w = (np.asarray(a) for a in _dataset_fn(gen, int(n))(keys, nus))
    return [(x[j], y[j], w[j]) for j in range(nus.shape[0])]


# ------------------------------------------------------------------------------------
# Checkpoints: one file pair per training step, so an interrupted study resumes
# ------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "sbi-engine-systematics-checkpoint"
CHECKPOINT_VERSION = 1
_STUDY, _STEP, _PARAMS = "study.json", "step.json", "params.msgpack"


class _Checkpoint:
    """The trained steps of one study under ``root`` (see the module docstring).

    A wrong or damaged file is an error naming it (nothing is deleted): another
    study's checkpoint is a ConfigError, a corrupted step a ClassifierFileError.
    """

    def __init__(self, root: str | os.PathLike, config: SystematicsConfig):
        self.root = Path(root)
        self.identity = json_sha256(config.to_dict())
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"checkpoint: {self.root} exists and is not a directory")
        study = self.root / _STUDY
        if not study.exists():
            from sbi_engine.store import atomic_write_bytes

            atomic_write_bytes(study, json.dumps(
                {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                 "identity": self.identity, "config": config.to_dict()}, indent=1).encode())
            return
        head = self._header(study)
        if head.get("identity") != self.identity:
            old, new = head.get("config") or {}, config.to_dict()
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(f"checkpoint {self.root}: holds a study with another config "
                              f"(differs in: {', '.join(keys) or 'unknown keys'}); use "
                              f"another checkpoint directory, or delete it to start over")

    def _header(self, path: Path) -> dict[str, Any]:
        try:
            head = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ClassifierFileError(f"checkpoint {path}: unreadable ({type(err).__name__}: "
                                      f"{err}); delete {path.parent} to redo it") from None
        if not isinstance(head, dict) or head.get("format") != CHECKPOINT_FORMAT:
            raise ClassifierFileError(f"checkpoint {path}: not a {CHECKPOINT_FORMAT} file")
        if head.get("format_version") != CHECKPOINT_VERSION:
            raise ClassifierFileError(f"checkpoint {path}: format version "
                                      f"{head.get('format_version')!r}; this engine reads "
                                      f"{CHECKPOINT_VERSION}")
        return head

    def path(self, step: str) -> Path:
        return self.root / step

    def load(self, step: str, models: int) -> ClassifierParams | None:
        """The step's stacked ``(models, ...)`` parameters, or ``None`` if not yet saved."""
        folder = self.path(step)
        if not folder.exists():
            return None
        head_file, file = folder / _STEP, folder / _PARAMS
        head = self._header(head_file)
        if head.get("identity") != self.identity or head.get("step") != step:
            raise ConfigError(f"checkpoint {head_file}: written for another study or step "
                              f"({head.get('step')!r}); delete {folder} to retrain it")
        try:
            raw = file.read_bytes()
        except OSError as err:
            raise ClassifierFileError(f"checkpoint {file}: unreadable ({err}); delete "
                                      f"{folder} to retrain {step!r}") from None
        if hashlib.sha256(raw).hexdigest() != head.get("sha256"):
            raise ClassifierFileError(f"checkpoint {file}: does not match the checksum in "
                                      f"{head_file} (truncated or corrupted); delete {folder} "
                                      f"to retrain {step!r}")
        from flax import serialization

        try:
            state = serialization.msgpack_restore(raw)
            hidden = tuple(int(h) for h in head["hidden"])
            params = ClassifierParams(jax.tree.map(jnp.asarray, state["net"]),
                                      jnp.asarray(state["loc"]), jnp.asarray(state["scale"]),
                                      hidden, str(head["activation"]))
            leaves = jax.tree.leaves(params)
            ok = (len(params.net["params"]) == len(hidden) + 1 and all(
                a.dtype == jnp.float32 and a.ndim >= 1 and a.shape[0] == models
                for a in leaves))
        except Exception as err:  # noqa: BLE001 - msgpack/numpy raise many types on garbage
            raise ClassifierFileError(f"checkpoint {file}: cannot be read "
                                      f"({type(err).__name__}: {err})") from None
        if not ok:
            raise ClassifierFileError(f"checkpoint {file}: expected the float32 parameters "
                                      f"of {models} model(s) with hidden {hidden}")
        return params

    def save(self, step: str, params: ClassifierParams) -> None:
        """Write the step's stacked parameters atomically (a directory rename)."""
        from flax import serialization

        from sbi_engine import __version__
        from sbi_engine.store import atomic_write_dir

        raw = serialization.to_bytes(params)  # msgpack of {net, loc, scale}; no pickle
        head = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                "engine_version": __version__, "identity": self.identity, "step": step,
                "models": int(params.loc.shape[0]), "hidden": list(params.hidden),
                "activation": params.activation, "file": _PARAMS,
                "sha256": hashlib.sha256(raw).hexdigest()}
        atomic_write_dir(self.path(step), {_STEP: json.dumps(head, indent=1).encode(),
                                           _PARAMS: raw})


def _train_bce(config: SystematicsConfig, gen: EventGenerator, cfg: ClassifierConfig,
               design: Design, k_train: jax.Array, k_model: jax.Array) -> ClassifierParams:
    """One BCE model per setting of ``design``: stacked ``(S, ...)`` parameters."""
    sets = _datasets(gen, k_train, design.nu, config.n_train)
    datasets = [train_data(d, jnp.asarray(v)) for d, v in zip(sets, design.nu)]
    stacked = TrainData(*(jnp.stack(a) for a in zip(*datasets)))
    keys = jnp.stack([k_model] * len(design))  # same init for every setting
    return train_many(keys, stacked, cfg, generator=gen).params


def _train_robust(config: SystematicsConfig, gen: EventGenerator, cfg: ClassifierConfig,
                  method: str, held: _VariedPrior, key: jax.Array, k_model: jax.Array
                  ) -> ClassifierParams:
    """A robust method's model, trained at nominal or on held-out prior ν: ``(1, ...)``."""
    nominal = jnp.asarray(gen.nominal_nu())
    if method in ("augmented", "pivot", "parameterised"):
        k_nu, k_ev = jax.random.split(key)
        nu_ev = held.sample(k_nu, config.n_train * len(gen.processes))
        data = train_data(make_dataset(k_ev, gen, nu_ev, config.n_train), nu_ev)
    else:
        data = train_data(make_dataset(key, gen, nominal, config.n_train), nominal)
    return train_many(k_model[None], TrainData(*(a[None] for a in data)), cfg,
                      generator=gen).params


def run_study(config: SystematicsConfig, *, progress: bool = True,
              checkpoint: str | os.PathLike | None = None,
              log: Callable[[str], None] | None = None) -> SystematicsResult:
    """Run a systematics study (see the module docstring).

    Args:
        config: the :class:`SystematicsConfig`.
        progress: show a tqdm progress bar over the whole study.
        checkpoint: a directory for the trained steps; a rerun with the same directory
            and config loads the completed steps instead of training them again (same
            result as an uninterrupted run).
        log: receives one line per step loaded from the checkpoint (default: printed
            above the progress bar when ``progress``).

    Returns:
        :class:`SystematicsResult`.

    Raises:
        ConfigError: a bad config, or ``checkpoint`` holds another study.
        ClassifierFileError: a checkpoint file is corrupted (it is named; nothing is
            deleted).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    gen = config.build_generator()
    varied = _varied(gen, config.nuisances)
    train_design = make_design(config.train_design, gen, varied, fraction=config.fraction,
                               field="train_design")
    test_design = make_design(config.test_design, gen, varied, fraction=config.fraction,
                              field="test_design")
    root = jax.random.PRNGKey(config.seed)
    k_train, k_model, k_test, k_prior, k_robust, k_val, k_var = (
        jax.random.fold_in(root, i) for i in range(7))
    prior = (prior_samples(gen, k_prior, config.n_prior, varied) if config.n_prior else None)
    steps = nuisance_steps(gen, varied)
    robust = [m for m in config.methods if m != "bce"]
    n_bce = len(train_design) if "bce" in config.methods else 0
    n_rows = n_bce + len(robust)
    nominal = gen.nominal_nu()

    # evaluation settings: test design, nominal, prior pseudo-experiments
    # (the nominal column of the test design is reused when it has one)
    n_cols = len(test_design)
    has_nom = [i for i in range(n_cols) if np.array_equal(test_design.nu[i], nominal)]
    eval_nu = [test_design.nu] + ([] if has_nom else [nominal[None]])
    i_nom = has_nom[0] if has_nom else n_cols
    if prior is not None:
        eval_nu.append(prior.nu)
    eval_nu = np.concatenate(eval_nu)
    prior_slice = slice(n_cols + (0 if has_nom else 1), eval_nu.shape[0])

    total = (1 if n_bce else 0) + len(robust) + n_rows * eval_nu.shape[0] + (
        n_rows if config.profile else 0)
    ckpt = None if checkpoint is None else _Checkpoint(checkpoint, config)
    bar = tqdm(total=total, desc="systematics", unit="step", disable=not progress)

    def sample_set(key, nus):
        return _datasets(gen, key, np.asarray(nus), config.n_test)

    say = log or (bar.write if progress else (lambda _: None))

    def trained(step: str, models: int, train: Callable[[], ClassifierParams]
                ) -> ClassifierParams:
        params = None if ckpt is None else ckpt.load(step, models)
        if params is None:
            params = train()
            if ckpt is not None:
                ckpt.save(step, params)
        else:
            say(f"systematics: {step}: loaded from checkpoint {ckpt.path(step)}")
        bar.update(1)
        interrupt.check()  # a Ctrl-C swallowed during the step stops here
        return params

    # -- training (each step checkpointed) ---------------------------------------------
    models: list[tuple[str, str, np.ndarray, Any, bool]] = []  # name, method, nu, params, param?
    model_configs: list[Any] = []
    if n_bce:
        cfg = _method_config(config.classifier, "bce", config.sigma_b, varied)
        params = trained("bce", n_bce, functools.partial(
            _train_bce, config, gen, cfg, train_design, k_train, k_model))
        for i, name in enumerate(train_design.names):
            models.append((f"bce@{name}", "bce", train_design.nu[i], select(params, i),
                           False))
            model_configs.append(cfg)
    held = _VariedPrior(gen, varied, steps, config.holdout_width)
    for j, method in enumerate(robust):
        cfg = _method_config(config.classifier, method, config.sigma_b, varied)
        params = trained(method, 1, functools.partial(
            _train_robust, config, gen, cfg, method, held, jax.random.fold_in(k_robust, j),
            k_model))
        models.append((method, method, nominal, select(params, 0),
                       method == "parameterised"))
        model_configs.append(cfg)

    # -- evaluation ------------------------------------------------------------------
    tests = sample_set(k_test, eval_nu)
    z_all = np.full((n_rows, eval_nu.shape[0]), np.nan)
    auc_all = np.full_like(z_all, np.nan)
    thresholds = np.full(n_rows, np.nan)
    if config.threshold == "train":
        vals = sample_set(k_val, [m[2] for m in models])
        for r, (_, _, nu_r, params, param) in enumerate(models):
            x, y, w = vals[r]
            sc = _scores(params, x, nu_r if param else None)
            thresholds[r] = _scan(sc, y, w, config.min_background).threshold
    for r, (_, _, _, params, param) in enumerate(models):
        for c, (x, y, w) in enumerate(tests):
            nu_in = None
            if param:
                nu_in = eval_nu[c] if config.parameterised_eval == "test" else nominal
            sc = _scores(params, x, nu_in)
            if not np.all(np.isfinite(sc)):  # a diverged model: leave NaN
                bar.update(1)
                continue
            if config.threshold == "test":
                z_all[r, c] = _scan(sc, y, w, config.min_background).z
            else:
                sel = sc >= thresholds[r]
                s, b = float(np.sum(w * y * sel)), float(np.sum(w * (1 - y) * sel))
                # no simulated background passes: floor at one event's weight (MC resolution)
                b = b if b > 0 else float(np.min(w[y < 0.5]))
                z_all[r, c] = _asimov(s, b)
            auc_all[r, c] = roc_auc(sc, y, w)
            bar.update(1)

    summary = {
        "nominal": z_all[:, i_nom],
        "worst": np.min(np.concatenate([z_all[:, :n_cols], z_all[:, i_nom:i_nom + 1]], 1),
                        axis=1),
        "prior_avg": (np.mean(z_all[:, prior_slice], axis=1) if prior is not None
                      else np.full(n_rows, np.nan)),
        "profiled": np.full(n_rows, np.nan),
    }
    if config.profile:
        summary["profiled"] = _profiled(config, gen, models, k_var, varied, steps, nominal,
                                        bar)
    bar.close()
    return SystematicsResult(
        rows=tuple(m[0] for m in models), methods=tuple(m[1] for m in models),
        train_nu=np.stack([np.asarray(m[2]) for m in models]),
        cols=test_design.names, test_nu=test_design.nu, nuisances=gen.nuisance_names,
        z=z_all[:, :n_cols], auc=auc_all[:, :n_cols], summary=summary,
        config=config.to_dict(), seconds=time.perf_counter() - t0,
        params=tuple(m[3] for m in models), classifier_configs=tuple(model_configs))


def _asimov(s: float, b: float) -> float:
    if b <= 0:
        return float("nan")
    return float(math.sqrt(max(2 * ((s + b) * math.log1p(s / b) - s), 0.0)))


def _profiled(config, gen, models, key, varied, steps, nominal, bar) -> np.ndarray:
    """pyhf expected Z0 per row: binned scores, a histosys per varied nuisance."""
    from sbi_engine.significance import profile_significance, templates_from_scores

    settings = {"nominal": nominal}
    for n in varied:
        for d, v in zip(("down", "up"), steps[n]):
            settings[f"{n}:{d}"] = _setting(gen, {n: v})
    samples = {}
    sets = _datasets(gen, key, np.stack(list(settings.values())), config.n_test)
    for (name, nu), (x, _, w) in zip(settings.items(), sets):
        samples[name] = (x, w, nu)
    pid = process_ids(gen, config.n_test)
    procs = gen.process_names
    out = np.full(len(models), np.nan)
    for r, (_, _, _, params, param) in enumerate(models):
        def split(name, params=params, param=param):
            x, w, nu = samples[name]
            nu_in = None
            if param:
                nu_in = nu if config.parameterised_eval == "test" else nominal
            sc = _scores(params, x, nu_in)
            if not np.all(np.isfinite(sc)):
                raise ValueError("non-finite scores (a diverged model)")
            return {p: (sc[pid == i], w[pid == i]) for i, p in enumerate(procs)}

        try:
            nom = split("nominal")
        except ValueError:
            bar.update(1)
            continue
        bkg = np.concatenate([nom[p][0] for p in gen.background_processes])
        # background quantiles 0, 1/2, 3/4, 7/8, ...: finer where the signal is
        levels = np.append(1.0 - 0.5 ** np.arange(config.profile_bins), 1.0)
        edges = np.unique(np.quantile(bkg, levels))
        if edges.size < 2:
            edges = np.array([0.0, 1.0])
        edges[0], edges[-1] = min(edges[0], 0.0), max(edges[-1], 1.0)
        try:
            variations = {n: {d: split(f"{n}:{d}") for d in ("down", "up")} for n in varied}
            templates = templates_from_scores(edges, nom, signal=gen.signal_processes,
                                              variations=variations)
            out[r] = profile_significance(templates).z0
        except (SbiEngineError, ValueError, np.linalg.LinAlgError):  # degenerate fit: NaN
            out[r] = float("nan")
        bar.update(1)
    return out
