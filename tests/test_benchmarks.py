"""Contract and reference tests of the sbibm benchmark simulators (simulators.benchmarks).

Every task runs through one table-driven suite (shapes, dtypes, determinism, jit/vmap
equal to the per-row loop, prior support, consistency of the stored sbibm observation
with simulations at the stored true parameters). Task-specific tests check the facts
that are easy to get wrong: gaussian_linear's 0.1 *variance* (against the analytic
posterior and the sbibm reference samples), slcp's draw-by-draw output order, and
bernoulli_glm's sufficient statistics, design matrix and precision-matrix prior.

Tests that need the large sbibm files (reference posterior samples, the raw spike
trains) skip when no sbibm data directory is found.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy import stats

from sbi_engine.errors import ConfigError, DatasetError
from sbi_engine.priors import BoxUniform, Gaussian
from sbi_engine.simulator import JaxSimulator, get_simulator, row_keys
from simulators.benchmarks import TASKS, reference

# task -> (dim θ, dim x), as in sbibm.
DIMS = {
    "two_moons": (2, 2),
    "gaussian_linear": (10, 10),
    "gaussian_linear_uniform": (10, 10),
    "gaussian_mixture": (2, 2),
    "slcp": (5, 8),
    "bernoulli_glm": (10, 10),
}


# One batch size everywhere: every new shape costs a compilation. Row keys are
# fold_in(key, row), so the first rows of a batch are comparable to a short loop.
N_REF, N_HELD = 2000, 500  # consistency checks: reference and held-out simulations
N_SIM = N_REF + N_HELD
N_LOOP = 8


def _module(task):
    return importlib.import_module(f"simulators.benchmarks.{task}")


_SIMS: dict = {}


def _sim(task) -> JaxSimulator:
    if task not in _SIMS:  # build once per task so jitted functions are reused
        _SIMS[task] = _module(task).build()
    return _SIMS[task]


@pytest.fixture(scope="module")
def sbibm_dir(sbibm_missing) -> Path:
    if sbibm_missing:
        pytest.skip(f"sbibm data not available: {sbibm_missing}")
    return reference.data_dir()


def test_task_table_is_complete():
    assert set(TASKS) == set(DIMS)


# ------------------------------------------------------------------------------------
# Contract suite
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_build_and_registry(task):
    sim = _sim(task)
    d, x = DIMS[task]
    assert isinstance(sim, JaxSimulator)
    assert sim.name == task
    assert (sim.dim_theta, sim.dim_x, sim.dim_nu) == (d, x, 0)
    assert sim.prior.dim == d
    assert len(set(sim.parameter_names)) == d and len(set(sim.observables)) == x
    assert "sbibm" in sim.description
    registered = get_simulator(task)
    assert registered.spec() == sim.spec()


@pytest.mark.parametrize("task", TASKS)
def test_simulate_shape_dtype_determinism(task):
    sim = _sim(task)
    theta = sim.prior.sample(jax.random.key(0), N_SIM)
    x1 = sim.simulate(jax.random.key(1), theta)
    x2 = sim.simulate(jax.random.key(1), theta)
    x3 = sim.simulate(jax.random.key(2), theta)
    assert x1.shape == (N_SIM, sim.dim_x)
    assert x1.dtype == np.float32
    assert np.all(np.isfinite(np.asarray(x1)))
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))
    assert not np.array_equal(np.asarray(x1), np.asarray(x3))


@pytest.mark.parametrize("task", TASKS)
def test_batched_equals_loop_over_row_keys(task):
    sim = _sim(task)
    n = N_LOOP
    theta = np.asarray(sim.prior.sample(jax.random.key(3), N_SIM))
    key = jax.random.key(4)
    batched = np.asarray(sim.simulate(key, theta))[:n]
    keys = row_keys(key, 0, n)
    single = jax.jit(sim.fn)  # one example at a time, compiled once
    looped = np.stack([np.asarray(single(keys[i], theta[i], None)) for i in range(n)])
    assert looped.dtype == np.float32 and looped.shape == (n, sim.dim_x)
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_prior_samples_and_true_parameters_in_support(task):
    sim, mod = _sim(task), _module(task)
    theta = sim.prior.sample(jax.random.key(5), N_SIM)
    assert theta.shape == (N_SIM, sim.dim_theta) and theta.dtype == np.float32
    truth = np.stack([mod.true_parameters(k) for k in range(1, 11)])
    sim.check_theta(truth)  # raises when outside the support
    both = np.concatenate([np.asarray(theta), truth])
    assert bool(np.all(sim.prior.in_support(both)))
    assert np.all(np.isfinite(np.asarray(sim.prior.log_prob(both))))


# ------------------------------------------------------------------------------------
# The stored observations are draws of our simulators at the stored true parameters
# ------------------------------------------------------------------------------------


def _consistency_p_value(sim, theta, x_o, key, *, n_ref=N_REF, n_held=N_HELD, k=5) -> float:
    """Rank test of ``x_o`` against simulations at ``theta``.

    Simulates ``n_ref + n_held`` data at ``theta``; the statistic is the distance (in
    coordinates standardised by the simulations) to the k-th nearest of the ``n_ref``
    reference simulations. If ``x_o`` is a draw at ``theta`` it is exchangeable with
    the ``n_held`` held-out draws, so its rank among them is uniform. Returns the
    p-value ``(1 + #{held-out at least as far}) / (n_held + 1)``.
    """
    theta = np.broadcast_to(np.asarray(theta, np.float32), (n_ref + n_held, sim.dim_theta))
    x = np.asarray(sim.simulate(key, theta), dtype=np.float64)
    ref, held = x[:n_ref], x[n_ref:]
    mean, std = ref.mean(0), ref.std(0) + 1e-12

    def kth_distance(q):
        z_q, z_r = (q - mean) / std, (ref - mean) / std
        d2 = (z_q**2).sum(1)[:, None] - 2.0 * z_q @ z_r.T + (z_r**2).sum(1)[None, :]
        return np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0.0))

    d_o = kth_distance(np.asarray(x_o, np.float64)[None, :])[0]
    return float((1 + np.sum(kth_distance(held) >= d_o)) / (n_held + 1))


def _far_theta(sim, theta):
    """Move ``theta`` across the prior: half the box width, or 2 prior std, per dimension."""
    theta = np.asarray(theta, np.float64)
    if isinstance(sim.prior, BoxUniform):
        step = 0.5 * (sim.prior.high - sim.prior.low)
    else:
        assert isinstance(sim.prior, Gaussian)
        step = 2.0 * np.sqrt(np.diag(sim.prior.cov))
    far = theta - np.where(theta >= 0, 1.0, -1.0) * step
    sim.check_theta(far)
    return far.astype(np.float32)


P_MIN = 0.01


@pytest.mark.parametrize("task", TASKS)
def test_observation_consistent_with_true_parameters(task):
    sim, mod = _sim(task), _module(task)
    theta, x_o = mod.true_parameters(1), mod.observation(1)
    p_true = _consistency_p_value(sim, theta, x_o, jax.random.key(6))
    assert p_true >= P_MIN, f"{task}: observation 1 atypical at its true θ (p={p_true:.4f})"
    # The same check rejects the observation at a far-away θ, so it is not vacuous.
    p_far = _consistency_p_value(sim, _far_theta(sim, theta), x_o, jax.random.key(6))
    assert p_far < P_MIN, f"{task}: check does not reject a far-away θ (p={p_far:.4f})"


@pytest.mark.parametrize("task", TASKS)
def test_all_observations_consistent_on_average(task):
    """Pooled over the ten observations the p-values look uniform (mean 0.5 ± 0.09).

    A simulator that is too broad drives the p-values to 1, one that is too narrow or
    shifted drives them to 0; the band [0.2, 0.8] is ±3.3 standard deviations.
    """
    sim, mod = _sim(task), _module(task)
    p = [_consistency_p_value(sim, mod.true_parameters(k), mod.observation(k),
                              jax.random.key(k))
         for k in range(1, 11)]
    assert 0.2 <= np.mean(p) <= 0.8, f"{task}: p-values {np.round(p, 3)}"


def test_slcp_output_order_matches_sbibm():
    """sbibm flattens the (4 draws, 2 coordinates) array draw by draw."""
    sim, mod = _sim("slcp"), _module("slcp")
    for num in (1, 2, 3):
        theta, x_o = mod.true_parameters(num), mod.observation(num)
        assert _consistency_p_value(sim, theta, x_o, jax.random.key(num)) >= P_MIN
    # Read as coordinate-major (x₁..x₄, y₁..y₄), observation 1 is inconsistent.
    theta, x_o = mod.true_parameters(1), mod.observation(1)
    coordinate_major = x_o.reshape(2, 4).T.reshape(8)
    assert _consistency_p_value(sim, theta, coordinate_major, jax.random.key(1)) < P_MIN


# ------------------------------------------------------------------------------------
# Exact moments of the simulators (the sbibm formulas, written independently here)
# ------------------------------------------------------------------------------------


def _mean_cov_within_error(samples, mean, cov, n_se=5.0) -> bool:
    """Sample mean and covariance agree with ``(mean, cov)`` within ``n_se`` standard errors.

    The covariance standard errors are the Gaussian ones, ``√((Σᵢᵢ Σⱼⱼ + Σᵢⱼ²) / n)``.
    """
    n = samples.shape[0]
    s_mean = samples.mean(0)
    s_cov = np.cov(samples, rowvar=False)
    var = np.diag(cov)
    se_mean = np.sqrt(var / n)
    se_cov = np.sqrt((np.outer(var, var) + cov**2) / n)
    return bool(np.all(np.abs(s_mean - mean) <= n_se * se_mean)
                and np.all(np.abs(s_cov - cov) <= n_se * se_cov))


def _slcp_moments(theta):
    s1, s2, rho = theta[2] ** 2, theta[3] ** 2, math.tanh(theta[4])
    cov = np.array([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]]) + 1e-6 * np.eye(2)
    return np.asarray(theta[:2], np.float64), cov


@pytest.mark.parametrize("task", ["gaussian_linear", "gaussian_linear_uniform"])
def test_gaussian_linear_noise_covariance(task):
    sim, mod = _sim(task), _module(task)
    theta = mod.true_parameters(2).astype(np.float64)
    x = np.asarray(sim.simulate(jax.random.key(9), np.tile(theta, (N_SIM, 1))), np.float64)
    assert _mean_cov_within_error(x, theta, 0.1 * np.eye(10))
    assert not _mean_cov_within_error(x, theta, 0.01 * np.eye(10))  # 0.1 is a variance


def test_slcp_draws_have_sbibm_mean_and_covariance():
    sim = _sim("slcp")
    theta = np.array([0.5, -1.0, 1.2, -0.9, 0.7])
    x = np.asarray(sim.simulate(jax.random.key(10), np.tile(theta, (N_SIM, 1)).astype(np.float32)))
    draws = x.reshape(N_SIM * 4, 2).astype(np.float64)  # 4 i.i.d. draws per simulation
    mean, cov = _slcp_moments(theta)
    assert _mean_cov_within_error(draws, mean, cov)
    # Standard deviations θ₃, θ₄ (instead of θ₃², θ₄²), or ρ = 0, are rejected.
    wrong_scale = cov * np.outer([1 / 1.2, 1 / 0.9], [1 / 1.2, 1 / 0.9])
    assert not _mean_cov_within_error(draws, mean, wrong_scale)
    assert not _mean_cov_within_error(draws, mean, np.diag(np.diag(cov)))
    # Different draws of one simulation are independent.
    assert abs(np.corrcoef(x[:, 0], x[:, 2])[0, 1]) < 5 / math.sqrt(N_SIM)


def test_two_moons_half_ring():
    """``x`` minus the θ shift is ``(0.25 + r cos a, r sin a)``, r ~ N(0.1, 0.01²), |a| < π/2."""
    sim = _sim("two_moons")
    theta = np.array([0.3, -0.7])
    x = np.asarray(sim.simulate(jax.random.key(11), np.tile(theta, (N_SIM, 1)).astype(np.float32)))
    shift = np.array([-abs(theta[0] + theta[1]), theta[1] - theta[0]]) / math.sqrt(2)
    p = x.astype(np.float64) - shift - np.array([0.25, 0.0])
    r, a = np.hypot(p[:, 0], p[:, 1]), np.arctan2(p[:, 1], p[:, 0])
    assert abs(r.mean() - 0.1) < 5 * 0.01 / math.sqrt(N_SIM)
    assert abs(r.std() / 0.01 - 1.0) < 0.08
    assert np.all(np.abs(a) <= math.pi / 2 + 1e-4)
    assert stats.kstest(a, stats.uniform(-math.pi / 2, math.pi).cdf).pvalue > 1e-3


def test_bernoulli_glm_moments():
    """``x = Xᵀy`` with ``y_t ~ Bernoulli(σ(X_t θ))``: mean ``Xᵀp``, cov ``Xᵀ diag(p(1-p)) X``."""
    sim, mod = _sim("bernoulli_glm"), _module("bernoulli_glm")
    theta = mod.true_parameters(1).astype(np.float64)
    matrix = mod.design_matrix().astype(np.float64)
    rate = 1.0 / (1.0 + np.exp(-matrix @ theta))
    mean, cov = matrix.T @ rate, matrix.T @ ((rate * (1 - rate))[:, None] * matrix)
    x = np.asarray(sim.simulate(jax.random.key(12), np.tile(theta, (N_SIM, 1))), np.float64)
    assert np.all(x[:, 0] == np.round(x[:, 0])) and np.all((x[:, 0] >= 0) & (x[:, 0] <= 100))
    assert _mean_cov_within_error(x, mean, cov)
    assert not _mean_cov_within_error(x, matrix.T @ (1.0 / (1.0 + np.exp(-matrix @ -theta))), cov)


# ------------------------------------------------------------------------------------
# Reference posteriors
# ------------------------------------------------------------------------------------


def test_gaussian_linear_analytic_posterior_matches_reference(sbibm_dir):
    mod = _module("gaussian_linear")
    for num in range(1, 11):
        x_o = mod.observation(num).astype(np.float64)
        samples = mod.reference_posterior_samples(num).astype(np.float64)
        mean, cov = mod.analytic_posterior(x_o)
        np.testing.assert_allclose(cov, 0.05 * np.eye(10), rtol=1e-12)
        np.testing.assert_allclose(mean, x_o / 2.0, rtol=1e-12)
        assert _mean_cov_within_error(samples, mean, cov), f"observation {num}"
        # Reading 0.1 as a standard deviation (prior and noise variance 0.01) gives
        # cov 0.005 I, mean x_o/2: the reference samples reject that.
        assert not _mean_cov_within_error(samples, mean, 0.1 * cov), f"observation {num}"
        # A prior of variance 0.01 with noise variance 0.1 (cov 1/110, mean x_o/11):
        wrong_cov = np.eye(10) / 110.0
        assert not _mean_cov_within_error(samples, x_o / 11.0, wrong_cov)


def test_gaussian_linear_uniform_reference_is_truncated_gaussian(sbibm_dir):
    mod = _module("gaussian_linear_uniform")
    std = math.sqrt(0.1)
    for num in (1, 2, 3):
        x_o = mod.observation(num).astype(np.float64)
        samples = mod.reference_posterior_samples(num).astype(np.float64)
        dist = stats.truncnorm((-1.0 - x_o) / std, (1.0 - x_o) / std, loc=x_o, scale=std)
        se = dist.std() / math.sqrt(samples.shape[0])
        assert np.all(np.abs(samples.mean(0) - dist.mean()) <= 5 * se), f"observation {num}"
        assert np.all(np.abs(samples.std(0) / dist.std() - 1.0) < 0.05), f"observation {num}"


@pytest.mark.parametrize("task", TASKS)
def test_reference_samples_shape_and_support(task, sbibm_dir):
    sim, mod = _sim(task), _module(task)
    samples = mod.reference_posterior_samples(1)
    assert samples.shape == (10000, sim.dim_theta) and samples.dtype == np.float32
    assert bool(np.all(sim.prior.in_support(samples)))
    assert np.all(np.isfinite(np.asarray(sim.prior.log_prob(samples))))


# ------------------------------------------------------------------------------------
# bernoulli_glm specifics
# ------------------------------------------------------------------------------------


def test_bernoulli_glm_summary_is_xt_y_of_raw_spike_train(sbibm_dir):
    mod = _module("bernoulli_glm")
    matrix = mod.design_matrix()
    for num in range(1, 11):
        folder = sbibm_dir / "bernoulli_glm" / "files" / f"num_observation_{num}"
        spikes = np.loadtxt(folder / "observation_raw.csv", delimiter=",", skiprows=1)
        assert spikes.shape == (100,) and set(np.unique(spikes)) <= {0.0, 1.0}
        np.testing.assert_allclose(matrix.T @ spikes, mod.observation(num), atol=1e-4)


def test_bernoulli_glm_design_matrix_structure():
    matrix = _module("bernoulli_glm").design_matrix()
    assert matrix.shape == (100, 10) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[:, 0], 1.0)
    stimulus = matrix[:, 1]
    for lag in range(9):  # column 1 + lag is the stimulus delayed by `lag` bins
        np.testing.assert_array_equal(matrix[lag:, 1 + lag], stimulus[: 100 - lag])
        np.testing.assert_array_equal(matrix[:lag, 1 + lag], 0.0)
    # The stimulus is N(0, 1) white noise drawn with numpy seed 42 (sbibm).
    expected = np.random.RandomState(42).randn(100).astype(np.float32)
    np.testing.assert_allclose(stimulus, expected, rtol=1e-6)


def test_bernoulli_glm_prior_is_the_smoothness_precision():
    sim, mod = _sim("bernoulli_glm"), _module("bernoulli_glm")
    precision = mod.prior_precision()
    assert precision[0, 0] == 0.5 and np.all(precision[0, 1:] == 0.0)
    # Filter block: F = D² + diag(√(i/9)) with D the first-difference matrix.
    f = np.zeros((9, 9))
    for i in range(9):
        f[i, i] = 1.0 + math.sqrt(i / 9)
        if i >= 1:
            f[i, i - 1] = -2.0
        if i >= 2:
            f[i, i - 2] = 1.0
    np.testing.assert_allclose(precision[1:, 1:], f.T @ f, atol=1e-12)
    # The prior log density in precision form: -½θᵀBθ + ½log|B| - (D/2)log 2π.
    theta = np.asarray(sim.prior.sample(jax.random.key(7), N_SIM), dtype=np.float64)
    _, logdet = np.linalg.slogdet(precision)
    expected = (-0.5 * np.einsum("ni,ij,nj->n", theta, precision, theta)
                + 0.5 * logdet - 5.0 * math.log(2 * math.pi))
    np.testing.assert_allclose(np.asarray(sim.prior.log_prob(theta)), expected, rtol=1e-5)


def test_gaussian_mixture_component_scales():
    """Half the draws come from N(θ, I), half from N(θ, 0.01 I), one component per draw."""
    sim = _sim("gaussian_mixture")
    x = np.asarray(sim.simulate(jax.random.key(8), np.zeros((N_SIM, 2), np.float32)))
    radius = np.linalg.norm(x, axis=1)
    narrow = radius < 0.4  # P(|x| < 0.4) = 1 - e⁻⁸ under the narrow, 0.077 under the broad
    assert 0.49 <= narrow.mean() <= 0.59  # expected 0.538, sd 0.01
    # Within the narrow draws both coordinates are small together (shared component).
    assert np.std(x[narrow]) < 0.15


# ------------------------------------------------------------------------------------
# Loading the reference data
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_observation_and_true_parameters_loading(task):
    mod = _module(task)
    d, x = DIMS[task]
    obs, truth = mod.observation(1), mod.true_parameters(10)
    assert obs.shape == (x,) and obs.dtype == np.float32
    assert truth.shape == (d,) and truth.dtype == np.float32
    assert not np.array_equal(mod.observation(1), mod.observation(2))
    obs[0] = np.nan  # callers get a copy
    assert np.isfinite(mod.observation(1)[0])
    assert isinstance(reference.ReferenceData(task).observation_seed(1), int)


@pytest.mark.parametrize("bad", [0, 11, -1, 1.0, "1", True, None])
def test_bad_observation_number(bad):
    mod = _module("two_moons")
    for fn in (mod.observation, mod.true_parameters, mod.reference_posterior_samples):
        with pytest.raises(ConfigError, match=r"num_observation: expected an integer in 1\.\.10"):
            fn(bad)


def test_numpy_integer_observation_number():
    mod = _module("two_moons")
    np.testing.assert_array_equal(mod.observation(np.int64(3)), mod.observation(3))


def test_missing_data_dir_from_env(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(reference.DATA_ENV_VAR, str(missing))
    mod = _module("gaussian_linear")
    with pytest.raises(DatasetError) as info:
        mod.reference_posterior_samples(1)
    assert reference.DATA_ENV_VAR in str(info.value) and str(missing) in str(info.value)
    # The packaged small files do not need the data directory.
    assert mod.observation(1).shape == (10,)


def test_missing_data_dir_defaults(monkeypatch, tmp_path):
    tried = (tmp_path / "a", tmp_path / "b")
    monkeypatch.delenv(reference.DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(reference, "_default_data_dirs", lambda: tried)
    with pytest.raises(DatasetError) as info:
        reference.data_dir()
    message = str(info.value)
    assert reference.DATA_ENV_VAR in message
    assert all(str(p) in message for p in tried)


def test_missing_samples_file(monkeypatch, tmp_path):
    monkeypatch.setenv(reference.DATA_ENV_VAR, str(tmp_path))
    with pytest.raises(DatasetError, match=r"reference_posterior_samples\.csv\.bz2"):
        _module("slcp").reference_posterior_samples(4)


def test_packaged_data_matches_sbibm_csv(sbibm_dir):
    path = Path(reference.__file__).parent / "data" / "make_data.py"
    spec = importlib.util.spec_from_file_location("_sbibm_make_data", path)
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    assert set(make_data.TASKS) == set(TASKS)
    for task in TASKS:
        assert make_data.task_data(sbibm_dir, task) == reference.load_task_json(task), task
