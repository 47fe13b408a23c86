"""factorize: numerics through onnxruntime, rank rules on known spectra, skips, CLI, pipelines."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from modelshrink import api, io
from modelshrink.cli import app
from modelshrink.errors import ConfigError
from modelshrink.feeds import Feeds, load_feeds
from modelshrink.gates import FLOOR_AGREEMENT, Gates
from modelshrink.pipeline import RunOptions
from modelshrink.runtime import RuntimeOptions, Session
from modelshrink.sessions import session_for_model
from modelshrink.techniques import TECHNIQUES, floor_search
from modelshrink.techniques.base import TechniqueContext, TechniqueResult
from modelshrink.techniques.factorize import OP_TYPES, FactorizeConfig, factorize
from modelshrink.techniques.factorize.activations import conv_patches
from modelshrink.techniques.factorize.ranks import (
    Spectrum,
    allowed_ranks,
    budget_ranks,
    rank_for_energy,
    rank_for_ratio,
)
from modelshrink.verify import Reference

import models

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"

# float32 round-off of two chained products instead of one (values of order 1-10)
EXACT_ATOL = 2e-4
# full rank through a whitened SVD (an extra eigendecomposition in float64, cast to float32)
FULL_RANK_ATOL = 5e-4
# Everything factorized, at full rank, every rank allowed: a pure rewrite check.
FULL = FactorizeConfig(rank_ratio=1.0, rank_multiple=1, min_saving=-1.0, min_elements=0, op_types=OP_TYPES)


# --- helpers -------------------------------------------------------------------------------


def _to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def _context(model: ir.Model, feeds: Feeds | None = None, gates: Gates | None = None) -> TechniqueContext:
    feeds = feeds or load_feeds(model, data=None, samples=4)
    runtime = RuntimeOptions()
    reference = Reference(Session(io.model_bytes(model), runtime, label="original"), feeds, model)
    return TechniqueContext(
        feeds=feeds,
        evaluate=lambda m: reference.compare(session_for_model(m, runtime)),
        gates=gates or Gates(),
        runtime=runtime,
    )


def _run(
    proto: onnx.ModelProto, config: FactorizeConfig, feeds: Feeds | None = None, gates: Gates | None = None
) -> tuple[TechniqueResult, ir.Model]:
    model = _to_ir(proto)
    result = factorize(model, config, _context(model, feeds, gates))
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    return result, model


def _outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(io.model_bytes(model), so, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _max_diff(a: ir.Model, b: ir.Model, feed: dict[str, np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(x - y))) for x, y in zip(_outputs(a, feed), _outputs(b, feed), strict=True)
    )


def _ops(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for g in model.graphs() for node in g)


def _low_rank(rng: np.random.Generator, rows: int, cols: int, rank: int) -> np.ndarray:
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(rank)).astype(
        np.float32
    )


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name: str, shape: list, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _gemm(trans_a: int, trans_b: int, bias: str, rank: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(trans_a * 4 + trans_b * 2 + len(bias))
    m, k, n = 3, 32, 48
    w = _low_rank(rng, k, n, rank)
    inits = [models.init("W", w.T.copy() if trans_b else w)]
    inputs = ["x", "W"]
    if bias == "vector":
        inits.append(models.init("C", rng.standard_normal(n).astype(np.float32)))
        inputs.append("C")
    elif bias == "matrix":
        inits.append(models.init("C", rng.standard_normal((m, n)).astype(np.float32)))
        inputs.append("C")
    node = helper.make_node(
        "Gemm", inputs, ["y"], name="fc", transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3
    )
    x_shape = [k, m] if trans_a else [m, k]
    return _model([node], [_vi("x", x_shape)], [_vi("y", [m, n])], inits)


def _conv(
    rank: int, *, spatial: bool, bias: bool = True, kernel: tuple[int, int] = (3, 3), **attrs: Any
) -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    o, i = 12, 10
    kh, kw = kernel
    if spatial:
        s = _low_rank(rng, i * kh, o * kw, rank)  # S[(i, y), (o, x)]
        w = s.reshape(i, kh, o, kw).transpose(2, 0, 1, 3).copy()
    else:
        w = _low_rank(rng, o, i * kh * kw, rank).reshape(o, i, kh, kw)
    inits = [models.init("W", w)]
    inputs = ["x", "W"]
    if bias:
        inits.append(models.init("B", rng.standard_normal(o).astype(np.float32)))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    return _model([node], [_vi("x", [2, i, 11, 9])], [_vi("y", ["n", "c", "h", "w"])], inits)


def _feed(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    return load_feeds(model, data=None, samples=1, seed=seed).samples[0]


# --- full rank and exact low rank: the rewrites are numerically right ----------------------


@pytest.mark.parametrize(
    "name",
    ["mlp", "cnn", "tokens", "digits_mlp", "digits_cnn", "tiny_transformer"],
)
def test_full_rank_reproduces_outputs(name: str) -> None:
    builders = {"mlp": models.mlp, "cnn": models.conv_net, "tokens": models.token_model}
    proto = builders[name]() if name in builders else onnx.load(str(SAMPLES / f"{name}.onnx"))
    result, original = _run(proto, FULL)
    assert result.changed and result.model is not original
    assert all(c.details["rank"] == c.details["max_rank"] for c in result.changed)
    for seed in range(2):
        feed = _feed(original, seed)
        assert _max_diff(original, result.model, feed) < FULL_RANK_ATOL


@pytest.mark.parametrize("bias", ["none", "vector", "matrix"])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_every_trans_and_bias(trans_a: int, trans_b: int, bias: str) -> None:
    proto = _gemm(trans_a, trans_b, bias)
    result, original = _run(proto, FactorizeConfig(rank_ratio=4 / 32, rank_multiple=4, min_elements=0))
    assert [c.details["rank"] for c in result.changed] == [4]
    assert _ops(result.model) == {"Gemm": 2}
    second = next(n for n in result.model.graph if n.name == "fc")
    assert second.attributes["alpha"].as_float() == pytest.approx(0.7)
    assert second.attributes["beta"].as_float() == pytest.approx(1.3)
    assert len(second.inputs) == (2 if bias == "none" else 3)
    assert _max_diff(original, result.model, _feed(original)) < EXACT_ATOL
    assert result.changed[0].params_after == 4 * (32 + 48)


def test_gemm_before_opset_11_is_skipped_with_reason() -> None:
    proto = _gemm(0, 1, "vector")
    proto.opset_import[0].version = 9
    result, original = _run(proto, FactorizeConfig(rank_ratio=0.125, rank_multiple=4, min_elements=0))
    assert not result.changed
    assert "before opset 11" in result.skipped[0].reason
    assert io.model_bytes(result.model) == io.model_bytes(original)


CONV_CASES = {
    "plain": {},
    "stride2-pad1": {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    "dilation2-asym-pads": {"dilations": [2, 2], "pads": [1, 2, 0, 1]},
    "stride2x1-dilation1x2": {"strides": [2, 1], "dilations": [1, 2], "pads": [0, 2, 1, 0]},
    "same-upper-stride2": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "same-lower": {"auto_pad": "SAME_LOWER"},
    "valid": {"auto_pad": "VALID", "strides": [1, 2]},
}


@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "spatial"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_stride_padding_dilation(case: str, spatial: bool) -> None:
    kernel = (3, 5) if case == "plain" else (3, 3)
    proto = _conv(4, spatial=spatial, kernel=kernel, **CONV_CASES[case])
    config = FactorizeConfig(
        rank_ratio=0.01, rank_multiple=4, min_elements=0, conv="spatial" if spatial else "channel"
    )
    result, original = _run(proto, config)
    assert [c.details["rank"] for c in result.changed] == [4]
    assert result.changed[0].details["mode"] == ("spatial" if spatial else "channel")
    assert _ops(result.model) == {"Conv": 2}
    first, second = list(result.model.graph)
    w1, w2 = first.inputs[1].const_value, second.inputs[1].const_value
    assert w1 is not None and w2 is not None
    if spatial:
        assert list(w1.shape) == [4, 10, kernel[0], 1] and list(w2.shape) == [12, 4, 1, kernel[1]]
    else:
        assert list(w1.shape) == [4, 10, *kernel] and list(w2.shape) == [12, 4, 1, 1]
    assert len(second.inputs) == 3  # the bias moved to the second Conv
    assert _max_diff(original, result.model, _feed(original)) < EXACT_ATOL


def test_embedding_gather_becomes_gather_and_matmul() -> None:
    rng = np.random.default_rng(3)
    proto = models.token_model(vocab=64)
    table = next(t for t in proto.graph.initializer if t.name == "emb")
    table.CopyFrom(models.init("emb", _low_rank(rng, 64, 16, 4)))
    result, original = _run(
        proto, FactorizeConfig(rank_ratio=0.25, rank_multiple=4, min_elements=0, op_types=OP_TYPES)
    )
    changed = {c.node: c for c in result.changed}
    assert changed["embed"].details["rank"] == 4 and changed["embed"].params_after == 4 * (64 + 16)
    ops = _ops(result.model)
    assert ops["Gather"] == 1 and ops["MatMul"] == 2  # embedding lookup + projection, and the head
    assert any("smaller, not faster" in n for n in result.notes)
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    assert gather.inputs[0] is not None and list(gather.inputs[0].const_value.shape) == [64, 4]  # type: ignore[union-attr]
    assert _max_diff(original, result.model, _feed(original)) < EXACT_ATOL


# --- rank rules on known spectra ------------------------------------------------------------


def _with_spectrum(values: list[float], rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    s = np.zeros(min(rows, cols))
    s[: len(values)] = values
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T


def _matmul_chain(mats: list[np.ndarray]) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(mats):
        inits.append(models.init(f"W{i}", w.astype(np.float32)))
        out = "y" if i == len(mats) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out], name=f"mm{i}"))
        prev = out
    return _model(nodes, [_vi("x", [2, mats[0].shape[0]])], [_vi("y", [2, mats[-1].shape[1]])], inits)


def test_energy_rule_picks_the_expected_rank() -> None:
    # squared values 16, 9, 4, 1, 0.25, ...: shares 0.533, 0.833, 0.967, 1.0-ish
    values = [4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.125]
    spectrum = Spectrum(np.array(values), 40, 40)
    assert rank_for_energy(spectrum, 0.5, 1) == 1
    assert rank_for_energy(spectrum, 0.8, 1) == 2
    assert rank_for_energy(spectrum, 0.95, 1) == 3
    assert rank_for_energy(spectrum, 0.95, 8) == 8  # rounded up to the multiple
    assert rank_for_ratio(0.25, 40, 1) == 10 and rank_for_ratio(0.25, 40, 8) == 16
    proto = _matmul_chain([_with_spectrum(values, 40, 40, 0)])
    result, _ = _run(proto, FactorizeConfig(energy=0.95, rank_multiple=1, min_elements=0))
    details = result.changed[0].details
    assert details["rank"] == 3
    assert details["energy_kept"] == pytest.approx((16 + 9 + 4) / sum(v * v for v in values), rel=1e-6)


def test_target_ratio_spends_the_budget_where_it_costs_least() -> None:
    # mm0 is (nearly) rank 8; mm1 has a flat spectrum: every rank it drops costs the same
    low = [1.0] * 8 + [1e-3] * 56
    flat = [1.0] * 64
    proto = _matmul_chain([_with_spectrum(low, 64, 64, 1), _with_spectrum(flat, 64, 64, 2)])
    total = 2 * 64 * 64
    # rank 8 on mm0 saves 4096 - 8 * 128 = 3072 parameters; asking for 3000 fewer needs only mm0
    config = FactorizeConfig(target_ratio=(total - 3000) / total, rank_multiple=8, min_elements=0)
    result, _ = _run(proto, config)
    assert {c.node: c.details["rank"] for c in result.changed} == {"mm0": 8}
    assert any(s.node == "mm1" and "budget" in s.reason for s in result.skipped)
    # asking for more: mm1 must give too; with a flat spectrum its cheapest move per parameter
    # saved is straight to the smallest rank
    config = FactorizeConfig(target_ratio=0.5, rank_multiple=8, min_elements=0)
    result, _ = _run(proto, config)
    assert {c.node: c.details["rank"] for c in result.changed} == {"mm0": 8, "mm1": 8}
    # out of reach: every layer at its smallest rank, and a note says so
    result, _ = _run(proto, FactorizeConfig(target_ratio=0.1, rank_multiple=8, min_elements=0))
    assert {c.node: c.details["rank"] for c in result.changed} == {"mm0": 8, "mm1": 8}
    assert any("--target-ratio 0.1 is out of reach" in n and "(25.0%)" in n for n in result.notes)


def test_budget_ranks_on_known_spectra() -> None:
    # a: geometric decay; b: flat. Steps of 8 ranks; b's first step saves little and costs a lot.
    a = Spectrum(0.7 ** np.arange(32), 32, 32)
    b = Spectrum(np.ones(32), 32, 32)
    allowed = [allowed_ranks(s, 8, 0.2) for s in (a, b)]
    assert allowed == [[8], [8]]  # r * 64 <= 0.8 * 1024 -> r <= 12
    assert budget_ranks([a, b], allowed, 1) == [8, None]
    assert budget_ranks([a, b], allowed, 513) == [8, 8]
    # finer ranks: a walks down its curve before b is touched at all
    allowed = [allowed_ranks(s, 1, 0.2) for s in (a, b)]
    # a's tail share is ~0.49^r: each step down costs far less than b's cheapest move (to
    # rank 1: 31/32 of its energy for 960 parameters), so saving 768 = 1024 - 4 * 64 is all a
    assert budget_ranks([a, b], allowed, 12 * 64) == [4, None]


# --- what is left alone, and why ---------------------------------------------------------------


def test_layers_that_would_not_save_are_untouched_with_a_reason() -> None:
    proto = models.mlp(sizes=(128, 10))  # 128 x 10: rank 8 keeps 1104 of 1280 (saves 14%)
    result, original = _run(proto, FactorizeConfig(rank_ratio=0.25))
    assert not result.changed
    (skip,) = result.skipped
    assert skip.node == "fc0" and "saves 14%" in skip.reason and "needs ≥ 20%" in skip.reason
    assert io.model_bytes(result.model) == io.model_bytes(original)


def _skip_zoo() -> onnx.ModelProto:
    rng = np.random.default_rng(5)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    inits = [
        models.init("W_tr", w(32, 32)),
        models.init("W_left", w(32, 32)),
        models.init("W_3d", w(2, 32, 32)),
        models.init("W_small", w(4, 32)),
        models.init("W_excl", w(32, 32)),
        models.init("W_dw", w(32, 1, 3, 3)),
        models.init("W_grp", w(32, 8, 3, 3)),
        models.init("E_axis1", w(32, 40)),
        models.init("T_int", rng.integers(-3, 3, (64, 32)).astype(np.int64)),
        models.init("W_in", w(32, 32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W_tr"], ["a"], name="shared_with_transpose"),
        helper.make_node("Transpose", ["W_tr"], ["W_tr_t"], name="tr"),
        helper.make_node("MatMul", ["x", "W_tr_t"], ["a2"], name="uses_transposed"),
        helper.make_node("MatMul", ["W_left", "x_t"], ["b"], name="left_operand"),
        helper.make_node("MatMul", ["x3", "W_3d"], ["c"], name="batched"),
        helper.make_node("MatMul", ["x4", "W_small"], ["d"], name="tiny"),
        helper.make_node("MatMul", ["x", "W_excl"], ["e"], name="excluded_mm"),
        helper.make_node("Conv", ["img", "W_dw"], ["f"], name="depthwise", group=32),
        helper.make_node("Conv", ["img", "W_grp"], ["g"], name="grouped", group=4),
        helper.make_node("Gather", ["E_axis1", "ids"], ["h"], name="gather_axis1", axis=1),
        helper.make_node("Gather", ["T_int", "ids"], ["i"], name="int_table"),
        helper.make_node("MatMul", ["x", "W_in"], ["k"], name="graph_input_weight"),
    ]
    inputs = [
        _vi("x", [2, 32]),
        _vi("x_t", [32, 2]),
        _vi("x3", [2, 3, 32]),
        _vi("x4", [2, 4]),
        _vi("img", [1, 32, 6, 6]),
        _vi("ids", [2], TensorProto.INT64),
        _vi("W_in", [32, 32]),
    ]
    ranks = {"c": 3, "f": 4, "g": 4}
    outs = [
        _vi(
            n,
            [f"{n}{d}" for d in range(ranks.get(n, 2))],
            TensorProto.INT64 if n == "i" else TensorProto.FLOAT,
        )
        for n in ["a", "a2", "b", "c", "d", "e", "f", "g", "h", "i", "k"]
    ]
    return _model(nodes, inputs, outs, inits)


def test_every_skip_reason_appears() -> None:
    proto = _skip_zoo()
    config = FactorizeConfig(rank_ratio=0.25, min_elements=200, exclude=("excluded_*",), op_types=OP_TYPES)
    result, original = _run(proto, config)
    reasons = {s.node: s.reason for s in result.skipped}
    assert "also used by tr (Transpose), which cannot take factors" in reasons["shared_with_transpose"]
    assert "left operand of MatMul" in reasons["left_operand"]
    assert "3-D (batched MatMul)" in reasons["batched"]
    assert "fewer than --min-elements 200" in reasons["tiny"]
    assert reasons["excluded_mm"].startswith("excluded by --exclude")
    assert "depthwise Conv (group=32)" in reasons["depthwise"]
    assert "grouped Conv (group=4)" in reasons["grouped"]
    assert "only row lookups (axis 0)" in reasons["gather_axis1"]
    assert "graph input" in reasons["graph_input_weight"]
    assert "is int64; only float32/float16/float64 weights" in reasons["int_table"]
    # its weight is Transpose(constant): computed at run time, named with what to do
    assert "computed at run time from constants by Transpose" in reasons["uses_transposed"]
    assert not result.changed
    assert io.model_bytes(result.model) == io.model_bytes(original)
    # op-types filters silently; exclude by op type
    result, _ = _run(proto, FactorizeConfig(rank_ratio=0.25, min_elements=200, op_types=("Conv",)))
    assert {s.op_type for s in result.skipped} == {"Conv"}
    result, _ = _run(
        proto, FactorizeConfig(rank_ratio=0.25, min_elements=200, exclude=("MatMul",), op_types=OP_TYPES)
    )
    assert all(s.reason.startswith("excluded") for s in result.skipped if s.op_type == "MatMul")


def test_float16_weights_keep_their_dtype() -> None:
    proto = _matmul_chain([np.eye(32)])
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.eye(32, dtype=np.float16), "W0"))
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    proto.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    result, _ = _run(proto, FactorizeConfig(rank_ratio=0.25, min_elements=0))
    assert result.changed and result.changed[0].details["rank"] == 8  # float16 is handled
    assert result.model.graph.initializers["W0_U"].const_value.dtype == ir.DataType.FLOAT16  # type: ignore[union-attr]


# --- sharing, Constant nodes, subgraphs ------------------------------------------------------


def test_shared_weight_gets_one_pair_of_factors() -> None:
    rng = np.random.default_rng(9)
    w = _low_rank(rng, 32, 32, 8)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["a", "W"], ["y"], name="mm_b"),
    ]
    proto = _model(nodes, [_vi("x", [2, 32])], [_vi("y", [2, 32])], [models.init("W", w)])
    result, original = _run(proto, FactorizeConfig(rank_ratio=0.25, min_elements=0))
    assert [c.node for c in result.changed] == ["mm_a", "mm_b"]
    assert result.changed[0].params_after == 8 * 64 and result.changed[1].params_after == 0
    assert result.changed[1].details["shared_with"] == "mm_a"
    assert sorted(result.model.graph.initializers) == ["W_U", "W_V"]
    assert _max_diff(original, result.model, _feed(original)) < EXACT_ATOL


def test_tied_embedding_shared_with_transposed_gemm() -> None:
    rng = np.random.default_rng(10)
    table = _low_rank(rng, 64, 32, 8)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
        helper.make_node("Gemm", ["h", "E"], ["logits"], name="lm_head", transB=1),
    ]
    proto = _model(
        nodes, [_vi("ids", [5], TensorProto.INT64)], [_vi("logits", [5, 64])], [models.init("E", table)]
    )
    result, original = _run(proto, FactorizeConfig(rank_ratio=0.25, min_elements=0, op_types=OP_TYPES))
    assert [c.node for c in result.changed] == ["embed", "lm_head"]
    assert sorted(result.model.graph.initializers) == ["E_U", "E_V"]
    assert _max_diff(original, result.model, _feed(original)) < EXACT_ATOL


@pytest.mark.parametrize("flag", [True, False])
def test_constant_nodes_and_if_subgraphs(flag: bool) -> None:
    proto = models.constant_and_subgraph()
    result, original = _run(proto, FULL)
    assert {c.node for c in result.changed} == {"main_mm", "then_mm", "else_mm"}
    shared = next(c for c in result.changed if c.node == "else_mm")
    assert shared.details["shared_with"] == "main_mm"  # the Constant feeds both graphs
    consts = [n for n in result.model.graph if n.op_type == "Constant"]
    assert sorted(n.outputs[0].name for n in consts) == ["w_const_U", "w_const_V"]  # type: ignore[type-var]
    then_graph = next(n for n in result.model.graph if n.op_type == "If").attributes["then_branch"].as_graph()
    assert sorted(then_graph.initializers) == ["w_then_U", "w_then_V"]
    feed = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32), "flag": np.array(flag)}
    assert _max_diff(original, result.model, feed) < FULL_RANK_ATOL


# --- contracts: functional, deterministic ----------------------------------------------------


def test_input_untouched_and_same_flags_same_bytes() -> None:
    proto = onnx.load(str(SAMPLES / "tiny_transformer.onnx"))
    model = _to_ir(proto)
    before = io.model_bytes(model)
    config = FactorizeConfig(rank_ratio=0.25)
    one = factorize(model, config, _context(model))
    two = factorize(model, config, _context(model))
    assert io.model_bytes(model) == before
    assert io.model_bytes(one.model) == io.model_bytes(two.model)
    assert TECHNIQUES["factorize"].technique() is factorize
    # embeddings are opt-in: by default the lookup stays a lookup
    assert "tok_emb_gather" not in {c.node for c in one.changed}


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"rank_ratio": 0.5, "energy": 0.9}, "--rank-ratio and --energy"),
        ({"rank_ratio": 0.0}, "--rank-ratio"),
        ({"energy": 1.5}, "--energy"),
        ({"target_ratio": -1.0}, "--target-ratio"),
        ({"rank_multiple": 0}, "--rank-multiple"),
        ({"min_saving": 1.0}, "--min-saving"),
        ({"op_types": ("Add",)}, "--op-types"),
        ({"conv": "diagonal"}, "--conv"),
        ({"method": "magic"}, "--method"),
        ({"min_elements": -1}, "--min-elements"),
    ],
)
def test_config_errors_name_the_flag(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        FactorizeConfig(**kwargs)


# --- data-aware --------------------------------------------------------------------------------


def _split_npz(name: str, tmp: Path, calibration: int) -> tuple[Path, Path]:
    data = dict(np.load(SAMPLES / f"{name}.npz"))
    calib, held = tmp / f"{name}_calib.npz", tmp / f"{name}_held.npz"
    np.savez(calib, **{k: v[:calibration] for k, v in data.items()})
    np.savez(held, **{k: v[calibration:] for k, v in data.items()})
    return calib, held


@pytest.mark.parametrize(
    ("name", "ratio"), [("digits_mlp", 0.25), ("digits_cnn", 0.25), ("tiny_transformer", 0.25)]
)
def test_data_aware_beats_plain_svd_on_held_out_data(tmp_path: Path, name: str, ratio: float) -> None:
    calib, held = _split_npz(name, tmp_path, 160)
    proto = onnx.load(str(SAMPLES / f"{name}.onnx"))
    model = _to_ir(proto)
    calib_feeds = load_feeds(model, data=str(calib), samples=64)
    held_feeds = load_feeds(model, data=str(held), samples=96)
    reference = Reference(Session(io.model_bytes(model), RuntimeOptions(), label="o"), held_feeds, model)
    errors = {}
    for method in ("svd", "data"):
        config = FactorizeConfig(rank_ratio=ratio, method=method)  # type: ignore[arg-type]
        result = factorize(model, config, _context(model, calib_feeds))
        expected = "data-aware" if method == "data" else "svd"
        assert {c.details["method"] for c in result.changed} == {expected}
        fidelity = reference.compare(session_for_model(result.model, RuntimeOptions()))
        errors[method] = fidelity.outputs[0].mean_abs_error
    assert errors["data"] < 0.8 * errors["svd"], errors


def _real_feeds(model: ir.Model, count: int = 6) -> Feeds:
    synthetic = load_feeds(model, data=None, samples=count, seed=3)
    return Feeds(synthetic.samples, real=True, source="test")


@pytest.mark.parametrize(
    "case",
    ["gemm-transA", "gemm-transB", "conv-stride", "conv-same", "tokens", "transformer"],
)
def test_data_aware_full_rank_reproduces_outputs(case: str) -> None:
    protos = {
        "gemm-transA": lambda: _gemm(1, 0, "vector", rank=32),
        "gemm-transB": lambda: _gemm(0, 1, "matrix", rank=32),
        "conv-stride": lambda: _conv(10, spatial=False, strides=[2, 2], dilations=[1, 2], pads=[1, 0, 2, 1]),
        "conv-same": lambda: _conv(10, spatial=False, auto_pad="SAME_LOWER", strides=[2, 1]),
        "tokens": models.token_model,
        "transformer": lambda: onnx.load(str(SAMPLES / "tiny_transformer.onnx")),
    }
    proto = protos[case]()
    model = _to_ir(proto)
    result, original = _run(proto, FULL, feeds=_real_feeds(model))
    assert result.details["method"] == "data-aware"
    assert {c.details["method"] for c in result.changed} == {"data-aware"}
    assert _max_diff(original, result.model, _feed(original, seed=9)) < FULL_RANK_ATOL


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_patches_match_onnxruntime(case: str) -> None:
    proto = _conv(4, spatial=False, bias=False, **CONV_CASES[case])
    model = _to_ir(proto)
    feed = _feed(model)
    (expected,) = _outputs(model, feed)
    node = next(iter(model.graph))
    w = np.asarray(node.inputs[1].const_value.numpy())  # type: ignore[union-attr]
    rows = conv_patches(feed["x"], node, w.shape[2:])
    got = rows @ w.reshape(w.shape[0], -1).T  # [N * positions, O]
    n, o, h, wd = expected.shape
    got = got.reshape(n, h, wd, o).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, atol=EXACT_ATOL)


def test_method_data_needs_data() -> None:
    model = _to_ir(models.mlp())
    with pytest.raises(ConfigError, match="--data"):
        factorize(model, FactorizeConfig(method="data"), _context(model))


def test_data_aware_reports_fallback_for_subgraph_layers() -> None:
    proto = models.constant_and_subgraph()
    model = _to_ir(proto)
    rng = np.random.default_rng(0)
    samples = tuple(
        {"x": rng.standard_normal((2, 8)).astype(np.float32), "flag": np.array(i % 2 == 0)} for i in range(6)
    )
    feeds = Feeds(samples, real=True, source="test")
    result = factorize(model, FULL, _context(model, feeds))
    rows = {tuple(r["nodes"]): r for r in result.details["layers"]}
    assert rows[("then_mm",)]["method"] == "svd"
    assert "subgraph" in rows[("then_mm",)]["method_reason"]
    assert result.details["method"] == "data-aware"


# --- tolerance-driven search -------------------------------------------------------------------


def test_search_meets_the_gate_at_a_smaller_size() -> None:
    proto = onnx.load(str(SAMPLES / "digits_mlp.onnx"))
    feeds = load_feeds(_to_ir(proto), data=str(SAMPLES / "digits_mlp.npz"), samples=32)
    gates = Gates(max_error=0.5)
    result, _original = _run(proto, FactorizeConfig(), feeds=feeds, gates=gates)
    assert result.details["rule"] == "sensitivity search against the fidelity gates"
    combined = result.details["search"]["combined"]
    assert combined["max_abs_error"] <= 0.5
    assert result.details["search"]["evaluations"] >= 4 and "refined" in result.details["search"]
    assert result.changed
    for change in result.changed:
        d = change.details
        assert {"rank", "energy_kept", "rel_error", "error_alone", "sensitivity"} <= set(d)
        assert d["error_alone"]["max_abs_error"] <= 0.5
    # a tighter gate keeps at least as many parameters
    tight, _ = _run(proto, FactorizeConfig(), feeds=feeds, gates=Gates(max_error=0.1))
    params = lambda r: sum(c.params_after - c.params_before for c in r.changed)  # noqa: E731
    assert params(tight) >= params(result)
    assert any("sensitivity search" in n for n in result.notes)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_json_report(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "small.onnx"
    args = ["factorize", str(SAMPLES / "digits_mlp.onnx"), "-o", str(out), "--rank-ratio", "0.25"]
    result = runner.invoke(app, [*args, "--json", "--no-latency", "--op-types", "Gemm,MatMul"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["command"] == "factorize" and out.exists()
    assert [c["node"] for c in doc["changes"]] == ["fc1", "fc2"]
    assert doc["details"]["rule"] == "--rank-ratio 0.25"
    assert doc["ratios"]["params"] < 0.4
    assert doc["settings"]["config"]["op_types"] == ["Gemm", "MatMul"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--rank-ratio", "0.5", "--energy", "0.9"],
        ["--op-types", "Add"],
        ["--method", "data"],
        ["--conv", "x"],
    ],
)
def test_cli_usage_errors(runner: CliRunner, tmp_path: Path, extra: list[str], snapshot) -> None:
    result = runner.invoke(
        app, ["factorize", str(SAMPLES / "digits_mlp.onnx"), "-o", str(tmp_path / "o.onnx"), *extra]
    )
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error:")
    assert snapshot(tmp_path) == {}


def test_cli_gate_failure_writes_nothing(runner: CliRunner, tmp_path: Path, snapshot) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = runner.invoke(
        app,
        [
            "factorize",
            str(SAMPLES / "digits_mlp.onnx"),
            "-o",
            str(out_dir / "o.onnx"),
            "--rank-ratio",
            "0.1",
            "--max-error",
            "1e-6",
            "--no-latency",
            "--json",
        ],
    )
    assert result.exit_code == 3
    doc = json.loads(result.stdout)
    assert doc["gates"][0]["passed"] is False
    assert any("do not steer the ranks" in n for n in doc["notes"])
    assert snapshot(out_dir) == {}


@pytest.mark.slow
def test_pipeline_through_subprocesses(tmp_path: Path) -> None:
    src = SAMPLES / "tiny_transformer.onnx"
    factor = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelshrink",
            "factorize",
            str(src),
            "-o",
            "-",
            "--rank-ratio",
            "0.25",
            "-q",
            "--data",
            str(SAMPLES / "tiny_transformer.npz"),
            "--samples",
            "16",
            "--no-latency",
        ],
        capture_output=True,
        check=False,
        cwd=ROOT,
    )
    assert factor.returncode == 0, factor.stderr.decode()
    compare = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelshrink",
            "compare",
            str(src),
            "-",
            "--json",
            "--no-latency",
            "--data",
            str(SAMPLES / "tiny_transformer.npz"),
        ],
        input=factor.stdout,
        capture_output=True,
        check=False,
        cwd=ROOT,
    )
    assert compare.returncode == 0, compare.stderr.decode()
    doc = json.loads(compare.stdout)
    assert doc["ratios"]["params"] < 0.45
    assert doc["fidelity"]["worst"]["cosine"] > 0.95
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelshrink",
            "factorize",
            str(src),
            "-o",
            "-",
            "--rank-ratio",
            "0.25",
            "-q",
            "--data",
            str(SAMPLES / "tiny_transformer.npz"),
            "--samples",
            "16",
            "--no-latency",
        ],
        capture_output=True,
        check=False,
        cwd=ROOT,
    )
    assert again.stdout == factor.stdout


# --- the default: the smallest ranks that keep the fidelity floor ------------------------------

FLOOR_OPTIONS = RunOptions(latency=False, samples=16)


def _low_rank_mlp(path: Path) -> Path:
    """Three MatMuls; the first two are rank 12 plus a little noise, so rank 16 keeps them."""
    rng = np.random.default_rng(0)

    def weight(rows: int, cols: int, rank: int, noise: float) -> np.ndarray:
        w = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(rank * rows)
        return (w + noise * rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a"], name="fc0"),
        helper.make_node("Relu", ["a"], ["h"], name="r0"),
        helper.make_node("MatMul", ["h", "W1"], ["b"], name="fc1"),
        helper.make_node("Relu", ["b"], ["g"], name="r1"),
        helper.make_node("MatMul", ["g", "W2"], ["logits"], name="fc2"),
    ]
    inits = [
        models.init("W0", weight(64, 128, 12, 0.02)),
        models.init("W1", weight(128, 128, 12, 0.02)),
        models.init("W2", weight(128, 10, 10, 0.0)),
    ]
    return models.save(_model(nodes, [_vi("x", ["batch", 64])], [_vi("logits", ["batch", 10])], inits), path)


def test_default_keeps_the_floor_where_an_explicit_rank_does_not(tmp_path: Path) -> None:
    src = _low_rank_mlp(tmp_path / "m.onnx")
    default = api.factorize(str(src), str(tmp_path / "d.onnx"), FactorizeConfig(), FLOOR_OPTIONS)
    explicit = api.factorize(
        str(src), str(tmp_path / "e.onnx"), FactorizeConfig(rank_ratio=0.0625), FLOOR_OPTIONS
    )
    # onnxruntime's figures on the same 16 feeds; class-like logits: the floor is agreement
    assert default.fidelity.top1_agreement is not None and explicit.fidelity.top1_agreement is not None
    assert default.fidelity.top1_agreement >= FLOOR_AGREEMENT > explicit.fidelity.top1_agreement
    assert explicit.written and [c.details["rank"] for c in explicit.changes] == [8, 8]
    assert [c.details["rank"] for c in default.changes] == [16, 16]
    ratio = default.result.params / default.original.params
    assert ratio < 0.4
    search = default.details["default_search"]
    assert search["floor"] == {"min_agreement": FLOOR_AGREEMENT}
    assert search["params_kept_ratio"] == pytest.approx(ratio, abs=1e-6)
    assert 0 < search["evaluations"] <= floor_search.DEFAULT_BUDGET
    assert (
        default.details["rule"] == "no rank rule and no gate: the smallest ranks that keep the fidelity floor"
    )
    note = next(n for n in default.notes if n.startswith("no --rank-ratio, --energy or --target-ratio"))
    assert f"the model keeps {100 * ratio:.1f}% of its parameters" in note
    assert "default_search" not in explicit.details
    again = api.factorize(str(src), str(tmp_path / "again.onnx"), FactorizeConfig(), FLOOR_OPTIONS)
    assert again.details["default_search"]["trials"] == search["trials"]
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "d.onnx").read_bytes()


def test_default_leaves_the_model_unchanged_when_nothing_keeps_the_floor(tmp_path: Path) -> None:
    # a full-rank random matrix: the largest rank that saves 20 % (24 of 64) loses a third of
    # its energy, and the output (features, not class scores: the floor is cosine) with it
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    proto = _model(
        [helper.make_node("MatMul", ["x", "W"], ["features"], name="mm")],
        [_vi("x", [1, 4, 64])],
        [_vi("features", [1, 4, 64])],
        [models.init("W", w)],
    )
    src = models.save(proto, tmp_path / "m.onnx")
    report = api.factorize(str(src), str(tmp_path / "o.onnx"), FactorizeConfig(), FLOOR_OPTIONS)
    assert not report.changes and report.fidelity.identical and report.written
    assert report.details["default_search"]["floor"] == {"min_cosine": 0.99}
    note = next(n for n in report.notes if n.startswith("no --rank-ratio"))
    assert "so nothing was factorized and the model is unchanged" in note
    assert "kept dense: no factorization tried keeps the fidelity floor" in report.skipped[0].reason
    explicit = api.factorize(
        str(src), str(tmp_path / "e.onnx"), FactorizeConfig(rank_ratio=0.375), FLOOR_OPTIONS
    )
    assert explicit.changes and explicit.fidelity.cosine < 0.99
