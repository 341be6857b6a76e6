"""Simulation throughput: the engine's JAX path vs a plain numpy loop of the same simulator.

For each task, measured side by side in one process on the same machine:

- ``numpy loop``: one simulation per Python call with a numpy Generator (how a black-box
  simulator is usually written), over ``--loop-num`` rows;
- ``numpy batch``: the same simulator vectorised over rows in numpy (a fair, strong yardstick);
- ``jax rows``: the jitted, vmapped single-example simulator on one batch (compile excluded);
- ``engine``: ``sbi_engine.simulate`` end to end in memory (prior draws, chunking, validity),
  and ``engine+store``: the same written to a checksummed zarr dataset.

Usage::

    python experiments/bench_simulate.py [--num 1000000] [--tasks two_moons slcp] [--json out.json]

Prints simulations/s and the ratios engine / numpy loop and jax rows / numpy batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from sbi_engine import get_simulator
from sbi_engine.simulate import simulate
from sbi_engine.simulator import row_keys

# --- numpy versions of the sbibm simulators (same definitions as simulators/benchmarks) --


def two_moons_np(theta, rng):
    a = rng.uniform(-math.pi / 2, math.pi / 2, size=theta.shape[:-1])
    r = rng.normal(0.1, 0.01, size=theta.shape[:-1])
    p = np.stack([r * np.cos(a) + 0.25, r * np.sin(a)], axis=-1)
    s = np.stack([-np.abs(theta[..., 0] + theta[..., 1]), theta[..., 1] - theta[..., 0]], -1)
    return p + s / math.sqrt(2.0)


def gaussian_linear_np(theta, rng):
    return theta + math.sqrt(0.1) * rng.normal(size=theta.shape)


def slcp_np(theta, rng):
    m = theta[..., :2]
    s1, s2 = theta[..., 2] ** 2, theta[..., 3] ** 2
    rho = np.tanh(theta[..., 4])
    # Cholesky of [[s1², ρ s1 s2], [ρ s1 s2, s2²]]
    l11, l21, l22 = s1, rho * s2, s2 * np.sqrt(1 - rho**2)
    eps = rng.normal(size=(*theta.shape[:-1], 4, 2))
    x0 = m[..., None, 0] + l11[..., None] * eps[..., 0]
    x1 = m[..., None, 1] + l21[..., None] * eps[..., 0] + l22[..., None] * eps[..., 1]
    return np.stack([x0, x1], axis=-1).reshape(*theta.shape[:-1], 8)


NUMPY = {"two_moons": two_moons_np, "gaussian_linear": gaussian_linear_np, "slcp": slcp_np}


def timed(fn, repeats=3):
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_task(name: str, num: int, loop_num: int) -> dict:
    sim = get_simulator(name)
    np_fn = NUMPY[name]
    rng = np.random.default_rng(0)
    theta = np.asarray(sim.prior.sample(jax.random.PRNGKey(0), num), dtype=np.float64)

    def loop():
        for i in range(loop_num):
            np_fn(theta[i], rng)

    t_loop = timed(loop, repeats=1)
    t_batch = timed(lambda: np_fn(theta, rng))

    keys = row_keys(jax.random.PRNGKey(1), 0, num)
    theta32 = theta.astype(np.float32)
    sim.simulate_rows(keys, theta32).block_until_ready()  # compile
    t_jax = timed(lambda: sim.simulate_rows(keys, theta32).block_until_ready())

    chunk = min(num, 100_000)
    simulate(sim, chunk, 0, chunk_size=chunk, progress=False)  # compile the chunk function
    t_engine = timed(lambda: simulate(sim, num, 0, chunk_size=chunk, progress=False), repeats=2)

    tmp = tempfile.mkdtemp(prefix="bench_simulate_")
    try:
        def to_store():
            shutil.rmtree(os.path.join(tmp, "d"), ignore_errors=True)
            simulate(sim, num, 0, chunk_size=chunk, out=os.path.join(tmp, "d"), progress=False)

        t_store = timed(to_store, repeats=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # Same distribution check: the numpy and JAX paths agree on moments at one θ.
    th = np.tile(theta[:1], (20_000, 1))
    a = np_fn(th, rng)
    b = np.asarray(sim.simulate(jax.random.PRNGKey(2), th.astype(np.float32)))
    moments_ok = bool(np.allclose(a.mean(0), b.mean(0), atol=0.05 * (a.std(0).max() + 1e-3)))

    rates = {
        "numpy_loop": loop_num / t_loop,
        "numpy_batch": num / t_batch,
        "jax_rows": num / t_jax,
        "engine": num / t_engine,
        "engine_store": num / t_store,
    }
    return {"task": name, "num": num, "rates": rates, "moments_agree": moments_ok,
            "engine_over_loop": rates["engine"] / rates["numpy_loop"],
            "jax_over_batch": rates["jax_rows"] / rates["numpy_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=1_000_000)
    parser.add_argument("--loop-num", type=int, default=20_000)
    parser.add_argument("--tasks", nargs="+", default=list(NUMPY))
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    print(f"device: {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
          f"{os.cpu_count()} CPU cores, N = {args.num:,}")
    header = (f"{'task':<16}{'numpy loop':>12}{'numpy batch':>13}{'jax rows':>12}"
              f"{'engine':>12}{'engine+store':>14}{'engine/loop':>13}{'jax/batch':>11}")
    print(header)
    print("-" * len(header))
    results = []
    for name in args.tasks:
        r = bench_task(name, args.num, args.loop_num)
        results.append(r)
        q = r["rates"]
        print(f"{name:<16}{q['numpy_loop']:>12,.0f}{q['numpy_batch']:>13,.0f}"
              f"{q['jax_rows']:>12,.0f}{q['engine']:>12,.0f}{q['engine_store']:>14,.0f}"
              f"{r['engine_over_loop']:>12.0f}x{r['jax_over_batch']:>10.1f}x"
              + ("" if r["moments_agree"] else "   (moments differ!)"))
    print("rates in simulations/s; best of repeats, compilation excluded")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
