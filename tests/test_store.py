"""simulate() + the zarr dataset store: determinism, resume, identity checks, corruption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sbi_engine import BoxUniform, ConfigError, DatasetError, ShapeError
from sbi_engine.simulate import simulate
from sbi_engine.store import DatasetStore, load_dataset
from tests import toy_simulators as toys


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a dataset directory, by relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_in_memory_matches_store_and_counts_invalid(tmp_path):
    sim = toys.gauss()
    mem = simulate(sim, 5000, 7, chunk_size=1000, progress=False)
    disk = simulate(sim, 5000, 7, chunk_size=1000, out=tmp_path / "d", progress=False)
    np.testing.assert_array_equal(mem.x, disk.x)
    np.testing.assert_array_equal(mem.theta, disk.theta)
    expected_invalid = int((mem.theta[:, 0] > 0.95).sum())
    assert expected_invalid > 0
    assert mem.report.invalid == disk.report.invalid == expected_invalid
    assert (~disk.valid).sum() == expected_invalid and np.isnan(disk.x[~disk.valid]).all()
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["complete"] and m["counts"]["invalid"] == expected_invalid
    assert m["seed"] == 7 and m["simulator"] == "toy_gauss" and len(m["chunk_sha256"]) == 5
    assert m["prior"] == sim.prior.to_dict()


def test_rows_do_not_depend_on_chunk_size():
    a = simulate(toys.gauss(), 3000, 1, chunk_size=1000, progress=False)
    b = simulate(toys.gauss(), 3000, 1, chunk_size=700, progress=False)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-6, equal_nan=True)
    c = simulate(toys.gauss(), 3000, 2, chunk_size=1000, progress=False)
    assert not np.allclose(a.theta, c.theta)


def test_interrupted_run_resumes_to_identical_bytes(tmp_path, monkeypatch):
    sim = toys.gauss()
    ref = tmp_path / "ref"
    simulate(sim, 4500, 3, chunk_size=1000, out=ref, progress=False)

    calls = {"n": 0}
    original = DatasetStore.write_chunk

    def failing(self, index, arrays, extra=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, index, arrays, extra)

    monkeypatch.setattr(DatasetStore, "write_chunk", failing)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        simulate(sim, 4500, 3, chunk_size=1000, out=part, progress=False)
    monkeypatch.setattr(DatasetStore, "write_chunk", original)
    with pytest.raises(DatasetError, match="incomplete \\(2 of 5 chunks\\)"):
        load_dataset(part)
    resumed = simulate(sim, 4500, 3, chunk_size=1000, out=part, progress=False)
    assert resumed.simulated == 2500  # chunks 2, 3 and the 500-row tail
    assert tree_bytes(part) == tree_bytes(ref)


def test_a_different_request_against_a_store_is_an_error(tmp_path):
    out = tmp_path / "d"
    simulate(toys.gauss(), 1000, 0, out=out, progress=False)
    with pytest.raises(DatasetError, match="seed differ.*existing 0, requested 1"):
        simulate(toys.gauss(), 1000, 1, out=out, progress=False)
    with pytest.raises(DatasetError, match="num"):
        simulate(toys.gauss(), 2000, 0, out=out, progress=False)
    with pytest.raises(DatasetError, match="simulator"):
        simulate(toys.flaky(), 1000, 0, out=out, progress=False)
    with pytest.raises(DatasetError, match="prior"):
        simulate(toys.gauss(), 1000, 0, out=out, proposal=BoxUniform(-0.5, 0.5, dim=2),
                 progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="not empty and is not an sbi-engine dataset"):
        simulate(toys.gauss(), 10, 0, out=other, progress=False)
    assert (other / "notes.txt").read_text() == "hello"


def test_corrupted_chunk_is_detected_and_named(tmp_path):
    out = tmp_path / "d"
    simulate(toys.gauss(), 3000, 0, chunk_size=1000, out=out, progress=False)
    chunk_file = out / "x" / "c" / "1" / "0"
    assert chunk_file.exists()
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="chunk 1 \\(rows 1000-2000\\)"):
        load_dataset(out)
    ds = load_dataset(out, lazy=True)
    assert next(ds.iter_chunks()).index == 0  # the intact chunk still reads
    # A rerun repairs the corrupted chunk and nothing else.
    again = simulate(toys.gauss(), 3000, 0, chunk_size=1000, out=out, progress=False)
    assert again.simulated == 1000
    load_dataset(out)


def test_broken_manifests_are_named(tmp_path):
    out = tmp_path / "d"
    simulate(toys.gauss(), 100, 0, out=out, progress=False)
    manifest = out / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(out)
    m = json.loads(text)
    m["format_version"] = 99
    manifest.write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="format version 99 is not supported"):
        load_dataset(out)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing")


def test_explicit_theta_proposal_and_nuisance_modes(tmp_path):
    theta = np.tile([[0.2, -0.3]], (50, 1)).astype(np.float32)
    r = simulate(toys.gauss(), None, 0, theta=theta, progress=False)
    np.testing.assert_array_equal(r.theta, theta)
    assert abs(r.x[:, 0].mean() - 0.2) < 0.05
    with pytest.raises(ShapeError, match="num: 10 but theta has 50 rows"):
        simulate(toys.gauss(), 10, 0, theta=theta, progress=False)
    with pytest.raises(ShapeError, match="expected shape \\(n, 2\\), got \\(50, 3\\)"):
        simulate(toys.gauss(), None, 0, theta=np.zeros((50, 3)), progress=False)
    narrow = simulate(toys.gauss(), 500, 0, proposal=BoxUniform(-0.1, 0.1, dim=2), progress=False)
    assert np.abs(narrow.theta).max() <= 0.1
    shifted = toys.shifted()
    prior_nu = simulate(shifted, 500, 0, progress=False)
    assert prior_nu.nu.shape == (500, 1) and prior_nu.nu.std() > 0.2
    nominal = simulate(shifted, 500, 0, nu="nominal", progress=False)
    assert np.all(nominal.nu == 0.0)
    with pytest.raises(ShapeError, match="no nuisance parameters"):
        simulate(toys.gauss(), 5, 0, nu=np.zeros((5, 1)), progress=False)
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ConfigError, match="num"):
            simulate(toys.gauss(), bad, 0, progress=False)
    with pytest.raises(ConfigError, match="seed"):
        simulate(toys.gauss(), 5, -1, progress=False)


def test_blackbox_dataset_with_workers_equals_serial(tmp_path):
    serial = simulate(toys.flaky(), 600, 4, chunk_size=200, out=tmp_path / "a", progress=False)
    pooled = simulate(toys.flaky(), 600, 4, chunk_size=200, out=tmp_path / "b", workers=2,
                      progress=False)
    np.testing.assert_array_equal(serial.x, pooled.x)
    assert serial.report.invalid == pooled.report.invalid > 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["errors"]["RuntimeError"] > 0 and m["counts"]["invalid"] == serial.report.invalid


def test_batched_blackbox_rows_do_not_depend_on_the_workers(tmp_path):
    # A batched fn draws from one generator per batch; the batches are the same 16 per
    # chunk in this process and in any number of workers (they were one per worker).
    runs = [simulate(toys.noise_batch(), 600, 4, chunk_size=200, workers=w, progress=False)
            for w in (1, 2, 3)]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0].x, other.x)
    assert runs[0].valid.all() and np.unique(runs[0].x[:, 0] - runs[0].theta[:, 0]).size == 600


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "sbi_engine.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _wait_for_records(out: Path, at_least: int, proc, timeout=120.0) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        n = len(list((out / "chunks").glob("*.json"))) if (out / "chunks").exists() else 0
        if n >= at_least:
            return n
        if proc.poll() is not None:
            return n
        time.sleep(0.005)
    raise AssertionError("simulation made no progress")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_cli_run_resumes_to_identical_bytes(tmp_path, sig):
    """A real `sbi-engine simulate two_moons --num 100000` subprocess, killed mid-run.

    200 chunks of 500 give the signal a window of a few seconds even on a loaded
    machine (with 50 chunks of 2,000 a busy CI box once let the run finish first)."""
    chunks = 200
    args = ["simulate", "two_moons", "--num", "100000", "--seed", "0", "--chunk-size",
            str(100_000 // chunks), "--quiet"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    done = _cli(*args, "--out", str(ref))
    assert done.wait(timeout=300) == 0, done.stderr.read().decode()
    env = dict(os.environ)
    proc = _cli(*args, "--out", str(part), env=env)
    n = _wait_for_records(part, 1, proc)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    written = len(list((part / "chunks").glob("*.json")))
    assert 0 < n <= written < chunks, "the run finished before it could be interrupted"
    if sig == signal.SIGINT:
        assert rc == 130 and "rerun the same command to resume" in proc.stderr.read().decode()
    else:
        assert rc == -signal.SIGKILL
    resumed = _cli(*args, "--out", str(part))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    assert "simulated " in out.decode()
    assert tree_bytes(part) == tree_bytes(ref)


def test_ctrl_c_swallowed_inside_a_simulation_still_stops_at_the_chunk_boundary(tmp_path):
    """A library that catches KeyboardInterrupt (or a finaliser that eats it) must not
    cost the user their Ctrl-C: the run stops after the chunk in flight, which is kept."""
    from sbi_engine import BlackBoxSimulator

    calls = []

    def careless(theta, nu, rng):
        calls.append(1)
        if len(calls) == 25:  # inside chunk 2 (chunks of 10)
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        return theta + 0.1 * rng.normal(size=2)

    sim = BlackBoxSimulator("toy_careless", toys.PARAMS, ("x1", "x2"), careless)
    with pytest.raises(KeyboardInterrupt):
        simulate(sim, num=100, seed=0, chunk_size=10, out=tmp_path / "d", progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert len(calls) == 30 and len(list((tmp_path / "d" / "chunks").glob("*.json"))) == 3
    res = simulate(sim, num=100, seed=0, chunk_size=10, out=tmp_path / "d", progress=False)
    assert res.simulated == 70 and len(calls) == 100


def test_atomic_writes_get_the_umask_permissions_not_private_ones(tmp_path):
    import os
    import stat

    from sbi_engine.store import atomic_write_bytes, atomic_write_dir

    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        atomic_write_dir(tmp_path / "model", {"w.npz": b"x"})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~mask
