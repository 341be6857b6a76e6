"""Compiled programs kept for the life of the process, so repeated work compiles once.

``jax.jit`` caches a compiled program per *function object* and argument shapes. The
engine builds a new flow (and new closures) for every training, so without help every
training of the same architecture would trace and compile its programs again: 2–6 s
of CPU for an NSF, often a fifth of a 10k-simulation training. A :class:`ProgramCache`
hands out one jitted function per *structure key*, a digest of everything the traced
program depends on apart from its array arguments, so the seeds of a sweep, the
trainings of an experiment and repeated runs in a notebook share one compilation.

The cache lives in memory only (JAX's persistent compilation cache is the cross-process
one: :func:`sbi_engine.runtime.enable_compile_cache`, on in the ``sbi-engine``
command). It holds at most ``size`` structures, least recently used out first;
:func:`clear_compiled_programs` empties every cache, freeing the compiled executables.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["RUN_ONCE", "ProgramCache", "clear_compiled_programs", "register_clear"]

#: XLA compiler options for programs that run once per model (parameter and optimiser
#: initialisation): backend optimisations would cost more compile time than they save.
RUN_ONCE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

_CACHES: list[ProgramCache] = []
_CLEARS: list[Callable[[], Any]] = []


class ProgramCache:
    """Least-recently-used map from a structure key to what ``make()`` built for it.

    Args:
        name: for ``repr``.
        size: structures kept.

    The value is typically a ``jax.jit``-wrapped function, or an object holding a few.
    Building is cheap (``jax.jit`` compiles lazily, on the first call), so two threads
    that miss at once may each build one; the first stored wins.
    """

    def __init__(self, name: str, size: int = 8):
        self.name, self.size = name, size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        _CACHES.append(self)

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        """The value for ``key``, built by ``make()`` if absent."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            value = self._items.setdefault(key, value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget every program in this cache."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"ProgramCache({self.name!r}, {len(self)}/{self.size})"


def register_clear(clear: Callable[[], Any]) -> Callable[[], Any]:
    """Have :func:`clear_compiled_programs` also call ``clear`` (e.g. the ``cache_clear``
    of a ``functools.lru_cache`` of jitted functions). Returns ``clear``."""
    _CLEARS.append(clear)
    return clear


def clear_compiled_programs() -> None:
    """Forget every program the engine kept; the next training compiles afresh."""
    for cache in _CACHES:
        cache.clear()
    for clear in _CLEARS:
        clear()
