"""Scale out: Dask tasks for simulation chunks and sweeps, ``jax.sharding`` over local devices.

Two independent axes, combinable:

- **Many machines (Dask).** ``simulate(..., out=PATH, scheduler=...)`` — or
  ``sbi-engine simulate ... --scheduler local|tcp://host:port`` — runs each dataset chunk
  as one Dask task. ``scheduler`` is ``"local"`` (an embedded ``LocalCluster``, one
  single-threaded worker process per core unless ``workers`` says otherwise), the address
  of an existing scheduler, or a ``distributed.Client`` / cluster object (e.g. a
  dask-jobqueue ``SLURMCluster``). :func:`map_points` runs the points of an experiment
  sweep (:func:`sbi_engine.experiment.run_point`, one task each) and :func:`run_sweep`
  maps any function over points the same way. Black-box simulators run row by row in
  the worker; JAX simulators run batched (the same compiled chunk function as a
  single-process run) on the worker's device(s).
- **Many devices on one host (``jax.sharding``).** ``simulate(..., devices="all")`` lays
  each chunk's rows out over a 1-D device mesh (:func:`batch_sharding`), so the compiled
  chunk runs partitioned across the devices; :func:`sharded_train_many` does the same
  for the model axis ``M`` of :func:`sbi_engine.classify.train_many`.

Protocol of a distributed simulation (fault tolerance and determinism):

1. The client creates or reopens the dataset (:class:`~sbi_engine.store.DatasetStore`,
   whose identity check is unchanged) and lists the chunks without a verified record.
2. Chunk ``i`` is one task. The worker rebuilds the simulator from the job the client
   serialised once (cached per worker process by its sha256, so the chunk function
   compiles once per worker), simulates rows ``[start, stop)`` — row ``r`` depends only
   on ``(seed, r)`` — writes the zarr chunk (data only; rewriting writes the same bytes)
   and returns the chunk's record (sha256, invalid counts).
3. The client reads the chunk back, checks its sha256, and only then writes
   ``chunks/<i>.json`` (:meth:`~sbi_engine.store.DatasetStore.commit_chunk`); at the end
   it writes the manifest exactly as a single-process run does.

A worker that dies (``kill -9``, out of memory, a lost node) loses only its in-flight
chunk: Dask reschedules it on another worker; a task that raises or whose chunk fails the
check is resubmitted up to ``retries`` times. An interrupted client leaves committed
chunks; rerunning the same call resumes. The finished directory is byte-identical to a
single-process run with the same seed (tested by killing a worker mid-run). The dataset
directory must be on a filesystem the workers and the client share.

Nothing is pickled to disk: the simulator travels to workers through Dask's own
(cloud)pickle transport, exactly as any Dask task does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import itertools
import pickle
import re
import threading
import uuid
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sbi_engine.errors import ConfigError, DatasetError, ShapeError
from sbi_engine.priors import Prior
from sbi_engine.simulator import SimulationReport, Simulator
from sbi_engine.store import DatasetStore

__all__ = [
    "BATCH_AXIS",
    "batch_sharding",
    "check_devices",
    "connect",
    "local_devices",
    "map_points",
    "run_chunks",
    "run_sweep",
    "shard_batch",
    "sharded_train_many",
]

#: Name of the mesh axis the batch (rows, or models) is sharded over.
BATCH_AXIS = "batch"
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$")


# ------------------------------------------------------------------------------------
# Local devices: jax.sharding
# ------------------------------------------------------------------------------------


def check_devices(devices: Any) -> None:
    """Validate a ``devices`` request: ``"all"`` or a positive integer.

    Raises:
        ConfigError: anything else, named.
    """
    if devices == "all":
        return
    if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or devices < 1:
        raise ConfigError(f"devices: expected 'all' or a positive integer, got {devices!r}")


def local_devices(devices: int | str = "all") -> list[jax.Device]:
    """The first ``devices`` local JAX devices (all of them for ``"all"``).

    Raises:
        ConfigError: more devices requested than this process has.
    """
    check_devices(devices)
    avail = jax.local_devices()
    if devices == "all":
        return list(avail)
    if devices > len(avail):
        raise ConfigError(f"devices: asked for {devices}, this process has {len(avail)} "
                          f"{avail[0].platform} device(s) (on CPU, set XLA_FLAGS="
                          f"--xla_force_host_platform_device_count={devices} before importing jax)")
    return list(avail[:int(devices)])


@functools.lru_cache(maxsize=16)
def batch_sharding(devices: int | str = "all") -> NamedSharding:
    """A sharding that splits the leading (batch) axis over ``devices`` local devices.

    A 1-D :class:`jax.sharding.Mesh` with axis :data:`BATCH_AXIS` and
    ``PartitionSpec(BATCH_AXIS)``: an array ``(B, ...)`` laid out with it holds rows
    ``[k B/n, (k+1) B/n)`` on device ``k``; a jitted function whose inputs or outputs
    carry it is partitioned by XLA along that axis (no communication for row-wise work).
    """
    mesh = Mesh(np.array(local_devices(devices)), (BATCH_AXIS,))
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def shard_batch(tree: Any, sharding: NamedSharding) -> Any:
    """Place every leaf ``(B, ...)`` of ``tree`` with its leading axis split by ``sharding``.

    Raises:
        ShapeError: a leaf without a leading axis divisible by the device count.
    """
    n = len(sharding.device_set)

    def put(a):
        a = jnp.asarray(a)
        if a.ndim == 0 or a.shape[0] % n:
            raise ShapeError(f"shard_batch: a leaf of shape {tuple(a.shape)} has no leading "
                             f"axis divisible by {n} devices")
        return jax.device_put(a, sharding)

    return jax.tree.map(put, tree)


def _pad_lead(a: jax.Array, pad: int) -> jax.Array:
    """Repeat the last entry of the leading axis ``pad`` times."""
    if pad == 0:
        return a
    return jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])


def sharded_train_many(keys: jax.Array, data: Any, config: Any, *,
                       devices: int | str = "all", generator: Any = None,
                       hyper: Mapping[str, Any] | None = None) -> Any:
    """:func:`sbi_engine.classify.train_many` with the ``M`` models split over local devices.

    The keys, per-model data and per-model hyperparameters are laid out along the model
    axis with :func:`batch_sharding` (a shared dataset is replicated), so the one
    compiled, vmapped training loop is partitioned by XLA: device ``k`` trains models
    ``[k M/n, (k+1) M/n)``. ``M`` not divisible by ``n`` is padded by repeating the last
    model; the padding is dropped from the result. The models equal an unsharded
    ``train_many`` up to floating-point reassociation (tested to 1e-5).

    Args:
        keys: ``(M,)`` typed or ``(M, 2)`` raw keys, one per model.
        data: :class:`~sbi_engine.classify.TrainData` (or ``EventData``), shared
            (``x (N, F)``...) or stacked per model (``x (M, N, F)``...).
        config: the :class:`~sbi_engine.classify.ClassifierConfig`.
        devices: ``"all"`` local devices or how many.
        generator: the event generator (required for ``"inferno"``).
        hyper: ``{name: scalar or (M,)}`` per-model hyperparameters.

    Returns:
        The :class:`~sbi_engine.classify.TrainResult` of ``train_many`` (leaves ``(M, ...)``,
        sharded over the devices).
    """
    from sbi_engine.classify import TrainData, train_data, train_many
    from sbi_engine.events import EventData

    sharding = batch_sharding(devices)
    n = len(sharding.device_set)
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    m = int(keys.shape[0])
    pad = -m % n
    if isinstance(data, EventData):
        data = train_data(data)
    if not isinstance(data, TrainData):
        raise ShapeError(f"data: expected TrainData or EventData, got {type(data).__name__}")
    data = TrainData(*(jnp.asarray(a, jnp.float32) for a in data))
    if data.x.ndim == 3:
        if data.x.shape[0] != m:
            raise ShapeError(f"data.x: stacked data need {m} models on axis 0 (one per key), "
                             f"got shape {tuple(data.x.shape)}")
        data = TrainData(*(jax.device_put(_pad_lead(a, pad), sharding) for a in data))
    else:
        data = TrainData(*(jax.device_put(a, replicated) for a in data))
    hyp = {}
    for name, value in (hyper or {}).items():
        value = jnp.asarray(value, jnp.float32)
        if value.ndim == 0:
            hyp[name] = value
        elif value.shape == (m,):
            hyp[name] = jax.device_put(_pad_lead(value, pad), sharding)
        else:
            raise ShapeError(f"hyper[{name!r}]: expected a scalar or shape ({m},), "
                             f"got {tuple(value.shape)}")
    result = train_many(jax.device_put(_pad_lead(keys, pad), sharding), data, config,
                        generator=generator, hyper=hyp)
    if pad == 0:
        return result
    cut = functools.partial(jax.tree.map, lambda a: a[:m])
    return result._replace(params=cut(result.params), state=cut(result.state),
                           metrics={k: v[:m] for k, v in result.metrics.items()})


# ------------------------------------------------------------------------------------
# Dask: connecting
# ------------------------------------------------------------------------------------


def _distributed():
    try:
        import distributed
    except ImportError:  # pragma: no cover - the dask extra is part of the dev install
        raise ConfigError("scheduler: Dask is not installed; pip install 'sbi-engine[dask]'"
                          ) from None
    return distributed


@contextlib.contextmanager
def connect(scheduler: Any = "local", *, workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``, closed on exit if this call opened it.

    Args:
        scheduler: ``"local"`` — start a ``LocalCluster`` of ``workers`` single-threaded
            worker processes (default one per core) for the duration; an address
            ``"tcp://host:port"`` — connect to a running scheduler; a
            ``distributed.Client`` — use it as is (not closed); a cluster object (e.g.
            ``dask_jobqueue.SLURMCluster``) — connect a client to it (the cluster is
            left running).
        workers: LocalCluster size (``"local"`` only).

    Raises:
        ConfigError: an unknown scheduler spec, or an address that does not answer.
    """
    distributed = _distributed()
    if workers is not None and scheduler != "local":
        warnings.warn(f"workers={workers} ignored: the scheduler {scheduler!r} has its own "
                      "workers", stacklevel=3)
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    if isinstance(scheduler, distributed.deploy.Cluster):
        with distributed.Client(scheduler) as client:
            yield client
        return
    if scheduler == "local":
        # dashboard on a free port (served only when bokeh is installed): no port clashes
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cluster, \
                distributed.Client(cluster) as client:
            yield client
        return
    if not isinstance(scheduler, str) or not _ADDRESS.match(scheduler):
        raise ConfigError(f"scheduler: expected 'local', an address such as "
                          f"'tcp://host:8786', or a distributed.Client, got {scheduler!r}")
    try:
        client = distributed.Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as err:
        raise ConfigError(f"scheduler: cannot connect to {scheduler} ({err})") from None
    with client:
        yield client


# ------------------------------------------------------------------------------------
# Dask: simulation chunks
# ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkJob:
    """What every chunk task of one run shares (serialised once by the client)."""

    sim: Simulator
    seed: int
    prior: Prior
    nu_mode: str
    chunk: int
    devices: int | str | None


# Per worker process: job token -> job (a few recent ones), so a run's simulator is
# unpickled, and its chunk function compiled, once per worker rather than once per task.
_JOBS: OrderedDict[str, _ChunkJob] = OrderedDict()
_JOBS_KEPT = 4
_JOBS_LOCK = threading.Lock()  # workers with several threads run tasks concurrently


def _job(token: str, job_bytes: bytes) -> _ChunkJob:
    with _JOBS_LOCK:
        job = _JOBS.get(token)
        if job is None:
            # Transport only: bytes the client cloudpickled from its own simulator object
            # for this run, never a file or user data. Unpickled here, inside the task,
            # rather than by Dask before the task: a simulator that cannot be loaded on a
            # worker then fails this task (retried, then named) instead of wedging the
            # worker. The token is the bytes' digest, checked before loading.
            if hashlib.sha256(job_bytes).hexdigest()[:16] != token:
                raise DatasetError("distributed job: the simulator bytes do not match "
                                   "their digest (corrupted in transport)")
            job = pickle.loads(job_bytes)
            _JOBS[token] = job
            while len(_JOBS) > _JOBS_KEPT:
                _JOBS.popitem(last=False)
        _JOBS.move_to_end(token)
        return job


def _simulate_chunk(token: str, job_bytes: bytes, path: str, index: int,
                    theta_rows: np.ndarray | None, nu_rows: np.ndarray | None) -> dict:
    """Worker side: simulate chunk ``index``, write its data, return its record."""
    from sbi_engine.simulate import _ChunkMaker

    job = _job(token, job_bytes)
    store = DatasetStore.open(path)
    start, stop = store.bounds(index)
    sharding = None if job.devices is None else batch_sharding(job.devices)
    maker = _ChunkMaker(job.sim, job.seed, job.chunk, job.prior, theta_rows, job.nu_mode,
                        nu_rows, offset=start, sharding=sharding)
    arrays, report = maker.make(start, stop - start, None)
    return store.write_chunk_data(index, arrays, {"errors": dict(report.errors)})


def run_chunks(store: DatasetStore, sim: Simulator, *, seed: int, prior: Prior,
               theta: np.ndarray | None, nu_mode: str, nu: np.ndarray | None,
               todo: Sequence[int], scheduler: Any = "local", workers: int | None = None,
               devices: int | str | None = None, retries: int = 3, verify: bool = True,
               on_chunk: Callable[[int, SimulationReport], None] | None = None
               ) -> SimulationReport:
    """Simulate chunks ``todo`` of ``store`` as Dask tasks and commit each verified one.

    This is the engine of ``simulate(..., scheduler=...)``, which validates the request,
    creates the store and finalises the manifest; call that instead.

    Args:
        store: the open dataset (on a filesystem the workers share).
        sim, seed, prior, nu_mode: as resolved by :func:`~sbi_engine.simulate.simulate`.
        theta: explicit ``(N, D)`` parameters or None; each task receives its rows only.
        nu: explicit ``(N, K)`` nuisances or None.
        todo: chunk indices to simulate.
        scheduler, workers: see :func:`connect`.
        devices: on each worker, shard chunk rows over its local devices (see
            :func:`batch_sharding`); None for the default device.
        retries: resubmissions per chunk after a task error or a failed check (a task
            lost with a dead worker is rescheduled by Dask without counting here).
        verify: read every chunk back and check its sha256 before committing it.
        on_chunk: ``on_chunk(rows, report)`` after each committed chunk (client side).

    Returns:
        The :class:`~sbi_engine.simulator.SimulationReport` of the simulated rows.

    Raises:
        DatasetError: a chunk failed ``retries + 1`` times (the last cause chained).
    """
    import cloudpickle

    distributed = _distributed()
    if devices is not None:
        check_devices(devices)
    if not todo:  # nothing to do: do not start or contact a cluster
        return SimulationReport()
    job = _ChunkJob(sim, int(seed), prior, nu_mode, store.chunk_size, devices)
    job_bytes = cloudpickle.dumps(job)
    token = hashlib.sha256(job_bytes).hexdigest()[:16]
    run_id = uuid.uuid4().hex[:8]
    path = str(store.path.resolve())
    total = SimulationReport()
    attempts: Counter = Counter()
    pending: dict[Any, tuple[int, Any]] = {}  # task key -> (chunk index, future)

    with connect(scheduler, workers=workers) as client:

        def submit(i: int):
            start, stop = store.bounds(i)
            fut = client.submit(
                _simulate_chunk, token, job_bytes, path, i,
                None if theta is None else theta[start:stop],
                None if nu is None else nu[start:stop],
                key=f"simulate-chunk-{run_id}-{i}-{attempts[i]}", priority=-i)
            pending[fut.key] = (i, fut)
            return fut

        queue = distributed.as_completed([submit(i) for i in todo])
        try:
            for fut in queue:
                i, _ = pending.pop(fut.key)
                try:
                    record = fut.result()
                    store.commit_chunk(record, verify=verify)
                except Exception as err:  # any task failure (or failed check) is retried
                    fut.release()
                    attempts[i] += 1
                    if attempts[i] > retries:
                        start, stop = store.bounds(i)
                        hint = (" (is the dataset on a filesystem the workers share?)"
                                if isinstance(err, DatasetError) else "")
                        raise DatasetError(
                            f"dataset {store.path}: chunk {i} (rows {start}-{stop}) failed "
                            f"{attempts[i]} times on the cluster{hint}; last error: "
                            f"{type(err).__name__}: {err}") from err
                    queue.add(submit(i))
                    continue
                fut.release()
                rep = SimulationReport(total=record["stop"] - record["start"],
                                       invalid=int(record["invalid"]),
                                       errors=Counter(record.get("errors", {})))
                total.add(rep)
                if on_chunk is not None:
                    on_chunk(rep.total, rep)
        finally:
            if pending:  # interrupted or failed: do not leave tasks running on the cluster
                client.cancel([f for _, f in pending.values()])
    return total


# ------------------------------------------------------------------------------------
# Dask: sweeps
# ------------------------------------------------------------------------------------


def run_sweep(fn: Callable[[Any], Any], points: Iterable[Any], scheduler: Any = "local", *,
              workers: int | None = None, retries: int = 1) -> list[Any]:
    """``[fn(p) for p in points]``, one Dask task per point, results in order.

    Args:
        fn: a picklable function of one point (module-level, or anything cloudpickle
            serialises). It should be deterministic given its point (seeds inside the
            point), so the sweep equals the serial loop.
        points: the sweep points.
        scheduler: see :func:`connect`; ``None`` runs the serial loop in this process.
        workers: LocalCluster size (``"local"`` only).
        retries: Dask retries per point after an exception (a task lost with a dead worker
            is rescheduled by Dask regardless).

    Returns:
        The results, in the order of ``points``.
    """
    points = list(points)
    if scheduler is None:
        return [fn(p) for p in points]
    run_id = uuid.uuid4().hex[:8]
    with connect(scheduler, workers=workers) as client:
        futures = client.map(fn, points, key=[f"sweep-point-{run_id}-{i}"
                                              for i in range(len(points))], retries=retries)
        try:
            return client.gather(futures)
        finally:
            client.cancel(futures)


def _call_with_imports(modules: tuple[str, ...], fn: Callable[..., Any], *args: Any,
                       **kwargs: Any) -> Any:
    """Worker side: import ``modules`` (e.g. ones registering experiment types), call ``fn``."""
    for name in modules:
        importlib.import_module(name)
    return fn(*args, **kwargs)


class _PointSubmitter:
    """``submit(fn, *args, **kwargs) -> future`` on a Dask client, one named task per point."""

    def __init__(self, client: Any, imports: tuple[str, ...]):
        self.client, self.imports = client, imports
        self.run_id = uuid.uuid4().hex[:8]
        self.count = itertools.count()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        key = f"experiment-point-{self.run_id}-{next(self.count)}"
        return self.client.submit(_call_with_imports, self.imports, fn, *args, key=key,
                                  **kwargs)


def map_points(points: Sequence[Any], out_dir: str | Path, scheduler: Any = "local", *,
               workers: int | None = None, imports: Iterable[str] = (),
               device: str | None = None, overwrite: bool = False) -> list[Any]:
    """Run the points of an experiment sweep as Dask tasks, one task per point.

    :func:`sbi_engine.experiment.run_sweep` with a Dask client as its executor: each
    point is an independent :func:`~sbi_engine.experiment.run_point` into
    ``out_dir/<point>`` (on a filesystem the workers share), then the client writes the
    sweep summary. Every stage takes its randomness from the point's seeds, so the
    metrics equal a serial sweep on the same kind of device; a point whose worker dies is
    rescheduled and resumes from its completed stages.

    Args:
        points: sweep points from :func:`sbi_engine.experiment.resolve`.
        out_dir: the sweep directory.
        scheduler, workers: see :func:`connect`.
        imports: modules each task imports first, e.g. one that registers a custom
            experiment type with :func:`~sbi_engine.experiment.register_experiment_type`
            (built-in types need nothing).
        device, overwrite: as :func:`~sbi_engine.experiment.run_point`.

    Returns:
        One :class:`~sbi_engine.experiment.RunResult` per point, in order.
    """
    from sbi_engine import experiment

    imports = tuple(imports)
    for name in imports:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"imports: expected module names, got {name!r}")
    with connect(scheduler, workers=workers) as client:
        submitter = _PointSubmitter(client, imports)
        return experiment.run_sweep(list(points), Path(out_dir).resolve(), device=device,
                                    progress=False, echo=False, overwrite=overwrite,
                                    executor=submitter)
