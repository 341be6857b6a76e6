"""Smoke tests of every shipped experiment's tiny preset, a sweep and its leaderboard, and
a run killed with SIGKILL and resumed with identical metrics.

The experiments run in subprocesses with XLA's cheap compile settings (the tiny presets
are compile-bound) and one JAX compilation cache shared by this module's processes.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from sbi_engine.cli import main
from sbi_engine.experiment import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["sbibm_npe", "inferno", "pivot", "higgs_like_systematics", "learning_curve_two_moons"]
SWEEP = ["systematics.methods=[\"bce\"]", "systematics.classifier.learning_rate=[0.01,0.003]"]
LC_Z = {"name": "lc_z", "type": "learning_curve", "seeds": [0, 1],
        "learning_curve": {"method": "systematics", "budgets": [150, 300]},
        "systematics": {"generator": "inferno", "nuisances": ["r"], "methods": ["bce"],
                        "train_design": "extremes", "test_design": "extremes",
                        "n_test": 500, "n_prior": 0,
                        "classifier": {"hidden": [8], "steps": 30, "batch_size": 128}}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return e


def _needs_reference(name: str, sbibm_missing: str) -> None:
    if name == "learning_curve_two_moons" and sbibm_missing:  # its metric is the C2ST
        pytest.skip(f"sbibm reference data not available: {sbibm_missing}")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, env, sbibm_missing):
    """All shipped tiny presets, and a 2-point sweep, run in one subprocess."""
    root = tmp_path_factory.mktemp("runs")
    shipped = [n for n in SHIPPED if not (sbibm_missing and n == "learning_curve_two_moons")]
    script = textwrap.dedent(f"""
        from sbi_engine.experiment import resolve, run, run_point
        for name in {shipped!r}:
            run("{REPO}/experiments/" + name + ".toml", "{root}/" + name, preset="tiny",
                progress=False, echo=False)
        run("{REPO}/experiments/inferno.toml", "{root}/sweep", preset="tiny",
            overrides={SWEEP!r}, progress=False, echo=False)
        points = resolve({LC_Z!r})
        run_point(points[0].config, "{root}/lc_z", progress=False, echo=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _images(report: str) -> list[str]:
    import re

    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_tiny_preset_runs(tiny_runs, name, sbibm_missing):
    _needs_reference(name, sbibm_missing)
    out = tiny_runs / name
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["name"] == name
    resolved = ExperimentConfig.from_dict(config).to_dict()
    assert resolved == json.loads((out / "config.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["versions"]["sbi-engine"] and manifest["device"]["platform"] == "cpu"
    assert manifest["stages"]["report"]["seconds"] >= 0
    metrics = json.loads((out / "metrics.json").read_text())
    primary = metrics["summary"][metrics["primary"]]
    assert primary["n"] == len(config["seeds"]) and isinstance(primary["mean"], float)
    report = (out / "report.md").read_text()
    assert report.startswith(f"# {name} (") and "## Stages" in report
    images = _images(report)
    assert images, report
    for rel in images:
        assert (out / rel).read_bytes()[:4] == b"\x89PNG", rel
    assert "run.log" in report and (out / "run.log").stat().st_size > 0


def test_npe_run_contents(tiny_runs, sbibm_missing):
    out = tiny_runs / "sbibm_npe"
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    for key in ("train/nll", "valid/nll", "test/nll", "sbc/min_pvalue",
                "coverage/max_abs_error"):
        assert key in summary, key
    if sbibm_missing:  # the run goes on without C2ST and its log says why
        assert "c2st" not in summary
        assert "observation 1: no reference samples" in (out / "run.log").read_text()
    else:
        assert "obs1/c2st" in summary
        assert 0.4 < summary["c2st"]["mean"] <= 1.0
        assert "| obs1 |" in (out / "report.md").read_text()
    assert (out / "models" / "seed0" / "posterior.json").exists()
    assert (out / "data" / "train-seed0.zarr" / "manifest.json").exists()


def test_systematics_run_contents(tiny_runs):
    out = tiny_runs / "inferno"
    metrics = json.loads((out / "metrics.json").read_text())
    rows = json.loads((out / "results" / "seed0.json").read_text())["rows"]
    assert "inferno" in rows and any(r.startswith("bce@") for r in rows)
    assert "inferno/z_nominal" in metrics["summary"] or "inferno/z_worst" in metrics["summary"]
    assert metrics["directions"]["best/z_worst"] == "max"
    assert (out / "plots" / "heatmap.png").exists()
    report = (out / "report.md").read_text()
    assert "| inferno |" in report and "z_worst" in report
    # every trained classifier is saved and loads back
    from sbi_engine.classify import load_classifier

    saved = sorted((out / "models" / "seed0").iterdir())
    assert len(saved) == len(rows)
    loaded = load_classifier(saved[-1])
    assert loaded.metadata["row"] == rows[-1]


def test_learning_curve_contents(tiny_runs, sbibm_missing):
    _needs_reference("learning_curve_two_moons", sbibm_missing)
    out = tiny_runs / "learning_curve_two_moons"
    metrics = json.loads((out / "metrics.json").read_text())
    curve = metrics["curves"]["c2st"]
    assert curve["budgets"] == [200, 400] and len(curve["mean"]) == 2
    assert "n400/c2st" in metrics["summary"] and "n200/valid/nll" in metrics["summary"]
    assert (out / "plots" / "learning_curve_c2st.png").exists()
    assert (out / "models" / "n200-seed0" / "posterior.json").exists()
    assert "| budget | c2st | valid/nll |" in (out / "report.md").read_text()


def test_learning_curve_of_a_significance(tiny_runs):
    out = tiny_runs / "lc_z"
    metrics = json.loads((out / "metrics.json").read_text())
    curve = metrics["curves"]["best/z_nominal"]
    assert curve["budgets"] == [150, 300] and all(v > 0 for v in curve["mean"])
    assert metrics["summary"]["n300/best/z_nominal"]["n"] == 2
    assert (out / "plots" / "learning_curve_best_z_nominal.png").exists()
    assert (out / "results" / "n150-seed1.json").exists()


def test_sweep_summary_and_leaderboard(tiny_runs, capsys):
    out = tiny_runs / "sweep"
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["label"] for p in points] == [
        {"systematics.classifier.learning_rate": 0.01},
        {"systematics.classifier.learning_rate": 0.003}]
    assert "learning_rate" in (out / "summary.md").read_text()
    assert main(["leaderboard", str(out), "--metric", "best/z_worst"]) == 0
    text = capsys.readouterr().out
    assert "best/z_worst (max is better)" in text
    assert "learning_rate=0.01" in text and "learning_rate=0.003" in text


def test_killed_run_resumes_with_identical_metrics(tiny_runs, env, tmp_path):
    """SIGKILL in the middle of evaluate/seed0, rerun: the completed stages are reused and
    the metrics equal those of the uninterrupted run (another process, same seed)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sbi_engine.cli", "run",
           str(REPO / "experiments" / "sbibm_npe.toml"), "--preset", "tiny", "--out", str(out),
           "--quiet"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = out / "stages" / "train-seed0.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the run ended before training finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "killed too late: the run had finished"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"  # what a SIGKILL leaves behind

    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["status"] for a in manifest["attempts"]] == ["died", "complete"]
    assert manifest["stages"]["train/seed0"]["resumed"] is True
    assert manifest["stages"]["evaluate/seed0"]["attempt"] == 2
    resumed = json.loads((out / "metrics.json").read_text())
    fresh = json.loads((tiny_runs / "sbibm_npe" / "metrics.json").read_text())
    assert resumed["per_seed"] == fresh["per_seed"]
    assert resumed["summary"] == fresh["summary"]
    log = (out / "run.log").read_text()
    assert "(resuming)" in log and "0 resumed" not in log.splitlines()[-1]


def test_run_cli_errors_and_dry_run(capsys, tmp_path):
    exp = str(REPO / "experiments" / "sbibm_npe.toml")
    assert main(["run", exp, "--set", "npe.max_epoch=3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: npe.max_epoch: unknown key (did you mean 'max_epochs'?)")
    assert len(err.strip().splitlines()) == 1
    assert main(["run", exp, "--preset", "nope"]) == 2
    assert "unknown preset 'nope'; this experiment has: small, tiny" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", exp, "--preset", "tiny", "--set", "npe.estimator=[maf,nsf]",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("# sweep point estimator=") == 2 and "2 point(s); configuration valid" in out
    assert not (tmp_path / "x").exists()
    # Caught by --dry-run, before any stage: an observation number out of range, and an
    # option value the simulator refuses.
    assert main(["run", exp, "--preset", "tiny", "--set", "evaluation.observations=[1,11]",
                 "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: evaluation.observations[1]: num_observation: expected an integer in 1..10")
    assert main(["run", exp, "--preset", "tiny", "--set", "data.options.foo=1",
                 "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: data.options: simulator 'two_moons': bad ")
    # A scheduler farms out the points of a sweep; a single point is a clear error.
    assert main(["run", exp, "--preset", "tiny", "--scheduler", "local",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--scheduler: the experiment has a single point" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_damaged_dataset_in_a_run_is_redone_on_resume(tiny_runs, env, tmp_path,
                                                        sbibm_missing):
    # A chunk of the training set corrupted after its simulate stage was recorded: the
    # rerun re-checks the run's datasets, redoes that chunk and trains on the repaired
    # data, with the metrics of the undamaged run.
    import shutil

    if sbibm_missing:
        pytest.skip("needs the sbibm reference data")
    out = tmp_path / "run"
    shutil.copytree(tiny_runs / "sbibm_npe", out)
    chunk = next(p for p in sorted((out / "data" / "train-seed0.zarr" / "x").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    for record in ("train-seed0.json", "evaluate-seed0.json", "report.json"):
        (out / "stages" / record).unlink()
    # (in a subprocess, as the fixture's run: XLA's thread pool differs in this process)
    done = subprocess.run([sys.executable, "-m", "sbi_engine.cli", "run",
                           str(REPO / "experiments" / "sbibm_npe.toml"), "--preset", "tiny",
                           "--out", str(out), "--quiet"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "run.log").read_text()
    assert "simulate/seed0: its output is damaged or missing; running it again" in log
    assert "simulate/test: its output is damaged" not in log
    resumed = json.loads((out / "metrics.json").read_text())
    fresh = json.loads((tiny_runs / "sbibm_npe" / "metrics.json").read_text())
    assert resumed["summary"] == fresh["summary"]
