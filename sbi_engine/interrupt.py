"""Ctrl-C that no layer below can lose: a latch checked at chunk, epoch and stage boundaries.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when SIGINT
arrives. In a long JAX run that is sometimes inside a finaliser or a garbage-collector
callback — JAX registers ``_xla_gc_callback`` in :data:`gc.callbacks` — and an exception
raised there is printed as "Exception ignored in ..." and dropped: the run carries on
as if the user had never pressed Ctrl-C. (Measured: about one SIGINT in eighty sent to
``sbi-engine simulate`` was lost this way before this module existed.)

:func:`ctrl_c_latch` installs a SIGINT handler that still raises at once and also
records the signal; :func:`check` raises ``KeyboardInterrupt`` again when a signal was
recorded, so loops call it at every boundary where stopping is safe (after a chunk is
written, an epoch is checkpointed, a study step or an experiment stage is recorded).
The CLI runs every command under a latch; :func:`~sbi_engine.simulate.simulate`,
NPE training and experiment runs install one themselves for callers from Python. While it is
installed, a ``KeyboardInterrupt`` that reaches :func:`sys.unraisablehook` is dropped
quietly: the latch re-raises it, so the "Exception ignored" traceback would only be
noise.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

__all__ = ["check", "ctrl_c_latch"]

_seen: list[int] = []


def _handler(signum, frame):
    _seen.append(signum)
    raise KeyboardInterrupt


def check() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived under the active latch; else nothing.

    Safe to call anywhere: without a latch (or under a caller's own handler) it does
    nothing. Long loops call it where stopping loses no work.
    """
    if _seen and signal.getsignal(signal.SIGINT) is _handler:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_latch() -> Iterator[Callable[[], None]]:
    """Within the block, a Ctrl-C raises now and again at the next ``check()``.

    Yields :func:`check`: raises ``KeyboardInterrupt`` if SIGINT arrived since the
    outermost latch was entered (whether or not the first one was swallowed). Latches
    nest (inner ones share the outer one's record). Only Python's default SIGINT handler
    on the main thread is replaced; elsewhere, or under a caller's own handler (a
    notebook's, a test runner's), ``check()`` does nothing. The default handler is
    restored on exit.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield check  # nested (ours), a caller's own handler, or not the main thread
        return
    old_hook = sys.unraisablehook

    def quiet_hook(unraisable):
        if not (_seen and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            old_hook(unraisable)

    _seen.clear()
    signal.signal(signal.SIGINT, _handler)
    sys.unraisablehook = quiet_hook
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = old_hook
        _seen.clear()
