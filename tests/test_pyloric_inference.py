"""Pyloric 845_082_0044 inference pipeline (simulators/pyloric/inference.py, issue 6).

The fast test runs the whole pipeline at toy size (the ``tiny`` preset: a local box prior
around a rhythmic circuit, 2.5-s simulations, 192 + 96 simulations, one NPE round) and
checks that the report directory is complete and its numbers finite; the ``slow`` test
runs the ``small`` preset (the published prior, ~7,000 simulations of 11 s).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from sbi_engine import experiment
from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.posterior import load_posterior
from simulators.pyloric import inference
from simulators.pyloric.inference import (
    EXPERIMENTAL_STD,
    align_to_burst,
    close_deistler2022,
    close_experimental,
    select_dissimilar_pair,
)

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "pyloric_845.toml"
X_O = np.array([1170.859, 206.036, 214.307, 412.842, 0.17597, 0.18303, 0.35260, 0.41160,
                0.63054, 481.926, 256.353, 275.165, 42.046, 0.23501, 0.035910, 2.5, 2.5, 2.5])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pyloric") / "tiny"
    (res,) = experiment.run(EXPERIMENT, out, preset="tiny", progress=False, echo=False)
    return res


def test_tiny_pipeline_writes_a_complete_report(tiny_run):
    out = tiny_run.out
    for name in ("report.md", "metrics.json", "config.toml", "manifest.json", "run.log"):
        assert (out / name).is_file(), name
    for name in ("traces", "pairplot", "compensation", "predictive", "features", "rounds",
                 "training", "coverage", "sbc"):
        png = out / "plots" / f"{name}_seed0.png"
        assert png.is_file() and png.stat().st_size > 5000, name
    for name in ("round0", "round1", "ppc"):
        assert (out / "data" / "seed0" / f"{name}.zarr" / "manifest.json").is_file()
    assert (out / "models" / "seed0" / "classifier" / "classifier.json").is_file()

    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    assert metrics["primary"] == "ppc/close_fraction"
    assert metrics["directions"]["ppc/close_fraction"] == "max"
    for name in ("ppc/valid_fraction", "ppc/close_fraction", "ppc/close_fraction_deistler2022",
                 "ppc/rms_z", "coverage/hpd_max_abs_error", "coverage/hpd_90",
                 "coverage/tarp_max_abs_error", "sbc/min_pvalue", "simulations/total",
                 "round0/valid_fraction", "round1/valid_fraction", "restriction/acceptance",
                 "npe/best_val_loss", "time/wall_seconds"):
        assert math.isfinite(summary[name]["mean"]), name
    for name in ("ppc/valid_fraction", "ppc/close_fraction", "ppc/close_fraction_deistler2022"):
        assert 0.0 <= summary[name]["mean"] <= 1.0
    assert summary["simulations/total"]["mean"] == 192 + 96 + 48
    assert summary["ppc/valid_fraction"]["mean"] > 0.2  # the local prior is mostly rhythmic
    report = (out / "report.md").read_text()
    assert "## Results" in report and "plots/compensation_seed0.png" in report
    assert "## Rounds (seed0)" in report

    # the saved posterior is usable on its own
    post = load_posterior(out / "models" / "seed0" / "posterior")
    samples = post.sample(jax.random.key(0), 16, X_O.astype(np.float32))
    assert samples.shape == (16, 31) and np.isfinite(samples).all()
    assert post.metadata["observation"] == "845_082_0044"


def test_rerun_resumes_every_stage(tiny_run):
    (again,) = experiment.run(EXPERIMENT, tiny_run.out, preset="tiny", progress=False,
                              echo=False)
    assert again.ran == () and len(again.resumed) == 8
    assert again.metrics["summary"] == tiny_run.metrics["summary"]


def test_tiny_second_round_is_truncated(tmp_path):
    """Round 2 samples the restricted prior ∩ the HPD region of the round-1 posterior."""
    (res,) = experiment.run(
        EXPERIMENT, tmp_path / "two", preset="tiny", progress=False, echo=False,
        overrides=["rounds.simulations=[48, 48]", "evaluation.figures=false",
                   "evaluation.ppc_samples=16", "evaluation.coverage_observations=4"])
    meta = json.loads((res.out / "proposals" / "seed0" / "round2.json").read_text())
    assert "HPD(1-0.0001) of round-1 posterior" in meta["proposal"]
    assert math.isfinite(meta["hpd_log_threshold"]) and 0 < meta["acceptance"] <= 1
    theta = np.load(res.out / "proposals" / "seed0" / "round2.npy")
    post = load_posterior(res.out / "models" / "seed0" / "posterior_round1")
    lp = post.log_prob(theta, X_O.astype(np.float32))
    assert theta.shape == (48, 31) and (lp >= meta["hpd_log_threshold"] - 1e-3).all()
    summary = res.metrics["summary"]
    assert summary["simulations/total"]["mean"] == 192 + 48 + 48 + 16
    assert math.isfinite(summary["round2/valid_fraction"]["mean"])


def test_close_criteria_on_known_rows():
    x = np.tile(np.concatenate([X_O, [9, 9, 9]]), (5, 1)).astype(np.float64)  # (5, 21)
    x[1, 0] += 1.99 * EXPERIMENTAL_STD[0]  # period just inside 2 std
    x[2, 7] += 0.3                         # LP phase outside (> 2 × 0.054 and > 0.2)
    x[3, 12] = np.nan                      # an undefined feature
    x[4, 16] = 40.0                        # an LP plateau (fails only Deistler's test)
    np.testing.assert_array_equal(close_experimental(x, X_O), [True, True, False, False, True])
    sd = np.ones(15)
    sd[:4] = 100.0  # durations allowed ±2 ms, the rest ±0.2
    x[1, 0] = X_O[0] + 1.0
    close = close_deistler2022(x, X_O, sd)
    np.testing.assert_array_equal(close, [True, True, False, False, False])
    x[0, 18] = 7  # fewer than 8 AB/PD bursts
    assert not close_deistler2022(x, X_O, sd)[0]
    assert not close_deistler2022(x, X_O, np.full(15, np.nan)).any()
    with pytest.raises(ShapeError, match="'full' feature set"):
        close_deistler2022(x[:, :18], X_O, sd)
    with pytest.raises(ShapeError, match=r"x: expected shape \(n, >=15\)"):
        close_experimental(x[:, :10], X_O)


def test_dissimilar_pair_and_alignment():
    theta = np.array([[0.1, 0.1], [0.9, 0.2], [0.5, 0.5], [0.0, 1.0]])
    i, j, d = select_dissimilar_pair(theta, [0, 0], [1, 1])
    assert {i, j} == {1, 3} and d == pytest.approx(0.85)
    with pytest.raises(ShapeError, match="at least two rows"):
        select_dissimilar_pair(theta[:1], [0, 0], [1, 1])
    v = np.full((3, 2000), -60.0)
    v[0, 100:300:20] = 0.0    # a burst already running at the start ...
    v[0, 900:1100:20] = 0.0   # ... then one after 600 ms of silence
    out = align_to_burst(v)
    assert out.shape == (3, 2000 - 850) and out[0, 50] == 0.0
    assert align_to_burst(np.full((3, 100), -60.0)).shape == (3, 100)


def test_config_errors_name_the_key():
    spec = experiment.load_spec(EXPERIMENT)
    with pytest.raises(ConfigError, match=r"rounds.simulation: unknown key \(did you mean "
                                          r"'simulations'\?\)"):
        experiment.resolve(spec, overrides=["rounds.simulation=[10]"])
    with pytest.raises(ConfigError, match="simulations: expected at least one round"):
        experiment.resolve(spec, overrides=["rounds.simulations=[]"])
    with pytest.raises(ConfigError, match="features"):
        experiment.resolve(spec, overrides=['pyloric.features="25"'])
    with pytest.raises(ConfigError, match="pair_parameters: unknown parameter 'ABPD_Nax'"):
        experiment.resolve(spec, overrides=['evaluation.pair_parameters=["ABPD_Nax"]'])
    with pytest.raises(ConfigError, match="npe.backend"):
        experiment.resolve(spec, overrides=['npe.backend="sbi"'])
    (point,) = experiment.resolve(spec, preset="small")
    assert point.config.section("rounds").simulations == (2000, 1500)
    assert inference.EXPERIMENT_TYPE.name in experiment.EXPERIMENT_TYPES


@pytest.mark.slow
def test_small_preset(tmp_path):
    (res,) = experiment.run(EXPERIMENT, tmp_path / "small", preset="small", progress=False,
                            echo=False)
    summary = res.metrics["summary"]
    assert summary["simulations/total"]["mean"] == 3000 + 2000 + 1500 + 500
    for name in ("ppc/valid_fraction", "ppc/close_fraction", "coverage/hpd_max_abs_error"):
        assert math.isfinite(summary[name]["mean"]), name
    # the restricted prior and the truncation raise the valid fraction above the prior's
    assert summary["round1/valid_fraction"]["mean"] > summary["round0/valid_fraction"]["mean"]
    assert summary["ppc/valid_fraction"]["mean"] > summary["round0/valid_fraction"]["mean"]
