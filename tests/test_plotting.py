"""Every plot function runs on small data, returns a Figure and writes a valid PNG."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure

from sbi_engine import diagnostics as dg
from sbi_engine import plotting as pl
from sbi_engine.errors import ConfigError, ShapeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    assert path.exists(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def axis_labels(fig: Figure) -> set[str]:
    return {ax.get_xlabel() for ax in fig.axes} | {ax.get_ylabel() for ax in fig.axes}


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_pairplot_with_truth_reference_and_labels(tmp_path, rng):
    samples = rng.normal(size=(3000, 3)) * [1.0, 0.5, 2.0] + [0.0, 1.0, -1.0]
    reference = rng.normal(size=(2000, 3)) * [1.0, 0.5, 2.0] + [0.3, 1.0, -1.0]
    truth = np.array([0.2, 1.1, -0.5])
    names = ["g_Na", "g_K", "τ"]
    path = tmp_path / "sub" / "pair.png"
    fig = pl.pairplot(
        samples, truth=truth, labels=names, reference=reference, title="test posterior", path=path
    )
    assert isinstance(fig, Figure)
    assert_png(path)
    assert set(names) <= axis_labels(fig)
    # Truth drawn on every visible panel: a vertical line at truth[j] in column j.
    axes = np.array(fig.axes[:9]).reshape(3, 3)
    for i in range(3):
        for j in range(i + 1):
            xs = [line.get_xdata()[0] for line in axes[i, j].get_lines()]
            assert any(np.isclose(x, truth[j]) for x in xs), (i, j)


def test_pairplot_one_dimension_and_bad_input(tmp_path, rng):
    samples = rng.normal(size=(500, 1))
    assert_png(pl.save_figure(pl.pairplot(samples[:, 0], truth=[0.0]), tmp_path / "one.png"))
    with pytest.raises(ShapeError, match="truth"):
        pl.pairplot(rng.normal(size=(100, 2)), truth=[0.0, 1.0, 2.0])
    with pytest.raises(ShapeError, match="labels"):
        pl.pairplot(rng.normal(size=(100, 2)), labels=["a"])
    with pytest.raises(ShapeError, match="reference"):
        pl.pairplot(rng.normal(size=(100, 2)), reference=rng.normal(size=(100, 3)))


def test_plot_sbc_ranks(tmp_path, rng):
    L = 50
    ranks = np.stack([rng.integers(0, L + 1, 300), rng.binomial(L, 0.5, 300)], axis=1)
    path = tmp_path / "sbc.png"
    fig = pl.plot_sbc_ranks(ranks, L, labels=["uniform", "hump"], path=path)
    assert_png(path)
    assert {"rank of uniform", "rank of hump"} <= axis_labels(fig)
    with pytest.raises(ShapeError, match="ranks"):
        pl.plot_sbc_ranks(ranks + L, L)


def test_plot_coverage_single_and_overlay(tmp_path, rng):
    calibrated = dg.coverage_curve(rng.uniform(size=400), method="hpd")
    narrow = dg.coverage_curve(rng.uniform(size=400) ** 0.3, method="tarp")
    assert_png(pl.save_figure(pl.plot_coverage(calibrated), tmp_path / "cov1.png"))
    path = tmp_path / "cov2.png"
    fig = pl.plot_coverage({"calibrated": calibrated, "over-confident": narrow}, path=path)
    assert_png(path)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("calibrated") for t in legend)
    assert any(t.startswith("over-confident") for t in legend)


def test_plot_predictive(tmp_path):
    samples = np.random.default_rng(1).normal(size=(300, 2))
    check = dg.posterior_predictive(
        jax.random.key(0),
        lambda k, t: t + 0.1 * jax.random.normal(k, t.shape),
        samples,
        np.array([0.1, -0.2]),
    )
    path = tmp_path / "ppc.png"
    fig = pl.plot_predictive(check, np.array([0.1, -0.2]), labels=["rate", "phase"], path=path)
    assert_png(path)
    assert {"rate", "phase"} <= axis_labels(fig)


def test_roc_auc_values():
    y = np.array([0, 0, 1, 1])
    assert pl._roc(y, np.array([0.1, 0.2, 0.8, 0.9]), np.ones(4))[2] == pytest.approx(1.0)
    assert pl._roc(y, np.array([0.9, 0.8, 0.2, 0.1]), np.ones(4))[2] == pytest.approx(0.0)
    assert pl._roc(y, np.full(4, 0.5), np.ones(4))[2] == pytest.approx(0.5)  # all tied
    # Weights: a weighted event counts as that many events.
    y3, s3 = np.array([0, 1, 0]), np.array([0.1, 0.5, 0.9])
    w_auc = pl._roc(y3, s3, np.array([1.0, 1.0, 3.0]))[2]
    rep_auc = pl._roc(np.array([0, 1, 0, 0, 0]), np.array([0.1, 0.5, 0.9, 0.9, 0.9]), np.ones(5))[2]
    assert w_auc == pytest.approx(rep_auc) == pytest.approx(0.25)


def test_plot_roc(tmp_path, rng):
    y = rng.integers(0, 2, 500)
    good = y + rng.normal(scale=0.5, size=500)
    path = tmp_path / "roc.png"
    fig = pl.plot_roc(
        {"good": (y, good), "random": (y, rng.normal(size=500), np.ones(500))}, path=path
    )
    assert_png(path)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0].startswith("good (AUC 0.9")
    with pytest.raises(ShapeError, match="signal and background"):
        pl.plot_roc({"bad": (np.ones(5), np.arange(5.0))})


def test_plot_heatmap(tmp_path):
    m = np.array([[1.2, 0.8, np.nan], [0.9, 1.5, 1.1]])
    path = tmp_path / "heat.png"
    fig = pl.plot_heatmap(
        m,
        ["train ν-", "train ν+"],
        ["test ν-", "test ν0", "test ν+"],
        "Z_Asimov",
        colorbar_label="Z",
        path=path,
    )
    assert_png(path)
    ax = fig.axes[0]
    assert ax.get_title() == "Z_Asimov"
    assert [t.get_text() for t in ax.texts] == ["1.20", "0.80", "0.90", "1.50", "1.10"]
    with pytest.raises(ShapeError, match="row_labels"):
        pl.plot_heatmap(m, ["a"], ["x", "y", "z"], "t")


def test_plot_heatmap_by_column_marks_each_columns_best(tmp_path):
    # rows are methods, columns test settings; column 2 has no finite value
    m = np.array([[3.0, 1.0, np.nan, 2.0], [2.5, 1.2, np.nan, 2.0], [2.0, 0.5, np.nan, 1.0]])
    fig = pl.plot_heatmap(m, ["a", "b", "c"], ["w", "x", "y", "[s]"], "Z", by_column=True,
                          best="max", split=3, path=tmp_path / "h.png")
    assert_png(tmp_path / "h.png")
    ax = fig.axes[0]
    shown = np.ma.filled(ax.images[0].get_array(), np.nan)
    expected = m - np.array([3.0, 1.2, np.nan, 2.0])
    np.testing.assert_allclose(shown, expected)
    assert ax.images[0].norm.vmax == 0.0 and ax.images[0].norm.vmin == -1.0
    # the annotations stay the values; the best cells (both of a tie) are outlined
    assert [t.get_text() for t in ax.texts][:4] == ["3.00", "1.00", "2.00", "2.50"]
    boxes = sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches)
    assert boxes == [(0, 0), (1, 1), (3, 0), (3, 1)]
    assert [line.get_xdata()[0] for line in ax.lines] == [2.5]
    # "min": the smallest value is the best and sits at the bright end
    fig = pl.plot_heatmap(m[:, :2], ["a", "b", "c"], ["w", "x"], "loss", by_column=True,
                          best="min")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), m[:, :2] - [2.0, 0.5])
    assert sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches) == [(0, 2), (1, 2)]
    with pytest.raises(ConfigError, match="best: expected 'max', 'min'"):
        pl.plot_heatmap(m, ["a", "b", "c"], list("wxyz"), "t", best="largest")
    with pytest.raises(ConfigError, match="by_column: needs best"):
        pl.plot_heatmap(m, ["a", "b", "c"], list("wxyz"), "t", by_column=True)
    with pytest.raises(ConfigError, match=r"split: expected a column index in 1\.\.3, got 4"):
        pl.plot_heatmap(m, ["a", "b", "c"], list("wxyz"), "t", split=4)


def test_plot_significance_and_training_curves(tmp_path):
    t = np.linspace(0, 1, 21)
    z = {"BCE": 2.0 - 4 * (t - 0.6) ** 2, "robust": np.where(t > 0.9, np.nan, 1.5 - (t - 0.3) ** 2)}
    path = tmp_path / "sig.png"
    fig = pl.plot_significance(t, z, path=path)
    assert_png(path)
    legend = [x.get_text() for x in fig.axes[0].get_legend().get_texts()]
    assert legend[0] == "BCE (max 2.00 at 0.6)" and legend[1].startswith("robust (max 1.50 at 0.3)")
    path = tmp_path / "loss.png"
    pl.plot_training_curves(
        {"train": np.exp(-t), "validation": np.exp(-t) + 0.1}, log_y=True, path=path
    )
    assert_png(path)
    with pytest.raises(ShapeError, match="BCE"):
        pl.plot_significance(t, {"BCE": z["BCE"][:5]})


def test_save_figure_replaces_atomically(tmp_path):
    fig = pl.plot_heatmap(np.eye(2), ["a", "b"], ["c", "d"], "first")
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")
    pl.save_figure(fig, path)
    assert_png(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    # An unknown suffix falls back to PNG; a failing write leaves nothing behind.
    assert pl.save_figure(fig, tmp_path / "fig.data").read_bytes()[:8] == PNG_MAGIC

    class Broken(Figure):
        def savefig(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        pl.save_figure(Broken(), tmp_path / "broken.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.data", "fig.png"]
