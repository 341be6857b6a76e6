"""Experiments from TOML files: schema, batch runner, run directories, reports, leaderboard.

An *experiment file* (TOML) names an experiment type, the seeds, and one table per
section the type uses::

    name = "two_moons_npe"
    type = "npe"                      # npe | systematics | learning_curve | registered ones
    seeds = [0, 1, 2]

    [data]                            # DataSection
    simulator = "two_moons"
    num_simulations = 10000

    [npe]                             # NPESection (+ [npe.flow]: FlowConfig fields)
    estimator = ["maf", "nsf"]        # a list where one value is expected: a sweep

    [evaluation]                      # EvaluationSection
    observations = [1, 2, 3]

    [presets.tiny]                    # named groups of overrides (--preset tiny)
    data.num_simulations = 500

Parsing (:func:`resolve`) turns the file, a preset and ``--set key=value`` overrides
into frozen, validated dataclasses (:class:`ExperimentConfig`): an unknown or misspelled
key, a value of the wrong type or out of range is a :class:`~sbi_engine.errors.ConfigError`
naming the dotted key and what was expected (for unknown keys, the allowed ones).
A list given where the schema expects one value (or a list of lists where it expects a
list) is a *sweep axis*; the grid of all axes gives one independent point each.

Running a point (:func:`run_point`) writes a *run directory*::

    config.toml / config.json     the resolved config (rerun: sbi-engine run config.toml)
    manifest.json                 versions, git commit, device, seeds, times per stage
    metrics.json                  per-seed metrics and mean ± std over seeds
    report.md                     tables and figures, readable on its own
    run.log                       the log of every attempt
    stages/*.json                 one record per completed stage (the resume points)
    data/ models/ plots/ ...      datasets (zarr), saved models, PNG figures
    checkpoints/                  training state of a stage in progress (removed after)

A run is a list of *stages* (simulate, train, evaluate, study, report); each writes its
outputs atomically and then its record, so an interrupted run (Ctrl-C, ``kill -9``)
resumes from its completed stages when the same command is run again; inside the
train and study stages it resumes from the last epoch or training step. Stages write
through :meth:`RunContext.path`, which refuses paths that leave the run directory. Every stage
takes its randomness from the seed (``jax.random.PRNGKey(seed)`` and integer seeds)
and reads its inputs from files written by earlier stages, so a resumed run ends with
the metrics of an uninterrupted one, and the same config and seed give the same
metrics on the same device.

Sweeps (:func:`run_sweep`) run each point in its own sub-directory through
:func:`run_point` (an independent call: pass ``executor=`` any object with
``submit(fn, *args) -> future`` -- a ``concurrent.futures`` pool or a Dask client --
to farm the points out) and write a summary table. :func:`leaderboard` ranks the run
directories under a folder by one metric (mean over seeds).

Experiment types (:data:`EXPERIMENT_TYPES`; add one with
:func:`register_experiment_type`, e.g. a pyloric-circuit type with its own section):

- ``npe`` -- simulate, train NPE (:func:`~sbi_engine.npe.train_npe` or the sbi
  backend), evaluate: NLL on train / validation / held-out test simulations, C2ST
  against reference posteriors per observation (sbibm's definition), optional SBC and
  TARP coverage, pair plots.
- ``systematics`` -- :func:`~sbi_engine.systematics.run_study` per seed: Z and AUC per
  model row and test setting, summary columns, heatmaps.
- ``learning_curve`` -- the ``npe`` or ``systematics`` pipeline at growing training
  budgets; each metric against the budget on log-log axes with a fitted power law
  ``|y - y_inf| = a n^(-alpha)`` (:func:`fit_power_law`) and its extrapolation.

Score tables follow RAMP's ``ramp_test_submission``: for every method (sweep point or
model row), scores on train / validation / test (or per observation), mean ± std
(sample std, ``ddof=1``; 0 for a single seed) over seeds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import difflib
import functools
import importlib
import importlib.metadata
import io
import itertools
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport
    import tomli as tomllib

from sbi_engine.errors import ConfigError, DatasetError, SbiEngineError, check_seed
from sbi_engine.flows import FlowConfig
from sbi_engine.interrupt import ctrl_c_latch
from sbi_engine.store import atomic_write_bytes, jsonable, read_toml
from sbi_engine.systematics import SUMMARY, SystematicsConfig, plot_z_matrix

__all__ = [
    "EXPERIMENT_TYPES",
    "SIMPLE_NAME",
    "DataSection",
    "EvaluationSection",
    "ExperimentConfig",
    "ExperimentType",
    "LeaderboardRow",
    "LearningCurveSection",
    "NPESection",
    "PowerLaw",
    "RunContext",
    "RunResult",
    "Stage",
    "SweepPoint",
    "check_name",
    "demo_specs",
    "fit_power_law",
    "format_leaderboard",
    "leaderboard",
    "load_spec",
    "parse_override",
    "register_experiment_type",
    "resolve",
    "run",
    "run_point",
    "run_sweep",
    "to_toml",
    "write_index_report",
]

#: Top-level keys of every experiment (sections come from the experiment type).
TOP_LEVEL = ("name", "type", "description", "seeds")
RUN_FORMAT = "sbi-engine-run"
RUN_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------
# Schema: type checks driven by dataclass annotations
# ------------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(path: str, key: str, allowed: Sequence[str]) -> ConfigError:
    where = _join(path, key)
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key{hint}; allowed keys"
                       f"{' in [' + path + ']' if path else ''}: {', '.join(sorted(allowed))}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _non_none(hint: Any) -> list[Any]:
    return [a for a in typing.get_args(hint) if a is not type(None)]


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a hint names (directly or as ``X | None``), else ``None``."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if _is_union(hint):
        for a in _non_none(hint):
            if isinstance(a, type) and dataclasses.is_dataclass(a):
                return a
    return None


def _is_sequence(hint: Any) -> bool:
    if _is_union(hint):
        return any(_is_sequence(a) for a in _non_none(hint))
    return typing.get_origin(hint) in (tuple, list, Sequence)


def _describe(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_describe(a) for a in _non_none(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (tuple, list, Sequence):
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
    if origin in (Mapping, dict) or _dataclass_in(hint):
        return "a table"
    return {int: "an int", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_value(path: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint`` (converted: lists → tuples, ints → floats)."""
    if hint is Any:
        return value
    if _is_union(hint):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for a in _non_none(hint):
            try:
                return _check_value(path, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_describe(hint)}, got {_got(value)}")
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise ConfigError(f"{path}: expected one of {list(allowed)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list, Sequence):
        if isinstance(value, list | tuple):
            args = typing.get_args(hint)
            elt = args[0] if args else Any
            return tuple(_check_value(f"{path}[{i}]", v, elt) for i, v in enumerate(value))
    elif origin in (Mapping, dict):
        if isinstance(value, Mapping):
            args = typing.get_args(hint)
            elt = args[1] if len(args) == 2 else Any
            return {str(k): _check_value(_join(path, str(k)), v, elt) for k, v in value.items()}
    elif _dataclass_in(hint) is not None:
        cls = _dataclass_in(hint)
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return _build(cls, value, path)
    else:
        return value  # a hint the schema does not know: the class validates it
    raise ConfigError(f"{path}: expected {_describe(hint)}, got {_got(value)}")


def _build(cls: type, spec: Any, path: str, fixed: Mapping[str, str] | None = None) -> Any:
    """Instantiate the dataclass ``cls`` from a TOML table, every key checked.

    Args:
        cls: a (frozen) dataclass; its ``__post_init__`` checks ranges.
        spec: the table.
        path: dotted path of the table, for messages.
        fixed: keys set by the experiment instead (``{key: "what sets it"}``): an error.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{path}: expected a table, got {_got(spec)}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    fixed = dict(fixed or {})
    allowed = [f.name for f in fields if f.name not in fixed]
    hints = _hints(cls)
    kwargs = {}
    for key, value in spec.items():
        if key in fixed:
            raise ConfigError(f"{_join(path, key)}: not settable here; it is set by "
                              f"{fixed[key]}")
        if key not in allowed:
            raise _unknown_key(path, key, allowed)
        kwargs[key] = _check_value(_join(path, key), value, hints[key])
    for f in fields:
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        if required and f.name not in kwargs:
            raise ConfigError(f"{_join(path, f.name)}: missing required key")
    try:
        from_dict = getattr(cls, "from_dict", None)
        return from_dict(kwargs) if callable(from_dict) else cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"[{path}] {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[{path}] {err}") from None


def _to_plain(obj: Any) -> Any:
    """A dataclass / tuple / mapping as JSON-able plain data (``to_dict`` where defined)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        if callable(to_dict):
            return _to_plain(to_dict())
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _pos_int(field: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{field}: expected an int >= {minimum}, got {value!r}")


# ------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """``[data]``: the simulator and the simulation budget.

    Attributes:
        simulator: registered simulator name (``sbi-engine simulators``).
        options: keyword options of the simulator's factory.
        num_simulations: training simulations per seed (seed ``s`` simulates with seed
            ``s``); learning curves set it from their budgets.
        num_test: held-out simulations (one set, seed ``test_seed``) for the test NLL,
            SBC and coverage; 0 skips them.
        test_seed: seed of the held-out set.
        chunk_size: rows per dataset chunk (default: the simulate default).
        workers: processes for a black-box simulator (default 1).
        timeout: black-box simulators: seconds allowed per simulation (see
            :func:`~sbi_engine.simulate.simulate`); None for no limit.
    """

    simulator: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_simulations: int = 10_000
    num_test: int = 1000
    test_seed: int = 1_000_000
    chunk_size: int | None = None
    workers: int = 1
    timeout: float | None = None

    def __post_init__(self):
        from sbi_engine.simulator import list_simulators

        known = list_simulators()
        if self.simulator.lower() not in known:
            raise ConfigError(f"simulator: unknown simulator {self.simulator!r}; known: "
                              f"{', '.join(known)}")
        _pos_int("num_simulations", self.num_simulations, 2)
        _pos_int("num_test", self.num_test, 0)
        _pos_int("test_seed", self.test_seed, 0)
        if self.chunk_size is not None:
            _pos_int("chunk_size", self.chunk_size)
        _pos_int("workers", self.workers)
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"timeout: expected a positive number of seconds, got "
                              f"{self.timeout!r}")
        object.__setattr__(self, "options", dict(self.options))


@dataclasses.dataclass(frozen=True, kw_only=True)
class NPESection:
    """``[npe]``: the posterior estimator and its training (defaults: sbi 0.27's).

    Attributes:
        estimator: flow family, ``"maf"``, ``"nsf"`` or ``"nsf_ar"``.
        backend: ``"jax"`` (the engine) or ``"sbi"`` (sbi's PyTorch trainer).
        learning_rate, batch_size, validation_fraction, stop_after_epochs, max_epochs:
            as :class:`~sbi_engine.npe.NPEConfig`.
        clip_norm: gradient clipping norm; 0 disables clipping.
        flow: ``[npe.flow]`` table of :class:`~sbi_engine.flows.FlowConfig` fields
            (its ``kind`` is ``estimator``).
    """

    estimator: Literal["maf", "nsf", "nsf_ar"] = "maf"
    backend: Literal["jax", "sbi"] = "jax"
    learning_rate: float = 5e-4
    batch_size: int = 200
    clip_norm: float = 5.0
    validation_fraction: float = 0.1
    stop_after_epochs: int = 20
    max_epochs: int = 100_000
    flow: FlowConfig = dataclasses.field(default_factory=FlowConfig)

    def __post_init__(self):
        if self.clip_norm < 0:
            raise ConfigError(f"clip_norm: expected >= 0 (0: no clipping), got "
                              f"{self.clip_norm!r}")
        object.__setattr__(self, "flow", dataclasses.replace(self.flow, kind=self.estimator))
        self.npe_config()  # NPEConfig checks the ranges

    def npe_config(self):
        """The :class:`~sbi_engine.npe.NPEConfig` this section describes."""
        from sbi_engine.npe import NPEConfig

        return NPEConfig(flow=self.flow, learning_rate=self.learning_rate,
                         batch_size=self.batch_size, clip_norm=self.clip_norm or None,
                         validation_fraction=self.validation_fraction,
                         stop_after_epochs=self.stop_after_epochs, max_epochs=self.max_epochs)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        flow = self.flow.to_dict()
        flow.pop("kind")
        out["flow"] = flow
        return out


NPE_FIXED = {"flow": {"kind": "npe.estimator"}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationSection:
    """``[evaluation]``: how an NPE posterior is scored.

    Attributes:
        observations: observation numbers ``k`` of the reference (sbibm: 1..10); for
            each, posterior samples, C2ST against the reference posterior and a pair plot.
        num_posterior_samples: samples per observation (and reference samples compared).
        c2st: ``"sbibm"`` (sbibm's classifier, comparable with published tables),
            ``"fast"`` (the jitted JAX variant) or ``"none"``.
        c2st_seed: seed of the sbibm C2ST classifier (sbibm's published numbers: 1).
        c2st_steps: adam steps per fold of the ``"fast"`` C2ST classifier.
        sbc: held-out simulations used for SBC ranks and TARP coverage (0: skip).
        sbc_samples: posterior samples per SBC simulation.
        reference: Python module giving ``observation(k)`` and optionally
            ``true_parameters(k)`` / ``reference_posterior_samples(k)``; default: the
            module that registers the simulator (e.g. ``simulators.benchmarks.two_moons``).
    """

    observations: tuple[int, ...] = (1,)
    num_posterior_samples: int = 1000
    c2st: Literal["sbibm", "fast", "none"] = "sbibm"
    c2st_seed: int = 1
    c2st_steps: int = 3000
    sbc: int = 0
    sbc_samples: int = 100
    reference: str = ""

    def __post_init__(self):
        for i, k in enumerate(self.observations):
            _pos_int(f"observations[{i}]", k)
        if len(set(self.observations)) != len(self.observations):
            raise ConfigError(f"observations: duplicates in {list(self.observations)}")
        _pos_int("num_posterior_samples", self.num_posterior_samples, 10)
        _pos_int("c2st_seed", self.c2st_seed, 0)
        _pos_int("c2st_steps", self.c2st_steps, 10)
        _pos_int("sbc", self.sbc, 0)
        if self.sbc and self.sbc < 10:
            raise ConfigError(f"sbc: expected 0 or >= 10 simulations, got {self.sbc}")
        _pos_int("sbc_samples", self.sbc_samples, 2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearningCurveSection:
    """``[learning_curve]``: train at growing budgets, fit and extrapolate.

    Attributes:
        method: ``"npe"`` (budget = training simulations; metrics such as ``c2st``,
            ``valid/nll``) or ``"systematics"`` (budget = ``systematics.n_train``
            events per process; metrics such as ``best/z_nominal``).
        budgets: increasing training budgets.
        metrics: metric names to plot (default: ``c2st`` and ``valid/nll`` for npe,
            ``best/z_nominal`` for systematics).
        floors: known asymptote per metric (default ``c2st``: 0.5; others are fitted
            when there are at least 4 budgets).
        extrapolate_to: largest budget of the extrapolation (0: 10 × the largest budget).
        targets: metric → target value; the report gives the budget the fit predicts
            for it ("how many more simulations do I need?").
    """

    method: Literal["npe", "systematics"] = "npe"
    budgets: tuple[int, ...] = (1000, 3000, 10_000, 30_000, 100_000)
    metrics: tuple[str, ...] = ()
    floors: Mapping[str, float] = dataclasses.field(default_factory=dict)
    extrapolate_to: int = 0
    targets: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if len(self.budgets) < 2:
            raise ConfigError(f"budgets: expected at least 2 budgets, got {list(self.budgets)}")
        for i, b in enumerate(self.budgets):
            _pos_int(f"budgets[{i}]", b, 2)
        if list(self.budgets) != sorted(set(self.budgets)):
            raise ConfigError(f"budgets: expected strictly increasing values, got "
                              f"{list(self.budgets)}")
        _pos_int("extrapolate_to", self.extrapolate_to, 0)
        if self.extrapolate_to and self.extrapolate_to <= self.budgets[-1]:
            raise ConfigError(f"extrapolate_to: expected 0 or > the largest budget "
                              f"{self.budgets[-1]}, got {self.extrapolate_to}")
        if not self.metrics:
            default = ("c2st", "valid/nll") if self.method == "npe" else ("best/z_nominal",)
            object.__setattr__(self, "metrics", default)
        for name in ("floors", "targets"):
            bad = [k for k in getattr(self, name) if k not in self.metrics]
            if bad:
                raise ConfigError(f"{name}: metric(s) {bad} are not in metrics "
                                  f"{list(self.metrics)}")
            object.__setattr__(self, name, dict(getattr(self, name)))


# ------------------------------------------------------------------------------------
# Experiment types
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resumable step of a run.

    Attributes:
        name: unique within the run, e.g. ``"train/seed0"`` (its record is
            ``stages/train-seed0.json``).
        fn: ``fn(ctx: RunContext) -> dict`` (JSON-able); writes its files atomically.
        verify: ``verify(ctx) -> bool``, asked on a resume when the stage's record
            exists: False (its output is missing or damaged) runs the stage again.
    """

    name: str
    fn: Callable[[RunContext], dict[str, Any]]
    verify: Callable[[RunContext], bool] | None = None

    @property
    def filename(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "-", self.name) + ".json"


@dataclasses.dataclass(frozen=True)
class ExperimentType:
    """What an experiment type is made of (register with :func:`register_experiment_type`).

    Attributes:
        name: the ``type`` value of experiment files.
        sections: ``{table name: frozen dataclass}`` the type reads.
        required: sections that must be present (others get their defaults, or are
            absent when they have required keys).
        stages: ``stages(config) -> [Stage, ...]``; the last one writes ``metrics.json``
            via :func:`write_metrics` and returns ``{"figures": [...], "sections": [...]}``
            for the report.
        fixed: ``{section: {key: what sets it}}`` keys the type sets itself (an error in
            a file).
        check: ``check(config)``, cross-section validation (raise ConfigError).
        description: one line for listings.
    """

    name: str
    sections: Mapping[str, type]
    required: tuple[str, ...]
    stages: Callable[[ExperimentConfig], list[Stage]]
    fixed: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    check: Callable[[ExperimentConfig], None] | None = None
    description: str = ""


#: Registered experiment types, by name.
EXPERIMENT_TYPES: dict[str, ExperimentType] = {}


def register_experiment_type(kind: ExperimentType, *, overwrite: bool = False) -> None:
    """Add an experiment type (e.g. a pyloric-circuit NPE with its own ``[pyloric]`` section)."""
    if not isinstance(kind, ExperimentType):
        raise ConfigError(f"experiment type: expected an ExperimentType, got {kind!r}")
    if kind.name in EXPERIMENT_TYPES and not overwrite:
        raise ConfigError(f"experiment type {kind.name!r} is already registered")
    EXPERIMENT_TYPES[kind.name] = kind


#: Entry-point group through which other packages add experiment types: the entry point
#: names the type and loads its :class:`ExperimentType` (e.g. ``pyloric =
#: "simulators.pyloric.inference:EXPERIMENT_TYPE"``).
ENTRY_POINT_GROUP = "sbi_engine.experiment_types"


def _experiment_type(name: Any) -> ExperimentType:
    if not isinstance(name, str):
        raise ConfigError(f"type: expected a string, got {_got(name)}")
    kind = EXPERIMENT_TYPES.get(name)
    if kind is None:
        eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        if name in eps:
            try:
                loaded = eps[name].load()
            except Exception as err:  # a broken plug-in: named in the error
                raise ConfigError(f"type: experiment type {name!r}: plug-in "
                                  f"{eps[name].value!r} failed to load ({type(err).__name__}: "
                                  f"{err})") from err
            if isinstance(loaded, ExperimentType):
                register_experiment_type(loaded, overwrite=True)
            kind = EXPERIMENT_TYPES.get(name)
    if kind is None:
        plugins = sorted(ep.name for ep in importlib.metadata.entry_points(
            group=ENTRY_POINT_GROUP))
        raise ConfigError(f"type: unknown experiment type {name!r}; known: "
                          f"{', '.join(sorted(set(EXPERIMENT_TYPES) | set(plugins)))}")
    return kind


# ------------------------------------------------------------------------------------
# The experiment config
# ------------------------------------------------------------------------------------

#: A name that can be one file or directory name: letters, digits, ``_``, ``.``, ``-``,
#: not starting with ``.`` (so never ``..`` or hidden), at most 100 characters.
SIMPLE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")


def check_name(field: str, value: Any) -> str:
    """``value`` if it is a :data:`SIMPLE_NAME`, else a ConfigError naming ``field``
    (config values that become file names are checked with it when the config loads)."""
    if not isinstance(value, str) or not SIMPLE_NAME.fullmatch(value):
        raise ConfigError(f"{field}: expected a simple name (letters, digits, '_', '.', '-', "
                          f"not starting with '.', at most 100 characters; it names files "
                          f"under the run directory), got {value!r}")
    return value



@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A resolved experiment (one sweep point): frozen, validated.

    Attributes:
        name: experiment name.
        type: experiment type (a key of :data:`EXPERIMENT_TYPES`).
        seeds: the seeds; every metric is reported as mean ± std over them.
        sections: ``{section name: section dataclass}`` of the type.
        description: free text for the report.
    """

    name: str
    type: str
    seeds: tuple[int, ...]
    sections: Mapping[str, Any]
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"name: expected a non-empty string, got {self.name!r}")
        check_name("name", self.name)  # the default run directory is runs/<name>
        seeds = self.seeds
        if not seeds:
            raise ConfigError("seeds: expected at least one seed")
        for i, s in enumerate(seeds):
            check_seed(f"seeds[{i}]", s)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds: duplicates in {list(seeds)}")
        object.__setattr__(self, "seeds", tuple(seeds))
        object.__setattr__(self, "sections", types.MappingProxyType(dict(self.sections)))

    def __reduce__(self):
        # sections is a read-only mappingproxy, which plain pickle cannot copy; sweep
        # points travel to worker processes (concurrent.futures, Dask) as plain dicts
        return (type(self), (self.name, self.type, self.seeds, dict(self.sections),
                             self.description))

    @property
    def kind(self) -> ExperimentType:
        return _experiment_type(self.type)

    def section(self, name: str) -> Any:
        """The section ``name``; a ConfigError naming it when the experiment has none."""
        value = self.sections.get(name)
        if value is None:
            raise ConfigError(f"[{name}]: experiment {self.name!r} (type {self.type!r}) "
                              "needs this section")
        return value

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ExperimentConfig:
        """Validate a TOML document (no sweep lists left; presets removed)."""
        if not isinstance(spec, Mapping):
            raise ConfigError(f"experiment: expected a table, got {_got(spec)}")
        if "type" not in spec:
            raise ConfigError("type: missing required key; one of "
                              f"{', '.join(sorted(EXPERIMENT_TYPES))}")
        kind = _experiment_type(spec["type"])
        allowed = [*TOP_LEVEL, *kind.sections]
        for key in spec:
            if key in allowed:
                continue
            users = [t.name for t in EXPERIMENT_TYPES.values() if key in t.sections]
            if users:
                raise ConfigError(f"{key}: section [{key}] is not used by experiment type "
                                  f"{kind.name!r} (it reads: {', '.join(kind.sections)}); "
                                  f"[{key}] belongs to: {', '.join(users)}")
            raise _unknown_key("", key, allowed)
        name = _check_value("name", spec.get("name", "experiment"), str)
        description = _check_value("description", spec.get("description", ""), str)
        seeds = _check_value("seeds", spec.get("seeds", [0]), tuple[int, ...])
        sections = {}
        for sec, sec_cls in kind.sections.items():
            fixed = kind.fixed.get(sec, {})
            sub_fixed = {k: v for k, v in fixed.items() if isinstance(v, Mapping)}
            top_fixed = {k: v for k, v in fixed.items() if not isinstance(v, Mapping)}
            if sec in spec:
                table = spec[sec]
                if isinstance(table, Mapping):
                    for sub, keys in sub_fixed.items():
                        bad = [k for k in keys if isinstance(table.get(sub), Mapping)
                               and k in table[sub]]
                        if bad:
                            raise ConfigError(f"{sec}.{sub}.{bad[0]}: not settable here; it is "
                                              f"set by {keys[bad[0]]}")
                sections[sec] = _build(sec_cls, table, sec, top_fixed)
            elif sec in kind.required:
                raise ConfigError(f"[{sec}]: missing section; experiment type {kind.name!r} "
                                  f"needs {', '.join(f'[{s}]' for s in kind.required)}")
            else:
                try:
                    sections[sec] = _build(sec_cls, {}, sec)
                except ConfigError:
                    sections[sec] = None  # has required keys: absent
        config = cls(name=name, type=kind.name, seeds=seeds, sections=sections,
                     description=description)
        if kind.check is not None:
            kind.check(config)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain data, inverted by :meth:`from_dict` (keys the type sets itself dropped)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type,
                               "description": self.description, "seeds": list(self.seeds)}
        fixed = self.kind.fixed
        for sec, value in self.sections.items():
            if value is None:
                continue
            d = _to_plain(value)
            for key, what in fixed.get(sec, {}).items():
                if isinstance(what, Mapping):
                    for k in what:
                        d.get(key, {}).pop(k, None)
                else:
                    d.pop(key, None)
            out[sec] = d
        return json.loads(json.dumps(out))

    def to_toml(self) -> str:
        """The resolved config as a TOML document (``sbi-engine run`` reads it back)."""
        header = ("# Resolved experiment config written by sbi-engine; rerun with\n"
                  "#   sbi-engine run config.toml --out DIR\n")
        return header + to_toml(self.to_dict())


# ------------------------------------------------------------------------------------
# Files, overrides, presets, sweeps
# ------------------------------------------------------------------------------------


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Read an experiment file (TOML) as a plain dict; ``name`` defaults to the file stem."""
    path = Path(path)
    spec = read_toml(path, "experiment")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem).lstrip(".")[:100]
    spec.setdefault("name", stem or "experiment")  # a simple name (check_name)
    return spec


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (``3``, ``1e-3``, ``true``, ``"a"``, ``[0, 1]``),
    else a bare list ``[maf,nsf]`` of such values, else the text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    s = text.strip()
    if s.startswith("[") and s.endswith("]"):
        inner = s[1:-1].strip()
        return [parse_value(p.strip()) for p in inner.split(",")] if inner else []
    return text


def parse_override(item: str) -> tuple[str, Any]:
    """``"npe.estimator=maf"`` → ``("npe.estimator", "maf")`` (value by :func:`parse_value`)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"--set: expected KEY=VALUE (e.g. npe.estimator=maf), got {item!r}")
    key, _, value = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: expected a dotted key such as npe.max_epochs, got {key!r}")
    return key, parse_value(value.strip())


def _set_path(spec: dict, key: str, value: Any, field: str = "--set") -> None:
    parts = key.split(".")
    node = spec
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{field} {key}: {'.'.join(parts[:i + 1])} is "
                              f"{_got(child)}, not a table")
        node = child
    node[parts[-1]] = value


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in table.items():
        key = _join(prefix, k)
        if isinstance(v, Mapping) and v:
            out.extend(_flatten(v, key))
        else:
            out.append((key, v))
    return out


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep.

    Attributes:
        label: ``{dotted key: value}`` of the sweep axes at this point (empty: no sweep).
        config: the validated config.
    """

    label: Mapping[str, Any]
    config: ExperimentConfig

    @property
    def dirname(self) -> str:
        """Sub-directory name, e.g. ``npe.estimator=maf,data.simulator=slcp``."""
        if not self.label:
            return ""
        text = ",".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in self.label.items())
        return re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", text)[:120]


def _short(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "-".join(_short(e) for e in v)
    if isinstance(v, Mapping):
        return "-".join(f"{k}{_short(e)}" for k, e in v.items())
    return f"{v:g}" if isinstance(v, float) else str(v)


def _sweep_axes(spec: Mapping[str, Any], kind: ExperimentType) -> list[tuple[str, list]]:
    """Dotted keys holding a list where the schema expects one value (or a list of lists
    where it expects a list)."""
    axes: list[tuple[str, list]] = []

    def visit(table: Mapping[str, Any], cls: type, path: str) -> None:
        hints = _hints(cls)
        for key, value in table.items():
            hint = hints.get(key)
            if hint is None:
                continue  # unknown key: reported by validation
            sub = _dataclass_in(hint)
            if sub is not None and isinstance(value, Mapping):
                visit(value, sub, _join(path, key))
            elif isinstance(value, list):
                if _is_sequence(hint):
                    if value and all(isinstance(v, list) for v in value):
                        axes.append((_join(path, key), value))
                else:
                    axes.append((_join(path, key), value))

    seeds = spec.get("seeds")
    if isinstance(seeds, list) and seeds and all(isinstance(v, list) for v in seeds):
        axes.append(("seeds", seeds))
    for sec, cls in kind.sections.items():
        if isinstance(spec.get(sec), Mapping):
            visit(spec[sec], cls, sec)
    for key, values in axes:
        if not values:
            raise ConfigError(f"{key}: empty list (a sweep needs at least one value)")
    return axes


def resolve(spec: Mapping[str, Any], *, overrides: Iterable[str | tuple[str, Any]] = (),
            preset: str | None = None) -> list[SweepPoint]:
    """Apply a preset and overrides to an experiment document and expand its sweep.

    Args:
        spec: the document (:func:`load_spec`), with an optional ``presets`` table of
            named override tables.
        overrides: ``"key=value"`` strings (``--set``) or ``(key, value)`` pairs, applied
            after the preset.
        preset: name of a table under ``presets``.

    Returns:
        One :class:`SweepPoint` per grid point (one, with an empty label, without sweep).

    Raises:
        ConfigError: unknown preset or key, bad type or range, naming the key.
    """
    spec = copy.deepcopy(dict(spec))
    presets = spec.pop("presets", {})
    if not isinstance(presets, Mapping):
        raise ConfigError(f"presets: expected a table of named override tables, got "
                          f"{_got(presets)}")
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"--preset: unknown preset {preset!r}; this experiment has: "
                              f"{', '.join(sorted(presets)) or '(none)'}")
        check_name("--preset", preset)  # the default run directory is runs/<name>-<preset>
        if not isinstance(presets[preset], Mapping):
            raise ConfigError(f"presets.{preset}: expected a table, got {_got(presets[preset])}")
        for key, value in _flatten(presets[preset]):
            _set_path(spec, key, value, f"presets.{preset}")
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        _set_path(spec, key, value)
    for key in ("name", "type", "description"):
        if isinstance(spec.get(key), list):
            raise ConfigError(f"{key}: cannot be swept (got a list {spec[key]!r})")
    if "type" not in spec:
        raise ConfigError("type: missing required key; one of "
                          f"{', '.join(sorted(EXPERIMENT_TYPES))}")
    kind = _experiment_type(spec["type"])
    axes = _sweep_axes(spec, kind)
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        point = copy.deepcopy(spec)
        label = {}
        for (key, _), value in zip(axes, combo):
            _set_path(point, key, value)
            label[key] = value
        points.append(SweepPoint(label, ExperimentConfig.from_dict(point)))
    return points


# ------------------------------------------------------------------------------------
# TOML writer (the resolved config)
# ------------------------------------------------------------------------------------


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(e) for e in v if e is not None) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(e)}" for k, e in v.items()
                               if e is not None) + "}"
    raise ConfigError(f"cannot write {_got(v)} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """A TOML document for plain data (``None`` values are left out)."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], name: str) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if name:
            lines.extend(["", f"[{name}]"])
        for k, v in scalars:
            if v is not None:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables:
            emit(v, f"{name}.{_toml_key(k)}" if name else _toml_key(k))

    emit(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"


# ------------------------------------------------------------------------------------
# Run directory: context, manifest, log
# ------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(jsonable(obj, nan_to_none=True), indent=1) + "\n"
    atomic_write_bytes(path, text.encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


class RunLog:
    """Appends timestamped lines to ``run.log`` and echoes them to stdout."""

    def __init__(self, path: Path, echo: bool = True):
        self.path, self.echo = path, echo

    def __call__(self, message: str) -> None:
        stamp = _dt.datetime.now().strftime("%H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {message}\n")
        if self.echo:
            print(message, flush=True)


@dataclasses.dataclass
class RunContext:
    """What a stage sees.

    Attributes:
        config: the experiment.
        out: the run directory.
        progress: show progress bars.
        results: results of the stages completed so far (this attempt or earlier ones).
        log: :class:`RunLog`.
    """

    config: ExperimentConfig
    out: Path
    progress: bool
    results: dict[str, dict[str, Any]]
    log: RunLog

    def path(self, *parts: str) -> Path:
        """``out/<parts...>`` for a stage to write (its parent directories created).

        Raises:
            ConfigError: a part (config values often make them) is absolute, holds
                ``..``, or the path leads outside the run directory (through a symlink).
        """
        for part in parts:
            pure = Path(part)
            if pure.is_absolute() or ".." in pure.parts or "\x00" in str(part):
                raise ConfigError(f"path {str(part)!r}: must stay inside the run directory "
                                  f"{self.out} (no absolute paths, no '..')")
        p = self.out.joinpath(*parts)
        if not p.resolve().is_relative_to(self.out.resolve()):
            raise ConfigError(f"path {p}: leads outside the run directory {self.out} "
                              f"(through a symbolic link)")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`run_point` returns.

    Attributes:
        out: the run directory.
        metrics: the content of ``metrics.json``.
        resumed: names of the stages taken from an earlier attempt.
        ran: names of the stages run by this call.
        seconds: wall time of this call.
    """

    out: Path
    metrics: dict[str, Any]
    resumed: tuple[str, ...]
    ran: tuple[str, ...]
    seconds: float


def _git_info() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


_DISTRIBUTIONS = ("sbi-engine", "jax", "jaxlib", "flax", "optax", "numpy", "scipy", "zarr",
                  "matplotlib", "scikit-learn", "pyhf", "sbi", "torch", "dask")


def environment() -> dict[str, Any]:
    """Versions of Python and the engine's dependencies, the git commit, the host."""
    versions = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {"versions": versions, "git": _git_info(),
            "host": {"platform": platform.platform(), "machine": platform.machine(),
                     "cpu_count": os.cpu_count()}}


def _select_device(device: str | None):
    """``None``/``"auto"``: JAX's default; ``"cpu"`` / ``"gpu"``: that platform's first device."""
    import jax

    if device in (None, "auto"):
        return None
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"--device: expected cpu, gpu or auto, got {device!r}")
    try:
        devices = jax.devices(device)
    except RuntimeError:
        devices = []
    if not devices:
        raise ConfigError(f"--device {device}: JAX sees no {device.upper()} (backend "
                          f"{jax.default_backend()!r}); install jax[cuda12] for a GPU, or "
                          "use --device cpu")
    return devices[0]


def _device_info(requested: str | None, dev) -> dict[str, Any]:
    import jax

    d = dev if dev is not None else jax.devices()[0]
    return {"requested": requested or "auto", "platform": d.platform,
            "device_kind": getattr(d, "device_kind", d.platform),
            "default_backend": jax.default_backend()}


class _Lock:
    """``.lock`` in a run directory: one process at a time; a dead owner's lock is taken."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.held = False

    def __enter__(self):
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    owner = {}
                if owner.get("host") == me["host"] and not _alive(owner.get("pid")):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise ConfigError(f"run directory {self.path.parent} is in use by process "
                                  f"{owner.get('pid')} on {owner.get('host')!r}; delete "
                                  f"{self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise ConfigError(f"run directory {self.path.parent}: cannot take {self.path}")

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out.extend(_diff(a.get(k), b.get(k), _join(path, k)))
        return out
    return [] if a == b else [f"{path or '(root)'}: {a!r} -> {b!r}"]


def _prepare(out: Path, config: ExperimentConfig, overwrite: bool) -> bool:
    """Create or check the run directory; returns True when it held an earlier attempt."""
    resolved = config.to_dict()
    cfile = out / "config.json"
    if cfile.exists():
        old = _read_json(cfile)
        if old != resolved:
            changes = _diff(old, resolved)
            if not overwrite:
                raise ConfigError(
                    f"run directory {out} holds a different experiment ("
                    + "; ".join(changes[:5]) + (" ..." if len(changes) > 5 else "")
                    + "); use another --out, or --overwrite to replace it")
            _clear_run_dir(out)
            return False
        return True
    if out.exists() and any(p.name != ".lock" for p in out.iterdir()):
        if (out / "sweep.json").exists():
            raise ConfigError(f"--out {out}: holds a sweep, not a single run; use another "
                              "--out")
        raise ConfigError(f"--out {out}: exists, is not empty and is not a run directory "
                          "(no config.json); use another --out")
    return False


def _clear_run_dir(out: Path) -> None:
    if not (out / "config.json").exists():
        raise ConfigError(f"{out}: refusing to delete a directory that is not a run directory")
    for p in out.iterdir():
        if p.name == ".lock":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ------------------------------------------------------------------------------------
# Running one point
# ------------------------------------------------------------------------------------


def run_point(config: ExperimentConfig, out_dir: str | os.PathLike, *,
              device: str | None = None, progress: bool = True, echo: bool = True,
              overwrite: bool = False, label: Mapping[str, Any] | None = None,
              on_stage: Callable[[str, str], None] | None = None) -> RunResult:
    """Run (or resume) one experiment point into ``out_dir``.

    An independent call: everything it needs is in its arguments, so sweep points can
    run in other processes or on other machines.

    Args:
        config: the experiment point.
        out_dir: the run directory; if it holds an earlier attempt of the same config,
            completed stages are skipped (resume); a different config is an error.
        device: ``"cpu"``, ``"gpu"`` or ``None``/``"auto"`` (JAX's default device).
        progress: progress bars inside stages.
        echo: print the log lines to stdout too.
        overwrite: replace a run directory holding a different config.
        label: the sweep axes' values at this point (recorded in the manifest).
        on_stage: ``on_stage(stage_name, event)`` with event ``"start"``, ``"end"`` or
            ``"skip"`` (for monitoring, or tests that interrupt a run).

    Returns:
        :class:`RunResult`.

    Raises:
        ConfigError: a bad device, a run directory holding something else.
    """
    import jax

    if not isinstance(config, ExperimentConfig):
        raise ConfigError(f"config: expected an ExperimentConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    dev = _select_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        earlier = _prepare(out, config, overwrite)
        if not earlier:
            atomic_write_bytes(out / "config.toml", config.to_toml().encode())
            _write_json(out / "config.json", config.to_dict())
        log = RunLog(out / "run.log", echo)
        mfile = out / "manifest.json"
        manifest = _read_json(mfile) if (earlier and mfile.exists()) else {
            "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION,
            "experiment": config.name, "type": config.type, "seeds": list(config.seeds),
            "sweep_point": dict(label or {}), "stages": {}, "attempts": []}
        attempt = {"start": _now(), "end": None, "status": "running", "argv": sys.argv,
                   "pid": os.getpid(), **environment(), "device": _device_info(device, dev)}
        if manifest["attempts"] and manifest["attempts"][-1]["status"] == "running":
            manifest["attempts"][-1]["status"] = "died"  # killed without a chance to say so
        manifest["attempts"].append(attempt)
        manifest.update(status="running", start=manifest.get("start") or attempt["start"],
                        end=None, device=attempt["device"], versions=attempt["versions"],
                        git=attempt["git"])
        _write_json(mfile, manifest)
        stages = config.kind.stages(config)
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"experiment type {config.type!r}: duplicate stage names")
        ctx = RunContext(config, out, progress, {}, log)
        resumed, ran = [], []
        log(f"experiment {config.name!r} ({config.type}), seeds {list(config.seeds)} -> {out}"
            + (" (resuming)" if earlier else ""))
        status = "failed"
        try:
            with (jax.default_device(dev) if dev is not None else contextlib.nullcontext(),
                  ctrl_c_latch() as interrupted):
                for i, stage in enumerate(stages, 1):
                    record = out / "stages" / stage.filename
                    if record.exists() and stage.verify is not None and not stage.verify(ctx):
                        log(f"[{i}/{len(stages)}] {stage.name}: its output is damaged or "
                            "missing; running it again")
                        record.unlink()
                    if record.exists():
                        ctx.results[stage.name] = _read_json(record)["result"]
                        resumed.append(stage.name)
                        manifest["stages"].setdefault(stage.name, {})["resumed"] = True
                        if on_stage:
                            on_stage(stage.name, "skip")
                        continue
                    log(f"[{i}/{len(stages)}] {stage.name}")
                    if on_stage:
                        on_stage(stage.name, "start")
                    start, s0 = _now(), time.perf_counter()
                    result = jsonable(stage.fn(ctx), nan_to_none=True)
                    seconds = time.perf_counter() - s0
                    info = {"start": start, "end": _now(), "seconds": round(seconds, 3),
                            "attempt": len(manifest["attempts"]), "resumed": False}
                    _write_json(record, {"stage": stage.name, "result": result, **info})
                    ctx.results[stage.name] = result
                    manifest["stages"][stage.name] = info
                    _write_json(mfile, manifest)
                    ran.append(stage.name)
                    log(f"      done in {seconds:.1f} s")
                    if on_stage:
                        on_stage(stage.name, "end")
                    interrupted()  # a Ctrl-C swallowed during the stage stops here
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except BaseException as err:
            attempt["error"] = f"{type(err).__name__}: {err}"
            raise
        finally:
            attempt.update(end=_now(), status=status,
                           seconds=round(time.perf_counter() - t0, 3),
                           ran=len(ran), resumed=len(resumed))
            manifest.update(status=status, end=attempt["end"])
            manifest["wall_seconds"] = round(sum(
                v.get("seconds", 0.0) for v in manifest["stages"].values()), 3)
            _write_json(mfile, manifest)
            if status != "complete":
                log(f"run {status} after {len(ran)} stage(s); rerun the same command to "
                    "resume from the completed stages")
        metrics = _read_json(out / "metrics.json")
        report = ctx.results.get(stages[-1].name, {})
        write_report(out, config, manifest, metrics, report)
        log(f"done: {len(ran)} stage(s) run, {len(resumed)} resumed; report {out / 'report.md'}")
    return RunResult(out, metrics, tuple(resumed), tuple(ran), time.perf_counter() - t0)


# ------------------------------------------------------------------------------------
# Metrics: aggregation over seeds, directions
# ------------------------------------------------------------------------------------


_MAX_SUFFIXES = ("z", "z_", "auc", "accuracy", "min_pvalue", "acceptance")


def metric_direction(name: str) -> str:
    """``"max"`` for significances, AUCs, p-values; ``"min"`` for losses, C2ST, errors."""
    last = name.rsplit("/", 1)[-1]
    return "max" if last.startswith(_MAX_SUFFIXES) else "min"


def aggregate(per_seed: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{metric: {"mean", "std", "n", "values"}}`` over seeds (``std``: ``ddof=1``, 0 for
    one seed; non-finite values are left out)."""
    names: list[str] = []
    for m in per_seed.values():
        names.extend(k for k in m if k not in names)
    out = {}
    for name in names:
        vals = [per_seed[s].get(name) for s in per_seed]
        finite = [float(v) for v in vals if isinstance(v, int | float) and math.isfinite(v)]
        if not finite:
            continue
        arr = np.asarray(finite)
        out[name] = {"mean": float(arr.mean()),
                     "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
                     "n": int(arr.size), "values": vals}
    return out


def write_metrics(ctx: RunContext, per_seed: Mapping[Any, Mapping[str, Any]], *,
                  primary: str, headline: Sequence[str] = (),
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``metrics.json`` (per-seed values, mean ± std, directions); returns it."""
    per_seed = {str(s): dict(m) for s, m in per_seed.items()}
    summary = aggregate(per_seed)
    metrics = {
        "experiment": ctx.config.name, "type": ctx.config.type,
        "seeds": list(ctx.config.seeds), "primary": primary,
        "headline": [h for h in headline if h in summary],
        "summary": summary, "per_seed": per_seed,
        "directions": {k: metric_direction(k) for k in summary},
        **(dict(extra) if extra else {}),
    }
    _write_json(ctx.out / "metrics.json", metrics)
    return metrics


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    v = float(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def _pm(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "-"
    values = entry.get("values") or []
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        mean = entry["mean"]  # counts (epochs): integers stay integers
        return (f"{int(mean):,}" if entry["n"] == 1
                else f"{mean:,.1f} ± {entry['std']:,.1f}")
    mean, std = entry["mean"], entry["std"]
    if entry["n"] == 1:
        return _fmt(mean)
    fixed = mean == 0 or 1e-3 <= abs(mean) < 1e5  # the mean's format: 3 decimals
    return f"{_fmt(mean)} ± {f'{std:.3f}' if fixed else _fmt(std)}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def score_table(summary: Mapping[str, Mapping[str, Any]], *, skip: Sequence[str] = (),
                mark_best: bool = False) -> str:
    """RAMP-style table: metric ``group/score`` → row ``group``, column ``score``,
    cells mean ± std over seeds. ``mark_best``: the best mean of each column (by
    :func:`metric_direction`; ties all) is bold where two or more rows have the score."""
    rows: dict[str, dict[str, str]] = {}
    means: dict[str, dict[str, float]] = {}
    cols: list[str] = []
    for name, entry in summary.items():
        if "/" not in name or name.split("/", 1)[0] in skip:
            continue
        group, score = name.rsplit("/", 1)
        if score not in cols:
            cols.append(score)
        rows.setdefault(group, {})[score] = _pm(entry)
        means.setdefault(score, {})[group] = entry["mean"]
    if not rows:
        return ""
    if mark_best:
        for score, by_group in means.items():
            if len(by_group) > 1:
                pick = max if metric_direction(score) == "max" else min
                top = pick(by_group.values())
                for group, mean in by_group.items():
                    if mean == top:
                        rows[group][score] = f"**{rows[group][score]}**"
    return _md_table(["", *cols], [[g, *(r.get(c, "") for c in cols)] for g, r in rows.items()])


# ------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------


def _figure_md(figures: Sequence[Sequence[str]]) -> list[str]:
    out = []
    for path, caption in figures:
        out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    return out


def write_report(out: Path, config: ExperimentConfig, manifest: Mapping[str, Any],
                 metrics: Mapping[str, Any], report: Mapping[str, Any]) -> Path:
    """Write ``report.md``: summary, score tables, per-seed values, figures, stages, versions."""
    summary = metrics.get("summary", {})
    git = manifest.get("git") or {}
    dev = manifest.get("device") or {}
    versions = manifest.get("versions") or {}
    wall = manifest.get("wall_seconds") or 0.0
    lines = [f"# {config.name} ({config.type})", ""]
    if config.description:
        lines += [config.description, ""]
    point = manifest.get("sweep_point") or {}
    info = [
        ("status", manifest.get("status", "?")),
        ("seeds", ", ".join(map(str, config.seeds))),
        *([("sweep point", ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in point.items()))]
          if point else []),
        ("compute time", f"{wall:.1f} s over {len(manifest.get('stages', {}))} stages, "
                         f"{len(manifest.get('attempts', []))} attempt(s)"),
        ("started / ended", f"{manifest.get('start')} / {manifest.get('end')}"),
        ("device", f"{dev.get('platform', '?')} ({dev.get('device_kind', '?')}), requested "
                   f"{dev.get('requested', 'auto')}"),
        ("engine", f"sbi-engine {versions.get('sbi-engine', '?')}, jax "
                   f"{versions.get('jax', '?')}, git "
                   + (f"`{git['commit'][:10]}`{' (modified)' if git.get('dirty') else ''}"
                      if git else "unknown")),
        ("config", "[config.toml](config.toml) (rerun: `sbi-engine run config.toml --out DIR`)"),
    ]
    lines += [_md_table(["", ""], [[f"**{k}**", v] for k, v in info]), ""]
    headline = metrics.get("headline") or []
    if headline:
        lines += ["## Headline", ""]
        lines += [f"- **{h}** ({metrics['directions'].get(h, 'min')} is better): "
                  f"{_pm(summary.get(h))}" for h in headline]
        lines.append("")
    mark_best = bool(report.get("mark_best"))
    table = score_table(summary, skip=report.get("skip_groups", ()), mark_best=mark_best)
    n = len(config.seeds)
    if table:
        lines += [f"## Scores (mean ± std over {n} seed{'s' if n > 1 else ''})", "", table, ""]
        if mark_best:
            lines += ["Bold: the best of each column.", ""]
    for section in report.get("sections", []):
        lines += [section, ""]
    per_seed = metrics.get("per_seed", {})
    if per_seed and n > 1:
        seeds = list(per_seed)
        rows = [[k, *(_fmt(per_seed[s].get(k)) for s in seeds)] for k in summary]
        lines += ["## Per seed", "", _md_table(["metric", *(f"seed {s}" for s in seeds)], rows),
                  ""]
    figures = report.get("figures", [])
    if figures:
        lines += ["## Figures", "", *_figure_md(figures)]
    stage_rows = [[f"`{k}`", f"{v.get('seconds', 0):.1f}", "yes" if v.get("resumed") else ""]
                  for k, v in manifest.get("stages", {}).items()]
    lines += ["## Stages", "", _md_table(["stage", "seconds", "resumed"], stage_rows), ""]
    lines += ["## Environment", "",
              ", ".join(f"{k} {v}" for k, v in versions.items()), "",
              f"Files: `config.toml`, `manifest.json`, `metrics.json`, `run.log`, "
              f"`stages/`{', ' + ', '.join(f'`{d}/`' for d in report.get('dirs', []))}.", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


# ------------------------------------------------------------------------------------
# NPE stages
# ------------------------------------------------------------------------------------


def _simulator(config: ExperimentConfig):
    from sbi_engine.simulator import get_simulator

    data = config.section("data")
    return get_simulator(data.simulator, **data.options)


def _reference(config: ExperimentConfig) -> Any:
    """The module giving ``observation(k)`` etc. (see :class:`EvaluationSection`), or None."""
    ev = config.section("evaluation")
    data = config.section("data")
    name = ev.reference
    if not name:  # the module that registers the simulator (entry point or in-process)
        from sbi_engine.simulator import _SIMULATORS, ENTRY_POINT_GROUP

        target = _SIMULATORS.entries.get(data.simulator.lower())
        if target is not None:
            name = getattr(target, "__module__", "") or ""
        else:
            eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            ep = {e.name.lower(): e for e in eps}.get(data.simulator.lower())
            name = ep.module if ep is not None else ""
    try:
        module = importlib.import_module(name) if name else None
    except ImportError as err:
        raise ConfigError(f"evaluation.reference: cannot import {name!r} ({err})") from None
    if ev.observations and (module is None or not callable(getattr(module, "observation", None))):
        raise ConfigError(f"evaluation.observations: simulator {data.simulator!r} provides no "
                          f"observations ({name or 'no module'} has no observation(k)); set "
                          "evaluation.reference to a module that does, or observations = []")
    return module


def _stage_simulate(ctx: RunContext, *, seed: int, num: int, name: str) -> dict[str, Any]:
    from sbi_engine.simulate import simulate

    data = ctx.config.section("data")
    sim = _simulator(ctx.config)
    blackbox = sim.kind == "blackbox"
    result = simulate(sim, num, seed, out=ctx.path("data", f"{name}.zarr"),
                      chunk_size=data.chunk_size, progress=ctx.progress,
                      workers=data.workers if blackbox else None,
                      timeout=data.timeout if blackbox else None)
    ctx.log(f"      {result.report.summary()}")
    rep = result.report
    return {"num": num, "seed": seed, "valid": int(rep.total - rep.invalid),
            "invalid": int(rep.invalid), "summary": rep.summary()}


def _dataset_intact(ctx: RunContext, *, name: str) -> bool:
    """Whether the run's dataset ``data/<name>.zarr`` is complete with every checksum."""
    from sbi_engine.store import load_dataset

    try:
        for _ in load_dataset(ctx.out / "data" / f"{name}.zarr", lazy=True).iter_chunks():
            pass
    except DatasetError:
        return False
    return True


def _simulate_stage(stage: str, *, seed: int, num: int, name: str) -> Stage:
    """A stage simulating ``data/<name>.zarr``; a resume re-checks the dataset and, if a
    chunk is damaged, runs the stage again, which redoes only the damaged chunks."""
    return Stage(stage, functools.partial(_stage_simulate, seed=seed, num=num, name=name),
                 verify=functools.partial(_dataset_intact, name=name))


def _stage_train(ctx: RunContext, *, seed: int, tag: str, data_name: str,
                 budget: int | None = None) -> dict[str, Any]:
    import jax

    from sbi_engine import plotting
    from sbi_engine.npe import remove_checkpoint, train_npe
    from sbi_engine.store import load_dataset

    sec = ctx.config.section("npe")
    sim = _simulator(ctx.config)
    ds = load_dataset(ctx.out / "data" / f"{data_name}.zarr")
    theta, x = ds.theta, ds.x
    if budget is not None:
        theta, x = theta[:budget], x[:budget]
    cfg = sec.npe_config()
    checkpoint = None
    if sec.backend == "sbi":
        from sbi_engine.interop.sbi import torch_device_like_jax, train_sbi

        device, note = torch_device_like_jax()  # the run's --device
        if note:
            ctx.log(f"      {note}")
        res = train_sbi(theta, x, prior=sim.prior, config=cfg, seed=seed, progress=ctx.progress,
                        device=device)
    else:
        # A run killed mid-training resumes from its last epoch; the checkpoint is removed
        # once the model is saved (the stage's record then marks the work done).
        checkpoint = ctx.path("checkpoints", f"train-{tag}")
        if checkpoint.exists():
            ctx.log(f"      resuming training from {checkpoint.relative_to(ctx.out)}")
        res = train_npe(jax.random.PRNGKey(seed), theta, x, config=cfg, prior=sim.prior,
                        progress=ctx.progress, checkpoint=checkpoint)
    res.posterior.metadata.update(simulator=sim.name, seed=seed, experiment=ctx.config.name,
                                  num_simulations=int(theta.shape[0]))
    res.posterior.save(ctx.path("models", tag))
    if checkpoint is not None:
        remove_checkpoint(checkpoint)
        with contextlib.suppress(OSError):  # kept while another checkpoint is in it
            checkpoint.parent.rmdir()
    plotting.plot_training_curves({"train": res.train_loss, "validation": res.val_loss},
                                  ylabel="negative log-likelihood",
                                  title=f"NPE ({sec.estimator}) training, {tag}",
                                  path=ctx.path("plots", f"training_{tag}.png"))
    s = res.summary()
    ctx.log(f"      {s['epochs']} epochs, best validation NLL {s['best_val_loss']:.4f} at "
            f"epoch {s['best_epoch']}")
    return {"metrics": {"train/nll": float(res.train_loss[res.best_epoch]),
                        "valid/nll": float(res.best_val_loss),
                        "train/epochs": int(res.epochs)},
            "excluded_rows": int(res.excluded)}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _stage_evaluate(ctx: RunContext, *, seed: int, tag: str, plots: bool,
                    need_c2st: str = "") -> dict[str, Any]:
    """Score one trained posterior. ``need_c2st``: the config field that asks for a C2ST
    (a learning curve's metric); missing reference samples are then an error naming it,
    instead of a C2ST-less result."""
    import jax

    from sbi_engine import diagnostics, plotting
    from sbi_engine.posterior import load_posterior
    from sbi_engine.store import load_dataset

    ev = ctx.config.section("evaluation")
    data = ctx.config.section("data")
    posterior = load_posterior(ctx.out / "models" / tag)
    sim = _simulator(ctx.config)
    labels = list(sim.parameter_names)
    key = jax.random.PRNGKey(seed)
    metrics: dict[str, Any] = {}
    figures: list[list[str]] = []
    if data.num_test:
        test = load_dataset(ctx.out / "data" / "test.zarr").arrays(valid_only=True)
        lp = posterior.log_prob(test["theta"], test["x"])
        metrics["test/nll"] = float(-np.mean(lp[np.isfinite(lp)]))
    ref = _reference(ctx.config) if ev.observations else None
    c2sts = []
    n = ev.num_posterior_samples
    for k in ev.observations:
        x_o = np.asarray(ref.observation(k), np.float32)
        truth = (np.asarray(ref.true_parameters(k)) if callable(
            getattr(ref, "true_parameters", None)) else None)
        samples = posterior.sample(jax.random.fold_in(key, 1000 + k), n, x_o)
        _save_npy(ctx.path("samples", f"{tag}-obs{k}.npy"), samples)
        reference = None
        if callable(getattr(ref, "reference_posterior_samples", None)):
            try:
                reference = np.asarray(ref.reference_posterior_samples(k))[:n]
            except SbiEngineError as err:
                if need_c2st:
                    raise ConfigError(f"{need_c2st}: a C2ST needs the reference posterior "
                                      f"samples of observation {k}: {err}") from None
                ctx.log(f"      observation {k}: no reference samples ({err})")
        if reference is not None and ev.c2st != "none":
            ctx.log(f"      observation {k}: C2ST ({ev.c2st}) on {n:,} + "
                    f"{reference.shape[0]:,} samples")
            if ev.c2st == "sbibm":
                c2st = diagnostics.c2st_sbibm(reference, samples, seed=ev.c2st_seed)
            else:
                c2st = diagnostics.c2st_fast(jax.random.fold_in(key, 2000 + k), reference,
                                             samples, num_steps=ev.c2st_steps)
            metrics[f"obs{k}/c2st"] = float(c2st)
            c2sts.append(float(c2st))
            ctx.log(f"      observation {k}: C2ST {c2st:.3f} (0.5 = indistinguishable)")
        if plots:
            rel = f"plots/pairplot_{tag}_obs{k}.png"
            plotting.pairplot(samples, truth=truth, reference=reference, labels=labels,
                              title=f"{sim.name}, observation {k}: NPE "
                                    f"({ctx.config.section('npe').estimator}), {tag}",
                              path=ctx.path(rel))
            figures.append([rel, f"Posterior samples for observation {k} ({tag})"
                            + (" against the reference posterior" if reference is not None
                               else "") + (", true θ marked" if truth is not None else "")])
    if c2sts:
        metrics["c2st"] = float(np.mean(c2sts))
    if ev.sbc:
        test = load_dataset(ctx.out / "data" / "test.zarr").arrays(valid_only=True)
        m = min(ev.sbc, test["theta"].shape[0])
        theta, x = test["theta"][:m], test["x"][:m]
        L = ev.sbc_samples
        samples = posterior.sample(jax.random.fold_in(key, 3000), L, x)
        ranks = diagnostics.ranks_from_samples(samples, theta)
        sbc = diagnostics.sbc_uniformity(ranks, L)
        cred = diagnostics.tarp_credibility(jax.random.fold_in(key, 3001), samples, theta)
        cov = diagnostics.coverage_curve(cred, method="tarp")
        metrics["sbc/min_pvalue"] = float(np.min(sbc.chi2_pvalue))
        metrics["coverage/max_abs_error"] = float(cov.max_abs_error)
        metrics["coverage/atc"] = float(cov.atc)
        if plots:
            plotting.plot_sbc_ranks(ranks, L, labels=labels, path=ctx.path("plots",
                                                                        f"sbc_{tag}.png"))
            plotting.plot_coverage({"TARP": cov}, path=ctx.path("plots", f"coverage_{tag}.png"))
            figures += [[f"plots/sbc_{tag}.png", f"SBC rank histograms on {m} held-out "
                                                 f"simulations ({tag})"],
                        [f"plots/coverage_{tag}.png", f"Expected coverage (TARP), {tag}"]]
    return {"metrics": metrics, "figures": figures}


def _npe_report(ctx: RunContext) -> dict[str, Any]:
    seeds = ctx.config.seeds
    per_seed = {s: {**ctx.results[f"train/seed{s}"]["metrics"],
                    **ctx.results[f"evaluate/seed{s}"]["metrics"]} for s in seeds}
    has_c2st = any("c2st" in m for m in per_seed.values())
    primary = "c2st" if has_c2st else ("test/nll" if any(
        "test/nll" in m for m in per_seed.values()) else "valid/nll")
    write_metrics(ctx, per_seed, primary=primary,
                  headline=[primary, "test/nll", "valid/nll"])
    s0 = f"seed{seeds[0]}"
    figures = [*ctx.results[f"evaluate/seed{seeds[0]}"]["figures"],
               [f"plots/training_{s0}.png", f"Training and validation loss per epoch ({s0})"]]
    return {"figures": figures, "dirs": ["data", "models", "samples", "plots"],
            "sections": [_NPE_NOTE]}


def _npe_stages(config: ExperimentConfig) -> list[Stage]:
    data = config.section("data")
    stages = []
    if data.num_test:
        stages.append(_simulate_stage("simulate/test", seed=data.test_seed, num=data.num_test,
                                      name="test"))
    for i, s in enumerate(config.seeds):
        tag = f"seed{s}"
        stages += [
            _simulate_stage(f"simulate/{tag}", seed=s, num=data.num_simulations,
                            name=f"train-{tag}"),
            Stage(f"train/{tag}", functools.partial(_stage_train, seed=s, tag=tag,
                                                    data_name=f"train-{tag}")),
            Stage(f"evaluate/{tag}", functools.partial(_stage_evaluate, seed=s, tag=tag,
                                                       plots=i == 0)),
        ]
    stages.append(Stage("report", _npe_report))
    return stages


def _check_npe(config: ExperimentConfig) -> None:
    data, ev = config.section("data"), config.section("evaluation")
    if ev.sbc and ev.sbc > data.num_test:
        raise ConfigError(f"evaluation.sbc: {ev.sbc} held-out simulations requested but "
                          f"data.num_test is {data.num_test}")
    try:  # an option value the simulator refuses fails here, not after a stage has run
        _simulator(config)
    except ConfigError as err:
        raise ConfigError(f"data.options: {err}") from None
    if ev.observations:
        module = _reference(config)
        for i, k in enumerate(ev.observations):
            try:
                module.observation(k)
            except ConfigError as err:  # e.g. an observation number out of range
                raise ConfigError(f"evaluation.observations[{i}]: {err}") from None


# ------------------------------------------------------------------------------------
# Systematics stages
# ------------------------------------------------------------------------------------


def _study_metrics(result) -> dict[str, Any]:
    m: dict[str, Any] = {}
    nominal = [i for i, c in enumerate(result.cols) if c == "nominal"]
    for r, row in enumerate(result.rows):
        for k, v in result.summary.items():
            m[f"{row}/z_{k}"] = float(v[r])
        if nominal:
            m[f"{row}/auc_nominal"] = float(result.auc[r, nominal[0]])
    for k in ("nominal", "worst"):
        vals = np.asarray(result.summary[k], np.float64)
        if np.any(np.isfinite(vals)):
            m[f"best/z_{k}"] = float(np.nanmax(vals))
    return m


def _stage_study(ctx: RunContext, *, seed: int, tag: str, n_train: int | None,
                 plots: bool) -> dict[str, Any]:
    from sbi_engine.systematics import run_study

    cfg = dataclasses.replace(ctx.config.section("systematics"), seed=seed,
                              **({"n_train": n_train} if n_train else {}))
    # each trained step is checkpointed, so a killed run resumes inside the study; the
    # checkpoint is removed once the models are saved (the stage's record marks it done)
    checkpoint = ctx.path("checkpoints", "study", tag)
    result = run_study(cfg, progress=ctx.progress, log=ctx.log, checkpoint=checkpoint)
    result.to_json(ctx.path("results", f"{tag}.json"))
    _save_study_models(ctx, result, tag)
    figures = []
    if plots:
        result.plot(ctx.path("plots", f"heatmap_{tag}.png"))
        figures.append([f"plots/heatmap_{tag}.png", f"Asimov Z, training setting or method "
                                                    f"(rows) × test setting (columns), {tag}"])
    shutil.rmtree(checkpoint)
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        with contextlib.suppress(OSError):  # kept while other checkpoints are in it
            folder.rmdir()
    ctx.log(f"      {len(result.rows)} models × {len(result.cols)} test settings")
    return {"metrics": _study_metrics(result), "figures": figures,
            "rows": list(result.rows), "cols": list(result.cols)}


def _save_study_models(ctx: RunContext, result: Any, tag: str) -> None:
    """Every classifier of a study in ``models/<tag>/<row>/`` (classify.save_classifier)."""
    from sbi_engine.classify import save_classifier

    for i, (row, params) in enumerate(zip(result.rows, result.params)):
        name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", row)
        save_classifier(ctx.path("models", tag, f"{i:02d}-{name}"), params,
                        result.classifier_configs[i],
                        metadata={"row": row, "method": result.methods[i],
                                  "train_nu": dict(zip(result.nuisances,
                                                       np.asarray(result.train_nu[i]).tolist())),
                                  "generator": result.config.get("generator")})


def _systematics_report(ctx: RunContext) -> dict[str, Any]:
    seeds = ctx.config.seeds
    per_seed = {s: ctx.results[f"study/seed{s}"]["metrics"] for s in seeds}
    write_metrics(ctx, per_seed, primary="best/z_worst",
                  headline=["best/z_worst", "best/z_nominal"])
    # mean matrix over seeds: Z per (row, test setting) and the summary columns
    runs = [_read_json(ctx.out / "results" / f"seed{s}.json") for s in seeds]
    rows, cols = runs[0]["rows"], runs[0]["cols"]
    keys = [k for k in SUMMARY if any(v is not None for v in runs[0]["summary"][k])]
    stack = np.array([[[np.nan if v is None else v for v in r] for r in run["z"]]
                      for run in runs], np.float64)  # (S, R, C)
    summ = np.array([[[np.nan if v is None else v for v in run["summary"][k]] for k in keys]
                     for run in runs], np.float64)  # (S, K, R)
    with warnings.catch_warnings():  # a column NaN in every seed stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        z_mean, summ_mean = np.nanmean(stack, 0), np.nanmean(summ, 0)
    plot_z_matrix(z_mean, dict(zip(keys, summ_mean, strict=True)), rows, cols,
                  "Asimov Z" + (f", mean over {len(seeds)} seeds" if len(seeds) > 1 else ""),
                  path=ctx.path("plots", "heatmap.png"))
    gen = ctx.config.section("systematics").generator
    figures = [["plots/heatmap.png", f"{gen}: Asimov Z of each model (rows) on each test "
                                     f"setting (columns) and summary columns"
                                     + (", mean over seeds" if len(seeds) > 1 else "")
                                     + "; colour: distance to the best Z of the column, "
                                       "outlined: the best"]]
    if len(seeds) > 1:
        figures += ctx.results[f"study/seed{seeds[0]}"]["figures"]
    return {"figures": figures, "skip_groups": ["best"], "mark_best": True,
            "dirs": ["results", "models", "plots"],
            "sections": [_SYSTEMATICS_NOTE]}


_SYSTEMATICS_NOTE = """\
Rows: `bce@<setting>` is a cross-entropy classifier trained at that nuisance setting; other
rows are robust methods trained once. `z_nominal`: Asimov Z of the best cut at the nominal
nuisances; `z_worst`: the smallest Z over the test settings; `z_prior_avg`: the mean over
pseudo-experiments with the nuisances drawn from their prior; `z_profiled`: the expected
discovery Z0 of a binned pyhf fit with the nuisances profiled (not comparable with the
single-cut Z); `auc_nominal`: ROC AUC at nominal. `results/seed*.json` hold every number
of the matrix; `models/seed*/` every trained classifier (`sbi_engine.classify.load_classifier`)."""

_NPE_NOTE = """\
`nll`: negative log-likelihood of the true θ under the posterior estimate (train: the mean
minibatch loss of the best epoch; valid: the early-stopping set; test: held-out simulations).
`obsK/c2st`: classifier two-sample test accuracy between posterior and reference samples
for observation K (0.5 = indistinguishable; sbibm's definition with `c2st = "sbibm"`).
`sbc/min_pvalue`: the smallest chi-square p-value of the SBC rank histograms;
`coverage/max_abs_error` and `atc`: TARP expected coverage's largest deviation from the
diagonal and its area (> 0 under-confident)."""


def _systematics_stages(config: ExperimentConfig) -> list[Stage]:
    stages = [Stage(f"study/seed{s}", functools.partial(
        _stage_study, seed=s, tag=f"seed{s}", n_train=None, plots=i == 0))
        for i, s in enumerate(config.seeds)]
    return [*stages, Stage("report", _systematics_report)]


def _check_systematics(config: ExperimentConfig) -> None:
    from sbi_engine.events import list_generators

    sec = config.section("systematics")
    known = list_generators()
    if sec.generator.lower() not in known:
        raise ConfigError(f"systematics.generator: unknown event generator {sec.generator!r}; "
                          f"known: {', '.join(known)}")
    sec.build_generator()  # checks the nuisance names and yields


# ------------------------------------------------------------------------------------
# Learning curves
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """``y(n) = floor + sign · a · n^(-alpha)``, fitted by :func:`fit_power_law`.

    Attributes:
        a, alpha: scale and exponent (``alpha > 0``: the gap to ``floor`` shrinks).
        floor: the asymptote ``y(∞)``.
        sign: +1 when ``y`` approaches the floor from above, -1 from below.
        floor_fitted: whether ``floor`` was fitted (else given).
        rmse: root-mean-square residual of ``log |y - floor|``.
    """

    a: float
    alpha: float
    floor: float
    sign: float
    floor_fitted: bool
    rmse: float

    def predict(self, n: Any) -> np.ndarray:
        """``y`` at budgets ``n (B,)``."""
        return self.floor + self.sign * self.a * np.asarray(n, np.float64) ** (-self.alpha)

    def budget_for(self, target: float) -> float | None:
        """The budget where ``y`` reaches ``target`` (None if the fit never does)."""
        gap = self.sign * (target - self.floor)
        if gap <= 0 or self.alpha <= 0 or self.a <= 0:
            return None
        log_n = -math.log(gap / self.a) / self.alpha
        return float(math.exp(log_n)) if log_n < math.log(1e15) else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _loglog_fit(n: np.ndarray, gap: np.ndarray) -> tuple[float, float, float]:
    ln, lg = np.log(n), np.log(gap)
    slope, intercept = np.polyfit(ln, lg, 1)
    rmse = float(np.sqrt(np.mean((intercept + slope * ln - lg) ** 2)))
    return float(np.exp(intercept)), float(-slope), rmse


def fit_power_law(budgets: Any, values: Any, *, floor: float | None = None) -> PowerLaw | None:
    """Fit ``|y - floor| = a n^(-alpha)`` by least squares in log-log space.

    Args:
        budgets: ``(B,)`` training budgets ``n`` (> 0).
        values: ``(B,)`` metric ``y`` at each budget (e.g. the mean over seeds).
        floor: the known asymptote (C2ST: 0.5); ``None`` fits it too, by a scan over
            candidate floors beyond the data (needs at least 4 budgets).

    Returns:
        :class:`PowerLaw`, or ``None`` when there are too few usable points (points on
        the wrong side of a given floor are left out).
    """
    n = np.asarray(budgets, np.float64).reshape(-1)
    y = np.asarray(values, np.float64).reshape(-1)
    ok = np.isfinite(y) & (n > 0)
    n, y = n[ok], y[ok]
    if n.size < 2:
        return None
    if floor is not None:
        sign = 1.0 if np.mean(y - floor) >= 0 else -1.0
        keep = sign * (y - floor) > 0
        if keep.sum() < 2:
            return None
        a, alpha, rmse = _loglog_fit(n[keep], sign * (y[keep] - floor))
        return PowerLaw(a, alpha, float(floor), sign, False, rmse)
    if n.size < 4:
        return None
    # y decreasing in n approaches its floor from above (sign +1), increasing from below
    sign = 1.0 if np.polyfit(np.log(n), y, 1)[0] < 0 else -1.0
    span = float(np.ptp(y)) or 1.0
    edge = float(np.min(y)) if sign > 0 else float(np.max(y))
    best = None
    for d in span * np.logspace(-3, 2, 400):
        f = edge - sign * d
        a, alpha, _ = _loglog_fit(n, sign * (y - f))
        sse = float(np.sum((f + sign * a * n ** (-alpha) - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, f)
    f = best[1]
    a, alpha, rmse = _loglog_fit(n, sign * (y - f))
    return PowerLaw(a, alpha, f, sign, True, rmse)


#: Known asymptotes of metrics (by their last component).
FLOORS = {"c2st": 0.5}


def _lc_points(config: ExperimentConfig) -> list[tuple[int, int, str]]:
    lc = config.section("learning_curve")
    return [(b, s, f"n{b}-seed{s}") for b in lc.budgets for s in config.seeds]


def _is_c2st(metric: str) -> bool:
    """``c2st`` or ``obsK/c2st``: metrics an NPE evaluation computes from reference samples."""
    return metric.rsplit("/", 1)[-1] == "c2st"


def _learning_curve_stages(config: ExperimentConfig) -> list[Stage]:
    lc = config.section("learning_curve")
    stages: list[Stage] = []
    last = lc.budgets[-1]
    first_seed = config.seeds[0]
    if lc.method == "npe":
        data = config.section("data")
        if data.num_test:
            stages.append(_simulate_stage("simulate/test", seed=data.test_seed,
                                          num=data.num_test, name="test"))
        # one dataset per seed at the largest budget: row i depends only on (seed, i), so
        # its first n rows are exactly the dataset of budget n
        stages += [_simulate_stage(f"simulate/seed{s}", seed=s, num=last,
                                   name=f"train-seed{s}") for s in config.seeds]
        c2st = [m for m in lc.metrics if _is_c2st(m)]
        need = f"learning_curve.metrics ({c2st[0]!r})" if c2st else ""
        for b, s, tag in _lc_points(config):
            plots = b == last and s == first_seed
            stages += [
                Stage(f"train/n{b}/seed{s}", functools.partial(
                    _stage_train, seed=s, tag=tag, data_name=f"train-seed{s}", budget=b)),
                Stage(f"evaluate/n{b}/seed{s}", functools.partial(
                    _stage_evaluate, seed=s, tag=tag, plots=plots, need_c2st=need)),
            ]
    else:
        stages += [Stage(f"study/n{b}/seed{s}", functools.partial(
            _stage_study, seed=s, tag=tag, n_train=b, plots=b == last and s == first_seed))
            for b, s, tag in _lc_points(config)]
    return [*stages, Stage("report", _learning_curve_report)]


def _learning_curve_report(ctx: RunContext) -> dict[str, Any]:
    from sbi_engine import plotting

    config = ctx.config
    lc = config.section("learning_curve")
    per_seed: dict[int, dict[str, Any]] = {s: {} for s in config.seeds}
    figures: list[list[str]] = []
    for b, s, _ in _lc_points(config):
        if lc.method == "npe":
            m = {**ctx.results[f"train/n{b}/seed{s}"]["metrics"],
                 **ctx.results[f"evaluate/n{b}/seed{s}"]["metrics"]}
        else:
            m = ctx.results[f"study/n{b}/seed{s}"]["metrics"]
        per_seed[s].update({f"n{b}/{k}": v for k, v in m.items()})
        if b == lc.budgets[-1] and s == config.seeds[0]:
            stage = f"evaluate/n{b}/seed{s}" if lc.method == "npe" else f"study/n{b}/seed{s}"
            figures += ctx.results[stage]["figures"]
    summary = aggregate({str(s): m for s, m in per_seed.items()})
    budgets = np.asarray(lc.budgets, np.float64)
    top = lc.extrapolate_to or 10 * lc.budgets[-1]
    grid = np.unique(np.round(np.geomspace(lc.budgets[-1], top, 4)[1:]))
    curves: dict[str, Any] = {}
    lines = []
    for metric in lc.metrics:
        mean = np.array([summary.get(f"n{b}/{metric}", {}).get("mean", np.nan)
                         for b in lc.budgets])
        std = np.array([summary.get(f"n{b}/{metric}", {}).get("std", np.nan)
                        for b in lc.budgets])
        if not np.any(np.isfinite(mean)):
            raise ConfigError(f"learning_curve.metrics: no run produced metric {metric!r}; "
                              f"available: {sorted({k.split('/', 1)[1] for k in summary})}")
        floor = lc.floors.get(metric, FLOORS.get(metric.rsplit("/", 1)[-1]))
        fit = fit_power_law(budgets, mean, floor=floor)
        target = lc.targets.get(metric)
        entry: dict[str, Any] = {"budgets": list(lc.budgets), "mean": mean, "std": std,
                                 "fit": fit.to_dict() if fit else None}
        if fit:
            entry["extrapolation"] = {str(int(g)): float(fit.predict(g)) for g in grid}
            if target is not None:
                entry["target"] = {"value": target, "budget": fit.budget_for(target)}
        curves[metric] = entry
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)
        rel = f"plots/learning_curve_{safe}.png"
        plotting.plot_learning_curve(
            budgets, mean, std, fit=None if fit is None else fit.to_dict(), extrapolate_to=top,
            target=target, metric=metric, path=ctx.path(rel),
            title=f"{config.name}: {metric} against the training budget")
        figures.insert(len(curves) - 1, [rel, f"{metric} against the training budget "
                                              "(mean ± std over seeds), power-law fit and "
                                              "extrapolation (dashed)"])
        if fit:
            gap = (f"{metric} − {fit.floor:.4g}" if fit.floor >= 0
                   else f"{metric} + {-fit.floor:.4g}")
            law = (f"|{gap}| ≈ {fit.a:.3g} · n^(−{fit.alpha:.3f})"
                   + (" (floor fitted)" if fit.floor_fitted else ""))
            ext = ", ".join(f"n = {int(g):,}: {fit.predict(g):.4g}" for g in grid)
            lines.append(f"- **{metric}**: {law}; extrapolated {ext}")
            if target is not None:
                nb = fit.budget_for(target)
                lines.append(f"  - target {metric} = {target}: "
                             + (f"about {nb:,.0f} simulations" if nb else "not reached by "
                                "the fit"))
        else:
            lines.append(f"- **{metric}**: too few usable budgets for a power-law fit "
                         "(a fitted floor needs 4)")
    last = lc.budgets[-1]
    headline = [*(f"n{last}/{m}" for m in lc.metrics)]
    write_metrics(ctx, per_seed, primary=headline[0], headline=headline,
                  extra={"curves": curves})
    rows = [[f"{b:,}", *(_pm(summary.get(f"n{b}/{m}")) for m in lc.metrics)]
            for b in lc.budgets]
    table = _md_table(["budget", *lc.metrics], rows)
    section = "\n".join([f"## Learning curve ({lc.method})", "", table, "", *lines])
    return {"figures": figures, "sections": [section], "skip_groups": [f"n{b}" for b in
                                                                       lc.budgets],
            "dirs": ["data", "models", "samples", "results", "plots"]}


def _check_learning_curve(config: ExperimentConfig) -> None:
    lc = config.section("learning_curve")
    if lc.method == "npe":
        if config.sections.get("systematics") is not None:
            raise ConfigError("systematics: section [systematics] is not used by a learning "
                              "curve with method = 'npe'")
        if config.sections.get("data") is None:
            raise ConfigError("[data]: missing section; learning_curve.method = 'npe' needs "
                              "[data] (simulator)")
        _check_npe(config)
        c2st = [m for m in lc.metrics if _is_c2st(m)]
        ev = config.section("evaluation")
        if c2st and (ev.c2st == "none" or not ev.observations):
            why = ("evaluation.c2st is 'none'" if ev.c2st == "none"
                   else "evaluation.observations is empty")
            raise ConfigError(f"learning_curve.metrics: {c2st[0]!r} needs a C2ST against "
                              f"reference posterior samples, but {why}; list other metrics, "
                              f"e.g. metrics = [\"valid/nll\"]")
    else:
        if config.sections.get("systematics") is None:
            raise ConfigError("[systematics]: missing section; learning_curve.method = "
                              "'systematics' needs [systematics] (generator)")
        if config.sections.get("data") is not None:
            raise ConfigError("data: section [data] is not used by a learning curve with "
                              "method = 'systematics'")
        _check_systematics(config)


register_experiment_type(ExperimentType(
    name="npe",
    sections={"data": DataSection, "npe": NPESection, "evaluation": EvaluationSection},
    required=("data",),
    stages=_npe_stages,
    fixed={"npe": NPE_FIXED},
    check=_check_npe,
    description="simulate, train a neural posterior estimator, score it (NLL, C2ST, SBC)",
))
register_experiment_type(ExperimentType(
    name="systematics",
    sections={"systematics": SystematicsConfig},
    required=("systematics",),
    stages=_systematics_stages,
    fixed={"systematics": {"seed": "the top-level seeds"}},
    check=_check_systematics,
    description="train × test matrix of significance over nuisance settings, per seed",
))
register_experiment_type(ExperimentType(
    name="learning_curve",
    sections={"learning_curve": LearningCurveSection, "data": DataSection,
              "npe": NPESection, "evaluation": EvaluationSection,
              "systematics": SystematicsConfig},
    required=("learning_curve",),
    stages=_learning_curve_stages,
    fixed={"data": {"num_simulations": "learning_curve.budgets"},
           "npe": NPE_FIXED,
           "systematics": {"seed": "the top-level seeds",
                           "n_train": "learning_curve.budgets"}},
    check=_check_learning_curve,
    description="metrics against the training budget, power-law fit and extrapolation",
))


# ------------------------------------------------------------------------------------
# Sweeps, whole experiments
# ------------------------------------------------------------------------------------


def run_sweep(points: Sequence[SweepPoint], out_dir: str | os.PathLike, *,
              device: str | None = None, progress: bool = True, echo: bool = True,
              overwrite: bool = False, executor: Any = None) -> list[RunResult]:
    """Run every sweep point in ``out_dir/<point>`` and write the summary.

    Args:
        points: from :func:`resolve`.
        out_dir: the sweep directory (``sweep.json``, ``summary.md``, ``report.md``).
        device, progress, echo, overwrite: as :func:`run_point`.
        executor: ``None`` (one after the other, in this process) or anything with
            ``submit(fn, *args, **kwargs) -> future`` whose futures have ``result()``
            (a ``concurrent.futures`` executor, a ``dask.distributed.Client``).

    Returns:
        One :class:`RunResult` per point, in order.
    """
    out = Path(out_dir)
    if not points:
        raise ConfigError("sweep: no points")
    if (out / "config.json").exists():
        raise ConfigError(f"--out {out}: holds a single run, not a sweep; use another --out")
    names = [f"{i:03d}-{p.dirname}" if p.dirname else f"{i:03d}" for i, p in enumerate(points)]
    sweep = {"format": "sbi-engine-sweep", "experiment": points[0].config.name,
             "axes": list(points[0].label),
             "points": [{"dir": n, "label": dict(p.label)} for n, p in zip(names, points)]}
    _check_sweep_dir(out, sweep, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "sweep.json", sweep)
    results: list[RunResult] = []
    if executor is None:
        for i, (name, p) in enumerate(zip(names, points), 1):
            if echo:
                print(f"== sweep point {i}/{len(points)}: {name}", flush=True)
            results.append(run_point(p.config, out / name, device=device, progress=progress,
                                     echo=echo, overwrite=overwrite, label=p.label))
    else:
        futures = [executor.submit(run_point, p.config, out / name, device=device,
                                   progress=False, echo=False, overwrite=overwrite,
                                   label=p.label) for name, p in zip(names, points)]
        results = [f.result() for f in futures]
    write_sweep_summary(out, names, points, results)
    return results


def _check_sweep_dir(out: Path, sweep: dict[str, Any], *, overwrite: bool) -> None:
    """Refuse a sweep ``--out`` that holds something else: a folder that is not a sweep
    (its files would be overwritten), or another sweep (its points would mix into the
    leaderboard) unless ``overwrite``, which then removes the old sweep's own points."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "sweep.json").is_file():
        raise ConfigError(f"--out {out}: exists and is not a sweep directory (no sweep.json); "
                          "use a new or empty --out")
    try:
        old = _read_json(out / "sweep.json")
        old_dirs = [p["dir"] for p in old["points"]]
    except (SbiEngineError, KeyError, TypeError) as err:
        raise ConfigError(f"--out {out}: sweep.json is unreadable ({err}); use another --out "
                          "or remove it") from None
    if old == json.loads(json.dumps(jsonable(sweep, nan_to_none=True))):
        return  # the same sweep (as written to sweep.json): resume it
    if not overwrite:
        raise ConfigError(f"--out {out}: holds a different sweep ({old.get('experiment')!r}, "
                          f"points {old_dirs[:4]}{' ...' if len(old_dirs) > 4 else ''}); "
                          "use another --out, or --overwrite to replace it")
    new_dirs = {p["dir"] for p in sweep["points"]}
    for name in old_dirs:
        stale = out / str(name)
        if name not in new_dirs and stale.parent == out and stale.is_dir():
            shutil.rmtree(stale)


def _primary(metrics: Mapping[str, Any]) -> list[str]:
    out = [metrics.get("primary"), *list(metrics.get("headline", []))]
    return [m for i, m in enumerate(out) if m and m not in out[:i]]


def write_sweep_summary(out: Path, names: Sequence[str], points: Sequence[SweepPoint],
                        results: Sequence[RunResult]) -> Path:
    """``summary.json`` / ``summary.md`` / ``report.md`` of a sweep: one row per point."""
    axes = list(points[0].label)
    cols = _primary(results[0].metrics)
    rows, data = [], []
    for name, p, r in zip(names, points, results):
        summ = r.metrics.get("summary", {})
        rows.append([f"[{name}]({name}/report.md)", *(json.dumps(p.label[a]) for a in axes),
                     *(_pm(summ.get(c)) for c in cols)])
        data.append({"dir": name, "label": dict(p.label),
                     "metrics": {c: summ.get(c) for c in cols}})
    table = _md_table(["point", *axes, *cols], rows)
    _write_json(out / "summary.json", {"axes": axes, "metrics": cols, "points": data})
    atomic_write_bytes(out / "summary.md", (table + "\n").encode())
    cfg = points[0].config
    lines = [f"# Sweep: {cfg.name} ({cfg.type})", ""]
    if cfg.description:
        lines += [cfg.description, ""]
    n = len(cfg.seeds)
    lines += [f"{len(points)} points over {', '.join(f'`{a}`' for a in axes)}; metrics are "
              f"mean ± std over {n} seed{'s' if n > 1 else ''}. Rank with "
              f"`sbi-engine leaderboard {out} --metric {cols[0] if cols else 'NAME'}`.", "",
              table, ""]
    for name, r in zip(names, results):
        rep = r.out / "stages" / "report.json"
        figs = _read_json(rep)["result"].get("figures", []) if rep.exists() else []
        if figs:
            lines += [f"## {name}", "", *_figure_md([[f"{name}/{figs[0][0]}", figs[0][1]]])]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def run(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
        overrides: Iterable[str | tuple[str, Any]] = (), preset: str | None = None,
        device: str | None = None, progress: bool = True, echo: bool = True,
        overwrite: bool = False, executor: Any = None) -> list[RunResult]:
    """Read an experiment file and run it: one point into ``out_dir``, or a sweep.

    ``out_dir`` defaults to ``runs/<name>`` (``runs/<name>-<preset>`` with a preset).
    """
    spec = load_spec(path)
    points = resolve(spec, overrides=overrides, preset=preset)
    name = points[0].config.name
    out = Path(out_dir) if out_dir is not None else Path("runs") / (
        f"{name}-{preset}" if preset else name)
    if len(points) == 1 and not points[0].label:
        return [run_point(points[0].config, out, device=device, progress=progress, echo=echo,
                          overwrite=overwrite)]
    return run_sweep(points, out, device=device, progress=progress, echo=echo,
                     overwrite=overwrite, executor=executor)


# ------------------------------------------------------------------------------------
# Leaderboard
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeaderboardRow:
    """One run on the leaderboard.

    Attributes:
        rank: 1 = best.
        run: run directory, relative to the leaderboard's root.
        mean, std, n: the metric over seeds.
        type: experiment type.
        label: the sweep point, if any.
    """

    rank: int
    run: str
    mean: float
    std: float
    n: int
    type: str
    label: Mapping[str, Any]


def leaderboard(root: str | os.PathLike, metric: str | None = None, *,
                order: str | None = None) -> tuple[str, str, list[LeaderboardRow]]:
    """Rank the run directories under ``root`` by a metric (mean over seeds).

    Args:
        root: a run directory, a sweep, or any folder holding them.
        metric: metric name (as in ``metrics.json``); default: the first run's primary.
        order: ``"min"`` or ``"max"`` is better; default from the metric.

    Returns:
        ``(metric, order, rows)``; runs without the metric are left out.

    Raises:
        ConfigError: no runs, or no run has the metric (the message lists the metrics).
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"leaderboard: {root} is not a directory")
    files = sorted(root.rglob("metrics.json"))
    if not files:
        raise ConfigError(f"leaderboard: no run directories (metrics.json) under {root}")
    runs = [(f.parent, _read_json(f)) for f in files]
    if metric is None:
        metric = runs[0][1].get("primary")
    have = [(d, m) for d, m in runs if metric in m.get("summary", {})]
    if not have:
        names = sorted({k for _, m in runs for k in m.get("summary", {})})
        raise ConfigError(f"--metric: no run under {root} has metric {metric!r}; available: "
                          + ", ".join(names[:40]) + (" ..." if len(names) > 40 else ""))
    if order is None:
        order = have[0][1].get("directions", {}).get(metric) or metric_direction(metric)
    if order not in ("min", "max"):
        raise ConfigError(f"--order: expected min or max, got {order!r}")
    sign = 1.0 if order == "min" else -1.0
    have.sort(key=lambda dm: sign * dm[1]["summary"][metric]["mean"])
    rows = []
    for i, (d, m) in enumerate(have, 1):
        entry = m["summary"][metric]
        label = {}
        mfile = d / "manifest.json"
        if mfile.exists():
            label = _read_json(mfile).get("sweep_point") or {}
        rows.append(LeaderboardRow(i, str(d.relative_to(root)) if d != root else ".",
                                   entry["mean"], entry["std"], entry["n"],
                                   m.get("type", "?"), label))
    return metric, order, rows


def format_leaderboard(metric: str, order: str, rows: Sequence[LeaderboardRow]) -> str:
    """A plain-text leaderboard table."""
    header = ["rank", f"{metric} ({order} is better)", "seeds", "type", "run"]
    body = [[str(r.rank), f"{_fmt(r.mean, 4)} ± {_fmt(r.std, 4)}", str(r.n), r.type,
             r.run + (" (" + ", ".join(f"{k}={_short(v)}" for k, v in r.label.items()) + ")"
                      if r.label else "")] for r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------


def demo_specs(*, simulator: str = "two_moons", num: int = 10_000, estimator: str = "nsf",
               max_epochs: int | None = None, c2st_samples: int = 10_000, seed: int = 0,
               tiny: bool = False) -> dict[str, dict[str, Any]]:
    """The two experiments of ``sbi-engine demo`` as documents (``{"npe": ..., "systematics":
    ...}``): NPE on a benchmark task with C2ST against its reference posterior, and a small
    systematics study on the INFERNO toy (``tiny``: a seconds-long version of both)."""
    npe: dict[str, Any] = {
        "name": f"demo_npe_{simulator}", "type": "npe", "seeds": [seed],
        "description": f"NPE ({estimator}, sbi's defaults) on the sbibm task {simulator} with "
                       f"{num:,} simulations; C2ST against the sbibm reference posterior of "
                       "observation 1 (0.5 = indistinguishable).",
        "data": {"simulator": simulator, "num_simulations": num, "num_test": 1000},
        "npe": {"estimator": estimator},
        "evaluation": {"observations": [1], "num_posterior_samples": c2st_samples,
                       "c2st": "sbibm", "sbc": 200, "sbc_samples": 100},
    }
    if max_epochs is not None:
        npe["npe"]["max_epochs"] = max_epochs
    sysm: dict[str, Any] = {
        "name": "demo_systematics_inferno", "type": "systematics", "seeds": [seed],
        "description": "INFERNO toy (de Castro & Dorigo 2019): classifiers trained at each "
                       "setting of the background shift r and rate lambda (rows) and robust "
                       "methods, Asimov Z on every test setting (columns).",
        "systematics": {
            "generator": "inferno", "nuisances": ["r", "lambda"],
            "train_design": "one_at_a_time", "test_design": "one_at_a_time",
            "methods": ["bce", "augmented", "parameterised"], "n_train": 2000,
            "n_test": 5000, "n_prior": 8, "profile": True,
            "classifier": {"hidden": [32, 32], "steps": 600, "batch_size": 256,
                           "learning_rate": 0.003}},
    }
    if tiny:
        npe["data"].update(num_test=200)
        npe["npe"].update(flow={"hidden": 16, "transforms": 2})
        npe["evaluation"].update(sbc=0)
        sysm["systematics"].update(nuisances=["r"], train_design="extremes",
                                   test_design="extremes", methods=["bce"], n_train=300,
                                   n_test=500, n_prior=0, profile=False,
                                   classifier={"hidden": [8], "steps": 30, "batch_size": 128})
    return {"npe": npe, "systematics": sysm}


def write_index_report(out: str | os.PathLike, title: str,
                       runs: Sequence[tuple[str, RunResult]], intro: str = "") -> Path:
    """A ``report.md`` over several runs: each run's headline, scores and figures,
    with paths relative to ``out``."""
    out = Path(out)
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    for heading, r in runs:
        rel = os.path.relpath(r.out, out)
        summ = r.metrics.get("summary", {})
        lines += [f"## {heading}", "", f"Run directory `{rel}/` — full report: "
                  f"[{rel}/report.md]({rel}/report.md).", ""]
        for h in r.metrics.get("headline", []):
            lines.append(f"- **{h}**: {_pm(summ.get(h))}")
        lines.append("")
        rep = r.out / "stages" / "report.json"
        report = _read_json(rep)["result"] if rep.exists() else {}
        table = score_table(summ, skip=report.get("skip_groups", ()))
        if table:
            lines += [table, ""]
        lines += _figure_md([[f"{rel}/{p}", c] for p, c in report.get("figures", [])[:3]])
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
