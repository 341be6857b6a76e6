"""limit_cpu_threads: the size of XLA's CPU runtime pool (sbi_engine.runtime)."""

import json
import os
import subprocess
import sys

import pytest

from sbi_engine.errors import ConfigError, SbiEngineError
from sbi_engine.runtime import limit_cpu_threads

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
