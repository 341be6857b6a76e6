"""The Learning-to-Pivot toy (Louppe, Kagan & Cranmer 2017, arXiv:1611.01046, §5.1).

Two processes in 2-D with one nuisance ``Z``:

- background: ``x ~ N((0, 0), [[1, −0.5], [−0.5, 1]])`` (independent of ``Z``);
- signal: ``x | Z ~ N((1, 1 + Z), I)``, with ``Z ~ N(0, 1)``.

``Z`` shifts the signal along ``x₁``, so a classifier trained at ``Z = 0`` changes its
signal efficiency as ``Z`` moves; the paper trains an adversary to predict ``Z`` from
the classifier output to make that output a pivot. The paper fixes no yields; we use
``s_exp = 100`` signal and ``b_exp = 1000`` background events (constructor options).

Nuisance: ``z`` (nominal 0, Gaussian constraint σ 1, range [−3, 3]). Sampling is
reparameterised (``x = (1, 1 + z) + ε``). With one ``Z`` per event drawn from its
prior (:meth:`~sbi_engine.events.EventGenerator.sample_each`), the signal is
marginally ``N((1, 1), diag(1, 2))`` — the training set of the paper.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sbi_engine.events import EventGenerator, Process
from sbi_engine.simulator import Parameter
from simulators.toy_physics._checks import expected_yield

__all__ = ["BKG_COV", "NAME", "Pivot", "build"]

NAME = "pivot"
BKG_COV = ((1.0, -0.5), (-0.5, 1.0))
_BKG_CHOL = ((1.0, 0.0), (-0.5, math.sqrt(0.75)))  # lower Cholesky factor of BKG_COV
_SIGNAL, _BACKGROUND = 0, 1


class Pivot(EventGenerator):
    """The pivot toy. Processes ``("signal", "background")``; ν = ``(z,)``.

    Args:
        s_exp: expected signal yield, ``> 0``.
        b_exp: expected background yield, ``> 0``.
    """

    def __init__(self, *, s_exp: float = 100.0, b_exp: float = 1000.0):
        self.s_exp = expected_yield("s_exp", s_exp)
        self.b_exp = expected_yield("b_exp", b_exp)
        self._init_spec(
            name=NAME,
            processes=(Process("signal", True), Process("background", False)),
            nuisances=(Parameter("z", -3.0, 3.0, nominal=0.0),),
            constraints=(1.0,),
            features=("x0", "x1"),
            description="Learning-to-Pivot toy (Louppe et al. 2017): background "
                        "N(0, [[1,-.5],[-.5,1]]), signal N((1,1+Z), I), Z ~ N(0,1).",
        )

    def _sample_one(self, key, p, nu):
        eps = jax.random.normal(key, (2,))
        if p == _SIGNAL:
            return jnp.stack([1.0 + eps[0], 1.0 + nu[0] + eps[1]])
        return jnp.asarray(_BKG_CHOL) @ eps

    def _yield(self, p, nu):
        return jnp.asarray(self.s_exp if p == _SIGNAL else self.b_exp)

    def log_prob(self, x: jax.Array, process: str | int, nu: jax.Array | None = None
                 ) -> jax.Array:
        """Log density of one event ``x (2,)`` given ``Z = nu[0]``. Returns ``()``."""
        p, nu = self.process_index(process), self._nu(nu)
        x = jnp.asarray(x)
        if p == _SIGNAL:
            d = x - jnp.stack([1.0, 1.0 + nu[0]])
            return -0.5 * jnp.sum(d**2) - jnp.log(2 * jnp.pi)
        cov = jnp.asarray(BKG_COV)
        maha = x @ jnp.linalg.solve(cov, x)
        return -0.5 * maha - jnp.log(2 * jnp.pi) - 0.5 * jnp.log(jnp.linalg.det(cov))


def build(**kwargs) -> Pivot:
    """The pivot toy (``s_exp=100``, ``b_exp=1000``)."""
    return Pivot(**kwargs)
