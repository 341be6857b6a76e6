"""Ctrl-C is never lost: a KeyboardInterrupt swallowed below still stops the run at the
next chunk, epoch or stage boundary (:mod:`sbi_engine.interrupt`)."""

from __future__ import annotations

import gc
import os
import signal
import sys

import jax
import numpy as np
import pytest

from sbi_engine.interrupt import ctrl_c_latch
from sbi_engine.npe import NPEConfig, train_npe


class _SigintOnCollect:
    """Sends SIGINT from ``__del__``, where Python can only print and drop the exception
    (as with JAX's ``_xla_gc_callback``, the place the real losses were seen)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)


def test_latch_reraises_a_swallowed_ctrl_c_quietly_and_restores_the_handler():
    seen_by_hook = []
    hook = seen_by_hook.append
    old_hook = sys.unraisablehook
    sys.unraisablehook = hook
    try:
        with ctrl_c_latch() as interrupted, ctrl_c_latch() as inner:
            interrupted()  # nothing yet
            obj = _SigintOnCollect()
            del obj
            gc.collect()
            with pytest.raises(KeyboardInterrupt):
                inner()  # nested latches share the record
            with pytest.raises(KeyboardInterrupt):
                interrupted()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert sys.unraisablehook is hook
        assert seen_by_hook == []  # the "Exception ignored" traceback was not printed
        with ctrl_c_latch() as interrupted:
            interrupted()  # a new latch starts clean
    finally:
        sys.unraisablehook = old_hook


def test_latch_leaves_a_callers_own_handler_alone():
    calls = []
    old = signal.signal(signal.SIGINT, lambda *a: calls.append(a))
    try:
        with ctrl_c_latch() as interrupted:
            os.kill(os.getpid(), signal.SIGINT)
            interrupted()
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert len(calls) == 1
    finally:
        signal.signal(signal.SIGINT, old)


def test_training_stops_after_the_epoch_whose_ctrl_c_was_swallowed():
    rng = np.random.default_rng(0)
    theta = rng.uniform(-1, 1, size=(256, 2)).astype(np.float32)
    x = (theta + 0.1 * rng.normal(size=theta.shape)).astype(np.float32)
    epochs = []

    def careless(epoch, train, val):
        epochs.append(epoch)
        if epoch == 1:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(10**6):  # the handler runs between bytecodes
                    pass
            except KeyboardInterrupt:
                pass

    cfg = NPEConfig.for_estimator("maf", hidden=8, transforms=1, max_epochs=10)
    with pytest.raises(KeyboardInterrupt):
        train_npe(jax.random.PRNGKey(0), theta, x, config=cfg, progress=False,
                  callback=careless)
    assert epochs == [0, 1]
