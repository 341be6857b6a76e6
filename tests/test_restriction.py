"""Validity classifier and restricted prior (sbi_engine.restriction) on a cheap toy simulator."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbi_engine import BoxUniform, JaxSimulator, Parameter, simulate
from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.restriction import (
    ClassifierConfig,
    RestrictedPrior,
    RestrictionError,
    ValidityClassifier,
    choose_threshold,
    train_validity_classifier,
)

RADIUS = 0.5  # valid region: a disk of radius 0.5 in [-1, 1]^2 → prior mass π/16 ≈ 0.196
AREA = np.pi * RADIUS**2 / 4.0


def disk_fn(key, theta, nu):
    """x = θ + noise, NaN outside the disk |θ| < RADIUS (a simulated failure region)."""
    x = theta + 0.05 * jax.random.normal(key, theta.shape)
    return jnp.where(jnp.sum(theta**2) < RADIUS**2, x, jnp.nan)


def disk_simulator() -> JaxSimulator:
    params = (Parameter("a", -1.0, 1.0), Parameter("b", -1.0, 1.0))
    return JaxSimulator("toy_disk", params, ("x1", "x2"), disk_fn, description="toy")


FAST = ClassifierConfig(hidden=(32, 32), learning_rate=5e-3, batch_size=200, max_epochs=60,
                        stop_after_epochs=8, allowed_false_negatives=0.02)


@pytest.fixture(scope="module")
def trained():
    res = simulate(disk_simulator(), 2000, seed=0, progress=False)
    theta, valid = np.asarray(res.theta), np.asarray(res.valid)
    clf, result = train_validity_classifier(jax.random.key(0), theta, valid, config=FAST)
    return theta, valid, clf, result


def true_valid(theta):
    return np.sum(np.asarray(theta) ** 2, axis=1) < RADIUS**2


def test_classifier_learns_the_valid_region(trained):
    theta, valid, clf, result = trained
    assert 0.15 < valid.mean() < 0.25
    assert result.compilations == 1  # the epoch compiles once
    assert result.num_valid == valid.sum() and result.num_invalid == (~valid).sum()
    assert result.heldout_accuracy > 0.9
    # threshold: at most the allowed fraction of the valid training rows fall below it
    below = clf.predict(theta[valid]) < clf.threshold
    assert below.mean() <= FAST.allowed_false_negatives + 1e-9
    # fresh parameters: few false negatives, most of the invalid area rejected
    fresh = np.asarray(BoxUniform([-1, -1], [1, 1]).sample(jax.random.key(7), 20_000))
    inside = clf.accept(fresh)
    t = true_valid(fresh)
    assert np.mean(~inside[t]) < 0.08
    assert np.mean(~inside[~t]) > 0.8


def test_a_zero_false_negative_threshold_keeps_every_valid_theta(trained):
    # τ is the smallest c(θ) of the valid rows; the row that sets it must stay inside
    # (a cut on the logits at logit(τ) dropped it in 7 of these 20 draws).
    clf = trained[2]
    clf = ValidityClassifier(clf.config, clf.params, clf.mean, clf.std)
    for seed in range(20):
        theta_valid = np.asarray(jax.random.normal(jax.random.key(seed), (50, 2)))
        choose_threshold(clf, theta_valid, allowed_false_negatives=0.0)
        assert clf.accept(theta_valid).all(), seed


def test_restricted_prior_samples_the_region(trained):
    clf = trained[2]
    prior = BoxUniform([-1, -1], [1, 1])
    rp = RestrictedPrior(prior, clf, batch_size=4096)
    s1 = rp.sample(jax.random.key(1), 3000)
    assert s1.shape == (3000, 2) and s1.dtype == np.float32
    assert rp.in_support(s1).all() and clf.accept(s1).all()
    # the region is about the disk (a few false negatives/positives), far smaller than the box
    assert 0.75 * AREA < rp.last_acceptance < 2.0 * AREA
    assert true_valid(s1).mean() > 0.4  # vs ~0.2 under the prior
    np.testing.assert_array_equal(rp.sample(jax.random.key(1), 3000), s1)  # same key
    # a constraint intersects the region
    rc = RestrictedPrior(prior, clf, constraints=[lambda t: t[:, 0] > 0.0], batch_size=4096)
    s2 = rc.sample(jax.random.key(2), 500)
    assert (s2[:, 0] > 0).all() and clf.accept(s2).all()
    # normalised density: log p(θ) - log Z inside, -inf outside
    rp.estimate_acceptance(jax.random.key(3), 20_000)
    lp = rp.log_prob(np.array([[0.0, 0.0], [0.95, 0.95]], np.float32))
    assert np.isfinite(lp[0]) and lp[1] == -np.inf
    np.testing.assert_allclose(lp[0], -np.log(4.0) - np.log(rp.acceptance), rtol=1e-5)


def test_hopeless_acceptance_is_a_clear_error(trained):
    _, _, clf, _ = trained
    prior = BoxUniform([-1, -1], [1, 1])
    rp = RestrictedPrior(prior, clf, constraints=[lambda t: np.zeros(len(t), bool)],
                         batch_size=1000, min_draws=5000, min_acceptance=1e-4)
    with pytest.raises(RestrictionError,
                       match=r"acceptance 0 \(0 of [0-9,]+ prior draws accepted, 10 wanted\)"):
        rp.sample(jax.random.key(0), 10)
    # too many draws needed: a tiny region and a small draw budget
    tiny = RestrictedPrior(prior, constraints=[lambda t: np.sum(t**2, axis=1) < 1e-4],
                           batch_size=2000, min_draws=2000, max_draws=10_000,
                           min_acceptance=0.0)
    with pytest.raises(RestrictionError, match="max_draws=10,000"):
        tiny.sample(jax.random.key(0), 1000)


def test_save_load_roundtrip_and_corruption(trained, tmp_path):
    theta, _, clf, _ = trained
    path = clf.save(tmp_path / "clf")
    header = json.loads((path / "classifier.json").read_text())
    assert header["format"] == "sbi-engine-validity-classifier" and header["threshold"] > 0
    back = ValidityClassifier.load(path)
    np.testing.assert_allclose(back.logits(theta[:500]), clf.logits(theta[:500]), rtol=1e-6,
                               atol=1e-6)
    assert back.threshold == clf.threshold and back.config == clf.config
    good = (path / "params.msgpack").read_bytes()
    (path / "params.msgpack").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit
    with pytest.raises(RestrictionError, match="params.msgpack does not match the checksum"):
        ValidityClassifier.load(path)
    header["threshold"] *= 1.5  # a header number edited by hand or by a bit flip
    (path / "classifier.json").write_text(json.dumps(header))
    with pytest.raises(RestrictionError, match="header_sha256"):
        ValidityClassifier.load(path)
    (path / "params.msgpack").write_bytes(b"garbage")
    del header["params_sha256"], header["header_sha256"]  # as written by older engines
    (path / "classifier.json").write_text(json.dumps(header))
    with pytest.raises(RestrictionError, match="params.msgpack is corrupted"):
        ValidityClassifier.load(path)
    with pytest.raises(RestrictionError, match="expected a directory"):
        ValidityClassifier.load(tmp_path / "missing")


def test_bad_inputs_name_the_field(trained):
    theta, valid, clf, _ = trained
    key = jax.random.key(0)
    with pytest.raises(ShapeError, match="valid: expected shape"):
        train_validity_classifier(key, theta, valid[:10], config=FAST)
    with pytest.raises(ShapeError, match="at least 2 valid and 2 invalid"):
        train_validity_classifier(key, theta, np.zeros(len(theta), bool), config=FAST)
    bad = theta.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ShapeError, match="theta: contains NaN"):
        train_validity_classifier(key, bad, valid, config=FAST)
    with pytest.raises(ShapeError, match=r"theta: expected shape \(n, 2\)"):
        clf.predict(np.zeros((3, 5)))
    with pytest.raises(ConfigError, match="allowed_false_negatives"):
        ClassifierConfig(allowed_false_negatives=1.0)
    with pytest.raises(ConfigError, match="hidden"):
        ClassifierConfig(hidden=())
    with pytest.raises(ShapeError, match="has dim 2, the prior 3"):
        RestrictedPrior(BoxUniform([0, 0, 0], [1, 1, 1]), clf)
    unset = ValidityClassifier(clf.config, clf.params, clf.mean, clf.std)
    with pytest.raises(ConfigError, match="no threshold"):
        unset.accept(theta[:2])
    assert choose_threshold(unset, theta[valid], allowed_false_negatives=0.0) == pytest.approx(
        float(unset.predict(theta[valid]).min()))
