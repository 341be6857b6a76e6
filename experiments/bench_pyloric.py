"""Pyloric simulator: accuracy against the reference and simulation throughput.

Prints, in one process on this machine:

1. the relative error of the noiseless float64 and float32 features of the two
   reference circuits θ₁, θ₂ against the values of ``mackelab/pyloric``;
2. simulations/s (wall clock) and simulations per CPU-second vs batch size, float32 and
   float64, full 11 s simulations with noise (compile excluded);
3. memory per simulation of the same batched feature path, from XLA's compiled memory
   analysis (``jit(...).lower(...).compile().memory_analysis()``: temporaries,
   arguments, outputs), per batch size and dtype, and what a batch of 100k needs;
4. float32 vs float64 agreement of the 18 features on circuits drawn from the prior;
5. the reference simulator's speed, if a build of it is given with
   ``--reference-python``/``--reference-dir`` (a ``refdriver.py`` exposing
   ``simulate(theta, noise_std, seed)``; built outside this repository), else the
   1.0 simulation/s quoted for it — and the speed-up.

Usage::

    python experiments/bench_pyloric.py [--batch-sizes 1,16,64,256] [--n-agree 32]
        [--skip-accuracy] [--skip-throughput] [--skip-memory]
        [--reference-python /tmp/pyloric_ref/venv/bin/python --reference-dir /tmp/pyloric_ref/src]

The machine may be shared: the load average is printed, and the per-CPU-second rate is
the number to compare across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from simulators import pyloric

THETA_1 = [212.113902, 1.478108, 5.146624, 28.924275, 14.429948, 137.781018, 0.001852,
           0.007879, 76.128121, 0.386546, 5.243721, 46.209373, 3.028078, 86.707233,
           0.045096, 0.020853, 498.285787, 7.588804, 1.727937, 46.917664, 1.215287,
           116.490452, 0.027549, 0.017929, -9.023186, -16.734829, -12.85854, -10.147218,
           -7.372931, -14.997706, -8.180327]
THETA_2 = [102.822262, 0.581702, 3.067914, 11.872229, 11.730061, 76.607498, 0.007178,
           0.004775, 152.001813, 0.224029, 4.128232, 20.214917, 6.764827, 51.098563,
           0.029495, 0.016276, 531.105709, 8.345334, 3.176011, 48.002311, 0.539173,
           141.72911, 0.003823, 0.011794, -14.49602, -11.682581, -7.762917, -16.274646,
           -8.785116, -14.947767, -10.479587]
REF = np.array([
    [1170.621429, 213.63125, 215.752778, 395.316667, 0.182494, 0.184306, 0.337698, 0.420952,
     0.638788, 492.775, 255.003571, 279.221429, 43.564286, 0.238524, 0.037215, 2.5, 2.5, 2.5],
    [1122.803571, 194.253125, 189.169444, 404.097222, 0.173007, 0.16848, 0.3599, 0.416508,
     0.620793, 467.657143, 229.371429, 273.453571, 41.271429, 0.243545, 0.036757, 2.5, 2.5,
     2.5]])
REF_COUNTS = np.array([[8, 9, 9, 80, 109, 141], [8, 9, 9, 85, 72, 168]])


def _run(theta, dtype, **kw):
    if dtype == "float64":
        with jax.enable_x64(True):
            return pyloric.simulate_features(jax.random.key(kw.pop("seed", 0)), theta,
                                             dtype=jnp.float64, **kw)
    return pyloric.simulate_features(jax.random.key(kw.pop("seed", 0)), theta,
                                     dtype=jnp.float32, **kw)


def accuracy() -> dict:
    print("== 1. reference circuits (noise_std = 0): relative error vs mackelab/pyloric ==")
    out = {}
    for dtype in ("float64", "float32"):
        x = _run(np.array([THETA_1, THETA_2]), dtype, noise_std=0.0, features="full")
        for i, name in enumerate(("theta1", "theta2")):
            err = np.abs(x[i, :18] - REF[i]) / np.abs(REF[i])
            counts_ok = bool(np.array_equal(x[i, 18:24], REF_COUNTS[i]))
            out[f"{name}_{dtype}"] = {"max_rel_err": float(err.max()),
                                      "worst_feature": pyloric.FEATURE_NAMES[int(err.argmax())],
                                      "counts_exact": counts_ok}
            print(f"  {name} {dtype}: max rel err {err.max():.2e} "
                  f"({pyloric.FEATURE_NAMES[int(err.argmax())]}), median {np.median(err):.1e}, "
                  f"burst/spike counts exact: {counts_ok}")
    return out


def throughput(batch_sizes, t_max: float, dtypes) -> dict:
    print(f"== 2. throughput: {t_max:g} ms simulations, noise_std = 0.001, 18 features ==")
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rng = np.random.default_rng(0)
    sim = pyloric.build()
    low, high = sim.prior.support
    out = {}
    for dtype in dtypes:
        for b in batch_sizes:
            theta = low + (high - low) * rng.random((b, 31))
            t0 = time.perf_counter()
            _run(theta, dtype, t_max=t_max, seed=1)
            first = time.perf_counter() - t0
            t0, c0 = time.perf_counter(), time.process_time()
            _run(theta, dtype, t_max=t_max, seed=2)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            scale = t_max / 11000.0  # rates per full 11 s simulation
            rate, rate_cpu = b * scale / wall, b * scale / cpu
            out[f"{dtype}_b{b}"] = {"wall_s": wall, "cpu_s": cpu, "sims_per_s": rate,
                                    "sims_per_cpu_s": rate_cpu, "first_call_s": first}
            print(f"  {dtype} batch {b:5d}: {rate:7.2f} sims/s wall, {rate_cpu:7.2f} sims/CPU-s "
                  f"(run {wall:.1f} s, first call incl. compile {first:.1f} s)", flush=True)
    return out


def memory(batch_sizes, t_max: float, dtypes, t_burn: float = 1000.0) -> dict:
    """Bytes per simulation of the compiled batched feature path (compiled, not run)."""
    from simulators.pyloric.simulator import _batched

    print(f"== 3. memory per simulation: {t_max:g} ms, 18 features, compiled memory analysis ==")
    out = {}
    for dtype in dtypes:
        for b in batch_sizes:
            with jax.enable_x64(dtype == "float64"):
                dt = jnp.dtype(dtype)
                fn = _batched(0.001, "18", float(t_max), float(t_burn), dt, 1)
                keys = jax.random.split(jax.random.key(0), b)
                stats = fn.lower(keys, jnp.zeros((b, 31), dt),
                                 jnp.full((b,), 283.0, dt)).compile().memory_analysis()
            if stats is None:
                print("  this backend reports no memory analysis")
                return out
            temp, arg, res = (stats.temp_size_in_bytes, stats.argument_size_in_bytes,
                              stats.output_size_in_bytes)
            per_sim = (temp + arg + res) / b
            out[f"{dtype}_b{b}"] = {"temp_bytes": temp, "argument_bytes": arg,
                                    "output_bytes": res, "bytes_per_sim": per_sim}
            print(f"  {dtype} batch {b:5d}: temp {temp:>10,d} B, args {arg:>8,d} B, "
                  f"out {res:>8,d} B -> {per_sim:8,.0f} B/sim", flush=True)
    largest = {k: v for k, v in out.items() if k.endswith(f"_b{max(batch_sizes)}")}
    for key, v in largest.items():
        print(f"  {key.split('_')[0]}: a batch of 100,000 needs ~"
              f"{100_000 * v['bytes_per_sim'] / 2**30:.2f} GiB (at batch {max(batch_sizes)}'s "
              "bytes per simulation; no trace is stored)")
    return out


def agreement(n: int) -> dict:
    print(f"== 4. float32 vs float64 on {n} prior circuits (noise_std = 0, 18 features) ==")
    sim = pyloric.build()
    theta = np.asarray(sim.prior.sample(jax.random.key(42), n), np.float64)
    x32 = _run(theta, "float32", noise_std=0.0, features="full").astype(np.float64)
    x64 = _run(theta, "float64", noise_std=0.0, features="full")
    nan_same = np.isnan(x32[:, :18]) == np.isnan(x64[:, :18])
    both = np.isfinite(x32[:, :18]) & np.isfinite(x64[:, :18])
    rel = np.abs(x32[:, :18] - x64[:, :18]) / np.maximum(np.abs(x64[:, :18]), 1e-12)
    rel_f = rel[both]
    rows_ok = np.all(nan_same, axis=1) & np.all(np.where(both, rel < 1e-2, True), axis=1)
    valid = np.all(np.isfinite(x64[:, :18]), axis=1)
    out = {"n": n, "nan_pattern_agrees": float(nan_same.mean()),
           "median_rel_diff": float(np.median(rel_f)) if rel_f.size else None,
           "p90_rel_diff": float(np.quantile(rel_f, 0.9)) if rel_f.size else None,
           "rows_within_1pct": float(rows_ok.mean()), "valid_fraction_f64": float(valid.mean())}
    print(f"  NaN pattern agrees on {100 * nan_same.mean():.1f}% of entries; "
          f"{100 * valid.mean():.0f}% of circuits have all 18 features defined (float64)")
    if rel_f.size:
        print(f"  finite entries: median rel diff {np.median(rel_f):.1e}, "
              f"90th pct {np.quantile(rel_f, 0.9):.1e}, max {rel_f.max():.1e}")
    print(f"  circuits with identical NaN pattern and all features within 1%: "
          f"{100 * rows_ok.mean():.0f}%")
    return out


_REF_SNIPPET = """
import sys, time, json
sys.path.insert(0, {dir!r})
import numpy as np, refdriver
theta = np.array({theta!r})
refdriver.simulate(theta, noise_std=0.001, seed=0)  # warm-up
t0, c0 = time.perf_counter(), time.process_time()
for i in range({n}):
    out = refdriver.simulate(theta, noise_std=0.001, seed=i)
    refdriver.stats(out)
print(json.dumps({{"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}}))
"""


def reference_speed(python: str | None, ref_dir: str | None, n: int = 3) -> dict:
    print("== 5. reference simulator (mackelab/pyloric, Cython, one core) ==")
    if not python or not ref_dir:
        print("  no reference build given: using the quoted 1.0 simulation/s")
        return {"sims_per_s": 1.0, "sims_per_cpu_s": 1.0, "measured": False}
    code = _REF_SNIPPET.format(dir=ref_dir, theta=THETA_1, n=n)
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    t = json.loads(res.stdout.strip().splitlines()[-1])
    out = {"sims_per_s": n / t["wall"], "sims_per_cpu_s": n / t["cpu"], "measured": True}
    print(f"  {out['sims_per_s']:.2f} sims/s wall, {out['sims_per_cpu_s']:.2f} sims/CPU-s "
          f"(simulate + summary stats, {n} runs, noise_std = 0.001)")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,16,64,256")
    ap.add_argument("--t-max", type=float, default=11000.0)
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--n-agree", type=int, default=32)
    ap.add_argument("--reference-python", default=None)
    ap.add_argument("--reference-dir", default=None)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    results = {"device": str(jax.devices()[0]), "load_average": os.getloadavg()[0]}
    if not args.skip_accuracy:
        results["accuracy"] = accuracy()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if not args.skip_throughput:
        results["throughput"] = throughput(batch_sizes, args.t_max, args.dtypes.split(","))
    if not args.skip_memory:
        results["memory"] = memory(batch_sizes, args.t_max, args.dtypes.split(","))
    if args.n_agree > 0:
        results["agreement"] = agreement(args.n_agree)
    ref = reference_speed(args.reference_python, args.reference_dir)
    results["reference"] = ref
    if results.get("throughput"):
        best = max(results["throughput"].values(), key=lambda r: r["sims_per_s"])
        best32 = max((v for k, v in results["throughput"].items() if k.startswith("float32")),
                     key=lambda r: r["sims_per_s"], default=best)
        print("== speed-up of float32 (best batch) over the reference ==")
        print(f"  wall: {best32['sims_per_s'] / ref['sims_per_s']:.1f}x   "
              f"per CPU-second: {best32['sims_per_cpu_s'] / ref['sims_per_cpu_s']:.1f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
