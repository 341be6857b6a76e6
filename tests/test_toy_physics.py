"""Event generators: the contract suite, moments against the definitions, nuisance effects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sbi_engine.errors import ConfigError, ShapeError, UnknownSimulatorError
from sbi_engine.events import (
    EventGenerator,
    get_generator,
    list_generators,
    make_dataset,
    process_ids,
    register_generator,
)
from simulators.toy_physics import GENERATORS
from simulators.toy_physics.higgs_like import FEATURES
from simulators.toy_physics.inferno import BENCHMARKS, PUBLISHED, expected_uncertainty

N_MOMENTS = 20_000  # moments: std of a sample mean of a unit-variance feature is 0.007
N_SMALL = 512  # one size for the contract checks, so eager ops compile once per shape


@pytest.fixture(scope="module", params=sorted(GENERATORS))
def gen(request) -> EventGenerator:
    return GENERATORS[request.param]()


def _feature(name):
    return FEATURES.index(name)


# ----------------------------------------------------------------------------------
# Contract suite: every generator
# ----------------------------------------------------------------------------------


def test_spec_is_consistent(gen):
    assert gen.signal_processes and gen.background_processes
    assert len(gen.nuisances) == len(gen.constraints) == gen.dim_nu
    nominal = gen.nominal_nu()
    for par, value in zip(gen.nuisances, nominal):
        assert par.low <= value <= par.high
    prior = gen.nuisance_prior
    draws = np.asarray(prior.sample(jax.random.key(0), 256))
    assert draws.shape == (256, gen.dim_nu)
    low, high = prior.support
    assert np.all(draws >= low) and np.all(draws <= high)
    spec = gen.spec()
    assert spec["features"] == list(gen.features)
    assert set(spec["nominal_yields"]) == set(gen.process_names)


def test_sample_shape_finite_and_deterministic(gen):
    key = jax.random.key(3)
    for proc in gen.process_names:
        x = gen.sample(key, N_SMALL, proc)
        assert x.shape == (N_SMALL, gen.dim_x) and x.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(x)))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(gen.sample(key, N_SMALL, proc)))
        other = gen.sample(jax.random.key(4), N_SMALL, proc)
        assert not np.allclose(np.asarray(x), np.asarray(other))


def test_rows_do_not_depend_on_n():
    # row i uses fold_in(key, i) (base-class behaviour; checked on the cheapest toy)
    gen = GENERATORS["pivot"]()
    key = jax.random.key(3)
    np.testing.assert_array_equal(np.asarray(gen.sample(key, 8, "signal")),
                                  np.asarray(gen.sample(key, N_SMALL, "signal")[:8]))


def test_jit_and_vmap_over_nu_match_eager(gen):
    proc = gen.signal_processes[0]
    key = jax.random.key(5)
    lo = jnp.asarray([p.low for p in gen.nuisances], jnp.float32)
    nus = jnp.stack([jnp.asarray(gen.nominal_nu()), 0.5 * (lo + jnp.asarray(gen.nominal_nu()))])
    batched = jax.jit(jax.vmap(lambda nu: gen.sample(key, N_SMALL, proc, nu)))(nus)
    for i in range(2):
        eager = np.asarray(gen.sample(key, N_SMALL, proc, nus[i]))
        np.testing.assert_allclose(np.asarray(batched[i]), eager, rtol=1e-4, atol=1e-4)


def test_sample_each_uses_one_nu_per_row(gen):
    proc = gen.signal_processes[0]
    key = jax.random.key(6)
    nu = np.tile(gen.nominal_nu(), (N_SMALL, 1))
    np.testing.assert_allclose(np.asarray(gen.sample_each(key, proc, nu)),
                               np.asarray(gen.sample(key, N_SMALL, proc)), rtol=1e-6)


def test_dataset_weights_sum_to_expected_yields(gen):
    draw = gen.nuisance_prior.sample(jax.random.key(7), 1)[0]
    x, y, w = make_dataset(jax.random.key(8), gen, draw, N_SMALL)
    ids = process_ids(gen, N_SMALL)
    assert x.shape == (N_SMALL * len(gen.processes), gen.dim_x)
    assert y.shape == w.shape == ids.shape
    for p, proc in enumerate(gen.processes):
        sel = ids == p
        np.testing.assert_allclose(float(jnp.sum(w[sel])),
                                   float(gen.expected_yield(proc.name, draw)), rtol=1e-5)
        assert np.all(np.asarray(y[sel]) == (1.0 if proc.signal else 0.0))
    # one nu per event: the weights of a process sum to its mean yield over its rows
    rows = gen.nuisance_prior.sample(jax.random.key(9), len(ids))
    _, _, w_each = make_dataset(jax.random.key(8), gen, rows, N_SMALL)
    for p, proc in enumerate(gen.processes):
        sel = ids == p
        yields = jax.vmap(lambda r, name=proc.name: gen.expected_yield(name, r))(rows[sel])
        np.testing.assert_allclose(float(jnp.sum(w_each[sel])), float(jnp.mean(yields)),
                                   rtol=1e-5)


def test_dataset_counts_per_process():
    gen = GENERATORS["inferno"]()
    nu = gen.make_nu(b=900.0)
    x, y, w = make_dataset(jax.random.key(0), gen, nu, {"signal": N_SMALL, "background": N_SMALL})
    np.testing.assert_allclose([float(w[:N_SMALL].sum()), float(w[N_SMALL:].sum())],
                               [50.0, 900.0], rtol=1e-5)
    assert float(y.sum()) == N_SMALL
    # processes left out get no events; the others' events do not change
    x_sig, y_sig, _ = make_dataset(jax.random.key(0), gen, nu, {"signal": N_SMALL})
    assert process_ids(gen, {"signal": N_SMALL}).tolist() == [0] * N_SMALL
    assert x_sig.shape == (N_SMALL, 3) and float(y_sig.min()) == 1.0
    np.testing.assert_array_equal(np.asarray(x[:N_SMALL]), np.asarray(x_sig))


def test_expected_yield_is_differentiable(gen):
    for proc in gen.process_names:
        g = jax.grad(lambda nu, proc=proc: gen.expected_yield(proc, nu))(
            jnp.asarray(gen.nominal_nu()))
        assert g.shape == (gen.dim_nu,) and bool(jnp.all(jnp.isfinite(g)))


def test_bad_input_gives_clear_errors(gen):
    with pytest.raises(ConfigError, match="unknown process 'nope'"):
        gen.sample(jax.random.key(0), 4, "nope")
    with pytest.raises(ShapeError, match=rf"nu: expected shape \({gen.dim_nu},\)"):
        gen.sample(jax.random.key(0), 4, 0, jnp.zeros(gen.dim_nu + 1))
    with pytest.raises(ConfigError, match="unknown nuisance"):
        gen.make_nu(not_a_nuisance=1.0)
    with pytest.raises(ConfigError, match="n_per_process"):
        make_dataset(jax.random.key(0), gen, None, {"nope": 3})


@pytest.mark.parametrize("name, options, field", [
    ("inferno", {"s_exp": -50.0}, "s_exp"), ("inferno", {"b_exp": -1000.0}, "b_exp"),
    ("inferno", {"b_exp": 0.0}, "b_exp"), ("inferno", {"s_exp": float("nan")}, "s_exp"),
    ("pivot", {"s_exp": -100.0}, "s_exp"), ("pivot", {"b_exp": "x"}, "b_exp"),
    ("higgs_like", {"yields": {"htautau": -1.0}}, "yields.htautau"),
    ("higgs_like", {"yields": {"htautau": "x"}}, "yields.htautau"),
    ("higgs_like", {"yields": {"ttbar": float("inf")}}, "yields.ttbar"),
])
def test_bad_yields_name_the_option(name, options, field):
    with pytest.raises(ConfigError, match=rf"^{field}: expected a finite number >=? 0, got"):
        GENERATORS[name](**options)


def test_registry_by_name():
    register_generator("inferno-test", GENERATORS["inferno"], overwrite=True)
    assert "inferno-test" in list_generators()
    assert get_generator("INFERNO-test", s_exp=20.0).s_exp == 20.0
    with pytest.raises(UnknownSimulatorError, match="unknown event generator"):
        get_generator("no-such-generator")


# ----------------------------------------------------------------------------------
# INFERNO
# ----------------------------------------------------------------------------------


def test_inferno_moments_match_the_definition():
    gen = GENERATORS["inferno"]()
    key = jax.random.key(11)
    nu = gen.make_nu(r=0.5, **{"lambda": 2.0})
    bkg = np.asarray(gen.sample(key, N_MOMENTS, "background", nu), np.float64)
    # (x0, x1) ~ N((2 + r, 0), diag(5, 9)): 5 and 9 are variances (authors' covariance_matrix)
    np.testing.assert_allclose(bkg[:, :2].mean(0), [2.5, 0.0], atol=0.08)
    np.testing.assert_allclose(bkg[:, :2].var(0), [5.0, 9.0], rtol=0.05)
    assert abs(np.corrcoef(bkg[:, 0], bkg[:, 1])[0, 1]) < 0.03
    # x2 ~ Exp(rate lambda): mean = std = 1/lambda
    np.testing.assert_allclose([bkg[:, 2].mean(), bkg[:, 2].std()], [0.5, 0.5], rtol=0.04)
    assert stats.kstest(bkg[:2000, 2], stats.expon(scale=0.5).cdf).pvalue > 1e-3
    sig = np.asarray(gen.sample(key, N_MOMENTS, "signal", nu), np.float64)
    np.testing.assert_allclose(sig[:, :2].mean(0), [0.0, 0.0], atol=0.04)
    np.testing.assert_allclose(sig[:, :2].var(0), [1.0, 1.0], rtol=0.05)
    np.testing.assert_allclose(sig[:, 2].mean(), 0.5, rtol=0.04)  # Exp(rate 2)
    assert gen.nominal_nu().tolist() == [0.0, 3.0, 1000.0]
    assert float(gen.expected_yield("signal")) == 50.0
    assert float(gen.expected_yield("background")) == 1000.0
    assert gen.constraints == (0.4, 1.0, 100.0)


def test_inferno_nuisances_act_as_defined():
    gen = GENERATORS["inferno"]()
    key = jax.random.key(12)
    x0 = np.asarray(gen.sample(key, N_SMALL, "background"))
    x1 = np.asarray(gen.sample(key, N_SMALL, "background", gen.make_nu(r=0.4)))
    x2 = np.asarray(gen.sample(key, N_SMALL, "background", gen.make_nu(**{"lambda": 4.0})))
    np.testing.assert_allclose(x1[:, 0] - x0[:, 0], 0.4, atol=1e-5)  # r shifts x0 mean
    np.testing.assert_array_equal(x1[:, 1:], x0[:, 1:])
    np.testing.assert_allclose(x2[:, 2], x0[:, 2] * 3.0 / 4.0, rtol=1e-5)  # higher rate
    s0 = gen.sample(key, N_SMALL, "signal")
    np.testing.assert_array_equal(np.asarray(s0),
                                  np.asarray(gen.sample(key, N_SMALL, "signal", gen.make_nu(r=1))))
    assert float(gen.expected_yield("background", gen.make_nu(b=1100.0))) == 1100.0
    # pathwise gradients at a fixed key (what the inference-aware loss differentiates)
    mean_x = jax.jacobian(lambda nu: gen.sample(key, N_SMALL, "background", nu).mean(0))(
        jnp.asarray(gen.nominal_nu()))
    np.testing.assert_allclose(mean_x[0, 0], 1.0, rtol=1e-5)
    np.testing.assert_allclose(mean_x[2, 1], -x0[:, 2].mean() / 3.0, rtol=1e-4)


def test_inferno_analytic_likelihood_reproduces_the_published_row():
    # Expected uncertainty on s from the exact likelihood, as published in the paper:
    # 14.71 / 15.52 / 15.65 / 15.62 / 16.89 for B0..B4 (reading 5 and 9 as standard
    # deviations instead would give 9.86 for B0).
    gen = GENERATORS["inferno"]()
    fisher = gen.analytic_fisher(jax.random.key(13), N_MOMENTS)
    got = [expected_uncertainty(fisher, b) for b in BENCHMARKS]
    np.testing.assert_allclose(got, PUBLISHED["analytic"], rtol=0.015)
    assert got[0] < got[1] < got[2] and got[4] == max(got)
    with pytest.raises(ConfigError, match="benchmark"):
        expected_uncertainty(fisher, "B9")


def test_inferno_log_prob_matches_scipy():
    gen = GENERATORS["inferno"]()
    x = jnp.asarray([0.3, -1.2, 0.7])
    nu = gen.make_nu(r=0.2, **{"lambda": 2.5})
    want_b = (stats.norm(2.2, np.sqrt(5)).logpdf(0.3) + stats.norm(0, 3).logpdf(-1.2)
              + stats.expon(scale=1 / 2.5).logpdf(0.7))
    want_s = stats.norm.logpdf(0.3) + stats.norm.logpdf(-1.2) + stats.expon(scale=0.5).logpdf(0.7)
    np.testing.assert_allclose(float(gen.log_prob(x, "background", nu)), want_b, rtol=1e-5)
    np.testing.assert_allclose(float(gen.log_prob(x, "signal", nu)), want_s, rtol=1e-5)


# ----------------------------------------------------------------------------------
# Pivot
# ----------------------------------------------------------------------------------


def test_pivot_moments_and_nuisance():
    gen = GENERATORS["pivot"]()
    key = jax.random.key(21)
    bkg = np.asarray(gen.sample(key, N_MOMENTS, "background"), np.float64)
    np.testing.assert_allclose(bkg.mean(0), [0.0, 0.0], atol=0.04)
    np.testing.assert_allclose(np.cov(bkg.T), [[1.0, -0.5], [-0.5, 1.0]], atol=0.04)
    sig = np.asarray(gen.sample(key, N_MOMENTS, "signal", gen.make_nu(z=0.7)), np.float64)
    np.testing.assert_allclose(sig.mean(0), [1.0, 1.7], atol=0.04)
    np.testing.assert_allclose(np.cov(sig.T), np.eye(2), atol=0.04)
    # Z ~ N(0, 1) per event: the signal is marginally N((1, 1), diag(1, 2))
    z = gen.nuisance_prior.sample(jax.random.key(22), N_MOMENTS)
    marg = np.asarray(gen.sample_each(key, "signal", z), np.float64)
    np.testing.assert_allclose(marg.mean(0), [1.0, 1.0], atol=0.05)
    np.testing.assert_allclose(marg.var(0), [1.0, 2.0], rtol=0.06)
    # Z moves the signal along x1 only, and never the background
    s0 = np.asarray(gen.sample(key, N_SMALL, "signal"))
    s1 = np.asarray(gen.sample(key, N_SMALL, "signal", gen.make_nu(z=1.0)))
    np.testing.assert_allclose(s1 - s0, np.tile([0.0, 1.0], (N_SMALL, 1)), atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(gen.sample(key, N_SMALL, "background", gen.make_nu(z=1.0))),
        np.asarray(gen.sample(key, N_SMALL, "background")))
    np.testing.assert_allclose(
        float(gen.log_prob(jnp.asarray([0.5, -0.2]), "background")),
        stats.multivariate_normal([0, 0], [[1, -0.5], [-0.5, 1]]).logpdf([0.5, -0.2]), rtol=1e-5)


# ----------------------------------------------------------------------------------
# HiggsML-like
# ----------------------------------------------------------------------------------


def test_higgs_like_physics_sanity():
    gen = GENERATORS["higgs_like"]()
    key = jax.random.key(31)
    x = {p: np.asarray(gen.sample(key, N_SMALL, p), np.float64) for p in gen.process_names}
    for proc, feats in x.items():
        assert np.all(feats[:, [0, 1, 2, 3, 4, 8, 10]] >= 0), proc
        # massless visible products: m_vis^2 <= 2 * |p_tau| |p_lep| * 2, and pT sums add up
        np.testing.assert_allclose(feats[:, 10], feats[:, 0] + feats[:, 1] + feats[:, 3],
                                   rtol=1e-4)
        np.testing.assert_allclose(feats[:, 9], feats[:, 1] / feats[:, 0], rtol=1e-4)
    m = _feature("mass_vis")
    # the visible mass follows the resonance: H (125) above Z (91)
    assert np.median(x["htautau"][:, m]) > np.median(x["ztautau"][:, m]) + 10.0
    assert np.all(x["ztautau"][:, m] < 91.2 + 6 * 3.0)
    # ttbar has extra invisible momentum and harder jets
    assert np.median(x["ttbar"][:, _feature("met")]) > np.median(x["ztautau"][:, _feature("met")])
    assert np.median(x["ttbar"][:, _feature("jet_pt")]) > np.median(x["ztautau"][:, 3])


def test_higgs_like_energy_scales_rescale_consistently():
    gen = GENERATORS["higgs_like"]()
    key = jax.random.key(32)
    x0 = np.asarray(gen.sample(key, N_SMALL, "ztautau"), np.float64)
    up = np.asarray(gen.sample(key, N_SMALL, "ztautau", gen.make_nu(tes=1.05)), np.float64)
    f = _feature
    np.testing.assert_allclose(up[:, f("tau_pt")], 1.05 * x0[:, f("tau_pt")], rtol=1e-4)
    np.testing.assert_allclose(up[:, f("mass_vis")], np.sqrt(1.05) * x0[:, f("mass_vis")],
                               rtol=1e-3)
    np.testing.assert_allclose(up[:, f("pt_ratio_lep_tau")],
                               x0[:, f("pt_ratio_lep_tau")] / 1.05, rtol=1e-4)
    for name in ("lep_pt", "jet_pt", "deltaeta_tau_lep", "deltar_tau_lep"):
        np.testing.assert_allclose(up[:, f(name)], x0[:, f(name)], rtol=1e-4, atol=1e-4)
    assert np.all(up[:, f("sum_pt")] > x0[:, f("sum_pt")])
    # MET absorbs the tau change: tau pT + MET vector sum (pt_h) is unchanged only if the
    # lepton is kept fixed, which it is
    np.testing.assert_allclose(up[:, f("pt_h")], x0[:, f("pt_h")], rtol=1e-3, atol=1e-3)
    assert not np.allclose(up[:, f("met")], x0[:, f("met")])
    jes = np.asarray(gen.sample(key, N_SMALL, "ztautau", gen.make_nu(jes=0.95)), np.float64)
    np.testing.assert_allclose(jes[:, f("jet_pt")], 0.95 * x0[:, f("jet_pt")], rtol=1e-4)
    np.testing.assert_allclose(jes[:, f("tau_pt")], x0[:, f("tau_pt")], rtol=1e-5)
    soft = np.asarray(gen.sample(key, N_SMALL, "ztautau", gen.make_nu(soft_met=5.0)),
                      np.float64)
    assert soft[:, f("met")].mean() > x0[:, f("met")].mean() + 0.5
    np.testing.assert_allclose(soft[:, :2], x0[:, :2], rtol=1e-5)
    # pathwise derivative of the mean tau pT in tes equals the mean tau pT
    d = jax.grad(lambda t: gen.sample(key, N_SMALL, "ztautau", gen.make_nu(tes=t))[:, 0].mean())
    np.testing.assert_allclose(float(d(1.0)), x0[:, 0].mean(), rtol=1e-3)


def test_higgs_like_normalisation_nuisances_scale_yields():
    gen = GENERATORS["higgs_like"]()
    nominal = {p: float(gen.expected_yield(p)) for p in gen.process_names}
    cases = {"ttbar_scale": ({"ttbar"}, 1.1), "diboson_scale": ({"diboson"}, 1.5),
             "bkg_scale": ({"ztautau", "ttbar", "diboson"}, 1.01)}
    for nuisance, (moved, factor) in cases.items():
        nu = gen.make_nu(**{nuisance: factor})
        for proc in gen.process_names:
            want = nominal[proc] * (factor if proc in moved else 1.0)
            np.testing.assert_allclose(float(gen.expected_yield(proc, nu)), want, rtol=1e-6)
    # shape nuisances leave the yields alone (no event selection in this toy)
    nu = gen.make_nu(tes=1.05, jes=0.95, soft_met=3.0)
    for proc in gen.process_names:
        assert float(gen.expected_yield(proc, nu)) == nominal[proc]
    assert float(gen.expected_yield("htautau", gen.make_nu(bkg_scale=1.01))) == nominal["htautau"]
