"""Conformance sweep over the ~150 small models that ship inside the onnx package.

Every model either goes through ``inspect`` and ``compare`` (with its own reference inputs when
it has some) and comes out identical to itself, or fails with exit 1 and one line that says why.
Never a traceback. Feeds read from ``test_data_set_*`` reproduce the shipped reference outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from modelshrink import io
from modelshrink.cli import app
from modelshrink.errors import UnsupportedModelError
from modelshrink.feeds import load_feeds
from modelshrink.runtime import RuntimeOptions, Session

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
MODELS = sorted(p for p in DATA.glob("*/*/model.onnx")) + sorted(DATA.glob("light/*.onnx"))
# Known reasons onnxruntime itself cannot run a shipped model.
UNSUPPORTED = (
    "onnxruntime runs opset 7 and newer",  # opset 1-6 models
    "ai.onnx.preview.training:Gradient",  # an op no runtime implements
    "Failed to construct locale",  # StringNormalizer needs a system locale
)


def _id(path: Path) -> str:
    return str(path.relative_to(DATA).parent if path.name == "model.onnx" else path.relative_to(DATA))


@pytest.mark.parametrize("path", MODELS, ids=_id)
def test_inspect_and_compare(runner: CliRunner, path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(path), "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["nodes"] >= 1
    args = ["compare", str(path), str(path), "--no-latency", "--json", "-q"]
    if any(path.parent.glob("test_data_set_*")):
        args += ["--data", str(path.parent)]
    result = runner.invoke(app, args)
    if result.exit_code == 0:
        assert json.loads(result.stdout)["fidelity"]["identical"]
        return
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert any(reason in lines[0] for reason in UNSUPPORTED), lines[0]


WITH_DATA = [p for p in MODELS if (p.parent / "test_data_set_0").is_dir()]


@pytest.mark.parametrize("path", WITH_DATA, ids=_id)
def test_test_data_feeds_reproduce_reference_outputs(path: Path) -> None:
    loaded = io.load_model(str(path))
    feeds = load_feeds(loaded.model, data=str(path.parent), samples=1)
    try:
        session = Session(path, RuntimeOptions(), label="m")
    except UnsupportedModelError as exc:  # the unsupported ones are covered above
        pytest.skip(f"onnxruntime cannot run it: {exc}")
    outputs = session.run(feeds.samples[0])
    refs = sorted((path.parent / "test_data_set_0").glob("output_*.pb"))
    assert len(refs) == len(outputs)
    for ref_path, out in zip(refs, outputs, strict=True):
        tensor = onnx.TensorProto()
        tensor.ParseFromString(ref_path.read_bytes())
        ref = numpy_helper.to_array(tensor)
        if ref.dtype.kind in "fc":
            np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
        else:
            np.testing.assert_array_equal(out, ref)
