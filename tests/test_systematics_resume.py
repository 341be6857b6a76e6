"""A systematics study checkpointed per training step: interrupted (an exception, deleted
steps, ``kill -9``) and rerun, it ends with exactly the numbers of an uninterrupted run;
another config's or a corrupted checkpoint is an error naming the file."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sbi_engine import systematics
from sbi_engine.classify import ClassifierConfig, ClassifierFileError
from sbi_engine.cli import main
from sbi_engine.errors import ConfigError
from sbi_engine.systematics import SystematicsConfig, run_study

REPO = Path(__file__).resolve().parents[1]

#: three training steps: the BCE batch (2 settings), augmented, asimov
TINY = SystematicsConfig(
    generator="pivot", train_design="extremes", test_design="one_at_a_time",
    methods=("bce", "augmented", "asimov"), n_train=300, n_test=500, n_prior=2, seed=3,
    classifier=ClassifierConfig(hidden=(8,), steps=40, batch_size=128, learning_rate=5e-3))

_TOML = """
generator = "pivot"
train_design = "extremes"
test_design = "one_at_a_time"
methods = ["bce", "augmented", "asimov"]
n_train = 300
n_test = 500
n_prior = 2
seed = 3
[classifier]
hidden = [8]
steps = 40
batch_size = 128
learning_rate = 0.005
"""


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted study, no checkpoint."""
    return run_study(TINY, progress=False)


def assert_same(result, ref):
    assert result.rows == ref.rows and result.cols == ref.cols
    assert np.array_equal(result.z, ref.z, equal_nan=True)
    assert np.array_equal(result.auc, ref.auc, equal_nan=True)
    for k, v in ref.summary.items():
        assert np.array_equal(result.summary[k], v, equal_nan=True), k


class Interrupted(Exception):
    pass


def counting_train_many(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Count train_many calls (one per training step); raise at call ``fail_at``."""
    calls: list[int] = []
    real = systematics.train_many

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(systematics, "train_many", wrapped)
    return calls


def test_reference_is_deterministic(reference):
    """Evaluation is a function of the models and keys: a second run is bitwise equal."""
    assert_same(run_study(TINY, progress=False), reference)
    assert reference.z.shape == (4, 3) and np.all(np.isfinite(reference.z))


def test_interrupted_then_resumed(reference, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    calls = counting_train_many(monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        run_study(TINY, progress=False, checkpoint=ckpt)
    assert (ckpt / "bce" / "step.json").is_file() and not (ckpt / "augmented").exists()
    lines: list[str] = []
    resumed = run_study(TINY, progress=False, checkpoint=ckpt, log=lines.append)
    assert len(calls) == 2 + 2  # augmented and asimov; the BCE batch was loaded
    assert lines == [f"systematics: bce: loaded from checkpoint {ckpt / 'bce'}"]
    assert_same(resumed, reference)
    for got, want in zip(resumed.params, reference.params):  # the models themselves
        assert all(np.array_equal(a, b) for a, b in zip(
            systematics.jax.tree.leaves(got), systematics.jax.tree.leaves(want)))

    # delete one step: only it is retrained
    for p in (ckpt / "augmented").iterdir():
        p.unlink()
    (ckpt / "augmented").rmdir()
    assert_same(run_study(TINY, progress=False, checkpoint=ckpt), reference)
    assert len(calls) == 4 + 1
    assert_same(run_study(TINY, progress=False, checkpoint=ckpt), reference)
    assert len(calls) == 5  # everything loaded


def test_other_config_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = dataclasses.replace(TINY, methods=("asimov",), n_prior=0)
    run_study(cfg, progress=False, checkpoint=ckpt)
    other = dataclasses.replace(cfg, seed=4)
    with pytest.raises(ConfigError, match=rf"checkpoint {ckpt}: holds a study with another "
                                          r"config \(differs in: seed\)"):
        run_study(other, progress=False, checkpoint=ckpt)
    # a step file copied from another study is refused too
    (ckpt / "study.json").unlink()
    with pytest.raises(ConfigError, match=r"step\.json: written for another study"):
        run_study(other, progress=False, checkpoint=ckpt)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        run_study(cfg, progress=False, checkpoint=tmp_path / "file")


@pytest.mark.parametrize("damage, match", [
    ("truncate", r"params\.msgpack: does not match the checksum"),
    ("header", r"step\.json: unreadable"),
    ("missing", r"params\.msgpack: unreadable"),
])
def test_corrupted_step_is_named(tmp_path, damage, match):
    ckpt = tmp_path / "ckpt"
    cfg = dataclasses.replace(TINY, methods=("asimov",), n_prior=0)
    run_study(cfg, progress=False, checkpoint=ckpt)
    params, header = ckpt / "asimov" / "params.msgpack", ckpt / "asimov" / "step.json"
    if damage == "truncate":
        params.write_bytes(params.read_bytes()[:-7])
    elif damage == "header":
        header.write_text("{not json")
    else:
        params.unlink()
    with pytest.raises(ClassifierFileError, match=match) as err:
        run_study(cfg, progress=False, checkpoint=ckpt)
    assert str(ckpt / "asimov") in str(err.value)
    assert header.exists()  # nothing deleted


def test_cli_out_has_checkpoints(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text(_TOML.replace('"bce", "augmented", "asimov"', '"asimov"'))
    out = tmp_path / "o"
    assert main(["systematics", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert (out / "checkpoints" / "asimov" / "step.json").is_file()
    first = json.loads((out / "matrix.json").read_text())
    assert main(["systematics", str(cfg), "--out", str(out)]) == 0  # resumes: all loaded
    assert "asimov: loaded from checkpoint" in capsys.readouterr().out
    again = json.loads((out / "matrix.json").read_text())
    assert again["z"] == first["z"] and again["summary"] == first["summary"]
    assert main(["systematics", str(cfg), "--out", str(out), "--seed", "9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds a study with another config (differs in: seed)" in err


# the child sleeps in its second training step, so the parent kills it in there
_CHILD = textwrap.dedent("""
    import sys, time
    from sbi_engine import systematics
    from sbi_engine.cli import main

    real, calls = systematics.train_many, []

    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(600)
        return real(*args, **kwargs)

    systematics.train_many = slow
    sys.exit(main(["systematics", sys.argv[1], "--out", sys.argv[2], "--quiet"]))
""")


def test_kill_9_then_resume(reference, tmp_path):
    """SIGKILL after the first step is on disk; the rerun (same command) loads it and
    ends with the numbers of the uninterrupted run."""
    cfg, out = tmp_path / "s.toml", tmp_path / "o"
    cfg.write_text(_TOML)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(cfg), str(out)], env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / "checkpoints" / "bce" / "step.json"
    deadline = time.monotonic() + 240
    try:
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() else \
            "no checkpoint in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "matrix.json").exists() and not (out / "checkpoints" / "augmented").exists()

    assert main(["systematics", str(cfg), "--out", str(out), "--quiet"]) == 0
    got = json.loads((out / "matrix.json").read_text())
    want = reference.to_dict()
    assert got["z"] == want["z"] and got["auc"] == want["auc"]
    assert got["summary"] == want["summary"]


def test_experiment_run_resumes_inside_the_study(reference, tmp_path, monkeypatch):
    """A run interrupted in its study stage keeps the finished steps in
    ``checkpoints/study/seed<s>/``; the rerun loads them and ends with the numbers of the
    uninterrupted study."""
    from sbi_engine.experiment import ExperimentConfig, run_point

    sec = {k: v for k, v in TINY.to_dict().items() if k != "seed"}
    config = ExperimentConfig.from_dict({"name": "resume", "type": "systematics",
                                         "seeds": [TINY.seed], "systematics": sec})
    out = tmp_path / "run"
    calls = counting_train_many(monkeypatch, fail_at=3)
    with pytest.raises(Interrupted):
        run_point(config, out, progress=False, echo=False)
    ckpt = out / "checkpoints" / "study" / f"seed{TINY.seed}"
    assert sorted(p.name for p in ckpt.iterdir()) == ["augmented", "bce", "study.json"]
    run_point(config, out, progress=False, echo=False)
    assert len(calls) == 3 + 1  # only asimov trained again
    log = (out / "run.log").read_text()
    assert f"systematics: augmented: loaded from checkpoint {ckpt / 'augmented'}" in log
    assert not (out / "checkpoints").exists()  # removed once the models are saved
    got = json.loads((out / "results" / f"seed{TINY.seed}.json").read_text())
    want = reference.to_dict()
    assert got["z"] == want["z"] and got["auc"] == want["auc"]
    assert got["summary"] == want["summary"]
