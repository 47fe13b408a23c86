"""What the doc tests read in the Markdown pages: code blocks, command lines, links, flag tables.

The pages are ``README.md`` and ``docs/*.md``. Three kinds of content are checked against the
code (``tests/test_docs.py``, ``tests/test_doc_examples.py``):

- **Flag tables**: each command page holds one, between ``<!-- flags: NAME -->`` and
  ``<!-- /flags -->``, generated from the Typer command (:func:`flag_table`).
  ``MODELSHRINK_UPDATE_DOCS=1 pytest tests/test_docs.py`` rewrites them.
- **Command lines** in fenced ``sh`` blocks: every one that calls ``modelshrink`` is parsed by
  the command it names (unknown flags, bad choices and missing arguments fail), and run on the
  sample models, unless its block is marked ``<!-- illustrative: REASON -->`` (it names your
  model, needs a GPU, takes minutes, ...). A ``text`` block marked ``<!-- output -->`` is what
  the command line before it prints, and is compared with what it prints now
  (:func:`printed_lines`).
- **Links**: every relative link points to a file that exists, and an anchor to a heading in it.
"""

from __future__ import annotations

import itertools
import re
import shlex
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from modelshrink.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
COMMANDS: dict[str, Any] = typer.main.get_command(app).commands  # type: ignore[attr-defined]
PAGES = [README, *sorted(DOCS.glob("*.md"))]
FLAGS_START = "<!-- flags: {name} -->"
FLAGS_END = "<!-- /flags -->"
RUN_MARK = "<!-- run -->"
OUTPUT_MARK = "<!-- output -->"
ILLUSTRATIVE = re.compile(r"<!-- illustrative:(.*)-->")
# Arguments of a command that name files it reads: an example runs only when they exist.
READS = ("src", "model", "original", "candidate", "data", "teacher")
# Flags whose example is about latency (and `auto --goal latency`): those keep it; every other
# example runs with --no-latency.
LATENCY_FLAGS = ("--latency", "--no-latency", "--latency-runs", "--min-speedup")


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mark: str  # the HTML comment on the line before the fence ("<!-- run -->", "<!-- output -->"), or ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def illustrative(self) -> str | None:
        """Why the block is shown but not run (``<!-- illustrative: REASON -->``), else None."""
        m = ILLUSTRATIVE.fullmatch(self.mark)
        return m.group(1).strip() if m else None


@dataclass(frozen=True)
class Stage:
    """One ``modelshrink ...`` of a pipeline (or the ``cat FILE`` feeding it)."""

    argv: tuple[str, ...]  # without the leading "modelshrink"; for cat: ("cat", FILE)


@dataclass(frozen=True)
class CommandLine:
    """A shell command line of an ``sh`` block, continuation lines joined."""

    block: Block
    text: str
    expect: int = 0  # from a trailing "# exit N" comment
    stages: tuple[Stage, ...] = ()
    redirect: str | None = None  # "> FILE"
    foreign: str | None = None  # why it is not only modelshrink (another program, env vars, ...)
    calls: tuple[tuple[str, ...], ...] = ()  # every modelshrink argv in it

    @property
    def where(self) -> str:
        return self.block.where


def blocks(page: Path) -> Iterator[Block]:
    """The fenced code blocks of a page."""
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if m is None:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        before = lines[start - 1].strip() if start > 0 else ""
        mark = before if re.fullmatch(r"<!--.*-->", before) else ""
        yield Block(page, start + 1, lang, "\n".join(body) + "\n", mark)
        i += 1


def _joined(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if pending.strip() and not pending.lstrip().startswith("#"):
            yield pending.strip()
        pending = ""


def command_lines(block: Block) -> Iterator[CommandLine]:
    """The command lines of an ``sh`` block, split into pipeline stages."""
    for text in _joined(block.text):
        expect = 0
        m = re.search(r"#\s*exits?\s+(\d+)\b", text)
        if m is not None:
            expect = int(m.group(1))
        lexer = shlex.shlex(text, posix=True, punctuation_chars="|>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        pipeline: list[list[str]] = [[]]
        redirect = None
        foreign = None
        k = 0
        while k < len(tokens):
            tok = tokens[k]
            if tok == "|":
                pipeline.append([])
            elif tok == ">":
                if k + 2 != len(tokens):
                    foreign = "redirection in the middle"
                redirect = tokens[k + 1] if k + 1 < len(tokens) else None
                k += 1
            elif set(tok) <= set("|>&;"):
                foreign = f"shell operator {tok!r}"
            else:
                pipeline[-1].append(tok)
            k += 1
        stages = []
        calls = []
        for i, words in enumerate(pipeline):
            if words and words[0] == "modelshrink":
                stages.append(Stage(tuple(words[1:])))
                calls.append(tuple(words[1:]))
            elif i == 0 and len(words) == 2 and words[0] == "cat":
                stages.append(Stage(("cat", words[1])))
            else:
                foreign = foreign or f"runs {words[0] if words else 'nothing'}"
        yield CommandLine(block, text, expect, tuple(stages), redirect, foreign, tuple(calls))


def sh_lines(pages: list[Path] | None = None) -> Iterator[CommandLine]:
    """Every command line of every ``sh`` block of the pages."""
    for page in pages or PAGES:
        for block in blocks(page):
            if block.lang in ("sh", "bash", "shell", "console"):
                yield from command_lines(block)


def parse(argv: tuple[str, ...]) -> dict[str, Any]:
    """The parameters Typer parses from a ``modelshrink`` argv (raises its usage errors)."""
    if not argv or argv[0].startswith("-"):
        typer.main.get_command(app).make_context("modelshrink", list(argv), resilient_parsing=True)
        return {}
    name, *args = argv
    if name not in COMMANDS:
        raise ValueError(f"no command '{name}'")
    if "--help" in args or "-h" in args:
        return {}
    ctx = COMMANDS[name].make_context(name, list(args))
    return dict(ctx.params)


def files_read(argv: tuple[str, ...]) -> list[str]:
    """The files a ``modelshrink`` argv reads (not ``-``)."""
    params = parse(argv)
    return [str(params[k]) for k in READS if params.get(k) not in (None, "-")]


def with_speed(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``--no-latency`` added where the example is not about latency and the command has it."""
    if not argv or argv[0] not in COMMANDS or "--help" in argv:
        return argv
    about_latency = set(argv) & set(LATENCY_FLAGS) or ("--goal", "latency") in itertools.pairwise(argv)
    if any(p.name == "latency" for p in COMMANDS[argv[0]].params) and not about_latency:
        return (*argv, "--no-latency")
    return argv


# --- flag tables ---------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _names(param: Any) -> str:
    names = [*param.opts, *param.secondary_opts]
    if param.secondary_opts:
        return f"`{param.opts[-1]} / {param.secondary_opts[0]}`" + "".join(
            f", `{n}`" for n in param.opts[:-1]
        )
    return ", ".join(f"`{n}`" for n in names)


def _default(param: Any) -> str:
    if param.required:
        return "required"
    if getattr(param, "count", False):
        return ""
    if not param.show_default or param.default is None:
        return ""
    if isinstance(param.default, bool):
        return "on" if param.default else "off"
    return f"`{param.default}`"


def _choices(param: Any) -> str:
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    args: list[Any] = []
    for part in typing.get_args(annotation) or ():
        if typing.get_origin(part) is typing.Literal:
            args += typing.get_args(part)
    if typing.get_origin(annotation) is typing.Literal:
        args = list(typing.get_args(annotation))
    return "\\|".join(str(a) for a in args)


def flag_table(name: str) -> str:
    """The generated flag table of a command: one section per help panel, every option."""
    options = [p for p in COMMANDS[name].params if p.opts[0].startswith("-")]
    panels: dict[str, list[Any]] = {}
    for p in options:
        panels.setdefault(getattr(p, "rich_help_panel", None) or "Options", []).append(p)
    out = [
        FLAGS_START.format(name=name),
        "<!-- generated from the command's flags: MODELSHRINK_UPDATE_DOCS=1 pytest tests/test_docs.py -->",
    ]
    for panel, params in panels.items():
        out += ["", f"**{panel}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for p in params:
            choices = _choices(p)
            flag = _names(p) + (f" `{choices}`" if choices else "")
            out.append(f"| {flag} | {_default(p)} | {_cell(p.help or '')} |")
    out.append(FLAGS_END)
    return "\n".join(out)


def flag_section(page: Path, name: str) -> str | None:
    """The flag table of a page as written (None when it has none)."""
    text = page.read_text()
    start = text.find(FLAGS_START.format(name=name))
    end = text.find(FLAGS_END, start)
    if start < 0 or end < 0:
        return None
    return text[start : end + len(FLAGS_END)]


def table_flags(page: Path) -> set[str]:
    """Every option named in backticks in a table row of the page."""
    found: set[str] = set()
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("|"):
            for span in re.findall(r"`([^`]*)`", line):
                found.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", span))
    return found


def marked_table(page: Path, mark: str) -> list[list[str]]:
    """The cells of the table right after ``<!-- MARK -->`` (header and rule left out)."""
    lines = page.read_text().splitlines()
    start = lines.index(f"<!-- {mark} -->") + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[2:]


# --- links ---------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6}\s+(.*)$", line)):
            base = slug(m.group(1))
            name, n = base, 1
            while name in found:
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


def links(page: Path) -> Iterator[tuple[str, str]]:
    """(target, anchor) of every relative Markdown link outside code blocks."""
    in_code = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            yield path, anchor


# --- pasted output -------------------------------------------------------------------------

_SPEED = re.compile(r",? (same speed|[0-9.]+x (faster|slower))")


def printed_lines(text: str) -> list[str]:
    """The lines of pasted output that a run with ``--no-latency`` must also print.

    Whitespace is collapsed (the terminal's width decides where Rich wraps and pads), lines
    about latency are left out, the verdict's speed clause is cut, and a line ``...`` marks
    printed lines left out of the page.
    """
    kept = []
    for line in text.splitlines():
        if "latency" in line or not line.strip() or line.strip() == "...":
            continue
        kept.append(" ".join(_SPEED.sub("", line).split()))
    return kept


def flat(text: str) -> str:
    """Output with all whitespace collapsed, to search pasted lines in."""
    return " ".join(text.split())
