"""Pyloric simulator: reference circuits, online vs whole-trace features, engine contract,
recording extraction.

The reference values are those of ``mackelab/pyloric`` (noise_std = 0, 18 features):
the circuits θ₁, θ₂ below and their features as given in the task brief.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simulators import pyloric
from simulators.pyloric import features as F
from simulators.pyloric.simulator import bursts_online

THETA_1 = [212.113902, 1.478108, 5.146624, 28.924275, 14.429948, 137.781018, 0.001852,
           0.007879, 76.128121, 0.386546, 5.243721, 46.209373, 3.028078, 86.707233,
           0.045096, 0.020853, 498.285787, 7.588804, 1.727937, 46.917664, 1.215287,
           116.490452, 0.027549, 0.017929, -9.023186, -16.734829, -12.85854, -10.147218,
           -7.372931, -14.997706, -8.180327]
THETA_2 = [102.822262, 0.581702, 3.067914, 11.872229, 11.730061, 76.607498, 0.007178,
           0.004775, 152.001813, 0.224029, 4.128232, 20.214917, 6.764827, 51.098563,
           0.029495, 0.016276, 531.105709, 8.345334, 3.176011, 48.002311, 0.539173,
           141.72911, 0.003823, 0.011794, -14.49602, -11.682581, -7.762917, -16.274646,
           -8.785116, -14.947767, -10.479587]
REF_1 = [1170.621429, 213.63125, 215.752778, 395.316667, 0.182494, 0.184306, 0.337698,
         0.420952, 0.638788, 492.775, 255.003571, 279.221429, 43.564286, 0.238524, 0.037215,
         2.5, 2.5, 2.5]
REF_2 = [1122.803571, 194.253125, 189.169444, 404.097222, 0.173007, 0.16848, 0.3599,
         0.416508, 0.620793, 467.657143, 229.371429, 273.453571, 41.271429, 0.243545,
         0.036757, 2.5, 2.5, 2.5]
COUNTS_1 = ((8, 9, 9), (80, 109, 141))
# θ₁ at 299 K (all Q10s active), from a local build of the reference simulator.
REF_1_299K = [461.7285714, 61.7488636, 69.7047619, 167.5795455, 0.1337341, 0.1509648,
              0.3629395, 0.3764864, 0.6238307, 173.8345238, 114.2059524, 112.0857143,
              44.5011905, 0.2427524, 0.0963795, 2.5, 2.5, 2.5]
COUNTS_1_299K = ((22, 21, 22), (220, 273, 521))
COUNTS_2 = ((8, 9, 9), (85, 72, 168))
# A circuit of the reference's own test suite with non-trivial plateaus.
THETA_PLATEAU = [286.921725, 0.0975099899, 5.53758392, 21.755384, 12.1938578, 123.777092,
                 0.00964585042, 0.00516584517, 167.802913, 0.994858342, 7.71058188,
                 19.2827439, 7.30915903, 43.390796, 0.050381617, 0.021214225, 477.249899,
                 5.10924385, 0.713955321, 39.6705037, 4.89271588, 59.2566636, 0.0551743568,
                 0.0121729756, -10.8318439, -10.5837408, -13.891689, -9.07825715, -8.90034224,
                 -15.7819342, -7.23973359]
SHORT = {"t_max": 2500.0, "t_burn": 500.0}  # 2 s recorded: fast, still ~2 cycles


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.abs(x - ref) / np.abs(ref)


@pytest.fixture(scope="module")
def reference_run():
    """θ₁, θ₂ at 283 K and θ₁ at 299 K, noiseless, float64, full 11 s, all features
    (one compiled batch)."""
    with jax.enable_x64(True):
        return pyloric.simulate_features(
            jax.random.key(0), np.array([THETA_1, THETA_2, THETA_1]), noise_std=0.0,
            features="full", dtype=jnp.float64, temperature=np.array([283.0, 283.0, 299.0]))


@pytest.mark.parametrize("row, ref, counts", [(0, REF_1, COUNTS_1), (1, REF_2, COUNTS_2),
                                              (2, REF_1_299K, COUNTS_1_299K)])
def test_reference_circuits_float64(reference_run, row, ref, counts):
    x = reference_run[row]
    assert x.dtype == np.float64
    assert np.all(np.isfinite(x[:18]))
    err = _rel_err(x[:18], ref)
    assert err.max() < 1e-2, f"max relative error {err.max():.2e} at feature {err.argmax()}"
    np.testing.assert_array_equal(x[18:21], counts[0])  # bursts per cell
    np.testing.assert_array_equal(x[21:24], counts[1])  # spikes per cell
    assert x[24] == 1.0  # pyloric-like


def _synthetic_trace(seed: int, n: int = 3 * 40 * 1000) -> np.ndarray:
    """Bursting-like voltages (3, n) at dt = 0.025 ms: spike trains grouped in bursts
    (some short, some with gaps near 150 ms), depolarised plateaus, spikes at both edges,
    plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    v = -60.0 + 0.3 * rng.standard_normal((3, n))
    for cell in range(3):
        k = int(rng.integers(-5, 300))
        while k < n + 200:
            n_sp = int(rng.integers(1, 12))
            isi = int(rng.integers(120, 1200))
            for j in range(n_sp):
                c = k + j * isi
                v[cell] += 90.0 * np.exp(-0.5 * ((t - c) / 12.0) ** 2)
            if rng.random() < 0.5:  # plateau under the burst
                a, b = k, k + n_sp * isi + int(rng.integers(0, 3000))
                v[cell, max(a, 0):max(min(b, n), 0)] += 35.0
            k += n_sp * isi + int(rng.choice([5990, 6000, 6010, int(rng.integers(4000, 30000))]))
    v[0, :6] += 80.0 * np.exp(-0.5 * ((np.arange(6) - 3) / 2.0) ** 2)  # spike at the start
    v[1, -6:] += 80.0 * np.exp(-0.5 * ((np.arange(6) - 2) / 2.0) ** 2)  # ... and at the end
    return v


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_online_detector_matches_whole_trace(seed, sequential):
    v = _synthetic_trace(seed)
    with jax.enable_x64(True):
        online = jax.tree.map(np.asarray, bursts_online(jnp.asarray(v), sequential=sequential))
    offline = F.bursts_from_trace(v, pyloric.DT)
    for name in F.Bursts._fields:
        np.testing.assert_array_equal(getattr(online, name), getattr(offline, name),
                                      err_msg=name)
    assert offline.n_bursts.sum() > 3 and offline.plateau_sum.sum() > 0


def _silent_theta() -> np.ndarray:
    theta = np.array(THETA_1)
    theta[:24] = 0.0
    theta[7] = theta[15] = theta[23] = 0.01  # leak only
    return theta


SHORT_KEY = 3
SHORT_OPTS = {"noise_std": 0.001, "features": "full", **SHORT}


@pytest.fixture(scope="module")
def short_thetas() -> np.ndarray:
    return np.array([THETA_PLATEAU, THETA_1, _silent_theta()])


@pytest.fixture(scope="module")
def short_run(short_thetas):
    """Short noisy float32 runs of three circuits (one compiled batch, shared by tests)."""
    return pyloric.simulate_features(jax.random.key(SHORT_KEY), short_thetas, **SHORT_OPTS)


def test_simulated_trace_features_match_online_features(short_run):
    """Same key → the numpy path on the full-resolution trace gives the online features."""
    row_key = jax.random.fold_in(jax.random.key(SHORT_KEY), 0)  # row 0 of simulate_features
    v = pyloric.simulate_traces(row_key, np.array(THETA_PLATEAU), noise_std=0.001,
                                downsample=1, **SHORT)
    offline = pyloric.features_from_trace(v, pyloric.DT)
    np.testing.assert_allclose(short_run[0], offline, rtol=1e-5, equal_nan=True)
    assert short_run[0, 21:24].min() > 0  # every cell spikes


def test_determinism_and_vmap_equals_loop(short_run, short_thetas):
    key = jax.random.key(SHORT_KEY)
    again = pyloric.simulate_features(key, short_thetas, **SHORT_OPTS)
    np.testing.assert_array_equal(short_run, again)
    one = jax.jit(lambda k, t: pyloric.simulate_one(k, t, **SHORT_OPTS))
    loop = np.stack([np.asarray(one(jax.random.fold_in(key, i), t))
                     for i, t in enumerate(short_thetas)])
    np.testing.assert_allclose(short_run, loop, rtol=1e-5, equal_nan=True)
    other = pyloric.simulate_features(jax.random.key(12), short_thetas, **SHORT_OPTS)
    assert not np.array_equal(np.nan_to_num(short_run), np.nan_to_num(other))  # noise matters


def test_silent_circuit_is_nan(short_run):
    x = short_run[2]
    assert np.all(np.isnan(x[:18]))
    np.testing.assert_array_equal(x[18:], 0.0)


def test_build_contract(short_run):
    sim = pyloric.build(noise_std=0.001, temperature_nuisance=True, **SHORT)
    assert sim.name == "pyloric" and sim.dim_theta == 31 and sim.dim_x == 18
    assert sim.parameters[0].name == "ABPD_Na" and sim.parameters[0].unit == "mS/cm^2"
    assert sim.parameters[24].name == "syn_AB_LP"
    np.testing.assert_allclose(sim.parameters[24].high, np.log(1e-2))
    np.testing.assert_allclose(sim.parameters[25].high, np.log(1e-3))
    low, high = sim.prior.support
    assert low[15] == 0.01 and high[15] == 0.04  # LP leak
    assert sim.dim_nu == 1 and sim.nuisances[0].nominal == 283.0
    x = np.asarray(sim.simulate(jax.random.key(SHORT_KEY), np.array([THETA_PLATEAU] * 2),
                                np.array([[283.0], [293.0]])))
    assert x.shape == (2, 18) and x.dtype == np.float32
    # engine rows use fold_in(key, i), as simulate_features; 283 K = no Q10 scaling
    np.testing.assert_allclose(x[0], short_run[0, :18], rtol=1e-5, equal_nan=True)
    assert not np.allclose(x[1], x[0], equal_nan=True)  # temperature matters
    assert pyloric.build(features="15", **SHORT).dim_x == 15
    assert pyloric.build(**SHORT).dim_nu == 0
    with pytest.raises(ValueError, match="features"):
        pyloric.build(features="17")
    with pytest.raises(ValueError, match="t_max"):
        pyloric.build(t_max=1000.0, t_burn=1000.0)
    with pytest.raises(ValueError, match="noise_std"):
        pyloric.build(noise_std=-1.0)


def test_observation():
    x_o = pyloric.observation()
    assert x_o.shape == (18,)
    np.testing.assert_allclose(x_o[[0, 1, 15]], [1170.859, 206.036, 2.5])
    assert pyloric.observation("15").shape == (15,)
    with pytest.raises(ValueError, match="18"):
        pyloric.observation("full")


@pytest.fixture(scope="module")
def recording():
    """A simulated 2 s recording (3, N) at 40 kHz and its online features."""
    v = pyloric.simulate_traces(jax.random.key(5), np.array(THETA_1), noise_std=0.001,
                                downsample=1, **SHORT)
    return v


def test_recording_roundtrip(recording, tmp_path):
    v = recording
    expect = pyloric.features_from_trace(v, pyloric.DT)[:18]
    np.savetxt(tmp_path / "rec.csv", v.T, delimiter=",", header="ABPD,LP,PY", comments="")
    np.savez(tmp_path / "rec.npz", voltage=v.T)
    for src in (tmp_path / "rec.csv", tmp_path / "rec.npz", v.T, v):
        x = pyloric.features_from_recording(src, sampling_rate_hz=40000.0)
        np.testing.assert_allclose(x, expect, rtol=1e-6, equal_nan=True)
    assert np.isfinite(expect[:4]).all()
    # a 20 kHz recording of the same circuit: same definitions in ms, close features
    x20 = pyloric.features_from_recording(v[:, ::2], sampling_rate_hz=20000.0)
    np.testing.assert_allclose(x20[:4], expect[:4], rtol=2e-2)


def test_recording_errors(recording, tmp_path):
    v = recording
    with pytest.raises(ValueError, match="sampling_rate_hz.*too low"):
        pyloric.features_from_recording(v, sampling_rate_hz=40.0)  # kHz given as Hz
    with pytest.raises(ValueError, match="sampling_rate_hz"):
        pyloric.features_from_recording(v, sampling_rate_hz=-1)
    with pytest.raises(ValueError, match="sampling_rate_hz"):
        pyloric.features_from_recording(v, sampling_rate_hz="fast")
    with pytest.raises(ValueError, match="too short"):
        pyloric.features_from_recording(v[:, :20000], sampling_rate_hz=40000.0)
    with pytest.raises(ValueError, match="too short"):
        pyloric.features_from_recording(v, sampling_rate_hz=40000.0, t_burn=1500.0)
    with pytest.raises(ValueError, match="three traces"):
        pyloric.features_from_recording(v[:2], sampling_rate_hz=40000.0)
    bad = v.copy()
    bad[1, 10] = np.nan
    with pytest.raises(ValueError, match="LP sample 10"):
        pyloric.features_from_recording(bad, sampling_rate_hz=40000.0)
    with pytest.raises(FileNotFoundError):
        pyloric.features_from_recording(tmp_path / "missing.csv", sampling_rate_hz=40000.0)
    (tmp_path / "rec.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"\.csv"):
        pyloric.features_from_recording(tmp_path / "rec.xlsx", sampling_rate_hz=40000.0)


@pytest.mark.slow
def test_reference_circuits_float32():
    x = pyloric.simulate_features(jax.random.key(0), np.array([THETA_1, THETA_2]),
                                  noise_std=0.0, features="full", dtype=jnp.float32)
    for row, ref, counts in [(0, REF_1, COUNTS_1), (1, REF_2, COUNTS_2)]:
        assert _rel_err(x[row, :18], ref).max() < 1e-2
        np.testing.assert_array_equal(x[row, 18:24], counts[0] + counts[1])
