"""sbi_engine.runtime: the size of XLA's CPU runtime pool (limit_cpu_threads) and the
persistent compile cache (enable_compile_cache, the CLI's --compile-cache)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sbi_engine import cli, runtime
from sbi_engine.errors import ConfigError, SbiEngineError
from sbi_engine.runtime import enable_compile_cache, limit_cpu_threads

# Starts JAX (optionally through limit_cpu_threads), runs a computation and reports
# the runtime's pool threads (named tf_XLAEigen) and every thread's CPU affinity.
_PROBE = """
import json, os, sys
n = int(sys.argv[1])
report = {}
if n:
    from sbi_engine.runtime import cpu_pool_threads, limit_cpu_threads
    report["returned"] = limit_cpu_threads(n)
    report["reported"] = cpu_pool_threads()
import jax.numpy as jnp
float(jnp.arange(1000.0).sum())
names, affinities = [], []
for tid in os.listdir("/proc/self/task"):
    names.append(open(f"/proc/self/task/{tid}/comm").read().strip())
    affinities.append(sorted(os.sched_getaffinity(int(tid))))
report["pool"] = names.count("tf_XLAEigen")
report["affinities"] = affinities
print(json.dumps(report))
"""


def _probe(n: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _PROBE, str(n)], capture_output=True,
                         text=True, env=env, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and at least two usable cores")
def test_one_pool_thread_and_every_thread_keeps_its_affinity():
    cpus = sorted(os.sched_getaffinity(0))
    default = _probe(0)
    assert default["pool"] == len(cpus)  # the runtime's default: one per core

    limited = _probe(1)
    assert limited["returned"] == 1 and limited["reported"] == "1"
    assert limited["pool"] == 1
    # Only the pool's size changed: no thread was left pinned to one core.
    assert all(a == cpus for a in limited["affinities"])


def test_at_least_the_core_count_is_the_default_pool():
    cpus = len(os.sched_getaffinity(0))
    report = _probe(cpus + 3)
    assert report["returned"] == cpus and report["pool"] == cpus


def test_after_the_first_computation_is_a_clear_error():
    import jax.numpy as jnp

    float(jnp.ones(2).sum())  # the backends have started in this process
    with pytest.raises(SbiEngineError, match="before JAX's first computation"):
        limit_cpu_threads(1)


def test_benchmark_pool_arguments():
    import argparse

    import jax.numpy as jnp

    from sbi_engine.runtime import add_pool_arguments, apply_pool_arguments

    parser = argparse.ArgumentParser()
    add_pool_arguments(parser, threads_all_help="every core")
    assert vars(parser.parse_args([])) == {"threads_all": False, "xla_pool": 1}
    float(jnp.ones(2).sum())  # started: only a call that reaches limit_cpu_threads raises
    apply_pool_arguments(parser.parse_args(["--threads-all"]))
    apply_pool_arguments(parser.parse_args(["--xla-pool", "0"]))
    with pytest.raises(SbiEngineError, match="before JAX's first computation"):
        apply_pool_arguments(parser.parse_args(["--xla-pool", "2"]))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "1"])
def test_bad_counts(bad):
    with pytest.raises(ConfigError, match="positive integer"):
        limit_cpu_threads(bad)


def test_cli_option():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "sbi_engine.cli", "--cpu-threads", "0",
                          "simulators"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0 and "cpu threads: expected a positive integer" in run.stderr
    run = subprocess.run([sys.executable, "-m", "sbi_engine.cli", "--cpu-threads", "1",
                          "simulators"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "two_moons" in run.stdout


def _cache_entries(directory: Path) -> dict[str, bytes]:
    """Entry name -> its last-access stamp (JAX rewrites the ``-atime`` file on a hit)."""
    return {p.name[:-len("-cache")]: (directory / (p.name[:-len("cache")] + "atime")).read_bytes()
            for p in directory.iterdir() if p.name.endswith("-cache")}


def test_compile_cache_reuses_programs_across_processes_and_keeps_results(tmp_path):
    assert cli.main(["simulate", "two_moons", "--num", "300", "--seed", "0",
                     "--out", str(tmp_path / "d")]) == 0
    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("SBI_ENGINE_COMPILE_CACHE")

    def train(out):
        run = subprocess.run(
            [sys.executable, "-m", "sbi_engine.cli", "--compile-cache", str(cache), "train",
             str(tmp_path / "d"), "--max-epochs", "2", "--out", str(tmp_path / out),
             "--quiet", "--no-checkpoint"],
            capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "persistent compilation cache" not in run.stderr  # no read/write warnings
        return (tmp_path / out / "params.msgpack").read_bytes()

    first = train("m1")
    written = _cache_entries(cache)
    assert len(written) >= 3  # the training's programs: initialisation, epoch, ...
    second = train("m2")
    read = _cache_entries(cache)
    assert read.keys() == written.keys()  # nothing compiled anew
    assert all(read[k] != written[k] for k in read)  # every program loaded from disk
    assert second == first  # and computes the same weights as a fresh compilation


def test_compile_cache_resolution_order(tmp_path, monkeypatch, capsys):
    turned_on = []

    def fake_enable(path):
        if "unwritable" in str(path):
            raise SbiEngineError(f"compile cache {path}: cannot write there (denied)")
        turned_on.append(str(path))
        return Path(path)

    monkeypatch.setattr(runtime, "enable_compile_cache", fake_enable)
    monkeypatch.setattr(runtime, "default_compile_cache_dir", lambda: tmp_path / "default")

    def resolve(*argv, env=None, jax_env=None):
        turned_on.clear()
        if env is None:
            monkeypatch.delenv(runtime.COMPILE_CACHE_ENV, raising=False)
        else:
            monkeypatch.setenv(runtime.COMPILE_CACHE_ENV, env)
        if jax_env is None:
            monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax_env)
        args = cli.build_parser().parse_args([*argv, "simulators"])
        cli._compile_cache(args)
        return turned_on[:]

    default = str(tmp_path / "default")
    assert resolve() == [default]
    assert resolve("--compile-cache", "/x") == ["/x"]
    assert resolve("--compile-cache", "/x", env="/y") == ["/x"]
    assert resolve(env="/y") == ["/y"]
    assert resolve(env="off") == resolve(env="0") == resolve(env="") == []
    assert resolve("--no-compile-cache", env="/y") == []
    assert resolve(jax_env="/jax") == []  # JAX's own variable: left to JAX
    assert resolve(env="/y", jax_env="/jax") == ["/y"]
    with pytest.raises(SystemExit):  # the two options exclude each other
        cli.build_parser().parse_args(["--compile-cache", "/x", "--no-compile-cache",
                                       "simulators"])
    # A directory the user named must work; the default may fail with a note only.
    with pytest.raises(SbiEngineError, match="unwritable"):
        resolve("--compile-cache", "/unwritable")
    monkeypatch.setattr(runtime, "default_compile_cache_dir", lambda: Path("/unwritable"))
    capsys.readouterr()
    assert resolve() == []
    assert "note: running without the compile cache" in capsys.readouterr().err


def test_compile_cache_bad_input(tmp_path):
    # (A directory that cannot be written: test_cli_reports_a_named_cache_it_cannot_use,
    # in a fresh process.)
    with pytest.raises(ConfigError, match="max_bytes"):
        enable_compile_cache(tmp_path, max_bytes=10)
    import jax
    import jax.numpy as jnp

    float(jnp.arange(3.0).sum())  # this process has compiled (without this cache)
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(SbiEngineError, match="before JAX's first compilation"):
        enable_compile_cache(tmp_path / "late")
    assert not (tmp_path / "late").exists()  # nothing created, nothing changed
    assert jax.config.jax_compilation_cache_dir == before
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR") != str(tmp_path / "late")


def test_cli_reports_a_named_cache_it_cannot_use(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "sbi_engine.cli", "--compile-cache",
                          str(blocker / "c"), "train", str(tmp_path / "d.zarr"), "--out",
                          str(tmp_path / "m")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: compile cache {blocker / 'c'}: cannot write there (Not a directory)"]


def test_commands_that_never_compile_leave_the_cache_alone(tmp_path, monkeypatch, capsys):
    # Listing simulators, reading a manifest and ranking runs compile nothing, so they
    # neither create the cache directory nor check a named one.
    turned_on = []
    monkeypatch.setattr(runtime, "enable_compile_cache", turned_on.append)
    monkeypatch.setenv(runtime.COMPILE_CACHE_ENV, str(tmp_path / "cache"))
    assert cli.main(["simulators"]) == 0
    assert cli.main(["--compile-cache", str(tmp_path / "named"), "leaderboard",
                     str(tmp_path / "no-runs")]) == 2  # no runs there: its own error
    assert "no-runs" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "missing.zarr")]) == 2
    assert turned_on == []
    # A command that compiles does turn it on (and here fails on its missing dataset).
    assert cli.main(["train", str(tmp_path / "missing.zarr"), "--out",
                     str(tmp_path / "m")]) == 2
    assert turned_on == [str(tmp_path / "cache")]
