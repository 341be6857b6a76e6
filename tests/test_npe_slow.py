"""Statistical reference tests of NPE against sbibm reference posteriors (slow)."""

import jax
import pytest

from sbi_engine import get_simulator
from sbi_engine.diagnostics import c2st_sbibm
from sbi_engine.npe import NPEConfig, train_npe
from sbi_engine.simulate import simulate

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("estimator", ["nsf", "maf"])
def test_gaussian_linear_10k_c2st(estimator):
    """sbibm gaussian_linear, 10k simulations, observation 1: C2ST <= 0.60 (published NPE 0.552)."""
    from simulators.benchmarks import gaussian_linear as task

    sim = get_simulator("gaussian_linear")
    data = simulate(sim, 10_000, 0, progress=False)
    result = train_npe(jax.random.PRNGKey(0), data.theta, data.x,
                       config=NPEConfig.for_estimator(estimator), prior=sim.prior,
                       progress=False)
    ref = task.reference_posterior_samples(1)
    samples = result.posterior.sample(jax.random.PRNGKey(1), 10_000, task.observation(1))
    assert c2st_sbibm(ref, samples) <= 0.60
