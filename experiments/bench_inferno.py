"""The INFERNO benchmark table: expected uncertainty on s for B0–B4, ours next to the paper's.

de Castro & Dorigo 2019, "INFERNO: Inference-Aware Neural Optimisation",
arXiv:1806.04743, Table 2 (synthetic 3-D problem, ``s = 50``, ``b = 1000``; B0 nothing
free, B1 ``r`` free, B2 ``r, λ`` free, B3 ``r ~ N(0, 0.4)``, ``λ ~ N(3, 1)``, B4 = B3 +
``b ~ N(1000, 100)``). Every summary is evaluated the way the authors' code does it
(``benchmarking.py``, ``template_model.py``, ``summary_statistic_computer.py``), with
:func:`sbi_engine.classify.binned_fisher`: ``--n-eval`` events per process at fixed
keys, the summary histogrammed in 10 bins at the nominal point and at ``r ± 0.2`` and
``λ ± 0.5`` (the same events, transformed), the Poisson Fisher information of the
binned templates from central differences, constraints ``1/σ²`` added for B3/B4, and
``σ_s = √(I⁻¹)_ss``. Rows:

- ``cross-entropy``: ``--seeds`` BCE classifiers (the authors' 2 × 100 ReLU network,
  balanced classes, ``--n-train`` events per process at nominal ν; Adam instead of
  their plain SGD), trained at once by ``train_many``; the summary is the output in 10
  equal bins on [0, 1]; the row is the median over seeds (the paper: median of 100);
- ``INFERNO``: one model per benchmark Bk trained with that benchmark's free
  nuisances and constraints (``loss="inferno"``, 10 softmax bins, T = 0.1, events
  simulated inside the loss every step), evaluated on hard (argmax) bins; the row is
  the diagonal (model Bk on Bk, the paper's bold entries), median over
  ``--inferno-seeds``; the full matrix (model × benchmark) is printed too;
- ``optimal clf``: the Bayes-optimal ``p(s | x)`` binned the same way (no training: it
  checks the evaluation against the paper's own "optimal classifier" row);
- ``analytic``: the exact extended likelihood's Fisher information
  (:meth:`simulators.toy_physics.inferno.Inferno.analytic_fisher`), the lower bound.

Usage::

    python experiments/bench_inferno.py                      # ≈ 3-5 min on 2 CPU cores
    python experiments/bench_inferno.py --full --json inferno.json   # more seeds/steps
    python experiments/bench_inferno.py --benchmarks B0 B2 --no-inferno   # BCE only

Compare numbers from one run; the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from sbi_engine import classify as C
from sbi_engine.events import make_dataset
from sbi_engine.store import atomic_write_bytes
from simulators.toy_physics import inferno

BENCHMARKS = tuple(inferno.BENCHMARKS)
#: the paper's Table 2 (medians over 100 initialisations), rows as in its table.tex
PUBLISHED = {
    "cross_entropy": dict(zip(BENCHMARKS, inferno.PUBLISHED["cross_entropy"])),
    "inferno": dict(zip(BENCHMARKS, inferno.PUBLISHED["inferno"])),
    "optimal_classifier": dict(zip(BENCHMARKS, inferno.PUBLISHED["optimal_classifier"])),
    "analytic": dict(zip(BENCHMARKS, inferno.PUBLISHED["analytic"])),
}
#: INFERNO model trained for benchmark k (row) evaluated on every benchmark (column)
PUBLISHED_INFERNO_MATRIX = {
    "B0": (15.51, 18.34, 23.24, 21.38, 26.38),
    "B1": (15.80, 16.79, 21.41, 20.29, 24.26),
    "B2": (15.71, 16.87, 16.95, 16.88, 18.67),
    "B3": (15.70, 16.91, 16.97, 16.89, 18.69),
    "B4": (15.71, 16.89, 16.95, 16.88, 18.68),
}
STEPS = {"r": 0.2, "lambda": 0.5}  # the authors' template shifts (r_dist, b_rate)
BINS = 10


def uncertainties(fisher_mu: np.ndarray, s_exp: float) -> dict[str, float]:
    """``{benchmark: σ_s}`` from a ``(4, 4)`` Fisher matrix in ``(μ, r, λ, b)``."""
    to_s = np.diag([1.0 / s_exp, 1.0, 1.0, 1.0])
    fisher = to_s @ np.asarray(fisher_mu, np.float64) @ to_s
    return {b: inferno.expected_uncertainty(fisher, b) for b in BENCHMARKS}


def evaluate(score, gen, key, n_eval: int) -> list[dict[str, float]]:
    """σ_s per benchmark for each of the ``M`` stacked models that ``score`` scores."""
    fisher = C.binned_fisher(score, gen, key, n=n_eval, edges=BINS, steps=STEPS)
    fisher = fisher.reshape(-1, 4, 4)
    return [uncertainties(f, gen.s_exp) for f in fisher]


def median(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {b: float(np.median([r[b] for r in rows])) for b in rows[0]}


def run_cross_entropy(args, gen, data, eval_key) -> dict:
    cfg = C.ClassifierConfig(hidden=(100, 100), activation="relu", steps=args.steps,
                             batch_size=args.batch_size, learning_rate=args.lr)
    keys = jax.random.split(jax.random.key(args.seed + 1), args.seeds)
    res = C.train_many(keys, data, cfg)
    print(f"  cross-entropy: {args.seeds} models x {args.steps} steps in {res.seconds:.1f} s "
          f"(one vmapped run, compilation included)", flush=True)
    predict = jax.jit(C.predict_many)
    per_seed = evaluate(lambda x: predict(res.params, x), gen, eval_key, args.n_eval)
    return {"median": median(per_seed), "per_seed": per_seed, "train_seconds": res.seconds}


def run_inferno(args, gen, data, eval_key) -> dict:
    matrix, per_seed, seconds = {}, {}, {}
    predict = jax.jit(C.predict_many)
    for i, name in enumerate(args.benchmarks):
        free, constrain = inferno.BENCHMARKS[name]
        cfg = C.ClassifierConfig(hidden=(100, 100), activation="relu", loss="inferno",
                                 bins=BINS, temperature=args.temperature,
                                 free_nuisances=free, constrain=constrain,
                                 steps=args.inferno_steps, inferno_events=args.inferno_events,
                                 learning_rate=args.inferno_lr)
        keys = jax.random.split(jax.random.key(args.seed + 100 + i), args.inferno_seeds)
        res = C.train_many(keys, data, cfg, generator=gen)
        seconds[name] = res.seconds
        per_seed[name] = evaluate(lambda x, p=res.params: predict(p, x), gen, eval_key,
                                  args.n_eval)
        matrix[name] = median(per_seed[name])
        loss_end = np.median(res.metrics["sigma_s"][:, -max(1, args.inferno_steps // 10):])
        print(f"  INFERNO {name}: {args.inferno_seeds} model(s) x {args.inferno_steps} steps "
              f"in {res.seconds:.1f} s; soft σ_s at the end of training {loss_end:.2f}, "
              f"hard-binned {matrix[name][name]:.2f}", flush=True)
    diagonal = {name: matrix[name][name] for name in args.benchmarks}
    return {"diagonal": diagonal, "matrix": matrix, "per_seed": per_seed,
            "train_seconds": seconds}


def run_optimal(args, gen, eval_key) -> dict[str, float]:
    @jax.jit
    def optimal(x):
        log_r = jax.vmap(lambda e: gen.log_prob(e, "signal") - gen.log_prob(e, "background"))
        return jax.nn.sigmoid(log_r(x))

    return evaluate(optimal, gen, eval_key, args.n_eval)[0]


def run_analytic(args, gen) -> dict[str, float]:
    fisher = gen.analytic_fisher(jax.random.key(args.seed + 7), args.n_analytic)
    return {b: inferno.expected_uncertainty(fisher, b) for b in BENCHMARKS}


def table(rows: dict[str, dict[str, float]], benchmarks: Sequence[str]) -> str:
    """Ours / published / ratio per benchmark, one line per method."""
    names = {"cross_entropy": "cross-entropy", "inferno": "INFERNO (Bk on Bk)",
             "optimal_classifier": "optimal clf", "analytic": "analytic"}
    head = f"{'':<20}" + "".join(f"{b:>22}" for b in benchmarks)
    sub = f"{'':<20}" + "".join(f"{'ours  paper  ratio':>22}" for _ in benchmarks)
    lines = [head, sub]
    for key, ours in rows.items():
        cells = []
        for b in benchmarks:
            mine, paper = ours.get(b, float("nan")), PUBLISHED[key][b]
            cells.append(f"{mine:8.2f} {paper:6.2f} {mine / paper:6.3f}")
        lines.append(f"{names[key]:<20}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS),
                        choices=BENCHMARKS, help="INFERNO models to train (and columns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=100_000,
                        help="BCE training events per process (the authors: 100k)")
    parser.add_argument("--n-eval", type=int, default=200_000,
                        help="evaluation events per process (the authors: 100k)")
    parser.add_argument("--n-analytic", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, default=4, help="BCE models (median)")
    parser.add_argument("--steps", type=int, default=3000, help="BCE optimiser steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--inferno-seeds", type=int, default=1)
    parser.add_argument("--inferno-steps", type=int, default=1000)
    parser.add_argument("--inferno-events", type=int, default=1000,
                        help="events per process simulated in each INFERNO step")
    parser.add_argument("--inferno-lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--no-inferno", action="store_true", help="skip the INFERNO rows")
    parser.add_argument("--no-analytic", action="store_true")
    parser.add_argument("--full", action="store_true",
                        help="bigger: 16 BCE seeds, 4 INFERNO seeds x 3000 steps, 500k "
                             "evaluation events (≈ 30-60 min on 2 CPU cores)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.full:
        args.seeds, args.inferno_seeds, args.inferno_steps = 16, 4, 3000
        args.n_eval, args.steps = 500_000, 5000
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    gen = inferno.build()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU "
          f"cores; BCE {args.seeds} seeds x {args.steps} steps; INFERNO "
          f"{args.inferno_seeds} seed(s) x {args.inferno_steps} steps x "
          f"{args.inferno_events} events; {args.n_eval:,} evaluation events per process",
          flush=True)
    data = C.train_data(jax.jit(make_dataset, static_argnums=(1, 3))(
        jax.random.key(args.seed), gen, None, args.n_train))
    eval_key = jax.random.key(args.seed + 1000)
    results: dict = {"config": vars(args), "published": PUBLISHED,
                     "published_inferno_matrix": PUBLISHED_INFERNO_MATRIX}
    rows: dict[str, dict[str, float]] = {}
    results["cross_entropy"] = run_cross_entropy(args, gen, data, eval_key)
    rows["cross_entropy"] = results["cross_entropy"]["median"]
    if not args.no_inferno:
        results["inferno"] = run_inferno(args, gen, data, eval_key)
        rows["inferno"] = results["inferno"]["diagonal"]
    rows["optimal_classifier"] = results["optimal_classifier"] = run_optimal(args, gen,
                                                                             eval_key)
    if not args.no_analytic:
        rows["analytic"] = results["analytic"] = run_analytic(args, gen)
    columns = list(BENCHMARKS)
    print("\nExpected uncertainty on s (ours / published / ratio):")
    print(table(rows, columns))
    if not args.no_inferno:
        print("\nINFERNO model trained for Bk (rows) on every benchmark (columns), "
              "ours (paper):")
        for name, row in results["inferno"]["matrix"].items():
            print(f"  {name}: " + "  ".join(
                f"{row[b]:6.2f} ({p:5.2f})"
                for b, p in zip(BENCHMARKS, PUBLISHED_INFERNO_MATRIX[name])))
    results["seconds"] = time.perf_counter() - start
    print(f"\ntotal {results['seconds']:.0f} s")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(results, indent=1, default=float).encode())
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
