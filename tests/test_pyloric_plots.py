"""Pyloric figures: PNGs written, shaded bursts = detected bursts, clear shape errors;
smoke test of ``experiments/pyloric_valid_fraction.py``."""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure

from sbi_engine.errors import ShapeError
from simulators import pyloric
from simulators.pyloric import plots
from simulators.pyloric.features import bursts_from_trace
from tests.test_plotting import assert_png
from tests.test_pyloric import REF_1, THETA_1

DT = pyloric.DT  # 0.025 ms


def _burst_axes_intervals(fig: Figure) -> list[np.ndarray]:
    """The shaded ``[start, end]`` spans drawn on each cell's axis, in axis units."""
    out = []
    for ax in fig.axes[:3]:
        rects = [p for p in ax.patches if p.get_gid() == "burst"]
        out.append(np.array([[r.get_x(), r.get_x() + r.get_width()] for r in rects]
                            ).reshape(-1, 2))
    return out


def _synthetic(n: int = 80_000) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """Traces ``(3, n)`` at 0.025 ms with Gaussian spikes at known samples, and per cell
    the expected kept bursts as (first, last) spike samples.

    Bursts are spike trains with 10 ms (400-sample) ISIs; a gap of ≥ 150 ms separates
    them. One LP "burst" lasts 30 ms (≤ 40 ms) and must be dropped; PY's two trains are
    only 140 ms apart and form one burst.
    """
    rng = np.random.default_rng(0)
    t = np.arange(n)
    v = -60.0 + 0.2 * rng.standard_normal((3, n))
    trains = {  # cell: [(first spike sample, number of spikes)]
        0: [(4_000, 9), (30_000, 9), (56_000, 9)],
        1: [(14_000, 12), (40_000, 4), (60_000, 12)],  # 4 spikes = 30 ms: dropped
        2: [(20_000, 6), (20_000 + 5 * 400 + 5_600, 6), (70_000, 15)],  # 140 ms gap: merged
    }
    kept = {0: [0, 1, 2], 1: [0, 2], 2: [(0, 1), 2]}
    spikes = {}
    for cell, tr in trains.items():
        spikes[cell] = []
        for k0, n_sp in tr:
            peaks = k0 + 400 * np.arange(n_sp)
            for c in peaks:
                v[cell] += 90.0 * np.exp(-0.5 * ((t - c) / 12.0) ** 2)
            spikes[cell].append(peaks)
    expected = []
    for cell in range(3):
        rows = []
        for item in kept[cell]:
            group = item if isinstance(item, tuple) else (item,)
            first, last = spikes[cell][group[0]][0], spikes[cell][group[-1]][-1]
            rows.append((first - 1, last - 1))  # the features' spike index (reference)
        expected.append(rows)
    return v, expected


@pytest.fixture(scope="module")
def synthetic():
    return _synthetic()


def test_traces_shading_equals_detected_bursts(synthetic, tmp_path):
    v, expected = synthetic
    b = bursts_from_trace(v, DT)
    np.testing.assert_array_equal(b.n_bursts, [3, 2, 2])
    path = tmp_path / "traces.png"
    fig = plots.plot_traces(v, DT, title="synthetic", path=path)
    assert isinstance(fig, Figure)
    assert_png(path)
    assert fig.axes[-1].get_xlabel() == "time [ms]"  # 2 s → ms
    shaded = _burst_axes_intervals(fig)
    for cell in range(3):
        want = np.array(expected[cell], dtype=np.float64) * DT
        np.testing.assert_allclose(shaded[cell], want, rtol=0, atol=1e-9)
        np.testing.assert_allclose(shaded[cell], plots.burst_intervals(b, DT)[cell])

    # the same bursts given explicitly (Bursts or ms intervals), in seconds
    fig = plots.plot_traces(v, DT, bursts=b, time_unit="s")
    assert fig.axes[-1].get_xlabel() == "time [s]"
    for cell, iv in enumerate(_burst_axes_intervals(fig)):
        np.testing.assert_allclose(iv * 1e3, np.array(expected[cell]) * DT, atol=1e-9)
    fig = plots.plot_traces(v[:, ::40], 1.0, bursts=plots.burst_intervals(b, DT))
    for cell, iv in enumerate(_burst_axes_intervals(fig)):
        np.testing.assert_allclose(iv, np.array(expected[cell]) * DT, atol=1e-9)
    assert all(len(iv) == 0 for iv in _burst_axes_intervals(
        plots.plot_traces(v[:, ::40], 1.0, bursts=False)))


def test_traces_from_theta(tmp_path):
    """θ₁ simulated at full resolution; the shaded bursts are those of its features."""
    path = tmp_path / "theta1.png"
    key = jax.random.key(0)
    opts = {"noise_std": 0.0, "t_max": 3000.0, "t_burn": 500.0}
    fig = plots.plot_traces(np.array(THETA_1), key=key, path=path, **opts)
    assert_png(path)
    assert fig.axes[-1].get_xlabel() == "time after the burn-in [s]"
    shaded = _burst_axes_intervals(fig)
    v = pyloric.simulate_traces(key, np.array(THETA_1), downsample=1, **opts)
    x = pyloric.features_from_trace(v, DT)
    for cell in range(3):
        assert len(shaded[cell]) == x[18 + cell] >= 2
        dur_ms = np.mean(shaded[cell][:, 1] - shaded[cell][:, 0]) * 1e3
        np.testing.assert_allclose(dur_ms, x[1 + cell], rtol=1e-9)  # = burst_duration_*


def test_traces_bad_inputs(synthetic):
    v, _ = synthetic
    with pytest.raises(ShapeError, match=r"data: expected .*\(3, T\).*\(31,\), got shape "
                                         r"\(2, 10\)"):
        plots.plot_traces(np.zeros((2, 10)), DT)
    with pytest.raises(ShapeError, match="dt_ms: the sampling step"):
        plots.plot_traces(v)
    with pytest.raises(ShapeError, match=r"dt_ms: bursts are detected .* got 1.0 ms"):
        plots.plot_traces(v[:, ::40], 1.0)
    with pytest.raises(ShapeError, match="dt_ms: expected a positive"):
        plots.plot_traces(v, -1.0)
    with pytest.raises(ShapeError, match="key: a jax.random key"):
        plots.plot_traces(np.array(THETA_1))
    with pytest.raises(ShapeError, match="NaN"):
        plots.plot_traces(np.full((3, 100), np.nan), DT, bursts=False)
    with pytest.raises(ShapeError, match="bursts: expected a Bursts"):
        plots.plot_traces(v, DT, bursts=[np.zeros((0, 2))] * 2)
    with pytest.raises(ShapeError, match=r"bursts\[1\] \(LP\)"):
        plots.plot_traces(v, DT, bursts=[[], [[5.0, 1.0]], []])
    with pytest.raises(ShapeError, match="time_unit"):
        plots.plot_traces(v, DT, bursts=False, time_unit="min")


def test_feature_table_one_and_many(tmp_path):
    x_o = pyloric.observation()
    path = tmp_path / "table.png"
    fig = plots.plot_feature_table(REF_1, x_o, names=pyloric.FEATURE_NAMES[:18], path=path)
    assert_png(path)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "cycle period [ms]" and labels[4] == "duty cycle AB/PD"
    assert labels[9] == "start→start AB/PD→LP [ms]"
    # one dot per feature at its relative difference in %
    dots = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"]
    xs = sorted((float(ln.get_ydata()[0]), float(ln.get_xdata()[0])) for ln in dots)
    np.testing.assert_allclose([d for _, d in xs], (REF_1 - x_o) / np.abs(x_o) * 100, rtol=1e-9)

    # several simulations, some undefined; the 15-feature set with default names
    rng = np.random.default_rng(0)
    xs = REF_1[:15] * (1 + 0.1 * rng.standard_normal((20, 15)))
    xs[:5, 7:] = np.nan  # not triphasic
    xs[:, 13] = np.nan  # never defined
    path = tmp_path / "many.png"
    fig = plots.plot_feature_table(xs, x_o[:15], path=path)
    assert_png(path)
    nan_rows = [t for t in fig.axes[0].texts if t.get_gid() == "nan"]
    assert [t.get_position()[1] for t in nan_rows] == [13]
    assert "NaN (undefined)" in nan_rows[0].get_text()
    assert "25%" in [t.get_text() for t in fig.axes[1].texts]  # NaN fraction of rows 7–12
    # standardised differences
    fig = plots.plot_feature_table(xs, x_o[:15], scale=np.abs(x_o[:15]) * 0.1)
    assert "scale" in fig.axes[0].get_xlabel()


def test_feature_table_bad_inputs():
    x_o = pyloric.observation()
    with pytest.raises(ShapeError, match=r"observation: expected shape \(18,\)"):
        plots.plot_feature_table(REF_1, x_o[:15])
    with pytest.raises(ShapeError, match="names: expected 18 names, got 2"):
        plots.plot_feature_table(REF_1, x_o, names=["a", "b"])
    with pytest.raises(ShapeError, match=r"features: expected shape \(F,\) or \(n, F\)"):
        plots.plot_feature_table(np.zeros((2, 3, 18)), x_o)
    with pytest.raises(ShapeError, match="scale: expected 18 positive"):
        plots.plot_feature_table(REF_1, x_o, scale=np.zeros(18))
    with pytest.raises(ShapeError, match="inf"):
        plots.plot_feature_table(np.full(18, np.inf), x_o)


def test_valid_fraction_experiment_smoke(repo_root, capsys):
    spec = importlib.util.spec_from_file_location(
        "pyloric_valid_fraction", repo_root / "experiments" / "pyloric_valid_fraction.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--num", "3", "--batch-size", "2", "--t-max", "700", "--t-burn", "100"])
    assert res["num"] == 3 and 0 <= res["valid"] <= 3
    lo, hi = res["ci95"]
    assert 0.0 <= lo <= res["fraction"] <= hi <= 1.0
    assert "all 15 features finite" in capsys.readouterr().out
    assert mod.clopper_pearson(0, 10)[0] == 0.0
    np.testing.assert_allclose(mod.clopper_pearson(10, 1000), (0.00480, 0.01832), atol=2e-5)
