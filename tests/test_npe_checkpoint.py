"""NPE checkpoints: resume after an interruption (kill -9 included) bit for bit, refuse a
damaged or foreign checkpoint, and stop a diverging training keeping the last good state."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest
from flax import serialization

from sbi_engine import npe
from sbi_engine.errors import ConfigError, ShapeError
from sbi_engine.npe import CheckpointError, NPEConfig, train_npe, train_npe_from_dataset
from sbi_engine.programs import clear_compiled_programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = NPEConfig.for_estimator("maf", hidden=8, transforms=1, max_epochs=8, batch_size=50)


def data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n, 2)).astype(np.float32)
    return theta, (theta + 0.5 * rng.normal(size=(n, 2))).astype(np.float32)


def train(checkpoint=None, *, key=0, config=CONFIG, n=400, **kwargs):
    """The tiny training every test runs (also run by the kill -9 test's subprocess)."""
    return train_npe(jax.random.PRNGKey(key), *data(n), config=config, progress=False,
                     checkpoint=checkpoint, **kwargs)


def read_checkpoint(path):
    """``(header, state)`` of a checkpoint file."""
    head, _, blob = path.read_bytes().partition(b"\n")
    return json.loads(head), serialization.msgpack_restore(blob)


def assert_same(a, b):
    np.testing.assert_array_equal(a.train_loss, b.train_loss)  # exact; NaN == NaN
    np.testing.assert_array_equal(a.val_loss, b.val_loss)
    assert (a.best_epoch, a.epochs, a.excluded) == (b.best_epoch, b.epochs, b.excluded)
    leaves_a, leaves_b = jax.tree.leaves(a.posterior.params), jax.tree.leaves(b.posterior.params)
    assert len(leaves_a) == len(leaves_b)
    assert all(np.array_equal(u, v) for u, v in zip(leaves_a, leaves_b))
    assert a.posterior.metadata == b.posterior.metadata


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run, without a checkpoint."""
    return train()


@pytest.fixture(scope="module")
def finished(reference, tmp_path_factory):
    """A checkpoint of the reference training, run to its end."""
    path = tmp_path_factory.mktemp("ckpt") / "finished.ckpt"
    assert_same(train(path), reference)
    return path


class Interrupt(Exception):
    pass


def interrupt_at(epoch):
    def callback(e, *_):
        if e == epoch:
            raise Interrupt

    return callback


@pytest.mark.parametrize("every", [1, 3])
def test_resume_after_an_interruption_matches_the_uninterrupted_run(reference, tmp_path, every):
    path = tmp_path / "run.ckpt"
    with pytest.raises(Interrupt):
        train(path, checkpoint_every=every, callback=interrupt_at(4))
    header, _ = read_checkpoint(path)
    assert header["epochs"] == (5 if every == 1 else 3) and header["stop"] is None
    seen = []
    clear_compiled_programs()  # as in a new process: the resumed run compiles once
    res = train(path, checkpoint_every=every, callback=lambda *a: seen.append(a[0]))
    assert_same(res, reference)
    assert res.resumed_from == header["epochs"] and seen == list(range(res.resumed_from, 8))
    assert res.compilations == 1 and reference.resumed_from == 0


def test_a_finished_checkpoint_returns_its_result_without_training(reference, finished):
    header, _ = read_checkpoint(finished)
    assert header["stop"] in ("early_stop", "max_epochs") and header["epochs"] == reference.epochs
    res = train(finished, callback=lambda *a: pytest.fail("trained again"))
    assert_same(res, reference)
    assert res.resumed_from == reference.epochs and res.compilations == 0


def test_kill_9_during_training_resumes_bit_for_bit(reference, tmp_path):
    path = tmp_path / "killed.ckpt"
    # Slow epochs, and the child never finishes on its own: the kill lands mid-training.
    script = ("import sys, time\n"
              "from tests.test_npe_checkpoint import train\n"
              "train(sys.argv[1], callback=lambda e, *_: time.sleep(0.2 if e < 5 else 600))\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    log = tmp_path / "child.log"
    with open(log, "wb") as out:
        child = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (path.exists() and read_checkpoint(path)[0]["epochs"] >= 2):
            assert child.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(60)
    assert child.returncode == -signal.SIGKILL
    res = train(path)
    assert 2 <= res.resumed_from <= 6
    assert_same(res, reference)


def test_a_damaged_checkpoint_is_refused_and_kept(finished, tmp_path):
    good = finished.read_bytes()
    head = good.index(b"\n") + 1
    header = json.loads(good[:head])
    cases = {
        "flipped": (good[: len(good) - 40] + bytes([good[-40] ^ 1]) + good[len(good) - 39:],
                    "does not match its checksum"),
        "truncated": (good[: head + (len(good) - head) // 2], "does not match its checksum"),
        "empty": (b"", "not an NPE training checkpoint"),
        "foreign": (b'{"format": "sbi-engine-posterior"}\n', "not an NPE training checkpoint"),
        "newer": (json.dumps({**header, "format_version": 99}).encode() + good[head - 1:],
                  "format version 99"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=match) as err:
            train(path)
        assert str(path) in str(err.value) and "remove it" in str(err.value)
        assert path.read_bytes() == content  # never deleted nor rewritten


def test_a_checkpoint_of_another_training_is_refused(finished):
    before = finished.read_bytes()
    other_lr = NPEConfig.for_estimator("maf", hidden=8, transforms=1, max_epochs=8,
                                       batch_size=50, learning_rate=1e-3)
    for kwargs, what in [({"key": 1}, "different key"), ({"n": 300}, "different data"),
                         ({"config": other_lr}, "different config")]:
        with pytest.raises(ConfigError, match=what) as err:
            train(finished, **kwargs)
        assert str(finished) in str(err.value) and "remove it" in str(err.value)
    assert finished.read_bytes() == before
    with pytest.raises(ConfigError, match="checkpoint_every"):
        train(finished, checkpoint_every=0)


def poison_from(monkeypatch, epoch):
    """Make every epoch from ``epoch`` on return NaN weights and losses."""
    real = npe._EpochRunner.epoch_and_validation
    calls = []

    def poisoned(self, *args):
        params, opt_state, loss, val = real(self, *args)
        calls.append(1)
        if len(calls) > epoch:
            nan = np.float32(np.nan)
            params, loss, val = jax.tree.map(lambda a: a * nan, params), nan, nan
        return params, opt_state, loss, val

    monkeypatch.setattr(npe._EpochRunner, "epoch_and_validation", poisoned)


def test_divergence_stops_with_a_warning_and_keeps_the_last_good_checkpoint(
        reference, tmp_path, monkeypatch):
    path = tmp_path / "diverged.ckpt"
    last_good = {}

    def callback(epoch, *_):
        if epoch == 4:
            last_good.update(read_checkpoint(path)[1])

    poison_from(monkeypatch, 5)
    with pytest.warns(RuntimeWarning, match=r"training diverged at epoch 5 \(train loss nan"):
        res = train(path, callback=callback)
    assert res.diverged_at == 5 and res.epochs == 6 and np.isnan(res.val_loss[5])
    assert res.val_loss[:5] == reference.val_loss[:5]
    assert res.best_epoch == int(np.argmin(reference.val_loss[:5]))
    header, state = read_checkpoint(path)
    assert header["stop"] == "diverged" and header["epochs"] == 6 and state["epoch"] == 5
    for name in ("params", "opt_state"):  # the state after epoch 4, finite
        leaves = jax.tree.leaves(state[name])
        assert all(np.isfinite(a).all() for a in leaves)
        assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(last_good[name])))
    best = jax.tree.leaves(state["best_params"])
    assert all(np.array_equal(a, b) for a, b in zip(best, jax.tree.leaves(res.posterior.params)))
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="diverged at epoch 5"):
        again = train(path)  # the checkpoint says it is over: the same result, no training
    assert_same(again, res)
    assert again.diverged_at == 5 and again.compilations == 0


def test_divergence_in_the_first_epoch_is_an_error(tmp_path, monkeypatch):
    poison_from(monkeypatch, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ShapeError, match="diverged at epoch 0.*never finite"):
            train(tmp_path / "c")


def test_streamed_training_resumes_bit_for_bit(tmp_path):
    from sbi_engine.simulate import simulate
    from tests.toy_simulators import gauss

    dataset = simulate(gauss(), 1200, 3, out=tmp_path / "toy.zarr", chunk_size=300,
                       progress=False).dataset
    cfg = NPEConfig.for_estimator("maf", hidden=8, transforms=1, max_epochs=3, batch_size=100)
    kw = dict(config=cfg, progress=False, memory_rows=400)
    ref = train_npe_from_dataset(jax.random.PRNGKey(0), dataset, **kw)
    path = tmp_path / "stream.ckpt"
    with pytest.raises(Interrupt):
        train_npe_from_dataset(jax.random.PRNGKey(0), dataset, checkpoint=path,
                               callback=interrupt_at(1), **kw)
    res = train_npe_from_dataset(jax.random.PRNGKey(0), dataset, checkpoint=path, **kw)
    assert res.resumed_from == 2
    assert_same(res, ref)


def test_cli_train_resumes_from_its_checkpoint_and_then_removes_it(tmp_path, capsys):
    from sbi_engine.cli import EXIT_ERROR, main
    from sbi_engine.priors import prior_from_dict
    from sbi_engine.simulate import simulate
    from sbi_engine.store import load_dataset
    from tests.toy_simulators import gauss

    data = tmp_path / "data"
    simulate(gauss(), 300, 0, out=data, progress=False)
    args = ["train", str(data), "--estimator", "maf", "--max-epochs", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "plain"), "--no-checkpoint"]) == 0
    ckpt = tmp_path / "model.checkpoint"  # the default: OUT.checkpoint
    ckpt.write_bytes(b"junk")
    assert main([*args, "--out", str(tmp_path / "model")]) == EXIT_ERROR
    assert f"checkpoint {ckpt}: not an NPE" in capsys.readouterr().err
    assert ckpt.read_bytes() == b"junk"
    ckpt.unlink()
    # An interrupted `train` with the same arguments left a checkpoint after epoch 0.
    ds = load_dataset(data)
    with pytest.raises(Interrupt):
        train_npe_from_dataset(jax.random.PRNGKey(0), ds, progress=False, checkpoint=ckpt,
                               config=NPEConfig.for_estimator("maf", max_epochs=3),
                               prior=prior_from_dict(ds.manifest["prior"]),
                               callback=interrupt_at(0))
    stale = tmp_path / ".model.checkpoint.k9x.tmp"  # a write that kill -9 cut short
    stale.write_bytes(b"partial")
    assert main([*args, "--out", str(tmp_path / "model")]) == 0
    assert f"resuming from the checkpoint {ckpt}" in capsys.readouterr().out
    assert not ckpt.exists() and not stale.exists() and data.exists()
    params = [(tmp_path / m / "params.msgpack").read_bytes() for m in ("plain", "model")]
    assert params[0] == params[1]
