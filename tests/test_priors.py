"""Contract suite for the priors: sampling, densities, support, bijections, serialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from sbi_engine import (
    BoxUniform,
    ConfigError,
    Gaussian,
    LogUniform,
    Parameter,
    ProductPrior,
    ShapeError,
    TruncatedGaussian,
    prior_from_dict,
    prior_from_parameters,
)

PRIORS = {
    "box": lambda: BoxUniform([-1.0, 0.0], [1.0, 5.0]),
    "log": lambda: LogUniform([1e-3, 1.0], [1.0, 100.0]),
    "gauss": lambda: Gaussian([0.5, -1.0], [[1.0, 0.3], [0.3, 2.0]]),
    "trunc": lambda: TruncatedGaussian([0.0, 1.0], [1.0, 2.0], [-0.5, 0.0], [2.0, np.inf]),
    "product": lambda: ProductPrior([BoxUniform(-2, 2), LogUniform(0.1, 10.0),
                                     Gaussian([0.0], [[4.0]])]),
}


@pytest.fixture(params=sorted(PRIORS))
def prior(request):
    return PRIORS[request.param]()


def test_sample_shape_support_and_finite_density(prior):
    theta = prior.sample(jax.random.PRNGKey(0), 500)
    assert theta.shape == (500, prior.dim) and theta.dtype == jnp.float32
    assert bool(jnp.all(prior.in_support(theta)))
    assert bool(jnp.all(jnp.isfinite(prior.log_prob(theta))))


def test_sampling_is_deterministic_given_key(prior):
    a = prior.sample(jax.random.PRNGKey(3), 10)
    b = prior.sample(jax.random.PRNGKey(3), 10)
    c = prior.sample(jax.random.PRNGKey(4), 10)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_bijection_inverts_and_log_det_matches_jacobian(prior):
    theta = prior.sample(jax.random.PRNGKey(1), 8)
    z = prior.to_unconstrained(theta)
    assert bool(jnp.all(jnp.isfinite(z)))
    np.testing.assert_allclose(prior.from_unconstrained(z), theta, rtol=2e-4, atol=2e-4)
    z64 = np.asarray(z, dtype=np.float64)
    with jax.enable_x64(True):
        jac = jax.vmap(jax.jacfwd(prior.from_unconstrained))(jnp.asarray(z64))
        expected = np.linalg.slogdet(np.asarray(jac))[1]
        got = prior.log_det_from_unconstrained(jnp.asarray(z64))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_log_prob_matches_scipy_and_is_minus_inf_outside():
    box = BoxUniform([-1.0, 0.0], [1.0, 5.0])
    assert float(box.log_prob(jnp.array([0.0, 1.0]))) == pytest.approx(-np.log(2 * 5))
    assert float(box.log_prob(jnp.array([1.5, 1.0]))) == -np.inf
    g = Gaussian([0.5, -1.0], [[1.0, 0.3], [0.3, 2.0]])
    pts = np.array([[0.0, 0.0], [1.0, -2.0]])
    ref = stats.multivariate_normal([0.5, -1.0], [[1.0, 0.3], [0.3, 2.0]]).logpdf(pts)
    np.testing.assert_allclose(g.log_prob(jnp.asarray(pts, jnp.float32)), ref, rtol=1e-5)
    t = TruncatedGaussian(0.0, 1.0, -0.5, 2.0)
    ref = stats.truncnorm(-0.5, 2.0).logpdf([0.3])
    np.testing.assert_allclose(t.log_prob(jnp.array([[0.3]])), ref, rtol=1e-5)
    lu = LogUniform(1e-2, 1e2)
    ref = stats.loguniform(1e-2, 1e2).logpdf(3.0)
    np.testing.assert_allclose(lu.log_prob(jnp.array([3.0])), ref, rtol=1e-5)


@pytest.mark.parametrize("name", ["box", "log", "trunc"])
def test_one_dim_density_integrates_to_one(name):
    prior = {"box": BoxUniform(-1, 3), "log": LogUniform(0.1, 10.0),
             "trunc": TruncatedGaussian(1.0, 2.0, 0.0, 4.0)}[name]
    low, high = prior.support
    f = lambda t: float(np.exp(prior.log_prob(jnp.array([t]))))  # noqa: E731
    mass, _ = integrate.quad(f, float(low[0]), float(high[0]), limit=200)
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_sample_moments():
    g = Gaussian([0.5, -1.0], [[1.0, 0.3], [0.3, 2.0]])
    s = np.asarray(g.sample(jax.random.PRNGKey(0), 40_000), dtype=np.float64)
    np.testing.assert_allclose(s.mean(0), [0.5, -1.0], atol=0.03)
    np.testing.assert_allclose(np.cov(s.T), [[1.0, 0.3], [0.3, 2.0]], atol=0.06)
    lu = np.asarray(LogUniform(1e-2, 1e2).sample(jax.random.PRNGKey(1), 40_000))
    log_u = stats.uniform(np.log(1e-2), np.log(1e4))
    assert stats.kstest(np.log(lu[:, 0]), log_u.cdf).pvalue > 1e-3


def test_far_tail_truncated_gaussian_matches_scipy():
    # [5, 6] and [9, inf): JAX's erf-based sampler is off there, and cdf(b) - cdf(a)
    # cancels to zero mass for [9, inf); [-1, 2] keeps JAX's sampler.
    prior = TruncatedGaussian([1.0, 0.0, -2.0], [2.0, 1.0, 0.5], [11.0, 9.0, -np.inf],
                              [13.0, np.inf, -5.5])
    s = np.asarray(prior.sample(jax.random.PRNGKey(0), 100_000), np.float64)
    for i, (a, b) in enumerate([(5.0, 6.0), (9.0, np.inf), (-np.inf, -7.0)]):
        ref = stats.truncnorm(a, b, loc=prior.loc[i], scale=prior.scale[i])
        assert abs(s[:, i].mean() - ref.mean()) < 5 * ref.std() / np.sqrt(len(s))
        assert s[:, i].std() == pytest.approx(ref.std(), rel=0.02)
        assert stats.kstest(s[:5000, i], ref.cdf).pvalue > 1e-3
    np.testing.assert_allclose(prior.log_prob(jnp.asarray(s[:3], jnp.float32)),
                               stats.truncnorm(
                                   (prior.low - prior.loc) / prior.scale,
                                   (prior.high - prior.loc) / prior.scale, loc=prior.loc,
                                   scale=prior.scale).logpdf(s[:3]).sum(1), rtol=1e-4)


def test_samples_rounded_to_float32_stay_inside_the_support():
    # float32(0.7) < 0.7: a draw at the bound rounds outside unless clipped inward.
    from sbi_engine.priors import _clip_to_support

    low, high = np.array([0.7, 0.1]), np.array([1.3, 0.3])
    clipped = np.asarray(_clip_to_support(jnp.array([[0.6, 0.05], [2.0, 0.4]]), low, high),
                         np.float64)
    assert (clipped >= low).all() and (clipped <= high).all()
    assert clipped[0, 0] == np.nextafter(np.float32(0.7), np.float32(1))
    prior = LogUniform([0.7, 0.1], [1.3, 0.3])
    theta = np.asarray(prior.sample(jax.random.PRNGKey(0), 100_000), np.float64)
    assert (theta >= low).all() and (theta <= high).all()


def test_log_prob_takes_integers_and_checks_the_last_axis(prior):
    theta = np.ones((3, prior.dim), np.int32)
    np.testing.assert_allclose(prior.log_prob(theta), prior.log_prob(theta.astype(np.float32)))
    assert prior.log_prob(theta).dtype == jnp.float32
    for bad in (np.ones((3, prior.dim + 1)), np.ones((3, 1, 1)) if prior.dim > 1 else
                np.ones((3, 2)), np.float32(0.5)):
        with pytest.raises(ShapeError, match=rf"theta: expected shape \(\.\.\., {prior.dim}\)"):
            prior.log_prob(bad)
        with pytest.raises(ShapeError, match="theta: expected shape"):
            prior.in_support(bad)


def test_dict_round_trip(prior):
    again = prior_from_dict(prior.to_dict())
    assert again == prior
    theta = prior.sample(jax.random.PRNGKey(0), 5)
    np.testing.assert_allclose(again.log_prob(theta), prior.log_prob(theta))


def test_prior_from_parameters_merges_blocks():
    params = [Parameter("a", 0, 1), Parameter("b", -2, 2), Parameter("c", 1e-3, 1, scale="log")]
    p = prior_from_parameters(params)
    assert isinstance(p, ProductPrior) and p.dim == 3
    assert [c.to_dict()["type"] for c in p.components] == ["box_uniform", "log_uniform"]
    low, high = p.support
    np.testing.assert_allclose(low, [0, -2, 1e-3])
    np.testing.assert_allclose(high, [1, 2, 1])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: BoxUniform([0, 0], [1]), "differ in shape"),
        (lambda: BoxUniform(1.0, 0.0), "high > low"),
        (lambda: BoxUniform(0.0, np.inf), "finite"),
        (lambda: LogUniform(0.0, 1.0), "0 < low"),
        (lambda: Gaussian([0, 0], [[1, 2], [2, 1]]), "positive definite"),
        (lambda: Gaussian([0, 0], np.eye(3)), "expected \\(2, 2\\)"),
        (lambda: TruncatedGaussian(0, -1, 0, 1), "scale > 0"),
        (lambda: TruncatedGaussian(0, 1, 40, np.inf), "zero mass"),
        (lambda: TruncatedGaussian(0, 1, -np.inf, -12), "more than 11 scales"),
        (lambda: prior_from_dict({"type": "cauchy"}), "expected one of"),
        (lambda: prior_from_dict({"type": "box_uniform", "low": [0]}), "missing field 'high'"),
        (lambda: Parameter("a", 1, 0), "high > low"),
        (lambda: Parameter("a", 0, 1, scale="log"), "low > 0"),
        (lambda: Parameter("a", 0, 1, scale="sqrt"), "'linear' or 'log'"),
        (lambda: Parameter("a", 0, 1, nominal=2), "nominal"),
    ],
)
def test_bad_specs_raise_named_errors(build, match):
    with pytest.raises(ConfigError, match=match):
        build()
