"""Every command's output on the sample models, byte for byte: a refactor must not change them.

The hashes in ``tests/golden/outputs.json`` were written by this test with
``MODELSHRINK_UPDATE_GOLDEN=1 pytest tests/test_golden.py``; rewrite them only for a change
that is meant to change outputs, and say so in the commit. (Same input + flags + seed must
give byte-identical output anyway: DESIGN.md.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelshrink.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
GOLDEN = Path(__file__).resolve().parent / "golden" / "outputs.json"

# (sample, command line after MODEL -o OUT): the defaults of every technique on every sample,
# and the other modes once.
CASES: list[tuple[str, list[str]]] = [
    *[(s, ["quantize"]) for s in ("digits_mlp", "digits_cnn", "tiny_transformer")],
    *[(s, ["prune"]) for s in ("digits_mlp", "digits_cnn", "tiny_transformer")],
    *[(s, ["factorize"]) for s in ("digits_mlp", "digits_cnn", "tiny_transformer")],
    ("tiny_transformer", ["quantize", "--mode", "int4"]),
    ("digits_mlp", ["quantize", "--bits", "3"]),
    ("digits_cnn", ["quantize", "--mode", "fp16"]),
    ("digits_mlp", ["quantize", "--mode", "dynamic"]),
    ("digits_cnn", ["quantize", "--mode", "static"]),
    ("digits_cnn", ["prune", "--structured", "--sparsity", "0.25"]),
    ("digits_mlp", ["prune", "--pattern", "2:4"]),
    ("digits_mlp", ["factorize", "--rank-ratio", "0.25"]),
    ("digits_cnn", ["distill", "--teacher", str(SAMPLES / "digits_cnn.onnx"), "--epochs", "1"]),
]


def _id(case: tuple[str, list[str]]) -> str:
    return f"{case[0]}:{' '.join(a for a in case[1] if not a.startswith('/'))}"


def _digest(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    data = path.with_name(path.name + ".data")
    if data.exists():
        h.update(data.read_bytes())
    return h.hexdigest()


def _versions() -> str:
    import numpy
    import onnx
    import onnx_ir
    import onnxruntime

    return f"onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}"


def _load() -> dict[str, str]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_output_bytes_are_unchanged(runner: CliRunner, tmp_path: Path, case: tuple[str, list[str]]) -> None:
    sample, command = case
    out = tmp_path / "out.onnx"
    args = [command[0], str(SAMPLES / f"{sample}.onnx"), "-o", str(out), *command[1:]]
    args += ["--data", str(SAMPLES / f"{sample}.npz"), "--samples", "32", "--no-latency", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    digest = _digest(out)
    key = _id(case)
    if os.environ.get("MODELSHRINK_UPDATE_GOLDEN"):
        golden = _load()
        golden["versions"] = _versions()
        golden[key] = digest
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
        return
    golden = _load()
    if golden.get("versions") != _versions():
        # serialization and onnxruntime's own quantizers may change bytes between releases
        pytest.skip(f"goldens recorded with {golden.get('versions')}; here {_versions()}")
    assert golden.get(key) == digest, f"{key}: output bytes changed (see this file's docstring)"
