"""The ``sbi-engine`` command line.

Every error caused by bad input is printed as one line (``error: ...``) with a
non-zero exit code; ``--debug`` shows the traceback instead.

Commands:
    simulators [NAME]     list registered simulators, or one simulator's parameters
    simulate NAME ...     simulate a dataset (resumable) into a zarr store
    info PATH             print a dataset's manifest summary and valid/invalid counts
    systematics CONFIG    a train x test significance matrix over nuisance settings
    run EXPERIMENT        run an experiment file (TOML): a run directory, or a sweep
    leaderboard DIR       rank the runs under DIR by a metric
    demo                  the quick-start job: NPE, a systematics study, a report
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from sbi_engine.errors import SEED_LIMIT, ConfigError, SbiEngineError, ShapeError
from sbi_engine.interrupt import ctrl_c_latch

__all__ = ["main"]

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def _load_array(path: str, field: str) -> np.ndarray:
    """Load a numeric array from ``.npy`` (never pickled) or ``.csv``/``.txt``."""
    p = Path(path)
    if not p.is_file():
        raise ShapeError(f"{field}: file {path} does not exist")
    if p.suffix not in (".npy", ".csv", ".txt"):
        raise ShapeError(f"{field}: expected a .npy or .csv file, got {p.name}")
    try:
        with warnings.catch_warnings():  # loadtxt warns on an empty file; we raise below
            warnings.simplefilter("ignore")
            if p.suffix == ".npy":
                arr = np.load(p, allow_pickle=False)
            else:
                arr = np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
    except (ValueError, EOFError, OSError) as err:  # EOFError: empty or truncated .npy
        raise ShapeError(f"{field}: cannot read {path} as a numeric array "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(arr, np.ndarray):  # a .npz archive renamed .npy
        arr.close()
        raise ShapeError(f"{field}: {path} is an .npz archive, expected one array")
    if arr.dtype.kind not in "iuf":
        raise ShapeError(f"{field}: {path} holds dtype {arr.dtype}, expected numbers")
    if arr.size == 0:
        raise ShapeError(f"{field}: {path} holds no numbers (shape {arr.shape})")
    return arr


def cmd_simulators(args) -> int:
    from sbi_engine.simulator import get_simulator, list_simulators

    if args.name:
        sim = get_simulator(args.name)
        print(f"{sim.name}  ({sim.kind}, version {sim.version})")
        if sim.description:
            print(f"  {sim.description}")
        print(f"  observables ({sim.dim_x}): {', '.join(sim.observables)}")
        for title, specs in (("parameters", sim.parameters), ("nuisances", sim.nuisances)):
            if not specs:
                continue
            print(f"  {title} ({len(specs)}):")
            width = max(len(p.name) for p in specs)
            for p in specs:
                extra = f"  nominal {p.nominal:g}" if p.nominal is not None else ""
                unit = f" {p.unit}" if p.unit else ""
                print(f"    {p.name:<{width}}  [{p.low:g}, {p.high:g}]{unit}  {p.scale}{extra}")
        print(f"  prior: {sim.prior.to_dict()['type']}")
        return 0
    names = list_simulators()
    rows = []
    for name in names:
        try:
            sim = get_simulator(name)
            rows.append((name, sim.kind, str(sim.dim_theta), str(sim.dim_nu), str(sim.dim_x),
                         sim.description.split("\n")[0][:60]))
        except SbiEngineError as err:
            rows.append((name, "?", "", "", "", f"(failed to load: {err})"))
    header = ("name", "kind", "θ", "ν", "x", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    print(fmt.format(*header))
    for r in rows:
        print(fmt.format(*r))
    print(f"\n{len(rows)} simulators; `sbi-engine simulators NAME` lists a simulator's parameters.")
    return 0


def _rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def _parse_options(extra: list[str]) -> dict:
    """``--noise-std 0 --features 15`` → ``{"noise_std": 0, "features": 15}`` (JSON values)."""
    options, i = {}, 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ShapeError(f"unexpected argument {flag!r}")
        name, _, value = flag[2:].partition("=")
        if not value:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ShapeError(f"simulator option --{name}: missing a value")
            value = extra[i + 1]
            i += 1
        try:
            options[name.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[name.replace("-", "_")] = value
        i += 1
    return options


def cmd_simulate(args) -> int:
    from sbi_engine.simulate import simulate
    from sbi_engine.simulator import get_simulator

    sim = get_simulator(args.name, **_parse_options(args.extra))
    theta = _load_array(args.theta, "--theta") if args.theta else None
    if theta is None and args.num is None:
        raise ShapeError("--num: required unless --theta gives the parameters")
    result = simulate(sim, args.num, args.seed, out=args.out, chunk_size=args.chunk_size,
                      theta=theta, workers=args.workers, timeout=args.timeout,
                      progress=not args.quiet, scheduler=args.scheduler)
    rep = result.report
    if result.simulated:
        print(f"{args.out}: {rep.summary()}; simulated {result.simulated} now in "
              f"{result.seconds:.1f} s, {_rate(result.rate)} sims/s")
    else:
        print(f"{args.out}: {rep.summary()}; already complete, nothing to simulate")
    return 0


def cmd_info(args) -> int:
    from sbi_engine.store import load_dataset

    ds = load_dataset(args.path, lazy=not args.verify, allow_incomplete=True)
    m = ds.manifest
    if args.json:
        print(json.dumps(m, indent=1, sort_keys=True))
        return 0
    spec = m["simulator_spec"]  # the manifest's types are checked when it opens

    def count(field):  # a spec list's length, '?' where the file says something else
        return len(spec[field]) if isinstance(spec.get(field), list) else "?"

    print(f"dataset       {ds.path}")
    print(f"simulator     {m['simulator']} (version {m['simulator_version']}, "
          f"{spec.get('kind', '?')})")
    print(f"rows          {m['num']} in {m['num_chunks']} chunks of {m['chunk_size']}")
    print(f"seed          {m['seed']}")
    print(f"theta         {m['theta_source'].get('type', '?')}, "
          f"{count('parameters')} parameters")
    print(f"prior         {m['prior'].get('type', '?')}")
    if spec.get("nuisances"):
        print(f"nu            {m['nu_source'].get('type', '?')}, {count('nuisances')} "
              "nuisances")
    print(f"observables   {count('observables')}")
    print(f"engine        {m.get('engine_version', '?')} (format {m['format_version']})")
    if m.get("complete"):
        c = m["counts"]
        frac = c["invalid"] / max(c["total"], 1)
        print(f"status        complete; valid {c['valid']}, invalid {c['invalid']} "
              f"({100 * frac:.2f}%)")
        errors = m.get("errors")
        for reason, count in (errors.items() if isinstance(errors, dict) else ()):
            print(f"              {count} × {reason}")
        if args.verify:
            print("checksums     all chunks verified")
    else:
        done = ds._store.count_records()
        print(f"status        INCOMPLETE: {done} of {m['num_chunks']} chunks; rerun the "
              "simulate command to finish")
    return 0


def cmd_train(args) -> int:
    import jax

    from sbi_engine.npe import NPEConfig, remove_checkpoint, train_npe_from_dataset
    from sbi_engine.priors import prior_from_dict
    from sbi_engine.store import check_replaceable, load_dataset

    check_replaceable(args.out)  # before training: --out must not be a dataset or a folder
    ds = load_dataset(args.dataset, lazy=True)
    prior = prior_from_dict(ds.manifest["prior"])
    overrides = {k: v for k, v in (("max_epochs", args.max_epochs),
                                   ("batch_size", args.batch_size),
                                   ("learning_rate", args.learning_rate)) if v is not None}
    config = NPEConfig.for_estimator(args.estimator, **overrides)
    counts = ds.manifest.get("counts", {})
    valid = f" ({counts['valid']:,} valid)" if "valid" in counts else ""
    print(f"training {args.estimator} ({args.backend}) on {len(ds):,} simulations of "
          f"{ds.manifest['simulator']!r}{valid}")
    checkpoint = None
    if args.backend == "jax" and not args.no_checkpoint:
        checkpoint = Path(args.checkpoint or f"{Path(args.out)}.checkpoint")
        if checkpoint.exists():
            print(f"resuming from the checkpoint {checkpoint}")
    if args.backend == "sbi":
        from sbi_engine.interop.sbi import torch_device_like_jax, train_sbi

        device, note = torch_device_like_jax()  # a GPU when JAX has one and torch sees it
        if note:
            print(note)
        result = train_sbi(ds.theta, ds.x, prior=prior, config=config, seed=args.seed,
                           progress=not args.quiet, device=device)
    else:
        # Streams the dataset from disk when it is larger than memory allows.
        result = train_npe_from_dataset(jax.random.PRNGKey(args.seed), ds, config=config,
                                        prior=prior, progress=not args.quiet,
                                        checkpoint=checkpoint)
    result.posterior.metadata.update(simulator=ds.manifest["simulator"],
                                     dataset=str(ds.path), seed=args.seed)
    result.posterior.save(args.out)
    if checkpoint is not None:
        remove_checkpoint(checkpoint)  # its work is in the model now
    s = result.summary()
    print(f"{args.out}: {s['epochs']} epochs in {s['seconds']:.1f} s "
          f"({s['seconds_per_epoch']:.3f} s/epoch), best validation loss "
          f"{s['best_val_loss']:.4f} at epoch {s['best_epoch']}, "
          f"{s['excluded_rows']} invalid rows excluded")
    return 0


def cmd_sample(args) -> int:
    import jax

    from sbi_engine.posterior import load_posterior
    from sbi_engine.store import atomic_write_bytes

    posterior = load_posterior(args.model)
    x_o = _load_array(args.observation, "--observation")
    x_o, _ = posterior.check_x(x_o, field="--observation")
    samples = posterior.sample(jax.random.PRNGKey(args.seed), args.num, x_o,
                               field="--observation")
    buf = io.BytesIO()
    np.save(buf, samples, allow_pickle=False)
    atomic_write_bytes(args.out, buf.getvalue())
    rate = posterior.acceptance_rate
    acc = f", acceptance {rate:.3f}" if rate is not None else ""
    print(f"{args.out}: samples of shape {samples.shape}{acc}")
    return 0


def cmd_diagnose(args) -> int:
    import jax

    from sbi_engine import diagnostics, plotting
    from sbi_engine.posterior import load_posterior
    from sbi_engine.store import atomic_write_bytes, load_dataset

    posterior = load_posterior(args.model)
    ds = load_dataset(args.dataset)
    data = ds.arrays(valid_only=True)
    n = min(args.sbc, data["theta"].shape[0])
    if n < 10:
        raise ShapeError(f"--sbc: need at least 10 valid held-out simulations, got {n}")
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(data["theta"].shape[0], n, replace=False))
    theta, x = data["theta"][idx], data["x"][idx]
    if x.shape[1:] != posterior.x_shape:
        raise ShapeError(f"dataset x has shape {x.shape[1:]}, the model expects "
                         f"{posterior.x_shape}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.PRNGKey(args.seed)
    k_sbc, k_cov, k_tarp, k_pair = jax.random.split(key, 4)
    L = args.num_posterior_samples

    def sample_fn(k, x_i, m):
        return posterior.sample(k, m, x_i)

    def log_prob_fn(t, x_i):
        return posterior.log_prob(t, x_i)

    print(f"diagnosing on {n} held-out simulations, {L} posterior samples each")
    ranks = diagnostics.sbc_ranks(k_sbc, sample_fn, theta, x, L)
    sbc = diagnostics.sbc_uniformity(ranks, L)
    cov = diagnostics.expected_coverage(k_cov, sample_fn, theta, x, L, method="hpd",
                                        log_prob_fn=log_prob_fn)
    tarp = diagnostics.expected_coverage(k_tarp, sample_fn, theta, x, L, method="tarp")
    names = ds.manifest.get("simulator_spec", {}).get("parameters", [])
    labels = [p["name"] for p in names] or None
    plotting.plot_sbc_ranks(ranks, L, labels=labels, path=out / "sbc_ranks.png")
    plotting.plot_coverage({"HPD": cov, "TARP": tarp}, path=out / "coverage.png")
    s0 = posterior.sample(k_pair, 2000, x[0])
    plotting.pairplot(s0, truth=theta[0], labels=labels, title="held-out simulation 0",
                      path=out / "pairplot.png")
    metrics = {
        "num_simulations": int(n),
        "num_posterior_samples": int(L),
        "sbc": {k: np.asarray(v).tolist() for k, v in sbc._asdict().items()},
        "coverage_hpd": {k: np.asarray(v).tolist() for k, v in cov._asdict().items()},
        "coverage_tarp": {k: np.asarray(v).tolist() for k, v in tarp._asdict().items()},
    }
    atomic_write_bytes(out / "diagnostics.json", json.dumps(metrics, indent=1).encode())
    print(f"SBC chi-square p-values per parameter: "
          f"{np.round(np.asarray(sbc.chi2_pvalue), 3).tolist()}")
    print(f"expected coverage max |error|: HPD {cov.max_abs_error:.3f}, "
          f"TARP {tarp.max_abs_error:.3f}")
    print(f"wrote {out}/diagnostics.json, sbc_ranks.png, coverage.png, pairplot.png")
    return 0


def cmd_demo(args) -> int:
    """Posterior estimation on a benchmark task and a systematics study, then a report.

    Both are ordinary experiment runs (:mod:`sbi_engine.experiment`) into ``OUT/npe`` and
    ``OUT/systematics``; ``OUT/report.md`` collects them. Rerunning resumes or reuses them.
    """
    from sbi_engine.experiment import ExperimentConfig, demo_specs, run_point, write_index_report

    _pin_cpu(args.device)
    t0 = time.perf_counter()
    out = Path(args.out)
    specs = demo_specs(simulator=args.simulator, num=args.num, estimator=args.estimator,
                       max_epochs=args.max_epochs, c2st_samples=args.c2st_samples,
                       seed=args.seed, tiny=args.tiny)
    npe = ExperimentConfig.from_dict(specs["npe"])
    sysm = ExperimentConfig.from_dict(specs["systematics"])
    print(f"sbi-engine demo: posterior estimation on {args.simulator} and a systematics study "
          f"on the INFERNO toy; writing to {out}/")
    print(f"\n=== [1/2] NPE ({args.estimator}) on {args.simulator}: {args.num:,} simulations, "
          f"C2ST against the sbibm reference posterior ===")
    r_npe = run_point(npe, out / "npe", device=args.device, overwrite=True)
    c2st = r_npe.metrics["summary"].get("c2st")
    if c2st is not None:
        print(f"C2ST vs the sbibm reference posterior: {c2st['mean']:.3f} "
              "(0.5 = indistinguishable; sbibm's published NPE at 10k for two_moons: 0.606)")
    print("\n=== [2/2] systematics study on the INFERNO toy: train at each nuisance setting, "
          "test at every other ===")
    r_sys = run_point(sysm, out / "systematics", device=args.device, overwrite=True)
    z = r_sys.metrics["summary"].get("best/z_worst")
    if z is not None:
        print(f"best worst-case Asimov Z over the test settings: {z['mean']:.3f}")
    report = write_index_report(
        out, "sbi-engine demo",
        [(f"Posterior estimation: NPE on {args.simulator}", r_npe),
         ("Systematics: the INFERNO toy", r_sys)],
        intro="Two experiment runs; each directory holds its resolved `config.toml` "
              "(rerun with `sbi-engine run DIR/config.toml --out DIR`), manifest, metrics, "
              "models, plots and full report.")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s.")
    print(f"report: {report}  (pair plot: {out}/npe/plots/, heatmap: "
          f"{out}/systematics/plots/heatmap.png)")
    return 0


def _pin_cpu(device: str | None) -> None:
    """``--device cpu``: keep JAX off any GPU (its backends start on first use, after this)."""
    if device == "cpu":
        import jax

        jax.config.update("jax_platforms", "cpu")


def cmd_run(args) -> int:
    """Run an experiment file: one run directory, or a sweep of them."""
    from sbi_engine.experiment import format_leaderboard, leaderboard, run

    _pin_cpu(args.device)
    if args.dry_run:
        from sbi_engine.experiment import load_spec, resolve

        points = resolve(load_spec(args.experiment), overrides=args.set or (),
                         preset=args.preset)
        for p in points:
            if p.label:
                print(f"# sweep point {p.dirname}")
            print(p.config.to_toml())
        print(f"# {len(points)} point(s); configuration valid")
        return 0
    if args.scheduler is not None:
        from sbi_engine.distributed import map_points
        from sbi_engine.experiment import load_spec, resolve

        points = resolve(load_spec(args.experiment), overrides=args.set or (),
                         preset=args.preset)
        if len(points) == 1 and not points[0].label:
            raise ConfigError("--scheduler: the experiment has a single point; a scheduler "
                              "runs the points of a sweep (give a list value to sweep)")
        name = points[0].config.name
        out = args.out or str(Path("runs") / (f"{name}-{args.preset}" if args.preset else name))
        results = map_points(points, out, args.scheduler, workers=args.workers,
                             device=args.device, overwrite=args.overwrite)
    else:
        results = run(args.experiment, args.out, overrides=args.set or (), preset=args.preset,
                      device=args.device, progress=not args.quiet, overwrite=args.overwrite)
    if len(results) > 1:
        root = results[0].out.parent
        print(f"\nsweep of {len(results)} points in {root}/ (summary.md, report.md)")
        metric, order, rows = leaderboard(root)
        print(format_leaderboard(metric, order, rows))
    else:
        r = results[0]
        summ = r.metrics.get("summary", {})
        for h in r.metrics.get("headline", []):
            e = summ[h]
            pm = f" ± {e['std']:.4g}" if e["n"] > 1 else ""
            print(f"{h}: {e['mean']:.4g}{pm} (over {e['n']} seed{'s' if e['n'] > 1 else ''})")
        print(f"run directory {r.out}/ (report.md, metrics.json, manifest.json)")
    return 0


def cmd_leaderboard(args) -> int:
    """Rank the runs under a directory by one metric."""
    from sbi_engine.experiment import format_leaderboard, leaderboard

    metric, order, rows = leaderboard(args.dir, args.metric, order=args.order)
    if args.top:
        rows = rows[: args.top]
    print(format_leaderboard(metric, order, rows))
    return 0


def cmd_systematics(args) -> int:
    """Run a systematics study from a TOML config; write matrix.json and heatmap.png."""
    import dataclasses

    from sbi_engine.systematics import SystematicsConfig, run_study

    config = SystematicsConfig.from_toml(args.config)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    if args.no_profile:
        config = dataclasses.replace(config, profile=False)
    out = Path(args.out)
    result = run_study(config, progress=not args.quiet, checkpoint=out / "checkpoints")
    result.to_json(out / "matrix.json")
    result.plot(out / "heatmap.png")
    print(f"systematics study: {config.generator}, {len(result.rows)} models x "
          f"{len(result.cols)} test settings, {result.seconds:.1f} s; Asimov Z:")
    print(result.table())
    print(f"wrote {out}/matrix.json, {out}/heatmap.png")
    return 0


_BENCHMARKS = ("two_moons", "gaussian_linear", "gaussian_linear_uniform", "gaussian_mixture",
               "slcp", "bernoulli_glm")


def build_parser() -> argparse.ArgumentParser:
    from sbi_engine import __version__

    parser = argparse.ArgumentParser(
        prog="sbi-engine",
        description="Simulation-based inference and systematics-robust training on JAX.")
    parser.add_argument("--version", action="version", version=f"sbi-engine {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--cpu-threads", type=int, metavar="N",
                        help="threads XLA's CPU runtime runs a program on (default: one per "
                             "core); 1 makes small flow trainings faster on the CPU")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR",
                       help="keep compiled programs in DIR and reuse them in later runs "
                            "(default: $SBI_ENGINE_COMPILE_CACHE, else "
                            "~/.cache/sbi-engine/xla; 'off' in the variable turns it off)")
    cache.add_argument("--no-compile-cache", action="store_true",
                       help="compile every program afresh, keep nothing on disk")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("simulators", help="list registered simulators")
    p.add_argument("name", nargs="?", help="show this simulator's parameters")
    p.set_defaults(func=cmd_simulators, compiles=False)

    p = sub.add_parser(
        "simulate", help="simulate a dataset into a resumable zarr store",
        epilog="Further --key value options go to the simulator's factory, e.g. "
               "`sbi-engine simulate pyloric --noise-std 0 ...`; they are recorded in the "
               "dataset manifest.")
    p.add_argument("name", help="simulator name (see `sbi-engine simulators`)")
    p.add_argument("--num", type=int, help="number of simulations (from the prior)")
    p.add_argument("--seed", type=_seed, default=0, help="integer seed (default 0)")
    p.add_argument("--out", required=True, help="dataset directory (zarr)")
    p.add_argument("--chunk-size", type=int, help="rows per chunk")
    p.add_argument("--workers", type=int,
                   help="processes for black-box simulators (default 1), or the number of "
                        "LocalCluster workers with --scheduler local (default: one per core)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="black-box simulators: seconds allowed per simulation; rows run in "
                        "supervised worker processes, a hung simulation is killed and a "
                        "crashed worker replaced, and their rows are counted invalid")
    p.add_argument("--scheduler",
                   help="run chunks as Dask tasks: 'local' (an embedded LocalCluster) or "
                        "an existing scheduler's address, tcp://host:port; the dataset "
                        "directory must be shared with the workers")
    p.add_argument("--theta", help="explicit parameters, (n, D) .npy or .csv, instead of the prior")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("info", help="print a dataset's manifest and counts")
    p.add_argument("path")
    p.add_argument("--verify", action="store_true", help="read every chunk and check checksums")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.set_defaults(func=cmd_info, compiles=False)

    p = sub.add_parser("train", help="train a neural posterior estimator on a dataset")
    p.add_argument("dataset")
    p.add_argument("--estimator", choices=["nsf", "maf", "nsf_ar"], default="nsf")
    p.add_argument("--backend", choices=["jax", "sbi"], default="jax")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", required=True, help="model directory")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--checkpoint", metavar="PATH",
                   help="training state file, written every epoch; after an interruption, "
                        "rerun the same command to resume from it (same result as an "
                        "uninterrupted run); removed once the model is saved (default: "
                        "OUT.checkpoint; jax backend only)")
    p.add_argument("--no-checkpoint", action="store_true", help="do not write a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw posterior samples for an observation")
    p.add_argument("model")
    p.add_argument("--observation", required=True, help=".npy or .csv, shape (X,) or (m, X)")
    p.add_argument("--num", type=int, default=10_000)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", required=True, help="samples .npy")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("diagnose", help="SBC, expected coverage and plots on held-out data")
    p.add_argument("model")
    p.add_argument("dataset", help="held-out simulations (not the training set)")
    p.add_argument("--sbc", type=int, default=200, help="held-out simulations to use")
    p.add_argument("--num-posterior-samples", type=int, default=100)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("demo", help="the quick-start job: NPE and a systematics study, a report")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--simulator", default="two_moons", choices=_BENCHMARKS)
    p.add_argument("--num", type=int, default=10_000, help="training simulations")
    p.add_argument("--estimator", choices=["nsf", "maf", "nsf_ar"], default="nsf")
    p.add_argument("--max-epochs", type=int, help="cap on training epochs")
    p.add_argument("--c2st-samples", type=int, default=10_000,
                   help="posterior and reference samples compared by C2ST")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default=None,
                   help="where JAX runs (default: its default device)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny networks and budgets: checks the pipeline in seconds")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "run", help="run an experiment file (TOML) into a run directory, or a sweep",
        epilog="Example: sbi-engine run experiments/sbibm_npe.toml --preset tiny "
               "--set npe.estimator=nsf --set seeds=[0,1,2]. A list value sweeps; an "
               "interrupted run resumes from its completed stages when rerun.")
    p.add_argument("experiment", help="experiment file, e.g. experiments/sbibm_npe.toml")
    p.add_argument("--out", help="run directory (default runs/NAME[-PRESET])")
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default=None,
                   help="where JAX runs (default: its default device)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key, e.g. npe.max_epochs=50 or seeds=[0,1,2] (repeatable)")
    p.add_argument("--preset", help="apply the file's [presets.NAME] overrides first")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run directory that holds a different config")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the resolved config(s); run nothing")
    p.add_argument("--scheduler",
                   help="run the points of a sweep as Dask tasks: 'local' (a LocalCluster) "
                        "or an existing scheduler's address, tcp://host:port (the run "
                        "directory must be on a filesystem the workers share)")
    p.add_argument("--workers", type=int,
                   help="LocalCluster workers with --scheduler local (default: one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("leaderboard", help="rank the runs under a directory by a metric")
    p.add_argument("dir", help="a sweep or any folder of run directories")
    p.add_argument("--metric", help="metric name in metrics.json (default: the primary one)")
    p.add_argument("--order", choices=["min", "max"], help="which is better (default: by "
                   "metric: max for Z and AUC, min for losses and C2ST)")
    p.add_argument("--top", type=_positive_int, help="show only the best N")
    p.set_defaults(func=cmd_leaderboard, compiles=False)

    p = sub.add_parser("systematics",
                       help="train x test matrix of significance over nuisance settings")
    p.add_argument("config", help="study config (TOML), e.g. experiments/systematics_inferno.toml")
    p.add_argument("--out", required=True,
                   help="output directory: matrix.json, heatmap.png and checkpoints/ (the "
                        "models of each finished training step; rerunning the same command "
                        "resumes an interrupted study from them)")
    p.add_argument("--seed", type=_seed, help="override the config's seed")
    p.add_argument("--no-profile", action="store_true", help="skip the pyhf profiled column")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_systematics)
    return parser


def _int_arg(low: int, high: int | None, what: str):
    """An argparse type: an integer in ``[low, high)`` (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_arg(1, None, "an integer >= 1")  # options that count something
# a JAX key holds 32 bits: seed 2**32 would repeat seed 0
_seed = _int_arg(0, SEED_LIMIT, "an integer in 0..2**32-1")


_CACHE_OFF = ("off", "0", "false", "no", "none", "")


def _compile_cache(args) -> Path | None:
    """Turn on the persistent compile cache the options and environment ask for.

    ``--no-compile-cache`` > ``--compile-cache DIR`` > ``$SBI_ENGINE_COMPILE_CACHE`` (a
    directory or ``off``) > a ``JAX_COMPILATION_CACHE_DIR`` the user set for JAX (left to
    JAX) > the default directory. A directory the user named must work (an error
    otherwise); when the default one cannot be written, a note says so and the command
    runs without the cache.
    """
    from sbi_engine.runtime import (
        COMPILE_CACHE_ENV,
        default_compile_cache_dir,
        enable_compile_cache,
    )

    if args.no_compile_cache:
        return None
    named = args.compile_cache
    if named is None and COMPILE_CACHE_ENV in os.environ:
        named = os.environ[COMPILE_CACHE_ENV]
        if named.strip().lower() in _CACHE_OFF:
            return None
    if named is not None:
        return enable_compile_cache(named)
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None  # the user's own JAX setting
    try:
        return enable_compile_cache(default_compile_cache_dir())
    except SbiEngineError as err:
        print(f"note: running without the compile cache: {err} (set {COMPILE_CACHE_ENV}"
              "=DIR to put it elsewhere, or =off)", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sbi-engine`` console script. Returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) != "simulate":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if getattr(args, "compiles", True):  # listing and reading commands: no cache dir
            _compile_cache(args)
        if args.cpu_threads is not None:
            from sbi_engine.runtime import limit_cpu_threads

            _pin_cpu(getattr(args, "device", None))  # before the backends start
            limit_cpu_threads(args.cpu_threads)
        with ctrl_c_latch():  # a Ctrl-C swallowed deep down still stops at a safe point
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\ninterrupted: completed chunks and stages are kept; rerun the same command to "
              "resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SbiEngineError, OSError) as err:
        if args.debug:
            raise
        if isinstance(err, OSError) and err.filename and err.strerror:
            print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        else:
            print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
