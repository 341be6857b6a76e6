"""Fraction of prior circuits whose pyloric rhythm has all 15 standard features defined.

Draws ``N`` circuits θ from the prior of Gonçalves et al. 2020 (31-D box-uniform),
simulates each for 11 s (first 1 s discarded) with the reference's default noise
(``noise_std = 0.001``) in float32, in batches, and prints the fraction whose 15
standard features (Gonçalves et al. 2020) are all finite — i.e. the circuit bursts
in all three cells and is triphasic — with its exact (Clopper–Pearson) binomial 95 %
interval, the wall time and simulations/s. Reference values: "about 1–2 %" (task
issue), 0.97 % (Deistler et al. 2022, PNAS: 9 M prior simulations).

Usage::

    JAX_PLATFORMS=cpu python experiments/pyloric_valid_fraction.py [--num 2000]
        [--batch-size 256] [--seed 0] [--noise-std 0.001] [--json OUT.json]

``--t-max``/``--t-burn`` shorten the simulation (for the smoke test only: the
fraction then no longer compares with the references).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from scipy import stats

from simulators import pyloric

DEISTLER_FRACTION = 0.0097


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial ``level`` interval for ``k`` successes in ``n`` trials."""
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def valid_fraction(key: jax.Array, num: int, *, batch_size: int = 256,
                   noise_std: float = 0.001, t_max: float = 11000.0, t_burn: float = 1000.0,
                   log=None) -> dict:
    """Simulate ``num`` prior circuits and count those with all 15 features finite.

    Args:
        key: ``jax.random`` key; split into a prior key and a simulation key.
        num: number of circuits.
        batch_size: circuits per compiled call.
        noise_std: std of the per-step noise current.
        t_max, t_burn: simulated and discarded duration [ms].
        log: optional ``print``-like callable for per-batch progress.

    Returns:
        A dict with ``num``, ``valid``, ``fraction``, ``ci95`` and timings.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num, batch_size: expected >= 1, got {num}, {batch_size}")
    k_prior, k_sim = jax.random.split(key)
    sim = pyloric.build(noise_std=noise_std, features="15", t_max=t_max, t_burn=t_burn)
    theta = np.asarray(sim.prior.sample(k_prior, num))
    valid = 0
    done = 0
    first_batch_s = None
    t0 = time.perf_counter()
    for b, a in enumerate(range(0, num, batch_size)):
        rows = theta[a:a + batch_size]
        if len(rows) < batch_size:  # pad: one compiled shape for every batch
            rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), 0)])
        tb = time.perf_counter()
        x = pyloric.simulate_features(jax.random.fold_in(k_sim, b), rows, noise_std=noise_std,
                                      features="15", t_max=t_max, t_burn=t_burn)
        x = x[:min(batch_size, num - a)]
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - tb
        valid += int(np.isfinite(x).all(axis=1).sum())
        done += len(x)
        if log is not None:
            el = time.perf_counter() - t0
            log(f"  {done:6d}/{num}: {valid} valid ({valid / done:.2%}), {el:7.1f} s, "
                f"{done / el:.2f} sims/s")
    wall = time.perf_counter() - t0
    lo, hi = clopper_pearson(valid, num)
    steady = (wall - first_batch_s) / max(num - batch_size, 1) if num > batch_size else None
    return {
        "num": num, "valid": valid, "fraction": valid / num, "ci95": [lo, hi],
        "wall_s": wall, "sims_per_s": num / wall,
        "sims_per_s_after_compile": (1.0 / steady) if steady else None,
        "batch_size": batch_size, "noise_std": noise_std, "t_max": t_max, "t_burn": t_burn,
        "dtype": "float32",
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=2000, help="prior circuits (default 2000)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-std", type=float, default=0.001)
    ap.add_argument("--t-max", type=float, default=11000.0, help="ms simulated")
    ap.add_argument("--t-burn", type=float, default=1000.0, help="ms discarded")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"pyloric valid fraction: N={args.num}, noise_std={args.noise_std}, float32, "
          f"batch {args.batch_size}, {args.t_max:g} ms ({args.t_burn:g} ms burn-in), "
          f"seed {args.seed}; {os.cpu_count()} CPUs, load average {load:.1f}", flush=True)
    res = valid_fraction(jax.random.key(args.seed), args.num, batch_size=args.batch_size,
                         noise_std=args.noise_std, t_max=args.t_max, t_burn=args.t_burn,
                         log=lambda s: print(s, flush=True))
    lo, hi = res["ci95"]
    print(f"all 15 features finite: {res['valid']}/{res['num']} = {res['fraction']:.2%} "
          f"(95% CI {lo:.2%}–{hi:.2%}, Clopper–Pearson); Deistler et al. 2022: "
          f"{DEISTLER_FRACTION:.2%}")
    rate = res["sims_per_s_after_compile"]
    print(f"time {res['wall_s']:.1f} s (incl. compile), {res['sims_per_s']:.2f} sims/s"
          + (f"; {rate:.2f} sims/s after the first batch" if rate else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
