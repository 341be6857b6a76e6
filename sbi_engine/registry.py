"""Name → factory registries with entry-point plug-ins (simulators, event generators).

A registry maps lowercase names to factories (zero-or-more-keyword callables returning
an instance of the registry's base class) or to ready instances. Names come from
in-process registration and from an ``importlib.metadata`` entry-point group, so a
third-party package registers with two lines of its ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sbi_engine.errors import ConfigError, SbiEngineError, UnknownSimulatorError

__all__ = ["Registry"]

T = TypeVar("T")
NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")


class Registry(Generic[T]):
    """A registry of factories for instances of ``base``.

    Args:
        kind: what is registered, for messages (``"simulator"``).
        group: the entry-point group searched for plug-ins.
        base: the class every built object must be an instance of.
    """

    def __init__(self, kind: str, group: str, base: type[T]):
        self.kind, self.group, self.base = kind, group, base
        self.entries: dict[str, Callable[..., T] | T] = {}

    def register(self, name: str, factory: Callable[..., T] | T, *,
                 overwrite: bool = False) -> None:
        """Register a factory (or instance) under a lowercase ``name``."""
        key = name.lower()
        if not NAME_RE.match(key):
            raise ConfigError(f"{self.kind} name: expected lowercase [a-z0-9_-], got {name!r}")
        if key in self.entries and not overwrite:
            raise ConfigError(f"{self.kind} {key!r} is already registered (pass overwrite=True)")
        self.entries[key] = factory

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        eps = importlib.metadata.entry_points(group=self.group)
        return {ep.name.lower(): ep for ep in eps}

    def names(self) -> list[str]:
        """All names, registered in-process and through entry points, sorted."""
        return sorted(set(self.entries) | set(self._entry_points()))

    def get(self, name: str, **kwargs: Any) -> T:
        """Build the object registered as ``name`` (case-insensitive); kwargs go to the factory.

        Raises:
            UnknownSimulatorError: unknown name (listing the known ones), a plug-in that
                fails to import, or a factory returning the wrong type.
            ConfigError: options the factory does not accept.
        """
        key = str(name).lower()
        target = self.entries.get(key)
        if target is None:
            ep = self._entry_points().get(key)
            if ep is None:
                known = ", ".join(self.names()) or "(none)"
                raise UnknownSimulatorError(f"unknown {self.kind} {name!r}; known: {known}")
            try:
                target = ep.load()
            except Exception as err:
                raise UnknownSimulatorError(
                    f"{self.kind} {name!r}: plug-in {ep.value!r} failed to load: "
                    f"{type(err).__name__}: {err}") from err
        if isinstance(target, self.base):
            if kwargs:
                raise ConfigError(f"{self.kind} {name!r} takes no options, got {sorted(kwargs)}")
            return target
        try:
            obj = target(**kwargs)
        except SbiEngineError:
            raise
        except (TypeError, ValueError) as err:
            # a factory refusing an option value (noise_std=-1) or an unknown option
            if kwargs and (isinstance(err, ValueError) or "argument" in str(err)):
                raise ConfigError(f"{self.kind} {name!r}: bad options {sorted(kwargs)}: "
                                  f"{err}") from err
            raise
        if not isinstance(obj, self.base):
            raise UnknownSimulatorError(f"{self.kind} {name!r}: factory returned "
                                        f"{type(obj).__name__}, not a {self.base.__name__}")
        return obj
