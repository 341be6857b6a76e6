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

:func:`enable_compile_cache` keeps compiled programs on disk for later processes (JAX's
persistent compilation cache). XLA compilation is most of a short job's fixed cost:
about 7 s of the 8–10 s a 2-D NSF training spends before its first epoch on the 2-core
CI machine, 6 s of a pyloric simulation run. The ``sbi-engine`` command turns it on by default
(``--compile-cache``, ``--no-compile-cache``, ``$SBI_ENGINE_COMPILE_CACHE``); the library
leaves it off, since it is process-wide state.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from sbi_engine.errors import ConfigError, SbiEngineError

__all__ = ["COMPILE_CACHE_ENV", "add_pool_arguments", "apply_pool_arguments",
           "cpu_pool_threads", "default_compile_cache_dir", "enable_compile_cache",
           "limit_cpu_threads"]

#: Environment variable the ``sbi-engine`` command reads: the compile cache's directory,
#: or ``off``.
COMPILE_CACHE_ENV = "SBI_ENGINE_COMPILE_CACHE"

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


def default_compile_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sbi-engine/xla``, or ``~/.cache/sbi-engine/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sbi-engine" / "xla"


def _cache_fixed() -> bool:
    """Whether this process has already decided to use (or not) the persistent cache.

    JAX decides at its first compilation and ignores later changes of the directory."""
    if "jax" not in sys.modules:
        return False
    from jax._src import compilation_cache

    return bool(getattr(compilation_cache, "_cache_checked", False))


def enable_compile_cache(path: str | os.PathLike, *, max_bytes: int = 1 << 30) -> Path:
    """Keep this process's compiled XLA programs in ``path`` and reuse them from there.

    Turns on JAX's persistent compilation cache for every program (no minimum compile
    time), bounded to ``max_bytes`` (least recently used entries go first), for this
    process and, through the ``JAX_COMPILATION_*`` environment variables, the processes it
    starts (Dask workers). A program compiled once, by any process with the same JAX
    version, XLA flags and device, then loads in milliseconds: a 2-D NSF training's
    start-up falls from 8–10 s to 2–3 s, and results do not change. Entries are XLA's
    serialised executables (no pickle); an unreadable entry is recompiled with a
    warning, never an error.

    Args:
        path: the cache directory; created if missing.
        max_bytes: the cache's size bound, at least 1 MiB.

    Returns:
        The directory, absolute.

    Raises:
        ConfigError: ``max_bytes`` below 1 MiB.
        SbiEngineError: the directory cannot be created or written, or this process has
            already compiled a program (JAX fixes its cache at the first compilation:
            call this first).
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1 << 20:
        raise ConfigError(f"compile cache max_bytes: expected an integer of at least "
                          f"1 MiB (1048576), got {max_bytes!r}")
    path = Path(path).expanduser().absolute()
    if _cache_fixed():
        import jax

        if jax.config.jax_compilation_cache_dir == str(path):
            return path  # already on, here
        raise SbiEngineError(
            "enable_compile_cache must run before JAX's first compilation: this process "
            "has already compiled a program, with the cache off or elsewhere (call it at "
            "the top of the script, or set JAX_COMPILATION_CACHE_DIR before starting Python)")
    try:
        import filelock  # noqa: F401  (JAX needs it to bound the cache's size)
    except ImportError:
        raise SbiEngineError("the compile cache needs the filelock package "
                             "(pip install filelock)") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise SbiEngineError(f"compile cache {path}: cannot write there "
                             f"({err.strerror or err})") from None
    settings = {"jax_compilation_cache_dir": str(path),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_compilation_cache_max_size": max_bytes}
    for name, value in settings.items():
        # JAX reads these variables when it is imported, here or in the processes this
        # one starts; a command that never imports JAX does not pay for importing it.
        os.environ[name.upper()] = str(value)
        if "jax" in sys.modules:
            sys.modules["jax"].config.update(name, value)
    return path


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
