"""A synthetic HiggsML-like H→ττ problem with the FAIR-Universe nuisance set.

In the spirit of the HiggsML challenge (Adam-Bourdarios et al. 2014) and the
FAIR-Universe HiggsML Uncertainty Challenge (2024): events with one hadronic tau,
one lepton, one jet and missing transverse energy (MET); a signal ``htautau`` and the
backgrounds ``ztautau``, ``ttbar`` and ``diboson``. Everything is generated here from
a simple documented model; nothing is downloaded, and the numbers are not meant to
reproduce the challenge's datasets.

Generative model of one event of process ``p`` (parameters in :data:`PROCESSES`):

1. A di-tau system of mass ``M`` — resonant ``M ~ N(m₀, σ_m)`` (H: 125, Z: 91.2 GeV)
   or, for ``ttbar``/``diboson``, a broad continuum ``M = m₀ + Gamma(k_m, θ_m)``
   (``M ≥ 20`` GeV) —
   with transverse momentum ``pT ~ Gamma(k_pt, θ_pt)``, azimuth ``φ ~ U(−π, π)`` and
   rapidity ``y ~ N(0, σ_y)``. (``Gamma(k, θ)`` has integer shape ``k``: a sum of ``k``
   exponentials, cheap to sample and to compile.)
2. Two massless taus back to back in the system's rest frame (isotropic direction),
   boosted to the lab frame.
3. Each tau decays collinearly: the visible product carries a fraction
   ``z ~ Kumaraswamy(a, b)`` (a Beta-like law on [0, 1] with a closed-form inverse
   CDF; floored at 0.02) of its momentum (hadronic tau harder than leptonic), the rest
   goes to neutrinos. MET is the neutrinos' transverse momentum plus, for ``ttbar`` and
   ``diboson``, an extra invisible component ``Gamma(k, θ)`` with random direction.
4. A jet recoils against the system: ``pT(jet) = −pT(system) + extra`` (extra
   ``Gamma(k, θ)`` with random direction).

Nuisances ``ν`` (nominal, Gaussian constraint σ, range) — the FAIR-Universe set:

- ``tes`` (1, 0.01, [0.9, 1.1]): tau energy scale, multiplies the visible tau
  momentum; MET absorbs the opposite change, ``MET⃗ −= (tes − 1)·pT⃗(τ)``.
- ``jes`` (1, 0.01, [0.9, 1.1]): jet energy scale, likewise for the jet.
- ``soft_met`` (0, 1 half-normal, [0, 5] GeV): a soft MET term, ``MET⃗ += soft_met·ε⃗``,
  ``ε⃗ ~ N(0, I₂)``.
- ``ttbar_scale`` (1, 0.02, [0.8, 1.2]), ``diboson_scale`` (1, 0.25, [0.25, 2]):
  normalisations of those backgrounds; ``bkg_scale`` (1, 0.001, [0.99, 1.01]):
  normalisation of all backgrounds.

Every feature is computed from the modified momenta, so the derived ones move
consistently with ``tes``/``jes``/``soft_met`` (e.g. the visible mass scales with
``√tes``, the lepton/tau pT ratio with ``1/tes``). Sampling is reparameterised: at a
fixed key, features are differentiable in ``tes``, ``jes`` and ``soft_met``. There is
no event selection (the number of events is fixed), so only the normalisation
nuisances change the yields.

Features (GeV where dimensionful): ``tau_pt``, ``lep_pt``, ``met``, ``jet_pt``,
``mass_vis`` (τ+ℓ invariant mass), ``mass_transverse`` (ℓ, MET), ``deltaeta_tau_lep``,
``deltar_tau_lep``, ``pt_h`` (|pT⃗(τ) + pT⃗(ℓ) + MET⃗|), ``pt_ratio_lep_tau``,
``sum_pt`` (τ + ℓ + jet).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sbi_engine.errors import ConfigError
from sbi_engine.events import EventGenerator, Process
from sbi_engine.simulator import Parameter
from simulators.toy_physics._checks import expected_yield

__all__ = ["FEATURES", "NAME", "NOMINAL_YIELDS", "PROCESSES", "HiggsLike", "ProcessModel",
           "build"]

NAME = "higgs_like"
FEATURES = ("tau_pt", "lep_pt", "met", "jet_pt", "mass_vis", "mass_transverse",
            "deltaeta_tau_lep", "deltar_tau_lep", "pt_h", "pt_ratio_lep_tau", "sum_pt")


@dataclasses.dataclass(frozen=True)
class ProcessModel:
    """Generative parameters of one process (see the module docstring).

    ``resonant``: ``M ~ N(m0, m_scale)``; otherwise ``M = m0 + Gamma(m_shape, m_scale)``.
    Gamma distributions are ``(integer shape, scale)``; visible fractions are
    Kumaraswamy ``(a, b)``; ``extra_met`` ``None`` means none.
    """

    signal: bool
    resonant: bool
    m0: float
    m_scale: float
    m_shape: int
    pt: tuple[int, float]
    rapidity: float
    had_frac: tuple[float, float]
    lep_frac: tuple[float, float]
    extra_met: tuple[int, float] | None
    extra_jet: tuple[int, float]


PROCESSES: dict[str, ProcessModel] = {
    "htautau": ProcessModel(True, True, 125.0, 4.0, 0, (2, 25.0), 1.0,
                            (2.0, 1.5), (1.5, 2.5), None, (2, 8.0)),
    "ztautau": ProcessModel(False, True, 91.2, 3.0, 0, (2, 9.0), 1.3,
                            (2.0, 1.5), (1.5, 2.5), None, (2, 5.0)),
    "ttbar": ProcessModel(False, False, 80.0, 50.0, 2, (3, 30.0), 0.8,
                          (2.0, 1.2), (2.0, 1.5), (2, 20.0), (2, 40.0)),
    "diboson": ProcessModel(False, False, 100.0, 35.0, 2, (2, 20.0), 1.0,
                            (2.0, 1.5), (2.0, 2.0), (2, 15.0), (1, 15.0)),
}
NOMINAL_YIELDS = {"htautau": 1000.0, "ztautau": 50000.0, "ttbar": 10000.0, "diboson": 2000.0}

_TES, _JES, _SOFT_MET, _TTBAR, _DIBOSON, _BKG = range(6)
_MIN_MASS = 20.0
_MIN_VIS_FRAC = 0.02


def _boost(e_star: jax.Array, p_star: jax.Array, e: jax.Array, p: jax.Array, m: jax.Array
           ) -> jax.Array:
    """Boost ``(e_star, p_star (3,))`` from the rest frame of ``(e, p (3,))`` of mass ``m``.

    Returns the lab 3-momentum ``(3,)``; ``(γ − 1)/β² = γ²/(γ + 1)`` keeps it finite at rest.
    """
    gamma = e / m
    beta = p / e
    bp = beta @ p_star
    return p_star + beta * (gamma**2 / (gamma + 1.0) * bp + gamma * e_star)


def _norm(v: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.sum(v**2), 1e-12))


def _gamma(u: jax.Array, shape_scale: tuple[int, float]) -> jax.Array:
    """``Gamma(k, θ)`` for integer ``k``: ``θ`` times a sum of ``k`` unit exponentials.

    ``u`` holds at least ``k`` uniforms; each gives ``−log(1 − u)``.
    """
    k, theta = shape_scale
    return -theta * jnp.sum(jnp.log1p(-u[:k]))


def _kumaraswamy(u: jax.Array, ab: tuple[float, float]) -> jax.Array:
    """``Kumaraswamy(a, b)`` by its inverse CDF ``(1 − (1 − u)^{1/b})^{1/a}``, floored at 0.02.

    The floor (a visible product carries at least 2% of the tau momentum) keeps ratios
    and pseudorapidities finite for the rare ``u ≈ 0``.
    """
    return jnp.maximum((1.0 - (1.0 - u) ** (1.0 / ab[1])) ** (1.0 / ab[0]), _MIN_VIS_FRAC)


def _unit2(u: jax.Array) -> jax.Array:
    """Unit transverse vector at azimuth ``φ = π(2u − 1)``."""
    phi = math.pi * (2.0 * u - 1.0)
    return jnp.stack([jnp.cos(phi), jnp.sin(phi)])


class HiggsLike(EventGenerator):
    """HiggsML-like H→ττ toy; processes ``htautau`` (signal), ``ztautau``, ``ttbar``, ``diboson``.

    ν = ``(tes, jes, soft_met, ttbar_scale, diboson_scale, bkg_scale)``.

    Args:
        yields: nominal expected yields per process (defaults: :data:`NOMINAL_YIELDS`);
            a partial mapping overrides those given; each a finite number ``>= 0``.
    """

    def __init__(self, *, yields: Mapping[str, float] | None = None):
        yields = {**NOMINAL_YIELDS, **(yields or {})}
        unknown = sorted(set(yields) - set(PROCESSES))
        if unknown:
            raise ConfigError(f"yields: unknown process(es) {unknown}; known: "
                              f"{', '.join(PROCESSES)}")
        self.nominal_yields = {k: expected_yield(f"yields.{k}", yields[k], zero=True)
                               for k in PROCESSES}
        self._models = tuple(PROCESSES.values())
        self._init_spec(
            name=NAME,
            processes=tuple(Process(k, m.signal) for k, m in PROCESSES.items()),
            nuisances=(
                Parameter("tes", 0.9, 1.1, nominal=1.0),
                Parameter("jes", 0.9, 1.1, nominal=1.0),
                Parameter("soft_met", 0.0, 5.0, unit="GeV", nominal=0.0),
                Parameter("ttbar_scale", 0.8, 1.2, nominal=1.0),
                Parameter("diboson_scale", 0.25, 2.0, nominal=1.0),
                Parameter("bkg_scale", 0.99, 1.01, nominal=1.0),
            ),
            constraints=(0.01, 0.01, 1.0, 0.02, 0.25, 0.001),
            features=FEATURES,
            description="Synthetic HiggsML-like H->tautau toy (tau_had + lepton + jet + MET; "
                        "htautau vs ztautau/ttbar/diboson) with the FAIR-Universe nuisances "
                        "tes, jes, soft_met, ttbar_scale, diboson_scale, bkg_scale.",
        )

    def _sample_one(self, key, p, nu):
        m = self._models[p]
        # all randomness from two draws (one threefry each keeps compilation fast)
        k_u, k_n = jax.random.split(key)
        u = jax.random.uniform(k_u, (19,), minval=0.0, maxval=1.0)
        eps = jax.random.normal(k_n, (4,))
        # 1. the di-tau system
        if m.resonant:
            mass = m.m0 + m.m_scale * eps[0]
        else:
            mass = m.m0 + _gamma(u[0:3], (m.m_shape, m.m_scale))
        mass = jnp.maximum(mass, _MIN_MASS)
        pt_sys = _gamma(u[3:6], m.pt) * _unit2(u[6])
        rap = m.rapidity * eps[1]
        mt = jnp.sqrt(mass**2 + jnp.sum(pt_sys**2))
        e_sys = mt * jnp.cosh(rap)
        p_sys = jnp.concatenate([pt_sys, (mt * jnp.sinh(rap))[None]])
        # 2. two massless taus, back to back in the rest frame
        cos_t = 2.0 * u[7] - 1.0
        sin_t = jnp.sqrt(jnp.maximum(1.0 - cos_t**2, 0.0))
        direction = jnp.concatenate([sin_t * _unit2(u[8]), cos_t[None]])
        half = 0.5 * mass
        tau_had = _boost(half, half * direction, e_sys, p_sys, mass)
        tau_lep = _boost(half, -half * direction, e_sys, p_sys, mass)
        # 3. collinear decays
        z_had = _kumaraswamy(u[9], m.had_frac)
        z_lep = _kumaraswamy(u[10], m.lep_frac)
        vis_had, vis_lep = z_had * tau_had, z_lep * tau_lep
        met = (1.0 - z_had) * tau_had[:2] + (1.0 - z_lep) * tau_lep[:2]
        if m.extra_met is not None:
            met = met + _gamma(u[11:14], m.extra_met) * _unit2(u[14])
        # 4. the recoiling jet
        jet = -pt_sys + _gamma(u[15:18], m.extra_jet) * _unit2(u[18])
        # nuisances: energy scales (MET absorbs the change) and the soft MET term
        tes, jes, soft = nu[_TES], nu[_JES], nu[_SOFT_MET]
        tau = tes * vis_had
        met = met - (tes - 1.0) * vis_had[:2] - (jes - 1.0) * jet
        jet = jes * jet
        met = met + soft * eps[2:4]
        return _features(tau, vis_lep, jet, met)

    def _yield(self, p, nu):
        name = self.processes[p].name
        y = jnp.asarray(self.nominal_yields[name])
        if self.processes[p].signal:
            return y
        scale = nu[_BKG]
        if name == "ttbar":
            scale = scale * nu[_TTBAR]
        elif name == "diboson":
            scale = scale * nu[_DIBOSON]
        return y * scale


def _features(tau: jax.Array, lep: jax.Array, jet: jax.Array, met: jax.Array) -> jax.Array:
    """Features ``(11,)`` from the visible tau and lepton ``(3,)``, jet and MET ``(2,)``."""
    tau_pt, lep_pt, jet_pt, met_pt = _norm(tau[:2]), _norm(lep[:2]), _norm(jet), _norm(met)
    eta_tau = jnp.arcsinh(tau[2] / tau_pt)
    eta_lep = jnp.arcsinh(lep[2] / lep_pt)
    # 2(|a||b| − a·b) = |a||b| |â − b̂|²: no cancellation for nearly collinear a, b
    m_vis = jnp.sqrt(_norm(tau) * _norm(lep)) * _norm(tau / _norm(tau) - lep / _norm(lep))
    m_t = jnp.sqrt(lep_pt * met_pt) * _norm(lep[:2] / lep_pt - met / met_pt)
    deta = jnp.abs(eta_tau - eta_lep)
    dphi = jnp.abs(jnp.arctan2(tau[0] * lep[1] - tau[1] * lep[0], tau[:2] @ lep[:2]))
    dr = jnp.sqrt(deta**2 + dphi**2)
    pt_h = _norm(tau[:2] + lep[:2] + met)
    return jnp.stack([tau_pt, lep_pt, met_pt, jet_pt, m_vis, m_t, deta, dr, pt_h,
                      lep_pt / tau_pt, tau_pt + lep_pt + jet_pt])


def build(**kwargs) -> HiggsLike:
    """The HiggsML-like toy with :data:`NOMINAL_YIELDS`."""
    return HiggsLike(**kwargs)
