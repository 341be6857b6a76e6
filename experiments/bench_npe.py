"""NPE benchmark: sbi-engine (JAX) vs the `sbi` package (PyTorch) on the sbibm tasks.

For each task: simulate one training set (engine simulators, same data for everybody),
then train, alternating in one process, our NSF and MAF and sbi 0.27's NSF and MAF with
matched architecture (hidden 50, 5 transforms, 10 bins) and matched training defaults
(Adam 5e-4, batch 200, clip 5, 10 % validation, patience 20). Torch is limited to one
thread and JAX to one CPU thread. Each trained posterior draws 10,000 samples for each
observation, scored by the sbibm C2ST against the reference posterior (0.5 is perfect).

Usage::

    python experiments/bench_npe.py                       # 10k simulations, all tasks
    python experiments/bench_npe.py --num 1000 --tasks two_moons slcp --observations 1 2
    python experiments/bench_npe.py --num 100000 --json results/npe_100k.json
    python experiments/bench_npe.py --c2st-jobs 2         # the C2STs on two processes
    python experiments/bench_npe.py --tsnpe               # + TSNPE on slcp (2 x 5k)
    ... --tsnpe --tsnpe-rounds 5 --tasks --observations 1  # TSNPE only, 5 x 2k
    ... --tsnpe --sbi-tsnpe --tasks --observations 1 2 3   # ours and sbi's TSNPE

Prints a table (train wall time, epochs, s/epoch, sbi/ours ratio, mean C2ST) and
writes it as JSON with ``--json``.
"""

from __future__ import annotations

import os
import sys

if "--threads-all" not in sys.argv:  # single-threaded XLA kernels (pool size: --xla-pool)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false")

import argparse
import importlib
import json
import time

import jax
import numpy as np

from sbi_engine import get_simulator
from sbi_engine.diagnostics import c2st_sbibm
from sbi_engine.npe import NPEConfig, train_npe, train_tsnpe
from sbi_engine.runtime import add_pool_arguments, apply_pool_arguments, cpu_pool_threads
from sbi_engine.simulate import simulate
from sbi_engine.store import atomic_write_bytes

TASKS = ["two_moons", "gaussian_linear", "slcp", "gaussian_mixture", "bernoulli_glm"]
PUBLISHED_NPE = {  # sbibm paper, NPE mean C2ST at 1k / 10k / 100k
    "two_moons": (0.725, 0.606, 0.542), "slcp": (0.975, 0.901, 0.831),
    "gaussian_linear": (0.694, 0.552, 0.506), "gaussian_mixture": (0.731, 0.661, 0.555),
    "bernoulli_glm": (0.863, 0.678, 0.559),
}
BUDGET_INDEX = {1_000: 0, 10_000: 1, 100_000: 2}


def run_method(method, est, key, theta, x, prior, config, seed, sbi_device="cpu"):
    if method == "ours":
        return train_npe(key, theta, x, config=config, prior=prior, progress=False)
    from sbi_engine.interop.sbi import train_sbi

    return train_sbi(theta, x, prior=prior, config=config, seed=seed, progress=False,
                     device=sbi_device)


def sbi_tsnpe(sim, x_o, rounds, per_round, config, seed):
    """sbi 0.27's own TSNPE (Deistler et al. 2022, as in sbi's tutorial) on the engine's
    simulator: NPE with force_first_round_loss, proposal = the prior restricted by
    get_density_thresholder(quantile=1e-4). Returns sbi's posterior at ``x_o``."""
    import torch
    from sbi.inference import NPE
    from sbi.neural_nets import posterior_nn
    from sbi.utils import RestrictedPrior, get_density_thresholder

    from sbi_engine.interop.sbi import _NullTracker, _posterior_nn_kwargs, to_sbi_prior

    torch.manual_seed(seed)
    prior = to_sbi_prior(sim.prior)
    inference = NPE(prior=prior, density_estimator=posterior_nn(
        **_posterior_nn_kwargs(config.flow)), show_progress_bars=False,
        tracker=_NullTracker())  # no sbi-logs/ directory in the working tree
    proposal, x_t = prior, torch.as_tensor(np.asarray(x_o, np.float32))[None]
    for r in range(rounds):
        theta = proposal.sample((per_round,))
        x = sim.simulate(jax.random.fold_in(jax.random.PRNGKey(seed), r),
                         np.asarray(theta, np.float32))
        inference.append_simulations(theta, torch.as_tensor(np.asarray(x, np.float32)))
        inference.train(force_first_round_loss=True, training_batch_size=config.batch_size,
                        learning_rate=config.learning_rate,
                        stop_after_epochs=config.stop_after_epochs)
        posterior = inference.build_posterior().set_default_x(x_t)
        proposal = RestrictedPrior(prior, get_density_thresholder(posterior, quantile=1e-4),
                                   sample_with="rejection")
    return posterior


def write_json(path, rows):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_bytes(path, json.dumps(rows, indent=1).encode())


def draw(posterior, task_mod, observations, n_samples):
    """``(reference, samples)`` per observation for the C2ST."""
    pairs = []
    for k in observations:
        x_o = task_mod.observation(k)
        ref = task_mod.reference_posterior_samples(k)[:n_samples]
        pairs.append((ref, np.asarray(posterior.sample(jax.random.PRNGKey(1000 + k),
                                                       n_samples, x_o))))
    return pairs


def _c2st_one_thread(ref, samples, seed):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one BLAS thread per worker process
        return c2st_sbibm(ref, samples, seed=seed)


def c2st_all(pairs, seed, jobs):
    """sbibm C2ST of every ``(reference, samples)`` pair; ``jobs > 1`` runs them in that
    many processes (each C2ST is deterministic, so the numbers do not change)."""
    if jobs <= 1:
        return [c2st_sbibm(ref, s, seed=seed) for ref, s in pairs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_c2st_one_thread, ref, s, seed) for ref, s in pairs]
        return [f.result() for f in futures]


def score(posterior, task_mod, observations, n_samples, seed, jobs=1):
    return c2st_all(draw(posterior, task_mod, observations, n_samples), seed, jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=10_000, help="training simulations")
    parser.add_argument("--tasks", nargs="*", default=TASKS,
                        help="sbibm tasks (none: only the TSNPE rows with --tsnpe)")
    parser.add_argument("--methods", nargs="+", default=["ours:nsf", "sbi:nsf", "ours:maf",
                                                         "sbi:maf"])
    parser.add_argument("--observations", nargs="+", type=int, default=list(range(1, 11)))
    parser.add_argument("--c2st-samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tsnpe", action="store_true", help="also TSNPE on slcp")
    parser.add_argument("--sbi-tsnpe", action="store_true",
                        help="with --tsnpe: also sbi's own TSNPE on the same budget")
    parser.add_argument("--tsnpe-rounds", type=int, default=2,
                        help="TSNPE rounds; --num is split evenly between them (default 2)")
    add_pool_arguments(parser, threads_all_help="let torch and XLA use every core "
                                                "(default: one thread each)")
    parser.add_argument("--c2st-jobs", type=int, default=1,
                        help="processes for the sbibm C2STs, run after a task's trainings "
                             "so they never overlap a timed training (default 1)")
    parser.add_argument("--nsf-init", choices=["torch_bias", "nflows", "zero_bias"],
                        default="torch_bias",
                        help="our NSF's conditioner init (FlowConfig.nsf_init)")
    parser.add_argument("--sbi-device", default="cpu",
                        help="torch device sbi's NPE trains on: cpu (default), cuda or cuda:N "
                             "(--sbi-tsnpe stays on the CPU)")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    apply_pool_arguments(args)

    try:
        import torch

        from sbi_engine.interop.sbi import torch_device

        if any(m.startswith("sbi") for m in args.methods):
            torch_device(args.sbi_device)  # a bad device fails before any training
        if not args.threads_all:
            torch.set_num_threads(1)
        torch_info = (f"torch {torch.__version__} ({torch.get_num_threads()} thread, sbi on "
                      f"{args.sbi_device})")
    except ImportError:
        torch_info = "torch or sbi not installed: sbi methods skipped"
        args.methods = [m for m in args.methods if not m.startswith("sbi")]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {torch_info}; "
          f"{os.cpu_count()} CPU cores; XLA pool {cpu_pool_threads()}; N = {args.num:,}; "
          f"observations {args.observations}")

    rows = []
    for task in args.tasks:
        sim = get_simulator(task)
        mod = importlib.import_module(f"simulators.benchmarks.{task}")
        data = simulate(sim, args.num, args.seed, progress=False)
        trained = []
        for spec in args.methods:  # the timed trainings, back to back
            method, est = spec.split(":")
            config = NPEConfig.for_estimator(est, nsf_init=args.nsf_init)  # sbi: its own init
            t0 = time.perf_counter()
            result = run_method(method, est, jax.random.PRNGKey(args.seed), data.theta,
                                data.x, sim.prior, config, args.seed, args.sbi_device)
            wall = time.perf_counter() - t0
            s = result.summary()
            print(f"  {task:<17} {spec:<9} {wall:8.1f} s  {s['epochs']:4d} epochs", flush=True)
            trained.append((spec, method, est, wall, s["epochs"],
                            draw(result.posterior, mod, args.observations, args.c2st_samples)))
        # Then the C2STs of the whole task (in parallel with --c2st-jobs).
        pairs = [p for *_, ps in trained for p in ps]
        flat = iter(c2st_all(pairs, args.seed, args.c2st_jobs))
        for spec, method, est, wall, epochs, ps in trained:
            scores = [next(flat) for _ in ps]
            row = {"task": task, "method": method, "estimator": est, "num": args.num,
                   "train_seconds": wall, "epochs": epochs,
                   "seconds_per_epoch": wall / max(epochs, 1),
                   "observations": list(args.observations),
                   "c2st": scores, "c2st_mean": float(np.mean(scores))}
            rows.append(row)
            print(f"  {task:<17} {spec:<9} {wall:8.1f} s  {epochs:4d} epochs  "
                  f"{row['seconds_per_epoch']:.3f} s/epoch  C2ST {row['c2st_mean']:.3f}",
                  flush=True)
            write_json(args.json, rows)  # after every row: a long run keeps what it did

    if args.tsnpe:
        sim = get_simulator("slcp")
        mod = importlib.import_module("simulators.benchmarks.slcp")
        for k in args.observations:
            t0 = time.perf_counter()
            post, _ = train_tsnpe(jax.random.PRNGKey(args.seed + k), sim, mod.observation(k),
                                  rounds=args.tsnpe_rounds,
                                  simulations_per_round=args.num // args.tsnpe_rounds,
                                  config=NPEConfig.for_estimator("nsf", nsf_init=args.nsf_init),
                                  progress=False)
            wall = time.perf_counter() - t0  # simulation, truncation and training
            c = score(post, mod, [k], args.c2st_samples, args.seed, args.c2st_jobs)[0]
            rows.append({"task": "slcp", "method": "ours-tsnpe", "estimator": "nsf",
                         "num": args.num, "rounds": args.tsnpe_rounds, "observation": k,
                         "c2st_mean": c, "train_seconds": wall})
            print(f"  slcp TSNPE obs {k}: C2ST {c:.3f} ({wall:.0f} s)", flush=True)
            write_json(args.json, rows)
            if args.sbi_tsnpe:
                t0 = time.perf_counter()
                post = sbi_tsnpe(sim, mod.observation(k), args.tsnpe_rounds,
                                 args.num // args.tsnpe_rounds, NPEConfig.for_estimator("nsf"),
                                 args.seed + k)
                wall = time.perf_counter() - t0
                samples = post.sample((args.c2st_samples,), show_progress_bars=False).numpy()
                ref = mod.reference_posterior_samples(k)[:args.c2st_samples]
                c = c2st_sbibm(ref, samples, seed=args.seed)
                rows.append({"task": "slcp", "method": "sbi-tsnpe", "estimator": "nsf",
                             "num": args.num, "rounds": args.tsnpe_rounds, "observation": k,
                             "c2st_mean": c, "train_seconds": wall})
                print(f"  slcp sbi TSNPE obs {k}: C2ST {c:.3f} ({wall:.0f} s)", flush=True)
                write_json(args.json, rows)

    print()
    header = (f"{'task':<17}{'method':<11}{'train s':>9}{'epochs':>8}{'s/epoch':>9}"
              f"{'sbi/ours':>10}{'C2ST':>8}{'published NPE':>15}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["method"].endswith("-tsnpe"):
            continue
        ratio = ""
        if r["method"] == "ours":
            other = [o for o in rows if o["task"] == r["task"] and o["method"] == "sbi"
                     and o["estimator"] == r["estimator"]]
            if other:
                ratio = f"{other[0]['train_seconds'] / r['train_seconds']:.1f}x"
        pub = PUBLISHED_NPE.get(r["task"])
        idx = BUDGET_INDEX.get(args.num)
        pub_s = f"{pub[idx]:.3f}" if pub and idx is not None else ""
        print(f"{r['task']:<17}{r['method'] + ':' + r['estimator']:<11}"
              f"{r['train_seconds']:>9.1f}{r['epochs']:>8d}{r['seconds_per_epoch']:>9.3f}"
              f"{ratio:>10}{r['c2st_mean']:>8.3f}{pub_s:>15}")
    for who in ("ours", "sbi"):
        ts = [r["c2st_mean"] for r in rows if r["method"] == f"{who}-tsnpe"]
        if ts:
            print(f"slcp TSNPE, {who} ({args.tsnpe_rounds} rounds, {args.num:,} total): mean "
                  f"C2ST {np.mean(ts):.3f} (published SNPE at 10k: 0.845)")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
