"""The engine on an accelerator: NPE training, a posterior file moved to the CPU, many
classifiers under ``vmap``, the pyloric simulator's reference circuits.

Run with ``make test-gpu`` (``JAX_PLATFORMS=cuda,cpu pytest -m gpu``); ``make test``
deselects them, and without a GPU they skip. The checks are the CPU suite's references
(the analytic posterior, vmapped = sequential training, the reference simulator's
features), evaluated on the accelerator. ``SBI_ENGINE_TEST_ACCELERATOR=cpu`` runs them on
the CPU instead, to check the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbi_engine import Gaussian
from sbi_engine import classify as C
from sbi_engine.npe import NPEConfig, train_npe
from sbi_engine.posterior import Posterior

pytestmark = pytest.mark.gpu

SIGMA2 = 0.25  # θ ~ N(0, I₂), x | θ ~ N(θ, σ² I₂)  →  θ | x ~ N(x / (1 + σ²), σ²/(1+σ²) I)


@pytest.fixture(scope="module")
def accelerator():
    platform = os.environ.get("SBI_ENGINE_TEST_ACCELERATOR", "gpu")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip(f"JAX sees no {platform} device (JAX_PLATFORMS="
                    f"{os.environ.get('JAX_PLATFORMS', '')!r})")
    return devices[0]


def _on(device, tree) -> bool:
    return all(leaf.devices() == {device} for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("kind, epochs", [("maf", dict(max_epochs=40, stop_after_epochs=5)),
                                          ("nsf", dict(max_epochs=200, stop_after_epochs=20))])
def test_npe_trains_on_the_accelerator_and_recovers_the_analytic_posterior(
        accelerator, tmp_path, kind, epochs):
    """The NSF runs its splines' custom batching rule and VJP on the device."""
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(3000, 2)).astype(np.float32)
    x = (theta + np.sqrt(SIGMA2) * rng.normal(size=(3000, 2))).astype(np.float32)
    x[:7] = np.nan
    cfg = NPEConfig.for_estimator(kind, hidden=32, transforms=2, batch_size=100, **epochs)
    prior = Gaussian([0.0, 0.0], np.eye(2))
    with jax.default_device(accelerator):
        res = train_npe(jax.random.key(0), theta, x, config=cfg, prior=prior, progress=False)
        post = res.posterior  # its weights come back to the host, its programs run here
        assert res.excluded == 7 and res.compilations == 1
        x_o = np.array([0.8, -0.5], np.float32)
        s = post.sample(jax.random.key(1), 4000, x_o)
        np.testing.assert_allclose(s.mean(0), x_o / (1 + SIGMA2), atol=0.08)
        np.testing.assert_allclose(s.std(0), np.sqrt(SIGMA2 / (1 + SIGMA2)), rtol=0.15)
        log_q = post.log_prob(s[:50], x_o)
        path = post.save(tmp_path / "model")
    # Saved from the accelerator, loaded and evaluated on the CPU.
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        loaded = Posterior.load(path)
        np.testing.assert_allclose(loaded.log_prob(s[:50], x_o), log_q, rtol=1e-4, atol=1e-4)


def test_many_classifiers_under_vmap_equal_one_at_a_time(accelerator):
    """The issue-5 contract on the device: one vmapped training of three settings gives
    each setting's own training. At float32 matrix precision (a GPU's default may be
    TF32), so that only the batching differs."""
    from simulators.toy_physics import pivot
    from tests.test_classify import check_train_many_equals_train_one

    with jax.default_device(accelerator), jax.default_matmul_precision("float32"):
        data = C.augmented_data(jax.random.key(0), pivot.build(), 2000)
        many, _, _ = check_train_many_equals_train_one(data)
        assert _on(accelerator, many.params) and many.compilations == 1


def test_pyloric_reference_circuits_on_the_accelerator(accelerator):
    """θ₁ and θ₂ of the reference simulator (noiseless, float32, 11 s): the CPU suite's
    float32 tolerance."""
    from simulators import pyloric
    from tests.test_pyloric import COUNTS_1, COUNTS_2, REF_1, REF_2, THETA_1, THETA_2

    with jax.default_device(accelerator):
        x = pyloric.simulate_features(jax.random.key(0), np.array([THETA_1, THETA_2]),
                                      noise_std=0.0, features="full", dtype=jnp.float32)
    for row, ref, counts in [(0, REF_1, COUNTS_1), (1, REF_2, COUNTS_2)]:
        err = np.abs(np.asarray(x[row, :18], np.float64) - ref) / np.abs(ref)
        assert err.max() < 1e-2
        np.testing.assert_array_equal(x[row, 18:24], counts[0] + counts[1])
