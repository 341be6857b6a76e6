"""Observations, true parameters and reference posteriors of the sbibm tasks.

The simulation-based inference benchmark (sbibm; Lueckmann, Boelts, Greenberg,
Gonçalves & Macke 2021, "Benchmarking Simulation-Based Inference", AISTATS) fixes,
per task, ten observations ``x_o`` generated from known true parameters ``θ*`` and
10,000 reference posterior samples of ``p(θ | x_o)`` for each.

Two sources, by size:

- the *small* files (observations, true parameters, observation seeds and the
  bernoulli_glm design matrix) ship inside the package as
  ``simulators/benchmarks/data/<task>.json``, written once from the sbibm CSV files
  by ``simulators/benchmarks/data/make_data.py``;
- the *large* reference posterior samples are read from an sbibm data directory
  laid out as ``<dir>/<task>/files/num_observation_<k>/reference_posterior_samples.csv.bz2``.
  It is ``$SBI_ENGINE_SBIBM_DATA`` when set, otherwise the first existing of
  ``<repo root>/../shared/data/sbibm`` and ``./shared/data/sbibm``.

Each task module binds a :class:`ReferenceData` and re-exports its methods, e.g.
``simulators.benchmarks.two_moons.observation(1)``.
"""

from __future__ import annotations

import bz2
import functools
import io
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Final, final

import numpy as np

from sbi_engine.errors import ConfigError, DatasetError

__all__ = [
    "DATA_ENV_VAR",
    "NUM_OBSERVATIONS",
    "ReferenceData",
    "check_num_observation",
    "data_dir",
    "load_task_json",
]

DATA_ENV_VAR: Final = "SBI_ENGINE_SBIBM_DATA"
NUM_OBSERVATIONS: Final = 10
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _default_data_dirs() -> tuple[Path, ...]:
    return (_REPO_ROOT.parent / "shared" / "data" / "sbibm",
            Path.cwd() / "shared" / "data" / "sbibm")


def data_dir() -> Path:
    """The sbibm data directory (holding ``<task>/files/num_observation_<k>/``).

    ``$SBI_ENGINE_SBIBM_DATA`` when set (it must then exist), otherwise the first
    existing default location.

    Raises:
        DatasetError: no directory was found; the message names the environment
            variable and every path tried.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path
        raise DatasetError(f"sbibm data directory: ${DATA_ENV_VAR} = {str(path)!r} is not a "
                           "directory; point it at the folder holding <task>/files/")
    tried = _default_data_dirs()
    for path in tried:
        if path.is_dir():
            return path
    raise DatasetError(
        "sbibm data directory not found: set $" + DATA_ENV_VAR + " to the folder holding "
        "<task>/files/num_observation_<k>/; tried " + ", ".join(repr(str(p)) for p in tried))


def check_num_observation(num: Any) -> int:
    """Validate an sbibm observation number. Returns it as ``int`` in ``1..10``.

    Raises:
        ConfigError: ``num`` is not an integer in ``1..10``.
    """
    if isinstance(num, bool) or not isinstance(num, int | np.integer):
        raise ConfigError(f"num_observation: expected an integer in 1..{NUM_OBSERVATIONS}, "
                          f"got {num!r} ({type(num).__name__})")
    if not 1 <= int(num) <= NUM_OBSERVATIONS:
        raise ConfigError(f"num_observation: expected an integer in 1..{NUM_OBSERVATIONS}, "
                          f"got {int(num)}")
    return int(num)


@functools.cache
def load_task_json(task: str) -> dict[str, Any]:
    """The shipped ``data/<task>.json`` (observations, true parameters, seeds, ...).

    The result is cached; treat it as read-only.
    """
    ref = resources.files(__package__).joinpath("data", f"{task}.json")
    try:
        return json.loads(ref.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DatasetError(f"sbibm task {task!r}: packaged data file data/{task}.json is "
                           "missing (regenerate it with data/make_data.py)") from err


@final
class ReferenceData:
    """Reference data of one sbibm task.

    Args:
        task: the sbibm task name, e.g. ``"two_moons"``.
    """

    def __init__(self, task: str):
        self.task = task

    def _entry(self, num: Any) -> dict[str, Any]:
        num = check_num_observation(num)
        return load_task_json(self.task)["observations"][str(num)]

    def observation(self, num: int) -> np.ndarray:
        """The observed data ``x_o`` of observation ``num`` (1..10). Returns ``(X,)`` float32."""
        return np.asarray(self._entry(num)["observation"], dtype=np.float32)

    def true_parameters(self, num: int) -> np.ndarray:
        """The ``θ*`` that generated observation ``num`` (1..10). Returns ``(D,)`` float32."""
        return np.asarray(self._entry(num)["true_parameters"], dtype=np.float32)

    def observation_seed(self, num: int) -> int:
        """The seed sbibm used to generate observation ``num`` (1..10) (provenance only)."""
        return int(self._entry(num)["seed"])

    def reference_posterior_samples(self, num: int) -> np.ndarray:
        """The 10,000 sbibm reference samples of ``p(θ | x_o)`` for observation ``num``.

        Read from the sbibm data directory (see :func:`data_dir`).

        Returns:
            ``(10000, D)`` float32.

        Raises:
            ConfigError: ``num`` is not in 1..10.
            DatasetError: the data directory or the file is missing or malformed.
        """
        num = check_num_observation(num)
        dim = len(load_task_json(self.task)["observations"][str(num)]["true_parameters"])
        path = (data_dir() / self.task / "files" / f"num_observation_{num}"
                / "reference_posterior_samples.csv.bz2")
        if not path.is_file():
            raise DatasetError(f"sbibm task {self.task!r}: reference posterior samples not "
                               f"found at {str(path)!r} (${DATA_ENV_VAR} selects the directory)")
        with bz2.open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
        samples = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, dtype=np.float32,
                             ndmin=2)
        if samples.shape[1] != dim or samples.shape[0] == 0:
            raise DatasetError(f"{str(path)!r}: expected (n, {dim}) samples, "
                               f"got {samples.shape}")
        return samples

    def __repr__(self) -> str:
        return f"ReferenceData({self.task!r})"
