"""Summary features of pyloric voltage traces, as defined by ``mackelab/pyloric``.

Definitions (reference ``summary_statistics.PrinzStats``; times relative to the end of
the burn-in):

1. The voltage of each cell is smoothed by a Savitzky–Golay filter, window
   ``int(0.5 ms / dt)`` made odd (21 samples at dt = 0.025 ms), polynomial order 3,
   scipy's ``mode="interp"`` edges (a cubic fitted to the first/last window).
2. A *spike* is a local maximum of the smoothed voltage ``v`` above −10 mV:
   ``v[k] > -10``, ``v[k] - v[k-1] ≥ 0``, ``v[k+1] - v[k] ≤ 0``; its time is
   ``(k - 1) dt`` (the reference indexes ``t`` with positions in ``v[1:-1]``).
3. Spikes are grouped into *bursts* at inter-spike intervals ≥ 150 ms; a burst spans
   first to last spike; bursts of duration ≤ 40 ms are dropped.
4. Cycle period: mean difference of consecutive AB/PD burst starts (≥ 2 bursts).
   Burst duration: mean over a cell's bursts; duty cycle = duration / period.
5. Each AB/PD cycle ``[start_i, start_{i+1})`` is *triphasic* if every cell starts
   exactly one burst in it; the circuit is triphasic if ≥ 90 % of its cycles are.
   Only then are start-to-start and end-to-start latencies (AB/PD→LP, LP→PY, means
   over triphasic cycles), start phases (latency from AB/PD / period) and phase gaps
   (end-to-start / period) defined. ``pyloric_like``: triphasic and in ≥ 70 % of the
   triphasic cycles LP starts and ends no later than PY and AB/PD ends before LP starts.
6. Plateau duration: for each burst, the block from its start to the next burst's start
   (the last block ends at the last spike), sub-sampled every 10 samples from the block
   start; the longest run of ``v > -30 mV`` that is *ended* within the block (a run
   still open at the block end is not counted); mean over bursts × 10 samples; values
   below 200 samples are floored to 100 samples; × dt.
7. Undefined features are NaN (e.g. a silent cell, fewer than two AB/PD bursts, a
   circuit that is not triphasic).

Two implementations share the burst → feature step (:func:`features_from_bursts`):

- the online detector (:func:`detector_consume` one sample at a time, the plain
  definition; :func:`detector_block` the equivalent block-vectorised form used by the
  simulator) runs inside the simulator's ``lax.scan`` and keeps only a fixed-size
  state: two previous samples, spike counter, open-burst bookkeeping, two plateau
  trackers and a buffer of kept bursts. No trace is stored. Because kept bursts start
  more than 190 ms apart, the buffer of ``N // 7600 + 2`` bursts (``N`` recorded
  samples) can never overflow.
- :func:`bursts_from_trace` is a plain numpy path for whole traces (user recordings,
  validation of the online path).

Decisions at exactly 150 ms / 40 ms are taken on whole sample counts
(``Δk ≥ 6000``, ``Δk > 1600``) where the reference compares float64 times.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal

__all__ = [
    "FEATURE_NAMES",
    "FEATURE_SETS",
    "Bursts",
    "DetectorState",
    "bursts_from_trace",
    "edge_matrices",
    "feature_indices",
    "features_from_bursts",
    "features_from_trace",
    "savgol_window",
]

SPIKE_THRESHOLD = -10.0  # mV
PLATEAU_THRESHOLD = -30.0  # mV
IBI_MS = 150.0  # inter-spike interval that separates bursts
MIN_BURST_MS = 40.0  # bursts of this duration or shorter are dropped
PLATEAU_STEP_MS = 0.25  # plateau sub-sampling (10 samples at dt = 0.025)
PLATEAU_MIN_MS = 5.0  # mean plateau below this (200 samples) ...
PLATEAU_FLOOR_MS = 2.5  # ... is set to this (100 samples)
TRIPHASIC_FRACTION = (9, 10)  # ≥ 90 % of cycles triphasic
PYLORIC_FRACTION = (7, 10)  # ≥ 70 % of triphasic cycles pyloric

_CELL_TAGS = ("ABPD", "LP", "PY")
FEATURE_NAMES: tuple[str, ...] = (
    "cycle_period",
    *(f"burst_duration_{c}" for c in _CELL_TAGS),
    *(f"duty_cycle_{c}" for c in _CELL_TAGS),
    "start_phase_LP", "start_phase_PY",
    "start_to_start_ABPD_LP", "start_to_start_LP_PY",
    "end_to_start_ABPD_LP", "end_to_start_LP_PY",
    "phase_gap_ABPD_LP", "phase_gap_LP_PY",
    *(f"plateau_duration_{c}" for c in _CELL_TAGS),
    *(f"num_bursts_{c}" for c in _CELL_TAGS),
    *(f"num_spikes_{c}" for c in _CELL_TAGS),
    "pyloric_like",
)
FEATURE_UNITS: tuple[str, ...] = (
    "ms", "ms", "ms", "ms", "", "", "", "", "", "ms", "ms", "ms", "ms", "", "",
    "ms", "ms", "ms", "", "", "", "", "", "", "")
FEATURE_SETS: dict[str, tuple[int, ...]] = {
    "15": tuple(range(15)),  # Gonçalves et al. 2020
    "18": tuple(range(18)),  # + plateau durations (Deistler et al. 2022)
    "full": tuple(range(len(FEATURE_NAMES))),  # + burst/spike counts, pyloric-like flag
}


def feature_indices(features: str) -> tuple[int, ...]:
    """Indices into :data:`FEATURE_NAMES` of a named feature set ("15", "18", "full")."""
    try:
        return FEATURE_SETS[str(features)]
    except KeyError:
        raise ValueError(f"features: expected one of {sorted(FEATURE_SETS)}, "
                         f"got {features!r}") from None


# ------------------------------------------------------------------------------------
# Time-step dependent constants
# ------------------------------------------------------------------------------------

class StepConstants(NamedTuple):
    """The feature thresholds in whole samples for one sampling step ``dt``."""

    dt: float
    window: int  # Savitzky–Golay window
    ibi: int  # a new burst starts at a gap ≥ ibi samples
    min_burst: int  # a burst is kept if it lasts > min_burst samples
    plateau_step: int  # plateau sub-sampling stride
    plateau_min: int  # mean plateau (samples) below this is floored ...
    plateau_floor: int  # ... to this


def step_constants(dt: float) -> StepConstants:
    """Thresholds for sampling step ``dt`` [ms]; at 0.025 ms those of the reference."""
    dt = float(dt)
    return StepConstants(
        dt=dt,
        window=savgol_window(dt),
        ibi=math.ceil(IBI_MS / dt - 1e-6),
        min_burst=math.floor(MIN_BURST_MS / dt + 1e-6),
        plateau_step=max(1, round(PLATEAU_STEP_MS / dt)),
        plateau_min=round(PLATEAU_MIN_MS / dt),
        plateau_floor=round(PLATEAU_FLOOR_MS / dt),
    )


def savgol_window(dt: float) -> int:
    """The reference's Savitzky–Golay window: ``int(0.5 / dt)``, made odd."""
    w = int(0.5 / dt)
    return w + 1 if w % 2 == 0 else w


def edge_matrices(window: int, order: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Savitzky–Golay filter as linear maps (scipy ``mode="interp"``).

    Returns ``coeffs (window,)`` for interior samples (``y[i] = Σ_j c[j] x[i-h+j]``,
    ``h = window // 2``), ``start (h, window)`` mapping the first ``window`` samples to
    the first ``h`` outputs, and ``end (h, window)`` mapping the last ``window`` samples
    to the last ``h`` outputs (least-squares cubic fits, as scipy's edge polyfit).
    """
    half = window // 2
    coeffs = scipy.signal.savgol_coeffs(window, order)[::-1].copy()  # correlation kernel
    pos = np.arange(window, dtype=np.float64) - half
    vander = np.vander(pos / half, order + 1, increasing=True)
    proj = vander @ np.linalg.pinv(vander)  # (window, window) hat matrix
    return coeffs, proj[:half].copy(), proj[window - half:].copy()


# ------------------------------------------------------------------------------------
# Bursts → features (shared by the online and the numpy path)
# ------------------------------------------------------------------------------------

class Bursts(NamedTuple):
    """Per-cell burst summary, the input of :func:`features_from_bursts`.

    Times are whole sample indices (relative to the recording start).
    """

    starts: jax.Array  # (3, B) int32, kept burst starts (first B valid entries per cell)
    ends: jax.Array  # (3, B) int32
    n_bursts: jax.Array  # (3,) int32
    n_spikes: jax.Array  # (3,) int32
    plateau_sum: jax.Array  # (3,) int32, Σ over kept bursts of the longest plateau run
    plateau_count: jax.Array  # (3,) int32, number of plateau blocks (= kept bursts)


def features_from_bursts(b: Bursts, c: StepConstants, dtype=jnp.float32) -> jax.Array:
    """All :data:`FEATURE_NAMES` features ``(25,)`` from one circuit's bursts.

    Latencies are accumulated in whole samples and converted to ms at the end, so the
    float32 path loses no time resolution.
    """
    nan = jnp.asarray(jnp.nan, dtype)
    dt = jnp.asarray(c.dt, dtype)
    starts, ends = jnp.asarray(b.starts, jnp.int32), jnp.asarray(b.ends, jnp.int32)
    n_b = jnp.asarray(b.n_bursts, jnp.int32)
    n_max = starts.shape[1]
    slot = jnp.arange(n_max)
    valid = slot[None, :] < n_b[:, None]  # (3, B)

    def safe_div(num, den):
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), nan)

    dur_steps = jnp.sum(jnp.where(valid, ends - starts, 0), axis=1)
    burst_duration = safe_div(dur_steps.astype(dtype) * dt, n_b.astype(dtype))

    # AB/PD cycles
    n_pd = n_b[0]
    p_start = starts[0]
    period_steps = jnp.where(n_pd >= 2, p_start[jnp.maximum(n_pd - 1, 0)] - p_start[0], 0)
    cycle_period = safe_div(period_steps.astype(dtype) * dt, (n_pd - 1).astype(dtype))
    cycle_period = jnp.where(n_pd >= 2, cycle_period, nan)
    duty_cycle = burst_duration / cycle_period

    # which bursts of each cell start within AB/PD cycle i = [p_i, p_{i+1})
    pst, pet = p_start[:-1], p_start[1:]
    cyc_valid = slot[:-1] < n_pd - 1  # (B-1,)
    # Kept starts are strictly increasing, so the bursts of a cell starting in cycle i
    # are slots lo_i … hi_i - 1 with lo/hi from a binary search (invalid slots pushed
    # to +inf). O(B) memory: the (3, B-1, B) "start in cycle" mask this replaces was
    # materialised by XLA for 11 s runs (B = 54: ~104 of the ~106 kB per circuit).
    sorted_starts = jnp.where(valid, starts, jnp.iinfo(jnp.int32).max)
    lo = jax.vmap(lambda a: jnp.searchsorted(a, pst, side="left"))(sorted_starts)  # (3, B-1)
    hi = jax.vmap(lambda a: jnp.searchsorted(a, pet, side="left"))(sorted_starts)
    count = hi - lo  # only read where cyc_valid (pst < pet)
    first_in = jnp.clip(lo, 0, n_max - 1)
    one_start = jnp.take_along_axis(starts, first_in, axis=1)  # (3, B-1), used iff count == 1
    one_end = jnp.take_along_axis(ends, first_in, axis=1)
    tri = cyc_valid & jnp.all(count == 1, axis=0)  # (B-1,)
    n_tri = jnp.sum(tri)
    n_cyc = jnp.maximum(n_pd - 1, 0)
    triphasic = ((n_pd >= 2) & (TRIPHASIC_FRACTION[1] * n_tri >= TRIPHASIC_FRACTION[0] * n_cyc))

    def tri_mean(lat):  # mean over triphasic cycles of a latency (samples) → ms
        total = jnp.sum(jnp.where(tri, lat, 0))
        return jnp.where(triphasic, safe_div(total.astype(dtype) * dt, n_tri.astype(dtype)), nan)

    s_pd, s_lp, s_py = one_start
    e_pd, e_lp, _ = one_end
    s2s_pd_lp = tri_mean(s_lp - s_pd)
    s2s_lp_py = tri_mean(s_py - s_lp)
    s2s_pd_py = tri_mean(s_py - s_pd)
    e2s_pd_lp = tri_mean(s_lp - e_pd)
    e2s_lp_py = tri_mean(s_py - e_lp)
    phase_lp = s2s_pd_lp / cycle_period
    phase_py = s2s_pd_py / cycle_period
    gap_pd_lp = e2s_pd_lp / cycle_period
    gap_lp_py = e2s_lp_py / cycle_period

    pyl = tri & (s_lp <= s_py) & (one_end[1] <= one_end[2]) & (e_pd <= s_lp)
    pyloric_like = triphasic & (PYLORIC_FRACTION[1] * jnp.sum(pyl)
                                >= PYLORIC_FRACTION[0] * n_tri)

    # plateau durations
    p_count = jnp.asarray(b.plateau_count, jnp.int32)
    p_mean = safe_div((jnp.asarray(b.plateau_sum, jnp.int32) * c.plateau_step).astype(dtype),
                      p_count.astype(dtype))
    plateau = jnp.where(p_mean < c.plateau_min, jnp.asarray(c.plateau_floor, dtype), p_mean) * dt
    plateau = jnp.where(p_count > 0, plateau, nan)

    return jnp.concatenate([
        cycle_period[None], burst_duration, duty_cycle,
        jnp.stack([phase_lp, phase_py, s2s_pd_lp, s2s_lp_py, e2s_pd_lp, e2s_lp_py,
                   gap_pd_lp, gap_lp_py]),
        plateau,
        n_b.astype(dtype), jnp.asarray(b.n_spikes).astype(dtype),
        pyloric_like.astype(dtype)[None],
    ]).astype(dtype)


# ------------------------------------------------------------------------------------
# Online detector (inside the simulation scan)
# ------------------------------------------------------------------------------------

class DetectorState(NamedTuple):
    """Online spike/burst/plateau detector for 3 cells; every field is ``(3, *batch)``."""

    f2: jax.Array  # smoothed sample s (the one being judged)
    f1: jax.Array  # smoothed sample s + 1
    n_spikes: jax.Array
    last_spike: jax.Array
    cur_start: jax.Array  # start of the open burst
    a_cur: jax.Array  # plateau tracker anchored at the last kept burst start
    a_long: jax.Array
    a_anchor: jax.Array
    has_kept: jax.Array  # bool
    b_cur: jax.Array  # plateau tracker anchored at the open burst start
    b_long: jax.Array
    b_anchor: jax.Array
    a_at_open: jax.Array  # a_long when the open burst started
    a_at_last: jax.Array  # a_long at the last spike
    b_at_last: jax.Array  # b_long at the last spike
    plateau_sum: jax.Array
    plateau_count: jax.Array
    pend: jax.Array  # bool: a kept burst closed since the last flush
    pend_start: jax.Array
    pend_end: jax.Array


class BurstBuffer(NamedTuple):
    """Kept bursts written so far."""

    starts: jax.Array  # (3, B, *batch) int32
    ends: jax.Array  # (3, B, *batch) int32
    n: jax.Array  # (3, *batch) int32


def max_bursts(n_samples: int, c: StepConstants) -> int:
    """Upper bound on kept bursts in ``n_samples``: starts are > ibi + min_burst apart."""
    return n_samples // (c.ibi + c.min_burst) + 2


def detector_init(f0: jax.Array, f1: jax.Array) -> DetectorState:
    """A detector primed with the first two smoothed samples ``(3, *batch)`` each."""
    zi = jnp.zeros(f0.shape, jnp.int32)
    zb = jnp.zeros(f0.shape, bool)
    return DetectorState(f0, f1, zi, zi - 10**8, zi, zi, zi, zi, zb, zi, zi, zi, zi, zi, zi,
                         zi, zi, zb, zi, zi)


def buffer_init(n_max: int, batch: tuple[int, ...] = ()) -> BurstBuffer:
    z = jnp.zeros((3, n_max, *batch), jnp.int32)
    return BurstBuffer(z, z, jnp.zeros((3, *batch), jnp.int32))


def detector_consume(d: DetectorState, f_new: jax.Array, s: jax.Array, c: StepConstants
                     ) -> DetectorState:
    """Feed smoothed sample ``s + 2`` (``f_new (3, *batch)``); judges sample ``s``."""
    f2, f1 = d.f2, d.f1
    spike = (f1 > SPIKE_THRESHOLD) & (f1 - f2 >= 0) & (f_new - f1 <= 0)
    bit = f2 > PLATEAU_THRESHOLD
    s = jnp.asarray(s, jnp.int32)

    first = d.n_spikes == 0
    new_burst = spike & (first | (s - d.last_spike >= c.ibi))
    closing = new_burst & ~first
    keep = closing & (d.last_spike - d.cur_start > c.min_burst)

    # a kept burst finalises the plateau block of the previous kept burst ...
    fin = keep & d.has_kept
    plateau_sum = d.plateau_sum + jnp.where(fin, d.a_at_open, 0)
    plateau_count = d.plateau_count + fin.astype(jnp.int32)
    # ... and its own tracker becomes the block tracker
    a_cur = jnp.where(keep, d.b_cur, d.a_cur)
    a_long = jnp.where(keep, d.b_long, d.a_long)
    a_anchor = jnp.where(keep, d.b_anchor, d.a_anchor)
    has_kept = d.has_kept | keep
    a_at_open = jnp.where(new_burst, a_long, d.a_at_open)
    b_cur = jnp.where(new_burst, 0, d.b_cur)
    b_long = jnp.where(new_burst, 0, d.b_long)
    b_anchor = jnp.where(new_burst, s, d.b_anchor)
    a_at_last = jnp.where(spike, a_long, d.a_at_last)
    b_at_last = jnp.where(spike, b_long, d.b_at_last)

    pend = d.pend | keep
    pend_start = jnp.where(keep, d.cur_start, d.pend_start)
    pend_end = jnp.where(keep, d.last_spike, d.pend_end)
    cur_start = jnp.where(new_burst, s, d.cur_start)
    last_spike = jnp.where(spike, s, d.last_spike)
    n_spikes = d.n_spikes + spike.astype(jnp.int32)

    # plateau trackers see sample s (sub-sampled from their anchors)
    def track(cur, long, anchor):
        sampled = (s >= anchor) & ((s - anchor) % c.plateau_step == 0)
        long = jnp.where(sampled & ~bit, jnp.maximum(long, cur), long)
        cur = jnp.where(sampled, jnp.where(bit, cur + 1, 0), cur)
        return cur, long

    a_cur, a_long = track(a_cur, a_long, a_anchor)
    b_cur, b_long = track(b_cur, b_long, b_anchor)
    return DetectorState(f1, f_new, n_spikes, last_spike, cur_start, a_cur, a_long, a_anchor,
                         has_kept, b_cur, b_long, b_anchor, a_at_open, a_at_last, b_at_last,
                         plateau_sum, plateau_count, pend, pend_start, pend_end)


def _track_segment(cur, long, anchor, bits, s0, lo, hi, step: int):
    """Advance a plateau tracker over block samples ``lo <= k < hi``.

    ``bits (n, 3, *batch)`` are the block's ``v > -30 mV`` flags of samples ``s0 + k``;
    the tracker samples every ``step``-th sample from its ``anchor`` (so at most
    ``ceil(n / step)`` of them fall in the block) and keeps the length ``cur`` of the
    current run and the longest run ``long`` that was ended by a sample below threshold.
    """
    n = bits.shape[0]
    start = jnp.maximum(lo, anchor - s0)
    k = start + jnp.remainder(anchor - s0 - start, step)  # first sampled k >= start
    for _ in range(-(-n // step)):
        valid = k < hi
        bit = jnp.take_along_axis(bits, jnp.clip(k, 0, n - 1)[None], axis=0)[0]
        long = jnp.where(valid & ~bit, jnp.maximum(long, cur), long)
        cur = jnp.where(valid, jnp.where(bit, cur + 1, 0), cur)
        k = k + step
    return cur, long


def detector_block(d: DetectorState, f: jax.Array, s0, c: StepConstants) -> DetectorState:
    """Feed smoothed samples ``s0 + 2 … s0 + n + 1`` (``f (n, 3, *batch)``) at once.

    Equivalent to ``n`` calls of :func:`detector_consume` (``n < c.ibi``), but
    vectorised over the block: within a block only its *first* spike can start a new
    burst (any later one is < n samples after it), so the burst logic runs once per block
    and the plateau trackers advance over the ≤ ``ceil(n / 10)`` samples they see, split
    at the first and the last spike of the block.
    """
    n = f.shape[0]
    s0 = jnp.asarray(s0, jnp.int32)
    ext = jnp.concatenate([d.f2[None], d.f1[None], f])  # samples s0 … s0 + n + 1
    mid = ext[1:-1]
    spikes = (mid > SPIKE_THRESHOLD) & (mid - ext[:-2] >= 0) & (ext[2:] - mid <= 0)  # (n, …)
    bits = ext[:-2] > PLATEAU_THRESHOLD
    any_spike = jnp.any(spikes, axis=0)
    k_first = jnp.where(any_spike, jnp.argmax(spikes, axis=0), n).astype(jnp.int32)
    k_last = jnp.where(any_spike, n - 1 - jnp.argmax(spikes[::-1], axis=0), n).astype(jnp.int32)
    n_new = jnp.sum(spikes, axis=0, dtype=jnp.int32)
    step = c.plateau_step

    # samples before the first spike
    zero = jnp.zeros_like(k_first)
    a_cur, a_long = _track_segment(d.a_cur, d.a_long, d.a_anchor, bits, s0, zero, k_first, step)
    b_cur, b_long = _track_segment(d.b_cur, d.b_long, d.b_anchor, bits, s0, zero, k_first, step)

    # the first spike: possibly a new burst (same logic as detector_consume)
    s = s0 + k_first
    first = d.n_spikes == 0
    new_burst = any_spike & (first | (s - d.last_spike >= c.ibi))
    keep = new_burst & ~first & (d.last_spike - d.cur_start > c.min_burst)
    fin = keep & d.has_kept
    plateau_sum = d.plateau_sum + jnp.where(fin, d.a_at_open, 0)
    plateau_count = d.plateau_count + fin.astype(jnp.int32)
    a_cur = jnp.where(keep, b_cur, a_cur)
    a_long = jnp.where(keep, b_long, a_long)
    a_anchor = jnp.where(keep, d.b_anchor, d.a_anchor)
    has_kept = d.has_kept | keep
    a_at_open = jnp.where(new_burst, a_long, d.a_at_open)
    b_cur = jnp.where(new_burst, 0, b_cur)
    b_long = jnp.where(new_burst, 0, b_long)
    b_anchor = jnp.where(new_burst, s, d.b_anchor)
    pend = d.pend | keep
    pend_start = jnp.where(keep, d.cur_start, d.pend_start)
    pend_end = jnp.where(keep, d.last_spike, d.pend_end)
    cur_start = jnp.where(new_burst, s, d.cur_start)

    # up to the last spike (snapshots), then the rest of the block
    a_cur, a_long = _track_segment(a_cur, a_long, a_anchor, bits, s0, k_first, k_last, step)
    b_cur, b_long = _track_segment(b_cur, b_long, b_anchor, bits, s0, k_first, k_last, step)
    a_at_last = jnp.where(any_spike, a_long, d.a_at_last)
    b_at_last = jnp.where(any_spike, b_long, d.b_at_last)
    a_cur, a_long = _track_segment(a_cur, a_long, a_anchor, bits, s0, k_last, n, step)
    b_cur, b_long = _track_segment(b_cur, b_long, b_anchor, bits, s0, k_last, n, step)

    return DetectorState(f[-2], f[-1], d.n_spikes + n_new,
                         jnp.where(any_spike, s0 + k_last, d.last_spike), cur_start,
                         a_cur, a_long, a_anchor, has_kept, b_cur, b_long, b_anchor, a_at_open,
                         a_at_last, b_at_last, plateau_sum, plateau_count, pend, pend_start,
                         pend_end)


def detector_flush(d: DetectorState, buf: BurstBuffer) -> tuple[DetectorState, BurstBuffer]:
    """Move the pending kept burst (at most one per call) into the buffer."""
    n_max = buf.starts.shape[1]
    slot = jnp.arange(n_max).reshape((1, n_max) + (1,) * (buf.n.ndim - 1))
    put = (slot == buf.n[:, None]) & d.pend[:, None]  # (3, n_max, *batch)
    buf = BurstBuffer(jnp.where(put, d.pend_start[:, None], buf.starts),
                      jnp.where(put, d.pend_end[:, None], buf.ends),
                      buf.n + d.pend.astype(jnp.int32))
    return d._replace(pend=jnp.zeros_like(d.pend)), buf


def detector_finish(d: DetectorState, buf: BurstBuffer, c: StepConstants) -> Bursts:
    """Close the open burst and the last plateau block; returns the :class:`Bursts`."""
    d, buf = detector_flush(d, buf)
    has_open = d.n_spikes > 0
    keep = has_open & (d.last_spike - d.cur_start > c.min_burst)
    plateau_sum = (d.plateau_sum + jnp.where(keep & d.has_kept, d.a_at_open, 0)
                   + jnp.where(keep, d.b_at_last, 0)
                   + jnp.where(~keep & has_open & d.has_kept, d.a_at_last, 0))
    plateau_count = (d.plateau_count + (keep & d.has_kept).astype(jnp.int32)
                     + keep.astype(jnp.int32) + (~keep & has_open & d.has_kept).astype(jnp.int32))
    d = d._replace(pend=keep, pend_start=d.cur_start, pend_end=d.last_spike)
    d, buf = detector_flush(d, buf)
    return Bursts(buf.starts, buf.ends, buf.n, d.n_spikes, plateau_sum, plateau_count)


# ------------------------------------------------------------------------------------
# Whole-trace numpy path
# ------------------------------------------------------------------------------------

def bursts_from_trace(v: np.ndarray, dt: float) -> Bursts:
    """Spikes, bursts and plateaus of whole voltage traces ``v (3, N)`` sampled at ``dt``.

    Straight numpy transcription of the definitions in the module docstring.
    """
    c = step_constants(dt)
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] != 3:
        raise ValueError(f"voltage: expected shape (3, N), got {v.shape}")
    if v.shape[1] < c.window:
        raise ValueError(f"voltage: {v.shape[1]} samples is shorter than the filter "
                         f"window ({c.window} samples)")
    n_max = max_bursts(v.shape[1], c)
    starts = np.zeros((3, n_max), np.int32)
    ends = np.zeros((3, n_max), np.int32)
    n_b, n_sp = np.zeros(3, np.int32), np.zeros(3, np.int32)
    p_sum, p_cnt = np.zeros(3, np.int32), np.zeros(3, np.int32)
    vf = scipy.signal.savgol_filter(v, c.window, 3, axis=1)
    for cell in range(3):
        x = vf[cell]
        spikes = np.where((x[1:-1] > SPIKE_THRESHOLD) & (np.diff(x[:-1]) >= 0)
                          & (np.diff(x[1:]) <= 0))[0]
        n_sp[cell] = len(spikes)
        if len(spikes) == 0:
            continue
        end_idx = np.append(np.where(np.diff(spikes) >= c.ibi)[0], len(spikes) - 1)
        start_idx = np.insert(end_idx[:-1] + 1, 0, 0)
        bs, be = spikes[start_idx], spikes[end_idx]
        keep = (be - bs) > c.min_burst
        bs, be = bs[keep], be[keep]
        n_b[cell] = len(bs)
        starts[cell, :len(bs)], ends[cell, :len(bs)] = bs, be
        above = x > PLATEAU_THRESHOLD
        for i, b0 in enumerate(bs):
            b1 = bs[i + 1] if i + 1 < len(bs) else spikes[-1]
            p_sum[cell] += _longest_closed_run(above[b0:b1:c.plateau_step])
            p_cnt[cell] += 1
    return Bursts(starts, ends, n_b, n_sp, p_sum, p_cnt)


def _longest_closed_run(bits: np.ndarray) -> int:
    """Longest run of True that is followed by a False (the reference's loop)."""
    falses = np.flatnonzero(~bits)
    if len(falses) == 0:
        return 0
    # run ending at each False = distance to the previous False (or the start)
    prev = np.concatenate([[-1], falses[:-1]])
    return int(np.max(falses - prev - 1))


def features_from_trace(v: np.ndarray, dt: float) -> np.ndarray:
    """All :data:`FEATURE_NAMES` features ``(25,)`` (float64) of traces ``v (3, N)``."""
    c = step_constants(dt)
    b = bursts_from_trace(v, dt)
    with jax.enable_x64(True):
        return np.asarray(features_from_bursts(b, c, jnp.float64))
