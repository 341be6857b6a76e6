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
