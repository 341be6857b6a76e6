"""Figures for posteriors, calibration diagnostics and classifiers.

Every function builds a fresh :class:`matplotlib.figure.Figure` on the Agg canvas
(without ``pyplot``: no global figure registry, no GUI backend, safe in worker
processes), returns it, and, given ``path``, also writes it atomically (a temporary
file in the same directory, then ``os.replace``) via :func:`save_figure`.

- :func:`pairplot` — corner plot of posterior samples: 1-D marginals on the diagonal,
  2-D marginals (points and 68 % / 95 % highest-density contours of a smoothed
  histogram) below it, the true θ marked, an optional reference sample overlaid.
- :func:`plot_sbc_ranks` — SBC rank histograms (Talts et al. 2018) with the band in
  which a uniform histogram's bin counts fall with the given probability
  (per-bin binomial quantiles).
- :func:`plot_coverage` — expected coverage / TARP curves against the diagonal, with
  the binomial band of a calibrated estimator (Lemos et al. 2023, Fig. 2).
- :func:`plot_predictive` — posterior predictive histograms with the observation.
- :func:`plot_roc` — ROC curves with their AUC (optionally weighted events).
- :func:`plot_heatmap` — annotated matrix, e.g. a train-on-one/test-on-other
  systematics matrix.
- :func:`plot_significance` — significance (AMS, Asimov Z) against the selection
  threshold, best threshold marked; :func:`plot_training_curves` — loss per epoch.
- :func:`plot_learning_curve` — a metric against the training budget on log-log axes
  with a fitted power law and its extrapolation.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import NullFormatter
from scipy import ndimage, stats

from sbi_engine.diagnostics import CoverageResult, PredictiveCheck
from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.store import FILE_MODE

__all__ = [
    "pairplot",
    "plot_coverage",
    "plot_heatmap",
    "plot_learning_curve",
    "plot_predictive",
    "plot_roc",
    "plot_sbc_ranks",
    "plot_significance",
    "plot_training_curves",
    "save_figure",
]

PathLike = str | os.PathLike
SAMPLE_COLOR = "C0"
REFERENCE_COLOR = "C1"
TRUTH_COLOR = "black"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: PathLike, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically (temp file in the same directory, then rename).

    Args:
        fig: The figure.
        path: Destination; the format follows the suffix (``.png`` if none or unknown
            to matplotlib). Parent directories are created.
        dpi: Resolution of raster formats.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix[1:].lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        fmt = "png"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _finish(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _samples(value: Any, name: str, dim: int | None = None) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 1 and dim in (None, 1):
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0 or (dim is not None and arr.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, D)"
        raise ShapeError(f"{name}: expected shape {want}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ShapeError(f"{name}: contains NaN or inf")
    return arr


def _labels(labels: Sequence[str] | None, n: int, name: str, default: str) -> list[str]:
    if labels is None:
        return [f"{default}{i + 1}" for i in range(n)]
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ShapeError(f"{name}: expected {n} labels, got {len(labels)}")
    return labels


# ------------------------------------------------------------------------------------
# Pair plot
# ------------------------------------------------------------------------------------


def _limits(arrays: list[np.ndarray], truth: np.ndarray | None) -> np.ndarray:
    """Per-dimension ``(D, 2)`` plot limits: 0.5-99.5 % quantiles, the truth, 5 % margin."""
    stacked = np.concatenate(arrays, axis=0)
    lo, hi = np.quantile(stacked, [0.005, 0.995], axis=0)
    if truth is not None:
        lo, hi = np.minimum(lo, truth), np.maximum(hi, truth)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(lo), 1.0))
    return np.stack([lo - 0.05 * span, hi + 0.05 * span], axis=1)


def _hpd_contour(
    ax: Any,
    x: np.ndarray,
    y: np.ndarray,
    lim_x: Any,
    lim_y: Any,
    bins: int,
    color: str,
    masses: Sequence[float] = (0.68, 0.95),
) -> None:
    """Contours enclosing ``masses`` of a Gaussian-smoothed 2-D histogram."""
    hist, xe, ye = np.histogram2d(x, y, bins=bins, range=[lim_x, lim_y])
    hist = ndimage.gaussian_filter(hist, sigma=1.0)
    flat = np.sort(hist.ravel())[::-1]
    if flat.sum() <= 0:
        return
    cum = np.cumsum(flat) / flat.sum()
    levels = sorted({float(flat[min(np.searchsorted(cum, m), flat.size - 1)]) for m in masses})
    levels = [lv for lv in levels if lv > 0]
    if not levels:
        return
    xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
    ax.contour(xc, yc, hist.T, levels=levels, colors=color, linewidths=1.2)


def pairplot(
    samples: Any,
    *,
    truth: Any = None,
    labels: Sequence[str] | None = None,
    reference: Any = None,
    limits: Any = None,
    bins: int = 40,
    max_points: int = 2000,
    sample_label: str = "posterior",
    reference_label: str = "reference",
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Corner plot of posterior samples.

    Diagonal: 1-D histograms. Below the diagonal: up to ``max_points`` sample points
    and the 68 % / 95 % highest-density contours; ``reference`` samples (e.g. a
    reference posterior) are drawn as contours and step histograms in a second
    colour. The true parameter is marked by lines and a star.

    Args:
        samples: ``(n, D)`` posterior samples.
        truth: ``(D,)`` true parameter, optional.
        labels: ``D`` parameter names (default ``θ1, θ2, ...``).
        reference: ``(m, D)`` samples to overlay, optional.
        limits: ``(D, 2)`` axis limits; default from the sample quantiles.
        bins: Histogram bins per axis.
        max_points: Sample points drawn per panel (a deterministic subset).
        sample_label: Legend entry of ``samples``.
        reference_label: Legend entry of ``reference``.
        title: Figure title.
        path: If given, the figure is also saved there.

    Returns:
        The figure.
    """
    samples = _samples(samples, "samples")
    D = samples.shape[1]
    names = _labels(labels, D, "labels", "θ")
    ref = None if reference is None else _samples(reference, "reference", D)
    t = None
    if truth is not None:
        t = np.asarray(truth, dtype=np.float64).reshape(-1)
        if t.shape != (D,) or not np.isfinite(t).all():
            raise ShapeError(f"truth: expected {D} finite values, got shape {np.shape(truth)}")
    if limits is None:
        lims = _limits([samples] + ([ref] if ref is not None else []), t)
    else:
        lims = np.asarray(limits, dtype=np.float64)
        if lims.shape != (D, 2):
            raise ShapeError(f"limits: expected shape ({D}, 2), got {lims.shape}")
    step = max(1, samples.shape[0] // max_points)
    pts = samples[::step][:max_points]

    size = min(2.4, 18.0 / D)
    fig = _figure(size * D + 0.4, size * D + (0.4 if title else 0.0))
    axes = fig.subplots(D, D, squeeze=False)
    for i in range(D):
        for j in range(D):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            if i == j:
                edges = np.linspace(*lims[i], bins + 1)
                ax.hist(samples[:, i], bins=edges, density=True, color=SAMPLE_COLOR, alpha=0.35)
                ax.hist(
                    samples[:, i],
                    bins=edges,
                    density=True,
                    color=SAMPLE_COLOR,
                    histtype="step",
                    linewidth=1.2,
                )
                if ref is not None:
                    ax.hist(
                        ref[:, i],
                        bins=edges,
                        density=True,
                        color=REFERENCE_COLOR,
                        histtype="step",
                        linewidth=1.5,
                    )
                if t is not None:
                    ax.axvline(t[i], color=TRUTH_COLOR, linewidth=1.2)
                ax.set_yticks([])
                ax.set_xlim(lims[i])
            else:
                ax.scatter(
                    pts[:, j],
                    pts[:, i],
                    s=2,
                    color=SAMPLE_COLOR,
                    alpha=0.25,
                    linewidths=0,
                    rasterized=True,
                )
                _hpd_contour(ax, samples[:, j], samples[:, i], lims[j], lims[i], bins, SAMPLE_COLOR)
                if ref is not None:
                    _hpd_contour(ax, ref[:, j], ref[:, i], lims[j], lims[i], bins, REFERENCE_COLOR)
                if t is not None:
                    ax.axvline(t[j], color=TRUTH_COLOR, linewidth=0.8, alpha=0.7)
                    ax.axhline(t[i], color=TRUTH_COLOR, linewidth=0.8, alpha=0.7)
                    ax.plot(
                        t[j],
                        t[i],
                        marker="*",
                        color=TRUTH_COLOR,
                        markersize=10,
                        markeredgecolor="white",
                        markeredgewidth=0.5,
                    )
                ax.set_xlim(lims[j])
                ax.set_ylim(lims[i])
                if j == 0:
                    ax.set_ylabel(names[i])
                else:
                    ax.tick_params(labelleft=False)
            if i == D - 1:
                ax.set_xlabel(names[j])
            else:
                ax.tick_params(labelbottom=False)

    handles = [Patch(color=SAMPLE_COLOR, alpha=0.6, label=sample_label)]
    if ref is not None:
        handles.append(Line2D([], [], color=REFERENCE_COLOR, label=reference_label))
    if t is not None:
        handles.append(Line2D([], [], color=TRUTH_COLOR, marker="*", label="true θ"))
    if D > 1:
        axes[0, D - 1].set_visible(True)
        axes[0, D - 1].axis("off")
        axes[0, D - 1].legend(handles=handles, loc="upper right", frameon=False)
    else:
        axes[0, 0].legend(handles=handles, loc="upper right", frameon=False, fontsize="small")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


# ------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return (n + cols - 1) // cols, cols


def plot_sbc_ranks(
    ranks: Any,
    num_posterior_samples: int,
    *,
    labels: Sequence[str] | None = None,
    num_bins: int | None = None,
    band: float = 0.99,
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """SBC rank histograms with the uniform band.

    The grey band holds a bin count of a uniform rank histogram with probability
    ``band`` (binomial quantiles, Talts et al. 2018, Fig. 1); bins outside it, a U
    shape (over-confident), a hump (under-confident) or a slope (bias) flag a
    miscalibrated posterior.

    Args:
        ranks: ``(N, D)`` ranks in ``{0, ..., L}`` (:func:`sbi_engine.diagnostics.sbc_ranks`).
        num_posterior_samples: ``L``.
        labels: ``D`` parameter names.
        num_bins: Histogram bins (default as in
            :func:`sbi_engine.diagnostics.sbc_uniformity`).
        band: Probability mass of the band.
        title: Figure title.
        path: If given, the figure is also saved there.

    Returns:
        The figure.
    """
    r = _samples(ranks, "ranks")
    L = int(num_posterior_samples)
    if L < 1 or (r < 0).any() or (r > L).any():
        raise ShapeError(f"ranks: expected values in [0, {L}] for num_posterior_samples={L}")
    N, D = r.shape
    names = _labels(labels, D, "labels", "θ")
    B = int(num_bins) if num_bins is not None else int(max(2, min(20, N // 10, L + 1)))
    edges = np.floor(np.linspace(0, L + 1, B + 1))
    widths = np.diff(edges)
    lo_q, hi_q = (1 - band) / 2, 1 - (1 - band) / 2
    rows, cols = _grid(D)
    fig = _figure(3.0 * cols, 2.4 * rows + (0.3 if title else 0.0))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for k, ax in enumerate(axes):
        if k >= D:
            ax.set_visible(False)
            continue
        counts, _ = np.histogram(r[:, k], bins=edges)
        p = widths / (L + 1)
        lo, hi = stats.binom.ppf(lo_q, N, p), stats.binom.ppf(hi_q, N, p)
        ax.stairs(counts, edges, color=SAMPLE_COLOR, fill=True, alpha=0.35)
        ax.stairs(counts, edges, color=SAMPLE_COLOR, linewidth=1.2)
        ax.fill_between(
            edges,
            np.append(lo, lo[-1]),
            np.append(hi, hi[-1]),
            step="post",
            color="0.5",
            alpha=0.3,
            linewidth=0,
            zorder=3,
            label=f"{band:.0%} band of uniform ranks",
        )
        ax.stairs(N * p, edges, color="0.3", linestyle="--", linewidth=1, zorder=4)
        ax.set_xlim(0, L + 1)
        ax.set_xlabel(f"rank of {names[k]}")
        if k % cols == 0:
            ax.set_ylabel("count")
    axes[0].legend(loc="upper center", fontsize="small", frameon=False)
    fig.suptitle(title or f"SBC ranks (N={N}, L={L})")
    return _finish(fig, path)


def plot_coverage(
    results: CoverageResult | Mapping[str, CoverageResult],
    *,
    band: float = 0.95,
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Expected coverage (HPD) or TARP curves: empirical vs nominal coverage.

    Curves above the diagonal are conservative (under-confident posterior), below it
    over-confident. The grey band is the central ``band`` interval of the empirical
    coverage of a perfectly calibrated estimator with the same number of simulations
    (binomial, per level).

    Args:
        results: One :class:`~sbi_engine.diagnostics.CoverageResult` or a mapping
            ``{label: result}`` to overlay (e.g. HPD and TARP, or several models).
        band: Probability mass of the band.
        title: Figure title.
        path: If given, the figure is also saved there.

    Returns:
        The figure.
    """
    if isinstance(results, CoverageResult):
        results = {results.method.upper(): results}
    if not results:
        raise ShapeError("results: expected at least one CoverageResult")
    fig = _figure(4.4, 4.2)
    ax = fig.subplots()
    n = max(len(r.credibility) for r in results.values())
    grid = np.linspace(0, 1, 201)
    lo = stats.binom.ppf((1 - band) / 2, n, grid) / n
    hi = stats.binom.ppf(1 - (1 - band) / 2, n, grid) / n
    ax.fill_between(grid, lo, hi, color="0.85", label=f"{band:.0%} band (N={n})")
    ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1)
    for k, (name, res) in enumerate(results.items()):
        ax.plot(
            res.levels,
            res.coverage,
            color=f"C{k}",
            linewidth=1.8,
            label=f"{name} (ATC {res.atc:+.3f}, KS p={res.ks_pvalue:.2g})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("credibility level (nominal coverage)")
    ax.set_ylabel("expected coverage")
    ax.legend(loc="upper left", fontsize="small", frameon=False)
    ax.set_title(title or "Expected coverage")
    return _finish(fig, path)


def plot_predictive(
    check: PredictiveCheck,
    x_o: Any,
    *,
    labels: Sequence[str] | None = None,
    bins: int = 30,
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Posterior predictive histograms per feature, with the observation marked.

    Args:
        check: Result of :func:`sbi_engine.diagnostics.posterior_predictive`.
        x_o: ``(X,)`` the observation.
        labels: ``X`` feature names.
        bins: Histogram bins.
        title: Figure title.
        path: If given, the figure is also saved there.

    Returns:
        The figure.
    """
    x_o = np.asarray(x_o, dtype=np.float64).reshape(-1)
    x_sim = np.asarray(check.x_sim, dtype=np.float64)
    if x_sim.ndim != 2 or x_sim.shape[1] != x_o.shape[0]:
        raise ShapeError(f"x_o: expected {x_sim.shape[-1]} features, got {x_o.shape[0]}")
    n_x = x_o.shape[0]
    names = _labels(labels, n_x, "labels", "x")
    good = x_sim[np.isfinite(x_sim).all(axis=1)]
    rows, cols = _grid(n_x)
    fig = _figure(3.0 * cols, 2.3 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        if k >= n_x:
            ax.set_visible(False)
            continue
        if good.shape[0]:
            ax.hist(good[:, k], bins=bins, color=SAMPLE_COLOR, alpha=0.6)
        ax.axvline(x_o[k], color=TRUTH_COLOR, linewidth=1.5)
        ax.set_xlabel(names[k])
        ax.set_yticks([])
        ax.set_title(f"z={check.z_scores[k]:+.2f}  p={check.pvalues[k]:.2f}", fontsize="small")
    fig.suptitle(
        title
        or f"Posterior predictive (finite {check.fraction_finite:.0%}, "
        f"RMS z {check.distance:.2f}, quantile {check.distance_quantile:.2f})"
    )
    return _finish(fig, path)


# ------------------------------------------------------------------------------------
# Classifiers and matrices
# ------------------------------------------------------------------------------------


def _roc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted ROC ``(fpr, tpr, auc)``; tied scores form one step."""
    order = np.argsort(-s, kind="stable")
    y, s, w = y[order], s[order], w[order]
    tp = np.cumsum(w * y)
    fp = np.cumsum(w * (1 - y))
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tpr = np.r_[0.0, tp[last] / tp[-1]]
    fpr = np.r_[0.0, fp[last] / fp[-1]]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def plot_roc(
    curves: Mapping[str, tuple[Any, ...]],
    *,
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """ROC curves (signal efficiency vs background efficiency) with their AUC.

    Args:
        curves: ``{name: (labels (n,), scores (n,))}`` or ``{name: (labels, scores,
            weights (n,))}``; label 1 is signal, higher score means more signal-like.
        title: Figure title.
        path: If given, the figure is also saved there.

    Returns:
        The figure.
    """
    if not curves:
        raise ShapeError("curves: expected at least one (labels, scores) entry")
    fig = _figure(4.4, 4.2)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1)
    for k, (name, entry) in enumerate(curves.items()):
        if len(entry) not in (2, 3):
            raise ShapeError(f"curves[{name!r}]: expected (labels, scores[, weights])")
        y = np.asarray(entry[0], dtype=np.float64).reshape(-1)
        s = np.asarray(entry[1], dtype=np.float64).reshape(-1)
        w = np.ones_like(y) if len(entry) == 2 else np.asarray(entry[2], np.float64).reshape(-1)
        if not (y.shape == s.shape == w.shape) or not np.isin(y, (0, 1)).all():
            raise ShapeError(
                f"curves[{name!r}]: labels in {{0, 1}}, scores and weights of equal length expected"
            )
        if not np.isfinite(s).all() or not np.isfinite(w).all():
            raise ShapeError(f"curves[{name!r}]: scores or weights contain NaN or inf")
        if y.min() == y.max():
            raise ShapeError(f"curves[{name!r}]: needs both signal and background events")
        fpr, tpr, auc = _roc(y, s, w)
        ax.plot(fpr, tpr, color=f"C{k}", linewidth=1.8, label=f"{name} (AUC {auc:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("background efficiency (false-positive rate)")
    ax.set_ylabel("signal efficiency (true-positive rate)")
    ax.legend(loc="lower right", fontsize="small", frameon=False)
    ax.set_title(title or "ROC")
    return _finish(fig, path)


def plot_heatmap(
    matrix: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    *,
    cmap: str = "viridis",
    fmt: str = ".2f",
    colorbar_label: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    by_column: bool = False,
    best: str | None = None,
    split: int | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Annotated heatmap, e.g. a train-on-row / test-on-column systematics matrix.

    In a systematics matrix the test setting moves every row together, so one colour
    scale for the whole matrix mostly shows the columns. ``by_column=True`` colours each
    cell by its distance to the best cell of its column (the annotations stay the
    values), which shows which row is best on each test setting, and by how much.

    Args:
        matrix: ``(R, C)`` values (NaN cells are left blank).
        row_labels: ``R`` row names.
        col_labels: ``C`` column names.
        title: Figure title.
        cmap: Matplotlib colormap name.
        fmt: Format spec of the cell annotations (``""`` for none).
        colorbar_label: Label of the colour bar.
        xlabel: Label of the column axis.
        ylabel: Label of the row axis.
        by_column: colour by ``value - best of its column`` (needs ``best``), so the
            best cell of every column has colour 0 and the others are negative
            (``best="max"``) or positive (``"min"``).
        best: ``"max"`` or ``"min"``: outline the best cell of each column (ties: all).
        split: draw a separating line before column ``split`` (e.g. summary columns).
        path: If given, the figure is also saved there.

    Returns:
        The figure.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ShapeError(f"matrix: expected a non-empty 2-D array, got shape {m.shape}")
    if best not in (None, "max", "min"):
        raise ConfigError(f"best: expected 'max', 'min' or None, got {best!r}")
    if by_column and best is None:
        raise ConfigError("by_column: needs best='max' or 'min' (which cell is the best)")
    R, C = m.shape
    if split is not None and not (isinstance(split, int | np.integer) and 0 < split < C):
        raise ConfigError(f"split: expected a column index in 1..{C - 1}, got {split!r}")
    rows = _labels(row_labels, R, "row_labels", "")
    cols = _labels(col_labels, C, "col_labels", "")
    fig = _figure(min(1.0 + 0.8 * C, 16) + 1.2, min(0.8 + 0.6 * R, 14) + 0.5)
    ax = fig.subplots()
    finite_cols = np.isfinite(m).any(axis=0)
    col_best = np.full(C, np.nan)
    if best is not None:
        pick = np.nanmax if best == "max" else np.nanmin
        col_best[finite_cols] = pick(m[:, finite_cols], axis=0)
    shown = m - col_best if by_column else m
    finite = shown[np.isfinite(shown)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if by_column:  # 0 (the best) at the bright end of the scale
        vmin, vmax = (min(vmin, -1e-12), 0.0) if best == "max" else (0.0, max(vmax, 1e-12))
        cmap = cmap if best == "max" else f"{cmap}_r"
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    cbar = fig.colorbar(im, ax=ax)
    if colorbar_label:
        cbar.set_label(colorbar_label)
    ax.set_xticks(
        np.arange(C), labels=cols, rotation=45 if C > 4 else 0, ha="right" if C > 4 else "center"
    )
    ax.set_yticks(np.arange(R), labels=rows)
    if fmt:
        cm = im.get_cmap()
        for r in range(R):
            for c in range(C):
                if np.isfinite(m[r, c]):
                    # Dark text on bright cells, light text on dark ones.
                    bright = float(np.mean(cm(im.norm(shown[r, c]))[:3])) > 0.5
                    ax.text(
                        c,
                        r,
                        format(m[r, c], fmt),
                        ha="center",
                        va="center",
                        fontsize="small",
                        color="black" if bright else "white",
                    )
    if best is not None:
        for r, c in zip(*np.nonzero(m == col_best[None, :]), strict=True):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red",
                                   linewidth=2))
    if split is not None:
        ax.axvline(split - 0.5, color="white", linewidth=4)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _finish(fig, path)


def _curve(x: Any, y: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or x.size == 0:
        raise ShapeError(f"{name}: expected x and y of one equal length, got {x.shape}, {y.shape}")
    return x, y


def plot_significance(
    thresholds: Any,
    curves: Mapping[str, Any],
    *,
    ylabel: str = "Asimov significance Z",
    xlabel: str = "classifier threshold",
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Significance against the selection threshold, the best point of each curve marked.

    Args:
        thresholds: ``(T,)`` thresholds (shared by all curves).
        curves: ``{name: significance (T,)}``; NaN points (e.g. empty selections) are
            skipped.
        ylabel: Label of the significance axis.
        xlabel: Label of the threshold axis.
        title: Figure title.
        path: If given, the figure is also saved there.

    Returns:
        The figure.
    """
    if not curves:
        raise ShapeError("curves: expected at least one significance curve")
    fig = _figure(5.0, 3.6)
    ax = fig.subplots()
    for k, (name, z) in enumerate(curves.items()):
        t, z = _curve(thresholds, z, f"curves[{name!r}]")
        ok = np.isfinite(z)
        label = name
        if ok.any():
            best = np.flatnonzero(ok)[np.argmax(z[ok])]
            ax.plot(t[best], z[best], marker="o", color=f"C{k}")
            label = f"{name} (max {z[best]:.2f} at {t[best]:.3g})"
        ax.plot(t[ok], z[ok], color=f"C{k}", linewidth=1.8, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", frameon=False)
    ax.set_title(title or "Significance scan")
    return _finish(fig, path)


def plot_training_curves(
    curves: Mapping[str, Any],
    *,
    log_y: bool = False,
    ylabel: str = "loss",
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Training curves, e.g. ``{"train": loss (E,), "validation": loss (E,)}`` per epoch.

    Args:
        curves: ``{name: values (E,)}``; each curve is drawn against its epoch index.
        log_y: Logarithmic value axis.
        ylabel: Label of the value axis.
        title: Figure title.
        path: If given, the figure is also saved there.

    Returns:
        The figure.
    """
    if not curves:
        raise ShapeError("curves: expected at least one curve")
    fig = _figure(5.0, 3.6)
    ax = fig.subplots()
    for k, (name, values) in enumerate(curves.items()):
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        epochs, v = _curve(np.arange(1, v.size + 1), v, f"curves[{name!r}]")
        ax.plot(epochs, v, color=f"C{k}", linewidth=1.5, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", frameon=False)
    ax.set_title(title or "Training")
    return _finish(fig, path)


def plot_learning_curve(
    budgets: Any,
    mean: Any,
    std: Any = None,
    *,
    fit: Mapping[str, Any] | None = None,
    extrapolate_to: float | None = None,
    target: float | None = None,
    metric: str = "metric",
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """A metric against the training budget on log-log axes, with a power-law fit.

    With a fit ``y = floor + sign · a · n^(-alpha)`` (as
    :class:`sbi_engine.experiment.PowerLaw.to_dict`), the plotted quantity is the gap
    ``|y - floor|`` (points with error bars, the fit over the budgets as a solid line,
    its extrapolation to ``extrapolate_to`` dashed, ``target`` as a dotted line). Without
    a fit, ``y`` itself (log y axis when all values are positive).

    Args:
        budgets: ``(B,)`` training budgets.
        mean: ``(B,)`` metric means over seeds.
        std: ``(B,)`` standard deviations over seeds (error bars), optional.
        fit: ``{"a", "alpha", "floor", "sign"}`` of the power law, optional.
        extrapolate_to: extend the fitted line to this budget.
        target: a target value of the metric, drawn as its gap to the floor.
        metric: the metric's name (axis label).
        title: Figure title.
        path: If given, the figure is also saved there.

    Returns:
        The figure.
    """
    n, y = _curve(budgets, mean, "learning curve")
    s = np.zeros_like(y) if std is None else np.nan_to_num(
        np.asarray(std, np.float64).reshape(-1))
    fig = _figure(5.4, 3.8)
    ax = fig.subplots()
    ax.set_xscale("log")
    if fit is not None:
        floor, sign = float(fit["floor"]), float(fit["sign"])
        a, alpha = float(fit["a"]), float(fit["alpha"])
        gap = sign * (y - floor)
        ok = np.isfinite(gap) & (gap > 0)
        lo = np.minimum(s, np.where(ok, gap, 0.0) * 0.999)  # keep error bars above 0
        ax.errorbar(n[ok], gap[ok], yerr=[lo[ok], s[ok]], fmt="o", color="C0", capsize=3,
                    label=f"{metric} (mean ± std over seeds)")
        grid = np.geomspace(n.min(), n.max(), 50)
        ax.plot(grid, a * grid ** (-alpha), color="C1",
                label=f"fit: {a:.3g} · n^(−{alpha:.3f})")
        n_t = None  # the budget where the fit reaches the target
        if target is not None and sign * (target - floor) > 0 and a > 0 and alpha > 0:
            log_nt = -np.log(sign * (target - floor) / a) / alpha  # in logs: no overflow
            if log_nt <= np.log(10 * max(extrapolate_to or 0, n.max())):
                n_t = float(np.exp(log_nt))  # else far off the axes: no vertical line
        top = max(extrapolate_to or 0, 1.2 * n_t if n_t else 0)
        if top > n.max():
            ext = np.geomspace(n.max(), top, 30)
            ax.plot(ext, a * ext ** (-alpha), color="C1", linestyle="--", label="extrapolation")
        if target is not None and sign * (target - floor) > 0:
            gap_t = sign * (target - floor)
            ax.axhline(gap_t, color="gray", linestyle=":", label=f"target {metric} = {target:g}")
            if n_t:
                ax.axvline(n_t, color="gray", linestyle=":")
                ax.annotate(f"n ≈ {n_t:,.0f}", (n_t, gap_t), textcoords="offset points",
                            xytext=(-4, -12), ha="right", fontsize="small", color="gray")
        ax.set_yscale("log")
        ax.set_ylabel(f"|{metric} − {floor:.4g}|" if floor >= 0
                      else f"|{metric} + {-floor:.4g}|")
    else:
        ok = np.isfinite(y)
        ax.errorbar(n[ok], y[ok], yerr=s[ok], fmt="o-", color="C0", capsize=3,
                    label=f"{metric} (mean ± std over seeds)")
        if np.all(y[ok] > 0):
            ax.set_yscale("log")
        ax.set_ylabel(metric)
    ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks would collide
    ax.set_xlabel("training budget n")
    ax.legend(fontsize="small", frameon=False)
    ax.set_title(title or f"Learning curve: {metric}", fontsize="medium")
    return _finish(fig, path)
