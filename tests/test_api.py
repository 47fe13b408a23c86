"""The Python API does what the CLI does, with reports instead of exit codes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import modelshrink
from modelshrink.errors import ConfigError
from modelshrink.report import skip_lines
from modelshrink.techniques.base import Skip

ROOT = Path(__file__).resolve().parent.parent / "sample_models"
FAST = modelshrink.RunOptions(latency=False, samples=8)


def test_every_technique_from_python(tmp_path: Path) -> None:
    mlp = str(ROOT / "digits_mlp.onnx")
    q = modelshrink.quantize(mlp, str(tmp_path / "q.onnx"), options=FAST)
    p = modelshrink.prune(mlp, str(tmp_path / "p.onnx"), modelshrink.PruneConfig(sparsity=0.5), FAST)
    f = modelshrink.factorize(
        mlp, str(tmp_path / "f.onnx"), modelshrink.FactorizeConfig(rank_ratio=0.25), FAST
    )
    assert q.written and p.written and f.written
    assert q.result.size_bytes < 0.3 * q.original.size_bytes
    assert f.result.params < f.original.params
    report = modelshrink.compare(mlp, str(tmp_path / "q.onnx"), FAST)
    assert report.fidelity is not None and report.fidelity.top1_agreement is not None
    assert modelshrink.inspect(mlp).params == q.original.params


def test_distill_from_python(tmp_path: Path) -> None:
    mlp = str(ROOT / "digits_mlp.onnx")
    config = modelshrink.DistillConfig(teacher=mlp, epochs=1)
    with pytest.raises(ConfigError, match="needs --data"):
        modelshrink.distill(mlp, str(tmp_path / "d.onnx"), config, FAST)
    data = dataclasses.replace(FAST, data=str(ROOT / "digits_mlp.npz"))
    report = modelshrink.distill(mlp, str(tmp_path / "d.onnx"), config, data)
    assert report.written and report.command == "distill"


def test_skip_lines_name_nodes_and_group_reasons() -> None:
    skips = [
        Skip("a", "Gemm", "too small"),
        Skip("b", "Gemm", "too small"),
        Skip("c", "Conv", "grouped Conv"),
    ]
    assert skip_lines(skips) == ["2 × too small: a, b", "c (Conv): grouped Conv"]
    many = [Skip(f"n{i}", "MatMul", "shared") for i in range(5)]
    assert skip_lines(many) == ["5 × shared: n0, n1, n2, +2"]
