import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compile cache stays off in tests (in-process `main` calls and the
# subprocesses they start): no writes to ~/.cache, every test compiles what it runs.
# tests/test_runtime.py turns it on explicitly, in subprocesses.
os.environ["SBI_ENGINE_COMPILE_CACHE"] = "off"

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def sbibm_missing() -> str:
    """Why the sbibm reference data (``../shared/data/sbibm``) cannot be found; ``""`` when
    it can. Tests of C2ST against reference samples skip, or check the fallback, without it."""
    from sbi_engine.errors import DatasetError
    from simulators.benchmarks import reference

    try:
        reference.data_dir()
    except DatasetError as err:
        return str(err)
    return ""
