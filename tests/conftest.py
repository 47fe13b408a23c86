"""Shared fixtures: tiny models on disk, a CLI runner, and directory snapshots."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from typer.testing import CliRunner

import models

# Keep the CLI's Rich output plain and wide enough to assert on.
os.environ.setdefault("COLUMNS", "200")
os.environ.pop("MODELSHRINK_DEBUG", None)

# Property tests draw the same examples on every run by default, so `make test` (and CI) passes
# or fails for a reason in the code, not the draw; `HYPOTHESIS_PROFILE=explore` draws new ones
# each run (and `HYPOTHESIS_EXAMPLES_SCALE` multiplies how many) to hunt for bugs.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    return models.save(models.mlp(), tmp_path / "mlp.onnx")


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    return models.save(models.conv_net(), tmp_path / "cnn.onnx")


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, bytes]]:
    """Every file under a folder with its bytes (hidden temp files included)."""

    def take(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    return take
