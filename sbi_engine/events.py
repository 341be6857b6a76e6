"""The event-generator contract: labelled, weighted physics events with nuisance parameters.

An event generator describes a physics toy: a few *processes* (signal or background),
each with a distribution of event features ``x (F,)`` and an expected yield (events
per dataset), both depending on nuisance parameters ``ν (K,)`` (detector scales,
background shapes and normalisations). From it the engine builds the weighted,
labelled datasets that systematics-robust classifiers train and are evaluated on:
an event of process ``p`` simulated at ``ν`` has label ``y = 1`` if ``p`` is a signal
and weight ``w = expected_yield(p, ν) / n_p``, so the weights of each process sum to
its expected yield and weighted counts are expected event counts (the convention of
the HiggsML challenge, Adam-Bourdarios et al. 2014, and of INFERNO, de Castro &
Dorigo 2019, arXiv:1806.04743).

Contract (:class:`EventGenerator`, abstract; each toy is a final subclass that
implements two single-example functions):

- ``_sample_one(key, p, nu (K,)) -> x (F,)`` — one event of process index ``p``;
  pure JAX, and reparameterised where the toy allows it, so that ``x`` is a
  differentiable function of ``ν`` at a fixed key (what INFERNO's inference-aware
  loss needs);
- ``_yield(p, nu (K,)) -> ()`` — the expected yield, differentiable in ``ν``.

The base class adds everything else once: :meth:`EventGenerator.sample` (``n`` events
at one ``ν``; row ``i`` uses ``fold_in(key, i)``, so the first rows do not depend on
``n``), :meth:`EventGenerator.sample_each` (one ``ν`` per event, for nuisance-augmented
or adversarial training), :meth:`EventGenerator.expected_yield`, nominal values, the
nuisance prior (Gaussian constraints truncated to the range, box-uniform where
unconstrained), and :func:`make_dataset`. All of it is ``jit``/``vmap``/``grad``-able
in ``ν`` with ``n`` and the process static.

Registry: :func:`get_generator` / :func:`list_generators` / :func:`register_generator`;
generators come in through the ``sbi_engine.event_generators`` entry-point group
(``name = "package.module:factory"``, a zero-argument factory returning an
:class:`EventGenerator`), like simulators do.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.priors import BoxUniform, Prior, ProductPrior, TruncatedGaussian
from sbi_engine.registry import NAME_RE, Registry
from sbi_engine.simulator import Parameter, row_keys

__all__ = [
    "EventData",
    "EventGenerator",
    "Process",
    "get_generator",
    "list_generators",
    "make_dataset",
    "process_ids",
    "register_generator",
]

ENTRY_POINT_GROUP = "sbi_engine.event_generators"


@dataclasses.dataclass(frozen=True)
class Process:
    """One physics process of a generator.

    Args:
        name: identifier, unique within a generator (e.g. ``"signal"``, ``"ttbar"``).
        signal: whether events of this process are signal (label 1) or background (0).
    """

    name: str
    signal: bool

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ConfigError(f"Process name: expected lowercase [a-z0-9_-], got {self.name!r}")


class EventData(NamedTuple):
    """A labelled, weighted event sample (unpacks as ``x, y, w``).

    Attributes:
        x: ``(N, F)`` float32 features.
        y: ``(N,)`` float32 labels, 1 for signal processes and 0 for backgrounds.
        w: ``(N,)`` float32 weights; per process they sum to its expected yield.
    """

    x: jax.Array
    y: jax.Array
    w: jax.Array


class EventGenerator(abc.ABC):
    """Abstract event generator. Subclasses are final and implement two functions.

    Attributes:
        name: registry name (lowercase).
        version: bumped whenever outputs for the same key change.
        processes: the processes, signal and background, ``(P,)``.
        nuisances: nuisance specs ``(K,)`` with nominal value and range.
        constraints: per nuisance, the width of its Gaussian auxiliary constraint
            around the nominal value, or ``None`` if it is unconstrained.
        features: names of the ``F`` event features.
        description: one paragraph, shown in listings.
    """

    def _init_spec(self, *, name: str, processes: Sequence[Process],
                   nuisances: Sequence[Parameter], features: Sequence[str],
                   constraints: Sequence[float | None] | None = None, version: str = "1",
                   description: str = "") -> None:
        """Validate and store the spec; called once from a subclass ``__init__``."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"generator name: expected lowercase [a-z0-9_-], got {name!r}")
        processes, nuisances, features = tuple(processes), tuple(nuisances), tuple(features)
        if not processes or not any(p.signal for p in processes) or all(
                p.signal for p in processes):
            raise ConfigError(f"generator {name!r}: needs at least one signal and one "
                              f"background process")
        for label, names in (("process", [p.name for p in processes]),
                             ("nuisance", [p.name for p in nuisances]),
                             ("feature", list(features))):
            if len(set(names)) != len(names):
                raise ConfigError(f"generator {name!r}: duplicate {label} names in {names}")
        if not features:
            raise ConfigError(f"generator {name!r}: needs at least one feature")
        for par in nuisances:
            if par.nominal is None:
                raise ConfigError(f"generator {name!r}: nuisance {par.name!r} needs a nominal "
                                  f"value")
        constraints = (None,) * len(nuisances) if constraints is None else tuple(constraints)
        if len(constraints) != len(nuisances):
            raise ConfigError(f"generator {name!r}: {len(constraints)} constraints for "
                              f"{len(nuisances)} nuisances")
        for par, width in zip(nuisances, constraints):
            if width is not None and not float(width) > 0:
                raise ConfigError(f"generator {name!r}: constraint of {par.name!r} must be "
                                  f"> 0 or None, got {width}")
        self.name = name
        self.version = str(version)
        self.description = description
        self.processes: tuple[Process, ...] = processes
        self.nuisances: tuple[Parameter, ...] = nuisances
        self.constraints: tuple[float | None, ...] = tuple(
            None if c is None else float(c) for c in constraints)
        self.features: tuple[str, ...] = features

    # -- what a toy implements (single example) --------------------------------------

    @abc.abstractmethod
    def _sample_one(self, key: jax.Array, p: int, nu: jax.Array) -> jax.Array:
        """One event of process index ``p`` (static) at ``nu (K,)``. Returns ``x (F,)``."""

    @abc.abstractmethod
    def _yield(self, p: int, nu: jax.Array) -> jax.Array:
        """Expected yield of process index ``p`` (static) at ``nu (K,)``. Returns ``()``."""

    # -- the engine side (final) ------------------------------------------------------

    @property
    def process_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.processes)

    @property
    def signal_processes(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.processes if p.signal)

    @property
    def background_processes(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.processes if not p.signal)

    @property
    def nuisance_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.nuisances)

    @property
    def dim_nu(self) -> int:
        return len(self.nuisances)

    @property
    def dim_x(self) -> int:
        return len(self.features)

    def process_index(self, process: str | int) -> int:
        """Index of ``process`` (a name or an index) in :attr:`processes`."""
        if isinstance(process, (int, np.integer)) and not isinstance(process, bool):
            if not 0 <= int(process) < len(self.processes):
                raise ConfigError(f"process: index {process} out of range for generator "
                                  f"{self.name!r} with {len(self.processes)} processes")
            return int(process)
        names = self.process_names
        if process not in names:
            raise ConfigError(f"process: unknown process {process!r} for generator "
                              f"{self.name!r}; known: {', '.join(names)}")
        return names.index(process)

    def nominal_nu(self) -> np.ndarray:
        """Nominal nuisance values ``(K,)`` float32."""
        return np.array([p.nominal for p in self.nuisances], dtype=np.float32)

    def make_nu(self, values: Mapping[str, float] | None = None, /, **kwargs: float
                ) -> jax.Array:
        """A nuisance vector ``(K,)``: nominal values with some set by name.

        ``gen.make_nu(r=0.4)`` or ``gen.make_nu({"lambda": 2.5})``. Values outside a
        nuisance's range are allowed (a stress test); unknown names are an error.
        """
        values = {**(values or {}), **kwargs}
        unknown = sorted(set(values) - set(self.nuisance_names))
        if unknown:
            raise ConfigError(f"nu: unknown nuisance(s) {unknown} for generator "
                              f"{self.name!r}; known: {', '.join(self.nuisance_names)}")
        nu = jnp.asarray(self.nominal_nu())
        for name, value in values.items():
            nu = nu.at[self.nuisance_names.index(name)].set(value)
        return nu

    @property
    def nuisance_prior(self) -> Prior:
        """Prior over ``ν``: a Gaussian constraint truncated to the range, else box-uniform."""
        if not self.nuisances:
            raise ConfigError(f"generator {self.name!r} has no nuisance parameters")
        parts: list[Prior] = []
        for par, width in zip(self.nuisances, self.constraints):
            if width is None:
                parts.append(BoxUniform([par.low], [par.high]))
            else:
                parts.append(TruncatedGaussian([par.nominal], [width], [par.low], [par.high]))
        return parts[0] if len(parts) == 1 else ProductPrior(parts)

    def _nu(self, nu: Any) -> jax.Array:
        if nu is None:
            return jnp.asarray(self.nominal_nu())
        nu = jnp.asarray(nu, jnp.float32)
        if nu.shape != (self.dim_nu,):
            raise ShapeError(f"nu: expected shape ({self.dim_nu},) for generator "
                             f"{self.name!r} (nuisances {', '.join(self.nuisance_names)}), "
                             f"got {tuple(nu.shape)}")
        return nu

    def sample(self, key: jax.Array, n: int, process: str | int, nu: Any = None
               ) -> jax.Array:
        """Draw ``n`` events of one process at one nuisance setting.

        Args:
            key: a ``jax.random`` key; row ``i`` uses ``fold_in(key, i)``.
            n: number of events (static).
            process: process name or index (static).
            nu: ``(K,)`` nuisance values; ``None`` means nominal. May be traced.

        Returns:
            ``x (n, F)`` float32.
        """
        p = self.process_index(process)
        nu = self._nu(nu)
        keys = row_keys(key, 0, int(n))
        return jax.vmap(lambda k: self._sample_one(k, p, nu))(keys).astype(jnp.float32)

    def sample_each(self, key: jax.Array, process: str | int, nu: Any) -> jax.Array:
        """Draw one event per nuisance row (e.g. ``ν`` drawn from its prior per event).

        Args:
            key: a ``jax.random`` key; row ``i`` uses ``fold_in(key, i)`` as in :meth:`sample`.
            process: process name or index (static).
            nu: ``(n, K)`` nuisance values, one row per event.

        Returns:
            ``x (n, F)`` float32.
        """
        p = self.process_index(process)
        nu = jnp.asarray(nu, jnp.float32)
        if nu.ndim != 2 or nu.shape[1] != self.dim_nu:
            raise ShapeError(f"nu: expected shape (n, {self.dim_nu}) for generator "
                             f"{self.name!r}, got {tuple(nu.shape)}")
        keys = row_keys(key, 0, nu.shape[0])
        return jax.vmap(lambda k, v: self._sample_one(k, p, v))(keys, nu).astype(jnp.float32)

    def expected_yield(self, process: str | int, nu: Any = None) -> jax.Array:
        """Expected number of events of ``process`` at ``nu (K,)`` (nominal if ``None``).

        Differentiable in ``nu``. Returns a float32 scalar.
        """
        return jnp.asarray(self._yield(self.process_index(process), self._nu(nu)), jnp.float32)

    def spec(self) -> dict[str, Any]:
        """JSON description: name, version, processes, nuisances, constraints, features."""
        return {
            "name": self.name,
            "version": self.version,
            "processes": [dataclasses.asdict(p) for p in self.processes],
            "nuisances": [p.to_dict() for p in self.nuisances],
            "constraints": list(self.constraints),
            "features": list(self.features),
            "nominal_yields": {p.name: float(self.expected_yield(p.name))
                               for p in self.processes},
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, processes={list(self.process_names)}, "
                f"K={self.dim_nu}, F={self.dim_x})")


def _counts(generator: EventGenerator, n_per_process: int | Mapping[str, int]) -> list[int]:
    if isinstance(n_per_process, Mapping):
        unknown = sorted(set(n_per_process) - set(generator.process_names))
        if unknown:
            raise ConfigError(f"n_per_process: unknown process(es) {unknown}; known: "
                              f"{', '.join(generator.process_names)}")
        counts = [int(n_per_process.get(name, 0)) for name in generator.process_names]
    else:
        counts = [int(n_per_process)] * len(generator.processes)
    if any(c < 0 for c in counts) or not any(counts):
        raise ConfigError(f"n_per_process: expected non-negative counts, not all zero, "
                          f"got {n_per_process!r}")
    return counts


def process_ids(generator: EventGenerator, n_per_process: int | Mapping[str, int]
                ) -> np.ndarray:
    """Process index of each event of :func:`make_dataset` (same ``n_per_process``). ``(N,)``."""
    counts = _counts(generator, n_per_process)
    return np.repeat(np.arange(len(counts)), counts)


def make_dataset(key: jax.Array, generator: EventGenerator, nu: Any = None,
                 n_per_process: int | Mapping[str, int] = 1000) -> EventData:
    """A labelled, weighted dataset: every process of ``generator`` simulated at ``nu``.

    Events are concatenated in the order of ``generator.processes``; process ``p``
    uses the key ``fold_in(key, p)``, so its events do not depend on the other
    processes' counts. Each event of process ``p`` has weight
    ``expected_yield(p, ν) / n_p`` (with one ``ν`` per event, its own ``ν``), so the
    weights of ``p`` sum to its expected yield (its mean yield over the rows).

    Args:
        key: a ``jax.random`` key.
        generator: the event generator.
        nu: ``(K,)`` nuisance values (``None``: nominal), or ``(N, K)`` — one row per
            event, in the output order (see :func:`process_ids`).
        n_per_process: events per process: one int for all, or ``{process: n}``
            (processes left out get none). Static.

    Returns:
        :class:`EventData` ``(x (N, F), y (N,), w (N,))``.
    """
    counts = _counts(generator, n_per_process)
    per_event = nu is not None and jnp.ndim(nu) == 2
    if per_event:
        nu = jnp.asarray(nu, jnp.float32)
        if nu.shape != (sum(counts), generator.dim_nu):
            raise ShapeError(f"nu: expected shape ({generator.dim_nu},) or "
                             f"({sum(counts)}, {generator.dim_nu}), got {tuple(nu.shape)}")
    else:
        nu = generator._nu(nu)
    xs, ys, ws = [], [], []
    start = 0
    for p, (proc, n) in enumerate(zip(generator.processes, counts)):
        if n == 0:
            continue
        key_p = jax.random.fold_in(key, p)
        if per_event:
            nu_p = nu[start:start + n]
            x = generator.sample_each(key_p, p, nu_p)
            w = jax.vmap(lambda v, p=p: generator._yield(p, v))(nu_p) / n
        else:
            x = generator.sample(key_p, n, p, nu)
            w = jnp.full((n,), generator._yield(p, nu) / n)
        xs.append(x)
        ys.append(jnp.full((n,), 1.0 if proc.signal else 0.0, jnp.float32))
        ws.append(w.astype(jnp.float32))
        start += n
    return EventData(jnp.concatenate(xs), jnp.concatenate(ys), jnp.concatenate(ws))


# ------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------

_GENERATORS: Registry[EventGenerator] = Registry("event generator", ENTRY_POINT_GROUP,
                                                 EventGenerator)
_REGISTRY = _GENERATORS.entries


def register_generator(name: str, factory: Callable[..., EventGenerator] | EventGenerator,
                       *, overwrite: bool = False) -> None:
    """Register an event-generator factory (or instance) under a lowercase ``name``."""
    _GENERATORS.register(name, factory, overwrite=overwrite)


def list_generators() -> list[str]:
    """Names of all event generators: registered in-process and through entry points."""
    return _GENERATORS.names()


def get_generator(name: str, **kwargs: Any) -> EventGenerator:
    """Build the event generator registered as ``name`` (case-insensitive).

    Keyword arguments go to the factory (e.g. ``s_exp`` for INFERNO). Raises
    :class:`~sbi_engine.errors.UnknownSimulatorError` listing the known names.
    """
    return _GENERATORS.get(name, **kwargs)
