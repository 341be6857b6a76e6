"""Figures for the pyloric circuit: voltage traces with bursts, features vs observation.

House style of :mod:`sbi_engine.plotting`: each function builds a fresh figure on the
Agg canvas (no ``pyplot``), returns it and, given ``path``, also writes it atomically
with :func:`sbi_engine.plotting.save_figure`.

- :func:`plot_traces` — the AB/PD, LP and PY voltage traces on a shared time axis,
  each cell's detected bursts shaded (first to last spike, as the features define them:
  Savitzky–Golay smoothing, spikes = maxima above −10 mV, bursts split at ISI ≥ 150 ms,
  bursts ≤ 40 ms dropped; :func:`.features.bursts_from_trace`).
- :func:`plot_feature_table` — one row per summary feature: its relative (or
  standardised) difference from the experimental observation, next to a table of the
  observed and simulated values with units; undefined (NaN) features are marked.

Burst detection needs the full time resolution: spikes last ~1–2 ms and the smoothing
window is 0.5 ms, so a trace down-sampled to 1 ms (``simulate_traces`` default) is fine
to *draw* but not to detect bursts on. :func:`plot_traces` therefore detects bursts only
on traces sampled at ≥ 8 kHz (``dt_ms ≤ 0.125``; simulations: 0.025 ms) and, given a
θ, simulates at full resolution and only thins the drawn line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sbi_engine.errors import ShapeError
from sbi_engine.plotting import PathLike, _figure, _finish
from simulators.pyloric.features import (
    FEATURE_NAMES,
    FEATURE_UNITS,
    MIN_BURST_MS,
    SPIKE_THRESHOLD,
    Bursts,
    bursts_from_trace,
)
from simulators.pyloric.model import DT

__all__ = ["CELL_LABELS", "burst_intervals", "feature_label", "plot_feature_table",
           "plot_traces"]

CELL_LABELS = ("AB/PD", "LP", "PY")
CELL_COLORS = ("C0", "C1", "C2")
OBS_COLOR = "black"
NAN_COLOR = "0.55"
MAX_DETECT_DT_MS = 0.125  # ≥ 8 kHz, as recording.MIN_SAMPLING_RATE_HZ
_MAX_DRAWN = 6000  # samples drawn per trace (min/max envelope beyond this)

_PRETTY = {
    "cycle_period": "cycle period",
    "start_phase_LP": "start phase LP",
    "start_phase_PY": "start phase PY",
    "start_to_start_ABPD_LP": "start→start AB/PD→LP",
    "start_to_start_LP_PY": "start→start LP→PY",
    "end_to_start_ABPD_LP": "end→start AB/PD→LP",
    "end_to_start_LP_PY": "end→start LP→PY",
    "phase_gap_ABPD_LP": "phase gap AB/PD→LP",
    "phase_gap_LP_PY": "phase gap LP→PY",
    "pyloric_like": "pyloric-like (0/1)",
}


def feature_label(name: str) -> str:
    """Readable label of a feature name, e.g. ``duty_cycle_ABPD`` → ``duty cycle AB/PD``."""
    if name in _PRETTY:
        return _PRETTY[name]
    for prefix in ("burst_duration", "duty_cycle", "plateau_duration", "num_bursts",
                   "num_spikes"):
        if name.startswith(prefix + "_"):
            cell = name[len(prefix) + 1:].replace("ABPD", "AB/PD")
            words = prefix.replace("num_", "").replace("_", " ")
            return f"{words} {cell}" if not prefix.startswith("num_") else f"# {words} {cell}"
    return name


# ------------------------------------------------------------------------------------
# Voltage traces
# ------------------------------------------------------------------------------------


def burst_intervals(bursts: Bursts, dt_ms: float) -> list[np.ndarray]:
    """Per cell ``(k, 2)`` arrays of burst ``[start, end]`` times in ms.

    ``bursts`` holds sample indices at step ``dt_ms`` (for the numpy path, the trace's
    step; for :func:`.simulator.simulate_bursts`, :data:`~.model.DT`). Times follow the
    features' definition (spike time = index × dt, index as in
    :func:`.features.bursts_from_trace`), so ``end - start`` averages to the
    ``burst_duration_*`` features.
    """
    starts, ends = np.asarray(bursts.starts), np.asarray(bursts.ends)
    n_b = np.asarray(bursts.n_bursts).reshape(-1)
    if starts.ndim != 2 or starts.shape[0] != 3 or ends.shape != starts.shape or n_b.shape != (3,):
        raise ShapeError(f"bursts: expected one circuit's Bursts (starts/ends (3, B), "
                         f"n_bursts (3,)), got starts {starts.shape}, n_bursts {n_b.shape}")
    return [np.stack([starts[c, :n_b[c]], ends[c, :n_b[c]]], axis=1).astype(np.float64)
            * float(dt_ms) for c in range(3)]


def _as_intervals(bursts: Any, dt_ms: float) -> list[np.ndarray]:
    if isinstance(bursts, Bursts):
        return burst_intervals(bursts, dt_ms)
    if isinstance(bursts, (str, bytes)) or len(bursts) != 3:
        raise ShapeError("bursts: expected a Bursts tuple or three (k, 2) arrays of "
                         "[start, end] times in ms (AB/PD, LP, PY)")
    out = []
    for c, iv in enumerate(bursts):
        iv = np.asarray(iv, dtype=np.float64).reshape(-1, 2) if np.size(iv) else np.zeros((0, 2))
        if not np.isfinite(iv).all() or np.any(iv[:, 1] < iv[:, 0]):
            raise ShapeError(f"bursts[{c}] ({CELL_LABELS[c]}): expected finite [start, end] "
                             f"times in ms with end >= start")
        out.append(iv)
    return out


def _envelope(t: np.ndarray, v: np.ndarray, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Thin a trace for drawing, keeping every spike: min and max of each of ``n_max / 2``
    bins (in time order within the bin)."""
    n = v.shape[0]
    if n <= n_max:
        return t, v
    n_bins = n_max // 2
    size = -(-n // n_bins)
    pad = n_bins * size - n
    vv = np.concatenate([v, np.full(pad, v[-1])]).reshape(n_bins, size)
    tt = np.concatenate([t, np.full(pad, t[-1])]).reshape(n_bins, size)
    i_min, i_max = vv.argmin(axis=1), vv.argmax(axis=1)
    first = np.minimum(i_min, i_max)
    second = np.maximum(i_min, i_max)
    rows = np.arange(n_bins)
    idx = np.stack([first, second], axis=1)
    return (tt[rows[:, None], idx].reshape(-1), vv[rows[:, None], idx].reshape(-1))


def _simulate(theta: np.ndarray, key: Any, noise_std: float, t_max: float, t_burn: float,
              temperature: float) -> np.ndarray:
    from simulators.pyloric.simulator import simulate_traces

    if key is None:
        raise ShapeError("key: a jax.random key is needed to simulate traces from theta "
                         "(shape (31,)); or pass traces (3, T) with dt_ms")
    try:
        return simulate_traces(key, theta, temperature, noise_std=noise_std, t_max=t_max,
                               t_burn=t_burn, downsample=1)
    except ValueError as err:
        raise ShapeError(str(err)) from None


def plot_traces(
    data: Any,
    dt_ms: float | None = None,
    *,
    key: jax.Array | None = None,
    bursts: Any = None,
    bursts_dt_ms: float | None = None,
    noise_std: float = 0.001,
    t_max: float = 11000.0,
    t_burn: float = 1000.0,
    temperature: float = 283.0,
    time_unit: str = "auto",
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """The three cells' voltage traces, stacked on one time axis, bursts shaded.

    Either traces or a circuit:

    - ``data (3, T)`` voltages [mV] (rows AB/PD, LP, PY) sampled every ``dt_ms``;
    - ``data (31,)`` a circuit θ and ``key``: simulated with
      :func:`.simulator.simulate_traces` (``noise_std``, ``t_max``, ``t_burn``,
      ``temperature``) at full resolution (``dt_ms`` = 0.025, must be ``None`` or that).
      The same key gives the run whose features are ``simulate_one(key, θ)``.

    Bursts (``bursts``): ``None`` detects them on the traces with
    :func:`.features.bursts_from_trace` — the feature definitions; this needs
    ``dt_ms ≤ 0.125`` (≥ 8 kHz), otherwise a :class:`ShapeError` says what to pass.
    ``False`` draws no bursts. A :class:`~.features.Bursts` (sample indices at step
    ``bursts_dt_ms``, default ``dt_ms``; e.g. from ``simulate_bursts``: ``DT``) or three
    ``(k, 2)`` arrays of ``[start, end]`` times in ms are drawn as given.

    Args:
        data: ``(3, T)`` voltages [mV] or ``(31,)`` circuit parameters.
        dt_ms: Sampling step of ``data`` [ms]; required for traces.
        key: ``jax.random`` key, required for θ.
        bursts: ``None`` (detect), ``False`` (none), ``Bursts`` or three ``(k, 2)`` arrays.
        bursts_dt_ms: Step of a ``Bursts``' sample indices [ms] (default ``dt_ms``).
        noise_std, t_max, t_burn, temperature: Simulation options for θ (ms, K).
        time_unit: ``"ms"``, ``"s"`` or ``"auto"`` (s for traces longer than 2 s).
        title: Figure title (default: duration, resolution and bursts per cell).
        path: If given, the figure is also saved there.

    Returns:
        The figure (three axes, AB/PD on top); each shaded burst is a
        :class:`~matplotlib.patches.Rectangle` with ``gid="burst"``, spanning
        ``[start, end]`` in the axis' time unit.
    """
    arr = np.asarray(data, dtype=np.float64)
    if arr.shape == (31,):
        if dt_ms is not None and not np.isclose(float(dt_ms), DT):
            raise ShapeError(f"dt_ms: simulated traces are sampled at {DT} ms, got {dt_ms}")
        if not np.isfinite(arr).all():
            raise ShapeError("theta: contains NaN or inf")
        v = _simulate(arr, key, noise_std, t_max, t_burn, temperature).astype(np.float64)
        dt_ms = DT
        source = f"simulated, noise_std={noise_std:g}, first {t_burn:g} ms discarded"
    elif arr.ndim == 2 and arr.shape[0] == 3:
        if dt_ms is None:
            raise ShapeError("dt_ms: the sampling step [ms] of the traces is required "
                             "(simulations: 0.025)")
        source = None
        v = arr
    else:
        raise ShapeError(f"data: expected voltage traces of shape (3, T) (AB/PD, LP, PY) "
                         f"or a circuit theta of shape (31,), got shape {arr.shape}")
    dt_ms = float(dt_ms)
    if not (np.isfinite(dt_ms) and dt_ms > 0):
        raise ShapeError(f"dt_ms: expected a positive step in ms, got {dt_ms}")
    if v.shape[1] < 2:
        raise ShapeError(f"data: expected at least 2 samples per trace, got {v.shape[1]}")
    if not np.isfinite(v).all():
        raise ShapeError("data: voltage traces contain NaN or inf")

    if bursts is None:
        if dt_ms > MAX_DETECT_DT_MS:
            raise ShapeError(
                f"dt_ms: bursts are detected on traces sampled every <= {MAX_DETECT_DT_MS} ms "
                f"(spikes last ~1 ms; the features smooth over 0.5 ms), got {dt_ms} ms. Pass "
                f"full-resolution traces (simulate_traces(..., downsample=1)), theta + key, "
                f"bursts=<Bursts or (k, 2) arrays in ms>, or bursts=False")
        try:
            intervals = burst_intervals(bursts_from_trace(v, dt_ms), dt_ms)
        except ValueError as err:
            raise ShapeError(str(err)) from None
    elif bursts is False:
        intervals = None
    else:
        intervals = _as_intervals(bursts, dt_ms if bursts_dt_ms is None else bursts_dt_ms)

    n = v.shape[1]
    duration = n * dt_ms
    if time_unit not in ("auto", "ms", "s"):
        raise ShapeError(f"time_unit: expected 'auto', 'ms' or 's', got {time_unit!r}")
    unit = ("s" if duration > 2000.0 else "ms") if time_unit == "auto" else time_unit
    scale = 1e-3 if unit == "s" else 1.0
    t = np.arange(n) * dt_ms * scale

    fig = _figure(11.0, 6.2)
    axes = fig.subplots(3, 1, sharex=True)
    lo = min(float(v.min()), -75.0)
    hi = max(float(v.max()), 30.0)
    pad = 0.04 * (hi - lo)
    for c, ax in enumerate(axes):
        tc, vc = _envelope(t, v[c], _MAX_DRAWN)
        ax.plot(tc, vc, color=CELL_COLORS[c], linewidth=0.6)
        ax.axhline(SPIKE_THRESHOLD, color="0.6", linewidth=0.6, linestyle=":")
        if intervals is not None:
            iv = intervals[c]
            for s, e in iv:
                ax.add_patch(Rectangle((s * scale, 0.0), (e - s) * scale, 1.0,
                                       transform=ax.get_xaxis_transform(), facecolor=CELL_COLORS[c],
                                       alpha=0.18, edgecolor="none", zorder=0, gid="burst"))
            note = (f"{len(iv)} bursts, mean {np.mean(iv[:, 1] - iv[:, 0]):.0f} ms"
                    if len(iv) else "no bursts")
            ax.set_title(note, loc="right", fontsize="small", pad=2)
        ax.set_ylabel(f"{CELL_LABELS[c]}\nV [mV]")
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlim(t[0], t[-1])
    axes[-1].set_xlabel(("time after the burn-in" if source else "time") + f" [{unit}]")
    if title is None:
        title = f"Pyloric circuit: {duration / 1000:g} s sampled every {dt_ms:g} ms"
        if source:
            title += f" ({source})"
        if intervals is not None:
            title += (f"; shaded: bursts (first to last spike > {SPIKE_THRESHOLD:g} mV, "
                      f"> {MIN_BURST_MS:g} ms)")
    fig.suptitle(title, fontsize="medium")
    return _finish(fig, path)


# ------------------------------------------------------------------------------------
# Features vs observation
# ------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "NaN"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def plot_feature_table(
    features: Any,
    observation: Any,
    *,
    names: Sequence[str] | None = None,
    units: Sequence[str] | None = None,
    scale: Any = None,
    quantiles: tuple[float, float] = (0.05, 0.95),
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Simulated summary features against the observation, one row per feature.

    Left: the difference from the observation, relative (``(x − x_o) / |x_o|`` in %) or,
    given ``scale (F,)`` (e.g. the prior-predictive standard deviations),
    standardised (``(x − x_o) / scale``). For one simulation a dot per feature; for
    ``n`` simulations (e.g. a posterior predictive) the median and the ``quantiles``
    interval over the finite values. Differences beyond the axis are drawn as
    arrows at its edge. Right: a table of the observed and simulated values with units
    (for ``n`` simulations the median and interval, and the fraction that is NaN).
    Undefined features — NaN in a simulation — are marked with a grey "NaN" row.

    Args:
        features: ``(F,)`` one simulation's features or ``(n, F)`` several.
        observation: ``(F,)`` observed features (NaN allowed: row marked "no obs.").
        names: ``F`` feature names (default: the first ``F`` of :data:`FEATURE_NAMES`);
            known names get readable labels and units.
        units: ``F`` unit strings (default: from the names; ``""`` for unknown ones).
        scale: ``(F,)`` positive scales for standardised differences, optional.
        quantiles: Interval drawn for ``n > 1`` simulations.
        title: Figure title.
        path: If given, the figure is also saved there.

    Returns:
        The figure: ``axes[0]`` the difference chart (row ``i`` at ``y = i`` from the
        top), ``axes[1]`` the table.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ShapeError(f"features: expected shape (F,) or (n, F), got "
                         f"{np.shape(features)}")
    n, f = x.shape
    x_o = np.asarray(observation, dtype=np.float64)
    if x_o.shape != (f,):
        raise ShapeError(f"observation: expected shape ({f},) to match features (…, {f}), "
                         f"got {x_o.shape}")
    if names is None:
        if f > len(FEATURE_NAMES):
            raise ShapeError(f"names: {f} features but only {len(FEATURE_NAMES)} known "
                             f"names; pass names=")
        names = FEATURE_NAMES[:f]
    names = [str(s) for s in names]
    if len(names) != f:
        raise ShapeError(f"names: expected {f} names, got {len(names)}")
    if units is None:
        known = dict(zip(FEATURE_NAMES, FEATURE_UNITS))
        units = [known.get(s, "") for s in names]
    units = [str(u) for u in units]
    if len(units) != f:
        raise ShapeError(f"units: expected {f} units, got {len(units)}")
    if np.isinf(x).any() or np.isinf(x_o).any():
        raise ShapeError("features, observation: contain inf (NaN marks undefined features)")
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float64)
        if scale.shape != (f,) or not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ShapeError(f"scale: expected {f} positive finite values, got "
                             f"shape {scale.shape}")
        denom = scale
        xlabel = "(simulated − observed) / scale"
    else:
        denom = np.where(x_o != 0, np.abs(x_o), np.nan)
        xlabel = "(simulated − observed) / |observed|  [%]"
    q_lo, q_hi = quantiles
    if not 0 <= q_lo < q_hi <= 1:
        raise ShapeError(f"quantiles: expected 0 <= lo < hi <= 1, got {quantiles}")

    d = (x - x_o) / denom * (100.0 if scale is None else 1.0)  # (n, F)
    nan_frac = np.isnan(x).mean(axis=0)
    finite = ~np.isnan(d)
    med = np.full(f, np.nan)
    lo = np.full(f, np.nan)
    hi = np.full(f, np.nan)
    x_med = np.full(f, np.nan)
    x_lo = np.full(f, np.nan)
    x_hi = np.full(f, np.nan)
    for k in range(f):
        if finite[:, k].any():
            med[k], lo[k], hi[k] = np.quantile(d[finite[:, k], k], [0.5, q_lo, q_hi])
        xs = x[~np.isnan(x[:, k]), k]
        if xs.size:
            x_med[k], x_lo[k], x_hi[k] = np.quantile(xs, [0.5, q_lo, q_hi])

    shown = np.concatenate([lo[np.isfinite(lo)], hi[np.isfinite(hi)], med[np.isfinite(med)]])
    span = float(np.max(np.abs(shown))) * 1.15 if shown.size else 1.0
    floor, cap = (10.0, 200.0) if scale is None else (1.0, 10.0)
    span = min(max(span, floor), cap)

    fig = _figure(11.0, 0.36 * f + 1.7)
    ax, tab = fig.subplots(1, 2, sharey=True, width_ratios=[1.25, 1.0])
    y = np.arange(f)
    ax.axvline(0.0, color=OBS_COLOR, linewidth=1.0)
    for k in range(f):
        if k % 2 == 0:
            for a in (ax, tab):
                a.axhspan(k - 0.5, k + 0.5, color="0.95", zorder=0)
        label_nan = np.isnan(x_o[k]) or nan_frac[k] == 1.0 or np.isnan(denom[k])
        if label_nan:
            why = ("no observation" if np.isnan(x_o[k]) else
                   "NaN (undefined)" if nan_frac[k] == 1.0 else "observed 0")
            ax.axhspan(k - 0.5, k + 0.5, facecolor="none", edgecolor=NAN_COLOR,
                       hatch="///", linewidth=0, zorder=0.5)
            ax.text(0.0, k, why, ha="center", va="center", color=NAN_COLOR,
                    fontsize="small", fontweight="bold", gid="nan",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
            continue
        if n > 1:
            ax.plot([max(lo[k], -span), min(hi[k], span)], [k, k], color="C0", linewidth=2.5,
                    alpha=0.5, solid_capstyle="butt")
            for end, marker in ((lo[k] < -span, "<"), (hi[k] > span, ">")):
                if end:  # interval runs off the axis
                    ax.plot([span * (0.985 if marker == ">" else -0.985)], [k], marker,
                            color="C0", alpha=0.5, markersize=6)
        m = med[k]
        if abs(m) <= span:
            ax.plot([m], [k], "o", color="C0", markersize=6)
        else:
            ax.plot([np.sign(m) * span * 0.97], [k], ">" if m > 0 else "<", color="C3",
                    markersize=8)
            ax.text(np.sign(m) * span * 0.95, k - 0.22, ("median " if n > 1 else "") + f"{m:+.0f}",
                    ha="right" if m > 0 else "left", va="bottom", fontsize="x-small",
                    color="C3")
    ax.set_xlim(-span, span)
    ax.set_ylim(f - 0.5, -0.5)
    ax.set_yticks(y, [feature_label(s) + (f" [{u}]" if u else "") for s, u in zip(names, units)])
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", color="0.85", linewidth=0.6)

    # table
    tab.set_xlim(0, 1)
    tab.set_xticks([])
    tab.tick_params(left=False)
    for side in ("top", "right", "bottom", "left"):
        tab.spines[side].set_visible(False)
    cols = (0.02, 0.35) if n == 1 else (0.02, 0.24, 0.82)
    heads = (("observed", "simulated") if n == 1
             else ("observed", f"simulated median [{q_lo:.0%}, {q_hi:.0%}]", "NaN"))
    for cx, h in zip(cols, heads):
        tab.text(cx, -0.75, h, ha="left", va="bottom", fontweight="bold", fontsize="small")
    for k in range(f):
        tab.text(cols[0], k, _fmt(x_o[k]), ha="left", va="center", fontsize="small")
        if n == 1:
            sim = _fmt(x[0, k])
        else:
            sim = (f"{_fmt(x_med[k])}  [{_fmt(x_lo[k])}, {_fmt(x_hi[k])}]"
                   if np.isfinite(x_med[k]) else "NaN")
        col = NAN_COLOR if sim == "NaN" else "black"
        tab.text(cols[1], k, sim, ha="left", va="center", fontsize="small", color=col)
        if n > 1:
            tab.text(cols[2], k, f"{nan_frac[k]:.0%}", ha="left", va="center",
                     fontsize="small", color=NAN_COLOR if nan_frac[k] > 0 else "black")
    if title is None:
        what = "one simulation" if n == 1 else f"{n} simulations"
        n_def = int(np.sum(np.isfinite(x).all(axis=1)))
        title = (f"Summary features vs observation ({what}; all features defined in "
                 f"{n_def}/{n})")
        if n > 1:
            title += f"\ndot: median, bar: {q_lo:.0%}–{q_hi:.0%} interval of the defined values"
    fig.suptitle(title, fontsize="medium")
    return _finish(fig, path)
