"""Supervised worker processes for black-box simulators.

A black-box simulator is somebody else's code. It may raise, return garbage, hang,
or take its process down (a segfault in a C extension, the kernel's OOM killer).
:class:`WorkerPool` runs rows in spawned worker processes and supervises every task:

* an exception, a wrong shape or a non-finite output marks the row invalid, with a
  reason, and the worker goes on (:func:`run_rows`, also used in-process);
* a task that runs past ``timeout`` seconds per row has its worker killed; its rows
  are marked ``"timeout (> T s)"`` and a fresh worker takes over;
* a worker that dies marks its rows ``"worker died (SIGSEGV)"`` (or the exit code);
  a fresh worker takes over.

A task of several rows that times out or kills its worker is run again one row per
task, so only the offending rows are lost. Every row is seeded from its own key, so the
output depends neither on the number of workers nor on how rows were grouped. A batched
simulator gets one generator per batch, so its rows depend on the batches: a chunk is
always cut into the same :data:`BATCH_SPLIT` batches (:func:`batch_bounds`), in this
process and in the workers, whatever their number.

This module imports only numpy and :mod:`sbi_engine.errors`: a worker starts in about
0.1 s plus the import of the simulator function's own module.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait

import numpy as np

from sbi_engine.errors import ConfigError

__all__ = ["WorkerPool", "WorkerStartError", "run_rows"]

#: ``fn(theta (D,), nu (K,) | None, rng) -> x (X,)``, or batched ``(n, D) -> (n, X)``.
SimulatorFn = Callable[..., object]


def row_rng(key_data: np.ndarray) -> np.random.Generator:
    """The numpy generator of one row, seeded from its JAX key data ``(2,)`` uint32."""
    return np.random.default_rng(np.asarray(key_data, dtype=np.uint32).tolist())


#: A batched simulator's chunk is cut into this many batches (fewer for small chunks),
#: each seeded from its first row's key: the work workers share, with boundaries that do
#: not depend on their number.
BATCH_SPLIT = 16


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into consecutive ``[a, b)`` of ``size`` rows (the last may be short)."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def batch_bounds(n: int) -> list[tuple[int, int]]:
    """Rows ``[a, b)`` of the batches a batched simulator runs ``n`` rows in."""
    return _ranges(n, max(1, -(-n // BATCH_SPLIT)))


def run_rows(fn: SimulatorFn, batched: bool, dim_x: int, keys: np.ndarray,
             theta: np.ndarray, nu: np.ndarray | None
             ) -> tuple[np.ndarray, list[str | None]]:
    """Run rows of a black-box simulator in this process, capturing failures.

    A batched ``fn`` runs in the batches of :func:`batch_bounds`, as in a
    :class:`WorkerPool`, so both give the same rows.

    Args:
        fn, batched: the simulator function and whether it takes whole batches.
        dim_x: the output size ``X``.
        keys: ``(n, 2)`` uint32 row keys; theta: ``(n, D)``; nu: ``(n, K)`` or None.

    Returns:
        ``x (n, X)`` float32 with NaN rows for failures, and per row ``None`` or a
        short reason (exception type, wrong shape, non-finite output).
    """
    if not batched:
        return run_task(fn, batched, dim_x, keys, theta, nu)
    n = theta.shape[0]
    out = np.full((n, dim_x), np.nan, dtype=np.float32)
    reasons: list[str | None] = [None] * n
    for a, b in batch_bounds(n):
        out[a:b], reasons[a:b] = run_task(fn, batched, dim_x, keys[a:b], theta[a:b],
                                          None if nu is None else nu[a:b])
    return out, reasons


def run_task(fn: SimulatorFn, batched: bool, dim_x: int, keys: np.ndarray,
             theta: np.ndarray, nu: np.ndarray | None
             ) -> tuple[np.ndarray, list[str | None]]:
    """One task's rows: a batched ``fn`` called once on all of them (one generator,
    from the first row's key), else row by row. Shapes and return value as
    :func:`run_rows`."""
    n = theta.shape[0]
    out = np.full((n, dim_x), np.nan, dtype=np.float32)
    reasons: list[str | None] = [None] * n
    if batched:
        try:
            x = np.asarray(fn(theta, nu, row_rng(keys[0])), dtype=np.float32)
        except Exception as err:  # noqa: BLE001 - a failing simulator must not kill the batch
            return out, [type(err).__name__] * n
        if x.shape != out.shape:
            return out, [f"wrong shape {x.shape}, expected {out.shape}"] * n
        out[:] = x
    else:
        for i in range(n):
            try:
                x = np.asarray(fn(theta[i], None if nu is None else nu[i], row_rng(keys[i])),
                               dtype=np.float32)
            except Exception as err:  # noqa: BLE001
                reasons[i] = type(err).__name__
                continue
            if x.shape != (dim_x,):
                reasons[i] = f"wrong shape {x.shape}, expected ({dim_x},)"
                continue
            out[i] = x
    for i in range(n):
        if reasons[i] is None and not np.all(np.isfinite(out[i])):
            reasons[i] = "non-finite output"
            out[i] = np.nan
    return out, reasons


_READY = "ready"
#: seconds a new worker may take to start (import the simulator's module) before its
#: first task's clock starts; past this it counts as a failed start.
STARTUP_SECONDS = 120.0


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the supervisor dies (even by ``kill -9``), so a
    simulation hung in C code is not left running. Elsewhere a worker ends at its next
    read from the closed pipe."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _serve(conn, fn: SimulatorFn, batched: bool, dim_x: int) -> None:
    """A worker's loop: ``(keys, theta, nu)`` in, ``(x, reasons)`` out, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    _die_with_parent()
    conn.send(_READY)  # fn is unpickled: the timeouts count from here
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(run_task(fn, batched, dim_x, *task))


def _death(code: int | None) -> str:
    if code is None:
        return "worker died"
    if code < 0:
        try:
            return f"worker died ({signal.Signals(-code).name})"
        except ValueError:
            return f"worker died (signal {-code})"
    return f"worker died (exit code {code})"


class WorkerStartError(ConfigError):
    """A worker process could not start: the simulator function cannot be loaded there."""


def _start_failure(why: str) -> WorkerStartError:
    return WorkerStartError(
        f"simulator: a worker process failed to start ({why}); workers are spawned, so the "
        "simulator function must be importable by name (a module-level function in an "
        "importable module, not a lambda or a function defined in __main__ or a notebook)")


class _Worker:
    def __init__(self, ctx, fn: SimulatorFn, batched: bool, dim_x: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, batched, dim_x), daemon=True,
                                name="sbi-engine-simulator")
        self.proc.start()
        child.close()
        self.ready = False
        self.task: tuple[int, int] | None = None  # rows [a, b) in flight
        self.deadline = math.inf

    def kill(self) -> int | None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5.0)
        self.conn.close()
        return self.proc.exitcode

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(1.0)
        self.kill()


class WorkerPool:
    """Worker processes that run black-box simulations under supervision.

    Args:
        fn: ``fn(theta (D,), nu (K,) | None, rng) -> x (X,)``, or with ``batched``
            ``fn(theta (n, D), nu (n, K) | None, rng) -> x (n, X)``. Must be picklable
            (a module-level function): workers are spawned, not forked.
        batched: whether ``fn`` takes whole batches.
        dim_x: the output size ``X``.
        workers: number of processes (started on first use, kept between calls).
        timeout: seconds allowed per simulation (a task of ``k`` rows gets ``k``
            times this), or None for no limit.

    Use as a context manager, or call :meth:`close`; a pool is reusable across calls.
    """

    def __init__(self, fn: SimulatorFn, *, batched: bool, dim_x: int, workers: int = 1,
                 timeout: float | None = None):
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
            raise ValueError(f"workers: expected an integer >= 1, got {workers!r}")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float, np.number))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
        self.fn, self.batched, self.dim_x = fn, batched, dim_x
        self.workers = int(workers)
        self.timeout = None if timeout is None else float(timeout)
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: list[_Worker] = []
        self.restarts = 0  #: workers replaced after a timeout or a death

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the idle workers (busy ones are killed when :meth:`run` unwinds)."""
        while self._idle:
            self._idle.pop().stop()

    def _start(self) -> _Worker:
        try:
            return _Worker(self._ctx, self.fn, self.batched, self.dim_x)
        except Exception as err:  # noqa: BLE001 - pickling fails in many ways
            raise _start_failure(f"{type(err).__name__}: {err}") from None

    def _tasks(self, n: int) -> list[tuple[int, int]]:
        if self.batched:
            return batch_bounds(n)  # the batches run_rows makes: the same rows
        size = 1 if self.timeout is not None else max(1, math.ceil(n / (self.workers * 4)))
        # (one row per task under a timeout: a hung row then costs one timeout)
        return _ranges(n, size)

    def run(self, keys: np.ndarray, theta: np.ndarray, nu: np.ndarray | None
            ) -> tuple[np.ndarray, list[str | None]]:
        """Run rows in the workers. Shapes and return value as :func:`run_rows`."""
        n = theta.shape[0]
        out = np.full((n, self.dim_x), np.nan, dtype=np.float32)
        reasons: list[str | None] = [None] * n
        todo = deque(self._tasks(n))
        busy: list[_Worker] = []

        def clock(w: _Worker) -> float:
            a, b = w.task
            if not w.ready:
                return time.monotonic() + STARTUP_SECONDS
            return time.monotonic() + (self.timeout * (b - a) if self.timeout else math.inf)

        def failed(task: tuple[int, int], why: str) -> None:
            a, b = task
            if b - a > 1:  # isolate the offending rows: run again one per task
                todo.extendleft((i, i + 1) for i in reversed(range(a, b)))
            else:
                reasons[a] = why

        try:
            while todo or busy:
                while todo and len(busy) < self.workers:
                    w = self._idle.pop() if self._idle else self._start()
                    a, b = w.task = todo.popleft()
                    w.conn.send((keys[a:b], theta[a:b], None if nu is None else nu[a:b]))
                    w.deadline = clock(w)
                    busy.append(w)
                wake = min(w.deadline for w in busy) - time.monotonic()
                ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                                 timeout=None if math.isinf(wake) else max(wake, 0.0)))
                for w in list(busy):
                    task = w.task
                    if w.conn in ready or w.proc.sentinel in ready:
                        try:
                            msg = w.conn.recv()
                        except (EOFError, OSError):
                            busy.remove(w)
                            code = w.kill()
                            if not w.ready:
                                raise _start_failure(_death(code)) from None
                            self.restarts += 1
                            failed(task, _death(code))
                            continue
                        if msg == _READY:
                            w.ready = True
                            w.deadline = clock(w)
                            continue
                        x, rs = msg
                        out[task[0]:task[1]], reasons[task[0]:task[1]] = x, rs
                        busy.remove(w)
                        self._idle.append(w)
                    elif time.monotonic() >= w.deadline:
                        busy.remove(w)
                        w.kill()
                        if not w.ready:
                            raise _start_failure(f"not started after {STARTUP_SECONDS:g} s")
                        self.restarts += 1
                        failed(task, f"timeout (> {self.timeout:g} s)")
        finally:
            for w in busy:  # interrupted (Ctrl-C, an error): nothing is left running
                w.kill()
        return out, reasons
