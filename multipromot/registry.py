"""One small registry for everything the package looks up by name.

Tasks, templates, metrics, post-processing rules, data generators, catalogue files and built-in
models each live in a :class:`Registry`: registering a taken name is an error unless the caller
asks to replace it, an unknown name is a one-line :class:`~multipromot.errors.UserError` with the
closest names as a hint, and a test can reset a registry to the package's own entries (the
built-ins) so that what it registered does not leak into the next test.

Layer 0: this module imports only :mod:`multipromot.errors` and the standard library.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from multipromot.errors import UserError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, with a did-you-mean for unknown names.

    Args:
        kind: what an entry is, for messages (``"task"``, ``"metric"``, ``"built-in model"``).
        builtins: entries registered at once and kept by :meth:`reset`.
        suggestions: how many close names an unknown-name error offers at most.
    """

    def __init__(self, kind: str, builtins: Mapping[str, T] | None = None, *, suggestions: int = 3):
        self.kind = kind
        self.suggestions = suggestions
        self._entries: dict[str, T] = dict(builtins or {})
        self._builtins: dict[str, T] = dict(self._entries)

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``name``.

        Registering the same (or an equal) entry again is allowed: module reloads and
        idempotent setup functions do that.

        Args:
            name: the name lookups use.
            entry: the value.
            replace: allow replacing a different entry registered under ``name``.

        Returns:
            ``entry``.

        Raises:
            UserError: another entry is registered under ``name`` and ``replace`` is False.
        """
        if name in self._entries and not replace:
            current = self._entries[name]
            if current is not entry and current != entry:
                raise UserError(f"{self.kind} {name!r} is already registered", key=name)
        self._entries[name] = entry
        return entry

    def lookup(
        self, name: str, *, file: str | os.PathLike | None = None, key: str | None = None
    ) -> T:
        """The entry registered under ``name``.

        Args:
            name: the name.
            file: where the name was written (for the error message).
            key: its key there.

        Raises:
            UserError: no such entry (see :meth:`unknown`).
        """
        if name in self._entries:
            return self._entries[name]
        raise self.unknown(name, file=file, key=key)

    def unknown(
        self,
        name: str,
        *,
        file: str | os.PathLike | None = None,
        key: str | None = None,
        also: Iterable[str] = (),
    ) -> UserError:
        """The error for a name nobody registered: ``unknown KIND 'NAME'; did you mean A, B?``,
        or ``unknown KIND 'NAME' (known: ...)`` when no name is close.

        Args:
            name: the unknown name.
            file: where it was written.
            key: its key there.
            also: more names the caller accepts besides the registered ones (catalogue tasks).
        """
        known = sorted(set(self._entries) | set(also))
        close = difflib.get_close_matches(str(name), known, n=self.suggestions)
        if close:
            hint = f"; did you mean {', '.join(close)}?"
        else:
            hint = f" (known: {', '.join(known) or 'none'})"
        return UserError(f"unknown {self.kind} {name!r}{hint}", file=file, key=key)

    def get(self, name: str, default: T | None = None) -> T | None:
        """The entry under ``name``, or ``default``."""
        return self._entries.get(name, default)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def values(self) -> list[T]:
        """The entries, in registration order."""
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def mark_builtins(self) -> None:
        """Make the current entries the built-ins that :meth:`reset` restores (called once the
        package has registered its own entries)."""
        self._builtins = dict(self._entries)

    def reset(self) -> None:
        """Forget every entry but the built-ins (for tests)."""
        self._entries = dict(self._builtins)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
