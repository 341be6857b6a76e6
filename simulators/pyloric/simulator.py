"""Pyloric circuit → summary features in one compiled ``lax.scan``, no stored traces.

For one circuit (``jax.vmap`` over :func:`simulate_one` runs the same code with the
circuits on a trailing axis, through a ``custom_vmap`` rule):

1. burn-in: ``t_burn / dt`` reference steps, in blocks of :data:`~.model.BLOCK` steps
   (noise for block ``b`` from the burn-in key and ``b``, :func:`.model.block_noise`);
2. recording: blocks of :data:`~.model.BLOCK` steps. Each block's raw voltages and the
   last 20 of the previous block go through the 21-tap Savitzky–Golay FIR, giving 40
   smoothed samples lagging the simulation by 10 samples; the online detector consumes
   them a block at a time (:func:`.features.detector_block`, equivalent to the
   sample-by-sample :func:`.features.detector_consume`). The first 10 and last 10
   smoothed samples use scipy's ``interp`` edge fit, as the reference does;
3. the detector's fixed-size burst buffer → features (:func:`.features.features_from_bursts`).

:func:`simulate_traces` runs the same steps with the same noise and returns (optionally
down-sampled) voltage traces for plotting or for the numpy feature path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from simulators.pyloric import model
from simulators.pyloric.features import (
    Bursts,
    buffer_init,
    detector_block,
    detector_consume,
    detector_finish,
    detector_flush,
    detector_init,
    edge_matrices,
    feature_indices,
    features_from_bursts,
    max_bursts,
    step_constants,
)
from simulators.pyloric.model import BLOCK, DT

__all__ = [
    "bursts_online",
    "check_durations",
    "simulate_bursts",
    "simulate_features",
    "simulate_one",
    "simulate_traces",
]

_C = step_constants(DT)
_FIR, _EDGE_START, _EDGE_END = edge_matrices(_C.window)
_HALF = _C.window // 2  # 10


@functools.cache
def check_durations(t_max: float, t_burn: float) -> tuple[int, int]:
    """Steps ``(n_burn, n_rec)`` for durations in ms; raises ``ValueError`` if invalid."""
    if not (t_max > t_burn >= 0):
        raise ValueError(f"t_max, t_burn: expected t_max > t_burn >= 0, got {t_max}, {t_burn}")
    n_burn = model.steps_for(t_burn)
    n_rec = model.steps_for(t_max - t_burn)
    if n_rec % BLOCK or n_rec < 2 * BLOCK:
        raise ValueError(f"t_max - t_burn: expected a whole number of ms >= 2 ms "
                         f"(blocks of {BLOCK} steps), got {t_max - t_burn} ms")
    return n_burn, n_rec


def _check_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ValueError(f"dtype: expected float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype: float64 needs 64-bit JAX (`with jax.enable_x64(True):` "
                         "or JAX_ENABLE_X64=1)")
    return dtype


def _smooth_block(prev: jax.Array, raw: jax.Array) -> jax.Array:
    """Interior FIR outputs for a block: ``prev, raw (40, 3, *batch)`` → ``(40, 3, *batch)``
    smoothed samples with indices ``BLOCK b - 10 … BLOCK b + 29``."""
    xx = jnp.concatenate([prev[BLOCK - 2 * _HALF:], raw])  # (60, 3, *batch)
    coeffs = [float(c) for c in _FIR]
    out = coeffs[0] * xx[0:BLOCK]
    for k in range(1, _C.window):
        out = out + coeffs[k] * xx[k:k + BLOCK]
    return out


def _edge(mat: np.ndarray, raw: jax.Array) -> jax.Array:
    """Edge fit: ``mat (10, 21)`` applied to ``raw (21, 3, *batch)`` → ``(10, 3, *batch)``."""
    return jnp.tensordot(jnp.asarray(mat, raw.dtype), raw, axes=(1, 0),
                         precision=jax.lax.Precision.HIGHEST)


def _as_keys(key: jax.Array) -> jax.Array:
    """Typed keys from typed keys or raw ``uint32 (..., 2)`` key data."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def _split2(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    if keys.ndim == 0:
        k = jax.random.split(keys)
        return k[0], k[1]
    k = jax.vmap(jax.random.split)(keys.reshape(-1))
    return k[:, 0].reshape(keys.shape), k[:, 1].reshape(keys.shape)


def simulate_bursts(key: jax.Array, theta: jax.Array, temperature=model.T_REF, *,
                    noise_std: float = 0.001, t_max: float = 11000.0, t_burn: float = 1000.0,
                    dtype=jnp.float32, unroll: int = 1) -> Bursts:
    """Simulate circuits and return their detected bursts.

    Batch axes *trail* (see :func:`.model.circuit_params`): ``key (*batch)`` (typed
    keys or raw ``(*batch, 2)`` key data), ``theta (31, *batch)``, ``temperature`` ``()``
    or ``(*batch)``. The :class:`~.features.Bursts` fields carry the same trailing axes.
    """
    n_burn, n_rec = check_durations(float(t_max), float(t_burn))
    n_blocks = n_rec // BLOCK
    keys = _as_keys(key)
    theta = jnp.asarray(theta, dtype)
    batch = theta.shape[1:]
    if keys.shape != batch:
        raise ValueError(f"key: expected batch shape {batch}, got {keys.shape}")
    p = model.circuit_params(theta, temperature, dtype)
    k_burn, k_rec = _split2(keys)
    x = model.run_steps(p, model.initial_state(dtype, batch), k_burn, n_burn,
                        noise_std=noise_std, unroll=unroll)

    def next_block(x, b):
        return model.record_block(p, x, k_rec, b, noise_std=noise_std, unroll=unroll)

    return _detect(next_block, x, n_blocks)


def _detect(next_block, carry, n_blocks: int, sequential: bool = False) -> Bursts:
    """Run the online detector over ``n_blocks`` blocks of raw voltages.

    ``next_block(carry, b) -> (carry, raw (BLOCK, 3, *batch))`` produces block ``b``.
    ``sequential`` feeds the detector one sample at a time (:func:`detector_consume`,
    the plain definition) instead of one block at a time (:func:`detector_block`).
    """

    def consume_all(det, f, s0):
        if sequential:
            def body(det, fs):
                return detector_consume(det, fs[0], fs[1], _C), None
            s = s0 + jnp.arange(f.shape[0], dtype=jnp.int32)
            return jax.lax.scan(body, det, (f, s))[0]
        return detector_block(det, f, s0, _C)

    # first block: smoothed samples 0 … 29 (0 … 9 from the start-edge fit)
    carry, raw0 = next_block(carry, jnp.int32(0))
    batch = raw0.shape[2:]
    f0 = jnp.concatenate([_edge(_EDGE_START, raw0[:_C.window]),
                          _smooth_block(jnp.zeros_like(raw0), raw0)[2 * _HALF:]])
    det = detector_init(f0[0], f0[1])
    det = consume_all(det, f0[2:], jnp.int32(0))
    det, buf = detector_flush(det, buffer_init(max_bursts(n_blocks * BLOCK, _C), batch))

    def block(state, b):
        carry, prev, det, buf = state
        carry, raw = next_block(carry, b)
        f = _smooth_block(prev, raw)
        det = consume_all(det, f, (BLOCK * b - _HALF - 2).astype(jnp.int32))
        det, buf = detector_flush(det, buf)
        return (carry, raw, det, buf), None

    (carry, prev, det, buf), _ = jax.lax.scan(block, (carry, raw0, det, buf),
                                              jnp.arange(1, n_blocks, dtype=jnp.int32))
    # last 10 smoothed samples from the end-edge fit
    f_end = _edge(_EDGE_END, prev[BLOCK - _C.window:])
    det = consume_all(det, f_end, jnp.int32(n_blocks * BLOCK - _HALF - 2))
    return detector_finish(det, buf, _C)


@functools.partial(jax.jit, static_argnames="sequential")
def bursts_online(v: jax.Array, sequential: bool = False) -> Bursts:
    """The online detector run over a given trace ``v (3, N)`` sampled at dt = 0.025 ms
    (``N`` a multiple of 40); for validating it against :func:`.features.bursts_from_trace`."""
    n_blocks = v.shape[1] // BLOCK
    blocks = v[:, :n_blocks * BLOCK].reshape(3, n_blocks, BLOCK).transpose(1, 2, 0)

    def next_block(carry, b):
        return carry, blocks[b]

    return _detect(next_block, None, n_blocks, sequential)


def _features_trailing(key, theta, temperature, cfg) -> jax.Array:
    """``key (*b)``, ``theta (31, *b)``, ``temperature (*b)`` → features ``(*b, F)``."""
    noise_std, features, t_max, t_burn, dtype, unroll = cfg
    idx = np.asarray(feature_indices(features))
    b = simulate_bursts(key, theta, temperature, noise_std=noise_std, t_max=t_max,
                        t_burn=t_burn, dtype=dtype, unroll=unroll)
    if theta.ndim == 1:
        return features_from_bursts(b, _C, dtype)[idx]
    b = jax.tree.map(lambda a: jnp.moveaxis(a, -1, 0), b)
    return jax.vmap(lambda bb: features_from_bursts(bb, _C, dtype)[idx])(b)


@functools.lru_cache(maxsize=64)
def _one_fn(cfg):
    """The single-circuit function for a static config, with a batched ``vmap`` rule.

    ``vmap`` would put the circuit axis first (and the small cell/gate axes last, which
    XLA cannot vectorise); the custom rule runs :func:`simulate_bursts` with the circuit
    axis last instead — the same numbers, several times faster on CPU.
    """

    @jax.custom_batching.custom_vmap
    def one(key_data, theta, temperature):
        return _features_trailing(key_data, theta, temperature, cfg)

    @one.def_vmap
    def _rule(axis_size, in_batched, key_data, theta, temperature):
        kb, tb, _ = in_batched
        if not kb:
            key_data = jnp.broadcast_to(key_data, (axis_size, *key_data.shape))
        theta = theta.T if tb else jnp.broadcast_to(theta[:, None], (31, axis_size))
        temperature = jnp.broadcast_to(temperature, (axis_size,))
        return _features_trailing(key_data, theta, temperature, cfg), True

    return one


def simulate_one(key: jax.Array, theta: jax.Array, temperature=model.T_REF, *,
                 noise_std: float = 0.001, features: str = "18", t_max: float = 11000.0,
                 t_burn: float = 1000.0, dtype=jnp.float32, unroll: int = 1) -> jax.Array:
    """Features of one circuit: ``theta (31,)`` → ``x (F,)`` (NaN where undefined).

    Pure and single-example; ``jax.vmap`` over it runs the fast batched path.
    """
    dtype = jnp.dtype(dtype)
    feature_indices(features)
    cfg = (float(noise_std), str(features), float(t_max), float(t_burn), dtype, int(unroll))
    key = _as_keys(key)
    return _one_fn(cfg)(jax.random.key_data(key), jnp.asarray(theta, dtype),
                        jnp.asarray(temperature, dtype))


@functools.lru_cache(maxsize=32)
def _batched(noise_std, features, t_max, t_burn, dtype, unroll):
    def one(key, theta, temperature):
        return simulate_one(key, theta, temperature, noise_std=noise_std, features=features,
                            t_max=t_max, t_burn=t_burn, dtype=dtype, unroll=unroll)
    return jax.jit(jax.vmap(one))


def simulate_features(key: jax.Array, theta, *, noise_std: float = 0.001,
                      features: str = "18", temperature=None, dtype=jnp.float32,
                      t_max: float = 11000.0, t_burn: float = 1000.0,
                      batch_size: int | None = None, unroll: int = 1) -> np.ndarray:
    """Batched features: ``theta (n, 31)`` → ``(n, F)`` numpy array in ``dtype``.

    Args:
        key: a ``jax.random`` key; row ``i`` uses ``fold_in(key, i)`` (as the engine does).
        theta: ``(n, 31)`` or ``(31,)`` circuit parameters.
        noise_std: std of the per-step noise current (0 → deterministic).
        features: "15", "18" or "full" (see :data:`.features.FEATURE_SETS`).
        temperature: ``()`` or ``(n,)`` Kelvin; ``None`` → 283 K.
        dtype: float32 or float64 (float64 needs 64-bit JAX).
        t_max, t_burn: simulated and discarded duration [ms].
        batch_size: rows per compiled call (``None``: all at once).
        unroll: scan unroll factor.
    """
    from sbi_engine.errors import ConfigError, ShapeError
    from sbi_engine.simulator import row_keys

    dtype = _check_dtype(dtype)
    feature_indices(features)
    arr = np.asarray(theta)
    if arr.dtype.kind not in "iuf":
        raise ShapeError(f"theta: expected real numbers, got dtype {arr.dtype}")
    theta = arr.astype(np.float64)
    if theta.ndim == 1:
        theta = theta[None]
    if theta.ndim != 2 or theta.shape[1] != 31:
        raise ShapeError(f"theta: expected shape (n, 31), got {arr.shape}")
    if theta.shape[0] == 0:
        raise ShapeError("theta: expected at least one row, got shape (0, 31)")
    bad = np.argwhere(~np.isfinite(theta))
    if bad.size:
        raise ShapeError(f"theta: row {bad[0][0]}, column {bad[0][1]} is "
                         f"{theta[tuple(bad[0])]}; expected finite values")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    n = theta.shape[0]
    temp = np.broadcast_to(np.asarray(model.T_REF if temperature is None else temperature,
                                      np.float64), (n,))
    fn = _batched(float(noise_std), str(features), float(t_max), float(t_burn), dtype,
                  int(unroll))
    keys = row_keys(key, 0, n)
    step = n if batch_size is None else int(batch_size)
    out = []
    for a in range(0, n, step):
        out.append(np.asarray(fn(keys[a:a + step], jnp.asarray(theta[a:a + step], dtype),
                                 jnp.asarray(temp[a:a + step], dtype))))
    return np.concatenate(out)


def simulate_traces(key: jax.Array, theta, temperature=model.T_REF, *,
                    noise_std: float = 0.001, t_max: float = 11000.0, t_burn: float = 1000.0,
                    downsample: int = 40, dtype=jnp.float32, unroll: int = 1) -> np.ndarray:
    """Voltage traces of one circuit after the burn-in, ``(3, n_rec // downsample)``.

    Uses the same steps and noise as :func:`simulate_one` for the same key, so
    ``features_from_trace(simulate_traces(..., downsample=1), dt)`` reproduces the online
    features. ``downsample`` must divide :data:`~.model.BLOCK` (40 → 1 ms resolution).
    """
    dtype = _check_dtype(dtype)
    downsample = int(downsample)
    if downsample < 1 or BLOCK % downsample:
        raise ValueError(f"downsample: expected a divisor of {BLOCK}, got {downsample}")
    n_burn, n_rec = check_durations(float(t_max), float(t_burn))
    v = _traces(_as_keys(key), jnp.asarray(theta, dtype), jnp.asarray(temperature, dtype),
                float(noise_std), n_burn, n_rec, downsample, unroll)
    return np.asarray(v)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _traces(key, theta, temperature, noise_std, n_burn, n_rec, downsample, unroll):
    dtype = theta.dtype
    p = model.circuit_params(theta, temperature, dtype)
    k_burn, k_rec = jax.random.split(key)
    x = model.run_steps(p, model.initial_state(dtype), k_burn, n_burn, noise_std=noise_std,
                        unroll=unroll)

    def block(x, b):
        x, raw = model.record_block(p, x, k_rec, b, noise_std=noise_std, unroll=unroll)
        return x, raw[::downsample]

    _, v = jax.lax.scan(block, x, jnp.arange(n_rec // BLOCK, dtype=jnp.int32))
    return v.reshape(-1, 3).T
