"""Pyloric simulator, the rest of the issue's fast-test list:

1. batch memory bound — XLA's compiled memory analysis of the batched feature path:
   bytes per simulation do not depend on the batch size, do not scale with the number
   of time steps (no stored traces) and stay under a bound derived from the design;
2. feature extraction on synthetic spike trains with hand-computed answers (whole-trace
   numpy path and the online detector run over the same trace), NaN where undefined;
3. bad θ (shape, NaN, outside the prior) rejected with a named error, through the engine
   API and the CLI.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbi_engine import cli
from sbi_engine.errors import ShapeError
from sbi_engine.simulator import get_simulator
from simulators import pyloric
from simulators.pyloric import features as F
from simulators.pyloric import model
from simulators.pyloric.simulator import _batched, bursts_online

DT = pyloric.DT
STEPS_PER_MS = round(1.0 / DT)  # 40
IDX = {name: i for i, name in enumerate(F.FEATURE_NAMES)}

# ------------------------------------------------------------------------------------
# 1. Batch memory bound
# ------------------------------------------------------------------------------------

# (batch, t_max, t_burn): the default 11 s at two batch sizes, and half the duration.
# Each config is one compile (~10 s on this machine); the fourth corner of the grid
# (batch 64, half) is left out to keep this file under a minute (it is in the README:
# 5,478 B/sim against 7,815 B/sim at 11 s).
MEMORY_CONFIGS = ((8, 11000.0, 1000.0), (64, 11000.0, 1000.0), (8, 5500.0, 500.0))
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled_memory(batch: int, t_max: float, t_burn: float) -> dict:
    """Compile (do not run) the batched float32 feature path and read XLA's buffer sizes."""
    fn = _batched(0.001, "18", float(t_max), float(t_burn), jnp.dtype(jnp.float32), 1)
    keys = jax.random.split(jax.random.key(0), batch)
    theta = jnp.zeros((batch, 31), jnp.float32)
    temp = jnp.full((batch,), model.T_REF, jnp.float32)
    # LLVM optimisation off: the buffer assignment (what memory_analysis reports) comes
    # from the HLO passes and is identical (checked); compiling is somewhat faster.
    stats = fn.lower(keys, theta, temp).compile(_FAST_COMPILE).memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no compiled memory analysis")
    n_rec = round((t_max - t_burn) / DT)
    return {"batch": batch, "n_rec": n_rec, "n_max": F.max_bursts(n_rec, F.step_constants(DT)),
            "temp": stats.temp_size_in_bytes, "argument": stats.argument_size_in_bytes,
            "output": stats.output_size_in_bytes}


def design_bound_per_sim(n_max: int, itemsize: int = 4) -> int:
    """Upper bound on the bytes one circuit needs, from what the design keeps.

    - circuit state (V, Ca, 7 + 4 gates per cell, 7 synapses: 46 numbers) and its
      constants (``CircuitParams``: 51 numbers), key, θ, features: ~130 numbers;
    - one block of ``BLOCK`` = 40 steps × 3 cells: raw voltages, the previous block
      (FIR history), noise, smoothed samples, spike/plateau flags — ~10 such arrays;
    - detector state (20 fields × 3 cells) and the burst buffer (starts, ends:
      2 × 3 × n_max int32) plus the O(n_max) burst → feature step.

    Each term gets a factor 4 of slack for XLA's temporaries (double-buffered scan
    carries, fusion outputs).
    """
    scalars = 130 * itemsize
    block = 10 * model.BLOCK * 3 * itemsize
    detector = 20 * 3 * 4
    bursts = 16 * 3 * n_max * 4  # buffer (2 arrays) + per-cycle arrays of the feature step
    return 4 * (scalars + block + detector + bursts)


@pytest.fixture(scope="module")
def memory_stats() -> list[dict]:
    out = [_compiled_memory(*cfg) for cfg in MEMORY_CONFIGS]
    for m in out:
        total = m["temp"] + m["argument"] + m["output"]
        print(f"pyloric memory: batch {m['batch']:3d}, {m['n_rec'] * DT / 1000:g} s recorded "
              f"({m['n_rec']} steps, {m['n_max']} burst slots): temp {m['temp']} B, "
              f"arg {m['argument']} B, out {m['output']} B -> {total / m['batch']:.0f} B/sim")
    return out


def test_batch_memory_bound(memory_stats):
    full8, full64, half8 = memory_stats
    # per simulation: the marginal cost of a circuit ≈ the average at the larger batch
    marginal = (full64["temp"] - full8["temp"]) / (full64["batch"] - full8["batch"])
    per_sim_64 = (full64["temp"] + full64["argument"] + full64["output"]) / full64["batch"]
    assert marginal > 0
    assert 0.8 < per_sim_64 / marginal < 1.25, (per_sim_64, marginal)
    # arguments/outputs are θ, key, temperature in and 18 features out: linear in batch
    assert full64["argument"] == 8 * full8["argument"]
    assert full64["output"] == 8 * full8["output"]
    # doubling the simulated time must not double the memory (no stored traces): only
    # the burst buffer grows, by (n_max_full - n_max_half) slots
    assert full8["n_rec"] == 2 * half8["n_rec"]
    assert full8["temp"] < 1.75 * half8["temp"], (full8["temp"], half8["temp"])
    grown = (full8["temp"] - half8["temp"]) / full8["batch"]  # measured: ~170 B per slot
    assert grown < 32 * 3 * 4 * (full8["n_max"] - half8["n_max"]), grown
    # far below one stored float32 trace of the run (3 cells × 400k steps = 4.8 MB)
    trace_bytes = 3 * full8["n_rec"] * 4
    assert per_sim_64 < trace_bytes / 100
    # under the design bound, so 100k circuits (11 s) need well under one GPU's memory
    bound = design_bound_per_sim(full64["n_max"])
    assert per_sim_64 < bound, (per_sim_64, bound)
    assert 100_000 * bound < 8 * 2**30  # < 8 GiB, a tenth of an 80 GB H100


def test_design_bound_is_small_enough():
    """The bound itself, at the default 11 s (54 burst slots): < 64 KiB per circuit."""
    n_max = F.max_bursts(round(10000 / DT), F.step_constants(DT))
    assert n_max == 54
    assert design_bound_per_sim(n_max) < 64 * 1024


# ------------------------------------------------------------------------------------
# 2. Features of synthetic spike trains with known answers
# ------------------------------------------------------------------------------------

def _spike(v: np.ndarray, k: int, amp: float = 90.0, sigma: float = 12.0) -> None:
    """Add a symmetric spike centred on sample ``k`` (its smoothed maximum is at ``k``)."""
    lo, hi = max(k - 80, 0), min(k + 81, v.shape[0])
    t = np.arange(lo, hi)
    v[lo:hi] += amp * np.exp(-0.5 * ((t - k) / sigma) ** 2)


# Cycle design, all in ms: a 1000 ms period; AB/PD bursts of 200 ms, LP starts 450 ms
# after AB/PD for 160 ms, PY 700 ms after AB/PD for 240 ms; spikes every 20 ms within
# a burst. AB/PD carries a 10 ms plateau (−20 mV) from its first spike, PY a 30 ms one.
PERIOD, FIRST = 1000, 200
BURSTS = {0: (0, 200), 1: (450, 160), 2: (700, 240)}  # cell: (delay after AB/PD, duration)
ISI = 20
PLATEAU = {0: 10, 2: 30}  # ms after the burst's first spike


def synthetic_trace(n_cycles: int = 6, t_total: float = 6500.0, silent=(),
                    short_lp_burst: bool = False) -> np.ndarray:
    """Voltages ``(3, N)`` at dt = 0.025 ms (N a multiple of 40) with the bursts above."""
    n = round(t_total * STEPS_PER_MS)
    v = np.full((3, n), -60.0)
    for cell, (delay, dur) in BURSTS.items():
        if cell in silent:
            continue
        for i in range(n_cycles):
            start = (FIRST + i * PERIOD + delay) * STEPS_PER_MS
            if cell in PLATEAU:  # from 2.5 ms before the first spike
                v[cell, start - 100:start + PLATEAU[cell] * STEPS_PER_MS] = -20.0
            for t in range(0, dur + 1, ISI):
                _spike(v[cell], start + t * STEPS_PER_MS)
    if short_lp_burst:  # two LP spikes 30 ms apart, 190 ms after its burst: dropped
        for t in (1000, 1030):
            _spike(v[1], t * STEPS_PER_MS)
    return v


def expected_features(n_cycles: int = 6) -> dict:
    """The features by hand from the construction (ms; phases as fractions)."""
    d_pd, d_lp, d_py = (BURSTS[c][1] for c in range(3))
    s_lp, s_py = BURSTS[1][0], BURSTS[2][0]
    n_spk = [(BURSTS[c][1] // ISI + 1) * n_cycles for c in range(3)]
    return {
        "cycle_period": PERIOD,
        "burst_duration_ABPD": d_pd, "burst_duration_LP": d_lp, "burst_duration_PY": d_py,
        "duty_cycle_ABPD": d_pd / PERIOD, "duty_cycle_LP": d_lp / PERIOD,
        "duty_cycle_PY": d_py / PERIOD,
        "start_phase_LP": s_lp / PERIOD, "start_phase_PY": s_py / PERIOD,
        "start_to_start_ABPD_LP": s_lp, "start_to_start_LP_PY": s_py - s_lp,
        "end_to_start_ABPD_LP": s_lp - d_pd, "end_to_start_LP_PY": s_py - (s_lp + d_lp),
        "phase_gap_ABPD_LP": (s_lp - d_pd) / PERIOD,
        "phase_gap_LP_PY": (s_py - (s_lp + d_lp)) / PERIOD,
        # plateau runs are counted every 0.25 ms: ±2 strides around the constructed length
        "plateau_duration_ABPD": PLATEAU[0], "plateau_duration_LP": 2.5,  # floored
        "plateau_duration_PY": PLATEAU[2],
        "num_bursts_ABPD": n_cycles, "num_bursts_LP": n_cycles, "num_bursts_PY": n_cycles,
        "num_spikes_ABPD": n_spk[0], "num_spikes_LP": n_spk[1], "num_spikes_PY": n_spk[2],
        "pyloric_like": 1.0,
    }


def _tolerance(name: str) -> float:
    """Two samples (0.05 ms) for times, relative to the period for phases; two
    plateau strides (0.5 ms) for plateau durations; exact for counts."""
    if name.startswith("plateau"):
        return 0.5
    if name.startswith(("num_", "pyloric")):
        return 0.0
    if name.startswith(("duty", "start_phase", "phase_gap")):
        return 2 * DT / PERIOD
    return 2 * DT


def _both_paths(v: np.ndarray) -> dict[str, np.ndarray]:
    """Features of ``v`` from the whole-trace numpy path and the online detector."""
    c = F.step_constants(DT)
    with jax.enable_x64(True):
        online_b = jax.tree.map(np.asarray, bursts_online(jnp.asarray(v)))
        online = np.asarray(F.features_from_bursts(online_b, c, jnp.float64))
    return {"trace": pyloric.features_from_trace(v, DT), "online": online}


@pytest.fixture(scope="module")
def regular_features():
    return _both_paths(synthetic_trace(short_lp_burst=True))


@pytest.mark.parametrize("path", ["trace", "online"])
def test_synthetic_bursts_known_features(regular_features, path):
    x = regular_features[path]
    assert x.shape == (len(F.FEATURE_NAMES),)
    expect = expected_features()
    expect["num_spikes_LP"] += 2  # the 30 ms LP burst: its spikes count, the burst not
    for name, value in expect.items():
        got = x[IDX[name]]
        assert abs(got - value) <= _tolerance(name), f"{name}: got {got}, expected {value}"


def test_synthetic_paths_agree(regular_features):
    np.testing.assert_allclose(regular_features["online"], regular_features["trace"],
                               rtol=1e-12, equal_nan=True)


def test_synthetic_silent_cell_is_nan():
    x = _both_paths(synthetic_trace(silent=(1,)))
    for path in ("trace", "online"):
        f = x[path]
        expect = expected_features()
        # LP-free features are still defined
        for name in ("cycle_period", "burst_duration_ABPD", "burst_duration_PY",
                     "duty_cycle_ABPD", "duty_cycle_PY", "plateau_duration_ABPD",
                     "plateau_duration_PY", "num_bursts_ABPD", "num_spikes_PY"):
            assert abs(f[IDX[name]] - expect[name]) <= _tolerance(name), (path, name)
        # anything involving LP, and every cycle-wise latency (no cycle is triphasic)
        for name in ("burst_duration_LP", "duty_cycle_LP", "plateau_duration_LP",
                     "start_phase_LP", "start_phase_PY", "start_to_start_ABPD_LP",
                     "start_to_start_LP_PY", "end_to_start_ABPD_LP", "end_to_start_LP_PY",
                     "phase_gap_ABPD_LP", "phase_gap_LP_PY"):
            assert math.isnan(f[IDX[name]]), (path, name, f[IDX[name]])
        assert f[IDX["num_bursts_LP"]] == 0 and f[IDX["num_spikes_LP"]] == 0
        assert f[IDX["pyloric_like"]] == 0


def test_synthetic_single_burst_has_no_period():
    """One burst per cell: durations defined, period and everything per cycle NaN."""
    x = _both_paths(synthetic_trace(n_cycles=1))
    for path in ("trace", "online"):
        f = x[path]
        for c, tag in enumerate(("ABPD", "LP", "PY")):
            assert abs(f[IDX[f"burst_duration_{tag}"]] - BURSTS[c][1]) <= 2 * DT
            assert math.isnan(f[IDX[f"duty_cycle_{tag}"]])
            assert f[IDX[f"num_bursts_{tag}"]] == 1
        assert np.all(np.isnan(f[[IDX["cycle_period"], *range(7, 15)]])), path
        assert f[IDX["pyloric_like"]] == 0


def test_synthetic_irregular_cycle_breaks_triphasic():
    """An extra LP burst in 2 of 5 cycles (< 90 % triphasic): latencies and phases NaN,
    period and durations still defined."""
    v = synthetic_trace()
    for i in (1, 3):  # a second LP burst (60 ms) 250 ms after the regular one
        start = (FIRST + i * PERIOD + 860) * STEPS_PER_MS
        for t in range(0, 61, ISI):
            _spike(v[1], start + t * STEPS_PER_MS)
    f = pyloric.features_from_trace(v, DT)
    assert abs(f[IDX["cycle_period"]] - PERIOD) <= 2 * DT
    assert f[IDX["num_bursts_LP"]] == 8
    lp_mean = (6 * 160 + 2 * 60) / 8
    assert abs(f[IDX["burst_duration_LP"]] - lp_mean) <= 2 * DT
    assert np.all(np.isnan(f[7:15]))


# ------------------------------------------------------------------------------------
# 3. Bad θ rejected with clear errors
# ------------------------------------------------------------------------------------

SHORT = {"t_max": 1500.0, "t_burn": 500.0}
LP_LEAK, SYN_AB_LP, SYN_PD_LP = 15, 24, 25


def _centre_theta(n: int = 2) -> np.ndarray:
    sim = pyloric.build(**SHORT)
    low, high = sim.prior.support
    return np.tile((np.asarray(low, np.float64) + np.asarray(high, np.float64)) / 2, (n, 1))


@pytest.fixture(scope="module", params=["build", "registry"])
def engine_sim(request):
    if request.param == "build":
        return pyloric.build(noise_std=0.0, **SHORT)
    return get_simulator("pyloric", noise_std=0.0, **SHORT)


def _bad_thetas():
    good = _centre_theta()
    nan = good.copy()
    nan[1, LP_LEAK] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    leak = good.copy()
    leak[0, LP_LEAK] = 0.5
    syn = good.copy()
    syn[1, SYN_AB_LP] = np.log(1e-2) + 0.5
    syn_pd = good.copy()
    syn_pd[0, SYN_PD_LP] = np.log(5e-3)  # allowed for AB-LP, not for PD-LP (≤ ln 1e-3)
    neg = good.copy()
    neg[0, 0] = -1.0
    return [
        ("shape (2, 30)", good[:, :30], r"theta: expected shape \(n, 31\), got \(2, 30\)"),
        ("shape (2, 31, 1)", good[..., None], r"expected shape \(n, 31\), got \(2, 31, 1\)"),
        ("shape (30,)", good[0, :30], r"expected shape \(n, 31\), got \(30,\)"),
        ("NaN", nan, r"row 1, 'LP_Leak' is nan \(must be finite\)"),
        ("inf", inf, r"row 0, 'ABPD_Na' is inf \(must be finite\)"),
        ("LP leak 0.5", leak,
         r"row 0, 'LP_Leak' = 0\.5 is outside the prior support \[0\.01, 0\.04\]"),
        ("AB-LP above ln 1e-2", syn,
         r"row 1, 'syn_AB_LP' = -4\.1\d* is outside the prior support \[-18\.42\d*, -4\.605\d*\]"),
        ("PD-LP above ln 1e-3", syn_pd,
         r"'syn_PD_LP' = -5\.29\d* is outside the prior support \[-18\.42\d*, -6\.907\d*\]"),
        ("negative Na", neg, r"'ABPD_Na' = -1 is outside the prior support \[0, 500\]"),
        ("strings", np.array([["a"] * 31]), r"theta: expected a numeric array"),
    ]


@pytest.mark.parametrize("label, theta, message", _bad_thetas(),
                         ids=[c[0] for c in _bad_thetas()])
def test_engine_rejects_bad_theta(engine_sim, label, theta, message):
    with pytest.raises(ShapeError, match=message):
        engine_sim.simulate(jax.random.key(0), theta)


def test_engine_accepts_theta_inside_the_prior(engine_sim):
    """The checks are the prior's box, not stricter: values just inside every edge and
    AB-LP up to ln 1e-2 pass validation (checked without simulating)."""
    low, high = (np.asarray(a, np.float64) for a in engine_sim.prior.support)
    eps = 1e-5 * (high - low)
    theta = np.stack([low + eps, high - eps, _centre_theta(1)[0]])
    theta[2, SYN_AB_LP] = np.log(5e-3)
    out = engine_sim.check_theta(theta)
    assert out.shape == (3, 31)


def test_engine_accepts_theta_on_the_prior_edges():
    """θ exactly on the prior box (float32(0.01) < 0.01) is inside, both from float64 input."""
    sim = pyloric.build(**SHORT)
    low, high = sim.prior.support
    sim.check_theta(np.stack([low, high]).astype(np.float64))


def test_simulate_features_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"theta: expected shape \(n, 31\), got \(2, 30\)"):
        pyloric.simulate_features(jax.random.key(0), _centre_theta()[:, :30], **SHORT)


@pytest.mark.parametrize("label, col, value, message", [
    ("shape", None, None, r"^error: theta: expected shape \(n, 31\), got \(3, 30\)$"),
    ("NaN", LP_LEAK, np.nan, r"^error: theta: row 0, 'LP_Leak' is nan \(must be finite\)$"),
    ("LP leak", LP_LEAK, 0.5,
     r"^error: theta: row 0, 'LP_Leak' = 0\.5 is outside the prior support \[0\.01, 0\.04\]$"),
])
def test_cli_rejects_bad_theta(tmp_path, capsys, label, col, value, message):
    theta = _centre_theta(3)
    if col is None:
        theta = theta[:, :30]
    else:
        theta[0, col] = value
    np.save(tmp_path / "bad.npy", theta)
    out = tmp_path / "d"
    code = cli.main(["simulate", "pyloric", "--theta", str(tmp_path / "bad.npy"),
                     "--noise-std", "0", "--t-max", "1500", "--t-burn", "500",
                     "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert re.match(message, lines[0]), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()  # rejected before a dataset is created
