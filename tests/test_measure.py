"""Static measurement (params, ops, sizes) and the interleaved latency harness."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from modelshrink import io
from modelshrink.errors import ConfigError
from modelshrink.measure import LatencyStats, measure_latency, model_stats, zlib_size
from modelshrink.runtime import RuntimeOptions, Session

import models


def test_model_stats_counts_every_weight(tmp_path: Path) -> None:
    path = models.save(models.constant_and_subgraph(), tmp_path / "m.onnx")
    loaded = io.load_model(str(path))
    stats = model_stats(loaded.model, source="m", files=loaded.files())
    assert stats.params == 2 * 64  # Constant node + If-branch initializer
    assert stats.params_by_dtype == {"float32": 128}
    assert stats.params_by_op == {"MatMul": 128}
    assert stats.ops == {"Constant": 1, "If": 1, "MatMul": 3}
    assert stats.nodes == 5
    assert stats.size_bytes == path.stat().st_size
    assert stats.size_zlib_bytes == len(zlib.compress(path.read_bytes(), 6))


def test_stats_with_external_data(tmp_path: Path) -> None:
    path = models.save_external(models.mlp(), tmp_path / "m.onnx")
    loaded = io.load_model(str(path))
    stats = model_stats(loaded.model, source="m", files=loaded.files())
    data = tmp_path / "m.onnx.data"
    assert stats.external_data_bytes == data.stat().st_size
    assert stats.size_bytes == path.stat().st_size + data.stat().st_size


def test_zlib_size_skips_large_inputs() -> None:
    assert zlib_size([b"a" * 100], limit=10) is None
    assert zlib_size([b"a" * 100, b"b" * 100]) == len(zlib.compress(b"a" * 100 + b"b" * 100, 6))


def test_latency_stats_percentiles() -> None:
    stats = LatencyStats.from_times([0.001 * i for i in range(1, 11)])
    assert stats.runs == 10 and stats.min_ms == pytest.approx(1.0)
    assert stats.p50_ms == pytest.approx(5.5) and stats.p90_ms == pytest.approx(9.1)


def test_measure_latency_interleaves_fixed_runs() -> None:
    proto = models.mlp().SerializeToString()
    a = Session(proto, RuntimeOptions(), label="a")
    b = Session(proto, RuntimeOptions(), label="b")
    feed = {"x": np.ones((1, 16), np.float32)}
    seen: list[tuple[int, int]] = []
    stats = measure_latency([a, b], feed, runs=5, on_progress=lambda d, t: seen.append((d, t)))
    assert [s.runs for s in stats] == [5, 5] and seen[-1] == (5, 5)
    assert all(s.p50_ms > 0 for s in stats)
    with pytest.raises(ConfigError):
        measure_latency([a], feed, runs=0)


def test_measure_latency_adapts_to_budget() -> None:
    a = Session(models.mlp().SerializeToString(), RuntimeOptions(), label="a")
    stats = measure_latency([a], {"x": np.ones((1, 16), np.float32)}, budget_s=0.05)
    assert 7 <= stats[0].runs <= 2000


def test_stats_do_not_read_external_weights(tmp_path: Path) -> None:
    path = models.save_external(models.mlp(), tmp_path / "m.onnx")
    loaded = io.load_model(str(path))
    model_stats(loaded.model, source="m", files=loaded.files(), compress=False)
    tensor = loaded.model.graph.initializers["W0"].const_value
    assert isinstance(tensor, ir.ExternalTensor) and tensor.raw is None  # never mapped


def test_clean_ort_messages() -> None:
    from modelshrink.runtime import clean_ort_message

    raw = (
        "[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: /onnxruntime_src/onnxruntime/core/"
        "providers/cpu/text/string_normalizer.cc:235 onnxruntime::StringNormalizer::Locale::Locale(const "
        "std::string&)::<lambda()> Failed to construct locale with name:en_US.UTF-8"
    )
    assert clean_ort_message(RuntimeError(raw)) == (
        "Exception during initialization: Failed to construct locale with name:en_US.UTF-8"
    )
    raw = (
        "[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:/onnxruntime_src/onnxruntime/core/graph/"
        "model.cc:256 onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&) "
        "Unsupported model IR version: 15, max supported IR version: 14"
    )
    assert (
        clean_ort_message(RuntimeError(raw))
        == "Unsupported model IR version: 15, max supported IR version: 14"
    )
    raw = "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Add(6) node with name 'a1'"
    assert "opset 7 and newer" in clean_ort_message(RuntimeError(raw))
