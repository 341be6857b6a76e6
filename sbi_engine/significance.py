"""Discovery significance: closed forms, threshold scans and binned profile likelihoods.

Closed forms for a counting experiment with expected signal ``s`` and background
``b`` (weighted event counts), all JAX, differentiable, and safe at ``s = 0`` (so they
can be used directly in losses):

- Asimov significance (Cowan, Cranmer, Gross & Vitells 2011, Eur. Phys. J. C 71:1554,
  eq. 97)::

      Z_A = sqrt(2((s + b) ln(1 + s/b) − s))

  evaluated as ``Z_A = s/√b · √r(s/b)`` with ``r(t) = 2((1+t)ln(1+t) − t)/t²`` (a series
  for small ``t``), which is exact, accurate in float32 for ``s ≪ b`` and has the
  gradient ``1/√b`` at ``s = 0``. Reference: ``Z_A(10, 100) = 0.984``.
- Asimov significance with an absolute background uncertainty ``σ_b`` (Cowan, "Discovery
  sensitivity for a counting experiment with background uncertainty", 2012; the
  objective of Elwood & Krücker 2018, arXiv:1806.00322)::

      Z_A = sqrt(2((s+b) ln[(s+b)(b+σ²)/(b²+(s+b)σ²)] − (b²/σ²) ln[1 + σ²s/(b(b+σ²))]))

  Reference: ``Z_A(10, 100, σ_b=10) = 0.6902``.
- HiggsML approximate median significance with ``b_reg = 10`` (Adam-Bourdarios et al.
  2014, "The Higgs boson machine learning challenge")::

      AMS = sqrt(2((s + b + b_reg) ln(1 + s/(b + b_reg)) − s))

:func:`threshold_scan` finds the cut on a classifier score that maximises one of these
for weighted events. :func:`profile_significance` fits a binned HistFactory model
(Cranmer et al. 2012, CERN-OPEN-2012-016) with pyhf (Heinrich et al., JOSS 6 (2021)
2823) on its JAX backend: classifier-output histograms per process, a free signal
strength ``μ``, ``histosys`` (shape) modifiers from up/down nuisance variations and
``normsys`` (rate) modifiers. It returns the expected discovery significance
``Z₀ = √q₀`` on the Asimov dataset (``μ = 1``, nuisances nominal) and the expected
uncertainty on ``μ`` from the inverse Hessian of the Asimov NLL (the expected Fisher
information, as in INFERNO). pyhf is an optional extra (``pip install
'sbi-engine[physics]'``), imported only when needed; its JAX backend needs float64, which
is switched on only inside :func:`profile_significance` (``jax.enable_x64`` context).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.errors import ConfigError, ShapeError

__all__ = [
    "ProfileResult",
    "ScanResult",
    "Template",
    "ams",
    "asimov_z",
    "asimov_z_sigma_b",
    "histfactory_spec",
    "histogram",
    "profile_significance",
    "templates_from_scores",
    "threshold_scan",
]

_SMALL_T = 1e-2  # below this s/b the series forms are used (error O(t³) ≲ 1e-6)


# ------------------------------------------------------------------------------------
# Closed forms (JAX, differentiable)
# ------------------------------------------------------------------------------------


def _r(t: jax.Array) -> jax.Array:
    """``r(t) = 2((1+t)ln(1+t) − t)/t²``, ``r(0) = 1``; a series for ``|t| < 0.01``."""
    small = jnp.abs(t) < _SMALL_T
    tf = jnp.where(small, 1.0, t)
    full = 2.0 * ((1.0 + tf) * jnp.log1p(tf) - tf) / tf**2
    series = 1.0 - t / 3.0 + t**2 / 6.0 - t**3 / 10.0
    return jnp.where(small, series, full)


def asimov_z(s: Any, b: Any) -> jax.Array:
    """Asimov discovery significance ``sqrt(2((s+b)ln(1+s/b) − s))``.

    Args:
        s: expected signal ``(...)``, ``s > −b`` (negative ``s`` gives negative ``Z``).
        b: expected background ``(...)``, ``b > 0``.

    Returns:
        ``Z (...)``, differentiable (gradient ``1/√b`` in ``s`` at ``s = 0``).
    """
    s, b = jnp.asarray(s), jnp.asarray(b)
    return s / jnp.sqrt(b) * jnp.sqrt(_r(s / b))


def ams(s: Any, b: Any, *, b_reg: float = 10.0) -> jax.Array:
    """HiggsML approximate median significance ``sqrt(2((s+b+b_reg)ln(1+s/(b+b_reg)) − s))``.

    Args:
        s: selected signal weight ``(...)``.
        b: selected background weight ``(...)``, ``b + b_reg > 0``.
        b_reg: regularisation term (10 in the challenge).

    Returns:
        ``AMS (...)``, differentiable.
    """
    return asimov_z(s, jnp.asarray(b) + b_reg)


def asimov_z_sigma_b(s: Any, b: Any, sigma_b: Any) -> jax.Array:
    """Asimov discovery significance with an absolute background uncertainty ``σ_b``.

    Cowan's formula (see the module docstring); equals :func:`asimov_z` at
    ``σ_b = 0``. Evaluated as ``s/√(b+σ²) · √R`` with a second-order series of ``R``
    in ``s`` for ``s/b < 0.01``, so it is accurate in float32 and differentiable at 0.

    Args:
        s: expected signal ``(...)``, ``s ≥ 0``.
        b: expected background ``(...)``, ``b > 0``.
        sigma_b: absolute background uncertainty ``(...)``, ``≥ 0`` (for a relative
            uncertainty pass ``rel * b``).

    Returns:
        ``Z (...)``, differentiable in ``s``, ``b`` and ``σ_b``.
    """
    s, b, sigma_b = jnp.asarray(s), jnp.asarray(b), jnp.asarray(sigma_b)
    v = sigma_b**2
    no_sys = v <= 1e-12 * b**2
    v = jnp.where(no_sys, 1.0, v)  # safe value; the no-systematics branch is taken below
    bv = b + v
    small = jnp.abs(s / b) < _SMALL_T
    # each branch sees safe values where it is not taken, so that jnp.where's unused
    # branch cannot put inf * 0 = NaN into the gradient (e.g. at b ~ 1e-6 in float32)
    # (the series in t = s/b and u = b/(b+σ²), all O(1), so no b⁴ underflows in float32)
    t = jnp.where(small, s, 0.0) / jnp.where(small, b, 1.0)
    u = jnp.where(small, b, 1.0) / jnp.where(small, bv, 1.0)
    series = 1.0 - t * (2.0 - u) / 3.0 + t**2 * (3.0 - 3.0 * u + u**2) / 6.0
    sf, bf, vf = (jnp.where(small, 1.0, a) for a in (s, b, v))
    bvf = bf + vf
    x = vf * sf / (bf * bvf)
    first = (sf + bf) * jnp.log1p(sf * bf / (bf**2 + (sf + bf) * vf))
    second = sf * bf / bvf * jnp.log1p(x) / x
    full = 2.0 * (first - second) * bvf / sf**2
    z = s / jnp.sqrt(bv) * jnp.sqrt(jnp.maximum(jnp.where(small, series, full), 0.0))
    return jnp.where(no_sys, asimov_z(s, b), z)


# ------------------------------------------------------------------------------------
# Threshold scan (numpy, float64)
# ------------------------------------------------------------------------------------


class ScanResult(NamedTuple):
    """Result of :func:`threshold_scan`; the selection is ``score >= threshold``.

    Attributes:
        threshold: the best threshold (NaN if no threshold is valid).
        z: the significance there.
        thresholds: ``(T,)`` thresholds scanned, ascending.
        z_curve: ``(T,)`` significance at each (NaN where the selection is invalid).
        s: ``(T,)`` selected signal weight.
        b: ``(T,)`` selected background weight.
    """

    threshold: float
    z: float
    thresholds: np.ndarray
    z_curve: np.ndarray
    s: np.ndarray
    b: np.ndarray


def _events(scores, y, w) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(y).reshape(-1)
    w = np.ones_like(scores) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
    if not (scores.shape == y.shape == w.shape) or scores.size == 0:
        raise ShapeError(f"scores, y, w: expected equal non-zero lengths, got {scores.shape}, "
                         f"{y.shape}, {w.shape}")
    if not np.all(np.isin(y, (0, 1))):
        raise ShapeError("y: expected labels 0 (background) or 1 (signal)")
    for name, arr in (("scores", scores), ("w", w)):
        if not np.all(np.isfinite(arr)):
            raise ShapeError(f"{name}: contains NaN or inf")
    return scores, y.astype(bool), w


def threshold_scan(scores: Any, y: Any, w: Any = None, *,
                   metric: Literal["asimov", "ams"] = "asimov", rel_sigma_b: float = 0.0,
                   b_reg: float = 10.0, thresholds: Any = None,
                   min_background: float = 0.0) -> ScanResult:
    """Scan cuts ``score >= t`` on weighted events for the most significant selection.

    Args:
        scores: ``(N,)`` classifier outputs (higher = more signal-like).
        y: ``(N,)`` labels, 1 signal, 0 background.
        w: ``(N,)`` event weights (expected events); ``None`` means 1.
        metric: ``"asimov"`` (:func:`asimov_z`, or :func:`asimov_z_sigma_b` with
            ``σ_b = rel_sigma_b · b``) or ``"ams"`` (:func:`ams` with ``b_reg``).
        rel_sigma_b: relative background uncertainty for ``"asimov"``.
        b_reg: AMS regularisation.
        thresholds: ``(T,)`` thresholds to scan; default: every distinct score.
        min_background: selections with background weight ``<= min_background`` are
            invalid (for ``"asimov"`` an empty background is always invalid).

    Returns:
        :class:`ScanResult`.
    """
    if metric not in ("asimov", "ams"):
        raise ConfigError(f"metric: expected 'asimov' or 'ams', got {metric!r}")
    if rel_sigma_b < 0:
        raise ConfigError(f"rel_sigma_b: expected >= 0, got {rel_sigma_b}")
    scores, y, w = _events(scores, y, w)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    # tail[i] = weight of the events with sorted index >= i (tail[N] = 0)
    tail_s = np.concatenate([np.cumsum((w * y)[order][::-1])[::-1], [0.0]])
    tail_b = np.concatenate([np.cumsum((w * ~y)[order][::-1])[::-1], [0.0]])
    if thresholds is None:
        thresholds = np.unique(scores)
    thresholds = np.sort(np.asarray(thresholds, dtype=np.float64).reshape(-1))
    idx = np.searchsorted(sorted_scores, thresholds, side="left")
    s, b = tail_s[idx], tail_b[idx]
    valid = b > max(min_background, 0.0 if metric == "asimov" else -b_reg)
    s_ok, b_ok = np.where(valid, s, 0.0), np.where(valid, b, 1.0)
    with jax.enable_x64(True):
        if metric == "ams":
            z = ams(s_ok, b_ok, b_reg=b_reg)
        elif rel_sigma_b > 0:
            z = asimov_z_sigma_b(s_ok, b_ok, rel_sigma_b * b_ok)
        else:
            z = asimov_z(s_ok, b_ok)
        z = np.asarray(z, dtype=np.float64)
    z = np.where(valid, z, np.nan)
    if not np.any(np.isfinite(z)):
        return ScanResult(float("nan"), float("nan"), thresholds, z, s, b)
    best = int(np.nanargmax(z))
    return ScanResult(float(thresholds[best]), float(z[best]), thresholds, z, s, b)


# ------------------------------------------------------------------------------------
# Binned profile likelihood (pyhf)
# ------------------------------------------------------------------------------------


def _float_pair(value: Any) -> tuple[float, float]:
    """``(lo, hi)`` as floats; ``(nan, nan)`` when ``value`` is not a pair of numbers, so
    the caller's range check names it."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        return float("nan"), float("nan")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class Template:
    """One sample's histogram and its systematic variations (the input of a HistFactory model).

    Args:
        name: sample name (a process).
        nominal: ``(B,)`` expected events per bin at nominal nuisances.
        signal: whether the sample scales with the signal strength ``μ``.
        histosys: ``{nuisance: (down (B,), up (B,))}`` histograms at the nuisance's
            −1σ / +1σ settings (shape and rate), a ``histosys`` modifier each.
        normsys: ``{nuisance: (lo, hi)}`` multiplicative rate factors at −1σ / +1σ,
            a ``normsys`` modifier each.
    """

    name: str
    nominal: Any
    signal: bool = False
    histosys: Mapping[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    normsys: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        nominal = _hist(self.nominal, f"template {self.name!r} nominal")
        object.__setattr__(self, "nominal", nominal)
        hs = {}
        for nuis, pair in dict(self.histosys).items():
            if len(pair) != 2:
                raise ShapeError(f"template {self.name!r} histosys {nuis!r}: expected "
                                 f"(down, up) histograms")
            hs[nuis] = tuple(_hist(h, f"template {self.name!r} histosys {nuis!r}",
                                   nominal.shape[0]) for h in pair)
        object.__setattr__(self, "histosys", hs)
        ns = {}
        for nuis, pair in dict(self.normsys).items():
            lo, hi = _float_pair(pair)
            if not (lo > 0 and hi > 0 and np.isfinite(lo) and np.isfinite(hi)):
                raise ConfigError(f"template {self.name!r} normsys {nuis!r}: expected positive "
                                  f"finite (lo, hi) factors, got {pair}")
            ns[nuis] = (lo, hi)
        object.__setattr__(self, "normsys", ns)


def _hist(h: Any, field: str, n_bins: int | None = None) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 1 or h.size == 0 or (n_bins is not None and h.shape[0] != n_bins):
        want = "(B,)" if n_bins is None else f"({n_bins},)"
        raise ShapeError(f"{field}: expected a histogram of shape {want}, got {h.shape}")
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ShapeError(f"{field}: expected finite, non-negative bin contents")
    return h


def histogram(scores: Any, w: Any, bins: Any) -> np.ndarray:
    """Weighted histogram of ``scores (N,)`` with weights ``w (N,)`` on ``bins (B+1,)`` edges.

    Scores outside the edges go to the first/last bin, so no event weight is lost.
    Returns ``(B,)`` float64.
    """
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ConfigError("bins: expected at least two increasing bin edges")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if scores.shape != w.shape:
        raise ShapeError(f"scores, w: expected equal lengths, got {scores.shape}, {w.shape}")
    idx = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, edges.size - 2)
    return np.bincount(idx, weights=w, minlength=edges.size - 1)


Sample = tuple[Any, Any]  # (scores (N,), weights (N,))


def templates_from_scores(bins: Any, nominal: Mapping[str, Sample], *, signal: Sequence[str],
                          variations: Mapping[str, Mapping[str, Mapping[str, Sample]]]
                          | None = None,
                          normsys: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
                          ) -> list[Template]:
    """HistFactory templates from classifier outputs of weighted events.

    Args:
        bins: ``(B+1,)`` bin edges of the classifier output.
        nominal: ``{process: (scores (N,), w (N,))}`` at nominal nuisances.
        signal: names of the signal processes.
        variations: ``{nuisance: {"down": {process: (scores, w)}, "up": {...}}}`` — the
            same processes simulated at the nuisance's −1σ/+1σ values; a histosys for
            every process given in both.
        normsys: ``{nuisance: {process: (lo, hi)}}`` rate factors.

    Returns:
        One :class:`Template` per process of ``nominal``.
    """
    unknown = sorted(set(signal) - set(nominal))
    if unknown:
        raise ConfigError(f"signal: process(es) {unknown} not in nominal ({sorted(nominal)})")
    templates = []
    for proc, (sc, w) in nominal.items():
        hs, ns = {}, {}
        for nuis, var in (variations or {}).items():
            if set(var) != {"down", "up"}:
                raise ConfigError(f"variations[{nuis!r}]: expected keys 'down' and 'up', got "
                                  f"{sorted(var)}")
            if proc in var["down"] and proc in var["up"]:
                hs[nuis] = tuple(histogram(*var[d][proc], bins) for d in ("down", "up"))
        for nuis, per_proc in (normsys or {}).items():
            if proc in per_proc:
                ns[nuis] = per_proc[proc]
        templates.append(Template(proc, histogram(sc, w, bins), signal=proc in signal,
                                  histosys=hs, normsys=ns))
    return templates


def histfactory_spec(templates: Sequence[Template], *, channel: str = "sr") -> dict[str, Any]:
    """A pyhf workspace spec (one channel) from templates; signal samples get ``mu``.

    Args:
        templates: the samples, at least one signal and one background.
        channel: channel name.

    Returns:
        ``{"channels": [...]}`` — a plain JSON-able dict for ``pyhf.Model``.
    """
    templates = list(templates)
    if not any(t.signal for t in templates) or all(t.signal for t in templates):
        raise ConfigError("templates: expected at least one signal and one background sample")
    n_bins = {t.nominal.shape[0] for t in templates}
    if len(n_bins) != 1:
        raise ShapeError(f"templates: all histograms need the same number of bins, got "
                         f"{sorted(n_bins)}")
    total_b = sum(t.nominal for t in templates if not t.signal)
    if np.any(total_b <= 0):
        raise ShapeError(f"templates: bins {np.flatnonzero(total_b <= 0).tolist()} have no "
                         f"background; merge them or choose other bin edges")
    samples = []
    for t in templates:
        mods: list[dict[str, Any]] = []
        if t.signal:
            mods.append({"name": "mu", "type": "normfactor", "data": None})
        for nuis, (down, up) in t.histosys.items():
            mods.append({"name": nuis, "type": "histosys",
                         "data": {"lo_data": down.tolist(), "hi_data": up.tolist()}})
        for nuis, (lo, hi) in t.normsys.items():
            mods.append({"name": nuis, "type": "normsys", "data": {"lo": lo, "hi": hi}})
        samples.append({"name": t.name, "data": t.nominal.tolist(), "modifiers": mods})
    return {"channels": [{"name": channel, "samples": samples}]}


class ProfileResult(NamedTuple):
    """Expected results of a binned profile-likelihood fit on the Asimov dataset (``μ = 1``).

    Attributes:
        z0: expected discovery significance ``√q₀``, nuisances profiled.
        mu_uncertainty: expected ``σ_μ`` (inverse Hessian of the NLL), nuisances profiled.
        mu_uncertainty_stat: ``σ_μ`` with every nuisance fixed at nominal.
        q0: the discovery test statistic.
    """

    z0: float
    mu_uncertainty: float
    mu_uncertainty_stat: float
    q0: float


def _import_pyhf():
    """Import pyhf and its JAX backend without leaving ``jax_enable_x64`` switched on.

    pyhf's JAX backend turns x64 on globally when first imported; we restore the flag
    and use the ``jax.enable_x64`` context around each computation instead.
    """
    previous = bool(jax.config.jax_enable_x64)
    try:
        import pyhf
        import pyhf.tensor.jax_backend  # this import flips jax_enable_x64 on
    except ImportError as err:
        raise ImportError("profile_significance needs pyhf (the 'physics' extra): "
                          "pip install 'sbi-engine[physics]'") from err
    finally:
        jax.config.update("jax_enable_x64", previous)
    return pyhf


def profile_significance(templates: Sequence[Template] | Mapping[str, Any], *,
                         fixed: Sequence[str] = (), mu_bounds: tuple[float, float] = (0.0, 10.0)
                         ) -> ProfileResult:
    """Expected discovery significance and signal-strength uncertainty from a HistFactory fit.

    Builds the model (``normsys`` interpolation code 4, ``histosys`` code 4p: smooth at
    the nominal point, so the Hessian is well defined), takes the Asimov dataset at
    ``μ = 1`` with nuisances at nominal (auxiliary data included), and computes
    ``q₀`` by profiling the nuisances at ``μ = 0`` (pyhf, JAX backend, scipy
    optimiser) and ``σ_μ = √(H⁻¹)_μμ`` with ``H`` the Hessian of the NLL at the Asimov
    point (``jax.hessian``).

    Args:
        templates: :class:`Template` s, or a spec from :func:`histfactory_spec`.
        fixed: nuisance names held at nominal (not profiled); not ``"mu"``.
        mu_bounds: ``(lo, hi)`` bounds of ``μ`` in the fits, ``lo <= 0`` and ``hi >= 1``
            (the fits evaluate ``μ = 0`` and ``μ = 1``).

    Returns:
        :class:`ProfileResult`.
    """
    if isinstance(fixed, str) or not isinstance(fixed, Iterable):
        raise ConfigError(f"fixed: expected a sequence of nuisance names, got {fixed!r}")
    fixed = tuple(fixed)
    if "mu" in fixed:
        raise ConfigError(f"fixed: expected nuisance names, got the signal strength 'mu' "
                          f"(always fitted) in {list(fixed)}")
    lo, hi = _float_pair(mu_bounds)
    if not (lo <= 0.0 and hi >= 1.0 and np.isfinite(lo) and np.isfinite(hi)):
        raise ConfigError(f"mu_bounds: expected finite (lo, hi) with lo <= 0 and hi >= 1, "
                          f"got {mu_bounds!r}")
    spec = templates if isinstance(templates, Mapping) else histfactory_spec(templates)
    pyhf = _import_pyhf()
    previous_backend = pyhf.get_backend()
    try:
        with jax.enable_x64(True), warnings.catch_warnings():
            # pyhf 0.7's schema validation uses a deprecated jsonschema API
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="pyhf")
            pyhf.set_backend("jax", "scipy", precision="64b")
            model = pyhf.Model(spec, poi_name="mu", validate=True, modifier_settings={
                "normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}})
            names = list(model.config.par_order)
            unknown = sorted(set(fixed) - set(names))
            if unknown:
                raise ConfigError(f"fixed: unknown nuisance(s) {unknown}; the model has "
                                  f"{', '.join(n for n in names if n != 'mu')}")
            init = list(model.config.suggested_init())
            poi = model.config.poi_index
            init[poi] = 1.0
            bounds = list(model.config.suggested_bounds())
            bounds[poi] = (lo, hi)
            fixed_mask = list(model.config.suggested_fixed())
            for name in fixed:
                sl = model.config.par_slice(name)
                for i in range(sl.start, sl.stop):
                    fixed_mask[i] = True
            pars = jnp.asarray(init, jnp.float64)
            data = model.expected_data(pars)
            q0 = float(pyhf.infer.test_statistics.q0(
                0.0, data, model, init, bounds, fixed_mask))
            hess = jax.jit(jax.hessian(lambda p, d: -model.logpdf(p, d)[0]))(pars, data)
            free = np.flatnonzero(~np.asarray(fixed_mask))
            h_free = np.asarray(hess)[np.ix_(free, free)]
            cov = np.linalg.inv(h_free)
            i_poi = int(np.flatnonzero(free == poi)[0])
            sigma_mu = float(np.sqrt(cov[i_poi, i_poi]))
            sigma_stat = float(1.0 / np.sqrt(np.asarray(hess)[poi, poi]))
    finally:
        pyhf.set_backend(*previous_backend)
    q0 = max(q0, 0.0)
    return ProfileResult(float(np.sqrt(q0)), sigma_mu, sigma_stat, q0)
