"""Scale-out throughput: one process vs a Dask LocalCluster of 1, 2, ... workers.

Two simulators, each written to a checksummed dataset on disk:

- ``blackbox``: a numpy/Python per-row simulator (an Ornstein-Uhlenbeck path of 1000
  Euler steps in a Python loop, summarised by mean and std), the case where worker
  processes bring parallelism;
- ``jax``: the sbibm ``slcp`` task batched in large chunks, where one process already uses
  every core and Dask adds only its per-task cost.

For each: ``simulate(..., out=...)`` in this process, then the same request with
``scheduler=`` a LocalCluster of ``n`` single-threaded worker processes (started once per
``n``; start-up time reported). Every mode is warmed up first (imports, compilation on
each worker), then the modes are timed interleaved, ``--repeats`` times each on fresh
datasets (best time kept, so all modes see the same machine load); the distributed
datasets are checked byte-identical to the single-process one. Overhead per task:
``(t(1 worker) - t(single process)) / chunks``, and the round trip of an empty task
(:func:`sbi_engine.distributed.run_sweep` over no-op points).

Usage::

    python experiments/bench_scale.py [--workers 1 2] [--num-blackbox 20000] \\
        [--num-jax 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from sbi_engine import BlackBoxSimulator, Parameter, get_simulator
from sbi_engine.distributed import connect, run_sweep
from sbi_engine.simulate import simulate

STEPS = 1000


def ou_fn(theta, nu, rng):
    """An Ornstein-Uhlenbeck path, dx = -a x dt + s dW, in plain Python: (mean, std)."""
    a, s = float(theta[0]), float(theta[1])
    dt = 0.01
    amp = s * math.sqrt(dt)
    x, total, total2 = 0.0, 0.0, 0.0
    for e in rng.standard_normal(STEPS).tolist():
        x += -a * x * dt + amp * e
        total += x
        total2 += x * x
    mean = total / STEPS
    return np.array([mean, math.sqrt(max(total2 / STEPS - mean * mean, 0.0))])


def blackbox() -> BlackBoxSimulator:
    return BlackBoxSimulator("ou_path", (Parameter("a", 0.1, 2.0), Parameter("s", 0.1, 1.0)),
                             ("mean", "std"), ou_fn, description="benchmark OU path")


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def timed_run(sim, num, chunk, out, scheduler=None) -> float:
    """Seconds to simulate ``num`` rows into the fresh dataset ``out``."""
    t0 = time.perf_counter()
    simulate(sim, num, 0, chunk_size=chunk, out=out, progress=False, scheduler=scheduler)
    return time.perf_counter() - t0


def _noop(i):
    return i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-blackbox", type=int, default=20_000)
    parser.add_argument("--chunk-blackbox", type=int, default=500)
    parser.add_argument("--num-jax", type=int, default=1_000_000)
    parser.add_argument("--chunk-jax", type=int, default=50_000)
    parser.add_argument("--noop-tasks", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    cases = {
        "blackbox": (blackbox(), args.num_blackbox, args.chunk_blackbox),
        "jax": (get_simulator("slcp"), args.num_jax, args.chunk_jax),
    }
    load0 = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPU cores, load average {load0:.1f}; jax on "
          f"{jax.devices()[0].platform}; best of {args.repeats} interleaved runs per mode")
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    results: dict = {"cases": {}, "cluster": {}, "repeats": args.repeats}
    seconds: dict[str, dict[str, float]] = {name: {} for name in cases}
    try:
        with contextlib.ExitStack() as stack:
            modes: dict[str, object] = {"single": None}
            for n in args.workers:
                t0 = time.perf_counter()
                client = stack.enter_context(connect("local", workers=n))
                start = time.perf_counter() - t0
                run_sweep(_noop, range(2 * n), client)  # workers up and importing
                t1 = time.perf_counter()
                run_sweep(_noop, range(args.noop_tasks), client)
                noop = (time.perf_counter() - t1) / args.noop_tasks
                results["cluster"][n] = {"startup_s": start, "noop_task_s": noop}
                modes[f"dask{n}"] = client
            for name, (sim, num, chunk) in cases.items():
                for mode, scheduler in modes.items():  # warm-up: imports, compilation
                    timed_run(sim, min(num, 4 * chunk), chunk, tmp / name / mode / "warm",
                              scheduler)
                for r in range(args.repeats):  # modes interleaved: same conditions
                    for mode, scheduler in modes.items():
                        out = tmp / name / mode / f"run{r}"
                        t = timed_run(sim, num, chunk, out, scheduler)
                        seconds[name][mode] = min(seconds[name].get(mode, math.inf), t)
                        if r:  # run0 is kept for the byte comparison
                            shutil.rmtree(out)
                ref = tree_bytes(tmp / name / "single" / "run0")
                for mode in modes:
                    if mode != "single":
                        results["cases"].setdefault(name, {})[f"{mode}_identical"] = (
                            tree_bytes(tmp / name / mode / "run0") == ref)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    header = f"{'simulator':<10}{'mode':<18}{'seconds':>9}{'sims/s':>12}{'vs single':>11}"
    print(header)
    print("-" * len(header))
    for name, (_, num, chunk) in cases.items():
        chunks = -(-num // chunk)
        res = results["cases"].setdefault(name, {})
        res.update(num=num, chunk=chunk, chunks=chunks, seconds=seconds[name],
                   rate={m: num / t for m, t in seconds[name].items()})
        for mode, t in seconds[name].items():
            label = "single process" if mode == "single" else f"dask, {mode[4:]} worker(s)"
            ident = "" if mode == "single" else (
                "" if res[f"{mode}_identical"] else "  (bytes differ!)")
            print(f"{name:<10}{label:<18}{t:>9.2f}{num / t:>12,.0f}"
                  f"{seconds[name]['single'] / t:>10.2f}x{ident}")
        if "dask1" in seconds[name]:
            over = (seconds[name]["dask1"] - seconds[name]["single"]) / chunks
            res["overhead_per_task_s"] = over
            print(f"{name:<10}overhead per task (1 worker vs single, {chunks} tasks of "
                  f"{chunk} rows): {1e3 * over:.1f} ms")
    for n, c in results["cluster"].items():
        print(f"LocalCluster({n}): start-up {c['startup_s']:.1f} s, empty-task round trip "
              f"{1e3 * c['noop_task_s']:.1f} ms")
    print("timed runs exclude warm-up (imports, compilation on each worker) and cluster start; "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
