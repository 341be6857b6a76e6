"""Write the packaged ``<task>.json`` files from the sbibm CSV files.

Source: the sbibm repository (sbi-benchmark/sbibm at commit f0bc440, MIT licence),
``sbibm/tasks/<task>/files/``, mirrored at ``$SBI_ENGINE_SBIBM_DATA`` (by default
``../shared/data/sbibm`` next to the repository). Per observation ``k = 1..10`` it
reads ``num_observation_<k>/{observation,true_parameters,observation_seed}.csv``
(a header row and one data row each) and, for bernoulli_glm, ``design_matrix.csv``
(100 x 10, no header). Numbers are copied as written in the CSV files. The large
``reference_posterior_samples.csv.bz2`` files are not copied; they are read at run
time by :mod:`simulators.benchmarks.reference`.

Usage::

    python simulators/benchmarks/data/make_data.py [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

TASKS = ("two_moons", "gaussian_linear", "gaussian_linear_uniform", "gaussian_mixture",
         "slcp", "bernoulli_glm")
SOURCE = "sbi-benchmark/sbibm@f0bc440 sbibm/tasks/{task}/files (MIT licence)"


def _read_csv(path: Path, *, header: bool = True) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row]
    return rows[1:] if header else rows


def _row(path: Path) -> list[float]:
    rows = _read_csv(path)
    if len(rows) != 1:
        raise ValueError(f"{path}: expected one data row, got {len(rows)}")
    return [float(v) for v in rows[0]]


def task_data(source: Path, task: str) -> dict[str, Any]:
    """The JSON document for ``task`` read from the sbibm data directory ``source``."""
    files = source / task / "files"
    observations = {}
    for num in range(1, 11):
        folder = files / f"num_observation_{num}"
        seed, num_read = _row(folder / "observation_seed.csv")
        if int(num_read) != num:
            raise ValueError(f"{folder}: observation_seed.csv names observation {num_read}")
        observations[str(num)] = {
            "seed": int(seed),
            "observation": _row(folder / "observation.csv"),
            "true_parameters": _row(folder / "true_parameters.csv"),
        }
    doc: dict[str, Any] = {"task": task, "source": SOURCE.format(task=task),
                           "observations": observations}
    if task == "bernoulli_glm":
        doc["design_matrix"] = [[float(v) for v in row]
                                for row in _read_csv(files / "design_matrix.csv", header=False)]
    return doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="sbibm data directory (default: $SBI_ENGINE_SBIBM_DATA or "
                             "../shared/data/sbibm)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="where to write <task>.json (default: next to this script)")
    args = parser.parse_args(argv)
    source = args.source
    if source is None:
        from simulators.benchmarks.reference import data_dir

        source = data_dir()
    for task in TASKS:
        path = args.out / f"{task}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(task_data(source, task), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
