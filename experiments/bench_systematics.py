"""Pivot toy before/after adversarial training, and vmapped vs sequential training speed.

1. **Learning to pivot** (Louppe, Kagan & Cranmer 2017, arXiv:1611.01046, §5.1): on
   their 2-D toy (background ``N(0, [[1, −.5], [−.5, 1]])``, signal ``N((1, 1 + Z), I)``,
   ``Z ~ N(0, 1)``) a plain classifier (adversary weight ``λ = 0``) and an adversarially
   trained one (``λ = --lam``) are trained at once (``train_many`` over ``λ``, same key,
   ``Z`` drawn per event from its prior). For ``Z = −1, 0, +1`` the script draws fresh
   test events, plots the classifier-output distributions of both (PNG: the paper's
   Fig. 3), and reports per ``Z``: the AUC, the HiggsML AMS (``b_reg = 10``) and the
   Asimov ``Z_A`` at the cut chosen at ``Z = 0`` on a validation sample (the analyst's
   frozen cut), the best-cut ``Z_A`` re-optimised at that ``Z`` (both scans keep at
   least 10 expected background events, so the frozen cut can land just below that on
   the test sample), and the Kolmogorov–Smirnov distance between the
   signal outputs at ``Z = −1`` and ``+1`` (0 for a perfect pivot). Yields: 100 signal,
   1000 background events.
2. **Speed**: ``--models`` (16) BCE classifiers, one per training setting
   (``Z`` from −1.5 to 1.5, one dataset each, stacked), trained (a) at once by
   ``train_many`` under ``jax.vmap`` and (b) one after another by ``train_one`` — same
   process, same device, same config — for each of ``--speed-configs`` (network widths
   and batch size; the default pair is the systematics study's 32x32 / 256 and a
   small 16x16 / 64). Both are compiled once first; the timed runs are steady state
   (``--repeats``, alternating, best of), and the ratio sequential / vmapped is printed,
   with and without compilation. Note that the sequential baseline is not a Python
   loop over steps: each ``train_one`` is itself one compiled ``lax.scan``, so on a CPU
   vmap only saves per-operation overhead (large for small networks and batches,
   nothing once the arithmetic saturates the cores); on a GPU it also fills the device.
   As in ``bench_train_speed.py``, XLA runs on one CPU thread unless ``--threads-all``.
   With ``--host-devices N`` the CPU is split into ``N`` XLA host devices and a third
   column times :func:`sbi_engine.distributed.sharded_train_many`: the same vmapped
   loop with the model axis partitioned over the ``N`` devices, which run in parallel
   (one core each) — the CPU analogue of spreading models over GPUs.

Usage::

    python experiments/bench_systematics.py --out runs/bench_systematics   # ≈ 1-2 min
    python experiments/bench_systematics.py --models 64 --speed-steps 1000 --repeats 3
    python experiments/bench_systematics.py --no-pivot --speed-configs 64x64/512
    python experiments/bench_systematics.py --no-pivot --host-devices 2   # + sharded column

Compare numbers from one run; the machine may be shared.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--threads-all" not in sys.argv:  # before jax is imported
    # single-threaded XLA kernels (not when imported, e.g. by the smoke test); the
    # pool size is --xla-pool
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false")
if __name__ == "__main__" and "--host-devices" in sys.argv:  # also before jax is imported
    _i = sys.argv.index("--host-devices") + 1
    if _i < len(sys.argv) and sys.argv[_i].isdigit():  # otherwise argparse reports it
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={sys.argv[_i]}")

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sbi_engine import classify as C
from sbi_engine.distributed import sharded_train_many
from sbi_engine.events import make_dataset
from sbi_engine.plotting import save_figure
from sbi_engine.runtime import add_pool_arguments, apply_pool_arguments, cpu_pool_threads
from sbi_engine.significance import ams, asimov_z, threshold_scan
from sbi_engine.store import atomic_write_bytes
from simulators.toy_physics import pivot

Z_VALUES = (-1.0, 0.0, 1.0)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic ``sup |F_a − F_b|``."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / a.size
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


# ------------------------------------------------------------------------------------
# 1. pivot
# ------------------------------------------------------------------------------------


def train_pivot(args, gen) -> C.TrainResult:
    data = jax.jit(C.augmented_data, static_argnums=(1, 2))(
        jax.random.key(args.seed), gen, args.n_train)
    cfg = C.ClassifierConfig(loss="pivot", hidden=tuple(args.hidden), batch_size=256,
                             steps=args.steps, pretrain_steps=args.pretrain_steps,
                             adv_on="signal", adv_steps=5, adv_components=5)
    key = jax.random.key_data(jax.random.key(args.seed + 1))
    keys = jnp.stack([key, key])  # same initialisation and batches for both models
    return C.train_many(keys, data, cfg, hyper={"adv_lambda": jnp.array([0.0, args.lam])})


def evaluate_pivot(args, gen, res) -> dict:
    """Scores at each Z and the significance table (numbers per model and Z)."""
    n = args.n_test
    predict = jax.jit(C.predict_many)
    w_s, w_b = gen.s_exp / n, gen.b_exp / n
    k_val, k_test = jax.random.split(jax.random.key(args.seed + 2))
    # the analyst's cut: best Z_A on an independent validation sample at Z = 0
    val_s = np.asarray(predict(res.params, gen.sample(jax.random.fold_in(k_val, 0), n,
                                                      "signal", gen.make_nu(z=0.0))))
    val_b = np.asarray(predict(res.params, gen.sample(jax.random.fold_in(k_val, 1), n,
                                                      "background")))
    y = np.r_[np.ones(n), np.zeros(n)]
    w = np.r_[np.full(n, w_s), np.full(n, w_b)]
    cuts = [threshold_scan(np.r_[val_s[m], val_b[m]], y, w, min_background=10.0,
                           thresholds=np.quantile(val_b[m], np.linspace(0.5, 0.999, 200))
                           ).threshold for m in range(2)]
    bkg = np.asarray(predict(res.params, gen.sample(jax.random.fold_in(k_test, 99), n,
                                                    "background")))
    scores, rows = {}, []
    for i, z in enumerate(Z_VALUES):
        sig = np.asarray(predict(res.params, gen.sample(jax.random.fold_in(k_test, i), n,
                                                        "signal", gen.make_nu(z=z))))
        scores[z] = sig
        for m in range(2):
            s = w_s * np.sum(sig[m] >= cuts[m])
            b = w_b * np.sum(bkg[m] >= cuts[m])
            best = threshold_scan(np.r_[sig[m], bkg[m]], y, w, min_background=10.0,
                                  thresholds=np.quantile(bkg[m], np.linspace(0.5, 0.999, 200)))
            rows.append({"model": m, "z": z, "auc": C.roc_auc(np.r_[sig[m], bkg[m]], y),
                         "s": float(s), "b": float(b),
                         "ams": float(ams(s, b)), "z_a": float(asimov_z(s, max(b, w_b))),
                         "z_a_best_cut": best.z})
    ks = [ks_distance(scores[-1.0][m], scores[1.0][m]) for m in range(2)]
    return {"cuts": cuts, "rows": rows, "ks_signal_z-1_vs_z+1": ks,
            "signal_scores": scores, "background_scores": bkg}


def plot_pivot(args, ev: dict, path: Path) -> Path:
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    edges = np.linspace(0, 1, 41)
    titles = ("plain classifier (λ = 0)", f"adversarial pivot (λ = {args.lam:g})")
    for m, ax in enumerate(axes):
        ax.hist(ev["background_scores"][m], edges, density=True, color="0.8",
                label="background (any Z)")
        for z, color in zip(Z_VALUES, ("C0", "C1", "C2")):
            ax.hist(ev["signal_scores"][z][m], edges, density=True, histtype="step",
                    lw=1.8, color=color, label=f"signal, Z = {z:+g}")
        ax.axvline(ev["cuts"][m], color="k", ls=":", lw=1, label="cut (chosen at Z = 0)")
        ks = ev["ks_signal_z-1_vs_z+1"][m]
        ax.set_title(f"{titles[m]}\nKS(signal Z=−1, Z=+1) = {ks:.2f}")
        ax.set_xlabel("classifier output f(x)")
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------
# 2. speed: vmap vs sequential
# ------------------------------------------------------------------------------------


def _speed_config(spec: str) -> tuple[tuple[int, ...], int]:
    """``"32x32/256"`` -> ``((32, 32), 256)``."""
    try:
        widths, batch = spec.split("/")
        return tuple(int(v) for v in widths.split("x")), int(batch)
    except ValueError:
        raise SystemExit(f"--speed-configs: expected WIDTHxWIDTH/BATCH like 32x32/256, "
                         f"got {spec!r}") from None


def speed(args, gen, spec: str) -> dict:
    hidden, batch = _speed_config(spec)
    m = args.models
    zs = np.linspace(-1.5, 1.5, m)
    make = jax.jit(make_dataset, static_argnums=(1, 3))
    datasets = [C.train_data(make(jax.random.key(args.seed + 10 + i), gen,
                                  gen.make_nu(z=float(z)), args.speed_events))
                for i, z in enumerate(zs)]
    stacked = C.TrainData(*(jnp.stack(a) for a in zip(*datasets)))
    cfg = C.ClassifierConfig(hidden=hidden, steps=args.speed_steps, batch_size=batch)

    def keys(rep):
        return jax.random.split(jax.random.key(1000 * rep + args.seed), m)

    def run_many(rep):
        res = C.train_many(keys(rep), stacked, cfg)
        jax.block_until_ready(res.params)
        return res.seconds

    def run_sequential(rep):
        total = 0.0
        for i in range(m):
            res = C.train_one(keys(rep)[i], datasets[i], cfg)
            jax.block_until_ready(res.params)
            total += res.seconds
        return total

    def run_sharded(rep):
        # timed from outside: includes laying the data out over the devices
        start = time.perf_counter()
        res = sharded_train_many(keys(rep), stacked, cfg)
        jax.block_until_ready(res.params)
        return time.perf_counter() - start

    shard = jax.local_device_count() > 1
    first_many, first_seq = run_many(0), run_sequential(0)  # includes compilation
    first_shard = run_sharded(0) if shard else None
    many, seq, sharded = [], [], []
    for rep in range(1, args.repeats + 1):
        many.append(run_many(rep))
        seq.append(run_sequential(rep))
        if shard:
            sharded.append(run_sharded(rep))
    out = {"config": spec, "models": m, "steps": args.speed_steps, "hidden": list(hidden),
           "batch_size": batch, "events_per_dataset": 2 * args.speed_events,
           "device": jax.devices()[0].platform,
           "vmap_s": min(many), "sequential_s": min(seq), "ratio": min(seq) / min(many),
           "vmap_first_call_s": first_many, "sequential_first_calls_s": first_seq,
           "ratio_with_compilation": first_seq / first_many,
           "vmap_runs_s": many, "sequential_runs_s": seq}
    if shard:
        out.update(devices=jax.local_device_count(), sharded_s=min(sharded),
                   ratio_sharded=min(seq) / min(sharded), sharded_first_call_s=first_shard,
                   sharded_runs_s=sharded)
    return out


# ------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_systematics",
                        help="directory for pivot_outputs.png and results.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32])
    parser.add_argument("--lam", type=float, default=10.0, help="adversary weight λ")
    parser.add_argument("--n-train", type=int, default=10_000, help="events per process")
    parser.add_argument("--n-test", type=int, default=50_000, help="events per process and Z")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--models", type=int, default=16, help="speed: models trained")
    parser.add_argument("--speed-steps", type=int, default=500)
    parser.add_argument("--speed-events", type=int, default=2000,
                        help="speed: events per process of each training setting")
    parser.add_argument("--speed-configs", nargs="+", default=["32x32/256", "16x16/64"],
                        help="speed: hidden widths / batch size, e.g. 32x32/256")
    parser.add_argument("--repeats", type=int, default=3)
    add_pool_arguments(parser,
                       threads_all_help="let XLA use every CPU core (default: one thread)")
    parser.add_argument("--host-devices", type=int, default=1,
                        help="split the CPU into this many XLA host devices and also time "
                             "sharded_train_many over them (set before jax starts: only "
                             "when run as a script)")
    parser.add_argument("--no-pivot", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    apply_pool_arguments(args)
    out = Path(args.out)
    gen = pivot.build()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPU cores, XLA pool "
          f"{cpu_pool_threads()}", flush=True)
    results: dict = {"config": vars(args)}
    if not args.no_pivot:
        res = train_pivot(args, gen)
        print(f"pivot: 2 models (λ = 0, {args.lam:g}) x {args.steps} steps in "
              f"{res.seconds:.1f} s (one vmapped run)", flush=True)
        ev = evaluate_pivot(args, gen, res)
        png = plot_pivot(args, ev, out / "pivot_outputs.png")
        print(f"\n{'model':<12}{'Z':>5}{'AUC':>8}{'s':>8}{'b':>8}{'AMS':>7}{'Z_A':>7}"
              f"{'Z_A best cut':>14}")
        for row in ev["rows"]:
            name = "plain" if row["model"] == 0 else f"pivot λ={args.lam:g}"
            print(f"{name:<12}{row['z']:>+5.0f}{row['auc']:>8.3f}{row['s']:>8.1f}"
                  f"{row['b']:>8.1f}{row['ams']:>7.2f}{row['z_a']:>7.2f}"
                  f"{row['z_a_best_cut']:>14.2f}")
        ks = ev["ks_signal_z-1_vs_z+1"]
        print(f"KS(signal output at Z = −1 vs +1): plain {ks[0]:.3f}, pivot {ks[1]:.3f}; "
              f"plot: {png}")
        results["pivot"] = {k: ev[k] for k in ("cuts", "rows", "ks_signal_z-1_vs_z+1")}
        results["pivot"]["train_seconds"] = res.seconds
    if not args.no_speed:
        results["speed"] = []
        print(f"\nspeed on {jax.devices()[0].platform}: {args.models} BCE models (one "
              f"training setting each) x {args.speed_steps} steps, "
              f"{2 * args.speed_events} events each; XLA_FLAGS="
              f"{os.environ.get('XLA_FLAGS', '').strip()!r}")
        ndev = jax.local_device_count()
        if args.host_devices > 1 and ndev != args.host_devices:
            print(f"  note: --host-devices {args.host_devices} asked for, jax sees {ndev} "
                  f"device(s) (the flag only works when this file is run as a script)")
        sharded_head = f"{f'sharded x{ndev} s':>15}{'ratio':>8}" if ndev > 1 else ""
        print(f"  {'hidden/batch':<14}{'vmap s':>9}{'sequential s':>14}{'ratio':>8}"
              f"{sharded_head}{'with compilation':>19}")
        for spec in args.speed_configs:
            sp = speed(args, gen, spec)
            results["speed"].append(sp)
            sharded_cols = (f"{sp['sharded_s']:>15.2f}{sp['ratio_sharded']:>7.1f}x"
                            if "sharded_s" in sp else "")
            print(f"  {spec:<14}{sp['vmap_s']:>9.2f}{sp['sequential_s']:>14.2f}"
                  f"{sp['ratio']:>7.1f}x{sharded_cols}{sp['ratio_with_compilation']:>10.1f}x "
                  f"({sp['sequential_first_calls_s']:.1f} vs {sp['vmap_first_call_s']:.1f} s)",
                  flush=True)
    atomic_write_bytes(out / "results.json",
                       json.dumps(results, indent=1, default=float).encode())
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
