"""The simulator contract, parameter specs and the simulator registry.

A simulator maps parameters ``θ (D,)`` (and optionally nuisance parameters
``ν (K,)``) to data ``x (X,)`` using randomness it receives explicitly. Two kinds:

- :class:`JaxSimulator` wraps a *pure, single-example* JAX function
  ``fn(key, theta (D,), nu (K,) | None) -> x (X,)``. The engine ``vmap``s and
  ``jit``s it once and runs large batches on the default device.
- :class:`BlackBoxSimulator` wraps a plain Python/numpy callable
  ``fn(theta (D,), nu (K,) | None, rng: numpy.random.Generator) -> x (X,)`` (or a
  batched one with ``batched=True``). The engine runs it row by row, optionally
  in a process pool; a row that raises, returns the wrong shape or non-finite values
  becomes a NaN row that is counted and reported, never an exception through the batch.

Randomness: the batch key is split per *row* with ``fold_in(key, row_index)``, so a
row's result depends only on the key and its index, never on how rows are batched.

Registry: :func:`get_simulator` / :func:`list_simulators` / :func:`register_simulator`;
third-party packages register factories through the ``sbi_engine.simulators``
entry-point group (``name = "package.module:factory"``), where a factory is a
zero-argument callable returning a :class:`Simulator` (a ready instance works too).
"""

from __future__ import annotations

import abc
import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.priors import Prior, prior_from_parameters
from sbi_engine.registry import NAME_RE, Registry
from sbi_engine.workers import WorkerPool, run_rows

__all__ = [
    "BlackBoxSimulator",
    "JaxSimulator",
    "Parameter",
    "SimulationReport",
    "Simulator",
    "get_simulator",
    "list_simulators",
    "register_simulator",
    "row_keys",
]

ENTRY_POINT_GROUP = "sbi_engine.simulators"


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One named parameter: its range, scale, unit and (for nuisances) nominal value.

    Args:
        name: identifier, unique within a simulator.
        low, high: the support (``-inf``/``inf`` allowed for Gaussian priors).
        scale: ``"linear"`` (box-uniform by default) or ``"log"`` (log-uniform; ``low > 0``).
        unit: free text, shown by ``sbi-engine simulators``.
        nominal: the nominal value of a nuisance parameter (inside ``[low, high]``).
    """

    name: str
    low: float
    high: float
    scale: Literal["linear", "log"] = "linear"
    unit: str = ""
    nominal: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Parameter name: expected a non-empty string, got {self.name!r}")
        if self.scale not in ("linear", "log"):
            raise ConfigError(f"Parameter {self.name!r} scale: expected 'linear' or 'log', "
                              f"got {self.scale!r}")
        if not float(self.high) > float(self.low):
            raise ConfigError(f"Parameter {self.name!r}: expected high > low, "
                              f"got [{self.low}, {self.high}]")
        if self.scale == "log" and not float(self.low) > 0:
            raise ConfigError(f"Parameter {self.name!r}: log scale needs low > 0")
        if self.nominal is not None and not (self.low <= self.nominal <= self.high):
            raise ConfigError(f"Parameter {self.name!r}: nominal {self.nominal} outside "
                              f"[{self.low}, {self.high}]")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable): name, bounds, scale, unit."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SimulationReport:
    """Counts of the rows a batch produced: total, invalid (NaN/inf/failed), and why."""

    total: int = 0
    invalid: int = 0
    errors: Counter = dataclasses.field(default_factory=Counter)

    def add(self, other: SimulationReport) -> None:
        """Accumulate ``other``'s counts (total, invalid, errors by kind) into this report."""
        self.total += other.total
        self.invalid += other.invalid
        self.errors.update(other.errors)

    def summary(self, most: int = 8) -> str:
        """One line: counts, and the ``most`` commonest failure reasons."""
        frac = self.invalid / self.total if self.total else 0.0
        text = f"{self.total} simulations, {self.invalid} invalid ({100 * frac:.2f}%)"
        if self.errors:
            text += "; " + ", ".join(f"{k}: {v}" for k, v in self.errors.most_common(most))
            if len(self.errors) > most:
                text += f" and {len(self.errors) - most} more reasons"
        return text


def row_keys(key: jax.Array, start: int | jax.Array, n: int) -> jax.Array:
    """Per-row keys ``fold_in(key, start + i)`` for ``i < n``. Returns ``(n, 2)`` uint32.

    ``start`` may be traced (one compilation serves every chunk); ``n`` is static.
    """
    idx = jnp.asarray(start, jnp.uint32) + jnp.arange(n, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


class Simulator(abc.ABC):
    """A simulator of ``x`` given ``θ`` (and nuisances ``ν``). Subclasses are final.

    Attributes:
        name: registry name (lowercase).
        version: bumped whenever outputs for the same key change; recorded in datasets.
        parameters: ``θ`` specs, ``(D,)``.
        nuisances: ``ν`` specs, ``(K,)`` (empty for most simulators).
        observables: names of the ``X`` entries of ``x``.
        prior: prior over ``θ`` (default: box/log-uniform from ``parameters``).
        nuisance_prior: prior over ``ν`` (default: box/log-uniform from ``nuisances``).
    """

    kind: str = "abstract"

    def _init_common(self, name, parameters, observables, prior, nuisances, nuisance_prior,
                      version, description):
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"simulator name: expected lowercase [a-z0-9_-], got {name!r}")
        parameters, nuisances = tuple(parameters), tuple(nuisances)
        names = [p.name for p in parameters + nuisances]
        dupes = sorted(n for n, c in Counter(names).items() if c > 1)
        if dupes:
            raise ConfigError(f"simulator {name!r}: duplicate parameter names {dupes}")
        if not parameters:
            raise ConfigError(f"simulator {name!r}: needs at least one parameter")
        self.name = name
        self.version = str(version)
        self.description = description
        self.parameters: tuple[Parameter, ...] = parameters
        self.nuisances: tuple[Parameter, ...] = nuisances
        self.observables: tuple[str, ...] = tuple(observables)
        if not self.observables:
            raise ConfigError(f"simulator {name!r}: needs at least one observable")
        self.prior: Prior = prior if prior is not None else prior_from_parameters(parameters)
        if self.prior.dim != len(parameters):
            raise ConfigError(f"simulator {name!r}: prior has dim {self.prior.dim}, "
                              f"but {len(parameters)} parameters are declared")
        if nuisances and nuisance_prior is None:
            nuisance_prior = prior_from_parameters(nuisances)
        self.nuisance_prior: Prior | None = nuisance_prior
        self.options: dict[str, Any] = {}  # factory keyword arguments, set by get_simulator

    @property
    def dim_theta(self) -> int:
        return len(self.parameters)

    @property
    def dim_nu(self) -> int:
        return len(self.nuisances)

    @property
    def dim_x(self) -> int:
        return len(self.observables)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def nominal_nu(self) -> np.ndarray:
        """Nominal nuisance values ``(K,)`` (midpoint of the range where none is given)."""
        values = [p.nominal if p.nominal is not None else 0.5 * (p.low + p.high)
                  for p in self.nuisances]
        return np.array(values, dtype=np.float32)

    def spec(self) -> dict[str, Any]:
        """JSON description: name, version, kind, parameters, nuisances, observables, prior."""
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "parameters": [p.to_dict() for p in self.parameters],
            "nuisances": [p.to_dict() for p in self.nuisances],
            "observables": list(self.observables),
            "prior": self.prior.to_dict(),
            "nuisance_prior": self.nuisance_prior.to_dict() if self.nuisance_prior else None,
            "options": dict(sorted(self.options.items())),
        }

    def check_theta(self, theta: Any, *, field: str = "theta", check_support: bool = True
                    ) -> np.ndarray:
        """Validate ``theta (n, D)``: shape, finiteness and prior support. Returns float32."""
        return _check_rows(theta, self.dim_theta, field, self.parameters, self.prior
                           if check_support else None)

    def check_nu(self, nu: Any, n: int) -> np.ndarray | None:
        """Validate ``nu (n, K)``; ``None`` means nominal values. Returns float32 or None."""
        if self.dim_nu == 0:
            if nu is not None:
                raise ShapeError(f"nu: simulator {self.name!r} has no nuisance parameters")
            return None
        if nu is None:
            return np.broadcast_to(self.nominal_nu(), (n, self.dim_nu)).copy()
        nu = _check_rows(nu, self.dim_nu, "nu", self.nuisances, self.nuisance_prior)
        if nu.shape[0] != n:
            raise ShapeError(f"nu: expected {n} rows (one per theta row), got {nu.shape[0]}")
        return nu

    @abc.abstractmethod
    def simulate(self, key: jax.Array, theta: Any, nu: Any = None) -> np.ndarray | jax.Array:
        """Simulate one ``x`` per row. ``theta (n, D)``, ``nu (n, K)`` → ``x (n, X)``.

        Failed rows are NaN.
        """

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, D={self.dim_theta}, "
                f"K={self.dim_nu}, X={self.dim_x})")


def _check_rows(arr, dim, field, specs, prior) -> np.ndarray:
    raw = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    if raw.dtype.kind not in "iuf":  # complex would lose its imaginary part; text, bool, ...
        raise ShapeError(f"{field}: expected a numeric array (int or float), got dtype {raw.dtype}")
    with np.errstate(over="ignore"):  # too large for float32 -> inf, reported below
        arr = raw.astype(np.float32)
    if arr.ndim == 1 and arr.shape[0] == dim:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ShapeError(f"{field}: expected shape (n, {dim}), got {tuple(arr.shape)}")
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ShapeError(f"{field}: row {r}, {specs[c].name!r} is {arr[r, c]} (must be finite)")
    if prior is not None:
        low, high = prior.support
        # Compare in float32, the dtype θ is simulated in: a bound such as 0.01 rounds
        # below itself in float32, and a θ exactly on it must stay inside.
        out = (arr < low.astype(np.float32)) | (arr > high.astype(np.float32))
        if out.any():
            r, c = np.argwhere(out)[0]
            raise ShapeError(f"{field}: row {r}, {specs[c].name!r} = {arr[r, c]:g} is outside "
                             f"the prior support [{low[c]:g}, {high[c]:g}]")
    return arr


class JaxSimulator(Simulator):
    """A simulator defined by a pure single-example JAX function.

    Args:
        name: registry name.
        parameters: θ specs ``(D,)``.
        observables: names of the ``X`` outputs.
        fn: ``fn(key, theta (D,), nu (K,) | None) -> x (X,)``, pure and jit-able.
        prior, nuisances, nuisance_prior, version, description: see :class:`Simulator`.
    """

    kind = "jax"

    def __init__(self, name: str, parameters: Sequence[Parameter], observables: Sequence[str],
                 fn: Callable, *, prior: Prior | None = None,
                 nuisances: Sequence[Parameter] = (), nuisance_prior: Prior | None = None,
                 version: str = "1", description: str = ""):
        self._init_common(name, parameters, observables, prior, nuisances, nuisance_prior,
                          version, description)
        self.fn = fn
        self._batched = jax.jit(jax.vmap(lambda k, t, n: fn(k, t, n)))
        self._batched_no_nu = jax.jit(jax.vmap(lambda k, t: fn(k, t, None)))

    def simulate_rows(self, keys: jax.Array, theta: jax.Array, nu: jax.Array | None = None
                      ) -> jax.Array:
        """One row per key: ``keys (n, 2)``, ``theta (n, D)``, ``nu (n, K)`` → ``(n, X)``.

        No validation; this is the jitted hot path used by the engine.
        """
        if self.dim_nu == 0:
            return self._batched_no_nu(keys, theta)
        return self._batched(keys, theta, nu)

    def simulate(self, key, theta, nu=None):
        theta = self.check_theta(theta)
        nu = self.check_nu(nu, theta.shape[0])
        return self.simulate_rows(row_keys(key, 0, theta.shape[0]), theta, nu)


class BlackBoxSimulator(Simulator):
    """A simulator defined by a plain Python/numpy callable.

    Args:
        name: registry name.
        parameters: θ specs ``(D,)``.
        observables: names of the ``X`` outputs.
        fn: ``fn(theta (D,), nu (K,) | None, rng) -> x (X,)``, or with ``batched=True``
            ``fn(theta (n, D), nu (n, K) | None, rng) -> x (n, X)``. ``rng`` is a
            ``numpy.random.Generator`` seeded from the row's key. Must be picklable
            (a module-level function) to run with ``workers > 1`` or a ``timeout``.
        batched: whether ``fn`` takes whole batches.
        prior, nuisances, nuisance_prior, version, description: see :class:`Simulator`.
    """

    kind = "blackbox"

    def __init__(self, name: str, parameters: Sequence[Parameter], observables: Sequence[str],
                 fn: Callable, *, batched: bool = False, prior: Prior | None = None,
                 nuisances: Sequence[Parameter] = (), nuisance_prior: Prior | None = None,
                 version: str = "1", description: str = ""):
        self._init_common(name, parameters, observables, prior, nuisances, nuisance_prior,
                          version, description)
        self.fn = fn
        self.batched = bool(batched)

    def simulate_rows(self, keys, theta, nu=None, *, workers: int = 1,
                      timeout: float | None = None, pool: WorkerPool | None = None
                      ) -> tuple[np.ndarray, SimulationReport]:
        """Run rows, capturing failures. ``keys (n, 2)``, ``theta (n, D)`` → ``x (n, X)``, report.

        With ``workers > 1``, a ``timeout`` (seconds per simulation) or a given ``pool``,
        rows run in supervised worker processes (:mod:`sbi_engine.workers`): a hung
        simulation is killed and a crashed worker replaced, and only their rows are lost.
        Otherwise rows run in this process.
        """
        keys, theta = np.asarray(keys), np.asarray(theta, dtype=np.float32)
        n = theta.shape[0]
        if pool is not None:
            x, reasons = pool.run(keys, theta, nu)
        elif workers > 1 or timeout is not None:
            with self.worker_pool(workers, timeout) as own:
                x, reasons = own.run(keys, theta, nu)
        else:
            x, reasons = run_rows(self.fn, self.batched, self.dim_x, keys, theta, nu)
        report = SimulationReport(total=n, invalid=sum(r is not None for r in reasons),
                                  errors=Counter(r for r in reasons if r is not None))
        return x, report

    def worker_pool(self, workers: int = 1, timeout: float | None = None) -> WorkerPool:
        """A :class:`~sbi_engine.workers.WorkerPool` for this simulator (reuse it across calls)."""
        try:
            return WorkerPool(self.fn, batched=self.batched, dim_x=self.dim_x,
                              workers=workers, timeout=timeout)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def simulate(self, key, theta, nu=None, *, workers: int = 1, timeout: float | None = None):
        theta = self.check_theta(theta)
        nu = self.check_nu(nu, theta.shape[0])
        keys = np.asarray(row_keys(key, 0, theta.shape[0]))
        return self.simulate_rows(keys, theta, nu, workers=workers, timeout=timeout)[0]


# ------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------

_SIMULATORS: Registry[Simulator] = Registry("simulator", ENTRY_POINT_GROUP, Simulator)
_REGISTRY = _SIMULATORS.entries


def register_simulator(name: str, factory: Callable[..., Simulator] | Simulator, *,
                       overwrite: bool = False) -> None:
    """Register a simulator factory (or instance) under a lowercase ``name``."""
    _SIMULATORS.register(name, factory, overwrite=overwrite)


def list_simulators() -> list[str]:
    """Names of all simulators: registered in-process and through entry points, sorted."""
    return _SIMULATORS.names()


def get_simulator(name: str, **kwargs: Any) -> Simulator:
    """Build the simulator registered as ``name`` (case-insensitive).

    Keyword arguments are passed to the factory (e.g. ``noise_std`` for simulators
    that take options) and recorded in ``simulator.options`` (part of its ``spec``).
    Raises :class:`UnknownSimulatorError` listing known names.
    """
    sim = _SIMULATORS.get(name, **kwargs)
    if kwargs:
        sim.options = dict(kwargs)
    return sim
