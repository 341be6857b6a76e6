"""The Prinz, Bucher & Marder (2004) pyloric circuit as a pure JAX time-stepper.

Three single-compartment cells (AB/PD, LP, PY), each with the eight currents of
Prinz et al. 2004 (Na m³h, CaT m³h, CaS m³h, A m³h, KCa m⁴, Kd m⁴, H m, leak), an
intracellular calcium pool and seven graded synapses, integrated exactly as the
reference simulator ``mackelab/pyloric`` (``simulator.pyx``, used by Gonçalves et al.
2020, eLife, and Deistler et al. 2022, PNAS) does:

- membrane voltage: ``C dV/dt = Σ g (E - V) + I_syn + I_noise``, exponential Euler,
  ``C = 0.6283e-3 µF``, conductances ``θ [mS/cm²] × 0.628e-3 cm²``;
- calcium: ``τ_Ca dCa/dt = -14961 (I_CaT + I_CaS) + 0.05 - Ca`` (τ_Ca = 200 ms),
  exponential Euler; ``E_Ca = RT/(2F) ln(3000 / Ca)``;
- gates: ``x ← x∞ + (x - x∞) exp(-dt q / τ_x)`` evaluated at the *previous* voltage;
- synapses: ``s∞ = 1 / (1 + exp((-35 - V_pre) / 5))``, ``τ_s = k₋ (1 - s∞)`` and a
  forward-Euler step ``s ← s + (s∞ - s) dt / τ_s`` (``s ← s∞`` when ``dt > τ_s``);
  ``g_syn = exp(θ_syn) mS``; AB and PD are one presynaptic cell;
- noise: a Gaussian current ``N(0, noise_std²)`` per step and cell (not scaled by dt),
  drawn per block of steps from a counter-based hash of the circuit's key
  (:func:`block_noise`);
- temperature ``T`` [K] scales conductances and rates by ``Q10^((T - 283) / 10)`` with
  the reference's default Q10 values (all factors are 1 at 283 K).

The state starts at ``V = -50 mV``, ``Ca = 0.05 µM``, all gates and synapses at 0.
Everything here handles one circuit, or circuits along *trailing* batch axes (the
layout XLA vectorises on CPU; :mod:`simulators.pyloric.simulator` maps ``vmap`` onto it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BLOCK",
    "CELLS",
    "CONDUCTANCES",
    "DT",
    "SYNAPSES",
    "T_REF",
    "CircuitParams",
    "CircuitState",
    "block_noise",
    "circuit_params",
    "initial_state",
    "record_block",
    "run_steps",
    "step",
]

DT = 0.025  # ms, integration step of the reference
BLOCK = 40  # steps per scan block (1 ms): noise is drawn and voltages are filtered per block
T_REF = 283.0  # K, temperature at which all Q10 factors are 1

CELLS = ("AB/PD", "LP", "PY")
CONDUCTANCES = ("Na", "CaT", "CaS", "A", "KCa", "Kd", "H", "Leak")
SYNAPSES = ("AB-LP", "PD-LP", "AB-PY", "PD-PY", "LP-PD", "LP-PY", "PY-LP")

C_M = 0.6283e-3  # µF
AREA = 0.628e-3  # cm²: mS/cm² × AREA = mS
E_NA, E_K, E_H, E_LEAK = 50.0, -80.0, -20.0, -50.0  # mV
CA_EXT, CA_REST, CA_TAU, CA_F = 3000.0, 0.05, 200.0, 14961.0
R_GAS, FARADAY = 8.31451e3, 96485.3415  # mJ/(mol K), C/mol

# synapse k: post-synaptic cell, pre-synaptic cell, reversal [mV], k₋ [ms]
SYN_POST = (1, 1, 2, 2, 0, 2, 1)
SYN_PRE = (0, 0, 0, 0, 1, 1, 2)
SYN_E = (-70.0, -80.0, -70.0, -80.0, -70.0, -70.0, -70.0)
SYN_KMINUS = (40.0, 100.0, 40.0, 100.0, 40.0, 40.0, 40.0)

# Reference default Q10s (pyloric.interface.simulate): gbar of the 8 membrane currents,
# gbar of glutamatergic/cholinergic synapses, τ of the 7 activation gates (Na, CaT, CaS,
# A, KCa, Kd, H), of the 4 inactivation gates, of the Ca buffer, and synaptic τ.
Q10_GBAR_MEM = (1.5,) * 8
Q10_GBAR_SYN = (1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5)
Q10_TAU_M = (2.4, 2.4, 2.0, 2.4, 1.6, 2.4, 2.4)
Q10_TAU_H = (2.8, 2.8, 2.8, 2.8)
Q10_TAU_CA = 2.0
Q10_TAU_SYN = (1.7,) * 7


class CircuitParams(NamedTuple):
    """Per-circuit constants, all in simulator units (mS, mV, ms)."""

    g: jax.Array  # (8, 3, *batch) membrane conductances [mS] (CONDUCTANCES × CELLS)
    g_syn: jax.Array  # (7, *batch) synaptic conductances [mS]
    rate_m: jax.Array  # (7, 1, *batch) Q10 rate factors of the activation gates
    rate_h: jax.Array  # (4, 1, *batch) Q10 rate factors of the inactivation gates
    rate_syn: jax.Array  # (7, *batch) Q10 rate factors of the synapses
    ca_decay: jax.Array  # (*batch) exp(-dt q_Ca / τ_Ca)
    rt_zf: jax.Array  # (*batch) RT / (2F) [mV]


class CircuitState(NamedTuple):
    """State of one circuit (or of circuits along trailing ``*batch`` axes)."""

    v: jax.Array  # (3, *batch) membrane voltages [mV]
    ca: jax.Array  # (3, *batch) intracellular calcium [µM]
    m: jax.Array  # (7, 3, *batch) activation gates Na, CaT, CaS, A, KCa, Kd, H
    h: jax.Array  # (4, 3, *batch) inactivation gates Na, CaT, CaS, A
    s: jax.Array  # (7, *batch) synaptic gates (SYNAPSES order)


def _lead(values, ndim: int, dtype) -> jax.Array:
    """Constants ``(k,)`` shaped ``(k, 1, …, 1)`` to broadcast against ``(k, *batch)``."""
    arr = jnp.asarray(values, dtype)
    return arr.reshape(arr.shape + (1,) * ndim)


def circuit_params(theta: jax.Array, temperature: jax.Array | float = T_REF,
                   dtype=jnp.float32) -> CircuitParams:
    """Circuit constants from ``theta (31, *batch)`` (see :data:`CONDUCTANCES`, :data:`SYNAPSES`).

    Every array of this module carries optional *trailing* batch axes (``*batch``): the
    cell/gate axes lead so that batched arrays are contiguous along circuits, which is
    what lets XLA vectorise the step on CPU.

    Args:
        theta: ``(31, *batch)``: 3 × 8 membrane conductances [mS/cm²] (AB/PD, LP, PY)
            followed by the 7 synaptic conductances as natural logs of mS.
        temperature: ``()`` or ``(*batch)`` in Kelvin.
        dtype: floating dtype of the simulation.
    """
    theta = jnp.asarray(theta, dtype)
    batch = theta.shape[1:]
    nb = len(batch)
    temperature = jnp.broadcast_to(jnp.asarray(temperature, dtype), batch)
    dtemp = (temperature - T_REF) / 10.0

    def q10(values):
        return _lead(values, nb, dtype) ** dtemp

    g = jnp.swapaxes(theta[:24].reshape((3, 8, *batch)), 0, 1) * AREA
    g = g * q10(Q10_GBAR_MEM)[:, None]
    return CircuitParams(
        g=g,
        g_syn=jnp.exp(theta[24:31]) * q10(Q10_GBAR_SYN),
        rate_m=q10(Q10_TAU_M)[:, None],
        rate_h=q10(Q10_TAU_H)[:, None],
        rate_syn=q10(Q10_TAU_SYN),
        ca_decay=jnp.exp(-DT * jnp.asarray(Q10_TAU_CA, dtype) ** dtemp / CA_TAU),
        rt_zf=R_GAS * temperature / (2.0 * FARADAY),
    )


def initial_state(dtype=jnp.float32, batch: tuple[int, ...] = ()) -> CircuitState:
    """The reference's initial state: V = E_leak, Ca = 0.05, gates and synapses 0."""
    return CircuitState(
        v=jnp.full((3, *batch), E_LEAK, dtype),
        ca=jnp.full((3, *batch), CA_REST, dtype),
        m=jnp.zeros((7, 3, *batch), dtype),
        h=jnp.zeros((4, 3, *batch), dtype),
        s=jnp.zeros((7, *batch), dtype),
    )


def _sig(v, a, b):
    """The Prinz Boltzmann form ``1 / (1 + exp((V + a) / b))``."""
    return 1.0 / (1.0 + jnp.exp((v + a) / b))


def _gate_kinetics(v: jax.Array, ca: jax.Array):
    """Steady states and time constants [ms] of all gates at voltage ``v (3,)``.

    Returns ``m_inf, m_tau (7, 3)`` and ``h_inf, h_tau (4, 3)`` (Prinz et al. 2004, Table 1).
    """
    m_inf = jnp.stack([
        _sig(v, 25.5, -5.29),
        _sig(v, 27.1, -7.2),
        _sig(v, 33.0, -8.1),
        _sig(v, 27.2, -8.7),
        (ca / (ca + 3.0)) * _sig(v, 28.3, -12.6),
        _sig(v, 12.3, -11.8),
        _sig(v, 75.0, 5.5),
    ])
    m_tau = jnp.stack([
        2.64 - 2.52 * _sig(v, 120.0, -25.0),
        43.4 - 42.6 * _sig(v, 68.1, -20.5),
        2.8 + 14.0 / (jnp.exp((v + 27.0) / 10.0) + jnp.exp((v + 70.0) / -13.0)),
        23.2 - 20.8 * _sig(v, 32.9, -15.2),
        180.6 - 150.2 * _sig(v, 46.0, -22.7),
        14.4 - 12.8 * _sig(v, 28.3, -19.2),
        2.0 / (jnp.exp(-14.59 - 0.086 * v) + jnp.exp(-1.87 + 0.0701 * v)),
    ])
    h_inf = jnp.stack([
        _sig(v, 48.9, 5.18),
        _sig(v, 32.1, 5.5),
        _sig(v, 60.0, 6.2),
        _sig(v, 56.9, 4.9),
    ])
    h_tau = jnp.stack([
        (1.34 / (1.0 + jnp.exp((v + 62.9) / -10.0)))
        * (1.5 + 1.0 / (1.0 + jnp.exp((v + 34.9) / 3.6))),
        210.0 - 179.6 * _sig(v, 55.0, -16.9),
        120.0 + 300.0 / (jnp.exp((v + 55.0) / 9.0) + jnp.exp((v + 65.0) / -16.0)),
        77.2 - 58.4 * _sig(v, 38.9, -26.5),
    ])
    return m_inf, m_tau, h_inf, h_tau


def step(p: CircuitParams, x: CircuitState, i_ext: jax.Array) -> CircuitState:
    """One reference time step of ``DT`` ms with external current ``i_ext (3, *batch)``."""
    v, ca, m, h, s = x
    # synaptic conductance and current into each post-synaptic cell (reference order)
    gs = p.g_syn * s
    g_syn_post = jnp.stack([gs[4], gs[0] + gs[1] + gs[6], gs[2] + gs[3] + gs[5]])
    nb = v.ndim - 1
    ge = gs * _lead(SYN_E, nb, v.dtype)
    i_syn_post = jnp.stack([ge[4], ge[0] + ge[1] + ge[6], ge[2] + ge[3] + ge[5]])

    m2 = m * m
    c_na = p.g[0] * (m2[0] * m[0]) * h[0]
    c_cat = p.g[1] * (m2[1] * m[1]) * h[1]
    c_cas = p.g[2] * (m2[2] * m[2]) * h[2]
    c_a = p.g[3] * (m2[3] * m[3]) * h[3]
    c_kca = p.g[4] * (m2[4] * m2[4])
    c_kd = p.g[5] * (m2[5] * m2[5])
    c_h = p.g[6] * m[6]
    c_leak = p.g[7]

    e_ca = p.rt_zf * jnp.log(CA_EXT / ca)
    i_ca = (c_cat + c_cas) * (v - e_ca)
    ca_inf = CA_REST - CA_F * i_ca
    ca_new = ca_inf + (ca - ca_inf) * p.ca_decay

    g_tot = g_syn_post + c_na + c_cat + c_cas + c_a + c_kca + c_kd + c_h + c_leak
    i_tot = (i_syn_post + c_na * E_NA + c_cat * e_ca + c_cas * e_ca + c_a * E_K + c_kca * E_K
             + c_kd * E_K + c_h * E_H + c_leak * E_LEAK + i_ext)
    zero = g_tot == 0
    g_safe = jnp.where(zero, 1.0, g_tot)
    v_inf = i_tot / g_safe
    v_new = jnp.where(zero, v + DT * i_tot / C_M,
                      v_inf + (v - v_inf) * jnp.exp(-DT * g_safe / C_M))

    m_inf, m_tau, h_inf, h_tau = _gate_kinetics(v, ca)
    m_new = m_inf + (m - m_inf) * jnp.exp(-DT * p.rate_m / m_tau)
    h_new = h_inf + (h - h_inf) * jnp.exp(-DT * p.rate_h / h_tau)

    s_inf_cell = 1.0 / (1.0 + jnp.exp((-35.0 - v) / 5.0))
    s_inf = s_inf_cell[jnp.asarray(SYN_PRE)]
    s_tau = _lead(SYN_KMINUS, nb, v.dtype) * (1.0 - s_inf) / p.rate_syn
    s_tau_safe = jnp.where(s_tau > 0, s_tau, 1.0)
    s_new = jnp.where(DT > s_tau, s_inf, s + (s_inf - s) * DT / s_tau_safe)
    return CircuitState(v_new, ca_new, m_new, h_new, s_new)


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def block_noise(key: jax.Array, index, n: int, noise_std: float, dtype) -> jax.Array:
    """Noise currents ``(n, 3, *batch)`` for block ``index``; zeros when ``noise_std == 0``.

    ``key`` is one typed key or keys ``(*batch)``, one per circuit. Circuit ``j`` gets
    ``noise_std · √2 erfinv(2u - 1)`` with ``u`` from the counter-based hash
    ``fmix32(fmix32(c ^ k₀) + k₁)`` of its key words ``(k₀, k₁)`` and the counter
    ``c = 3 n · index + i``: it depends on that key only, and it is computed elementwise
    in the step's ``(n, 3, *batch)`` layout — about 6× cheaper on CPU than
    ``jax.random.normal`` under ``vmap`` (the noise is a small current, not cryptography).
    """
    batch = key.shape
    if noise_std == 0:
        return jnp.zeros((n, 3, *batch), dtype)
    kd = jax.random.key_data(key)  # (*batch, 2)
    k0, k1 = kd[..., 0], kd[..., 1]
    ctr = (jnp.arange(3 * n, dtype=jnp.uint32).reshape((n, 3) + (1,) * len(batch))
           + jnp.asarray(index).astype(jnp.uint32) * np.uint32(3 * n))
    bits = _fmix32(_fmix32(ctr ^ k0) + k1)
    u = ((bits >> np.uint32(8)).astype(dtype) + 0.5) * (1.0 / 16777216.0)
    return (noise_std * np.sqrt(2.0)) * jax.lax.erf_inv(2.0 * u - 1.0)


def run_steps(p: CircuitParams, x: CircuitState, key: jax.Array, n_steps: int, *,
              noise_std: float, unroll: int = 1) -> CircuitState:
    """Advance ``n_steps`` steps without recording (the burn-in).

    Noise for block ``b`` of :data:`BLOCK` steps is drawn from ``fold_in(key, b)``.
    """
    dtype = x.v.dtype
    n_blocks, rest = divmod(int(n_steps), BLOCK)

    def inner(x, i_ext):
        return step(p, x, i_ext), None

    def block(x, b):
        x, _ = jax.lax.scan(inner, x, block_noise(key, b, BLOCK, noise_std, dtype),
                            unroll=unroll)
        return x, None

    if n_blocks:
        x, _ = jax.lax.scan(block, x, jnp.arange(n_blocks))
    if rest:
        x, _ = jax.lax.scan(inner, x, block_noise(key, n_blocks, rest, noise_std, dtype))
    return x


def record_block(p: CircuitParams, x: CircuitState, key: jax.Array, b, *, noise_std: float,
                 unroll: int = 1) -> tuple[CircuitState, jax.Array]:
    """Run one block of :data:`BLOCK` steps; returns the new state and the voltages
    *before* each step, ``(BLOCK, 3, *batch)`` (so block ``b`` holds recording samples
    ``BLOCK b … BLOCK b + BLOCK - 1``)."""

    def inner(x, i_ext):
        return step(p, x, i_ext), x.v

    noise = block_noise(key, b, BLOCK, noise_std, x.v.dtype)
    return jax.lax.scan(inner, x, noise, unroll=unroll)


def steps_for(ms: float) -> int:
    """Number of :data:`DT` steps in ``ms`` milliseconds (must be a whole number)."""
    n = round(ms / DT)
    if abs(n * DT - ms) > 1e-6:
        raise ValueError(f"duration {ms} ms is not a multiple of dt = {DT} ms")
    return n


def gate_kinetics_numpy(v: np.ndarray) -> tuple[np.ndarray, ...]:
    """Gate kinetics on a voltage grid (numpy, for plots/docs); Ca fixed at 0.05 µM."""
    v = jnp.asarray(v, jnp.float32)
    out = _gate_kinetics(v, jnp.full_like(v, CA_REST))
    return tuple(np.asarray(o) for o in out)
