"""Flags declared once, on the dataclass field they set.

    sparsity: float | None = flag(None, "Fraction to remove ...", panel="Pruning")

:func:`flag` returns a :func:`dataclasses.field` whose metadata carries everything the
command line needs: the option names (``--rank-ratio`` from ``rank_ratio`` unless given), the
help text, the help panel, a ``--no-x`` form for booleans, and how repeatable text becomes the
field's value. Validation stays where it was, in the dataclass's ``__post_init__``, so the
Python API and the CLI refuse the same values with the same words. ``modelshrink.cli`` builds
every command's options from these declarations; nothing else lists flags.

This module imports nothing heavy: the CLI reads configs to print ``--help`` before onnx,
onnxruntime or numpy are loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FLAG", "Flag", "comma_list", "field_type", "flag", "flag_fields"]

FLAG = "modelshrink.flag"
_MISSING: Any = dataclasses.MISSING


@dataclass(frozen=True)
class Flag:
    """How one dataclass field appears on the command line.

    Attributes:
        help: The help text.
        names: Option names (default: ``--`` + the field name with dashes).
        panel: The help panel it is listed under.
        negative: The ``--no-x`` form of a boolean flag.
        show_default: Show the default in ``--help``.
        parse: Turns the repeatable text values into the field's value (``--input-shape
            x:1x3 --input-shape y:2`` -> a mapping); ``tuple[str, ...]`` fields get
            :func:`comma_list` without asking.
        metavar: How the value is shown in ``--help``.
        count: A counting flag (``-vv``).
        render: The inverse of ``parse``: the value as the texts given to the repeated flag.
    """

    help: str
    names: tuple[str, ...] = ()
    panel: str | None = None
    negative: str | None = None
    show_default: bool = True
    parse: Callable[[Sequence[str]], Any] | None = None
    metavar: str | None = None
    count: bool = False
    render: Callable[[Any], Sequence[str]] | None = None


def flag(
    default: Any = _MISSING,
    help: str = "",
    *,
    names: Sequence[str] = (),
    panel: str | None = None,
    negative: str | None = None,
    show_default: bool = True,
    parse: Callable[[Sequence[str]], Any] | None = None,
    metavar: str | None = None,
    count: bool = False,
    render: Callable[[Any], Sequence[str]] | None = None,
    default_factory: Callable[[], Any] = _MISSING,
) -> Any:
    """A dataclass field that is also a command-line flag (see the module docstring)."""
    meta = {FLAG: Flag(help, tuple(names), panel, negative, show_default, parse, metavar, count, render)}
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Flag]]:
    """The fields of a dataclass that are flags, in declaration order."""
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(FLAG)
        if isinstance(meta, Flag):
            yield f, meta


def field_type(cls: type, f: dataclasses.Field[Any]) -> Any:
    """A field's annotation as an object (annotations are strings under ``from __future__``)."""
    if not isinstance(f.type, str):
        return f.type
    return _evaluate(cls.__module__, f.type)


@functools.cache
def _evaluate(module: str, annotation: str) -> Any:
    # the module's own names: Literal aliases, Mapping, ... (cached: --help evaluates each once)
    return eval(annotation, dict(vars(sys.modules[module])))


def comma_list(values: Sequence[str] | None) -> tuple[str, ...]:
    """Repeatable, comma-separable values: ``--x a,b --x c`` -> ``("a", "b", "c")``."""
    return tuple(p.strip() for v in values or () for p in v.split(",") if p.strip())


def exclude_flag(panel: str) -> Any:
    """``--exclude``: the same flag, with the same words, for every technique that selects weights."""
    return flag(
        (),
        "Node name, op type or weight name to leave alone; globs allowed (repeatable).",
        panel=panel,
        show_default=False,
    )


def min_elements_flag(panel: str, default: int = 1024) -> Any:
    """``--min-elements``: the same flag for every technique that selects weights."""
    return flag(default, "Leave weights with fewer elements alone.", panel=panel)


def option_name(f: dataclasses.Field[Any], meta: Flag) -> str:
    """The flag's long name: the first of ``names`` that starts with ``--``, else from the field."""
    return next((n for n in meta.names if n.startswith("--")), "--" + f.name.replace("_", "-"))


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def to_argv(obj: Any) -> list[str]:
    """The command-line flags that build ``obj`` back (the inverse of the CLI's parsing).

    Only values that differ from the field's default are written, so a config renders as the
    short command a person would type; nested bundles (``RunOptions.gates``) are included.
    """
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata.get(FLAG)
        if not isinstance(meta, Flag):
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                argv += to_argv(value)
            continue
        if value == _default(f):
            continue
        name = option_name(f, meta)
        if meta.render is not None:
            for text in meta.render(value):
                argv += [name, text]
        elif isinstance(value, bool):
            if value:
                argv.append(name)
            elif meta.negative is not None:
                argv.append(meta.negative)
        elif isinstance(value, tuple):
            if value:
                argv += [name, ",".join(str(v) for v in value)]
        elif value is not None:
            argv += [name, f"{value:g}" if isinstance(value, float) else str(value)]
    return argv
