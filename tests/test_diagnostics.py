"""Statistical reference tests of sbi_engine.diagnostics.

C2ST: two halves of one sbibm reference posterior sample must give ~0.5, disjoint
sets ~1, and two Gaussians a distance Δ apart the Bayes accuracy Φ(Δ/2).

SBC / coverage / predictive checks: a conjugate Gaussian model with a known posterior,
    θ ~ N(0, I_2),  x | θ ~ N(θ, s² I_2)  =>  θ | x ~ N(x / (1 + s²), s² / (1 + s²) I_2).
The exact posterior must pass; posteriors with the std scaled by 0.5 (over-confident)
or 2 (under-confident), or with a shifted mean, must fail. For a Gaussian posterior
whose std is scaled by k in 2-D, HPD coverage at level α is 1 - (1 - α)^(k²), which
the estimate must match.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sbi_engine import diagnostics as dg
from sbi_engine.errors import ConfigError, ShapeError


@pytest.fixture(scope="module")
def two_moons(sbibm_missing) -> np.ndarray:
    """10,000 x 2 reference posterior samples of sbibm two_moons, observation 1."""
    if sbibm_missing:
        pytest.skip(f"sbibm reference data not available: {sbibm_missing}")
    from simulators.benchmarks import reference

    samples = np.asarray(reference.ReferenceData("two_moons").reference_posterior_samples(1),
                         np.float64)
    assert samples.shape == (10_000, 2)
    return samples


def gaussian_pair(seed: int, n: int, delta: float, d: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``N(0, I)`` vs ``N(delta e_1, I)``: the best classifier's accuracy is Φ(delta / 2)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    Y = rng.normal(size=(n, d))
    Y[:, 0] += delta
    return X, Y


BAYES_ACC_DELTA_1 = float(stats.norm.cdf(0.5))  # 0.6915


# ------------------------------------------------------------------------------------
# C2ST, sbibm definition (scikit-learn comes with the `sbi` extra)
# ------------------------------------------------------------------------------------


@pytest.fixture
def sklearn():
    return pytest.importorskip("sklearn")


def test_c2st_sbibm_same_distribution_is_half(sklearn, two_moons):
    acc = dg.c2st_sbibm(two_moons[:1000], two_moons[1000:2000])
    assert abs(acc - 0.5) < 0.05


def test_c2st_sbibm_disjoint_is_one(sklearn, two_moons):
    acc = dg.c2st_sbibm(two_moons[:1000], two_moons[1000:2000] + np.array([1.0, -1.0]))
    assert acc > 0.98


def test_c2st_sbibm_reaches_bayes_accuracy(sklearn):
    X, Y = gaussian_pair(0, 1000, delta=1.0, d=1)
    assert abs(dg.c2st_sbibm(X, Y) - BAYES_ACC_DELTA_1) < 0.04


@pytest.mark.slow
def test_c2st_sbibm_full_reference_halves(sklearn, two_moons):
    acc = dg.c2st_sbibm(two_moons[:5000], two_moons[5000:])
    assert abs(acc - 0.5) < 0.02


# ------------------------------------------------------------------------------------
# C2ST, JAX classifier. The fast tests share (2000, 2) inputs and a reduced training
# budget (one compilation); the slow test uses the defaults.
# ------------------------------------------------------------------------------------

FAST = {"num_steps": 1000, "batch_size": 128}


def test_c2st_fast_same_distribution_is_half(two_moons):
    acc = dg.c2st_fast(jax.random.key(0), two_moons[:2000], two_moons[2000:4000], **FAST)
    assert abs(acc - 0.5) < 0.03


def test_c2st_fast_disjoint_is_one(two_moons):
    shifted = two_moons[2000:4000] + np.array([1.0, -1.0])
    assert dg.c2st_fast(jax.random.key(0), two_moons[:2000], shifted, **FAST) > 0.98


def test_c2st_fast_reaches_bayes_accuracy_and_is_deterministic():
    X, Y = gaussian_pair(0, 2000, delta=1.0)
    acc = dg.c2st_fast(jax.random.key(1), X, Y, **FAST)
    assert abs(acc - BAYES_ACC_DELTA_1) < 0.03
    assert dg.c2st_fast(jax.random.key(1), X, Y, **FAST) == acc


@pytest.mark.slow
def test_c2st_fast_full_reference_halves_and_agrees_with_sbibm(sklearn, two_moons):
    acc = dg.c2st_fast(jax.random.key(0), two_moons[:5000], two_moons[5000:])
    assert abs(acc - 0.5) < 0.02
    X, Y = gaussian_pair(2, 5000, delta=1.0, d=3)
    fast, ref = dg.c2st_fast(jax.random.key(0), X, Y), dg.c2st_sbibm(X, Y)
    assert abs(fast - BAYES_ACC_DELTA_1) < 0.02
    assert abs(fast - ref) < 0.03


@pytest.mark.parametrize("c2st", ["sbibm", "fast"])
def test_c2st_rejects_bad_input(c2st):
    if c2st == "sbibm":
        pytest.importorskip("sklearn")
    fn = dg.c2st_sbibm if c2st == "sbibm" else lambda X, Y: dg.c2st_fast(jax.random.key(0), X, Y)
    X = np.zeros((50, 2)) + np.arange(50)[:, None]
    with pytest.raises(ShapeError, match="X"):
        fn(X[:, 0], X)
    with pytest.raises(ShapeError, match="Y"):
        fn(X, X[:, :1])
    Y = X.copy()
    Y[3, 1] = np.nan
    with pytest.raises(ShapeError, match="NaN"):
        fn(X, Y)
    with pytest.raises(ShapeError, match="constant"):
        fn(np.ones((50, 2)), X)


def test_c2st_sbibm_without_sklearn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.neural_network", None)
    with pytest.raises(ImportError, match="scikit-learn"):
        dg.c2st_sbibm(np.zeros((10, 1)), np.ones((10, 1)))


# ------------------------------------------------------------------------------------
# Conjugate Gaussian model
# ------------------------------------------------------------------------------------

NOISE = 0.5
DIM = 2
POST_SD = NOISE / np.sqrt(1 + NOISE**2)
N_SIM = 500
N_POST = 100


def posterior(std_scale: float = 1.0, mean_shift: float = 0.0):
    """``(sample_fn, log_prob_fn)`` of the exact posterior, std scaled / mean shifted."""
    sd = POST_SD * std_scale

    def mean(x):
        return x / (1 + NOISE**2) + mean_shift * POST_SD

    def sample_fn(key, x, n):
        return mean(x) + sd * jax.random.normal(key, (n, DIM))

    def log_prob_fn(theta, x):
        return jnp.sum(jax.scipy.stats.norm.logpdf(theta, mean(x), sd), axis=-1)

    return sample_fn, log_prob_fn


EXACT = posterior()
OVERCONFIDENT = posterior(std_scale=0.5)
UNDERCONFIDENT = posterior(std_scale=2.0)
BIASED = posterior(mean_shift=0.5)


@pytest.fixture(scope="module")
def gaussian_sims() -> tuple[jax.Array, jax.Array]:
    k_theta, k_x = jax.random.split(jax.random.key(123))
    theta = jax.random.normal(k_theta, (N_SIM, DIM))
    x = theta + NOISE * jax.random.normal(k_x, (N_SIM, DIM))
    return theta, x


@pytest.fixture(scope="module")
def posterior_draws(gaussian_sims) -> dict[str, np.ndarray]:
    """``(N_SIM, N_POST, DIM)`` samples of each posterior.

    The miscalibrated ones are affine maps of the exact draws (same distribution as
    their ``sample_fn`` gives, one compilation instead of four).
    """
    _, x = gaussian_sims
    exact = dg.sample_posteriors(jax.random.key(7), EXACT[0], x, N_POST, dim=DIM, vectorize=True)
    mean = np.asarray(x)[:, None, :] / (1 + NOISE**2)
    return {
        "exact": exact,
        "over": mean + 0.5 * (exact - mean),
        "under": mean + 2.0 * (exact - mean),
        "biased": exact + 0.5 * POST_SD,
    }


# ------------------------------------------------------------------------------------
# SBC
# ------------------------------------------------------------------------------------


def test_sbc_exact_posterior_has_uniform_ranks(gaussian_sims):
    theta, x = gaussian_sims
    ranks = dg.sbc_ranks(jax.random.key(0), EXACT[0], theta, x, N_POST, vectorize=True)
    assert ranks.shape == (N_SIM, DIM) and ranks.dtype == np.int64
    assert ranks.min() >= 0 and ranks.max() <= N_POST
    test = dg.sbc_uniformity(ranks, N_POST)
    assert test.num_bins == 20
    assert (test.chi2_pvalue > 1e-3).all(), test
    assert (test.ks_pvalue > 1e-3).all(), test


@pytest.mark.parametrize("name", ["over", "under", "biased"])
def test_sbc_flags_miscalibrated_posteriors(gaussian_sims, posterior_draws, name):
    theta, _ = gaussian_sims
    ranks = dg.ranks_from_samples(posterior_draws[name], theta)
    test = dg.sbc_uniformity(ranks, N_POST)
    assert (test.chi2_pvalue < 1e-6).all(), test
    assert (test.ks_pvalue < 1e-6).all(), test
    u = (ranks + 0.5) / (N_POST + 1)
    tails = np.mean((u < 0.1) | (u > 0.9))  # 0.2 if calibrated
    if name == "over":  # U shape: too many extreme ranks
        assert tails > 0.4
    elif name == "under":  # hump: too few
        assert tails < 0.05
    else:  # mean too high: the truth ranks low
        assert np.mean(u) < 0.4


def test_sbc_vectorized_matches_loop(gaussian_sims):
    theta, x = gaussian_sims
    key = jax.random.key(3)
    loop = dg.sbc_ranks(key, EXACT[0], theta[:8], x[:8], 20)
    vec = dg.sbc_ranks(key, EXACT[0], theta[:8], x[:8], 20, vectorize=True)
    np.testing.assert_array_equal(loop, vec)


def test_sample_posteriors_accepts_unhashable_sampler(gaussian_sims):
    _, x = gaussian_sims

    class Sampler:  # defines __eq__ without __hash__, like a mutable dataclass
        def __eq__(self, other):
            return self is other

        def __call__(self, key, xi, n):
            return EXACT[0](key, xi, n)

    key = jax.random.key(4)
    out = dg.sample_posteriors(key, Sampler(), x[:8], 20, vectorize=True, chunk_size=3)
    ref = dg.sample_posteriors(key, EXACT[0], x[:8], 20, vectorize=True)
    assert out.shape == (8, 20, DIM)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_posterior_samples", [9, 99, 100])
def test_sbc_uniformity_of_perfectly_uniform_ranks(num_posterior_samples):
    L = num_posterior_samples
    ranks = np.tile(np.arange(L + 1), 10)[:, None]  # each rank value exactly 10 times
    test = dg.sbc_uniformity(ranks, L, num_bins=7)
    assert test.chi2_stat[0] == pytest.approx(0.0, abs=1e-9)
    assert test.chi2_pvalue[0] == pytest.approx(1.0)
    # Mid-ranks of L + 1 discrete values sit up to 0.5 / (L + 1) from U(0, 1).
    assert test.ks_pvalue[0] > 0.9


def test_sbc_rejects_bad_input(gaussian_sims):
    theta, x = gaussian_sims
    key = jax.random.key(0)
    with pytest.raises(ShapeError, match="x: expected leading dimension"):
        dg.sbc_ranks(key, EXACT[0], theta, x[:10], 5)
    with pytest.raises(ShapeError, match="sample_fn"):
        dg.sbc_ranks(key, lambda k, xi, n: jnp.zeros((n, 3)), theta[:4], x[:4], 5)
    with pytest.raises(ShapeError, match="NaN"):
        dg.sbc_ranks(key, lambda k, xi, n: jnp.full((n, DIM), jnp.nan), theta[:4], x[:4], 5)
    x_nan = np.array(x[:4])
    x_nan[2, 0] = np.nan
    with pytest.raises(ShapeError, match="x: 1 row"):
        dg.sbc_ranks(key, EXACT[0], theta[:4], x_nan, 5)
    with pytest.raises(ShapeError, match="ranks"):
        dg.sbc_uniformity(np.full((10, 2), 6), 5)


# ------------------------------------------------------------------------------------
# Expected coverage: HPD and TARP
# ------------------------------------------------------------------------------------


def hpd_coverage(name: str, gaussian_sims, posterior_draws) -> dg.CoverageResult:
    theta, x = gaussian_sims
    log_prob = {"exact": EXACT, "over": OVERCONFIDENT, "under": UNDERCONFIDENT}[name][1]
    c = dg.hpd_credibility(log_prob, posterior_draws[name], theta, x, vectorize=True)
    return dg.coverage_curve(c, method="hpd")


def test_hpd_coverage_of_exact_posterior_is_nominal(gaussian_sims, posterior_draws):
    res = hpd_coverage("exact", gaussian_sims, posterior_draws)
    assert res.levels.shape == res.coverage.shape == (101,)
    assert res.coverage[0] == 0.0 and res.coverage[-1] == 1.0
    assert res.max_abs_error < 0.1
    assert res.ks_pvalue > 1e-3


@pytest.mark.parametrize(("name", "k"), [("over", 0.5), ("under", 2.0)])
def test_hpd_coverage_matches_analytic_miscalibration(gaussian_sims, posterior_draws, name, k):
    res = hpd_coverage(name, gaussian_sims, posterior_draws)
    expected = 1.0 - (1.0 - res.levels) ** (k**2)
    np.testing.assert_allclose(res.coverage, expected, atol=0.07)
    assert res.max_abs_error > 0.3
    assert (res.atc < -0.1) if name == "over" else (res.atc > 0.05)


def test_expected_coverage_end_to_end(gaussian_sims):
    theta, x = gaussian_sims
    key = jax.random.key(11)
    hpd = dg.expected_coverage(
        key, EXACT[0], theta, x, N_POST, log_prob_fn=EXACT[1], vectorize=True
    )
    tarp = dg.expected_coverage(key, EXACT[0], theta, x, N_POST, method="tarp", vectorize=True)
    for res in (hpd, tarp):
        assert res.max_abs_error < 0.1, res.method
    assert (hpd.method, tarp.method) == ("hpd", "tarp")
    over = dg.expected_coverage(
        key, OVERCONFIDENT[0], theta, x, N_POST, log_prob_fn=OVERCONFIDENT[1], vectorize=True
    )
    assert np.interp(0.9, over.levels, over.coverage) < 0.6  # analytic: 0.44


def test_tarp_exact_passes_and_misspread_fails(gaussian_sims, posterior_draws):
    theta, _ = gaussian_sims
    key = jax.random.key(5)
    res = {
        name: dg.coverage_curve(dg.tarp_credibility(key, posterior_draws[name], theta))
        for name in ("exact", "over", "under")
    }
    assert res["exact"].max_abs_error < 0.1
    assert res["exact"].ks_pvalue > 1e-3
    assert res["over"].ks_pvalue < 1e-6 and res["over"].atc < -0.02
    assert res["under"].ks_pvalue < 1e-6 and res["under"].atc > 0.02


def test_tarp_with_given_references_and_without_normalization(gaussian_sims, posterior_draws):
    theta, _ = gaussian_sims
    refs = np.zeros((N_SIM, DIM)) + 3.0  # far away: TARP regions become half-spaces-ish
    c = dg.tarp_credibility(None, posterior_draws["exact"], theta, references=refs, normalize=False)
    assert c.shape == (N_SIM,) and (c > 0).all() and (c < 1).all()
    assert dg.coverage_curve(c).max_abs_error < 0.1
    with pytest.raises(ShapeError, match="references"):
        dg.tarp_credibility(None, posterior_draws["exact"], theta, references=refs[:3])


def test_coverage_input_errors(gaussian_sims):
    theta, x = gaussian_sims
    with pytest.raises(ConfigError, match="log_prob_fn"):
        dg.expected_coverage(jax.random.key(0), EXACT[0], theta, x, 10)
    with pytest.raises(ConfigError, match="method"):
        dg.expected_coverage(jax.random.key(0), EXACT[0], theta, x, 10, method="sbc")
    with pytest.raises(ShapeError, match="credibility"):
        dg.coverage_curve(np.array([0.2, 1.5]))
    with pytest.raises(ShapeError, match="log_prob_fn"):
        dg.hpd_credibility(lambda t, xi: jnp.zeros(3), np.zeros((2, 4, DIM)), theta[:2], x[:2])


# ------------------------------------------------------------------------------------
# Posterior predictive check
# ------------------------------------------------------------------------------------


def simulate(key, theta):
    return theta + NOISE * jax.random.normal(key, theta.shape)


@pytest.fixture(scope="module")
def observed():
    k_theta, k_x, k_post = jax.random.split(jax.random.key(99), 3)
    theta_o = jax.random.normal(k_theta, (DIM,))
    x_o = np.asarray(simulate(k_x, theta_o))
    samples = EXACT[0](k_post, x_o, 1000)
    return x_o, samples


def test_posterior_predictive_of_consistent_observation(observed):
    x_o, samples = observed
    check = dg.posterior_predictive(jax.random.key(0), simulate, samples, x_o)
    assert check.x_sim.shape == (1000, DIM)
    assert check.fraction_finite == 1.0
    # Predictive of x given x_o: N(x_o / (1 + s²), post_var + s²) per feature.
    pred_mean = x_o / (1 + NOISE**2)
    pred_sd = np.sqrt(POST_SD**2 + NOISE**2)
    np.testing.assert_allclose(check.mean, pred_mean, atol=4 * pred_sd / np.sqrt(1000))
    np.testing.assert_allclose(check.std, pred_sd, rtol=0.1)
    np.testing.assert_allclose(check.z_scores, (x_o - check.mean) / check.std)
    assert (np.abs(check.z_scores) < 3).all()
    assert (check.pvalues > 0.01).all()
    assert 0.0 < check.distance_quantile < 0.99


def test_posterior_predictive_flags_inconsistent_observation(observed):
    x_o, samples = observed
    check = dg.posterior_predictive(jax.random.key(0), simulate, samples, x_o + 10.0)
    assert (check.z_scores > 5).all()
    assert (check.pvalues == 0).all()
    assert check.distance > 5 and check.distance_quantile == 1.0


def test_posterior_predictive_counts_failed_simulations(observed):
    x_o, samples = observed

    def flaky(key, theta):
        x = simulate(key, theta)
        return jnp.where(theta[:, :1] > 0.5, jnp.nan, x)

    check = dg.posterior_predictive(jax.random.key(0), flaky, samples, x_o)
    assert check.fraction_finite == pytest.approx(float(np.mean(np.asarray(samples)[:, 0] <= 0.5)))
    assert np.isnan(check.x_sim).any() and np.isfinite(check.z_scores).all()


def test_posterior_predictive_rejects_bad_input(observed):
    x_o, samples = observed
    with pytest.raises(ShapeError, match="x_o"):
        dg.posterior_predictive(jax.random.key(0), simulate, samples, np.array([np.nan, 0.0]))
    with pytest.raises(ShapeError, match="simulate_fn"):
        dg.posterior_predictive(jax.random.key(0), lambda k, t: t[:, :1], samples, x_o)
