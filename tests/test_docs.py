"""The docs cannot drift from the CLI: every command has a page with every flag, every command
line in the docs parses, every link resolves, and the README stays a front page.

The examples themselves run in ``tests/test_doc_examples.py``. A flag table out of date is
rewritten by ``MODELSHRINK_UPDATE_DOCS=1 pytest tests/test_docs.py`` (then read the diff).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import docpages
import pytest
import typer
from docpages import COMMANDS, DOCS, PAGES, README, ROOT
from typer.testing import CliRunner

from modelshrink.cli import app

README_TEXT = README.read_text()
README_MAX_LINES = 200
GUIDES = ("choosing", "recipes", "benchmarks", "report", "reliability", "architecture", "python")
UPDATE = bool(os.environ.get("MODELSHRINK_UPDATE_DOCS"))


def _page(name: str) -> Path:
    return DOCS / f"{name}.md"


def test_readme_opens_with_the_two_setup_commands() -> None:
    head = README_TEXT[:800]
    assert "make demo" in head and "make test" in head


def test_readme_is_a_front_page() -> None:
    lines = len(README_TEXT.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_readme_links_every_docs_page() -> None:
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"(docs/{p.name})" not in README_TEXT]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("name", [*sorted(COMMANDS), *GUIDES])
def test_page_exists(name: str) -> None:
    assert _page(name).is_file(), f"docs/{name}.md is missing"


def test_exit_codes_documented() -> None:
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130, 143 |"):
        assert code in README_TEXT, f"README.md's exit code table lacks {code}"


def _help_paragraphs(name: str) -> list[str]:
    return [" ".join(p.split()) for p in (COMMANDS[name].help or "").split("\n\n") if p.strip()]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_ends_with_examples_and_its_page(runner: CliRunner, name: str) -> None:
    """``NAME --help`` ends with two or three examples, then ``Docs: docs/NAME.md``."""
    paragraphs = _help_paragraphs(name)
    assert paragraphs[-1] == f"Docs: docs/{name}.md", f"'{name} --help' must end with its page"
    examples = [p for p in paragraphs if p.startswith("Example: ")]
    assert 2 <= len(examples) <= 3, f"'{name} --help' has {len(examples)} examples; give two or three"
    assert paragraphs[-1 - len(examples) : -1] == examples, f"'{name} --help': examples go last"
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert f"Docs: docs/{name}.md" in " ".join(result.stdout.split())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_examples_parse_and_are_on_the_page(name: str) -> None:
    """The examples --help prints are real command lines, and the page shows them."""
    page = " ".join(_page(name).read_text().split())
    for paragraph in _help_paragraphs(name):
        if paragraph.startswith("Example: "):
            example = paragraph.removeprefix("Example: ")
            assert example.startswith(f"modelshrink {name} "), example
            [line] = docpages.command_lines(docpages.Block(_page(name), 0, "sh", example, ""))
            for argv in line.calls:
                docpages.parse(argv)
            assert example in page, f"docs/{name}.md lacks the --help example: {example}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_flag_table_is_generated_from_the_command(name: str) -> None:
    page = _page(name)
    expected = docpages.flag_table(name)
    written = docpages.flag_section(page, name)
    if UPDATE and written is not None and written != expected:
        page.write_text(page.read_text().replace(written, expected))
        written = expected
    assert written is not None, f"docs/{name}.md has no '<!-- flags: {name} -->' table"
    assert written == expected, (
        f"docs/{name}.md's flag table differs from the command's flags: "
        "MODELSHRINK_UPDATE_DOCS=1 pytest tests/test_docs.py rewrites it"
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_is_in_a_table_of_its_page(name: str) -> None:
    listed = docpages.table_flags(_page(name))
    missing = [
        opt
        for param in COMMANDS[name].params
        for opt in [*param.opts, *param.secondary_opts]
        if opt.startswith("-") and opt not in listed
    ]
    assert not missing, f"docs/{name}.md does not list {missing} of '{name}' in a table"


def test_auto_page_lists_every_candidate() -> None:
    """docs/auto.md's table of candidates is the one ``auto`` builds, name for name."""
    from modelshrink.auto.candidates import Weights, recipes

    built = {r.name for r in recipes(Weights(4, 1, 1, 1), original="MODEL", epochs=1)}
    rows = docpages.marked_table(_page("auto"), "candidates")
    listed = {name for row in rows for name in re.findall(r"`([^`]+)`", row[0])}
    assert listed == built, (
        f"docs/auto.md's candidates differ from auto's: missing {sorted(built - listed)}, "
        f"gone {sorted(listed - built)}"
    )


def _all_options() -> set[str]:
    """Every option of every command, and of ``modelshrink`` itself (--version, --help)."""
    group = typer.main.get_command(app)
    params = [*group.params, *(p for c in COMMANDS.values() for p in c.params)]
    return {o for p in params for o in [*p.opts, *p.secondary_opts]} | {"--help"}


# Options of other programs the docs show: `python bench/run.py --list`.
FOREIGN_OPTIONS = {"--list"}


OPTION = re.compile(r"(?<![\w/.#-])(--[a-z][a-z0-9-]*[a-z0-9])(?![\w-])")
# a bench script's command line in a docs page: to the closing backtick or the end of the line
# (continued over backslash-newlines)
BENCH_LINE = re.compile(r"\S*python \S*?(bench/[\w/]+\.py)((?:[^\n`]*\\\n)*[^\n`]*)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_option_named_exists(page: Path) -> None:
    """A flag renamed or removed in the code cannot live on in the prose.

    A bench script's command line is checked against that script's own options instead.
    """
    known = _all_options() | FOREIGN_OPTIONS
    text = page.read_text()
    for script, args in BENCH_LINE.findall(text):
        source = (ROOT / script).read_text()
        missing = sorted(o for o in set(OPTION.findall(args)) if f'"{o}"' not in source)
        assert not missing, f"{page.relative_to(ROOT)}: {script} has no options {missing}"
    named = set(OPTION.findall(BENCH_LINE.sub("", text)))
    unknown = sorted(named - known)
    assert not unknown, f"{page.relative_to(ROOT)} names options no command has: {unknown}"


@pytest.mark.parametrize(
    "line", [c for c in docpages.sh_lines() if c.calls], ids=lambda c: f"{c.where} {c.text[:60]}"
)
def test_every_command_line_parses(line: docpages.CommandLine) -> None:
    """Every modelshrink command shown in an sh block, runnable or not, is accepted by the CLI."""
    for argv in line.calls:
        try:
            docpages.parse(argv)
        except Exception as exc:
            pytest.fail(f"{line.where}: 'modelshrink {' '.join(argv)}' does not parse: {exc}")


@pytest.mark.parametrize(
    "page",
    [*PAGES, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", ROOT / "sample_models" / "README.md"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_links_resolve(page: Path) -> None:
    broken = []
    for target, anchor in docpages.links(page):
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{target}#{anchor}" if anchor else target)
        elif anchor and path.suffix == ".md" and anchor not in docpages.anchors(path):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
