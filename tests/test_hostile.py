"""Hostile and broken model files: only clean, one-line errors (exit 1/2), never a crash.

Property-based: valid model bytes are mutated (bit flips, truncation, splices, byte runs) and
every result must either load or raise a ModelshrinkError with a one-line message. A sample of
mutations also goes through the real CLI in a subprocess (where a native crash would show).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from modelshrink import io
from modelshrink.cli import app
from modelshrink.errors import ModelshrinkError
from modelshrink.feeds import load_feeds
from modelshrink.inspection import inspect_model

import models

SEED_MODELS = {
    "mlp": models.mlp().SerializeToString(),
    "cnn": models.conv_net().SerializeToString(),
    "sub": models.constant_and_subgraph().SerializeToString(),
}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEED_MODELS[draw(st.sampled_from(sorted(SEED_MODELS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "run", "varint"]))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "splice":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "run":
            data[pos : pos + 8] = bytes([draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))]) * 8
        else:  # an inflated length/varint field
            data[pos : pos + 1] = b"\xff\xff\xff\xff\x0f"
        if not data:
            data = bytearray(b"\x08")
    return bytes(data)


def _exercise(path: Path) -> None:
    loaded = io.load_model(str(path))
    inspect_model(loaded)
    load_feeds(loaded.model, data=None, samples=1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=mutated())
def test_mutated_models_fail_cleanly(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    try:
        _exercise(path)
    except ModelshrinkError as exc:
        assert "\n" not in exc.message and exc.exit_code in (1, 2)


def _hostile_cases() -> dict[str, onnx.ModelProto]:
    base = models.mlp()
    cases: dict[str, onnx.ModelProto] = {}

    def case(name: str) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(base)
        cases[name] = m
        return m

    case("huge declared dims").graph.initializer[0].dims[:] = [10**6, 10**6]
    case("negative dims").graph.initializer[0].dims[:] = [-5, 32]
    case("bogus dtype").graph.initializer[0].data_type = 999
    case("bogus input type").graph.input[0].type.tensor_type.elem_type = 999
    case("cycle").graph.node[0].input[0] = "logits"
    case("duplicate names").graph.node[1].output[0] = "mm0"
    case("dangling input").graph.node[0].input[1] = "ghost"
    del case("no outputs").graph.output[:]
    case("huge input dims").graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**12
    case("no opset").opset_import.pop()
    return cases


HOSTILE = _hostile_cases()


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_hostile_models_through_cli(runner: CliRunner, tmp_path: Path, name: str, command: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(HOSTILE[name].SerializeToString())
    args = [str(path)] if command == "inspect" else [str(path), str(path), "--no-latency"]
    result = runner.invoke(app, [command, *args, "-q"])
    if result.exit_code == 0:
        assert command == "inspect"  # only inspect may accept e.g. a huge declared input
        return
    assert result.exit_code in (1, 2), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


@pytest.mark.slow
def test_mutations_through_cli_subprocess(tmp_path: Path) -> None:
    """A seeded sample of mutations through the real CLI: a native crash would show here."""
    rng = np.random.default_rng(7)
    base = SEED_MODELS["cnn"]
    for i in range(10):
        data = bytearray(base)
        for _ in range(3):
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(bytes(data))
        result = subprocess.run(
            [sys.executable, "-m", "modelshrink", "compare", str(path), str(path), "--no-latency", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode in (0, 1, 2), (i, result.returncode, result.stderr[-500:])
        if result.returncode:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), (i, result.stderr[-500:])
