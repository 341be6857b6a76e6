"""Standardisation of θ and x around the flow, with its change of variables.

The flow sees ``w = (g(θ) - μ_θ) / σ_θ`` and ``x̃ = (x - μ_x) / σ_x``, where ``g`` is
the identity or a prior's bijection to unconstrained space (``prior.to_unconstrained``;
Papamakarios & Murray 2016, and sbi's ``transform_to_unconstrained``). The density of
θ itself is then

    log q(θ | x) = log q_flow(w | x̃) + log|det ∂w/∂θ|
                 = log q_flow(w | x̃) - Σ log σ_θ - log|det ∂θ/∂g|,

with ``log|det ∂θ/∂g| = prior.log_det_from_unconstrained(g(θ))``; outside the prior's
support the density is 0 (``-inf`` in log space). ``x`` needs no Jacobian: it is only
conditioned on.

Statistics are fitted on training data like sbi's ``z_standardization``: rows with any
non-finite entry (failed simulations) are ignored, the standard deviation is the
unbiased one, and a constant dimension gets ``σ = 1`` (sbi floors it at 1e-14 instead,
which blows a constant input up). ``"structured"`` uses one mean over all entries and
the mean over rows of the per-row standard deviation (for time series / images).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.priors import Prior, prior_from_dict

__all__ = ["Standardization", "fit_zscore"]

Array = jax.Array

_MIN_STD = 1e-12


def fit_zscore(values: np.ndarray, mode: str, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over the rows of ``values (n, *S)``, NaN-aware.

    Args:
        values: ``(n, *S)``; rows with any non-finite entry are ignored.
        mode: ``"independent"`` (per entry, shapes ``S``), ``"structured"`` (scalars)
            or ``"none"`` (0 and 1).
        name: field named in errors.

    Returns:
        ``(mean, std)`` float32, each of shape ``S`` (``()`` if structured).
    """
    values = np.asarray(values, dtype=np.float64)
    shape = values.shape[1:]
    if mode == "none":
        return np.zeros(shape, np.float32), np.ones(shape, np.float32)
    flat = values.reshape(values.shape[0], -1)
    valid = flat[np.all(np.isfinite(flat), axis=1)]
    if valid.shape[0] < 2:
        raise ShapeError(
            f"{name}: need at least 2 rows without NaN/inf to fit a z-score, got {valid.shape[0]}"
        )
    if mode == "independent":
        mean, std = valid.mean(axis=0), valid.std(axis=0, ddof=1)
        std = np.where(std > _MIN_STD * np.maximum(1.0, np.abs(mean)), std, 1.0)
        return mean.reshape(shape).astype(np.float32), std.reshape(shape).astype(np.float32)
    if mode == "structured":
        if valid.shape[1] < 2:
            raise ShapeError(f"{name}: 'structured' z-scoring needs at least 2 entries per row")
        mean = valid.mean()
        std = valid.std(axis=1, ddof=1).mean()
        std = std if std > _MIN_STD * max(1.0, abs(mean)) else 1.0
        return np.float32(mean), np.float32(std)
    raise ConfigError(f"z-score mode: got {mode!r}, expected independent/structured/none")


@dataclasses.dataclass(frozen=True, eq=False)
class Standardization:
    """Fixed (not trained) affine maps of θ and x, and optionally a prior bijection.

    Attributes:
        theta_mean, theta_std: ``(D,)`` (or ``()``) statistics of θ, in unconstrained
            space when ``prior`` is set.
        x_mean, x_std: statistics of one ``x``, broadcastable to ``x_shape``.
        prior: if set, θ is mapped by ``prior.to_unconstrained`` before the z-score.
    """

    theta_mean: np.ndarray
    theta_std: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray
    prior: Prior | None = None

    @classmethod
    def identity(cls, theta_dim: int, x_shape: tuple[int, ...]) -> Standardization:
        """No standardisation."""
        return cls(
            np.zeros(theta_dim, np.float32),
            np.ones(theta_dim, np.float32),
            np.zeros(x_shape, np.float32),
            np.ones(x_shape, np.float32),
        )

    @classmethod
    def fit(
        cls,
        theta: np.ndarray,
        x: np.ndarray,
        *,
        z_score_theta: str = "independent",
        z_score_x: str = "independent",
        prior: Prior | None = None,
    ) -> Standardization:
        """Fit on training pairs.

        Args:
            theta: ``(n, D)`` parameters.
            x: ``(n, *X)`` data; rows with NaN/inf are ignored for both fits.
            z_score_theta: ``"independent"``, ``"structured"``, ``"none"`` or
                ``"transform_to_unconstrained"`` (needs ``prior``).
            z_score_x: ``"independent"``, ``"structured"`` or ``"none"``.
            prior: the prior, used only by ``"transform_to_unconstrained"``.
        """
        theta, x = np.asarray(theta, np.float64), np.asarray(x, np.float64)
        if theta.ndim != 2:
            raise ShapeError(f"theta: expected shape (n, D), got {theta.shape}")
        if x.ndim < 2 or x.shape[0] != theta.shape[0]:
            raise ShapeError(f"x: expected shape ({theta.shape[0]}, *X), got {x.shape}")
        finite = np.all(np.isfinite(x.reshape(x.shape[0], -1)), axis=1) & np.all(
            np.isfinite(theta), axis=1
        )
        x_mean, x_std = fit_zscore(x[finite], z_score_x, name="x")
        if z_score_theta == "transform_to_unconstrained":
            if prior is None:
                raise ConfigError("z_score_theta='transform_to_unconstrained' needs a prior")
            if prior.dim != theta.shape[1]:
                raise ShapeError(f"prior: dim {prior.dim} but theta has {theta.shape[1]} columns")
            t = theta[finite]
            if not bool(np.all(np.asarray(prior.in_support(jnp.asarray(t, jnp.float32))))):
                raise ShapeError("theta: training values outside the prior's support")
            t = np.asarray(prior.to_unconstrained(jnp.asarray(t, jnp.float32)), np.float64)
            mean, std = fit_zscore(t, "independent", name="theta")
            return cls(mean, std, x_mean, x_std, prior)
        if prior is not None:
            raise ConfigError(
                f"a prior is used only with z_score_theta='transform_to_unconstrained', "
                f"got {z_score_theta!r}"
            )
        mean, std = fit_zscore(theta[finite], z_score_theta, name="theta")
        return cls(
            np.broadcast_to(mean, theta.shape[1:]).astype(np.float32),
            np.broadcast_to(std, theta.shape[1:]).astype(np.float32),
            x_mean,
            x_std,
        )

    # -- maps, one example --------------------------------------------------------------

    def theta_forward(self, theta: Array) -> tuple[Array, Array]:
        """``θ (D,) → (w (D,), log|det ∂w/∂θ| ())`` (clipped inside a prior's support)."""
        logdet = -jnp.sum(jnp.log(jnp.broadcast_to(self.theta_std, theta.shape)))
        if self.prior is not None:
            theta = self.prior.to_unconstrained(theta)
            logdet = logdet - self.prior.log_det_from_unconstrained(theta)
        return (theta - self.theta_mean) / self.theta_std, logdet

    def theta_inverse(self, w: Array) -> tuple[Array, Array]:
        """``w (D,) → (θ (D,), log|det ∂θ/∂w| ())``."""
        logdet = jnp.sum(jnp.log(jnp.broadcast_to(self.theta_std, w.shape)))
        g = w * self.theta_std + self.theta_mean
        if self.prior is None:
            return g, logdet
        return self.prior.from_unconstrained(g), logdet + self.prior.log_det_from_unconstrained(g)

    def in_support(self, theta: Array) -> Array:
        """``θ (D,) → ()`` bool; always True without a prior."""
        if self.prior is None:
            return jnp.ones((), bool)
        return self.prior.in_support(theta)

    def x_forward(self, x: Array) -> Array:
        """``x (*X,) → x̃ (*X,)``."""
        return (x - self.x_mean) / self.x_std

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (arrays as nested lists), inverted by :meth:`from_dict`."""
        return {
            "theta_mean": np.asarray(self.theta_mean).tolist(),
            "theta_std": np.asarray(self.theta_std).tolist(),
            "x_mean": np.asarray(self.x_mean).tolist(),
            "x_std": np.asarray(self.x_std).tolist(),
            "prior": None if self.prior is None else self.prior.to_dict(),
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Standardization:
        """Rebuild from :meth:`to_dict` output."""
        try:
            arrays = [
                np.asarray(spec[k], np.float32)
                for k in ("theta_mean", "theta_std", "x_mean", "x_std")
            ]
        except KeyError as err:
            raise ConfigError(f"standardization: missing field {err.args[0]!r}") from err
        prior = spec.get("prior")
        return cls(*arrays, prior=None if prior is None else prior_from_dict(prior))
