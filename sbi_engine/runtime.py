"""The number of threads XLA's CPU runtime runs programs on.

XLA's CPU runtime executes a compiled program as a graph of kernels ("thunks") and
hands kernels that are ready at the same time to an intra-op thread pool, which has one
thread per usable core. For the small kernels of a flow's training step (matrices of
200 × 50) that concurrency does not pay: the pool's threads take turns on consecutive
kernels, every hand-off wakes a thread on another core and moves the working set to
that core's cache, and the waiting thread spins. On the 2-core CI machine a 2-D NSF's
epoch runs 15–35 % faster with a pool of one thread (``experiments/bench_train_speed.py``
measures it side by side with ``--jax-threads``), and its process CPU time equals its
wall time instead of 1.3× it.

JAX has no option for that pool's size: the runtime reads it once, when JAX creates its
CPU client, from the process's CPU affinity (the number of cores it may run on).
:func:`limit_cpu_threads` creates the client while the process is restricted to ``n``
cores and then gives every thread its full affinity back, so only the pool's size
changes: XLA still compiles on every core, and nothing is pinned. Call it before the
first JAX computation. It suits small models trained on the CPU; a large vmapped
simulator or a big batch wants every core, which is the default. Linux only.
"""

from __future__ import annotations

import os

from sbi_engine.errors import ConfigError, SbiEngineError

__all__ = ["add_pool_arguments", "apply_pool_arguments", "cpu_pool_threads",
           "limit_cpu_threads"]

_POOL: int | None = None  # what limit_cpu_threads set


def _backends_started() -> bool:
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", {}))


def _restore_affinity(cpus: set[int]) -> None:
    """Give every thread of this process the affinity ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (OSError, ValueError):  # the thread has exited meanwhile
            pass


def limit_cpu_threads(n: int = 1) -> int:
    """Start JAX's CPU backend with an intra-op pool of ``n`` threads.

    Args:
        n: pool threads, at least 1. With ``n`` at or above the number of usable cores
            the backend starts as usual.

    Returns:
        The pool's thread count.

    Raises:
        ConfigError: ``n`` is not a positive integer.
        SbiEngineError: JAX's backends have already started (the first array or
            computation starts them), or the platform cannot set a CPU affinity.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"cpu threads: expected a positive integer, got {n!r}")
    if _backends_started():
        raise SbiEngineError(
            "limit_cpu_threads must run before JAX's first computation: its CPU backend "
            "has already started with one pool thread per core (call it at the top of the "
            "script, or use `sbi-engine --cpu-threads N`)")
    if not hasattr(os, "sched_setaffinity"):
        raise SbiEngineError("limit_cpu_threads needs os.sched_setaffinity (Linux); "
                             "this platform has none")
    import jax

    global _POOL
    cpus = os.sched_getaffinity(0)
    if n >= len(cpus):
        jax.devices()
        _POOL = len(cpus)
        return _POOL
    os.sched_setaffinity(0, set(sorted(cpus)[:n]))
    try:
        jax.devices()  # creates the backends; the CPU pool takes its size from the affinity
    finally:
        _restore_affinity(cpus)
    _POOL = n
    return n


def cpu_pool_threads() -> str:
    """How many threads XLA's CPU pool has, for reports: a count, or ``"one per core"``."""
    return str(_POOL) if _POOL is not None else "one per core"


def add_pool_arguments(parser, *, threads_all_help: str) -> None:
    """Add the benchmarks' ``--threads-all`` and ``--xla-pool N`` to an argparse parser.

    ``--threads-all`` is read from ``sys.argv`` by the scripts before JAX is imported
    (it decides the XLA kernel flags); :func:`apply_pool_arguments` applies the pool.
    """
    parser.add_argument("--threads-all", action="store_true", help=threads_all_help)
    parser.add_argument("--xla-pool", type=int, default=1,
                        help="threads in XLA's CPU runtime pool (default 1, so XLA runs on "
                             "one thread; 0: one per core, the runtime's default; see "
                             "sbi_engine.runtime)")


def apply_pool_arguments(args) -> None:
    """:func:`limit_cpu_threads` to ``args.xla_pool`` unless ``--threads-all`` or ``0``."""
    if not args.threads_all and args.xla_pool:
        limit_cpu_threads(args.xla_pool)
