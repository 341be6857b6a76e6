"""Posterior diagnostics: C2ST, SBC, expected coverage (HPD and TARP), predictive checks.

What is computed
----------------

**Classifier two-sample test (C2ST)** (Lopez-Paz & Oquab 2017; the metric of sbibm,
Lueckmann et al. 2021, "Benchmarking Simulation-Based Inference"). A classifier is
trained to tell samples ``X`` (the reference) from ``Y``; its cross-validated accuracy
is 0.5 when the two distributions are equal and 1.0 when they are disjoint.

- :func:`c2st_sbibm` is the exact sbibm definition (``sbibm/metrics/c2st.py``): both
  sets are z-scored with the mean and unbiased std of ``X``; the classifier is
  scikit-learn's ``MLPClassifier(activation="relu", hidden_layer_sizes=(10d, 10d),
  max_iter=10000, solver="adam", random_state=seed)``, scored by the mean accuracy
  over ``KFold(n_splits=n_folds, shuffle=True, random_state=seed)``. Use it to
  compare with the published tables.
- :func:`c2st_fast` is the same test with a flax MLP trained by optax: all folds are
  trained at once under ``vmap`` inside one ``jit``; a whole training run is one
  ``lax.scan``. It runs on a GPU and is much faster for large sample sets, but its
  numbers are close to, not identical with, the published ones.

**Simulation-based calibration (SBC)** (Talts et al. 2018, arXiv:1804.06788). For
``θ_i ~ p(θ)``, ``x_i ~ p(x | θ_i)`` and ``L`` samples ``θ_ij ~ q(θ | x_i)``, the rank
``r_id = #{j : θ_ijd < θ_id}`` of each true parameter among its posterior samples is
uniform on ``{0, ..., L}`` for every dimension ``d`` when ``q`` is the exact posterior.
:func:`sbc_uniformity` tests this with a chi-square test on binned ranks and a
Kolmogorov-Smirnov test. A U-shaped rank histogram means an over-confident (too
narrow) posterior, a hump an under-confident one, a slope a biased one.

**Expected coverage.** Each simulation gets a *credibility level* ``c_i ∈ (0, 1)``:
the smallest level whose credible region contains ``θ_i``; with the exact posterior
``c_i ~ U(0, 1)``, so the empirical coverage ``P(c_i <= α)`` equals the nominal ``α``.

- HPD regions (Hermans et al. 2022, "A Trust Crisis in Simulation-Based Inference?",
  arXiv:2110.06581): ``c_i`` is the fraction of posterior samples with a higher
  posterior density than ``θ_i`` (needs the estimator's ``log_prob``).
- TARP (Lemos et al. 2023, arXiv:2302.03026, Algorithm 2): with a random reference
  point ``θ_r,i``, ``c_i`` is the fraction of posterior samples closer to ``θ_r,i``
  than ``θ_i`` is; needs samples only. Parameters are min-max scaled first and the
  references are drawn uniformly in the box spanned by the true parameters, as in
  the authors' code.

Both ranks and credibility levels use the mid-rank ``(k + 0.5) / (L + 1)`` so that
they are uniform on ``(0, 1)`` up to ``O(1/L)`` without random tie-breaking.

SBC and expected coverage are necessary, not sufficient, conditions: an estimator
that ignores ``x`` and returns the prior passes both. Compare against a reference
posterior (C2ST) where one exists, and look at the posterior predictive.

**Posterior predictive check** (Gelman, Meng & Stern 1996): simulate ``x`` from
posterior samples and ask whether the observation looks like one of them
(per-feature z-scores and predictive p-values, and the quantile of the observation's
standardized distance among the simulated ones).

To run SBC, HPD coverage and TARP on the same posterior draws, call
:func:`sample_posteriors` once and pass its ``(N, L, D)`` output to
:func:`ranks_from_samples`, :func:`hpd_credibility` and :func:`tarp_credibility`.

Conventions: ``sample_fn(key, x (*X,), n) -> (n, D)`` draws ``n`` posterior samples
for one observation; ``log_prob_fn(theta (m, D), x (*X,)) -> (m,)`` evaluates the
posterior log density for one observation; ``simulate_fn(key, theta (n, D)) ->
(n, X)`` is a batched simulator (close over any nuisance parameters). With a
:class:`sbi_engine.posterior.Posterior` and a simulator ``sim``::

    sample_fn = lambda key, x, n: posterior.sample(key, n, x)
    log_prob_fn = posterior.log_prob
    simulate_fn = lambda key, theta: sim.simulate(key, theta)
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy import stats

from sbi_engine.errors import ConfigError, ShapeError

__all__ = [
    "CoverageResult",
    "PredictiveCheck",
    "SBCTest",
    "c2st_fast",
    "c2st_sbibm",
    "coverage_curve",
    "expected_coverage",
    "hpd_credibility",
    "posterior_predictive",
    "ranks_from_samples",
    "sample_posteriors",
    "sbc_ranks",
    "sbc_uniformity",
    "tarp_credibility",
]

Array = jax.Array
SampleFn = Callable[[Array, Any, int], Any]
LogProbFn = Callable[[Any, Any], Any]
SimulateFn = Callable[[Array, Any], Any]


# ------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------


def _matrix(value: Any, name: str, *, dim: int | None = None) -> np.ndarray:
    """``value`` as a finite float64 ``(n, d)`` array, else :class:`ShapeError`."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2:
        raise ShapeError(f"{name}: expected a 2-D array (n, d), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ShapeError(f"{name}: expected a non-empty (n, d) array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ShapeError(f"{name}: expected {dim} columns, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr).all(axis=1)).sum())
        raise ShapeError(f"{name}: {bad} row(s) contain NaN or inf; drop them first")
    return arr


def _check_n(n: int, name: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise ConfigError(f"{name}: expected an int >= {minimum}, got {n!r}")
    return int(n)


# ------------------------------------------------------------------------------------
# C2ST
# ------------------------------------------------------------------------------------


def _c2st_inputs(X: Any, Y: Any, n_folds: int) -> tuple[np.ndarray, np.ndarray]:
    X = _matrix(X, "X")
    Y = _matrix(Y, "Y", dim=X.shape[1])
    n_folds = _check_n(n_folds, "n_folds", minimum=2)
    if X.shape[0] + Y.shape[0] < 2 * n_folds:
        raise ShapeError(
            f"X, Y: {X.shape[0]} + {Y.shape[0]} samples are too few for {n_folds} folds"
        )
    if X.shape[0] < 2:
        raise ShapeError("X: need at least 2 samples to z-score with X's std")
    return X, Y


def _zscore_by_reference(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score both sets with X's mean and unbiased std (as ``torch.std`` in sbibm).

    Sums are accumulated in float64 and rounded to X's dtype: this matches torch's
    float32 ``std`` exactly and its ``mean`` (float32 sum / n) more often than numpy's
    float32 reductions do. Bit-level parity with torch is not guaranteed.
    """
    n = X.dtype.type(X.shape[0])
    mean = X.astype(np.float64).sum(axis=0).astype(X.dtype) / n
    std = X.astype(np.float64).std(axis=0, ddof=1).astype(X.dtype)
    if np.any(std == 0):
        cols = np.flatnonzero(std == 0).tolist()
        raise ShapeError(f"X: column(s) {cols} are constant; cannot z-score with X's std")
    return (X - mean) / std, (Y - mean) / std


def c2st_sbibm(X: Any, Y: Any, seed: int = 1, n_folds: int = 5) -> float:
    """Classifier two-sample test accuracy, exactly as sbibm computes it.

    Both sets are z-scored with ``X``'s mean and unbiased std (``X`` is the reference,
    e.g. the reference posterior samples, as in sbibm's ``c2st(reference, samples)``),
    in float32 as sbibm's torch tensors are. An sklearn ``MLPClassifier`` with two
    ReLU hidden layers of ``10 * d`` units (adam, ``max_iter=10000``,
    ``random_state=seed``) is scored by accuracy in ``KFold(n_splits=n_folds,
    shuffle=True, random_state=seed)`` cross-validation; the mean is returned.

    The result equals sbibm's to the bit when the float32 z-scored inputs coincide
    (checked on two_moons samples); torch's float32 ``mean`` can differ in the last
    bit, and the MLP's training trajectory amplifies that to differences of about
    0.01 in accuracy -- the same size as the metric's own seed-to-seed noise.

    Args:
        X: ``(n, d)`` reference samples.
        Y: ``(m, d)`` samples to compare.
        seed: Seed of the classifier initialisation and of the fold shuffling
            (sbibm uses the same seed for both; the published numbers use 1).
        n_folds: Number of cross-validation folds.

    Returns:
        Mean held-out accuracy in ``[0, 1]``; 0.5 means indistinguishable.

    Raises:
        ShapeError: ``X``/``Y`` are not 2-D with the same number of columns, contain
            NaN/inf, or ``X`` has a constant column.
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.model_selection import KFold, cross_val_score
        from sklearn.neural_network import MLPClassifier
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "c2st_sbibm needs scikit-learn; install it with `pip install scikit-learn` "
            "or the `sbi` extra (`pip install -e '.[sbi]'`), or use c2st_fast"
        ) from err

    X, Y = _c2st_inputs(X, Y, n_folds)
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    X, Y = _zscore_by_reference(X, Y)
    ndim = X.shape[1]
    clf = MLPClassifier(
        activation="relu",
        hidden_layer_sizes=(10 * ndim, 10 * ndim),
        max_iter=10000,
        solver="adam",
        random_state=seed,
    )
    data = np.concatenate((X, Y))
    target = np.concatenate((np.zeros((X.shape[0],)), np.ones((Y.shape[0],))))
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    scores = cross_val_score(clf, data, target, cv=folds, scoring="accuracy")
    return float(np.mean(scores))


class _MLP(nnx.Module):
    """ReLU MLP ``(d,) -> ()`` logit."""

    def __init__(self, d: int, hidden: tuple[int, ...], *, rngs: nnx.Rngs):
        sizes = (d, *hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.out = nnx.Linear(sizes[-1], 1, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.out(x)[..., 0]


@functools.partial(
    jax.jit,
    static_argnames=("n_x", "hidden", "n_folds", "num_steps", "batch_size", "learning_rate"),
)
def _c2st_fast_impl(
    key: Array,
    data: Array,
    labels: Array,
    *,
    n_x: int,
    hidden: tuple[int, ...],
    n_folds: int,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
) -> Array:
    """Per-fold held-out accuracy ``(n_folds,)``; all folds trained at once (vmap)."""
    n, d = data.shape
    key_x, key_y, key_folds = jax.random.split(key, 3)

    def split(key: Array, start: int, m: int) -> tuple[Array, Array]:
        size = m // n_folds
        perm = start + jax.random.permutation(key, m)
        return perm[: size * n_folds].reshape(n_folds, size), perm[size * n_folds :]

    # Shuffled k-fold split, stratified: every fold holds the same number of X and of
    # Y rows, so that no training set leans to one class (plain KFold makes the
    # held-out accuracy of identical distributions biased below 0.5). The leftover
    # rows of each class join every training set and are never tested on, so that
    # all test folds have one static size.
    folds_x, left_x = split(key_x, 0, n_x)
    folds_y, left_y = split(key_y, n_x, n - n_x)
    folds = jnp.concatenate([folds_x, folds_y], axis=1)
    leftover = jnp.concatenate([left_x, left_y])
    fold_size = folds.shape[1]
    others = np.array([[j for j in range(n_folds) if j != f] for f in range(n_folds)])
    train_idx = jnp.concatenate(
        [
            folds[others].reshape(n_folds, (n_folds - 1) * fold_size),
            jnp.broadcast_to(leftover, (n_folds, leftover.shape[0])),
        ],
        axis=1,
    )
    n_train = train_idx.shape[1]
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
    graphdef, _ = nnx.split(_MLP(d, hidden, rngs=nnx.Rngs(0)))

    def loss_fn(params: Any, idx: Array) -> Array:
        logits = nnx.merge(graphdef, params)(data[idx])
        return optax.sigmoid_binary_cross_entropy(logits, labels[idx]).mean()

    def fit_one(key: Array, train: Array, test: Array) -> Array:
        key_init, key_steps = jax.random.split(key)
        params = nnx.split(_MLP(d, hidden, rngs=nnx.Rngs(key_init)))[1]

        def step(carry: Any, key: Array) -> tuple[Any, None]:
            params, opt_state = carry
            idx = train[jax.random.randint(key, (batch_size,), 0, n_train)]
            grads = jax.grad(loss_fn)(params, idx)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        carry = (params, optimizer.init(params))
        (params, _), _ = jax.lax.scan(step, carry, jax.random.split(key_steps, num_steps))
        logits = nnx.merge(graphdef, params)(data[test])
        return jnp.mean((logits > 0) == (labels[test] > 0.5))

    return jax.vmap(fit_one)(jax.random.split(key_folds, n_folds), train_idx, folds)


def c2st_fast(
    key: Array,
    X: Any,
    Y: Any,
    *,
    n_folds: int = 5,
    hidden: Sequence[int] | None = None,
    num_steps: int = 3000,
    batch_size: int = 256,
    learning_rate: float = 1e-2,
) -> float:
    """Classifier two-sample test with a jitted flax MLP (fast, GPU-ready).

    Same preprocessing as :func:`c2st_sbibm` (z-score with ``X``'s mean and unbiased
    std) and the same kind of classifier (two ReLU hidden layers), trained with adam
    (cosine-decayed learning rate, binary cross-entropy, minibatches drawn with
    replacement) for a fixed number of steps on each of ``n_folds`` shuffled folds
    (stratified: each fold holds a ``1/n_folds`` share of ``X`` and of ``Y``), so the
    cost does not grow with the number of samples. All folds train
    simultaneously under ``vmap`` in a single compiled call; accuracy is measured on
    each held-out fold and averaged.

    The numbers are close to :func:`c2st_sbibm` for easy and for identical pairs of
    distributions; on hard ones (thin, curved posteriors such as two_moons) this
    wider, longer-trained classifier can separate better, so use :func:`c2st_sbibm`
    to compare with published tables.

    Args:
        key: PRNG key (fold split, initialisation, minibatches).
        X: ``(n, d)`` reference samples.
        Y: ``(m, d)`` samples to compare.
        n_folds: Number of cross-validation folds (>= 2).
        hidden: Hidden layer widths; default ``(max(10 d, 64),) * 2``.
        num_steps: Adam steps per fold.
        batch_size: Minibatch size.
        learning_rate: Peak adam learning rate (cosine decay to 0).

    Returns:
        Mean held-out accuracy in ``[0, 1]``; 0.5 means indistinguishable.

    Raises:
        ShapeError: ``X``/``Y`` are not 2-D with the same number of columns, contain
            NaN/inf, or ``X`` has a constant column.
    """
    X, Y = _c2st_inputs(X, Y, n_folds)
    if min(X.shape[0], Y.shape[0]) < n_folds:
        raise ShapeError(f"X, Y: each needs at least n_folds={n_folds} samples")
    X, Y = _zscore_by_reference(X, Y)
    d = X.shape[1]
    hidden = (max(10 * d, 64),) * 2 if hidden is None else tuple(int(h) for h in hidden)
    if not hidden or min(hidden) < 1:
        raise ShapeError(f"hidden: expected positive layer widths, got {hidden}")
    data = jnp.asarray(np.concatenate((X, Y)), dtype=jnp.float32)
    labels = jnp.concatenate((jnp.zeros(X.shape[0]), jnp.ones(Y.shape[0])))
    acc = _c2st_fast_impl(
        key,
        data,
        labels,
        n_x=X.shape[0],
        hidden=hidden,
        n_folds=n_folds,
        num_steps=_check_n(num_steps, "num_steps"),
        batch_size=_check_n(batch_size, "batch_size"),
        learning_rate=float(learning_rate),
    )
    return float(jnp.mean(acc))


# ------------------------------------------------------------------------------------
# Posterior samples for many observations
# ------------------------------------------------------------------------------------


def _theta_x(theta: Any, x: Any) -> tuple[np.ndarray, np.ndarray]:
    theta = _matrix(theta, "theta")
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] != theta.shape[0]:
        raise ShapeError(
            f"x: expected leading dimension {theta.shape[0]} (one row per theta), "
            f"got shape {x.shape}"
        )
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int((~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)).sum())
        raise ShapeError(f"x: {bad} row(s) contain NaN or inf; drop failed simulations first")
    return theta, x


@functools.partial(jax.jit, static_argnums=(0, 1))
def _vmapped(fn: Callable[..., Any], extra: tuple[Any, ...], *args: Array) -> Any:
    """``vmap`` of ``fn(*row, *extra)``; ``fn`` and ``extra`` are static, so repeated
    calls with the same function and shapes reuse one compilation."""
    return jax.vmap(lambda *row: fn(*row, *extra))(*args)


def _map_rows(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    name: str,
    vectorize: bool,
    chunk_size: int,
    extra: tuple[Any, ...] = (),
) -> np.ndarray:
    """``stack([fn(*(a[i] for a in args), *extra) for i in range(N)])`` as float64.

    Vectorized: ``jit(vmap(fn))`` over chunks of ``chunk_size`` rows; the last chunk
    is padded so that every call has one shape (a single trace).
    """
    N = args[0].shape[0]
    if vectorize:
        chunk = min(_check_n(chunk_size, "chunk_size"), N)
        try:
            hash((fn, extra))
            batched = functools.partial(_vmapped, fn, extra)
        except TypeError:  # unhashable callable: compile for this call only
            batched = jax.jit(jax.vmap(lambda *row: fn(*row, *extra)))
        parts = []
        for start in range(0, N, chunk):
            stop = min(start + chunk, N)
            idx = np.concatenate(
                [np.arange(start, stop), np.full(chunk - (stop - start), stop - 1)]
            )
            rows = (a[idx] if isinstance(a, jax.Array) else jnp.asarray(a[idx]) for a in args)
            out = batched(*rows)
            parts.append(np.asarray(out, dtype=np.float64)[: stop - start])
        return np.concatenate(parts, axis=0)
    outs = [np.asarray(fn(*(a[i] for a in args), *extra), dtype=np.float64) for i in range(N)]
    shapes = {o.shape for o in outs}
    if len(shapes) != 1:
        raise ShapeError(f"{name}: returned differently shaped outputs {sorted(shapes)}")
    return np.stack(outs)


def sample_posteriors(
    key: Array,
    sample_fn: SampleFn,
    x: Any,
    num_posterior_samples: int,
    *,
    dim: int | None = None,
    vectorize: bool = False,
    chunk_size: int = 256,
) -> np.ndarray:
    """Draw posterior samples for each of many observations.

    Observation ``i`` uses ``jax.random.split(key, N)[i]``, so the vectorized and the
    looped paths draw the same samples for a JAX ``sample_fn``.

    Args:
        key: PRNG key.
        sample_fn: ``sample_fn(key, x (*X,), n) -> (n, D)`` posterior sampler for one
            observation.
        x: ``(N, *X)`` observations.
        num_posterior_samples: ``n``, samples per observation.
        dim: Expected ``D``; checked if given.
        vectorize: If true, ``sample_fn`` is a JAX function and is run as
            ``jit(vmap(...))`` over chunks of ``chunk_size`` observations; otherwise
            it is called once per observation (any Python sampler, e.g. torch).
        chunk_size: Observations per vectorized call.

    Returns:
        ``(N, n, D)`` float64 samples.

    Raises:
        ShapeError: ``sample_fn`` returned the wrong shape or NaN/inf.
    """
    n = _check_n(num_posterior_samples, "num_posterior_samples")
    x = np.asarray(x)
    N = x.shape[0]
    keys = jax.random.split(key, N)
    samples = _map_rows(sample_fn, (keys, x), "sample_fn", vectorize, chunk_size, extra=(n,))
    if (
        samples.ndim != 3
        or samples.shape[:2] != (N, n)
        or (dim is not None and samples.shape[2] != dim)
    ):
        want = f"({n}, {dim if dim is not None else 'D'})"
        raise ShapeError(
            f"sample_fn: expected {want} samples per observation, got "
            f"{samples.shape[1:] if samples.ndim == 3 else samples.shape}"
        )
    finite = np.isfinite(samples).all(axis=(1, 2))
    if not finite.all():
        raise ShapeError(
            f"sample_fn: returned NaN/inf samples for observation(s) "
            f"{np.flatnonzero(~finite)[:10].tolist()}"
        )
    return samples


# ------------------------------------------------------------------------------------
# SBC
# ------------------------------------------------------------------------------------


class SBCTest(NamedTuple):
    """Uniformity tests of SBC ranks, one entry per parameter dimension.

    Attributes:
        chi2_stat: ``(D,)`` chi-square statistics of the binned ranks.
        chi2_pvalue: ``(D,)`` chi-square p-values (``num_bins - 1`` degrees of freedom).
        ks_stat: ``(D,)`` Kolmogorov-Smirnov statistics of the mid-ranks vs U(0, 1).
        ks_pvalue: ``(D,)`` Kolmogorov-Smirnov p-values.
        num_bins: Number of rank bins of the chi-square test.
    """

    chi2_stat: np.ndarray
    chi2_pvalue: np.ndarray
    ks_stat: np.ndarray
    ks_pvalue: np.ndarray
    num_bins: int


def ranks_from_samples(posterior_samples: Any, theta: Any) -> np.ndarray:
    """SBC ranks ``r_id = #{j : θ_ijd < θ_id}``.

    Args:
        posterior_samples: ``(N, L, D)`` posterior samples per observation.
        theta: ``(N, D)`` true parameters.

    Returns:
        ``(N, D)`` int ranks in ``{0, ..., L}``.
    """
    theta = _matrix(theta, "theta")
    samples = np.asarray(posterior_samples, dtype=np.float64)
    if (
        samples.ndim != 3
        or samples.shape[0] != theta.shape[0]
        or samples.shape[2] != theta.shape[1]
    ):
        raise ShapeError(
            f"posterior_samples: expected shape ({theta.shape[0]}, L, {theta.shape[1]}), "
            f"got {samples.shape}"
        )
    return (samples < theta[:, None, :]).sum(axis=1).astype(np.int64)


def sbc_ranks(
    key: Array,
    sample_fn: SampleFn,
    theta: Any,
    x: Any,
    num_posterior_samples: int,
    *,
    vectorize: bool = False,
) -> np.ndarray:
    """Simulation-based calibration ranks (Talts et al. 2018).

    Args:
        key: PRNG key for the posterior samples.
        sample_fn: ``sample_fn(key, x (*X,), n) -> (n, D)``.
        theta: ``(N, D)`` parameters drawn from the prior.
        x: ``(N, *X)`` data simulated from ``theta``.
        num_posterior_samples: ``L``, posterior samples per observation.
        vectorize: Run a JAX ``sample_fn`` under ``jit(vmap)`` (see
            :func:`sample_posteriors`).

    Returns:
        ``(N, D)`` int ranks in ``{0, ..., L}``; test them with :func:`sbc_uniformity`.
    """
    theta, x = _theta_x(theta, x)
    samples = sample_posteriors(
        key, sample_fn, x, num_posterior_samples, dim=theta.shape[1], vectorize=vectorize
    )
    return ranks_from_samples(samples, theta)


def _default_bins(num_ranks: int, num_values: int) -> int:
    """About 10 expected counts per bin, between 2 and 20 bins, at most L + 1."""
    return int(max(2, min(20, num_ranks // 10, num_values)))


def sbc_uniformity(
    ranks: Any, num_posterior_samples: int, *, num_bins: int | None = None
) -> SBCTest:
    """Test SBC ranks for uniformity on ``{0, ..., L}``, per dimension.

    Chi-square: ranks are grouped into ``num_bins`` contiguous bins of rank values;
    the expected count of a bin is ``N * (values in bin) / (L + 1)``, exact also when
    ``L + 1`` is not a multiple of ``num_bins``. KS: mid-ranks ``(r + 0.5) / (L + 1)``
    against U(0, 1) (conservative by at most ``0.5 / (L + 1)`` in the statistic).

    Args:
        ranks: ``(N, D)`` ranks from :func:`sbc_ranks`.
        num_posterior_samples: ``L``.
        num_bins: Chi-square bins; default ``clip(N // 10, 2, 20)``, at most ``L + 1``.

    Returns:
        :class:`SBCTest` with ``(D,)`` statistics and p-values. Small p-values (say
        < 0.01 after correcting for ``D`` tests) flag a miscalibrated posterior.
    """
    L = _check_n(num_posterior_samples, "num_posterior_samples")
    r = _matrix(ranks, "ranks")
    if (r < 0).any() or (r > L).any() or (r != np.round(r)).any():
        raise ShapeError(f"ranks: expected integers in [0, {L}]")
    N, D = r.shape
    B = _default_bins(N, L + 1) if num_bins is None else _check_n(num_bins, "num_bins", 2)
    if B > L + 1:
        raise ShapeError(f"num_bins: {B} bins for only {L + 1} rank values")
    # Bin b holds the rank values [edges[b], edges[b + 1]).
    edges = np.floor(np.linspace(0, L + 1, B + 1)).astype(np.int64)
    expected = N * np.diff(edges) / (L + 1)
    bin_of = np.searchsorted(edges, r.astype(np.int64), side="right") - 1
    counts = np.stack([np.bincount(bin_of[:, k], minlength=B) for k in range(D)])
    chi2 = ((counts - expected) ** 2 / expected).sum(axis=1)
    chi2_p = stats.chi2.sf(chi2, df=B - 1)
    u = (r + 0.5) / (L + 1)
    ks = [stats.kstest(u[:, k], "uniform") for k in range(D)]
    return SBCTest(
        chi2_stat=chi2,
        chi2_pvalue=chi2_p,
        ks_stat=np.array([t.statistic for t in ks]),
        ks_pvalue=np.array([t.pvalue for t in ks]),
        num_bins=B,
    )


# ------------------------------------------------------------------------------------
# Expected coverage: HPD and TARP
# ------------------------------------------------------------------------------------


class CoverageResult(NamedTuple):
    """Nominal vs empirical coverage.

    Attributes:
        levels: ``(K,)`` nominal credibility levels in ``[0, 1]``.
        coverage: ``(K,)`` empirical coverage: fraction of simulations whose true
            parameter lies in the credible region of that level.
        credibility: ``(N,)`` per-simulation credibility level ``c_i`` (uniform on
            ``(0, 1)`` for a calibrated posterior).
        method: ``"hpd"`` or ``"tarp"``.
        max_abs_error: ``max_k |coverage_k - levels_k|``.
        atc: Area between the curve and the diagonal for levels >= 0.5 (Lemos et al.
            2023): > 0 under-confident (too wide), < 0 over-confident (too narrow).
        ks_pvalue: Kolmogorov-Smirnov p-value of ``credibility`` against U(0, 1).
    """

    levels: np.ndarray
    coverage: np.ndarray
    credibility: np.ndarray
    method: str
    max_abs_error: float
    atc: float
    ks_pvalue: float


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (``np.trapezoid`` needs numpy >= 2)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def coverage_curve(credibility: Any, *, levels: Any = None, method: str = "hpd") -> CoverageResult:
    """Empirical coverage ``P(c_i <= α)`` at nominal levels ``α``.

    Args:
        credibility: ``(N,)`` credibility levels from :func:`hpd_credibility` or
            :func:`tarp_credibility`.
        levels: ``(K,)`` nominal levels in ``[0, 1]``; default 101 points on ``[0, 1]``.
        method: Label stored in the result.

    Returns:
        :class:`CoverageResult`.
    """
    c = np.asarray(credibility, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.isfinite(c).all() or (c < 0).any() or (c > 1).any():
        raise ShapeError(f"credibility: expected a non-empty (N,) array in [0, 1], got {c.shape}")
    levels = np.linspace(0.0, 1.0, 101) if levels is None else np.asarray(levels, np.float64)
    if levels.ndim != 1 or levels.size < 2 or (levels < 0).any() or (levels > 1).any():
        raise ShapeError("levels: expected a 1-D array of at least 2 values in [0, 1]")
    levels = np.sort(levels)
    coverage = (c[None, :] <= levels[:, None]).mean(axis=1)
    upper = levels >= 0.5
    atc = _trapezoid(coverage[upper] - levels[upper], levels[upper]) if upper.sum() > 1 else 0.0
    return CoverageResult(
        levels=levels,
        coverage=coverage,
        credibility=c,
        method=method,
        max_abs_error=float(np.max(np.abs(coverage - levels))),
        atc=atc,
        ks_pvalue=float(stats.kstest(c, "uniform").pvalue),
    )


def hpd_credibility(
    log_prob_fn: LogProbFn,
    posterior_samples: Any,
    theta: Any,
    x: Any,
    *,
    vectorize: bool = False,
    chunk_size: int = 256,
) -> np.ndarray:
    """Credibility level of the smallest HPD region that contains each true parameter.

    ``c_i = (#{j : log q(θ_ij | x_i) > log q(θ_i | x_i)} + 0.5) / (L + 1)``. A true
    parameter outside the support (``log q = -inf``) gets ``c_i ≈ 1``.

    Args:
        log_prob_fn: ``log_prob_fn(theta (m, D), x (*X,)) -> (m,)``.
        posterior_samples: ``(N, L, D)`` samples of ``q(θ | x_i)``.
        theta: ``(N, D)`` true parameters.
        x: ``(N, *X)`` observations.
        vectorize: Run a JAX ``log_prob_fn`` as ``jit(vmap(...))`` over chunks of
            ``chunk_size`` observations instead of once per observation.
        chunk_size: Observations per vectorized call.

    Returns:
        ``(N,)`` credibility levels in ``(0, 1)``.
    """
    theta, x = _theta_x(theta, x)
    samples = np.asarray(posterior_samples, dtype=np.float64)
    N, D = theta.shape
    if samples.ndim != 3 or samples.shape[0] != N or samples.shape[2] != D:
        raise ShapeError(f"posterior_samples: expected shape ({N}, L, {D}), got {samples.shape}")
    L = samples.shape[1]
    points = np.concatenate([theta[:, None, :], samples], axis=1)
    lp = _map_rows(log_prob_fn, (points, x), "log_prob_fn", vectorize, chunk_size)
    if lp.shape != (N, L + 1):
        raise ShapeError(
            f"log_prob_fn: expected shape ({L + 1},) per observation, got {lp.shape[1:]}"
        )
    if np.isnan(lp).any():
        bad = np.flatnonzero(np.isnan(lp).any(axis=1))[:10].tolist()
        raise ShapeError(f"log_prob_fn: returned NaN for observation(s) {bad}")
    return (np.sum(lp[:, 1:] > lp[:, :1], axis=1) + 0.5) / (L + 1)


def tarp_credibility(
    key: Array,
    posterior_samples: Any,
    theta: Any,
    *,
    references: Any = None,
    normalize: bool = True,
) -> np.ndarray:
    """TARP credibility levels (Lemos et al. 2023, Algorithm 2).

    ``c_i = (#{j : |θ_ij - θ_r,i| < |θ_i - θ_r,i|} + 0.5) / (L + 1)`` with Euclidean
    distance to a random reference point ``θ_r,i`` per simulation.

    Args:
        key: PRNG key for the reference points (unused if ``references`` is given).
        posterior_samples: ``(N, L, D)`` samples of ``q(θ | x_i)``.
        theta: ``(N, D)`` true parameters.
        references: ``(N, D)`` reference points; default uniform in the box spanned
            by ``theta`` (per-dimension min and max).
        normalize: Min-max scale all points by the range of ``theta`` first, so that
            no parameter dominates the distance.

    Returns:
        ``(N,)`` credibility levels in ``(0, 1)``.
    """
    theta = _matrix(theta, "theta")
    N, D = theta.shape
    samples = np.asarray(posterior_samples, dtype=np.float64)
    if samples.ndim != 3 or samples.shape[0] != N or samples.shape[2] != D:
        raise ShapeError(f"posterior_samples: expected shape ({N}, L, {D}), got {samples.shape}")
    lo, hi = theta.min(axis=0), theta.max(axis=0)
    if references is None:
        u = np.asarray(jax.random.uniform(key, (N, D), dtype=jnp.float32), dtype=np.float64)
        references = lo + u * (hi - lo)
    references = _matrix(references, "references", dim=D)
    if references.shape[0] != N:
        raise ShapeError(f"references: expected shape ({N}, {D}), got {references.shape}")
    if normalize:
        scale = np.where(hi > lo, hi - lo, 1.0)
        samples, theta, references = (
            (samples - lo) / scale,
            (theta - lo) / scale,
            (references - lo) / scale,
        )
    d_samples = np.linalg.norm(samples - references[:, None, :], axis=-1)
    d_theta = np.linalg.norm(theta - references, axis=-1)
    L = samples.shape[1]
    return (np.sum(d_samples < d_theta[:, None], axis=1) + 0.5) / (L + 1)


def expected_coverage(
    key: Array,
    sample_fn: SampleFn,
    theta: Any,
    x: Any,
    num_posterior_samples: int,
    *,
    method: str = "hpd",
    log_prob_fn: LogProbFn | None = None,
    references: Any = None,
    levels: Any = None,
    vectorize: bool = False,
) -> CoverageResult:
    """Expected coverage of an amortized posterior over ``(θ_i, x_i)`` pairs.

    Args:
        key: PRNG key (posterior samples; TARP reference points).
        sample_fn: ``sample_fn(key, x (*X,), n) -> (n, D)``.
        theta: ``(N, D)`` parameters drawn from the prior.
        x: ``(N, *X)`` data simulated from ``theta``.
        num_posterior_samples: ``L``, posterior samples per observation.
        method: ``"hpd"`` (needs ``log_prob_fn``) or ``"tarp"``.
        log_prob_fn: ``log_prob_fn(theta (m, D), x (*X,)) -> (m,)``, for ``"hpd"``.
        references: ``(N, D)`` TARP reference points; default uniform in the box
            spanned by ``theta``.
        levels: ``(K,)`` nominal levels; default 101 points on ``[0, 1]``.
        vectorize: Run a JAX ``sample_fn`` (and ``log_prob_fn``) under ``jit(vmap)``.

    Returns:
        :class:`CoverageResult`; calibrated when ``coverage ≈ levels``.
    """
    if method not in ("hpd", "tarp"):
        raise ConfigError(f"method: expected 'hpd' or 'tarp', got {method!r}")
    if method == "hpd" and log_prob_fn is None:
        raise ConfigError("log_prob_fn: required for method='hpd' (or use method='tarp')")
    theta, x = _theta_x(theta, x)
    key_samples, key_refs = jax.random.split(key)
    samples = sample_posteriors(
        key_samples, sample_fn, x, num_posterior_samples, dim=theta.shape[1], vectorize=vectorize
    )
    if method == "hpd":
        assert log_prob_fn is not None
        c = hpd_credibility(log_prob_fn, samples, theta, x, vectorize=vectorize)
    else:
        c = tarp_credibility(key_refs, samples, theta, references=references)
    return coverage_curve(c, levels=levels, method=method)


# ------------------------------------------------------------------------------------
# Posterior predictive check
# ------------------------------------------------------------------------------------


class PredictiveCheck(NamedTuple):
    """Posterior predictive check of one observation.

    Attributes:
        x_sim: ``(n, X)`` data simulated from the posterior samples (NaN rows kept).
        fraction_finite: Fraction of simulations with every feature finite.
        mean: ``(X,)`` predictive mean over the finite simulations.
        std: ``(X,)`` predictive standard deviation over the finite simulations.
        z_scores: ``(X,)`` ``(x_o - mean) / std`` per feature.
        pvalues: ``(X,)`` two-sided predictive p-values per feature,
            ``2 min(P(x <= x_o), P(x >= x_o))`` (small: ``x_o`` in a tail).
        distance: RMS z-score of ``x_o``, ``|z| / sqrt(X)``.
        distance_quantile: Fraction of finite simulations whose own RMS z-score is
            below ``distance``; near 1 means ``x_o`` is atypical of the predictive.
    """

    x_sim: np.ndarray
    fraction_finite: float
    mean: np.ndarray
    std: np.ndarray
    z_scores: np.ndarray
    pvalues: np.ndarray
    distance: float
    distance_quantile: float


def posterior_predictive(
    key: Array, simulate_fn: SimulateFn, posterior_samples: Any, x_o: Any
) -> PredictiveCheck:
    """Simulate from posterior samples and compare with the observation.

    Args:
        key: PRNG key passed to ``simulate_fn``.
        simulate_fn: ``simulate_fn(key, theta (n, D)) -> (n, X)``; failed simulations
            are NaN rows.
        posterior_samples: ``(n, D)`` posterior samples given ``x_o``.
        x_o: ``(X,)`` observation.

    Returns:
        :class:`PredictiveCheck`. Features with zero predictive spread get z-score 0
        if ``x_o`` equals the constant and ``±inf`` otherwise; with fewer than two
        finite simulations the statistics are NaN.
    """
    samples = _matrix(posterior_samples, "posterior_samples")
    x_o = np.asarray(x_o, dtype=np.float64)
    if x_o.ndim != 1:
        raise ShapeError(f"x_o: expected a 1-D observation (X,), got shape {x_o.shape}")
    if not np.isfinite(x_o).all():
        raise ShapeError(
            f"x_o: contains NaN or inf at {np.flatnonzero(~np.isfinite(x_o)).tolist()}"
        )
    n, n_x = samples.shape[0], x_o.shape[0]
    x_sim = np.asarray(simulate_fn(key, jnp.asarray(samples, jnp.float32)), dtype=np.float64)
    if x_sim.shape != (n, n_x):
        raise ShapeError(f"simulate_fn: expected output shape ({n}, {n_x}), got {x_sim.shape}")
    ok = np.isfinite(x_sim).all(axis=1)
    good = x_sim[ok]
    if good.shape[0] < 2:
        nan = np.full(n_x, np.nan)
        return PredictiveCheck(x_sim, float(ok.mean()), nan, nan, nan, nan, np.nan, np.nan)
    mean, std = good.mean(axis=0), good.std(axis=0, ddof=1)

    def standardize(v: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (v - mean) / std
        return np.where((std == 0) & (v == mean), 0.0, z)

    z = standardize(x_o)
    below = (good <= x_o).mean(axis=0)
    above = (good >= x_o).mean(axis=0)
    pvalues = np.minimum(1.0, 2.0 * np.minimum(below, above))
    distance = float(np.sqrt(np.mean(z**2)))
    d_sim = np.sqrt(np.mean(standardize(good) ** 2, axis=1))
    return PredictiveCheck(
        x_sim=x_sim,
        fraction_finite=float(ok.mean()),
        mean=mean,
        std=std,
        z_scores=z,
        pvalues=pvalues,
        distance=distance,
        distance_quantile=float(np.mean(d_sim < distance)),
    )
