"""Batched, seeded, chunked and resumable generation of training sets.

``simulate(simulator, num, seed)`` draws ``θ`` from the prior (or a proposal, or takes
an explicit array), draws ``ν`` from the nuisance prior when the simulator has
nuisances, simulates ``x`` in chunks and either returns the arrays or writes them to a
:mod:`sbi_engine.store` dataset.

Determinism: with ``base = PRNGKey(seed)``, row ``i`` uses
``fold_in(fold_in(base, s), i)`` for stream ``s`` ∈ {θ: 0, ν: 1, x: 2}. A row therefore
depends only on ``(seed, i)``: chunks can run in any order, on any worker, and an
interrupted run resumed later writes the same bytes as an uninterrupted one.

Scale: ``devices=`` shards each chunk's rows over local JAX devices (``jax.sharding``)
and ``scheduler=`` runs each chunk as a Dask task that writes its own zarr chunk (see
:mod:`sbi_engine.distributed`); both give the bytes of a single-process run.

Failures: a row whose ``x`` is not all finite (a JAX simulator returning NaN, a
black-box simulator raising, returning garbage, hanging past ``timeout`` or crashing its
worker process, see :mod:`sbi_engine.workers`) is stored as NaN with ``valid = False``;
invalid rows are counted per chunk and per reason in the manifest, never raised.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sbi_engine.errors import ConfigError, ShapeError, check_seed
from sbi_engine.interrupt import ctrl_c_latch
from sbi_engine.priors import Prior
from sbi_engine.simulator import (
    BlackBoxSimulator,
    JaxSimulator,
    SimulationReport,
    Simulator,
    get_simulator,
    row_keys,
)
from sbi_engine.store import Dataset, DatasetStore, load_dataset
from sbi_engine.workers import WorkerPool

__all__ = ["SimulationResult", "simulate"]

STREAM_THETA, STREAM_NU, STREAM_X = 0, 1, 2
DEFAULT_CHUNK = {"jax": 10_000, "blackbox": 1_000}


@dataclass
class SimulationResult:
    """What :func:`simulate` produced.

    Attributes:
        theta: ``(N, D)``; nu: ``(N, K)`` or None; x: ``(N, X)``; valid: ``(N,)`` bool.
            For a run written to disk these are read from ``dataset`` on first access.
        report: counts of total / invalid rows and failure reasons (whole dataset).
        dataset: the on-disk :class:`~sbi_engine.store.Dataset`, or None for in-memory runs.
        simulated: rows simulated by this call (fewer than N when a run was resumed).
        seconds: wall time of this call's simulation loop.
    """

    report: SimulationReport
    dataset: Dataset | None = None
    simulated: int = 0
    seconds: float = 0.0
    _arrays: dict[str, Any] = field(default_factory=dict, repr=False)

    def _get(self, name):
        if self.dataset is not None:
            return getattr(self.dataset, name)
        return self._arrays[name]

    theta = property(lambda self: self._get("theta"))
    nu = property(lambda self: self._get("nu"))
    x = property(lambda self: self._get("x"))
    valid = property(lambda self: self._get("valid"))

    @property
    def rate(self) -> float:
        """Simulations per second achieved by this call."""
        return self.simulated / self.seconds if self.seconds > 0 else float("nan")


def _sha256_array(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<f4").tobytes()).hexdigest()


# Compiled chunk functions, per simulator and (chunk, prior, ν mode, explicit θ): built
# once, reused by every call, so repeated simulate() calls do not recompile.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_chunk_fn(sim: Simulator, chunk: int, prior: Prior, nu_mode: str,
                       explicit_theta: bool, sharding: Any = None):
    """``fn(base_key, start, theta_in, nu_in) -> (theta (C, D), nu (C, K) | None, out)``.

    ``out`` is ``x (C, X)`` for JAX simulators and the row keys ``(C, 2)`` otherwise.
    With a ``sharding`` (rows over devices) the outputs are laid out, and so computed,
    across its devices; ``C`` must then be a multiple of the device count.
    """
    cache = _COMPILED.setdefault(sim, {})
    tag = (chunk, repr(prior.to_dict()), nu_mode, explicit_theta, sharding)
    if tag in cache:
        return cache[tag]
    nominal = jnp.asarray(sim.nominal_nu())
    nu_prior = sim.nuisance_prior

    def draw(key, start, p):
        return jax.vmap(lambda k: p.sample(k, 1)[0])(row_keys(key, start, chunk))

    def fn(base, start, theta_in, nu_in):
        k_theta, k_nu, k_x = (jax.random.fold_in(base, s)
                              for s in (STREAM_THETA, STREAM_NU, STREAM_X))
        theta_c = theta_in if explicit_theta else draw(k_theta, start, prior)
        if sim.dim_nu == 0:
            nu_c = None
        elif nu_mode == "explicit":
            nu_c = nu_in
        elif nu_mode == "prior":
            nu_c = draw(k_nu, start, nu_prior)
        else:
            nu_c = jnp.broadcast_to(nominal, (chunk, sim.dim_nu))
        keys = row_keys(k_x, start, chunk)
        if isinstance(sim, JaxSimulator):
            return theta_c, nu_c, sim.simulate_rows(keys, theta_c, nu_c).astype(jnp.float32)
        return theta_c, nu_c, keys

    cache[tag] = jax.jit(fn) if sharding is None else jax.jit(fn, out_shardings=sharding)
    return cache[tag]


class _ChunkMaker:
    """Builds (θ, ν) and simulates x for rows ``[start, start + C)``.

    ``theta``/``nu`` (explicit arrays) hold rows ``[offset, offset + len)``. With a
    ``sharding`` (JAX simulators), the compiled chunk is padded to a multiple of its
    device count; the padding rows are computed and dropped.
    """

    def __init__(self, sim: Simulator, seed: int, chunk: int, prior: Prior,
                 theta: np.ndarray | None, nu_mode: str, nu: np.ndarray | None, *,
                 offset: int = 0, sharding: Any = None):
        if sharding is not None and isinstance(sim, JaxSimulator):
            n = len(sharding.device_set)
            chunk = -(-chunk // n) * n
        else:
            sharding = None
        self.sim, self.chunk, self.offset = sim, chunk, offset
        self.theta, self.nu_array, self.nu_mode = theta, nu, nu_mode
        self.base = jax.random.PRNGKey(seed)
        self.fn = _compiled_chunk_fn(sim, chunk, prior, nu_mode, theta is not None, sharding)

    def _rows(self, arr: np.ndarray | None, start: int, rows: int) -> jax.Array | None:
        if arr is None:
            return None
        part = arr[start - self.offset:start - self.offset + rows]
        if rows < self.chunk:  # pad the tail chunk so one compilation serves all chunks
            part = np.concatenate([part, np.repeat(part[-1:], self.chunk - rows, axis=0)])
        return jnp.asarray(part)

    def make(self, start: int, rows: int, pool: WorkerPool | None
             ) -> tuple[dict[str, np.ndarray | None], SimulationReport]:
        theta_in = self._rows(self.theta, start, rows)
        nu_in = self._rows(self.nu_array, start, rows) if self.nu_mode == "explicit" else None
        theta_c, nu_c, out = self.fn(self.base, jnp.uint32(start), theta_in, nu_in)
        theta_np = np.asarray(theta_c, dtype=np.float32)[:rows]
        nu_np = None if nu_c is None else np.asarray(nu_c, dtype=np.float32)[:rows]
        if isinstance(self.sim, JaxSimulator):
            x = np.array(out)[:rows]
            valid = np.all(np.isfinite(x), axis=1)
            x[~valid] = np.nan
            report = SimulationReport(total=rows, invalid=int((~valid).sum()))
            if report.invalid:
                report.errors["non-finite output"] = report.invalid
        else:
            keys = np.asarray(out)[:rows]
            x, report = self.sim.simulate_rows(keys, theta_np, nu_np, pool=pool)
            valid = np.all(np.isfinite(x), axis=1)
        arrays = {"theta": theta_np, "nu": nu_np, "x": x.astype(np.float32), "valid": valid}
        return arrays, report


def simulate(
    simulator: Simulator | str,
    num: int | None = None,
    seed: int = 0,
    *,
    out: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    theta: Any = None,
    proposal: Prior | None = None,
    nu: str | Any = "prior",
    workers: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    devices: int | str | None = None,
    scheduler: Any = None,
) -> SimulationResult:
    """Simulate a training set, in memory or into a resumable on-disk dataset.

    Args:
        simulator: a :class:`~sbi_engine.simulator.Simulator` or a registered name.
        num: number of rows N (inferred from ``theta`` when that is given).
        seed: integer seed; the same seed gives the same rows.
        out: dataset directory. If it holds an interrupted run of the *same* request,
            only the missing chunks are simulated; a different request is an error.
        chunk_size: rows per chunk (default 10,000 for JAX simulators, 1,000 for
            black-box ones). Part of the dataset's identity.
        theta: explicit parameters ``(N, D)`` instead of prior draws (checked against
            the simulator's parameter count and the prior's support).
        proposal: draw θ from this prior instead of ``simulator.prior``.
        nu: for simulators with nuisances: ``"prior"`` (draw from the nuisance prior),
            ``"nominal"``, or an explicit array ``(N, K)``.
        workers: processes for black-box simulators (default 1; ignored, with a warning,
            for JAX simulators, which use the device's own parallelism). With
            ``scheduler="local"``: the number of Dask workers (default: one per core).
        timeout: black-box simulators: seconds allowed per simulation. Rows then run in
            supervised worker processes (also with ``workers > 1``): a simulation past
            its timeout is killed and a worker that crashes (a segfault) is replaced;
            those rows are stored invalid with the reason, and the run goes on. Not
            available with a ``scheduler`` (Dask retries a chunk whose worker died).
        progress: show a progress bar (rate and ETA) once a run takes over 2 s.
        devices: shard each chunk's rows over local JAX devices: ``"all"``, a count, or
            None (the default device only). JAX simulators; the rows are the same bytes.
            With a ``scheduler``, each worker shards over its own devices.
        scheduler: run each chunk as a Dask task that writes its own zarr chunk (needs
            ``out`` and the ``dask`` extra): ``"local"`` (a ``LocalCluster`` for this
            call), ``"tcp://host:port"`` (an existing cluster), or a ``distributed.Client``
            or cluster object. See :mod:`sbi_engine.distributed`.

    Returns:
        A :class:`SimulationResult`.

    Raises:
        ShapeError, ConfigError, DatasetError: bad input, named.
    """
    sim = get_simulator(simulator) if isinstance(simulator, str) else simulator
    if not isinstance(sim, Simulator):
        raise ConfigError(f"simulator: expected a Simulator or a name, got {type(sim).__name__}")
    seed = check_seed("seed", seed)

    prior = proposal if proposal is not None else sim.prior
    if proposal is not None and proposal.dim != sim.dim_theta:
        raise ShapeError(f"proposal: has dim {proposal.dim}, simulator {sim.name!r} "
                         f"expects {sim.dim_theta}")
    theta_arr = None
    if theta is not None:
        theta_arr = sim.check_theta(theta)
        if num is not None and int(num) != theta_arr.shape[0]:
            raise ShapeError(f"num: {num} but theta has {theta_arr.shape[0]} rows")
        num = theta_arr.shape[0]
        theta_source = {"type": "explicit", "sha256": _sha256_array(theta_arr)}
    else:
        theta_source = {"type": "proposal" if proposal is not None else "prior"}
    if num is None or isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num <= 0:
        raise ConfigError(f"num: expected a positive integer, got {num!r}")
    num = int(num)

    nu_arr = None
    if sim.dim_nu == 0:
        if not (isinstance(nu, str) and nu in ("prior", "nominal")):
            raise ShapeError(f"nu: simulator {sim.name!r} has no nuisance parameters")
        nu_mode = "none"
    elif isinstance(nu, str):
        if nu not in ("prior", "nominal"):
            raise ConfigError(f"nu: expected 'prior', 'nominal' or an array, got {nu!r}")
        nu_mode = nu
    else:
        nu_arr = sim.check_nu(nu, num)
        nu_mode = "explicit"
    nu_source = {"type": nu_mode}
    if nu_arr is not None:
        nu_source["sha256"] = _sha256_array(nu_arr)

    chunk = int(chunk_size) if chunk_size is not None else min(num, DEFAULT_CHUNK[sim.kind])
    if chunk <= 0:
        raise ConfigError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    chunk = min(chunk, num)
    if workers is not None and (isinstance(workers, bool)
                                or not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ConfigError(f"workers: expected an integer >= 1, got {workers!r}")
    if timeout is not None:
        if scheduler is not None:
            raise ConfigError("timeout: not available with a scheduler; Dask retries a chunk "
                              "whose worker died, but cannot time out one simulation")
        if not isinstance(sim, BlackBoxSimulator):
            raise ConfigError(f"timeout: {sim.name!r} is a JAX simulator; a timeout applies "
                              "to black-box simulators")
    # Workers start on first use; building the pool here checks timeout before any work.
    pool = None
    if (scheduler is None and isinstance(sim, BlackBoxSimulator)
            and ((workers or 1) > 1 or timeout is not None)):
        pool = sim.worker_pool(workers or 1, timeout)
    if scheduler is not None and out is None:
        raise ConfigError("out: a run with a scheduler writes a dataset; give out=PATH")
    sharding = None
    if devices is not None:
        from sbi_engine.distributed import batch_sharding, check_devices

        check_devices(devices)
        if scheduler is None:
            sharding = batch_sharding(devices)
    if scheduler is None and (workers or 1) > 1 and not isinstance(sim, BlackBoxSimulator):
        warnings.warn(f"workers={workers} ignored: {sim.name!r} is a JAX simulator, batched "
                      "on the default device", stacklevel=2)

    store = None
    num_chunks = -(-num // chunk)
    todo = list(range(num_chunks))
    if out is not None:
        identity = {
            "simulator": sim.name,
            "simulator_version": sim.version,
            "simulator_spec": sim.spec(),
            "prior": prior.to_dict(),
            "theta_source": theta_source,
            "nu_source": nu_source,
            "seed": seed,
            "num": num,
            "chunk_size": chunk,
            "dtype": "float32",
        }
        dims = {"theta": sim.dim_theta, "nu": sim.dim_nu, "x": sim.dim_x}
        store = DatasetStore.create_or_resume(out, identity, dims)
        todo = [i for i in todo if not store.is_done(i)]

    report = SimulationReport()
    parts: dict[int, dict] = {}
    done_rows = num - sum(min(chunk, num - i * chunk) for i in todo)
    bar = tqdm(total=num, initial=done_rows, unit="sim", unit_scale=True, delay=2.0,
               disable=not progress, desc=f"simulate {sim.name}", dynamic_ncols=True)
    t0 = time.perf_counter()
    simulated = 0

    def chunk_done(rows: int, rep: SimulationReport) -> None:
        nonlocal simulated
        report.add(rep)
        simulated += rows
        bar.update(rows)
        bar.set_postfix(invalid=report.invalid, refresh=False)
        interrupted()  # a Ctrl-C swallowed while this chunk ran stops the run here

    with ctrl_c_latch() as interrupted:
        try:
            if scheduler is not None:
                from sbi_engine.distributed import run_chunks

                run_chunks(store, sim, seed=seed, prior=prior, theta=theta_arr, nu_mode=nu_mode,
                           nu=nu_arr, todo=todo, scheduler=scheduler, workers=workers,
                           devices=devices, on_chunk=chunk_done)
            else:
                maker = _ChunkMaker(sim, seed, chunk, prior, theta_arr, nu_mode, nu_arr,
                                    sharding=sharding)
                for i in todo:
                    start = i * chunk
                    rows = min(chunk, num - start)
                    arrays, rep = maker.make(start, rows, pool)
                    if store is not None:
                        store.write_chunk(i, arrays, {"errors": dict(rep.errors)})
                    else:
                        parts[i] = arrays
                    chunk_done(rows, rep)
        finally:
            bar.close()
            if pool is not None:
                pool.close()
    seconds = time.perf_counter() - t0

    if store is not None:
        manifest = store.finalize()
        total = SimulationReport(total=num, invalid=manifest["counts"]["invalid"],
                                 errors=Counter(manifest.get("errors", {})))
        return SimulationResult(report=total, dataset=load_dataset(out, lazy=True),
                                simulated=simulated, seconds=seconds)
    cat = {k: (None if parts[0][k] is None else np.concatenate([parts[i][k]
                                                               for i in range(num_chunks)]))
           for k in ("theta", "nu", "x", "valid")}
    return SimulationResult(report=report, simulated=simulated, seconds=seconds, _arrays=cat)
