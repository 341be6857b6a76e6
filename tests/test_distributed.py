"""Scale out (sbi_engine.distributed): Dask chunks and sweeps, fault tolerance, sharding."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from sbi_engine import BlackBoxSimulator, ConfigError, DatasetError  # noqa: E402
from sbi_engine.cli import main  # noqa: E402
from sbi_engine.distributed import map_points, run_sweep  # noqa: E402
from sbi_engine.simulate import simulate  # noqa: E402
from tests import toy_simulators as toys  # noqa: E402
from tests.test_store import tree_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 single-threaded worker processes, shared by this module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        yield c


def test_jax_chunks_on_workers_equal_single_process_and_resume(client, tmp_path):
    sim = toys.shifted()  # θ and ν drawn from priors
    ref = simulate(sim, 1000, 3, out=tmp_path / "ref", chunk_size=250, progress=False)
    dist = simulate(sim, 1000, 3, out=tmp_path / "dist", chunk_size=250, progress=False,
                    scheduler=client)
    assert dist.simulated == 1000 and dist.report.total == 1000
    assert tree_bytes(tmp_path / "dist") == tree_bytes(tmp_path / "ref")
    # a resumed distributed run recomputes only the chunks without a record
    for i in (1, 3):
        (tmp_path / "dist" / "chunks" / f"{i}.json").unlink()
    again = simulate(sim, 1000, 3, out=tmp_path / "dist", chunk_size=250, progress=False,
                     scheduler=client)
    assert again.simulated == 500
    assert tree_bytes(tmp_path / "dist") == tree_bytes(tmp_path / "ref")
    # explicit θ: each task gets its rows only; devices=1 takes the sharded path per worker
    theta = np.asarray(toys.gauss().prior.sample(jax.random.PRNGKey(0), 700))
    ref = simulate(toys.gauss(), theta=theta, out=tmp_path / "eref", chunk_size=200,
                   progress=False)
    dist = simulate(toys.gauss(), theta=theta, out=tmp_path / "edist", chunk_size=200,
                    progress=False, scheduler=client, devices=1)
    assert dist.report.invalid == ref.report.invalid > 0
    assert tree_bytes(tmp_path / "edist") == tree_bytes(tmp_path / "eref")


def test_killed_worker_loses_only_its_chunk_and_bytes_match(client, tmp_path):
    """kill -9 one of the 2 worker processes mid-run: the run completes, identical bytes."""
    sim, num, chunk = toys.slow(), 1000, 100  # black-box, ~0.2 s per chunk
    ref = simulate(sim, num, 11, out=tmp_path / "ref", chunk_size=chunk, progress=False)
    pids = client.run(os.getpid)
    out = tmp_path / "dist"
    killed: dict = {}

    def killer():
        t0 = time.time()
        while time.time() - t0 < 60:
            done = len(list((out / "chunks").glob("*.json"))) if (out / "chunks").exists() else 0
            if done >= 2:
                busy = {w: keys for w, keys in client.processing().items() if keys}
                if busy:
                    victim, keys = next(iter(busy.items()))
                    killed.update(worker=victim, keys=set(keys), done=done)
                    os.kill(pids[victim], signal.SIGKILL)
                    return
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    with distributed.get_task_stream(client=client) as stream:
        thread.start()
        dist = simulate(sim, num, 11, out=out, chunk_size=chunk, progress=False,
                        scheduler=client)
        thread.join(timeout=5)
    assert killed, "no chunk task was in flight to kill"
    assert killed["done"] < num // chunk, "the run finished before the kill"
    # the victim's in-flight chunks were finished by the surviving worker
    finished = {t["key"]: t["worker"] for t in stream.data}
    assert all(finished.get(k) not in (None, killed["worker"]) for k in killed["keys"])
    # every chunk exactly once, each committed after its checksum was verified
    records = sorted(int(p.stem) for p in (out / "chunks").glob("*.json"))
    assert records == list(range(num // chunk))
    assert dist.simulated == num and dist.report.total == num
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    assert np.array_equal(dist.x, ref.x)


class _Unpicklable:
    """A black-box simulator function that fails to arrive on a worker: always
    (``flag=None``), or once in all (the first process to create ``flag``)."""

    def __init__(self, flag: str | None):
        self.flag, self.owner = flag, os.getpid()

    def __call__(self, theta, nu, rng):
        return theta + 0.1 * rng.normal(size=2)

    def __setstate__(self, state):
        self.__dict__.update(state)
        if os.getpid() == self.owner:
            return
        if self.flag is None:
            raise RuntimeError("cannot load the simulator here")
        try:
            os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        raise RuntimeError("transient failure")


def test_failed_tasks_are_retried_then_named(client, tmp_path):
    def sim(flag):
        return BlackBoxSimulator("toy_unpicklable", toys.PARAMS, ("x1", "x2"), _Unpicklable(flag))

    flag = tmp_path / "failed-once"
    simulate(sim(str(flag)), 200, 1, out=tmp_path / "ref", chunk_size=50, progress=False)
    dist = simulate(sim(str(flag)), 200, 1, out=tmp_path / "dist", chunk_size=50,
                    progress=False, scheduler=client)
    assert flag.exists() and dist.simulated == 200  # one task failed, was resubmitted
    assert tree_bytes(tmp_path / "dist") == tree_bytes(tmp_path / "ref")
    with pytest.raises(DatasetError, match=r"chunk \d \(rows \d+-\d+\) failed 4 times on the "
                                           r"cluster; last error: RuntimeError: cannot load"):
        simulate(sim(None), 100, 1, out=tmp_path / "never", chunk_size=50, progress=False,
                 scheduler=client)


def _sweep_point(point: dict) -> dict:
    """A small deterministic 'experiment': a seeded least-squares fit."""
    key = jax.random.PRNGKey(point["seed"])
    x = jax.random.normal(key, (200,))
    y = point["slope"] * x + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (200,))
    slope = float(np.dot(np.asarray(x), np.asarray(y)) / np.dot(np.asarray(x), np.asarray(x)))
    return {"point": point, "slope": slope, "pid": os.getpid()}


def test_sweep_of_4_points_equals_serial(client):
    points = [{"seed": s, "slope": m} for s in (0, 1) for m in (0.5, 2.0)]
    serial = run_sweep(_sweep_point, points, None)
    swept = run_sweep(_sweep_point, points, client)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "pid"} for r in rs]  # noqa: E731
    assert strip(swept) == strip(serial)
    assert {r["pid"] for r in swept} != {os.getpid()}  # ran on the workers


def test_experiment_sweep_of_4_points_equals_serial(client, tmp_path):
    from sbi_engine import experiment
    from tests import toy_experiments  # noqa: F401 - registers the 'toy_fit' type here

    spec = {"name": "toy_sweep", "type": "toy_fit", "seeds": [0, 1],
            "fit": {"slope": [0.5, 2.0], "num": [100, 300]}}
    points = experiment.resolve(spec)
    assert len(points) == 4
    serial = experiment.run_sweep(points, tmp_path / "serial", progress=False, echo=False)
    swept = map_points(points, tmp_path / "dask", client, imports=["tests.toy_experiments"])
    assert [r.metrics for r in swept] == [r.metrics for r in serial]
    for name in ("summary.json", "summary.md"):
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()
    pids = {json.loads(p.read_text())["result"]["pid"]
            for p in (tmp_path / "dask").glob("*/stages/fit-seed0.json")}
    assert pids and os.getpid() not in pids  # the points ran on the workers


@pytest.mark.slow
def test_builtin_systematics_sweep_on_the_cluster_equals_serial(client, tmp_path):
    """The same with a built-in experiment type: 4 seeds of the tiny INFERNO study."""
    from sbi_engine import experiment

    spec = experiment.demo_specs(tiny=True)["systematics"]
    spec["seeds"] = [[0], [1], [2], [3]]
    points = experiment.resolve(spec)
    serial = experiment.run_sweep(points, tmp_path / "serial", progress=False, echo=False)
    swept = map_points(points, tmp_path / "dask", client)
    assert [r.metrics for r in swept] == [r.metrics for r in serial]


def test_cli_simulate_with_a_scheduler_address(client, tmp_path, capsys):
    args = ["simulate", "two_moons", "--num", "2000", "--chunk-size", "500", "--seed", "2",
            "--quiet"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    address = client.scheduler.address
    assert main([*args, "--out", str(tmp_path / "dist"), "--scheduler", address]) == 0
    assert "simulated 2000" in capsys.readouterr().out
    assert tree_bytes(tmp_path / "dist") == tree_bytes(tmp_path / "ref")
    assert main([*args, "--out", str(tmp_path / "x"), "--scheduler", "nowhere"]) == 2
    assert "error: scheduler: expected 'local'" in capsys.readouterr().err


def test_bad_requests_are_named_errors(tmp_path):
    with pytest.raises(ConfigError, match="out: a run with a scheduler"):
        simulate(toys.gauss(), 10, 0, scheduler="local", progress=False)
    with pytest.raises(ConfigError, match="scheduler: expected 'local'"):
        simulate(toys.gauss(), 10, 0, out=tmp_path / "a", scheduler="http://x", progress=False)
    for bad in (0, "some", 1.5, True):
        with pytest.raises(ConfigError, match="devices: expected 'all' or a positive"):
            simulate(toys.gauss(), 10, 0, devices=bad, progress=False)
    with pytest.raises(ConfigError, match="devices: asked for 64"):
        simulate(toys.gauss(), 10, 0, devices=64, progress=False)
    with pytest.raises(ConfigError, match="workers: expected an integer >= 1"):
        simulate(toys.gauss(), 10, 0, workers=0, progress=False)


# XLA_FLAGS must be set before jax is imported: run in a fresh interpreter.
_SHARDED = """
import json
import jax, jax.numpy as jnp, numpy as np
from sbi_engine import classify as C
from sbi_engine.distributed import batch_sharding, sharded_train_many
from sbi_engine.simulate import _compiled_chunk_fn, simulate
from simulators.toy_physics import pivot
from tests import toy_simulators as toys

res = {"devices": jax.device_count()}
same, gauss = [], toys.gauss()
for sim, chunk in ((gauss, 250), (toys.shifted(), 300)):  # 250 is padded to 4 x 63
    a = simulate(sim, 1000, 5, chunk_size=chunk, progress=False)
    b = simulate(sim, 1000, 5, chunk_size=chunk, progress=False, devices=4)
    same.append(all(np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True)
                    for k in ("theta", "nu", "x", "valid") if getattr(a, k) is not None))
res["simulate_equal"] = same
x = _compiled_chunk_fn(gauss, 252, gauss.prior, "none", False, batch_sharding(4))(
    jax.random.PRNGKey(0), jnp.uint32(0), None, None)[2]
res["sim_shards"] = [len(x.sharding.device_set), list(x.addressable_shards[0].data.shape)]

data = jax.jit(C.augmented_data, static_argnums=(1, 2))(jax.random.key(0), pivot.build(), 100)
cfg = C.ClassifierConfig(hidden=(8,), steps=20, batch_size=32)

def diff(a, b):
    d = jax.tree.map(lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v)))), a, b)
    return max(jax.tree.leaves(d))

keys = jax.random.split(jax.random.key(50), 3)
stacked = C.TrainData(*(jnp.stack([a[i::3][:60] for i in range(3)]) for a in data))
lrs = jnp.array([1e-3, 3e-3, 1e-2])
ref = C.train_many(keys, stacked, cfg, hyper={"learning_rate": lrs})
sh = sharded_train_many(keys, stacked, cfg, devices=4, hyper={"learning_rate": lrs})  # M=3->4
res["train"] = [diff(ref.params, sh.params), diff(ref.metrics, sh.metrics),
                int(sh.metrics["loss"].shape[0]),
                len(jax.tree.leaves(sh.params)[0].sharding.device_set)]
print(json.dumps(res))
"""


def test_sharded_simulation_and_training_equal_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4
    assert res["simulate_equal"] == [True, True]  # bit-identical rows
    assert res["sim_shards"] == [4, [63, 2]]  # each device computed a quarter of the chunk
    params_diff, metrics_diff, models, shards = res["train"]
    assert models == 3 and shards == 4  # 3 models padded to 4, one per device
    assert params_diff < 1e-5 and metrics_diff < 1e-5  # equal up to float reassociation
