"""Black-box simulators that raise, hang, segfault, exit, or return garbage.

The run completes, each failure is counted under its reason, and the valid rows are
the ones an in-process run gives (see :mod:`sbi_engine.workers`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbi_engine import BlackBoxSimulator, ConfigError, Parameter, load_dataset, simulate
from sbi_engine.cli import main as cli_main
from sbi_engine.simulator import register_simulator, row_keys
from sbi_engine.workers import WorkerPool, run_rows
from tests import toy_blackbox as hostile
from tests import toy_simulators as toys

ROOT = Path(__file__).resolve().parents[1]
PARAMS = (Parameter("a", -1.0, 1.0), Parameter("b", -1.0, 1.0))
TIMEOUT = 0.5


def hostile_sim(batched: bool = False) -> BlackBoxSimulator:
    fn = hostile.hostile_batched_fn if batched else hostile.hostile_fn
    return BlackBoxSimulator("toy_hostile", PARAMS, ("x1", "x2"), fn, batched=batched)


def hostile_theta() -> np.ndarray:
    """24 rows: every failure at least once (two hangs), the rest good."""
    a = [0.0, 0.95, 0.8, 0.6, 0.4, -0.95, 0.1, 0.2, -0.3, 0.75, 0.55, 0.45,
         -0.5, 0.25, 0.15, -0.1, 0.05, 0.92, -0.97, 0.0, 0.1, 0.2, 0.29, -0.2]
    b = np.linspace(-0.8, 0.8, 24)
    b[6] = 0.95  # NaN output
    return np.stack([a, b], axis=1).astype(np.float32)


def reasons_expected(theta: np.ndarray, timeout: float) -> Counter:
    out = Counter()
    for row in theta:
        r = hostile.expected_reason(row)
        if r is not None:
            out[f"timeout (> {timeout:g} s)" if r == "timeout" else r] += 1
    return out


def test_a_run_survives_raise_hang_segfault_exit_nan_and_wrong_shape(tmp_path):
    theta = hostile_theta()
    sim = hostile_sim()
    t0 = time.perf_counter()
    res = simulate(sim, theta=theta, seed=3, out=tmp_path / "ds", chunk_size=12, workers=2,
                   timeout=TIMEOUT, progress=False)
    seconds = time.perf_counter() - t0
    expected = reasons_expected(theta, TIMEOUT)
    assert res.report.errors == expected
    assert res.report.invalid == sum(expected.values())
    assert seconds < 60  # two hangs cost two timeouts, not an hour each

    # The valid rows are exactly those of a run without the failing rows (each row is
    # seeded from its own key, whichever worker ran it).
    good = np.array([hostile.expected_reason(r) is None for r in theta])
    np.testing.assert_array_equal(res.valid, good)
    clean = simulate(toys.flaky(), theta=np.where(good[:, None], theta, 0.0), seed=3,
                     progress=False)
    np.testing.assert_array_equal(res.x[good], clean.x[good])
    assert np.isnan(res.x[~good]).all()

    # The counts are in the dataset's manifest, and a rerun finds nothing to do.
    ds = load_dataset(tmp_path / "ds")
    assert ds.manifest["counts"]["invalid"] == sum(expected.values())
    assert Counter(ds.manifest["errors"]) == expected
    again = simulate(sim, theta=theta, seed=3, out=tmp_path / "ds", chunk_size=12, workers=2,
                     timeout=TIMEOUT, progress=False)
    assert again.simulated == 0


def test_a_crash_inside_a_many_row_task_loses_only_its_row():
    theta = hostile_theta()
    theta = theta[[hostile.expected_reason(r) not in ("timeout",) for r in theta]]
    keys = np.asarray(row_keys(np.array([0, 7], np.uint32), 0, theta.shape[0]))
    with WorkerPool(hostile.hostile_fn, batched=False, dim_x=2, workers=2) as pool:
        x, reasons = pool.run(keys, theta, None)
        assert any(b - a > 1 for a, b in pool._tasks(theta.shape[0]))  # several rows per task
        crashes = sum(hostile.EXITS < r[0] <= hostile.HANGS for r in theta)
        assert crashes >= 2 and pool.restarts >= crashes
        # the pool is reusable after its workers died
        x2, reasons2 = pool.run(keys, theta, None)
    assert reasons == [hostile.expected_reason(r) for r in theta] == reasons2
    ok = [r is None for r in reasons]
    ref, _ = run_rows(toys.flaky_fn, False, 2, keys[ok], theta[ok], None)
    np.testing.assert_array_equal(x[ok], ref)
    np.testing.assert_array_equal(x2, x)


def test_a_hung_batch_is_rerun_row_by_row():
    theta = np.array([[0.0, 0.1], [0.1, 0.2], [0.8, 0.0], [-0.2, 0.3]], np.float32)
    sim = hostile_sim(batched=True)
    keys = np.asarray(row_keys(np.array([0, 1], np.uint32), 0, 4))
    x, report = sim.simulate_rows(keys, theta, timeout=0.25)
    assert report.errors == Counter({"timeout (> 0.25 s)": 1})
    assert np.isnan(x[2]).all() and np.isfinite(x[[0, 1, 3]]).all()


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), "5", True])
def test_a_bad_timeout_is_a_named_error(timeout):
    with pytest.raises(ConfigError, match="timeout"):
        simulate(hostile_sim(), num=4, timeout=timeout, progress=False)


def test_a_timeout_needs_a_blackbox_simulator_and_no_scheduler(tmp_path):
    with pytest.raises(ConfigError, match="JAX simulator"):
        simulate(toys.gauss(), num=4, timeout=1.0, progress=False)
    with pytest.raises(ConfigError, match="scheduler"):
        simulate(hostile_sim(), num=4, timeout=1.0, out=tmp_path / "d", scheduler="local",
                 progress=False)


def test_cli_simulate_with_a_timeout_reports_the_failures(tmp_path, capsys):
    register_simulator("toy_hostile", hostile_sim, overwrite=True)
    theta = hostile_theta()[:12]
    np.save(tmp_path / "theta.npy", theta)
    rc = cli_main(["simulate", "toy_hostile", "--theta", str(tmp_path / "theta.npy"),
                   "--out", str(tmp_path / "ds"), "--timeout", str(TIMEOUT), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    for reason in reasons_expected(theta, TIMEOUT):
        assert reason in printed



@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(a=st.lists(st.sampled_from([0.0, -0.5, 0.2, 0.95, 0.8, 0.6, 0.4, -0.95]),
                  min_size=1, max_size=9),
       nan_row=st.integers(0, 8), workers=st.integers(1, 3))
def test_fuzzed_failure_mixes_are_counted_row_by_row(a, nan_row, workers):
    theta = np.stack([a, np.full(len(a), 0.1)], axis=1).astype(np.float32)
    theta[min(nan_row, len(a) - 1), 1] = 0.95
    keys = np.asarray(row_keys(np.array([0, 5], np.uint32), 0, len(a)))
    with WorkerPool(hostile.hostile_fn, batched=False, dim_x=2, workers=workers,
                    timeout=0.3) as pool:
        x, reasons = pool.run(keys, theta, None)
    want = [hostile.expected_reason(r) for r in theta]
    assert reasons == ["timeout (> 0.3 s)" if r == "timeout" else r for r in want]
    ok = np.array([r is None for r in want])
    assert np.isfinite(x[ok]).all() and np.isnan(x[~ok]).all()


def test_a_simulator_that_cannot_reach_the_workers_is_one_clear_error():
    sim = BlackBoxSimulator("toy_lambda", PARAMS, ("x1", "x2"),
                            lambda theta, nu, rng: theta)  # not importable by name
    with pytest.raises(ConfigError, match="failed to start.*module-level"):
        simulate(sim, num=4, timeout=1.0, progress=False)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(ln.startswith("State:") and "Z" in ln.split()[1] for ln in fh)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_hung_worker_dies_with_a_killed_supervisor(tmp_path):
    pidfile = tmp_path / "worker.pid"
    script = (
        "import numpy as np\n"
        "from sbi_engine.workers import WorkerPool\n"
        "from tests.toy_blackbox import hang_reporting_pid\n"
        "with WorkerPool(hang_reporting_pid, batched=False, dim_x=2, timeout=3600) as pool:\n"
        "    pool.run(np.zeros((1, 2), np.uint32), np.zeros((1, 2), np.float32), None)\n")
    env = {**os.environ, "SBI_ENGINE_TEST_PIDFILE": str(pidfile), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.exists() and pidfile.read_text()):
            assert proc.poll() is None, "the supervisor ended early"
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
        worker = int(pidfile.read_text())
        assert _alive(worker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the hung simulation outlived its killed supervisor"
