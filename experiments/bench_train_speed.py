"""Training-speed benchmark: sbi-engine's NPE trainer vs sbi 0.27 (PyTorch), per epoch.

Same data, same architecture (hidden 50, 5 transforms, 10 bins) and same training
defaults (Adam 5e-4, batch 200, clip 5, 10 % validation, patience 20) for both; torch
on one thread, XLA on one CPU thread (single-threaded kernels and a runtime pool of one
thread, :func:`sbi_engine.runtime.limit_cpu_threads`; ``--xla-pool 0`` keeps the
runtime's pool of one thread per core, which this script used before). For every flow
kind, in one process and alternating (ours, sbi, ours, sbi, ... with ``--repeats``;
repeat ``r`` trains both sides with seed ``seed + r``, and with several repeats the
summary's whole-training ratio is summed sbi wall time over summed ours, since the epoch
count to early stopping varies with the seed), it records:

- ``startup``: our time to the end of the first epoch minus a steady epoch: fitting
  the standardisation, initialising, tracing and compiling (mostly XLA compilation);
- ``ours s/epoch``: median wall time of our epochs after the first (training scan +
  validation + host round trip), i.e. without compilation;
- ``sbi s/epoch``: sbi's training wall time divided by its epochs;
- ``wall``: total training wall time to early stopping (or ``--max-epochs``), ours
  including compilation;
- ``cpu``: process CPU time of the whole run (both sides single-threaded, so on a
  shared, oversubscribed machine the CPU-time ratio is the steadier comparison);
- ratios sbi/ours per epoch and for the whole run (wall and CPU);
- ``test NLL``: ``-mean log q(θ | x)`` of every trained posterior on ``--test-num``
  held-out simulations: with several ``--repeats`` (seeds) it compares the accuracy of
  the two trainers more precisely than a C2ST on a few observations.

Usage::

    python experiments/bench_train_speed.py                          # 10k, all kinds
    python experiments/bench_train_speed.py --max-epochs 10 --kinds nsf maf
    python experiments/bench_train_speed.py --task slcp --repeats 2 --json speed.json
    python experiments/bench_train_speed.py --no-sbi --max-epochs 5   # ours only
    python experiments/bench_train_speed.py --cache-dir /tmp/xla-cache  # opt-in cache

Our trainings of one flow structure in this process share one compiled epoch program
(:mod:`sbi_engine.programs`): with several ``--repeats`` only the first pays the
compilation, as in a user's sweep over seeds. ``--compile-each`` clears the compiled
programs before each of our trainings, so every one pays it, as separate processes do.

``--cache-dir`` turns on JAX's persistent compilation cache for this process
(:func:`sbi_engine.runtime.enable_compile_cache`; the library never does on its own, the
``sbi-engine`` command does); a second run with the same flow config and data sizes
then loads the compiled epoch instead of compiling it.

The machine may be shared: compare numbers from one run, and repeat.
"""

from __future__ import annotations

import os
import sys

if "--threads-all" not in sys.argv:  # single-threaded XLA kernels (pool size: --xla-pool)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false")

import argparse
import functools
import json
import time

import jax
import numpy as np

from sbi_engine import get_simulator
from sbi_engine.npe import NPEConfig, train_npe
from sbi_engine.programs import clear_compiled_programs
from sbi_engine.runtime import (
    add_pool_arguments,
    apply_pool_arguments,
    cpu_pool_threads,
    enable_compile_cache,
)
from sbi_engine.simulate import simulate


def test_nll(posterior, test):
    """Mean held-out negative log density ``-log q(θ | x)`` over ``test = (θ, x)``."""
    return float(-np.mean(posterior.log_prob(test[0], test[1]))) if test else float("nan")


def run_ours(kind, theta, x, prior, max_epochs, seed, test=None, nsf_init="torch_bias",
             compile_each=False):
    config = NPEConfig.for_estimator(kind, max_epochs=max_epochs, nsf_init=nsf_init)
    if compile_each:
        clear_compiled_programs()
    stamps = []
    c0, t0 = time.process_time(), time.perf_counter()
    result = train_npe(jax.random.PRNGKey(seed), theta, x, config=config, prior=prior,
                       progress=False, callback=lambda *_: stamps.append(time.perf_counter()))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    durations = np.diff([t0, *stamps])
    steady = float(np.median(durations[1:])) if len(durations) > 1 else float("nan")
    return {"epochs": result.epochs, "wall": wall, "cpu": cpu, "s_per_epoch": steady,
            "compile": float(durations[0] - steady) if len(durations) > 1 else float("nan"),
            "best_val_loss": result.best_val_loss, "test_nll": test_nll(result.posterior, test)}


def run_sbi(kind, theta, x, prior, max_epochs, seed, test=None, device="cpu"):
    from sbi_engine.interop.sbi import train_sbi

    config = NPEConfig.for_estimator(kind, max_epochs=max(max_epochs, 2))
    c0, t0 = time.process_time(), time.perf_counter()
    result = train_sbi(theta, x, prior=prior, config=config, seed=seed, progress=False,
                       device=device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"epochs": result.epochs, "wall": wall, "cpu": cpu,
            "s_per_epoch": result.seconds / result.epochs,
            "best_val_loss": result.best_val_loss, "test_nll": test_nll(result.posterior, test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="two_moons")
    parser.add_argument("--num", type=int, default=10_000, help="training simulations")
    parser.add_argument("--kinds", nargs="+", default=["maf", "nsf", "nsf_ar"])
    parser.add_argument("--max-epochs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-num", type=int, default=10_000,
                        help="held-out simulations (seed + 1) for the test NLL of every "
                             "trained posterior, an accuracy check across seeds (0: none)")
    parser.add_argument("--no-sbi", action="store_true", help="time only our trainer")
    add_pool_arguments(parser, threads_all_help="let torch and XLA use every core "
                                                "(default: one thread each)")
    parser.add_argument("--cache-dir", help="JAX persistent compilation cache directory")
    parser.add_argument("--nsf-init", choices=["torch_bias", "nflows", "zero_bias"],
                        default="torch_bias",
                        help="our NSF's conditioner init (FlowConfig.nsf_init)")
    parser.add_argument("--compile-each", action="store_true",
                        help="compile our epoch program for every training (as separate "
                             "processes do) instead of reusing it across repeats")
    parser.add_argument("--sbi-device", default="cpu",
                        help="torch device sbi trains on: cpu (default), cuda or cuda:N")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    apply_pool_arguments(args)
    if args.cache_dir:
        enable_compile_cache(args.cache_dir)

    torch_info = "sbi skipped"
    if not args.no_sbi:
        try:
            import torch

            from sbi_engine.interop.sbi import torch_device

            torch_device(args.sbi_device)  # a bad device fails before any training
            if not args.threads_all:
                torch.set_num_threads(1)
            torch_info = (f"torch {torch.__version__} ({torch.get_num_threads()} thread, "
                          f"sbi on {args.sbi_device})")
        except ImportError:
            torch_info, args.no_sbi = "torch or sbi not installed: sbi skipped", True
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {torch_info}; "
          f"{os.cpu_count()} CPU cores; XLA pool {cpu_pool_threads()}; task {args.task}; "
          f"N = {args.num:,}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '').strip()!r}", flush=True)

    sim = get_simulator(args.task)
    data = simulate(sim, args.num, args.seed, progress=False)
    theta, x = np.asarray(data.theta), np.asarray(data.x)
    test = None
    if args.test_num:
        held_out = simulate(sim, args.test_num, args.seed + 1, progress=False)
        test = (np.asarray(held_out.theta), np.asarray(held_out.x))
    rows = []
    for rep in range(args.repeats):
        for kind in args.kinds:
            ours = functools.partial(run_ours, nsf_init=args.nsf_init,
                                     compile_each=args.compile_each)
            sbi = functools.partial(run_sbi, device=args.sbi_device)
            methods = [("ours", ours)] + ([] if args.no_sbi else [("sbi", sbi)])
            for method, fn in methods:
                # Repeat ``rep`` trains with seed ``seed + rep`` on both sides (same data):
                # the epoch count to early stopping varies with the seed, so the fair
                # whole-training ratio is the ratio of summed wall times over repeats.
                r = fn(kind, theta, x, sim.prior, args.max_epochs, args.seed + rep, test)
                r.update(method=method, kind=kind, repeat=rep)
                rows.append(r)
                extra = f"  startup {r['compile']:.1f} s" if method == "ours" else ""
                print(f"  [{rep}] {kind:<7}{method:<5} {r['wall']:8.2f} s  {r['epochs']:4d} "
                      f"epochs (cpu {r['cpu']:7.1f} s)  {r['s_per_epoch'] * 1e3:8.1f} ms/epoch"
                      f"{extra}  "
                      f"best val {r['best_val_loss']:.3f}  test NLL {r['test_nll']:.3f}",
                      flush=True)

    print()
    header = (f"{'kind':<8}{'rep':>4}{'startup s':>11}{'ours ms/ep':>12}{'sbi ms/ep':>11}"
              f"{'ratio/ep':>10}{'ours wall':>11}{'sbi wall':>10}{'ep o/s':>9}{'ratio wall':>12}"
              f"{'ratio cpu':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["method"] != "ours":
            continue
        other = [o for o in rows if o["method"] == "sbi" and o["kind"] == r["kind"]
                 and o["repeat"] == r["repeat"]]
        o = other[0] if other else None
        sbi_ep = f"{o['s_per_epoch'] * 1e3:.0f}" if o else "-"
        ratio_ep = f"{o['s_per_epoch'] / r['s_per_epoch']:.1f}x" if o else "-"
        sbi_wall = f"{o['wall']:.1f}" if o else "-"
        epochs = f"{r['epochs']}/{o['epochs']}" if o else f"{r['epochs']}"
        ratio_wall = f"{o['wall'] / r['wall']:.1f}x" if o else "-"
        ratio_cpu = f"{o['cpu'] / r['cpu']:.1f}x" if o else "-"
        print(f"{r['kind']:<8}{r['repeat']:>4}{r['compile']:>11.1f}{r['s_per_epoch'] * 1e3:>12.1f}"
              f"{sbi_ep:>11}{ratio_ep:>10}{r['wall']:>11.1f}{sbi_wall:>10}{epochs:>9}"
              f"{ratio_wall:>12}{ratio_cpu:>11}")
    if not args.no_sbi and args.repeats > 1:
        print()
        compiles = ("ours compiled for every seed" if args.compile_each
                    else "ours compiled for the first seed only")
        for kind in args.kinds:
            ours = [r for r in rows if r["kind"] == kind and r["method"] == "ours"]
            sbi = [r for r in rows if r["kind"] == kind and r["method"] == "sbi"]
            wo, ws = sum(r["wall"] for r in ours), sum(r["wall"] for r in sbi)
            eo, es = sum(r["epochs"] for r in ours), sum(r["epochs"] for r in sbi)
            first = sbi[0]["wall"] / ours[0]["wall"]
            print(f"{kind}: over {len(ours)} seeds ours {wo:.1f} s / {eo} epochs, sbi {ws:.1f} s "
                  f"/ {es} epochs: wall ratio {ws / wo:.1f}x ({compiles}; first seed alone "
                  f"{first:.1f}x); mean test NLL ours "
                  f"{np.mean([r['test_nll'] for r in ours]):.3f}, sbi "
                  f"{np.mean([r['test_nll'] for r in sbi]):.3f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
