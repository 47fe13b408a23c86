"""Every command is documented: help with a runnable example, a README section, every flag named."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from modelshrink.cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_readme_opens_with_the_two_setup_commands() -> None:
    head = README[:800]
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_help_with_example(runner: CliRunner, name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout, f"'{name} --help' needs a runnable example"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_readme_section(name: str) -> None:
    assert f"### `modelshrink {name}`" in README


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_is_in_readme(name: str) -> None:
    missing = []
    for param in COMMANDS[name].params:
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if (
                opt.startswith("--")
                and opt not in ("--help",)
                and f"`{opt}" not in README
                and f" {opt}" not in README
            ):
                missing.append(opt)
    assert not missing, f"README does not mention {missing} of '{name}'"


def test_exit_codes_documented() -> None:
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |"):
        assert code in README
