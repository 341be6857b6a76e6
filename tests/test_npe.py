"""NPE training and the Posterior: a tiny analytic problem, compile-once, NaN rows, files."""

import json

import jax
import numpy as np
import pytest

from sbi_engine import BoxUniform, ConfigError, Gaussian, ShapeError
from sbi_engine.flows import FlowConfig
from sbi_engine.npe import NPEConfig, train_npe, train_tsnpe
from sbi_engine.posterior import Posterior, PosteriorFileError, SamplingError, seal_header
from sbi_engine.programs import clear_compiled_programs

# Conjugate model: θ ~ N(0, I₂), x | θ ~ N(θ, σ² I₂)  →  θ | x ~ N(x / (1 + σ²), σ²/(1+σ²) I).
SIGMA2 = 0.25


def conjugate_data(n, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n, 2)).astype(np.float32)
    x = (theta + np.sqrt(SIGMA2) * rng.normal(size=(n, 2))).astype(np.float32)
    return theta, x


SMALL = dict(hidden=32, transforms=2, max_epochs=40, stop_after_epochs=5, batch_size=100)


@pytest.fixture(scope="module")
def trained():
    theta, x = conjugate_data(3000)
    x[:7] = np.nan  # failed simulations must be excluded, not crash training
    cfg = NPEConfig.for_estimator("maf", **SMALL)
    clear_compiled_programs()  # compiles here, whichever test trained this flow before
    return train_npe(jax.random.PRNGKey(0), theta, x, config=cfg,
                     prior=Gaussian([0.0, 0.0], np.eye(2)), progress=False)


def test_training_recovers_the_analytic_posterior(trained):
    assert trained.excluded == 7
    assert trained.compilations == 1  # one compiled epoch, reused every epoch
    assert trained.val_loss[trained.best_epoch] == min(trained.val_loss)
    x_o = np.array([0.8, -0.5], np.float32)
    s = trained.posterior.sample(jax.random.PRNGKey(1), 4000, x_o)
    post_mean = x_o / (1 + SIGMA2)
    post_std = np.sqrt(SIGMA2 / (1 + SIGMA2))
    np.testing.assert_allclose(s.mean(0), post_mean, atol=0.08)
    np.testing.assert_allclose(s.std(0), post_std, rtol=0.15)
    theta_map = trained.posterior.map(x_o, key=jax.random.PRNGKey(2))
    np.testing.assert_allclose(theta_map, post_mean, atol=0.1)
    # The MAP ascent is one compiled program per flow structure: more observations (and
    # other step sizes) do not compile it again.
    programs = trained.posterior._programs
    traces = programs.climb_traces
    both = trained.posterior.map(np.stack([x_o, -x_o]), key=jax.random.PRNGKey(5),
                                 learning_rate=2e-2)
    assert traces >= 1 and programs.climb_traces == traces
    np.testing.assert_allclose(both[1], -post_mean, atol=0.1)


def test_trainings_of_one_structure_share_the_compiled_epoch():
    """A second training with new data of the same shapes reuses the compiled epoch and
    posterior programs (the standardisation statistics are arguments) and gives exactly
    what fresh compilations give; a different structure compiles its own."""
    cfg = NPEConfig.for_estimator("maf", hidden=8, transforms=2, max_epochs=2, batch_size=100)
    theta_a, x_a = conjugate_data(600, seed=1)
    theta_b, x_b = conjugate_data(600, seed=2)
    x_b = 3.0 * x_b + 1.0  # other statistics, same shapes

    def train(theta, x, config=cfg, **kw):
        return train_npe(jax.random.PRNGKey(3), theta, x, config=config, progress=False, **kw)

    key, x_o = jax.random.PRNGKey(4), x_b[0]
    clear_compiled_programs()
    first = train(theta_a, x_a)
    assert first.compilations == 1
    first.posterior.sample(key, 50, x_o)  # the posterior programs compile for this flow
    reused = train(theta_b, x_b)
    assert reused.compilations == 0
    drawn = reused.posterior.sample(key, 50, x_o), reused.posterior.log_prob(theta_b, x_b)
    clear_compiled_programs()
    fresh = train(theta_b, x_b)
    assert fresh.compilations == 1
    assert reused.train_loss == fresh.train_loss and reused.val_loss == fresh.val_loss
    np.testing.assert_array_equal(drawn[0], fresh.posterior.sample(key, 50, x_o))
    np.testing.assert_array_equal(drawn[1], fresh.posterior.log_prob(theta_b, x_b))
    leaves = zip(jax.tree.leaves(reused.posterior.params), jax.tree.leaves(fresh.posterior.params))
    for u, v in leaves:
        np.testing.assert_array_equal(u, v)
    # Anything the traced program depends on besides arrays: a new compilation.
    assert train(theta_b, x_b, config=NPEConfig.for_estimator(
        "maf", hidden=8, transforms=2, max_epochs=2, batch_size=50)).compilations == 1
    bounded = NPEConfig.for_estimator("maf", hidden=8, transforms=2, max_epochs=2,
                                      batch_size=100, z_score_theta="transform_to_unconstrained")
    box = BoxUniform([-9.0, -9.0], [9.0, 9.0])
    assert train(theta_b, x_b, config=bounded, prior=box).compilations == 1
    assert train(theta_b, x_b, config=bounded,
                 prior=BoxUniform([-8.0, -9.0], [9.0, 9.0])).compilations == 1
    assert train(theta_b, x_b, config=bounded, prior=box).compilations == 0


def test_a_prior_without_to_dict_still_trains_with_programs_of_its_own(monkeypatch):
    def broken(self):
        raise NotImplementedError("a user's prior")

    monkeypatch.setattr(BoxUniform, "to_dict", broken)
    cfg = NPEConfig.for_estimator("maf", hidden=8, transforms=1, max_epochs=1, batch_size=100,
                                  z_score_theta="transform_to_unconstrained")
    theta, x = conjugate_data(300)
    box = BoxUniform([-9.0, -9.0], [9.0, 9.0])
    runs = [train_npe(jax.random.PRNGKey(0), theta, x, config=cfg, prior=box, progress=False)
            for _ in range(2)]
    assert [r.compilations for r in runs] == [1, 1]
    assert runs[0].val_loss == runs[1].val_loss


def test_progress_eta_counts_the_epochs_left_to_early_stopping():
    from sbi_engine.npe import _eta, _TrainState

    st = _TrainState(params=None, opt_state=None, best_params=None, best_epoch=7)
    cfg = NPEConfig(stop_after_epochs=20, max_epochs=1000)
    stamps = [0.0, 30.0, 32.0, 34.0]  # a 30 s first epoch (compilation), then 2 s epochs
    # After epoch 9 with the best at 7: it stops after epoch 27, 18 epochs from now.
    assert _eta(st, 9, cfg, stamps) == ", ETA 0:36 (18 epochs) unless val improves"
    assert _eta(st, 9, NPEConfig(stop_after_epochs=20, max_epochs=11), stamps).startswith(
        ", ETA 0:02 (1 epoch)")  # max_epochs comes first
    long = _eta(st, 9, NPEConfig(stop_after_epochs=5000), stamps)
    assert long.startswith(", ETA 2:46:36 (4998 epochs)")
    st.stop = "early_stop"
    assert _eta(st, 27, cfg, stamps) == ""


def test_loss_decreases_and_metadata(trained):
    assert trained.train_loss[-1] < trained.train_loss[0]
    s = trained.summary()
    assert s["epochs"] == trained.epochs and s["excluded_rows"] == 7


def test_batched_observations_and_log_prob(trained):
    post = trained.posterior
    xs = np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], np.float32)
    s = post.sample(jax.random.PRNGKey(0), 50, xs)
    assert s.shape == (3, 50, 2)
    lp = post.log_prob(np.zeros((4, 2)), xs[0])
    assert lp.shape == (4,) and np.isfinite(lp).all()
    lp2 = post.log_prob(np.zeros((3, 2)), xs)
    assert lp2.shape == (3,)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.array([np.nan, 0.0]), "x: contains NaN or inf"),
        (np.array([0.0, 0.0, 0.0]), "expected shape \\(2,\\)"),
        (np.array([[0.0, np.inf]]), "contains NaN or inf"),
        ("text", "numeric array"),
        (np.zeros((0, 2)), r"expected shape \(2,\) or \(m, 2\), got \(0, 2\)"),
    ],
)
def test_bad_observations_are_named(trained, x, match):
    with pytest.raises(ShapeError, match=match):
        trained.posterior.sample(jax.random.PRNGKey(0), 10, x)
    with pytest.raises(ShapeError, match=match):
        trained.posterior.map(x, key=jax.random.PRNGKey(0))


def test_a_file_is_not_a_model_and_theta_must_be_numbers(trained, tmp_path):
    from sbi_engine.posterior import load_posterior

    trained.posterior.save(tmp_path / "m")
    with pytest.raises(PosteriorFileError, match="no posterior.json"):
        load_posterior(tmp_path / "m" / "posterior.json")
    with pytest.raises(ShapeError, match="theta: expected a numeric array"):
        trained.posterior.log_prob([["a", "b"]], np.zeros(2))


def test_a_maf_file_from_before_maf_scale_loads_with_its_own_scale(trained, tmp_path):
    """Files written before FlowConfig.maf_scale existed used the identity-at-0 scale."""
    import dataclasses

    from sbi_engine.flows import build_flow

    post = trained.posterior
    legacy_flow = build_flow(dataclasses.replace(post.flow.config, maf_scale="unit_softplus"),
                             theta_dim=2, x_shape=post.x_shape,
                             standardization=post.flow.standardization)
    legacy = Posterior(legacy_flow, post.params, prior=post.prior)
    path = legacy.save(tmp_path / "legacy")
    header = json.loads((path / "posterior.json").read_text())
    del header["flow"]["maf_scale"], header["header_sha256"]  # as the old engine wrote it
    (path / "posterior.json").write_text(json.dumps(header))
    loaded = Posterior.load(path)
    assert loaded.flow.config.maf_scale == "unit_softplus"
    theta = np.array([[0.1, -0.2], [1.0, 0.5]], np.float32)
    x_o = np.array([0.3, 0.1], np.float32)
    np.testing.assert_array_equal(loaded.log_prob(theta, x_o), legacy.log_prob(theta, x_o))
    assert not np.allclose(post.log_prob(theta, x_o), legacy.log_prob(theta, x_o))


def test_save_load_round_trip_and_bad_files(trained, tmp_path):
    path = trained.posterior.save(tmp_path / "model")
    loaded = Posterior.load(path)
    x_o = np.array([0.3, 0.1], np.float32)
    a = trained.posterior.sample(jax.random.PRNGKey(5), 100, x_o)
    b = loaded.sample(jax.random.PRNGKey(5), 100, x_o)
    np.testing.assert_array_equal(a, b)
    assert loaded.metadata["best_epoch"] == trained.best_epoch
    # Saving over an existing model replaces it atomically.
    trained.posterior.save(path)
    Posterior.load(path)

    header = json.loads((path / "posterior.json").read_text())
    header["format_version"] = 7
    (path / "posterior.json").write_text(json.dumps(header))
    with pytest.raises(PosteriorFileError, match="format version 7"):
        Posterior.load(path)
    header["format_version"] = 1
    header["flow"]["hidden"] = 64  # the weights no longer fit the config
    (path / "posterior.json").write_text(json.dumps(header))
    with pytest.raises(PosteriorFileError, match="header_sha256"):  # an edit is noticed
        Posterior.load(path)
    (path / "posterior.json").write_text(json.dumps(seal_header(header)))  # a crafted one
    with pytest.raises(PosteriorFileError, match="flow.hidden = 64"):
        Posterior.load(path)
    header["flow"]["hidden"] = 16  # fits the largest dimension, not the weights
    (path / "posterior.json").write_text(json.dumps(seal_header(header)))
    with pytest.raises(PosteriorFileError, match="do not match"):
        Posterior.load(path)
    header["flow"]["hidden"] = 32
    (path / "posterior.json").write_text(json.dumps(seal_header(header)))
    data = (path / "params.msgpack").read_bytes()
    (path / "params.msgpack").write_bytes(data[: len(data) // 3])
    with pytest.raises(PosteriorFileError, match="corrupted"):
        Posterior.load(path)
    with pytest.raises(PosteriorFileError, match="expected a directory"):
        Posterior.load(tmp_path / "nothing")


def test_rejection_sampling_reports_acceptance_and_stops_when_hopeless(trained):
    post = trained.posterior
    narrow = Posterior(post.flow, post.params, prior=BoxUniform(-0.5, 0.5, dim=2))
    s = narrow.sample(jax.random.PRNGKey(0), 200, np.zeros(2))
    assert np.abs(s).max() <= 0.5 and 0 < narrow.acceptance_rate < 1
    tiny = Posterior(post.flow, post.params, prior=BoxUniform(5.0, 5.001, dim=2))
    with pytest.raises(SamplingError, match="reject_outside_prior=False"):
        tiny.sample(jax.random.PRNGKey(0), 100, np.zeros(2))
    free = tiny.sample(jax.random.PRNGKey(0), 100, np.zeros(2), reject_outside_prior=False)
    assert free.shape == (100, 2)


def test_bounded_prior_in_unconstrained_space():
    rng = np.random.default_rng(1)
    theta = rng.uniform(-1, 1, size=(2000, 2)).astype(np.float32)
    x = (theta + 0.3 * rng.normal(size=(2000, 2))).astype(np.float32)
    prior = BoxUniform(-1.0, 1.0, dim=2)
    cfg = NPEConfig(flow=FlowConfig(kind="maf", hidden=32, transforms=2,
                                    z_score_theta="transform_to_unconstrained"),
                    max_epochs=15, stop_after_epochs=5)
    res = train_npe(jax.random.PRNGKey(0), theta, x, config=cfg, prior=prior, progress=False)
    s = res.posterior.sample(jax.random.PRNGKey(0), 1000, np.array([0.9, -0.9]))
    assert res.posterior.acceptance_rate == 1.0  # all mass inside the box by construction
    assert np.abs(s).max() <= 1.0


def test_tsnpe_runs_rounds_on_a_simulator():
    from tests import toy_simulators as toys

    sim = toys.gauss()
    cfg = NPEConfig.for_estimator("maf", **SMALL)
    post, log = train_tsnpe(jax.random.PRNGKey(0), sim, np.array([0.2, 0.1]), rounds=2,
                            simulations_per_round=600, config=cfg, progress=False)
    assert [r["round"] for r in log] == [1, 2]
    assert log[1]["proposal_acceptance"] < 0.5  # round 2 draws from a truncated prior
    s = post.sample(jax.random.PRNGKey(1), 500, np.array([0.2, 0.1]))
    np.testing.assert_allclose(s.mean(0), [0.2, 0.1], atol=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"stop_after_epochs": -1}, "stop_after_epochs"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NPEConfig(**kwargs)
    with pytest.raises(ConfigError, match="unknown key 'learnig_rate'"):
        NPEConfig.from_dict({"learnig_rate": 1e-3})


def test_bad_training_data_shapes():
    with pytest.raises(ShapeError, match="x: expected shape \\(10, X...\\)"):
        train_npe(jax.random.PRNGKey(0), np.zeros((10, 2)), np.zeros((9, 2)), progress=False)
    with pytest.raises(ShapeError, match="at least 3 finite rows"):
        train_npe(jax.random.PRNGKey(0), np.zeros((3, 2)), np.full((3, 2), np.nan),
                  progress=False)
    with pytest.raises(ShapeError, match=r"at least 3 finite rows .*got 2"):
        train_npe(jax.random.PRNGKey(0), np.zeros((2, 2)), np.zeros((2, 2)), progress=False)


# -- training on a dataset in the store, streamed when larger than memory -----------------


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    from sbi_engine.simulate import simulate
    from tests.toy_simulators import gauss

    path = tmp_path_factory.mktemp("npe_stream") / "toy.zarr"
    simulate(gauss(), 2400, 3, out=path, chunk_size=300, progress=False)
    return path


def test_streamed_training_from_the_store(toy_dataset):
    from sbi_engine.npe import train_npe_from_dataset
    from sbi_engine.store import load_dataset

    ds = load_dataset(toy_dataset, lazy=True)
    invalid = ds.manifest["counts"]["invalid"]
    assert invalid > 0  # the toy simulator fails for a > 0.95
    seen = []
    cfg = NPEConfig.for_estimator("maf", hidden=16, transforms=2, max_epochs=4,
                                  stop_after_epochs=5, batch_size=100)
    clear_compiled_programs()
    result = train_npe_from_dataset(jax.random.PRNGKey(0), ds, config=cfg, progress=False,
                                    memory_rows=500, callback=lambda *a: seen.append(a))
    assert result.epochs == 4 and len(seen) == 4
    assert result.compilations == 1  # every 500-row block reuses one epoch program
    assert result.excluded == invalid
    num_train = result.posterior.metadata["num_train"]
    n_val = len(ds) - invalid - num_train
    assert 0.05 * len(ds) < n_val < 0.15 * len(ds)  # ~10 % held out
    assert all(np.isfinite(result.val_loss)) and result.val_loss[-1] < result.val_loss[0]
    s = result.posterior.sample(jax.random.PRNGKey(1), 50, np.array([0.1, -0.2], np.float32))
    assert s.shape == (50, 2) and np.isfinite(s).all()


def test_streamed_training_is_deterministic_and_in_memory_path_matches(toy_dataset):
    from sbi_engine.npe import train_npe_from_dataset
    from sbi_engine.store import load_dataset

    ds = load_dataset(toy_dataset)
    cfg = NPEConfig.for_estimator("maf", hidden=16, transforms=2, max_epochs=2, batch_size=100)
    a = train_npe_from_dataset(jax.random.PRNGKey(5), ds, config=cfg, progress=False,
                               memory_rows=600)
    b = train_npe_from_dataset(jax.random.PRNGKey(5), ds, config=cfg, progress=False,
                               memory_rows=600)
    assert a.val_loss == b.val_loss
    # A dataset that fits is read whole: the same as train_npe on its arrays.
    c = train_npe_from_dataset(jax.random.PRNGKey(5), ds, config=cfg, progress=False)
    d = train_npe(jax.random.PRNGKey(5), ds.theta, ds.x, config=cfg, prior=BoxUniform(
        [-1.0, -1.0], [1.0, 1.0]), progress=False)
    assert c.val_loss == d.val_loss


def test_in_memory_rows_above_max_device_rows_all_train(toy_dataset):
    # Above max_device_rows the arrays go to the device in equal blocks; the rows left
    # over after the last full block differ from epoch to epoch (they once never trained).
    from sbi_engine.npe import _block_source
    from sbi_engine.store import load_dataset

    theta = np.arange(1799, dtype=np.float32)[:, None]
    source = _block_source(theta, -theta, 1000, 200)
    seen = set()
    for epoch in range(4):
        blocks = list(source(jax.random.fold_in(jax.random.PRNGKey(0), epoch)))
        assert [b[0].shape for b in blocks] == [(1000, 1)]  # one compiled block size
        rows = blocks[0][0][:, 0].astype(int)
        assert len(set(rows)) == 1000 and np.array_equal(blocks[0][1][:, 0], -rows)
        seen |= set(rows)
    assert len(seen) > 1000  # a fixed block would have seen the same 1,000 rows
    source = _block_source(theta, theta, 800, 200)
    assert [b[0].shape[0] for b in source(jax.random.PRNGKey(1))] == [800, 800]

    ds = load_dataset(toy_dataset)
    cfg = NPEConfig.for_estimator("maf", hidden=16, transforms=2, max_epochs=3,
                                  batch_size=100, max_device_rows=700)
    clear_compiled_programs()
    result = train_npe(jax.random.PRNGKey(2), ds.theta, ds.x, config=cfg, progress=False)
    assert result.compilations == 1 and result.epochs == 3
    assert all(np.isfinite(result.val_loss))


def test_streamed_training_reports_a_corrupted_chunk(toy_dataset, tmp_path):
    import shutil

    from sbi_engine.errors import DatasetError
    from sbi_engine.npe import train_npe_from_dataset

    broken = tmp_path / "broken.zarr"
    shutil.copytree(toy_dataset, broken)
    data_files = sorted(p for p in (broken / "x").rglob("*") if p.is_file()
                        and not p.name.startswith(("zarr", ".")))
    target = data_files[len(data_files) // 2]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="chunk"):
        train_npe_from_dataset(jax.random.PRNGKey(0), broken, progress=False, memory_rows=500,
                               config=NPEConfig.for_estimator("maf", max_epochs=1))
