"""Prompt templates: promptsource-style Jinja ``input ||| target``, rendered in a sandbox.

A template turns one raw example (a dict of dataset fields) into the strings the model sees:
the text before ``|||`` is the input, the text after it the target. ``answer_choices`` is
itself a Jinja string whose rendering, split on ``|||``, is the list a template indexes as
``answer_choices[label]`` (the promptsource convention, so promptsource's 2,000 templates work
unchanged).

Templates come from YAML files that someone else may have written, so they render in Jinja's
immutable sandbox with strict undefined: no attribute that starts with ``_`` (no ``__class__``,
``__globals__``, hence no ``os`` and no file system), no mutation of lists or dicts, bounded
``range``/``*``/``**``, and a field the example lacks is an error rather than an empty string.
Every failure is a one-line :class:`~multipromot.errors.UserError` naming the template.

Each render is also metered, so that a hostile or mistaken template cannot hang or exhaust
memory: the rendered text is streamed and stopped past ``_MAX_CHARS`` characters, every loop
iteration and call counts against ``_MAX_STEPS`` and a wall-time deadline of ``_MAX_SECONDS``,
and the operations that build one large value at once (``+``, ``~``, ``%``, ``join``,
``replace``, padding to a width, format strings with a width) are refused before they build
more than ``_MAX_CHARS`` characters. No signal or thread is involved: the checks run inside
the render itself (see :class:`_Meter`).

Where templates come from (:func:`load_template`):

- inline: ``{jinja: "...", answer_choices: "True ||| False"}``
- promptsource (installed, read offline): ``{promptsource: "super_glue/rte", name: "GPT-3 style"}``
- the catalogue, by task name: ``{catalogue: "rte"}`` or just ``"rte"``
- templates registered from Python with :func:`register_template`.

Why one module of this size: the Jinja sandbox, the Template and the three ways to name one
(inline, promptsource, catalogue) are one concept; the sandbox's limits are only safe next
to the renderer that relies on them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, meta, nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from multipromot.data.catalogue import catalogue_index
from multipromot.errors import UserError
from multipromot.registry import Registry
from multipromot.yamlio import check_keys, sub_key

__all__ = [
    "SEPARATOR",
    "FormatSignature",
    "Template",
    "compile_condition",
    "compile_value",
    "load_template",
    "register_template",
    "get_template",
    "list_templates",
    "reset_templates",
]

SEPARATOR = "|||"

# Example values may contain the separator themselves; they carry this marker while rendering
# and get their "|||" back after the split (promptsource does the same).
_PIPE_MARK = "\ue000pipe\ue000"
# Bounds on what a template may build with "*" and "**" (Jinja's sandbox bounds only range()).
_MAX_SEQUENCE = 1_000_000
_MAX_EXPONENT = 1_000
# and on the integers they may build: a bounded exponent alone does not stop ((9**999)**999)**999
# or a namespace squared in a loop, which would compute for hours
_MAX_INT_BITS = 1 << 16
_MAX_CATALOGUE_DEPTH = 4
# Per render (see _Meter). A real template renders in ~25 us with a few dozen steps, into a
# few thousand characters; these bounds are far above that and far below a hang or an OOM.
_MAX_CHARS = 10_000_000
_MAX_STEPS = 1_000_000
_MAX_SECONDS = 5.0
# Format strings whose width comes from a literal of 7+ digits or from an argument
# ('%*d', '{:{}}'), and the str methods that pad to a width.
_LITERAL_WIDTH = re.compile(r"\d{7,}")
_ARGUMENT_WIDTH = re.compile(r"%[-+ #0]*\*|\{[^{}]*\{")
_PADDING = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})
_WIDTH_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate"})
_BUILDING_FILTERS = frozenset({"format", "join", "replace"})


class _ResourceLimit(SecurityError):
    """A render went past one of the per-render bounds (time, steps, size)."""


@dataclass
class _Meter:
    """The budget of one render: loop iterations and calls done, and when it must end.

    The sandbox's hooks (calls, filters, loops, operators) tick the meter of the render in
    progress (a context variable, so concurrent renders in other threads keep their own);
    outside a render (compile-time constant folding) nothing is counted.
    """

    deadline: float
    steps: int = 0


_METER: ContextVar[_Meter | None] = ContextVar("multipromot_template_meter", default=None)


def _tick() -> None:
    meter = _METER.get()
    if meter is None:
        return
    meter.steps += 1
    if meter.steps > _MAX_STEPS:
        raise _ResourceLimit(f"more than {_MAX_STEPS:,} loop iterations and calls")
    # the clock every 64 steps: cheap, and no step takes long (the size bounds see to that)
    if meter.steps & 63 == 0 and time.monotonic() > meter.deadline:
        raise _ResourceLimit(f"took more than {_MAX_SECONDS:g} s")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple | dict) else 0


def _check_size(value: Any, what: str) -> Any:
    if _size(value) > _MAX_CHARS:
        raise _ResourceLimit(f"{what} built more than {_MAX_CHARS:,} characters or items")
    return value


def _check_widths(args: Iterable[Any], what: str) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > _MAX_SEQUENCE:
            raise _ResourceLimit(f"{what} with a width of {arg} (at most {_MAX_SEQUENCE:,})")


def _check_format(fmt: Any, args: Iterable[Any], what: str) -> None:
    """A format string may not pad to a huge width ('%0999999999d', '{:>{}}' with 10**9)."""
    if not isinstance(fmt, str):
        return
    if _LITERAL_WIDTH.search(fmt):
        raise _ResourceLimit(f"{what} with a format width of 7 or more digits")
    if _ARGUMENT_WIDTH.search(fmt):
        _check_widths(args, what)


def _check_join(separator: Any, items: list, what: str) -> None:
    total = sum(len(str(item)) for item in items) + len(items) * _size(separator)
    if total > _MAX_CHARS:
        raise _ResourceLimit(f"{what} would build more than {_MAX_CHARS:,} characters")


def _check_replace(text: Any, old: Any, new: Any, what: str) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        grows = (text.count(old) if old else len(text) + 1) * max(0, len(new) - len(old))
        if len(text) + grows > _MAX_CHARS:
            raise _ResourceLimit(f"{what} would build more than {_MAX_CHARS:,} characters")


def _check_call(obj: Any, args: tuple, kwargs: dict) -> None:
    """Bounds for the str methods that build one large string at once."""
    method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    text, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(text, str):
        return
    values = [*args, *kwargs.values()]
    if name in _PADDING:
        _check_widths(values, f"str.{name}")
    elif name in ("format", "format_map"):
        nested = [v for arg in values if isinstance(arg, Mapping) for v in arg.values()]
        _check_format(text, values + nested, f"str.{name}")
    elif name == "join" and args:
        _check_join(text, list(args[0]), "str.join")
    elif name == "replace" and len(args) >= 2:
        _check_replace(text, args[0], args[1], "str.replace")


def _metered_filter(name: str, function: Callable) -> Callable:
    """A filter that can build a large value at once (a width, a format, a join, a
    replacement): it ticks the meter, refuses huge widths, joins and replacements before it
    runs, and results over the size bound after."""
    skip = 1 if hasattr(function, "jinja_pass_arg") else 0  # Jinja passes a context first

    @functools.wraps(function)  # keeps Jinja's pass_context/pass_eval_context marks
    def filtered(*args, **kwargs):
        _tick()
        head, value, rest = args[:skip], args[skip] if len(args) > skip else None, args[skip + 1 :]
        options = [*rest, *kwargs.values()]
        what = f"the {name} filter"
        if name in _WIDTH_FILTERS:
            _check_widths(options, what)
        elif name == "format":
            _check_format(value, options, what)
        elif name == "join" and value is not None:
            value = list(value)  # may be a generator: read it once, check it, join it
            _check_join(rest[0] if rest else kwargs.get("d", ""), value, what)
            args = (*head, value, *rest)
        elif name == "replace" and len(rest) >= 2:
            _check_replace(str(value), str(rest[0]), str(rest[1]), what)
        return _check_size(function(*args, **kwargs), what)

    return filtered


def _metered_loop(iterable: Any) -> Any:
    """A for loop's iterable, ticking the meter at every item (an empty nested loop outputs
    nothing, so only this sees it)."""
    for item in iterable:
        _tick()
        yield item


def _metered_concat(*pieces: Any) -> str:
    """``a ~ b``, refused before it builds more than the size bound."""
    texts = [str(piece) for piece in pieces]
    if sum(len(t) for t in texts) > _MAX_CHARS:
        raise _ResourceLimit(f"'~' would build more than {_MAX_CHARS:,} characters")
    return "".join(texts)


class _Metering(NodeTransformer):
    """Routes every for loop's iterable and every ``~`` through the meter (at compile time,
    so templates pay only for the loops and concatenations they have)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Call(
            nodes.ImportedName(_LOOP), [node.iter], [], None, None, lineno=node.lineno
        )
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return nodes.Call(
            nodes.ImportedName(_CONCAT), node.nodes, [], None, None, lineno=node.lineno
        )


# Imported by the compiled template itself: no name a template (or an example field) can see.
_LOOP = f"{__name__}._metered_loop"
_CONCAT = f"{__name__}._metered_concat"


@dataclass(frozen=True)
class FormatSignature:
    """What a task's inputs look like, for the router.

    Attributes:
        pieces: the literal text of the template's input side that every input contains, in
            order (whitespace-normalised; empty and punctuation-only fragments dropped).
        answers: the fixed answer set, or None when the answers depend on the example.
    """

    pieces: tuple[str, ...]
    answers: tuple[str, ...] | None


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus bounds on ``*`` and ``**`` (a template must not be able
    to allocate gigabytes with ``'a' * 10**10``)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: D102, N805 (Jinja hook)
        _tick()
        _check_call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        return _check_size(result, "a call")

    def call_binop(self, context, operator, left, right):  # noqa: D102 (Jinja hook)
        _tick()
        if operator == "+" and _size(left) + _size(right) > _MAX_CHARS:
            raise _ResourceLimit(f"'+' would build more than {_MAX_CHARS:,} characters or items")
        if operator == "%":
            _check_format(left, right if isinstance(right, tuple) else (right,), "'%'")
            return _check_size(super().call_binop(context, operator, left, right), "'%'")
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > _MAX_SEQUENCE
                ):
                    raise SecurityError(f"'*' would build more than {_MAX_SEQUENCE} items")
            if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise SecurityError(f"'*' would build an integer of more than {_MAX_INT_BITS} bits")
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
                raise SecurityError(f"exponent above {_MAX_EXPONENT}")
            if ints and right > 0 and left.bit_length() * right > _MAX_INT_BITS:
                raise SecurityError(
                    f"'**' would build an integer of more than {_MAX_INT_BITS} bits"
                )
        return super().call_binop(context, operator, left, right)


def _choice(values: Any) -> Any:
    """promptsource's ``choice`` filter, made deterministic.

    promptsource picks at random on every call; here the pick is seeded by the options, so an
    example always renders the same way (reproducible data, exact resume).
    """
    options = list(values)
    if not options:
        raise ValueError("choice from an empty list")
    digest = hashlib.sha256(repr(options).encode("utf-8")).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


def _most_frequent(items: Any) -> list:
    """promptsource's ``most_frequent`` filter: the items that occur most often."""
    counts = Counter(items).most_common()
    if not counts:
        return []
    top = counts[0][1]
    return [item for item, n in counts if n == top]


def _make_env() -> _Sandbox:
    env = _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    # The filters and globals promptsource templates use; "highlight" only colours the
    # promptsource app's display, so it is the identity here.
    env.filters.update(choice=_choice, most_frequent=_most_frequent, highlight=lambda x: x)
    # only the filters that can build a large value at once pay for the checks; the others
    # (lower, trim, list, ...) build at most what they are given
    for name in _WIDTH_FILTERS | _BUILDING_FILTERS:
        env.filters[name] = _metered_filter(name, env.filters[name])
    env.globals.update(zip=zip)
    return env


_ENV = _make_env()


def _protect(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(SEPARATOR, _PIPE_MARK)
    if isinstance(value, Mapping):
        return {k: _protect(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_protect(v) for v in value]
    return value


def _unprotect(text: str) -> str:
    return text.replace(_PIPE_MARK, SEPARATOR)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _has_word(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _input_pieces(ast: nodes.Template) -> tuple[str, ...]:
    """Literal text of the input side that is always rendered, in order.

    Only top-level text counts: text inside ``{% if %}`` or ``{% for %}`` may not appear in a
    given input, so the router could not rely on it.
    """
    raw: list[str] = []
    for node in ast.body:
        if isinstance(node, nodes.Output):
            for child in node.nodes:
                if isinstance(child, nodes.TemplateData):
                    before, sep, _ = child.data.partition(SEPARATOR)
                    raw.append(before)
                    if sep:
                        return _clean_pieces(raw)
                else:
                    raw.append("")  # a variable: ends one literal piece
        elif any(SEPARATOR in d.data for d in node.find_all(nodes.TemplateData)):
            break  # the separator sits inside a block: the input side ends here
    return _clean_pieces(raw)


def _clean_pieces(raw: list[str]) -> tuple[str, ...]:
    pieces = (_normalise(text) for text in raw)
    return tuple(p for p in pieces if p and _has_word(p))


_UNDEFINED_NAME = re.compile(r"^'([^']*)' is undefined$")
_UNDEFINED_ATTR = re.compile(r"has no attribute '([^']*)'")


class _Choices(list):
    """The answer choices a template sees: a negative index is an error, not the last choice
    (``answer_choices[label]`` with SuperGLUE's label -1 would render the last answer)."""

    def __getitem__(self, index):
        if isinstance(index, int) and index < 0:
            # not an IndexError: Jinja would turn that into an undefined value
            raise ValueError(f"answer_choices[{index}]: a negative label (no gold label)")
        return super().__getitem__(index)


class Template:
    """A promptsource-style template: Jinja that renders ``input ||| target``.

    Args:
        id: a stable name for the template (recorded in bank entries).
        jinja: the template text; it must contain ``|||`` between input and target.
        answer_choices: optional Jinja string rendering to ``"a ||| b ||| ..."``; the template
            sees the list as ``answer_choices``.
        file: the file the template came from (for error messages).
        key: its key inside that file, e.g. ``tasks[2].template``.

    Raises:
        UserError: a Jinja syntax error, no ``|||`` or nothing after it, or ``answer_choices``
            used but not given.
    """

    def __init__(
        self,
        id: str,
        jinja: str,
        answer_choices: str | None = None,
        *,
        file: str | os.PathLike | None = None,
        key: str | None = None,
    ):
        self.id = id
        self.jinja = jinja
        self.answer_choices = answer_choices
        self.file = os.fspath(file) if file is not None else None
        self.key = key
        if not isinstance(jinja, str):
            self._fail(f"'jinja' must be a string, not {type(jinja).__name__}")
        if answer_choices is not None and not isinstance(answer_choices, str):
            self._fail(f"'answer_choices' must be a string, not {type(answer_choices).__name__}")
        if SEPARATOR not in jinja:
            self._fail(f"has no {SEPARATOR!r} between the input and the target")
        if not jinja.rsplit(SEPARATOR, 1)[1].strip():
            self._fail(f"has an empty target after {SEPARATOR!r}: nothing to learn or score")
        self._ast = self._parse(jinja, "template")
        self._compiled = self._compile(self._ast, "template")
        self._fields = meta.find_undeclared_variables(self._ast) - set(_ENV.globals)
        self._choices = None
        self._static_answers: tuple[str, ...] | None = None
        if answer_choices is not None:
            choices_ast = self._parse(answer_choices, "answer_choices")
            self._choices = self._compile(choices_ast, "answer_choices")
            self._fields |= meta.find_undeclared_variables(choices_ast) - set(_ENV.globals)
            if not meta.find_undeclared_variables(choices_ast) - set(_ENV.globals):
                self._static_answers = tuple(self._render_choices({}))
        elif "answer_choices" in meta.find_undeclared_variables(self._ast):
            self._fail("uses answer_choices, but no answer_choices are given")

    # -- errors --------------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        raise UserError(f"template {self.id!r} {message}", file=self.file, key=self.key)

    def _parse(self, source: str, what: str) -> nodes.Template:
        try:
            return _ENV.parse(source)
        except TemplateSyntaxError as exc:
            raise UserError(
                f"template {self.id!r}: Jinja syntax error in {what} "
                f"(line {exc.lineno}): {exc.message}",
                file=self.file,
                key=self.key,
            ) from None

    def _compile(self, ast: nodes.Template, what: str):
        """Compile a parsed template, its loops and ``~`` metered; an unknown filter or test is
        one line naming it."""
        try:
            return _ENV.from_string(_Metering().visit(ast))
        except TemplateSyntaxError as exc:
            message = exc.message or str(exc)
            name = re.search(r"No (filter|test) named '([^']*)'", message)
            if name:
                known = _ENV.filters if name.group(1) == "filter" else _ENV.tests
                close = get_close_matches(name.group(2), list(known), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                message = f"unknown {name.group(1)} {name.group(2)!r} in {what}{hint}"
            else:
                message = f"{message} in {what}"
            raise UserError(
                f"template {self.id!r}: {message}", file=self.file, key=self.key
            ) from None

    def _render(self, compiled, context: dict[str, Any], what: str) -> str:
        token = _METER.set(_Meter(deadline=time.monotonic() + _MAX_SECONDS))
        try:
            return self._stream(compiled, context)
        except _ResourceLimit as exc:
            self._fail(f"was stopped in {what}: {exc} (a limit per render)")
        except SecurityError as exc:
            self._fail(
                f"was stopped by the sandbox in {what} ({exc}); templates may only read the "
                "example's fields"
            )
        except UndefinedError as exc:
            message = self._missing_message(str(exc), context, what)
            missing = sorted(self._fields - set(context))
            if message.startswith("reads an undefined value") and missing:
                # e.g. answer_choices[lable]: Jinja's message says "no element Undefined"
                fields = ", ".join(sorted(k for k in context if k != "answer_choices"))
                message = (
                    f"needs field {missing[0]!r}, which the example lacks "
                    f"(fields: {fields or 'none'})"
                )
            self._fail(message)
        except RecursionError:
            self._fail(f"recursed too deeply in {what} (a macro that calls itself?)")
        except TemplateError as exc:
            self._fail(f"failed in {what}: {exc}")
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:
            self._fail(f"failed on this example in {what}: {type(exc).__name__}: {exc}")
        except MemoryError:
            self._fail(f"ran out of memory in {what}")
        finally:
            _METER.reset(token)
        raise AssertionError("unreachable")

    @staticmethod
    def _stream(compiled, context: dict[str, Any]) -> str:
        """Render piece by piece, stopping past the size bound (a loop that prints forever
        ends here, before the text is joined)."""
        pieces, size = [], 0
        for piece in compiled.generate(context):
            size += len(piece)
            if size > _MAX_CHARS:
                raise _ResourceLimit(f"rendered more than {_MAX_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)

    @staticmethod
    def _missing_message(message: str, context: dict[str, Any], what: str) -> str:
        fields = ", ".join(sorted(k for k in context if k != "answer_choices")) or "none"
        name = _UNDEFINED_NAME.match(message)
        if name:
            return f"needs field {name.group(1)!r}, which the example lacks (fields: {fields})"
        attr = _UNDEFINED_ATTR.search(message)
        if attr:
            return f"needs key {attr.group(1)!r}, which the example lacks in {what} ({message})"
        return f"reads an undefined value in {what}: {message}"

    # -- rendering -----------------------------------------------------------------------------

    def _render_choices(self, context: dict[str, Any]) -> list[str]:
        text = self._render(self._choices, context, "answer_choices")
        return [choice.strip() for choice in text.split(SEPARATOR)]

    def _context(self, example: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(example, Mapping):
            self._fail(f"needs an example mapping, not {type(example).__name__}")
        if "answer_choices" in example:
            self._fail("cannot render an example with a field named 'answer_choices'")
        return _protect(dict(example))

    def apply(self, example: Mapping[str, Any]) -> tuple[str, str]:
        """Render one example.

        Args:
            example: the example's fields.

        Returns:
            ``(input, target)``, each stripped of surrounding whitespace.

        Raises:
            UserError: a missing field, a sandbox violation, a runtime error, or a rendering
                without exactly one ``|||``.
        """
        context = self._context(example)
        if self._choices is not None:
            context["answer_choices"] = _Choices(self._render_choices(context))
        parts = self._render(self._compiled, context, "template").split(SEPARATOR)
        if len(parts) != 2:
            self._fail(
                f"must render exactly one {SEPARATOR!r} between input and target, "
                f"rendered {len(parts) - 1}"
            )
        source, target = (_unprotect(part).strip() for part in parts)
        return source, target

    def answers(self, example: Mapping[str, Any] | None = None) -> list[str] | None:
        """The answer choices, for one example or (without one) the fixed set.

        Args:
            example: an example; None asks for the answer set shared by every example.

        Returns:
            The choices, or None when the template has none, or (without an example) when they
            depend on the example.

        Raises:
            UserError: rendering the choices for ``example`` failed.
        """
        if self._choices is None:
            return None
        if example is None:
            return list(self._static_answers) if self._static_answers is not None else None
        return [_unprotect(c) for c in self._render_choices(self._context(example))]

    @property
    def signature(self) -> FormatSignature:
        """The format the router matches inputs against (see :class:`FormatSignature`)."""
        return FormatSignature(pieces=_input_pieces(self._ast), answers=self._static_answers)

    def to_dict(self) -> dict[str, Any]:
        """Plain data describing the template (for bank metadata and reports).

        Returns:
            ``{"id", "jinja", "answer_choices"}``.
        """
        return {"id": self.id, "jinja": self.jinja, "answer_choices": self.answer_choices}

    # Compiled Jinja does not pickle; rebuild it from the text (DataLoader workers, spawn).
    def __getstate__(self) -> dict[str, Any]:
        return {**self.to_dict(), "file": self.file, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["id"],
            state["jinja"],
            state["answer_choices"],
            file=state["file"],
            key=state["key"],
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Template):
            return NotImplemented
        return (self.id, self.jinja, self.answer_choices) == (
            other.id,
            other.jinja,
            other.answer_choices,
        )

    def __hash__(self) -> int:
        return hash((self.id, self.jinja, self.answer_choices))

    def __repr__(self) -> str:
        return f"Template(id={self.id!r}, jinja={self.jinja!r}, answer_choices={self.answer_choices!r})"


def compile_value(
    expression: str,
    *,
    convert: Callable[[Any], Any] | None = None,
    file: str | os.PathLike | None = None,
    key: str | None = None,
) -> Callable[[Mapping[str, Any]], Any]:
    """Compile a Jinja expression over an example's fields (e.g. ``answers`` or
    ``answer.aliases + answer.normalized_aliases``), sandboxed.

    Args:
        expression: the expression.
        convert: applied to the result inside the error handling (the sandbox reports an
            unsafe access only when its placeholder result is used, e.g. by ``bool``).
        file: for error messages.
        key: for error messages.

    Returns:
        ``value(example)``; it raises UserError when the expression fails on an example.

    Raises:
        UserError: the expression does not parse.
    """
    try:
        compiled = _ENV.compile_expression(expression, undefined_to_none=False)
    except TemplateSyntaxError as exc:
        raise UserError(
            f"{expression!r} is not a valid expression: {exc.message}", file=file, key=key
        ) from None

    def value(example: Mapping[str, Any]) -> Any:
        try:
            result = compiled(**example)
            return convert(result) if convert is not None else result
        except (TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as exc:
            fields = ", ".join(sorted(example)) or "none"
            raise UserError(
                f"{expression!r} failed on an example with fields {fields}: {exc}",
                file=file,
                key=key,
            ) from exc

    return value


def compile_condition(
    expression: str, *, file: str | os.PathLike | None = None, key: str | None = None
) -> Callable[[Mapping[str, Any]], bool]:
    """Compile a Jinja expression over an example's fields (e.g. ``label >= 0``), sandboxed.

    Args:
        expression: the expression.
        file: for error messages.
        key: for error messages.

    Returns:
        ``test(example) -> bool``; it raises UserError when the expression fails on an example.

    Raises:
        UserError: the expression does not parse.
    """
    return compile_value(expression, convert=bool, file=file, key=key)


# -- registry and loading ----------------------------------------------------------------------

_TEMPLATES: Registry[Template] = Registry("catalogue template")


def register_template(
    template: Template, name: str | None = None, *, replace: bool = False
) -> Template:
    """Make a template available by name (``template: NAME`` in YAML); it shadows the template
    of a catalogue task of the same name.

    Args:
        template: the template.
        name: the name to use; defaults to ``template.id``.
        replace: allow replacing another template registered under that name.

    Returns:
        The template.

    Raises:
        UserError: another template is registered under that name and ``replace`` is False.
    """
    return _TEMPLATES.register(name or template.id, template, replace=replace)


def reset_templates() -> None:
    """Forget every template registered with :func:`register_template` (for tests)."""
    _TEMPLATES.reset()


def list_templates() -> list[str]:
    """Names :func:`get_template` accepts: registered templates and catalogue tasks.

    Returns:
        Sorted names.
    """
    return sorted(set(_TEMPLATES.names()) | set(catalogue_index()))


def get_template(name: str) -> Template:
    """A registered template, or the template of the catalogue task ``name``.

    Args:
        name: a registered template name or a catalogue task name.

    Returns:
        The template.

    Raises:
        UserError: unknown name (with close matches).
    """
    return _named_template(name, file=None, key=None)


def _named_template(
    name: str, *, file: str | os.PathLike | None, key: str | None, depth: int = 0
) -> Template:
    if name in _TEMPLATES:
        return _TEMPLATES.lookup(name)
    index = catalogue_index()
    entry = index.get(name)
    if entry is None:
        raise _TEMPLATES.unknown(name, file=file, key=key, also=index)
    if depth >= _MAX_CATALOGUE_DEPTH:
        raise UserError(
            f"catalogue template {name!r} refers to other catalogue templates too deeply",
            file=entry.file,
            key=f"{entry.key}.template",
        )
    if "template" not in entry.spec:
        raise UserError(f"catalogue task {name!r} has no template", file=entry.file, key=entry.key)
    return _load(
        entry.spec["template"],
        file=entry.file,
        key=f"{entry.key}.template",
        id=name,
        depth=depth + 1,
    )


_INLINE_KEYS = {"jinja", "answer_choices", "id"}
_KIND_KEYS = {
    "jinja": _INLINE_KEYS,
    "promptsource": {"promptsource", "name"},
    "catalogue": {"catalogue"},
}


def load_template(
    spec: str | Mapping[str, Any] | Template,
    *,
    file: str | os.PathLike | None = None,
    key: str | None = None,
    id: str | None = None,
) -> Template:
    """Build a template from its YAML form.

    Args:
        spec: ``"rte"`` or ``{catalogue: "rte"}`` (a catalogue or registered template);
            ``{jinja: "...", answer_choices: "..."}`` (``answer_choices`` may also be a list);
            ``{promptsource: "super_glue/rte", name: "GPT-3 style"}``; or a Template.
        file: the YAML file the spec came from (for error messages).
        key: the spec's key in that file, e.g. ``tasks[2].template``.
        id: the id an inline template gets (default: ``inline-`` + a hash of its text).

    Returns:
        The template.

    Raises:
        UserError: a malformed spec, unknown keys, an unknown promptsource dataset or template
            name, an unknown catalogue template, or a Jinja syntax error; each names file and key.
    """
    return _load(spec, file=file, key=key, id=id, depth=0)


def _load(spec, *, file, key, id, depth) -> Template:
    if isinstance(spec, Template):
        return spec
    if isinstance(spec, str):
        return _named_template(spec, file=file, key=key, depth=depth)
    if not isinstance(spec, Mapping):
        raise UserError(
            "a template is a catalogue name, {jinja: ...}, {promptsource: ..., name: ...} or "
            f"{{catalogue: ...}}, not {type(spec).__name__}",
            file=file,
            key=key,
        )
    kinds = [kind for kind in _KIND_KEYS if kind in spec]
    if len(kinds) != 1:
        raise UserError(
            "a template needs exactly one of 'jinja', 'promptsource' or 'catalogue'"
            + (f" (got {', '.join(kinds)})" if kinds else ""),
            file=file,
            key=key,
        )
    kind = kinds[0]
    check_keys(file, key, spec, sorted(_KIND_KEYS[kind]), what=f"a {kind} template")
    builders = {
        "catalogue": lambda: _catalogue_template(spec, file=file, key=key, depth=depth),
        "promptsource": lambda: _promptsource_template(spec, file=file, key=key),
        "jinja": lambda: _inline_template(spec, file=file, key=key, id=id),
    }
    return builders[kind]()


def _catalogue_template(spec: Mapping[str, Any], *, file, key, depth: int) -> Template:
    name = spec["catalogue"]
    if not isinstance(name, str):
        raise UserError("'catalogue' must be a task name", file=file, key=sub_key(key, "catalogue"))
    return _named_template(name, file=file, key=sub_key(key, "catalogue"), depth=depth)


def _inline_template(spec: Mapping[str, Any], *, file, key, id) -> Template:
    jinja = spec["jinja"]
    if not isinstance(jinja, str):
        raise UserError("'jinja' must be a string", file=file, key=sub_key(key, "jinja"))
    choices = spec.get("answer_choices")
    if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
        choices = f" {SEPARATOR} ".join(choices)
    if choices is not None and not isinstance(choices, str):
        raise UserError(
            "'answer_choices' must be a string like 'True ||| False' or a list of strings",
            file=file,
            key=sub_key(key, "answer_choices"),
        )
    if "id" in spec:
        id = spec["id"]
        if not isinstance(id, str) or not id:
            raise UserError("'id' must be a non-empty string", file=file, key=sub_key(key, "id"))
    if id is None:
        digest = hashlib.sha256(f"{jinja}\0{choices}".encode()).hexdigest()[:10]
        id = f"inline-{digest}"
    return Template(id, jinja, choices, file=file, key=key)


def _promptsource_collection_root():
    with warnings.catch_warnings():
        # promptsource imports pkg_resources, which warns that it is deprecated.
        warnings.simplefilter("ignore")
        from promptsource import templates as ps
    return ps, Path(ps.TEMPLATES_FOLDER_PATH).resolve()


def _promptsource_template(spec: Mapping[str, Any], *, file, key) -> Template:
    dataset, name = spec["promptsource"], spec.get("name")
    if not isinstance(dataset, str) or not dataset:
        raise UserError(
            "'promptsource' must name a dataset like 'super_glue/rte'",
            file=file,
            key=sub_key(key, "promptsource"),
        )
    if not isinstance(name, str) or not name:
        raise UserError(
            "a promptsource template needs 'name' (e.g. 'GPT-3 style')",
            file=file,
            key=sub_key(key, "name"),
        )
    try:
        ps, root = _promptsource_collection_root()
    except ImportError as exc:
        raise UserError(
            "promptsource is not installed: pip install --no-deps --ignore-requires-python "
            "promptsource==0.2.3",
            file=file,
            key=key,
        ) from exc
    # Resolve inside promptsource's own folder only: a name like "../../x" must not make it
    # read YAML from elsewhere.
    folder = (root / dataset).resolve()
    if ".." in Path(dataset).parts or not folder.is_relative_to(root):
        folder = root / "__invalid__"
    if not (folder / "templates.yaml").is_file():
        known = sorted(str(p.parent.relative_to(root)) for p in root.rglob("templates.yaml"))
        close = get_close_matches(dataset, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"promptsource has no templates for {dataset!r}{hint}",
            file=file,
            key=sub_key(key, "promptsource"),
        )
    parts = dataset.split("/")
    collection = ps.DatasetTemplates(
        "/".join(parts[:-1]) if len(parts) > 1 else parts[0], parts[-1] if len(parts) > 1 else None
    )
    names = collection.all_template_names
    if name not in names:
        raise UserError(
            f"promptsource {dataset!r} has no template {name!r} (it has: {', '.join(names)})",
            file=file,
            key=sub_key(key, "name"),
        )
    found = collection[name]
    return Template(
        f"promptsource:{dataset}:{name}", found.jinja, found.answer_choices, file=file, key=key
    )
