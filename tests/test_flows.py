"""Contract tests for the conditional flows (sbi_engine.flows).

One generic suite runs every constructor in ``CASES`` (MAF, NSF coupling, NSF
autoregressive; θ-dims 1, 2, 5; with and without MLP/CNN embeddings, z-scoring and a
prior bijection): invertibility, log-det against ``jax.jacobian``, shapes, gradients
reaching every parameter. Then: normalisation on a 2-D grid, spline properties,
standardisation, configs, compile size vs depth, and a small training run that must
reach the true conditional entropy of a linear-Gaussian model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.flows import (
    FLOWS,
    CNNEmbedding,
    FlowConfig,
    MLPEmbedding,
    Standardization,
    build_flow,
    build_flow_from_data,
    fit_zscore,
    rational_quadratic_spline,
)
from sbi_engine.flows.spline import batched_spline
from sbi_engine.priors import BoxUniform, LogUniform, ProductPrior

SMALL = {"hidden": 16, "transforms": 3}

# The suite compiles many small programs once each; XLA's CPU backend optimisations
# cost more compile time than they save here (scoped to these jits, nothing global).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn):
    return jax.jit(fn, compiler_options=_FAST_COMPILE)


def _zscore(theta_dim, x_shape, seed=0):
    rng = np.random.default_rng(seed)
    return Standardization(
        rng.normal(size=theta_dim).astype(np.float32),
        rng.uniform(0.5, 2.0, size=theta_dim).astype(np.float32),
        rng.normal(size=x_shape).astype(np.float32),
        rng.uniform(0.5, 2.0, size=x_shape).astype(np.float32),
    )


_BOX = BoxUniform([0.0, -2.0], [1.0, 3.0])
_MIXED = ProductPrior([LogUniform([0.1], [10.0]), BoxUniform([-1.0], [1.0])])


def _with_prior(prior, x_shape):
    return Standardization(
        np.array([0.3, -0.2], np.float32),
        np.array([1.5, 0.8], np.float32),
        np.zeros(x_shape, np.float32),
        np.ones(x_shape, np.float32),
        prior=prior,
    )


# name -> (config, theta_dim, x_shape, standardization or None). Every kind runs with
# θ-dims 1, 2 and 5, with and without an embedding, z-scoring and a prior bijection.
def _cfg(kind, embedding=None, **extra):
    return FlowConfig(kind=kind, embedding=embedding, **SMALL, **extra)


_MLP = MLPEmbedding(features=8, hidden=16)
CASES = {
    "maf-d1": (_cfg("maf"), 1, 3, None),
    # "unit_softplus": at initialisation nflows' scale (~0.69 a layer) maps the wide base
    # draws to |θ| ≈ 20 in unconstrained space, where the bounded prior's sigmoid
    # saturates in float32; the identity-at-init scale keeps the round trip testable.
    "maf-d2-mixed-prior": (_cfg("maf", maf_scale="unit_softplus"), 2, 3,
                           _with_prior(_MIXED, (3,))),
    "maf-d5-cnn-2ch-zscore": (
        _cfg("maf", CNNEmbedding(channels=(4,), features=8)),
        5,
        (20, 2),
        _zscore(5, (20, 2)),
    ),
    "nsf-d1-mlp": (_cfg("nsf", _MLP), 1, 4, None),
    "nsf-d2-cnn-box-prior": (
        _cfg("nsf", CNNEmbedding(channels=(4,), features=8)),
        2,
        (24,),
        _with_prior(_BOX, (24,)),
    ),
    "nsf-d5-zscore": (_cfg("nsf"), 5, 3, _zscore(5, (3,))),
    "nsf_ar-d1-zscore": (_cfg("nsf_ar"), 1, 3, _zscore(1, (3,))),
    "nsf_ar-d2-mlp-zscore": (_cfg("nsf_ar", _MLP), 2, 4, _zscore(2, (4,))),
    "nsf_ar-d5": (_cfg("nsf_ar"), 5, 3, None),
}


def _contract_report(flow, key, x):
    """Everything the generic suite checks, computed in one jitted program per case."""
    k_init, k_u = jax.random.split(key)
    params = flow.init(k_init)
    # Wide base draws so that spline tails (|y| > B) are exercised too.
    u = 2.5 * jax.random.normal(k_u, (x.shape[0], flow.theta_dim))
    theta, ld_gen = jax.vmap(lambda u_, x_: flow.from_base(params, u_, x_))(u, x)

    def to_base(t_, x_):  # the map and, as aux, its output and claimed log-det
        u_, ld_ = flow.to_base(params, t_, x_)
        return u_, (u_, ld_)

    # reverse mode: the NSF's splines have a custom VJP (no forward mode)
    jac, (u_back, ld_norm) = jax.vmap(jax.jacrev(to_base, has_aux=True))(theta, x)
    sign, ld_ref = jnp.linalg.slogdet(jac)

    def loss(p):
        lp = flow.log_prob(p, theta, x)
        return -jnp.mean(lp), lp

    grads, lp = jax.grad(loss, has_aux=True)(params)
    return params, {
        "lp": lp,
        "u": u,
        "u_back": u_back,
        "theta": theta,
        "ld_gen": ld_gen,
        "ld_norm": ld_norm,
        "ld_ref": ld_ref,
        "jac_sign": sign,
        "grads": grads,
    }


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    config, d, x_shape, std = CASES[request.param]
    flow = build_flow(config, theta_dim=d, x_shape=x_shape, standardization=std)
    x = jax.random.normal(jax.random.key(1), (4, *flow.x_shape))
    params, report = _jit(lambda k, x_: _contract_report(flow, k, x_))(jax.random.key(0), x)
    return flow, params, x, report


# ---------------------------------------------------------------------------------------
# Generic contract suite
# ---------------------------------------------------------------------------------------


def test_invertible(case):
    _, _, _, r = case
    assert bool(jnp.all(jnp.isfinite(r["theta"])))
    np.testing.assert_allclose(r["u_back"], r["u"], atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(r["ld_gen"] + r["ld_norm"], 0.0, atol=2e-3)


def test_log_det_matches_jacobian(case):
    # The sampling direction's log-det is checked through ld_gen = -ld_norm above.
    _, _, _, r = case
    assert bool(jnp.all(r["jac_sign"] != 0))
    np.testing.assert_allclose(r["ld_norm"], r["ld_ref"], atol=5e-3, rtol=1e-3)


def test_shapes_and_errors(case):
    flow, params, x, r = case
    d = flow.theta_dim
    assert r["lp"].shape == (x.shape[0],) and np.all(np.isfinite(r["lp"]))
    # Shapes of the batched sampler (vmaps `sample`; traced only) and errors raised
    # while tracing, naming the field.
    batched = jax.eval_shape(lambda p: flow.sample_batched(p, jax.random.key(0), x, 3), params)
    assert batched.shape == (x.shape[0], 3, d) and batched.dtype == jnp.float32
    with pytest.raises(ShapeError, match="theta"):
        flow.log_prob(params, jnp.zeros((4, d + 1)), x)
    with pytest.raises(ShapeError, match="x"):
        flow.log_prob(params, jnp.zeros((3, d)), x)
    with pytest.raises(ShapeError, match="x"):
        flow.sample(params, jax.random.key(0), x, 2)


def test_every_parameter_gets_a_gradient(case):
    _, _, _, r = case
    grads = jax.tree.map(np.asarray, r["grads"])
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert leaves
    for path, g in leaves:
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        assert np.max(np.abs(g)) > 0.0, name
    # Every layer's copy of the stacked parameters is used, not just one.
    for path, g in jax.tree_util.tree_leaves_with_path(grads["layers"]):
        per_layer = np.max(np.abs(g.reshape(g.shape[0], -1)), axis=1)
        assert np.all(per_layer > 0), jax.tree_util.keystr(path)


def test_many_models_under_vmap_and_sampling_densities():
    """The trainer's layout (``vmap(init)`` over keys, vmapped ``log_prob``), and the
    densities returned by the sampling pass against ``log_prob``."""
    config, d, x_shape, std = CASES["maf-d2-mixed-prior"]
    flow = build_flow(config, theta_dim=d, x_shape=x_shape, standardization=std)
    theta, x = jnp.ones((5, d)) * 0.3, jnp.ones((5, *flow.x_shape))

    @_jit
    def run(keys):
        stacked = jax.vmap(flow.init)(keys)
        lp = jax.vmap(flow.log_prob, (0, None, None))(stacked, theta, x)
        one = jax.tree.map(lambda a: a[1], stacked)
        samples, lp_s = flow.sample_and_log_prob(one, keys[0], x[0], 6)
        return lp, flow.log_prob(one, theta, x), samples, lp_s, flow.log_prob(one, samples, x[0])

    lp, ref, samples, lp_s, lp_s_ref = run(jax.random.split(jax.random.key(7), 3))
    assert lp.shape == (3, 5)
    np.testing.assert_allclose(lp[1], ref, rtol=1e-5, atol=1e-5)
    assert float(jnp.std(lp[:, 0])) > 0  # different keys, different models
    assert samples.shape == (6, d)
    np.testing.assert_allclose(lp_s, lp_s_ref, atol=2e-3, rtol=1e-4)  # x shared by all rows


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------


def _grid_integral(flow, key, x, lo, hi, n, extra=None):
    """Midpoint rule for ∫ q(θ | x) dθ over a box, with freshly initialised parameters.

    Returns the integral and ``log q`` at the ``extra`` points.
    """
    edges = [np.linspace(a, b, n + 1) for a, b in zip(lo, hi, strict=True)]
    mids = [0.5 * (e[1:] + e[:-1]) for e in edges]
    cell = np.prod([(b - a) / n for a, b in zip(lo, hi, strict=True)])
    grid = np.stack(np.meshgrid(*mids, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)
    extra = np.zeros((0, 2), np.float32) if extra is None else extra
    lp = _jit(lambda k, g: flow.log_prob(flow.init(k), g, x))(key, np.concatenate([grid, extra]))
    lp = np.asarray(lp, np.float64)
    return float(np.sum(np.exp(lp[: len(grid)])) * cell), lp[len(grid) :]


@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_density_integrates_to_one(kind):
    flow = build_flow(FlowConfig(kind=kind, **SMALL), theta_dim=2, x_shape=3)
    x = jnp.array([0.5, -1.0, 0.2])
    # ±14: at initialisation nflows' MAF scale (~0.69 a layer) widens the density
    total, _ = _grid_integral(flow, jax.random.key(11), x, (-14.0, -14.0), (14.0, 14.0), 320)
    assert abs(total - 1.0) < 5e-3, total


def test_density_with_prior_bijection_integrates_to_one_on_the_box():
    # "unit_softplus": nflows' scale at initialisation spreads the unconstrained density
    # so wide that its mass piles up at the box's edges, beyond a midpoint rule's reach
    flow = build_flow(
        FlowConfig(kind="maf", maf_scale="unit_softplus", **SMALL),
        theta_dim=2,
        x_shape=3,
        standardization=_with_prior(_BOX, (3,)),
    )
    x = jnp.array([0.1, 0.2, 0.3])
    outside = np.array([[1.5, 0.0], [0.5, -3.0]], np.float32)
    total, lp_out = _grid_integral(
        flow, jax.random.key(12), x, (0.0, -2.0), (1.0, 3.0), 120, outside
    )
    assert abs(total - 1.0) < 5e-3, total
    assert np.all(np.isneginf(lp_out))


# ---------------------------------------------------------------------------------------
# Rational-quadratic spline
# ---------------------------------------------------------------------------------------


def test_spline_monotone_identity_tails_and_inverse():
    k = jax.random.split(jax.random.key(13), 3)
    w, h = jax.random.normal(k[0], (8,)), jax.random.normal(k[1], (8,))
    d = jax.random.normal(k[2], (7,))
    xs = jnp.linspace(-5.0, 5.0, 2001)

    @_jit
    def run(xs):
        def fwd(x):
            return rational_quadratic_spline(x, w, h, d, bound=3.0)

        def inv(y):
            return rational_quadratic_spline(y, w, h, d, bound=3.0, inverse=True)

        ys, ld = jax.vmap(fwd)(xs)
        dydx = jax.vmap(jax.grad(lambda x: fwd(x)[0]))(xs)
        xb, ldb = jax.vmap(inv)(ys)
        return ys, ld, dydx, xb, ldb

    ys, ld, dydx, xb, ldb = map(np.asarray, run(xs))
    xs = np.asarray(xs)
    assert np.all(np.diff(ys) > 0) and np.all(np.isfinite(ld))
    outside = np.abs(xs) > 3.0
    np.testing.assert_array_equal(ys[outside], xs[outside])
    np.testing.assert_array_equal(ld[outside], 0.0)
    # Continuous at the tail bounds (the knots sit exactly on ±B), C¹ there (slope 1).
    np.testing.assert_allclose(ys[[400, 1600]], [-3.0, 3.0], atol=1e-5)
    np.testing.assert_allclose(dydx[[399, 400, 1600, 1601]], 1.0, atol=1e-2)
    np.testing.assert_allclose(np.log(dydx), ld, atol=1e-4)
    np.testing.assert_allclose(xb, xs, atol=1e-4)
    np.testing.assert_allclose(ldb, -ld, atol=1e-4)


@pytest.mark.parametrize("inverse", [False, True])
def test_batched_spline_equals_the_plain_spline_under_vmap_and_grad(inverse):
    """The flows' spline (batching rule inside a custom VJP) against the plain one:
    values and reverse-mode gradients, mapped examples on the inside or the outside,
    nested maps, and arguments shared by the mapped examples."""
    k = jax.random.split(jax.random.key(5), 4)
    n, s, b = 6, 3, 8  # examples, splines per example, bins
    x = 2.0 * jax.random.normal(k[0], (n, s))  # some beyond the bound 3: identity tails
    w, h = jax.random.normal(k[1], (n, s, b)), jax.random.normal(k[2], (n, s, b))
    d = jax.random.normal(k[3], (n, s, b - 1))
    fast = batched_spline(inverse, 3.0, 1e-3, 1e-3, 1e-3)

    def plain(*a):
        return rational_quadratic_spline(*a, inverse=inverse, bound=3.0)

    def scalar(fn):  # one example's loss, a function of all four arguments
        return lambda *a: jnp.sum(fn(*a)[0] ** 2) + jnp.sum(jnp.sin(fn(*a)[1]))

    cases = {
        "vmap": lambda fn: jax.vmap(fn)(x, w, h, d),
        "grad of vmap": lambda fn: jax.grad(
            lambda *a: jnp.sum(jax.vmap(scalar(fn))(*a)), argnums=(0, 1, 2, 3))(x, w, h, d),
        "vmap of grad": lambda fn: jax.vmap(jax.grad(scalar(fn), argnums=(0, 1, 2, 3)))(
            x, w, h, d),
        "vmap of jacrev": lambda fn: jax.vmap(jax.jacrev(lambda x_, *a: fn(x_, *a)[0]))(
            x, w, h, d),
        "shared bins": lambda fn: jax.vmap(fn, in_axes=(0, None, None, None))(
            x, w[0], h[0], d[0]),
        "grad of nested vmap": lambda fn: jax.grad(
            lambda x_: jnp.sum(jax.vmap(jax.vmap(scalar(fn)))(
                x_.reshape(2, 3, s), w.reshape(2, 3, s, b), h.reshape(2, 3, s, b),
                d.reshape(2, 3, s, b - 1))))(x),
    }
    for name, run in cases.items():
        got, want = jax.jit(lambda r=run: r(fast))(), jax.jit(lambda r=run: r(plain))()
        for g_, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g_.shape == w_.shape, name
            np.testing.assert_allclose(g_, w_, rtol=1e-5, atol=1e-5, err_msg=name)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(fast, (x[0], w[0], h[0], d[0]), (x[0], w[0], h[0], d[0]))


# ---------------------------------------------------------------------------------------
# Standardisation
# ---------------------------------------------------------------------------------------


def test_zscore_fit_ignores_nan_rows_and_constant_dims():
    rng = np.random.default_rng(0)
    clean = rng.normal([1.0, -2.0, 5.0], [2.0, 0.5, 1.0], size=(500, 3))
    clean[:, 2] = 5.0  # constant dimension
    dirty = np.concatenate([clean, np.full((20, 3), np.nan), [[np.inf, 0.0, 0.0]]])
    dirty[np.array([3, 7])] = np.nan  # partly-NaN rows are dropped too
    keep = np.ones(len(dirty), bool)
    keep[[3, 7]] = False
    keep[len(clean) :] = False
    mean, std = fit_zscore(dirty, "independent", name="x")
    np.testing.assert_allclose(mean, dirty[keep].mean(0), rtol=1e-5)
    np.testing.assert_allclose(std[:2], dirty[keep].std(0, ddof=1)[:2], rtol=1e-5)
    assert std[2] == 1.0
    m_s, s_s = fit_zscore(dirty, "structured", name="x")
    assert m_s.shape == () and np.isclose(m_s, dirty[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(s_s, dirty[keep].std(1, ddof=1).mean(), rtol=1e-5)
    with pytest.raises(ShapeError):
        fit_zscore(np.full((5, 2), np.nan), "independent", name="x")


def test_standardization_fit_and_flow_log_prob_of_theta():
    rng = np.random.default_rng(1)
    theta = rng.normal([3.0, -1.0], [2.0, 0.1], size=(400, 2)).astype(np.float32)
    x = (theta @ rng.normal(size=(2, 3))).astype(np.float32)
    x[:10] = np.nan  # failed simulations
    std = Standardization.fit(theta, x)
    np.testing.assert_allclose(std.theta_mean, theta[10:].mean(0), rtol=1e-4)
    np.testing.assert_allclose(std.x_std, np.nanstd(x, 0, ddof=1), rtol=1e-4)
    flow = build_flow(FlowConfig(kind="maf", **SMALL), theta_dim=2, x_shape=3, standardization=std)
    # log q(θ) = log q_flow(w) - Σ log σ: compare with an unstandardised flow on w.
    plain = build_flow(FlowConfig(kind="maf", **SMALL), theta_dim=2, x_shape=3)
    w = (theta[10:20] - std.theta_mean) / std.theta_std
    xs = (x[10:20] - std.x_mean) / std.x_std

    @_jit
    def run(key):
        params = flow.init(key)
        return flow.log_prob(params, theta[10:20], x[10:20]), plain.log_prob(params, w, xs)

    lp, lp_plain = run(jax.random.key(0))
    expected = lp_plain - np.sum(np.log(std.theta_std))
    np.testing.assert_allclose(lp, expected, rtol=1e-5, atol=1e-4)
    # Round trip through a JSON-able dict.
    again = Standardization.from_dict(std.to_dict())
    np.testing.assert_array_equal(again.x_mean, std.x_mean)


def test_prior_bijection_log_det():
    prior = _MIXED
    std = Standardization.fit(
        np.asarray(prior.sample(jax.random.key(0), 300)),
        np.zeros((300, 1)),
        z_score_theta="transform_to_unconstrained",
        prior=prior,
    )
    assert std.prior is prior
    assert std.x_std.tolist() == [1.0]  # constant x column -> std 1
    theta = prior.sample(jax.random.key(1), 5)

    @_jit
    def run(theta):
        w, ld = jax.vmap(std.theta_forward)(theta)
        jac = jax.vmap(jax.jacfwd(lambda t_: std.theta_forward(t_)[0]))(theta)
        back, ld_back = jax.vmap(std.theta_inverse)(w)
        return ld, jnp.linalg.slogdet(jac)[1], back, ld_back

    ld, ld_ref, back, ld_back = run(theta)
    np.testing.assert_allclose(ld, ld_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(back, theta, rtol=1e-4)
    np.testing.assert_allclose(ld_back, -ld, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError):
        Standardization.fit(
            np.zeros((4, 2)), np.zeros((4, 1)), z_score_theta="transform_to_unconstrained"
        )


def test_build_flow_from_data_uses_the_config():
    rng = np.random.default_rng(2)
    theta = np.asarray(_BOX.sample(jax.random.key(0), 200))
    x = rng.normal(size=(200, 16)).astype(np.float32)
    cfg = FlowConfig(
        kind="maf", z_score_theta="transform_to_unconstrained", z_score_x="structured", **SMALL
    )
    flow = build_flow_from_data(cfg, theta, x, prior=_BOX)
    assert flow.standardization.prior is _BOX
    assert np.shape(flow.standardization.x_mean) == ()
    s = _jit(lambda k: flow.sample(flow.init(k), jax.random.key(2), x[0], 200))(jax.random.key(1))
    assert np.all(np.asarray(_BOX.in_support(s)))


# ---------------------------------------------------------------------------------------
# Configs, registry, compile size
# ---------------------------------------------------------------------------------------


def test_config_defaults_match_sbi_and_parse():
    cfg = FlowConfig()
    assert (cfg.kind, cfg.hidden, cfg.transforms, cfg.blocks, cfg.bins) == ("maf", 50, 5, 2, 10)
    assert cfg.tail_bound == 3.0 and cfg.min_derivative == 1e-3
    assert cfg.z_score_theta == cfg.z_score_x == "independent" and cfg.embedding is None
    assert set(FLOWS) == {"maf", "nsf", "nsf_ar"}
    spec = FlowConfig(kind="nsf", embedding=CNNEmbedding()).to_dict()
    assert FlowConfig.from_dict(spec) == FlowConfig(kind="nsf", embedding=CNNEmbedding())
    with pytest.raises(ConfigError, match="hiden"):
        FlowConfig.from_dict({"kind": "nsf", "hiden": 3})
    with pytest.raises(ConfigError, match="kind"):
        FlowConfig(kind="realnvp")
    with pytest.raises(ConfigError, match="bins"):
        FlowConfig(bins=0)
    # (these failed only when the flow was built, with numpy's TypeError or ValueError)
    for field, value in (("permutation_seed", -1), ("permutation_seed", 1.5),
                         ("tail_bound", "3"), ("min_bin_width", "x"), ("blocks", True)):
        with pytest.raises(ConfigError, match=f"flow {field}: expected"):
            FlowConfig.from_dict({"kind": "nsf", field: value})
    with pytest.raises(ShapeError):
        build_flow(FlowConfig(embedding=CNNEmbedding()), theta_dim=2, x_shape=(4,))


def test_nsf_conditioner_starts_where_nflows_does():
    """nflows' ResidualNet under sbi's build_nsf: every layer torch's nn.Linear init,
    U(±1/sqrt(fan_in)) for weights and biases, whose fan-in counts only the untransformed
    features; the last layer of each block U(±1e-3). ``nsf_init="nflows"`` starts there;
    the default ``"torch_bias"`` differs only in the first layer's fan-in (all D
    features); ``"zero_bias"`` starts every bias at zero."""
    d, c, hidden = 4, 3, 50

    def conditioner(**kw):
        flow = build_flow(FlowConfig(kind="nsf", hidden=hidden, **kw), theta_dim=d,
                          x_shape=(c,))
        return flow.init(jax.random.key(0))["layers"]["conditioner"]

    def assert_uniform(a, bound, what):
        # U(±bound) over >= 5 * 50 draws: the largest is within 3 % of the bound
        a = np.abs(np.asarray(a))
        assert 0.97 * bound < a.max() <= bound, (what, a.max(), bound)

    fan_ins = {"Dense_0": d // 2 + c, "Dense_1": hidden, "Dense_3": c, "Dense_4": hidden,
               "Dense_6": c, "Dense_7": hidden}
    nflows, default = conditioner(nsf_init="nflows"), conditioner()
    zero = conditioner(nsf_init="zero_bias")
    assert FlowConfig().nsf_init == "torch_bias"
    for name, fan_in in fan_ins.items():
        for leaf in ("kernel", "bias"):
            assert_uniform(nflows[name][leaf], 1 / math.sqrt(fan_in), (name, leaf))
            full_fan_in = d + c if name == "Dense_0" else fan_in
            assert_uniform(default[name][leaf], 1 / math.sqrt(full_fan_in), (name, leaf))
        assert_uniform(zero[name]["kernel"], 1 / math.sqrt(full_fan_in), name)
        assert not np.any(np.asarray(zero[name]["bias"])), name
    for net in (nflows, default, zero):
        for name in ("Dense_2", "Dense_5"):
            for leaf in ("kernel", "bias"):
                assert 0.9e-3 < np.abs(np.asarray(net[name][leaf])).max() <= 1e-3
    with pytest.raises(ConfigError, match="nsf_init"):
        FlowConfig(kind="nsf", nsf_init="torch")


def test_permutations_never_repeat_an_order_and_keep_old_draws():
    from sbi_engine.flows.autoregressive import permutations

    identity = lambda d: np.arange(d)  # noqa: E731
    for d in range(1, 7):
        for seed in range(20):
            cfg = FlowConfig(transforms=6, permutation_seed=seed)
            assert cfg.permutation == "random_nonidentity"
            perms = permutations(cfg, d)
            assert perms.shape == (6, d) and perms.dtype == np.int32
            assert all(sorted(p) == list(range(d)) for p in perms)
            if d > 1:  # consecutive layers never share an autoregressive order
                assert not any(np.array_equal(p, identity(d)) for p in perms)
    # D = 2: every layer swaps, i.e. the reversal.
    np.testing.assert_array_equal(permutations(FlowConfig(), 2),
                                  permutations(FlowConfig(permutation="reverse"), 2))
    # "random" keeps the draws that model files written with it were built from.
    old = permutations(FlowConfig(permutation="random"), 2)
    np.testing.assert_array_equal(old, [[0, 1], [0, 1], [0, 1], [1, 0], [1, 0]])
    # Where "random" draws no identity, both kinds draw the same permutations.
    np.testing.assert_array_equal(permutations(FlowConfig(permutation="random"), 10),
                                  permutations(FlowConfig(), 10))
    with pytest.raises(ConfigError, match="permutation"):
        FlowConfig(permutation="shuffle")


@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_program_size_does_not_grow_with_depth(kind):
    def n_eqns(transforms):
        flow = build_flow(
            FlowConfig(kind=kind, hidden=8, transforms=transforms), theta_dim=3, x_shape=2
        )
        params = jax.eval_shape(flow.init, jax.random.key(0))
        jaxpr = jax.make_jaxpr(flow.log_prob)(params, jnp.zeros((2, 3)), jnp.zeros((2, 2)))
        jaxpr_s = jax.make_jaxpr(lambda p: flow.sample(p, jax.random.key(0), jnp.zeros(2), 4))(
            params
        )
        return len(jaxpr.jaxpr.eqns), len(jaxpr_s.jaxpr.eqns)

    assert n_eqns(2) == n_eqns(7)


# ---------------------------------------------------------------------------------------
# Training sanity: a linear-Gaussian conditional with known entropy
# ---------------------------------------------------------------------------------------


def test_training_reaches_true_conditional_entropy():
    """θ | x ~ N(A x, L Lᵀ): a few hundred Adam steps on fresh simulations reach the
    true conditional entropy (the NPE loss's minimum) to within 0.1 nats."""
    a = np.array([[1.0, -0.5], [0.3, 0.8]], np.float32)
    chol = np.array([[0.5, 0.0], [0.3, 0.2]], np.float32)

    def simulate(key, n):
        kx, ke = jax.random.split(key)
        x = jax.random.normal(kx, (n, 2))
        return x @ a.T + jax.random.normal(ke, (n, 2)) @ chol.T, x

    def true_nll(theta, x):
        eps = np.linalg.solve(chol, (np.asarray(theta) - np.asarray(x) @ a.T).T).T
        log_det = np.sum(np.log(np.diag(chol)))
        return float(np.mean(0.5 * np.sum(eps**2, 1) + log_det + math.log(2 * math.pi)))

    entropy = math.log(2 * math.pi * math.e) + float(np.sum(np.log(np.diag(chol))))
    theta, x = simulate(jax.random.key(0), 1024)
    flow = build_flow_from_data(FlowConfig(kind="nsf", hidden=32, transforms=3), theta, x)
    steps = 400
    opt = optax.adam(optax.cosine_decay_schedule(5e-3, steps))
    theta_t, x_t = simulate(jax.random.key(3), 8192)

    def loss(p, th, xx):
        return -jnp.mean(flow.log_prob(p, th, xx))

    @_jit
    def train(key):
        k_init, k_steps = jax.random.split(key)
        params = flow.init(k_init)

        def step(carry, k):  # one Adam step on a fresh batch of simulations
            p, s = carry
            val, g = jax.value_and_grad(loss)(p, *simulate(k, 256))
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), val

        init = (params, opt.init(params))
        (params, _), losses = jax.lax.scan(step, init, jax.random.split(k_steps, steps))
        return losses, loss(params, theta_t, x_t)

    losses, nll = train(jax.random.key(1))
    reference = true_nll(theta_t, x_t)  # ≈ entropy, with the test set's noise
    assert abs(reference - entropy) < 0.05
    assert float(losses[:20].mean()) > entropy + 0.5  # it did have to learn
    assert reference - 0.03 < float(nll) < reference + 0.1, (float(nll), reference)
