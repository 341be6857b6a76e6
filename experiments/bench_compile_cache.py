"""What the ``sbi-engine`` command's compile cache saves: wall time of CLI commands in
fresh processes, without the cache and with a warm one, alternating.

Each round runs every command twice, once with ``--no-compile-cache`` and once with
``--compile-cache DIR`` (filled by one run of each command before the rounds), and
prints the times and their ratio. The commands: ``train`` (two_moons, 10,000
simulations, NSF, ``--epochs`` epochs), ``sample`` (1,000 samples from that model) and
``simulate pyloric --num 20``. Everything is written under ``--work`` (a temporary
directory by default) and removed afterwards.

Usage::

    python experiments/bench_compile_cache.py                 # 2 rounds
    python experiments/bench_compile_cache.py --rounds 3 --epochs 10

The machine may be shared: compare numbers from one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of `train`")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-compile-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("SBI_ENGINE_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    cli = [sys.executable, "-m", "sbi_engine.cli"]

    def run(options: list[str], *command: str) -> float:
        start = time.perf_counter()
        done = subprocess.run([*cli, *options, *command], cwd=work, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"failed: sbi-engine {' '.join(command)}\n{done.stderr}")
        return time.perf_counter() - start

    try:
        run(["--no-compile-cache"], "simulate", "two_moons", "--num", "10000", "--seed",
            "0", "--out", "data")
        np.save(work / "xo.npy", np.zeros(2, np.float32))
        commands = {  # each writes to `out`, removed after it
            f"train (two_moons 10k, nsf, {args.epochs} epochs)": (
                "train", "data", "--max-epochs", str(args.epochs), "--out", "out",
                "--quiet", "--no-checkpoint"),
            "sample (1,000)": ("sample", "model", "--observation", "xo.npy", "--num",
                               "1000", "--seed", "0", "--out", "out.npy"),
            "simulate pyloric --num 20": ("simulate", "pyloric", "--num", "20", "--seed",
                                          "0", "--out", "out"),
        }

        def timed(options: list[str], command: tuple[str, ...]) -> float:
            seconds = run(options, *command)
            shutil.rmtree(work / "out", ignore_errors=True)
            return seconds

        cold, warm = ["--no-compile-cache"], ["--compile-cache", str(cache)]
        run(cold, "train", "data", "--max-epochs", "1", "--out", "model", "--quiet",
            "--no-checkpoint")
        for command in commands.values():  # fill the cache
            timed(warm, command)
        times: dict[str, dict[str, list[float]]] = {n: {"cold": [], "warm": []}
                                                    for n in commands}
        for r in range(args.rounds):
            for mode, options in (("cold", cold), ("warm", warm)):
                for name, command in commands.items():
                    times[name][mode].append(timed(options, command))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        size = sum(p.stat().st_size for p in cache.iterdir()) / 2**20
        print(f"\n{'command':42s} {'no cache s':>18s} {'warm cache s':>18s} {'ratio':>7s}")
        for name, t in times.items():
            without = ", ".join(f"{v:.1f}" for v in t["cold"])
            with_ = ", ".join(f"{v:.1f}" for v in t["warm"])
            ratio = statistics.median(t["cold"]) / statistics.median(t["warm"])
            print(f"{name:42s} {without:>18s} {with_:>18s} {ratio:6.2f}x")
        print(f"cache: {size:.1f} MiB in {len(list(cache.glob('*-cache')))} entries")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
