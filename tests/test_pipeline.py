"""The shared runner: output only after checks and gates, functional techniques, determinism."""

from __future__ import annotations

import io as pyio
from pathlib import Path

import onnx
import pytest

from modelshrink import io
from modelshrink.errors import ConfigError, OutputError
from modelshrink.gates import Gates
from modelshrink.pipeline import RunOptions, compare, run_technique

import models
from helpers import ScaleConfig, scale_weights

FAST = RunOptions(latency=False, samples=4)


def test_identity_run_writes_identical_outputs(tmp_path: Path, mlp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    report = run_technique("scale", scale_weights, ScaleConfig(1.0), str(mlp_path), str(out), FAST)
    assert report.written and out.exists()
    assert report.fidelity is not None and report.fidelity.identical
    assert len(report.changes) == 4 and report.notes == ("scaled for a test",)
    assert report.result.params == report.original.params
    assert report.settings["config"] == {"factor": 1.0, "min_elements": 1}


def test_input_is_never_modified(tmp_path: Path, mlp_path: Path) -> None:
    before = mlp_path.read_bytes()
    run_technique("scale", scale_weights, ScaleConfig(2.0), str(mlp_path), str(tmp_path / "o.onnx"), FAST)
    assert mlp_path.read_bytes() == before


def test_technique_is_functional(mlp_path: Path) -> None:
    loaded = io.load_model(str(mlp_path))
    before = io.model_bytes(loaded.model)
    from modelshrink.feeds import load_feeds
    from modelshrink.techniques.base import TechniqueContext

    ctx = TechniqueContext(feeds=load_feeds(loaded.model, data=None), evaluate=lambda m: None)  # type: ignore[arg-type,return-value]
    result = scale_weights(loaded.model, ScaleConfig(3.0), ctx)
    assert result.model is not loaded.model
    assert io.model_bytes(loaded.model) == before


def test_gate_failure_writes_nothing(tmp_path: Path, mlp_path: Path, snapshot) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    options = RunOptions(latency=False, samples=4, gates=Gates(max_error=1e-3))
    report = run_technique(
        "scale", scale_weights, ScaleConfig(1.5), str(mlp_path), str(out_dir / "m.onnx"), options
    )
    assert not report.passed and not report.written
    assert [g.name for g in report.failed_gates] == ["max_error"]
    assert report.failed_gates[0].margin is not None and report.failed_gates[0].margin < 0
    assert snapshot(out_dir) == {}


def test_existing_output_untouched_without_force(tmp_path: Path, mlp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="--force"):
        run_technique("scale", scale_weights, ScaleConfig(1.0), str(mlp_path), str(out), FAST)
    assert out.read_bytes() == b"precious"
    run_technique("scale", scale_weights, ScaleConfig(1.0), str(mlp_path), str(out), FAST, force=True)
    assert out.read_bytes() != b"precious"


def test_same_flags_same_bytes(tmp_path: Path, mlp_path: Path) -> None:
    for name in ("a.onnx", "b.onnx"):
        run_technique("scale", scale_weights, ScaleConfig(0.5), str(mlp_path), str(tmp_path / name), FAST)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_weights_in_constants_and_subgraphs_are_reached(tmp_path: Path) -> None:
    src = models.save(models.constant_and_subgraph(), tmp_path / "sub.onnx")
    report = run_technique("scale", scale_weights, ScaleConfig(2.0), str(src), str(tmp_path / "o.onnx"), FAST)
    assert {c.node for c in report.changes} == {"main_mm", "then_mm"}
    assert report.fidelity is not None and not report.fidelity.identical


def test_skips_are_reported_with_reasons(tmp_path: Path, mlp_path: Path) -> None:
    report = run_technique(
        "scale",
        scale_weights,
        ScaleConfig(1.0, min_elements=100),
        str(mlp_path),
        str(tmp_path / "o.onnx"),
        FAST,
    )
    assert {s.reason for s in report.skipped} == {"fewer than 100 elements"}
    assert len(report.skipped) == 2 and len(report.changes) == 2


def test_latency_and_size_gates(tmp_path: Path, mlp_path: Path) -> None:
    options = RunOptions(samples=2, latency_runs=5, gates=Gates(max_size_ratio=0.5, min_speedup=0.0))
    report = run_technique(
        "scale", scale_weights, ScaleConfig(1.0), str(mlp_path), str(tmp_path / "o.onnx"), options
    )
    names = {g.name: g.passed for g in report.gates}
    assert names == {"max_size_ratio": False, "min_speedup": True}
    assert report.latency is not None and report.latency.original.runs == 5
    with pytest.raises(ConfigError, match="--no-latency"):
        RunOptions(latency=False, gates=Gates(min_speedup=1.0))


def test_min_agreement_without_class_output_is_usage_error(tmp_path: Path) -> None:
    hidden = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[1,4,8] x) => (float[1,4,8] hidden) { hidden = Relu(x) }'
    )
    src = models.save(hidden, tmp_path / "hidden.onnx")
    options = RunOptions(latency=False, samples=2, gates=Gates(min_agreement=0.9))
    with pytest.raises(ConfigError, match="class scores"):
        compare(str(src), str(src), options)


def test_compare_self_is_exact(mlp_path: Path) -> None:
    report = compare(str(mlp_path), str(mlp_path), RunOptions(samples=3, latency_runs=20))
    assert report.fidelity is not None and report.fidelity.identical
    assert report.ratios()["size"] == 1.0 and report.latency is not None


def test_stdout_output(tmp_path: Path, mlp_path: Path, monkeypatch) -> None:
    sink = pyio.BytesIO()

    class _Stdout:
        buffer = sink

        @staticmethod
        def isatty() -> bool:
            return False

    monkeypatch.setattr("sys.stdout", _Stdout)
    report = run_technique("scale", scale_weights, ScaleConfig(1.0), str(mlp_path), "-", FAST)
    assert report.written and report.output == "<stdout>"
    assert io.load_model("-", stdin=pyio.BytesIO(sink.getvalue())).model.graph is not None


def test_analysis_only_result_writes_nothing(tmp_path: Path, mlp_path: Path, snapshot) -> None:
    import dataclasses

    def measure_only(model, config, context):  # type: ignore[no-untyped-def]
        return dataclasses.replace(scale_weights(model, config, context), write=False)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = run_technique(
        "scale", measure_only, ScaleConfig(2.0), str(mlp_path), str(out_dir / "m.onnx"), FAST
    )
    assert report.passed and not report.written and report.fidelity is not None
    assert snapshot(out_dir) == {}


@pytest.mark.parametrize("external_input", [False, True])
def test_sessions_of_big_in_memory_models_go_through_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external_input: bool
) -> None:
    """Techniques' probes and speed checks open sessions of in-memory models: above
    SERIALIZE_WHOLE_BYTES through a temporary file with external data, with the same outputs
    as the whole-model bytes, and nothing left behind."""
    import numpy as np

    from modelshrink.pipeline import session_for_model
    from modelshrink.runtime import RuntimeOptions

    src = tmp_path / "m.onnx"
    (models.save_external if external_input else models.save)(models.conv_net(), src)
    model = io.load_model(str(src)).model
    feed = {"image": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    whole = session_for_model(model, RuntimeOptions()).run(feed)
    monkeypatch.setattr(io, "SERIALIZE_WHOLE_BYTES", 0)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    staged: list[io.StagedModel] = []
    real_stage = io.stage_model

    def stage(*args: object, **kwargs: object) -> io.StagedModel:
        staged.append(real_stage(*args, **kwargs))  # type: ignore[arg-type]
        return staged[-1]

    monkeypatch.setattr(io, "stage_model", stage)
    (tmp_path / "tmp").mkdir()
    via_file = session_for_model(model, RuntimeOptions()).run(feed)
    for a, b in zip(whole, via_file, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(staged) == 1 and staged[0].data_path is not None  # written with external data
    assert not list((tmp_path / "tmp").iterdir())  # the temporary folder is gone


def test_subnormal_weights_are_zeroed_in_every_result(tmp_path: Path) -> None:
    """A weight below float32's smallest normal number costs CPU time and moves no output: every
    technique's result has them zeroed (initializers and Constant nodes alike), the report says
    how many, and the input keeps them."""
    import numpy as np
    from onnx import numpy_helper

    proto = models.mlp(sizes=(16, 32, 10))
    w0 = proto.graph.initializer[0]
    values = numpy_helper.to_array(w0).copy()
    values.reshape(-1)[:7] = np.float32(-3e-40)
    w0.CopyFrom(numpy_helper.from_array(values, w0.name))
    constant = onnx.helper.make_node(
        "Constant", [], ["tiny"], value=numpy_helper.from_array(np.full(10, 1e-41, np.float32))
    )
    proto.graph.node.append(constant)
    proto.graph.node.append(onnx.helper.make_node("Add", ["logits", "tiny"], ["shifted"], name="shift"))
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info("shifted", onnx.TensorProto.FLOAT, ["batch", 10])
    )
    src = models.save(proto, tmp_path / "m.onnx")
    before = src.read_bytes()
    out = tmp_path / "o.onnx"
    report = run_technique(
        "scale", scale_weights, ScaleConfig(1.0, min_elements=10_000), str(src), str(out), FAST
    )
    assert report.details["subnormal_weights_zeroed"] == 17
    assert any(n.startswith("set 17 subnormal float32 weight value(s)") for n in report.notes)
    assert report.fidelity is not None and report.fidelity.identical  # nothing a float32 shows moved
    written = onnx.load(str(out))
    arrays = [numpy_helper.to_array(t) for t in written.graph.initializer]
    arrays += [numpy_helper.to_array(n.attribute[0].t) for n in written.graph.node if n.op_type == "Constant"]
    tiny = np.finfo(np.float32).tiny
    assert not any(((a != 0) & (np.abs(a) < tiny)).any() for a in arrays if a.dtype == np.float32)
    assert src.read_bytes() == before
    plain = run_technique(
        "scale", scale_weights, ScaleConfig(1.0), str(models.save(models.mlp(), tmp_path / "n.onnx")),
        str(tmp_path / "p.onnx"), FAST,
    )  # fmt: skip
    assert "subnormal_weights_zeroed" not in plain.details
