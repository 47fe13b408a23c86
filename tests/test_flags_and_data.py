"""The small contracts of issue 14: --seed, --data dtypes and unreadable data files, gate ranges."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from typer.testing import CliRunner

from modelshrink.cli import app
from modelshrink.errors import ConfigError, DataError
from modelshrink.feeds import load_feeds
from modelshrink.gates import Gates
from modelshrink.pipeline import RunOptions

import models

FAST = ["--no-latency", "--samples", "1", "-q"]


def _ir(proto) -> ir.Model:  # type: ignore[no-untyped-def]
    return ir.serde.deserialize_model(proto)


def _error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["quantize", "prune", "factorize", "distill", "compare", "inspect"])
def test_negative_seed_is_a_usage_error(tmp_path: Path, mlp_path: Path, command: str) -> None:
    out = tmp_path / "o.onnx"
    argv = {
        "compare": ["compare", str(mlp_path), str(mlp_path), "--seed", "-5", *FAST],
        "distill": ["distill", str(mlp_path), "-o", str(out), "--teacher", str(mlp_path), "--seed", "-5"],
        "inspect": ["inspect", str(mlp_path), "--seed", "-5"],  # inspect has no --seed at all
    }.get(command, [command, str(mlp_path), "-o", str(out), "--seed", "-5", *FAST])
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert "--seed" in _error_line(result)
    assert not out.exists()
    with pytest.raises(ConfigError, match="--seed"):
        RunOptions(seed=-5)


@pytest.mark.parametrize(
    ("dtype", "cast"),
    [
        (np.float64, True),
        (np.float32, True),  # as is
        (np.float16, False),
        (np.int8, False),
        (np.uint8, False),
        (np.int64, False),
        (np.bool_, False),
    ],
)
def test_data_is_cast_only_as_documented(tmp_path: Path, dtype: type, cast: bool) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((2, 16), dtype))
    if cast:
        feeds = load_feeds(_ir(models.mlp()), data=str(tmp_path / "d.npz"))
        assert feeds.samples[0]["x"].dtype == np.float32
        return
    with pytest.raises(DataError) as info:
        load_feeds(_ir(models.mlp()), data=str(tmp_path / "d.npz"))
    message = info.value.message
    assert f"'x' has dtype {np.dtype(dtype)}" in message and "convert the array to float32" in message


def test_int32_data_is_cast_to_int64(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", ids=np.ones((2, 5), np.int32))
    feeds = load_feeds(_ir(models.token_model()), data=str(tmp_path / "d.npz"))
    assert feeds.samples[0]["ids"].dtype == np.int64
    assert any("cast from int32 to int64" in w for w in feeds.warnings)
    np.savez(tmp_path / "e.npz", ids=np.ones((2, 5), np.int16))
    with pytest.raises(DataError, match="has dtype int16, the model expects int64"):
        load_feeds(_ir(models.token_model()), data=str(tmp_path / "e.npz"))


def _object_npz(path: Path) -> Path:
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    return path


BAD_DATA = {
    "text.npz": lambda p: p.write_text("x,y\n1,2\n") or p,
    "truncated.npz": lambda p: p.write_bytes(_good_npz_bytes(p)[:60]) or p,
    "pickle.npz": lambda p: p.write_bytes(pickle.dumps({"x": [1, 2]})) or p,
    "objects.npz": _object_npz,
    "text.npy": lambda p: p.write_text("1 2 3") or p,
    "objects.npy": lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True) or p,
    "truncated.npy": lambda p: (
        (np.save(p, np.ones((2, 16), np.float32)), p.write_bytes(p.read_bytes()[:90])) and p
    ),
}


def _good_npz_bytes(path: Path) -> bytes:
    good = path.with_name("good.npz")
    np.savez_compressed(good, x=np.ones((2, 16), np.float32))
    return good.read_bytes()


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_unreadable_data_never_suggests_unsafe_loading(tmp_path: Path, mlp_path: Path, name: str) -> None:
    path = BAD_DATA[name](tmp_path / name)
    if name.endswith(".npz") and name != "text.npz" and name != "pickle.npz":
        assert zipfile.is_zipfile(path) or name == "truncated.npz"
    result = CliRunner().invoke(app, ["compare", str(mlp_path), str(mlp_path), "--data", str(path), *FAST])
    assert result.exit_code == 1
    line = _error_line(result)
    assert "pickle" not in line.lower() and str(path) in line, line
    if "objects" in name:
        assert "never loaded (unsafe)" in line


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--min-agreement", "1.5", "within [0, 1]"),
        ("--min-agreement", "-0.5", "within [0, 1]"),
        ("--min-cosine", "1.5", "within [-1, 1]"),
        ("--min-cosine", "-2", "within [-1, 1]"),
    ],
)
def test_gate_ranges_are_stated_correctly(mlp_path: Path, flag: str, value: str, message: str) -> None:
    result = CliRunner().invoke(app, ["compare", str(mlp_path), str(mlp_path), flag, value, *FAST])
    assert result.exit_code == 2
    assert message in _error_line(result)
    Gates(min_cosine=-1.0, min_agreement=0.0)  # the ends are allowed
