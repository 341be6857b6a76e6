"""Systematics study: designs, config validation, a tiny study on the pivot toy, CLI."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from sbi_engine.classify import ClassifierConfig
from sbi_engine.cli import main
from sbi_engine.errors import ConfigError
from sbi_engine.events import get_generator
from sbi_engine.systematics import (
    SUMMARY,
    Design,
    SystematicsConfig,
    corners,
    extremes,
    fractional_factorial,
    nuisance_steps,
    one_at_a_time,
    prior_samples,
    run_study,
)


@pytest.fixture(scope="module")
def inferno():
    return get_generator("inferno")


@pytest.fixture(scope="module")
def higgs():
    return get_generator("higgs_like")


# -- designs ------------------------------------------------------------------------------


def test_steps_constrained_and_unconstrained(inferno):
    steps = nuisance_steps(inferno)
    assert steps["r"] == pytest.approx((-0.4, 0.4))
    assert steps["lambda"] == pytest.approx((2.0, 4.0))
    assert steps["b"] == pytest.approx((900.0, 1100.0))


def test_design_sizes_and_contents(inferno):
    k = 3
    ext = extremes(inferno)
    assert len(ext) == 2 * k
    oat = one_at_a_time(inferno)
    assert len(oat) == 2 * k + 1 and oat.names[0] == "nominal"
    np.testing.assert_allclose(oat.nu[0], inferno.nominal_nu())
    # each non-nominal setting moves exactly one nuisance
    moved = np.sum(~np.isclose(oat.nu[1:], inferno.nominal_nu()), axis=1)
    np.testing.assert_array_equal(moved, 1)
    cor = corners(inferno)
    assert len(cor) == 2**k and len({tuple(r) for r in cor.nu}) == 2**k
    two = corners(inferno, ["r", "lambda"])
    assert len(two) == 4
    np.testing.assert_allclose(two.nu[:, 2], 1000.0)  # b not varied: nominal


def _levels(design, gen):
    steps = nuisance_steps(gen, design.varied)
    idx = [gen.nuisance_names.index(n) for n in design.varied]
    return np.where(np.isclose(design.nu[:, idx], [steps[n][1] for n in design.varied]),
                    1, -1)


def test_fractional_factorial_orthogonal(higgs):
    names = higgs.nuisance_names  # 6 nuisances
    assert len(names) == 6
    ff = fractional_factorial(higgs, names, p=2)
    assert len(ff) == 2 ** (6 - 2) and ff.resolution == 4
    lv = _levels(ff, higgs)
    assert np.all(lv.sum(axis=0) == 0)  # balanced
    np.testing.assert_array_equal(lv.T @ lv, len(ff) * np.eye(6))  # orthogonal
    ff3 = fractional_factorial(higgs, names[:5], p=2)  # 2^(5-2): resolution III
    assert len(ff3) == 8 and ff3.resolution == 3
    lv3 = _levels(ff3, higgs)
    np.testing.assert_array_equal(lv3.T @ lv3, 8 * np.eye(5))
    auto = fractional_factorial(higgs, names[:4])  # 2^(4-1), D = ABC
    assert len(auto) == 8 and auto.resolution == 4


def test_prior_samples(inferno):
    a = prior_samples(inferno, jax.random.PRNGKey(1), 16, ["r"])
    b = prior_samples(inferno, jax.random.PRNGKey(1), 16, ["r"])
    assert len(a) == 16
    np.testing.assert_array_equal(a.nu, b.nu)
    np.testing.assert_allclose(a.nu[:, 1:], np.broadcast_to(inferno.nominal_nu()[1:], (16, 2)))
    assert np.std(a.nu[:, 0]) > 0.1


# -- validation -----------------------------------------------------------------------------


def test_bad_designs(inferno):
    with pytest.raises(ConfigError, match="nuisances"):
        extremes(inferno, ["r", "nope"])
    with pytest.raises(ConfigError, match="nuisances"):
        corners(inferno, [])
    with pytest.raises(ConfigError, match="design"):
        Design((), np.zeros((0, 3)), inferno.nuisance_names)


@pytest.mark.parametrize("kwargs, field", [
    ({"yields": {"b_exp": -5.0}}, "yields.b_exp"),
    ({"methods": []}, "methods"),
    ({"methods": ["bce", "magic"]}, "methods"),
    ({"train_design": "everything"}, "train_design"),
    ({"n_test": 0}, "n_test"),
    ({"nuisances": []}, "nuisances"),
    ({"threshold": "best"}, "threshold"),
    ({"nuisances": 5}, "nuisances"),
    ({"methods": 3}, "methods"),
    ({"methods": [["bce"]]}, "methods"),
    ({"test_design": ["corners"]}, "test_design"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SystematicsConfig(generator="inferno", **kwargs)


def test_unknown_nuisance_and_key():
    with pytest.raises(ConfigError, match="nuisances.*'nope'"):
        SystematicsConfig(generator="inferno", nuisances=["nope"]).build_generator()
    with pytest.raises(ConfigError, match="unknown key 'bogus'.*allowed"):
        SystematicsConfig.from_dict({"generator": "pivot", "bogus": 1})
    with pytest.raises(ConfigError, match="classifier: unknown key"):
        SystematicsConfig.from_dict({"generator": "pivot", "classifier": {"depth": 3}})


# -- a tiny study on the pivot toy -------------------------------------------------------------

TINY = SystematicsConfig(
    generator="pivot", train_design="one_at_a_time", test_design="one_at_a_time",
    methods=("bce", "augmented"), n_train=1000, n_test=2000, n_prior=3, seed=3,
    classifier=ClassifierConfig(hidden=(16, 16), steps=300, batch_size=256,
                                learning_rate=5e-3))


@pytest.fixture(scope="module")
def tiny():
    return run_study(TINY, progress=False)


def test_tiny_study_shape(tiny):
    assert tiny.rows == ("bce@nominal", "bce@z=-1", "bce@z=1", "augmented")
    assert tiny.cols == ("nominal", "z=-1", "z=1")
    assert tiny.z.shape == (4, 3) and tiny.auc.shape == (4, 3)
    assert np.all(np.isfinite(tiny.z)) and np.all(np.isfinite(tiny.auc))
    assert np.all(tiny.z > 0) and np.all(tiny.auc > 0.5)
    np.testing.assert_allclose(tiny.summary["nominal"], tiny.z[:, 0])
    np.testing.assert_allclose(tiny.summary["worst"], tiny.z.min(axis=1))
    assert np.all(np.isfinite(tiny.summary["prior_avg"]))
    assert np.all(np.isnan(tiny.summary["profiled"]))  # profile off


def test_diagonal_beats_off_diagonal(tiny):
    # z shifts the signal by a full sigma: the model trained at the test setting should win
    z = tiny.z[:3, :3]  # bce rows x test settings, same order
    diag = np.diag(z)
    off = (z.sum(axis=0) - diag) / 2.0  # per test column, mean over the other training rows
    assert np.mean(diag - off) > 0.0
    auc = tiny.auc[:3, :3]
    assert np.mean(np.diag(auc) - (auc.sum(axis=0) - np.diag(auc)) / 2.0) > 0.0


def test_deterministic(tiny):
    again = run_study(TINY, progress=False)
    np.testing.assert_array_equal(again.z, tiny.z)
    np.testing.assert_array_equal(again.summary["prior_avg"], tiny.summary["prior_avg"])


def test_threshold_fixed_at_training(tiny):
    fixed = run_study(dataclasses.replace(TINY, threshold="train"), progress=False)
    assert fixed.rows == tiny.rows and np.all(np.isfinite(fixed.z))
    # a frozen cut does no better than the best cut on the same test sample (up to the
    # quantile grid of thresholds scanned)
    assert np.all(fixed.z <= tiny.z * 1.05)
    assert np.mean(fixed.z) <= np.mean(tiny.z)


def test_json_and_png(tiny, tmp_path):
    path = tiny.to_json(tmp_path / "m.json")
    data = json.loads(path.read_text())
    assert data["rows"] == list(tiny.rows) and len(data["z"]) == 4
    assert data["config"]["generator"] == "pivot"
    fig = tiny.plot(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    # coloured per column: each cell's distance to its column's best, best outlined
    ax = fig.axes[0]
    keys = [k for k in SUMMARY if np.any(np.isfinite(tiny.summary[k]))]
    m = np.column_stack([tiny.z, *(tiny.summary[k] for k in keys)])
    np.testing.assert_allclose(np.ma.filled(ax.images[0].get_array(), np.nan),
                               m - np.nanmax(m, axis=0))
    best_cells = {(int(c), int(r)) for r, c in zip(*np.nonzero(m == np.nanmax(m, axis=0)))}
    assert {(round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in ax.patches} == best_cells
    assert [line.get_xdata()[0] for line in ax.lines] == [len(tiny.cols) - 0.5]
    lines = tiny.table().splitlines()
    assert any(line.startswith("bce@z=-1") for line in lines)
    assert lines[-1] == "* the best Z of the column"
    full = np.column_stack([tiny.z, *(tiny.summary[k] for k in SUMMARY)])
    best = full == np.max(np.where(np.isfinite(full), full, -np.inf), axis=0)
    assert [line.count("*") for line in lines[1:-1]] == list(best.sum(axis=1))
    worst_col = len(tiny.cols) + SUMMARY.index("worst")
    top = int(np.nanargmax(tiny.summary["worst"]))
    assert lines[1 + top].split()[1 + worst_col].endswith("*")


def test_profiled_column():
    cfg = dataclasses.replace(TINY, methods=("augmented",), n_prior=0, profile=True,
                              test_design="extremes")
    res = run_study(cfg, progress=False)
    assert res.z.shape == (1, 2)
    assert np.isfinite(res.summary["profiled"][0]) and res.summary["profiled"][0] > 0
    # the profiled Z (shape systematics profiled) is below the nominal cut-based Z
    assert res.summary["profiled"][0] < res.summary["nominal"][0] + 1e-6 or np.isnan(
        res.summary["nominal"][0])


# -- CLI ----------------------------------------------------------------------------------------


_TOML = """
generator = "pivot"
methods = ["bce", "augmented"]
n_train = 1000
n_test = 2000
n_prior = 3
seed = 3
[classifier]
hidden = [16, 16]
steps = 300
batch_size = 256
learning_rate = 0.005
"""


def test_cli_runs(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text(_TOML)
    assert main(["systematics", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bce@z=1" in out and "worst" in out
    data = json.loads((tmp_path / "o" / "matrix.json").read_text())
    assert len(data["z"]) == 4
    assert (tmp_path / "o" / "heatmap.png").is_file()


def test_cli_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('generator = "pivot"\nepochs = 3\n')
    assert main(["systematics", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'epochs'" in err and "allowed" in err
