"""Classifiers, losses and vmapped trainers (sbi_engine.classify)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbi_engine import classify as C
from sbi_engine.errors import ConfigError, SbiEngineError, ShapeError
from sbi_engine.events import make_dataset
from sbi_engine.programs import clear_compiled_programs
from sbi_engine.significance import asimov_z_sigma_b
from simulators.toy_physics import inferno, pivot


@pytest.fixture(scope="module")
def pivot_gen():
    return pivot.build()


@pytest.fixture(scope="module")
def inferno_gen():
    return inferno.build()


# data generation jitted: one compilation instead of many small eager ones
_make_dataset = jax.jit(make_dataset, static_argnums=(1, 3))
_augmented_data = jax.jit(C.augmented_data, static_argnums=(1, 2))


@pytest.fixture(scope="module")
def pivot_data(pivot_gen):
    """Nuisance-augmented pivot events: Z ~ N(0, 1) per event (the paper's training set)."""
    return _augmented_data(jax.random.key(0), pivot_gen, 2000)


@pytest.fixture(scope="module")
def pivot_models(pivot_data):
    """Adversarial training at λ = 0 (plain BCE for the classifier) and λ = 10, same seed,
    in one vmapped run."""
    cfg = C.ClassifierConfig(loss="pivot", hidden=(16, 16), batch_size=256, steps=1200,
                             pretrain_steps=200, adv_on="signal", adv_steps=5)
    keys = jnp.stack([jax.random.key_data(jax.random.key(1))] * 2)
    return C.train_many(keys, pivot_data, cfg, hyper={"adv_lambda": jnp.array([0.0, 10.0])})


@pytest.fixture(scope="module")
def inferno_data(inferno_gen):
    return C.train_data(_make_dataset(jax.random.key(20), inferno_gen, None, 2000),
                        inferno_gen.nominal_nu())


def _ks(a, b):
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda s: np.searchsorted(np.sort(s), grid, side="right") / len(s)  # noqa: E731
    return float(np.max(np.abs(cdf(a) - cdf(b))))


def _fd(f, x, direction, eps):
    return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


# ----------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("hidden", (32, 0)), ("hidden", 5), ("activation", "sigmoidz"), ("learning_rate", 0.0),
    ("learning_rate", float("nan")), ("steps", 0), ("steps", 2.5), ("batch_size", -1),
    ("loss", "focal"), ("sigma_b", -0.1), ("bins", 1), ("temperature", 0.0),
    ("adv_lambda", -1.0), ("adv_components", 0), ("adv_on", "both"), ("pretrain_steps", -1),
    ("clip_norm", 0.0), ("free_nuisances", "r"), ("balance", 1), ("inferno_events", 0),
    ("min_background", -1.0),
    # the wrong type: a list where a name is expected, a number where a list is
    ("activation", ["relu"]), ("loss", ["bce"]), ("adv_on", ["all"]), ("free_nuisances", 5),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        C.ClassifierConfig(**{field: value})


def test_config_from_dict_and_incompatible_options():
    cfg = C.ClassifierConfig.from_dict({"hidden": [8, 8], "loss": "asimov", "sigma_b": 0.1})
    assert cfg.hidden == (8, 8) and hash(cfg) == hash(dataclasses.replace(cfg))
    assert C.ClassifierConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key 'lamda'"):
        C.ClassifierConfig.from_dict({"lamda": 1.0})
    with pytest.raises(ConfigError, match="parameterised"):
        C.ClassifierConfig(loss="inferno", parameterised=True)
    assert set(C.LOSSES) >= {"bce", "asimov", "inferno", "pivot"}


def test_inferno_needs_generator_and_known_nuisances(inferno_gen, inferno_data):
    data = inferno_data
    with pytest.raises(ConfigError, match="generator"):
        C.train_one(jax.random.key(0), data, C.ClassifierConfig(loss="inferno", steps=1))
    cfg = C.ClassifierConfig(loss="inferno", steps=1, free_nuisances=("q",))
    with pytest.raises(ConfigError, match="free_nuisances"):
        C.train_one(jax.random.key(0), data, cfg, generator=inferno_gen)


# ----------------------------------------------------------------------------------
# Losses: gradients against finite differences (float64)
# ----------------------------------------------------------------------------------


def test_bce_and_asimov_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        logits = jnp.asarray(rng.normal(size=12))
        y = jnp.asarray((np.arange(12) % 3 == 0).astype(float))
        w = jnp.asarray(rng.uniform(0.5, 2.0, 12)) * jnp.where(y > 0, 1.0, 20.0)
        d = jnp.asarray(rng.normal(size=12))
        f = jax.jit(lambda v: C.bce_loss(v, y, w))
        np.testing.assert_allclose(jnp.vdot(jax.grad(f)(logits), d), _fd(f, logits, d, 1e-6),
                                   rtol=1e-6)
        # BCE equals the textbook formula
        p = jax.nn.sigmoid(logits)
        ref = -jnp.sum(w * (y * jnp.log(p) + (1 - y) * jnp.log(1 - p))) / jnp.sum(w)
        np.testing.assert_allclose(f(logits), ref, rtol=1e-10)
        loss = jax.jit(lambda v, sb: C.asimov_loss(jax.nn.sigmoid(v), y, w, sb)[0])
        grad = jax.jit(jax.grad(loss))
        for sigma_b in (0.0, 0.1, 0.5):
            g = lambda v, sb=sigma_b: loss(v, sb)  # noqa: E731
            np.testing.assert_allclose(jnp.vdot(grad(logits, sigma_b), d),
                                       _fd(g, logits, d, 1e-6), rtol=1e-5)
        # the loss is −Z_A of the soft-selected yields
        s, b = jnp.sum(w * y * p), jnp.sum(w * (1 - y) * p)
        np.testing.assert_allclose(C.asimov_loss(p, y, w, 0.1)[0],
                                   -asimov_z_sigma_b(s, b, 0.1 * b), rtol=1e-10)


def test_mdn_nll_gradient_and_normalisation():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        logits, mean = jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.normal(size=(3, 1)))
        log_sigma = jnp.asarray(rng.normal(size=(3, 1)) * 0.3)
        f = jax.jit(lambda m: C.mdn_nll(logits, m, log_sigma, jnp.array([0.3])))
        d = jnp.asarray(rng.normal(size=(3, 1)))
        np.testing.assert_allclose(jnp.vdot(jax.grad(f)(mean), d), _fd(f, mean, d, 1e-6),
                                   rtol=1e-6)
        grid = jnp.linspace(-15, 15, 20001)
        dens = jnp.exp(-jax.jit(jax.vmap(
            lambda t: C.mdn_nll(logits, mean, log_sigma, t[None])))(grid))
        assert float(jnp.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)


@functools.cache
def _tiny_inferno_init(gen):
    cfg = C.ClassifierConfig(hidden=(8,), loss="inferno", bins=4, activation="tanh")
    return jax.jit(C.make_trainer(cfg, gen).init)


def _tiny_inferno_params(gen, data, key):
    return _tiny_inferno_init(gen)(key, data).params


def test_inferno_loss_gradient_matches_finite_differences(inferno_gen, inferno_data):
    """d(I⁻¹)_μμ / dφ through the Hessian and the simulator (r profiled), along a direction."""
    params = _tiny_inferno_params(inferno_gen, inferno_data, jax.random.key(3))
    nu0 = jnp.asarray(inferno_gen.nominal_nu())

    def var_mu(net):
        summary = lambda x: C.soft_summary(params.replace(net=net), x, 0.5)  # noqa: E731
        fisher = C.inferno_fisher(summary, inferno_gen, jax.random.key(4), n=300, nu0=nu0,
                                  free=(0,))
        return jnp.linalg.inv(fisher)[0, 0]

    loss = jax.jit(jax.value_and_grad(var_mu))
    leaves, tree = jax.tree.flatten(params.net)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    direction = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape)
                                          for k, a in zip(keys, leaves)])
    _, grad = loss(params.net)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                   jax.tree.leaves(direction)))
    eps = 3e-3
    shift = lambda s: jax.tree.map(lambda a, d: a + s * d, params.net, direction)  # noqa: E731
    numeric = (loss(shift(eps))[0] - loss(shift(-eps))[0]) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-2)


def test_inferno_fisher_is_hessian_of_asimov_nll_and_benchmarks_order(inferno_gen,
                                                                      inferno_data):
    """inferno_fisher (Σ_j ∂n_j ∂n_jᵀ / n_j, ∂ through the simulator) equals the Hessian of
    the Poisson NLL of the Asimov counts (the paper's definition); B0–B4 from it agree
    with inferno.expected_uncertainty and are ordered: profiling nuisances can only
    increase the uncertainty, constraints reduce it."""
    params = _tiny_inferno_params(inferno_gen, inferno_data, jax.random.key(6))
    nu0 = jnp.asarray(inferno_gen.nominal_nu())
    widths = jnp.asarray(inferno_gen.constraints)
    key = jax.random.key(7)
    summary = lambda x: C.soft_summary(params, x, 0.3)  # noqa: E731

    def counts(theta):
        total = 0.0
        for p, proc in enumerate(inferno_gen.processes):
            x = inferno_gen.sample(jax.random.fold_in(key, p), 400, p, theta[1:])
            total = total + (theta[0] if proc.signal else 1.0) * \
                inferno_gen.expected_yield(p, theta[1:]) * jnp.mean(summary(x), axis=0)
        return total

    @jax.jit
    def fishers(constraint):
        hess = C.inferno_fisher(summary, inferno_gen, key, n=400, nu0=nu0, free=(0, 1, 2),
                                constraint=constraint)
        theta0 = jnp.concatenate([jnp.ones(1), nu0])
        asimov = counts(theta0)
        nll = lambda t: jnp.sum(counts(t) - asimov * jnp.log(counts(t)))  # noqa: E731
        return hess, jax.hessian(nll)(theta0)

    hess, reference = fishers(jnp.zeros(3))
    np.testing.assert_allclose(hess, reference, rtol=2e-3, atol=1e-6)
    full = np.asarray(hess, np.float64)
    to_s = np.diag([1 / 50.0, 1, 1, 1])  # θ = (μ, ν) -> (s = 50 μ, ν)
    sig = {name: inferno.expected_uncertainty(to_s @ full @ to_s, name)
           for name in inferno.BENCHMARKS}
    assert all(np.isfinite(v) for v in sig.values())
    assert sig["B0"] <= sig["B1"] <= sig["B2"]
    assert sig["B3"] <= sig["B2"] and sig["B3"] <= sig["B4"]
    # the constraint terms added inside inferno_fisher (here B4) match
    b4 = np.linalg.inv(np.asarray(fishers(1 / widths**2)[0], np.float64))
    assert 50.0 * np.sqrt(b4[0, 0]) == pytest.approx(sig["B4"], rel=1e-4)
    assert 50.0 / np.sqrt(full[0, 0]) == pytest.approx(sig["B0"], rel=1e-6)


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------


def test_bce_classifier_auc_on_inferno_toy(inferno_gen, inferno_data):
    cfg = C.ClassifierConfig(hidden=(32, 32), steps=1500, batch_size=256)
    res = C.train_one(jax.random.key(2), inferno_data, cfg)
    test = C.train_data(_make_dataset(jax.random.key(3), inferno_gen, None, 2000))
    scores = C.predict(res.params, test.x)
    assert scores.shape == (4000,)
    assert float(scores.min()) >= 0 and float(scores.max()) <= 1
    # the likelihood ratio (analytic densities) reaches ≈ 0.90 on this problem
    assert C.roc_auc(scores, test.y) > 0.87
    assert res.metrics["loss"][-100:].mean() < res.metrics["loss"][:10].mean() - 0.2


def test_pivot_reduces_dependence_on_z(pivot_gen, pivot_data, pivot_models):
    """Louppe et al.'s toy: at λ = 10 the signal output barely moves between Z = ∓1."""
    out = [np.asarray(C.predict_many(pivot_models.params, pivot_gen.sample(
        jax.random.key(11), 3000, "signal", pivot_gen.make_nu(z=z)))) for z in (-1.0, 1.0)]
    ks_bce, ks_pivot = (_ks(out[0][i], out[1][i]) for i in range(2))
    assert ks_bce > 0.4  # seeds 1-8: 0.04-0.09 at λ = 10 vs ≈ 0.52 at λ = 0
    assert ks_pivot < 0.3 * ks_bce and ks_pivot < 0.15
    # the adversary is left near the prior's entropy (N(0,1): 1.42 nats) at λ = 10
    nll = pivot_models.metrics["adv_nll"][:, -200:].mean(axis=1)
    assert nll[1] > 1.35 and nll[1] > nll[0]
    test = _augmented_data(jax.random.key(12), pivot_gen, 2000)
    aucs = [C.roc_auc(s, test.y) for s in np.asarray(C.predict_many(pivot_models.params,
                                                                      test.x))]
    assert aucs[0] > 0.84 and aucs[1] > 0.72


def test_asimov_loss_improves_significance(inferno_data):
    """Two seeds under vmap on a shared dataset; both beat their initial Z_A."""
    data = inferno_data
    cfg = C.ClassifierConfig(hidden=(16, 16), loss="asimov", sigma_b=0.1, steps=200,
                             batch_size=512, learning_rate=3e-3)
    keys = jax.random.split(jax.random.key(21), 2)
    trained = C.train_many(keys, data, cfg)
    z_batch = trained.metrics["z"]  # minibatch estimates; step 0 is before any update
    assert z_batch.shape == (2, 200) and np.all(np.isfinite(z_batch))
    for i in range(2):
        _, (s, b) = C.asimov_loss(C.predict(C.select(trained.params, i), data.x), data.y,
                                  data.w, 0.1)
        z_full = float(asimov_z_sigma_b(s, b, 0.1 * b))
        assert z_full > 2.0 * z_batch[i, :5].mean() and z_full > 1.5
        assert z_batch[i, -50:].mean() > 2.0 * z_batch[i, :5].mean()


def test_inferno_b0_uncertainty_decreases(inferno_gen, inferno_data):
    data = inferno_data
    cfg = C.ClassifierConfig(hidden=(16, 16), loss="inferno", bins=10, temperature=0.1,
                             steps=80, inferno_events=200, learning_rate=3e-3)
    res = C.train_one(jax.random.key(31), data, cfg, generator=inferno_gen)
    sig = res.metrics["sigma_s"]
    assert np.all(np.isfinite(sig))
    assert sig[-20:].mean() < 0.8 * sig[:5].mean()
    # cannot beat the analytic likelihood (14.71) by more than MC noise; close to it
    assert 13.5 < sig[-20:].mean() < 19.0
    assert C.predict(res.params, data.x).shape == (4000,)


def test_parameterised_classifier_uses_nu(pivot_gen, pivot_data):
    cfg = C.ClassifierConfig(hidden=(32, 32), steps=1000, parameterised=True)
    res = C.train_one(jax.random.key(40), pivot_data, cfg)
    with pytest.raises(ShapeError, match="nu="):
        C.predict(res.params, pivot_data.x)
    xb = pivot_gen.sample(jax.random.key(41), 2000, "background")
    y = np.r_[np.ones(2000), np.zeros(2000)]
    for z in (-1.0, 1.0):
        xs = pivot_gen.sample(jax.random.key(42), 2000, "signal", pivot_gen.make_nu(z=z))
        x = jnp.concatenate([xs, xb])
        right, wrong = (C.roc_auc(C.predict(res.params, x, jnp.array([v])), y)
                        for v in (z, -z))
        assert right > wrong + 0.05  # told the true Z, it separates better


# ----------------------------------------------------------------------------------
# vmap == sequential, compile once
# ----------------------------------------------------------------------------------


def check_train_many_equals_train_one(data):
    """Three learning rates trained at once under ``vmap`` and one at a time, each on its
    own 80 rows of ``data``: the same weights and losses. Returns ``(many, stacked, one
    of the single trainings)``."""
    m = 3
    keys = jax.random.split(jax.random.key(50), m)
    datasets = [C.TrainData(*(a[i::50] for a in data)) for i in range(m)]  # 80 rows
    stacked = C.TrainData(*(jnp.stack(a) for a in zip(*datasets)))
    lrs = jnp.array([1e-3, 3e-3, 1e-2])
    cfg = C.ClassifierConfig(hidden=(8,), steps=25, batch_size=32)
    many = C.train_many(keys, stacked, cfg, hyper={"learning_rate": lrs})
    assert many.metrics["loss"].shape == (m, 25)
    for i in range(m):
        one = C.train_one(keys[i], datasets[i], cfg, hyper={"learning_rate": float(lrs[i])})
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     one.params, C.select(many.params, i))
        np.testing.assert_allclose(one.metrics["loss"], many.metrics["loss"][i], rtol=1e-4)
    return many, stacked, one


def test_train_many_equals_train_one_and_compiles_once(pivot_data):
    m, lrs = 3, jnp.array([1e-3, 3e-3, 1e-2])
    cfg = C.ClassifierConfig(hidden=(8,), steps=25, batch_size=32)
    many, stacked, one = check_train_many_equals_train_one(pivot_data)
    assert one.compilations == 1 and many.compilations == 1
    again = C.train_many(jax.random.split(jax.random.key(51), m), stacked, cfg,
                         hyper={"learning_rate": lrs * 2, "adv_lambda": 0.2})
    assert again.compilations == 1
    assert C.predict_many(again.params, stacked.x[0]).shape == (m, 80)
    # clear_compiled_programs forgets the trainer too: it compiles again, same numbers.
    clear_compiled_programs()
    fresh = C.train_many(jax.random.split(jax.random.key(51), m), stacked, cfg,
                         hyper={"learning_rate": lrs * 2, "adv_lambda": 0.2})
    assert fresh.compilations == 2
    jax.tree.map(np.testing.assert_array_equal, fresh.params, again.params)


def test_bad_shapes_are_shape_errors(pivot_data):
    cfg = C.ClassifierConfig(hidden=(4,), steps=1)
    with pytest.raises(ShapeError, match="hyper"):
        C.train_many(jax.random.split(jax.random.key(0), 2), pivot_data, cfg,
                     hyper={"learning_rate": jnp.ones(3)})
    with pytest.raises(ShapeError, match="data.x"):
        C.train_many(jax.random.split(jax.random.key(0), 2),
                     C.TrainData(*(a[None].repeat(3, 0) for a in pivot_data)), cfg)
    with pytest.raises(ConfigError, match="hyper"):
        C.train_one(jax.random.key(0), pivot_data, cfg, hyper={"lr": 1.0})


@pytest.mark.parametrize("hyper, field", [
    ({"learning_rate": -1.0}, "learning_rate"), ({"learning_rate": float("nan")}, "learning_rate"),
    ({"temperature": 0.0}, "temperature"), ({"sigma_b": -0.1}, "sigma_b"),
    ({"adv_lambda": np.array([0.0, -1.0])}, "adv_lambda"),
    ({"learning_rate": "fast"}, "learning_rate"),
])
def test_bad_hyper_values_are_config_errors(pivot_data, hyper, field):
    cfg = C.ClassifierConfig(hidden=(4,), steps=1)
    match = rf"hyper\['{field}'\]: expected"
    with pytest.raises(ConfigError, match=match):
        C.train_many(jax.random.split(jax.random.key(0), 2), pivot_data, cfg, hyper=hyper)
    if np.ndim(hyper[field]) == 0:
        with pytest.raises(ConfigError, match=match):
            C.train_one(jax.random.key(0), pivot_data, cfg, hyper=hyper)
    with pytest.raises(ConfigError, match=match):
        C.make_trainer(cfg).init(jax.random.key(0), pivot_data, hyper)


@pytest.mark.parametrize("n", [-5, {"signal": -3, "background": 5}, 0])
def test_augmented_data_validates_counts_first(pivot_gen, n):
    with pytest.raises(ConfigError, match="n_per_process: expected non-negative counts"):
        C.augmented_data(jax.random.key(0), pivot_gen, n)


def test_roc_auc_rejects_mismatched_lengths_and_a_missing_class():
    with pytest.raises(ShapeError, match="scores, y, w: expected equal shapes"):
        C.roc_auc([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ShapeError, match="scores, y, w: expected equal shapes"):
        C.roc_auc([0.1, 0.2], [1, 0], [1.0, 1.0, 1.0])
    with pytest.raises(ShapeError, match="background weight 0"):
        C.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ShapeError, match="signal weight 0"):
        C.roc_auc([0.1, 0.2], [1, 0], [0.0, 1.0])


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(2)
    s = np.round(rng.normal(size=200), 1)  # with ties
    y = rng.uniform(size=200) < 0.4
    w = rng.uniform(0.1, 2.0, size=200)
    diff = s[y][:, None] - s[~y][None, :]
    pair = (diff > 0) + 0.5 * (diff == 0)
    ref = np.sum(w[y][:, None] * w[~y][None, :] * pair) / (w[y].sum() * w[~y].sum())
    assert C.roc_auc(s, y, w) == pytest.approx(ref, rel=1e-12)


# ----------------------------------------------------------------------------------
# Asimov loss: numerically safe at small background
# ----------------------------------------------------------------------------------


def test_asimov_loss_is_finite_with_no_selected_background():
    """float32: a selection that keeps (almost) no background gives a finite loss and
    gradient for every σ_b; b is floored at min_background, and Cowan's Z_A itself has
    finite gradients at tiny b (no inf·0 from the unused branch)."""
    y = jnp.array([1.0, 1.0, 0.0, 0.0])
    w = jnp.array([25.0, 25.0, 500.0, 500.0])
    loss = jax.jit(jax.value_and_grad(
        lambda v, sb: C.asimov_loss(jax.nn.sigmoid(v), y, w, sb, min_background=1.0)[0]))
    for logits in ([5.0, 5.0, -30.0, -30.0], [-100.0] * 4, [100.0, 100.0, -100.0, -100.0],
                   [0.0] * 4):
        for sigma_b in (0.0, 0.1, 0.5):
            value, grad = loss(jnp.asarray(logits), sigma_b)
            assert np.isfinite(value) and np.all(np.isfinite(grad)), (logits, sigma_b)
    @jax.jit
    def floored_and_grads(probs, points):
        value, (s, b) = C.asimov_loss(probs, y, w, 0.1, min_background=2.0)
        grads = jax.vmap(jax.grad(lambda a: asimov_z_sigma_b(*a)))(points)
        return value, b, -asimov_z_sigma_b(s, 2.0, 0.2), grads

    value, b, expected, grads = floored_and_grads(
        jax.nn.sigmoid(jnp.array([5.0, 5.0, -30.0, -30.0])),
        jnp.array([[0.0, 1e-6, 1e-7], [50.0, 1e-6, 1e-7], [50.0, 1e-3, 1e-4]]))
    assert float(b) == 2.0 and float(value) == pytest.approx(float(expected), rel=1e-6)
    assert np.all(np.isfinite(grads))
    with pytest.raises(ConfigError, match="min_background"):
        C.ClassifierConfig(loss="asimov", min_background=0.0)


# ----------------------------------------------------------------------------------
# Binned (hard) templates: the INFERNO paper's evaluation
# ----------------------------------------------------------------------------------


def test_binned_fisher_reproduces_the_papers_optimal_classifier_row(inferno_gen):
    """The Bayes-optimal classifier p(s|x) (balanced), 10 equal bins, r ± 0.2 and λ ± 0.5
    templates: the paper's "optimal classifier" row is 14.97 / 19.12 / 24.93 / 22.13 /
    27.98 (MC noise here ≈ 1-2 % at 50k events per process)."""
    gen = inferno_gen

    @jax.jit
    def optimal(x):
        log_r = jax.vmap(lambda e: gen.log_prob(e, "signal") - gen.log_prob(e, "background"))
        return jax.nn.sigmoid(log_r(x))

    # two stacked "models": p and 1 − p bin the same events in mirrored bins, so the same
    # Fisher matrix; the default steps are the authors' (r ± 0.2, λ ± 0.5)
    stacked = C.binned_fisher(lambda x: jnp.stack([optimal(x), 1.0 - optimal(x)]), gen,
                              jax.random.key(0), n=50_000, edges=10)
    assert stacked.shape == (2, 4, 4)
    fisher = stacked[0]
    assert np.allclose(fisher, fisher.T)
    np.testing.assert_allclose(stacked[1], fisher, rtol=1e-3)
    to_s = np.diag([1 / 50.0, 1.0, 1.0, 1.0])
    sig = {b: inferno.expected_uncertainty(to_s @ fisher @ to_s, b) for b in inferno.BENCHMARKS}
    for b, published in zip(inferno.BENCHMARKS, inferno.PUBLISHED["optimal_classifier"]):
        assert sig[b] == pytest.approx(published, rel=0.05 if b != "B0" else 0.02), b
    with pytest.raises(ConfigError, match="steps"):
        C.binned_fisher(optimal, gen, jax.random.key(0), n=10, steps={"q": 0.1})
    with pytest.raises(ConfigError, match="edges"):
        C.binned_fisher(optimal, gen, jax.random.key(0), n=10, edges=[0.0, 0.5, 0.5])


# ----------------------------------------------------------------------------------
# Files: save / load without pickle
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_params(pivot_data):
    cfg = C.ClassifierConfig(hidden=(8, 4), activation="tanh", steps=1)
    return cfg, jax.jit(C.make_trainer(cfg).init)(jax.random.key(60), pivot_data).params


def test_save_load_round_trip(tmp_path, tiny_params, pivot_data):
    cfg, params = tiny_params
    path = C.save_classifier(tmp_path / "clf", params, cfg, metadata={"auc": np.float32(0.9),
                                                                      "nu": np.arange(2)})
    loaded = C.load_classifier(path)
    assert loaded.config == cfg and loaded.metadata == {"auc": pytest.approx(0.9), "nu": [0, 1]}
    np.testing.assert_array_equal(C.predict(loaded.params, pivot_data.x),
                                  C.predict(params, pivot_data.x))
    with np.load(path / "weights.npz", allow_pickle=False) as npz:  # plain arrays only
        assert "net/Dense_2/kernel" in npz.files
    # stacked models (train_many) round-trip too, and a save replaces the directory
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    C.save_classifier(path, stacked)
    again = C.load_classifier(path)
    assert again.config is None
    np.testing.assert_array_equal(C.predict_many(again.params, pivot_data.x[:50]),
                                  C.predict_many(stacked, pivot_data.x[:50]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no temporary left


def _rewrite(path, header=None, weights=None):
    """Replace the files of a saved classifier; keep the checksum valid for new weights."""
    import hashlib
    import json

    from sbi_engine.posterior import seal_header

    head = json.loads((path / "classifier.json").read_text())
    if weights is not None:
        (path / "weights.npz").write_bytes(weights)
        head["weights"]["sha256"] = hashlib.sha256(weights).hexdigest()
    head.update(header or {})
    (path / "classifier.json").write_text(json.dumps(seal_header(head)))


def test_load_refuses_bad_files_with_clear_errors(tmp_path, tiny_params):
    import io

    cfg, params = tiny_params
    path = C.save_classifier(tmp_path / "clf", params, cfg)
    good = (path / "weights.npz").read_bytes()
    assert issubclass(C.ClassifierFileError, SbiEngineError)

    with pytest.raises(C.ClassifierFileError, match="classifier.json and weights.npz"):
        C.load_classifier(tmp_path / "nowhere")
    (path / "weights.npz").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(C.ClassifierFileError, match="truncated or corrupted"):
        C.load_classifier(path)
    _rewrite(path, weights=b"PK\x03\x04 not a zip archive")  # garbage, checksum updated
    with pytest.raises(C.ClassifierFileError, match="weights.npz cannot be read"):
        C.load_classifier(path)
    buffer = io.BytesIO()
    np.savez(buffer, loc=np.zeros(3, np.float32))  # valid npz, wrong arrays
    _rewrite(path, weights=buffer.getvalue())
    with pytest.raises(C.ClassifierFileError, match="expected"):
        C.load_classifier(path)
    _rewrite(path, weights=good)
    C.load_classifier(path)  # repaired
    _rewrite(path, header={"format_version": 99, "engine_version": "9.0"})
    with pytest.raises(C.ClassifierFileError, match="format version 99.*reads version 1"):
        C.load_classifier(path)
    _rewrite(path, header={"format_version": 1, "hidden": [8, 5]})
    with pytest.raises(C.ClassifierFileError, match="Dense_1"):
        C.load_classifier(path)
    _rewrite(path, header={"hidden": [8, 4], "config": {"hiden": [8]}})
    with pytest.raises(C.ClassifierFileError, match="inconsistent.*hiden"):
        C.load_classifier(path)
    (path / "classifier.json").write_text("{not json")
    with pytest.raises(C.ClassifierFileError, match="not valid JSON"):
        C.load_classifier(path)
    with pytest.raises(ShapeError, match="ClassifierParams"):
        C.save_classifier(tmp_path / "x", {"net": 1})
