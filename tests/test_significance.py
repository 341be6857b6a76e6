"""Significance: reference values, gradients, threshold scans, pyhf profile likelihood."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.significance import (
    Template,
    ams,
    asimov_z,
    asimov_z_sigma_b,
    histfactory_spec,
    histogram,
    profile_significance,
    templates_from_scores,
    threshold_scan,
)


def _z_ref(s, b):
    s, b = np.float64(s), np.float64(b)
    return np.sqrt(2 * ((s + b) * np.log(1 + s / b) - s))


def _z_sigma_ref(s, b, sig):
    s, b, v = np.float64(s), np.float64(b), np.float64(sig) ** 2
    return np.sqrt(2 * ((s + b) * np.log((s + b) * (b + v) / (b**2 + (s + b) * v))
                        - b**2 / v * np.log(1 + v * s / (b * (b + v)))))


# ----------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------


def test_reference_values():
    assert float(asimov_z(10.0, 100.0)) == pytest.approx(0.984, abs=5e-4)
    assert float(asimov_z_sigma_b(10.0, 100.0, 10.0)) == pytest.approx(0.6902, abs=1e-4)
    ams_ref = np.sqrt(2 * ((10 + 100 + 10) * np.log(1 + 10 / 110) - 10))
    assert float(ams(10.0, 100.0)) == pytest.approx(ams_ref, rel=1e-6)
    assert float(ams(10.0, 100.0, b_reg=0.0)) == pytest.approx(_z_ref(10, 100), rel=1e-6)
    assert float(asimov_z(0.0, 50.0)) == 0.0 and float(asimov_z_sigma_b(0.0, 50.0, 5.0)) == 0.0
    # σ_b → 0 is the plain Asimov significance; a larger σ_b lowers Z
    assert float(asimov_z_sigma_b(10.0, 100.0, 0.0)) == pytest.approx(0.98399, rel=1e-5)
    zs = [float(asimov_z_sigma_b(10.0, 100.0, sig)) for sig in (1e-3, 1.0, 5.0, 10.0, 30.0)]
    assert zs[0] == pytest.approx(0.98399, rel=1e-4) and np.all(np.diff(zs) < 0)


@pytest.mark.parametrize("t", [1e-6, 1e-4, 5e-3, 0.0099, 0.0101, 0.05, 0.3, 1.0, 10.0])
def test_float32_accuracy_over_signal_to_background(t):
    for b in (10.0, 1000.0, 1e5):
        s = t * b
        np.testing.assert_allclose(float(asimov_z(jnp.float32(s), jnp.float32(b))),
                                   s / np.sqrt(b) if t < 1e-5 else _z_ref(s, b), rtol=2e-5)
        np.testing.assert_allclose(float(ams(jnp.float32(s), jnp.float32(b))),
                                   _z_ref(s, b + 10.0) if s / (b + 10) > 1e-5
                                   else s / np.sqrt(b + 10), rtol=2e-5)
        for rel in (0.05, 0.5):
            want = (s / np.sqrt(b + (rel * b) ** 2) if t < 1e-3
                    else _z_sigma_ref(s, b, rel * b))
            np.testing.assert_allclose(
                float(asimov_z_sigma_b(jnp.float32(s), jnp.float32(b), jnp.float32(rel * b))),
                want, rtol=2e-4 if t < 1e-3 else 1e-4)


def test_gradients_match_finite_differences():
    # JAX gradients (float64) against central differences of the numpy float64 formulas
    refs = {asimov_z: _z_ref, ams: lambda s, b: _z_ref(s, b + 10.0),
            asimov_z_sigma_b: _z_sigma_ref}
    points = np.array([(10.0, 100.0, 10.0), (0.5, 100.0, 3.0), (0.99, 100.0, 20.0),
                       (1.01, 100.0, 20.0), (50.0, 1000.0, 100.0), (200.0, 30.0, 5.0)])
    with jax.enable_x64(True):
        for f, ref in refs.items():
            n_args = 3 if f is asimov_z_sigma_b else 2
            grad = jax.vmap(jax.grad(lambda *a, f=f: f(*a), argnums=tuple(range(n_args))))(
                *(jnp.asarray(points[:, i]) for i in range(n_args)))
            for i in range(n_args):
                h = 1e-4 * points[:, i]  # O(h²) truncation; float64 round-off stays small
                up, down = points[:, :n_args].copy(), points[:, :n_args].copy()
                up[:, i] += h
                down[:, i] -= h
                want = (ref(*up.T) - ref(*down.T)) / (2 * h)
                np.testing.assert_allclose(np.asarray(grad[i]), want, rtol=1e-5, atol=1e-9)
        # finite gradients at s = 0 (losses start from empty selections)
        assert float(jax.grad(asimov_z)(0.0, 100.0)) == pytest.approx(0.1, rel=1e-9)
        assert float(jax.grad(asimov_z_sigma_b)(0.0, 100.0, 10.0)) == pytest.approx(
            1 / np.sqrt(200.0), rel=1e-9)
    # float32, as a loss sees it: finite everywhere, including at s = 0 and σ_b = 0
    g32 = jax.grad(asimov_z_sigma_b, argnums=(0, 1, 2))(0.0, 100.0, 0.0)
    assert all(bool(jnp.isfinite(v)) for v in g32)


def test_vectorised_and_jittable():
    s = jnp.linspace(0.0, 20.0, 7)
    z = jax.jit(jax.vmap(lambda si: asimov_z_sigma_b(si, 100.0, 10.0)))(s)
    np.testing.assert_allclose(np.asarray(z), np.asarray(asimov_z_sigma_b(s, 100.0, 10.0)),
                               rtol=1e-5)
    assert bool(jnp.all(jnp.diff(z) > 0))


# ----------------------------------------------------------------------------------
# Threshold scan
# ----------------------------------------------------------------------------------


def test_threshold_scan_finds_the_known_optimum():
    # signal scores with density 2x on [0, 1] (s(t) = S(1 − t²)), background flat
    # (b(t) = B(1 − t)); for s ≪ b, Z ≈ S(1+t)√(1−t)/√B peaks at t = 1/3.
    n, S, B = 20_000, 10.0, 1000.0
    u = (np.arange(n) + 0.5) / n
    scores = np.concatenate([np.sqrt(u), u])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    w = np.concatenate([np.full(n, S / n), np.full(n, B / n)])
    res = threshold_scan(scores, y, w)
    best = optimize.minimize_scalar(lambda t: -_z_ref(S * (1 - t**2), B * (1 - t)),
                                    bounds=(0.0, 0.99), method="bounded", options={"xatol": 1e-8})
    assert best.x == pytest.approx(1 / 3, abs=0.01)
    assert res.threshold == pytest.approx(best.x, abs=2e-3)
    assert res.z == pytest.approx(-best.fun, rel=1e-4)
    assert res.thresholds.shape == res.z_curve.shape == res.s.shape == res.b.shape
    # with a background uncertainty the optimum moves to a tighter cut
    res_sys = threshold_scan(scores, y, w, rel_sigma_b=0.05)
    assert res_sys.threshold > res.threshold and res_sys.z < res.z


def test_threshold_scan_matches_brute_force_with_ties_and_weights():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    scores = np.round(rng.normal(y * 1.0, 1.0), 1)  # many ties
    w = rng.uniform(0.1, 2.0, n) * np.where(y == 1, 0.2, 3.0)
    for metric, kw in (("asimov", {}), ("ams", {"b_reg": 10.0}), ("asimov", {"rel_sigma_b": 0.1})):
        res = threshold_scan(scores, y, w, metric=metric, **kw)
        for t, z, s_sel, b_sel in zip(res.thresholds, res.z_curve, res.s, res.b):
            sel = scores >= t
            s_want, b_want = w[sel & (y == 1)].sum(), w[sel & (y == 0)].sum()
            assert s_sel == pytest.approx(s_want) and b_sel == pytest.approx(b_want)
            if b_want > 0:
                if metric == "ams":
                    want = _z_ref(s_want, b_want + 10.0)
                elif kw:
                    want = _z_sigma_ref(s_want, b_want, 0.1 * b_want) if s_want > 0 else 0.0
                else:
                    want = _z_ref(s_want, b_want)
                assert z == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert res.z == np.nanmax(res.z_curve)
        sel = scores >= res.threshold
        assert res.s[np.searchsorted(res.thresholds, res.threshold)] == pytest.approx(
            w[sel & (y == 1)].sum())
    # a given grid of thresholds, with selections of no background marked invalid
    res = threshold_scan(scores, y, w, thresholds=[-1.0, 0.0, 1.0, 100.0])
    assert np.isnan(res.z_curve[-1]) and np.all(np.isfinite(res.z_curve[:-1]))
    assert res.thresholds.tolist() == [-1.0, 0.0, 1.0, 100.0]


def test_threshold_scan_rejects_bad_input():
    with pytest.raises(ShapeError, match="equal non-zero lengths"):
        threshold_scan([0.1, 0.2], [1], [1.0, 1.0])
    with pytest.raises(ShapeError, match="labels 0"):
        threshold_scan([0.1, 0.2], [1, 2])
    with pytest.raises(ShapeError, match="scores: contains NaN"):
        threshold_scan([np.nan, 0.2], [1, 0])
    with pytest.raises(ConfigError, match="metric"):
        threshold_scan([0.1, 0.2], [1, 0], metric="auc")


# ----------------------------------------------------------------------------------
# Histograms and pyhf
# ----------------------------------------------------------------------------------


def test_histogram_keeps_all_weight():
    h = histogram([-1.0, 0.1, 0.5, 0.7, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(h, [3.0, 12.0])
    with pytest.raises(ConfigError, match="bins"):
        histogram([0.1], [1.0], [1.0, 0.0])


def test_templates_and_spec_validation():
    bins = [0.0, 0.5, 1.0]
    nominal = {"sig": ([0.8, 0.9], [1.0, 1.0]), "bkg": ([0.1, 0.6], [5.0, 5.0])}
    variations = {"jes": {"down": {"bkg": ([0.1, 0.4], [5.0, 5.0])},
                          "up": {"bkg": ([0.6, 0.7], [5.0, 5.0])}}}
    templates = templates_from_scores(bins, nominal, signal=["sig"], variations=variations,
                                      normsys={"lumi": {"sig": (0.98, 1.02), "bkg": (0.98, 1.02)}})
    by_name = {t.name: t for t in templates}
    assert by_name["sig"].signal and not by_name["bkg"].signal
    np.testing.assert_allclose(by_name["bkg"].histosys["jes"][0], [10.0, 0.0])
    np.testing.assert_allclose(by_name["bkg"].histosys["jes"][1], [0.0, 10.0])
    spec = histfactory_spec(templates)
    mods = {m["name"]: m["type"] for s in spec["channels"][0]["samples"] for m in s["modifiers"]}
    assert mods == {"mu": "normfactor", "jes": "histosys", "lumi": "normsys"}
    with pytest.raises(ShapeError, match="no background"):
        histfactory_spec([Template("s", [1.0, 1.0], signal=True), Template("b", [0.0, 3.0])])
    with pytest.raises(ConfigError, match="at least one signal"):
        histfactory_spec([Template("b", [1.0])])
    with pytest.raises(ShapeError, match="non-negative"):
        Template("b", [-1.0])


@pytest.mark.parametrize("normsys", [(0.9, 1.1, 1.2), 0.9, ("a", "b"), (0.0, 1.1)])
def test_template_normsys_must_be_a_positive_pair(normsys):
    with pytest.raises(ConfigError, match="template 'b' normsys 'n'"):
        Template("b", [1.0, 2.0], normsys={"n": normsys})


@pytest.mark.parametrize("kwargs, field", [
    ({"fixed": ["mu"]}, "fixed"), ({"fixed": "bn"}, "fixed"), ({"fixed": 3}, "fixed"),
    ({"mu_bounds": (2.0, 10.0)}, "mu_bounds"), ({"mu_bounds": (-1.0, 0.5)}, "mu_bounds"),
    ({"mu_bounds": 5.0}, "mu_bounds"), ({"mu_bounds": (0.0, float("inf"))}, "mu_bounds"),
])
def test_profile_significance_rejects_bad_options(kwargs, field):
    templates = [Template("s", [1.0], signal=True),
                 Template("b", [3.0], normsys={"bn": (0.9, 1.1)})]
    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        profile_significance(templates, **kwargs)


def test_missing_pyhf_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyhf", None)
    with pytest.raises(ImportError, match=r"pip install 'sbi-engine\[physics\]'"):
        profile_significance([Template("s", [1.0], signal=True), Template("b", [3.0])])


@pytest.fixture(scope="module")
def pyhf_results():
    """All pyhf fits of this module in one place (each model compiles once)."""
    pytest.importorskip("pyhf")
    s, b = 10.0, 100.0
    sig, bkg = np.array([2.0, 5.0, 8.0]), np.array([80.0, 30.0, 10.0])
    shape_up, shape_down = bkg * [0.9, 1.0, 1.3], bkg * [1.1, 1.0, 0.7]
    multi = [Template("sig", sig, signal=True),
             Template("bkg", bkg, histosys={"shape": (shape_down, shape_up)})]
    return {
        "one_bin": profile_significance([Template("sig", [s], signal=True),
                                         Template("bkg", [b])]),
        "one_bin_normsys": profile_significance([
            Template("sig", [s], signal=True), Template("bkg", [b], normsys={"bn": (0.9, 1.1)})]),
        "multi_histosys": profile_significance(multi),
        "multi_fixed": profile_significance(multi, fixed=["shape"]),
        "multi": (sig, bkg),
    }


def test_pyhf_one_bin_agrees_with_asimov_formula(pyhf_results):
    res = pyhf_results["one_bin"]
    assert res.z0 == pytest.approx(_z_ref(10.0, 100.0), rel=1e-4)
    # Fisher information of μ on Asimov data: s²/(s+b)
    assert res.mu_uncertainty == pytest.approx(np.sqrt(110.0) / 10.0, rel=1e-4)
    assert res.mu_uncertainty_stat == pytest.approx(res.mu_uncertainty, rel=1e-9)
    # float64 was switched on only inside the fit
    assert not jax.config.jax_enable_x64 and jnp.ones(1).dtype == jnp.float32


def test_pyhf_normsys_lowers_significance(pyhf_results):
    res, ref = pyhf_results["one_bin_normsys"], pyhf_results["one_bin"]
    assert res.z0 < ref.z0 - 0.2
    # close to the closed form with σ_b = 10% of b (Gaussian vs Poisson auxiliary term)
    assert res.z0 == pytest.approx(float(asimov_z_sigma_b(10.0, 100.0, 10.0)), rel=0.03)
    assert res.mu_uncertainty == pytest.approx(np.sqrt(110.0 + 100.0) / 10.0, rel=0.01)
    assert res.mu_uncertainty_stat == pytest.approx(ref.mu_uncertainty, rel=1e-6)


def test_pyhf_multibin_and_histosys(pyhf_results):
    sig, bkg = pyhf_results["multi"]
    # independent bins (the histosys fixed): q0 is the sum of the per-bin Asimov q0
    z_bins = np.sqrt(np.sum([_z_ref(s, b) ** 2 for s, b in zip(sig, bkg)]))
    shape, fixed = pyhf_results["multi_histosys"], pyhf_results["multi_fixed"]
    assert shape.z0 < fixed.z0 and shape.mu_uncertainty > fixed.mu_uncertainty
    assert fixed.z0 == pytest.approx(z_bins, rel=1e-4)
    assert fixed.mu_uncertainty == pytest.approx(shape.mu_uncertainty_stat, rel=1e-6)
