"""Deferred imports of the package's own modules, for start-up time.

A command that needs no model (``--help``, ``mixture show``, ``bank list``, ``data check``, a
``route`` argument error) must start without importing torch, transformers, peft or datasets:
importing them takes seconds. Heavy third-party packages are imported inside the functions
that use them (with a comment); our own modules are never imported inside a function. Where a
module needs another of ours only for some of its calls, it names it here instead, at module
level, as ``"package.module:attribute"``, loaded on first use:

- the package root's public names (:func:`exports`, PEP 562);
- the command line's commands: a command imports only its own module
  (:mod:`multipromot.cli`);
- the lab's built-in models, registered before anything builds one (:class:`Deferred`).

``tests/test_architecture.py`` reads every such string as an import, so the layers and the
no-cycle rule hold for deferred imports as for the others.

Layer 0: this module imports only the standard library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["load", "Deferred", "exports"]


def load(target: str) -> Any:
    """The object a ``"package.module:attribute"`` target names (or the module itself when
    there is no ``:attribute``), importing the module on first use."""
    module, _, attribute = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


class Deferred:
    """A function of another module, imported on its first call.

    Args:
        target: ``"package.module:function"``.
    """

    def __init__(self, target: str):
        self.target = target
        self._loaded: Callable | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._loaded is None:
            self._loaded = load(self.target)
        return self._loaded(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Deferred({self.target!r})"


def exports(namespace: dict, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that loads the names of ``table`` (name ->
    ``"package.module:attribute"``) on first access and keeps them in ``namespace`` (the
    module's ``globals()``), so ``from package import Name`` works as for a plain import.

    Raises:
        AttributeError: (from the returned function) a name the table does not hold.
    """

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = load(table[name])
        namespace[name] = value
        return value

    return __getattr__
