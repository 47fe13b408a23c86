"""Staged runs a piece at a time (``techniques/chain.py``) see the same activations as whole runs.

GPTQ's staged statistics are collected by running, per stage, only the nodes no earlier stage
ran, on values kept from earlier stages (or, past the memory budget, each stage's prefix from
the graph inputs). Both must give the statistics whole-model runs with the weights fed as
run-time overrides give: the same ``H`` and ``C`` for every layer, on a graph with a residual,
two layers reading one value, a Constant node and a shape computation crossing stages.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelshrink.feeds import Feeds
from modelshrink.graph import Weight
from modelshrink.options import RuntimeOptions
from modelshrink.techniques import chain, layerwise
from modelshrink.techniques.base import TechniqueContext


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["x", "o"], ["y"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full(16, 0.5, np.float32))),
        helper.make_node("Add", ["y", "c"], ["yc"]),
        helper.make_node("MatMul", ["yc", "w3"], ["a"], name="left"),
        helper.make_node("MatMul", ["yc", "w4"], ["b"], name="right"),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Reshape", ["s", "shape"], ["s2"]),
        helper.make_node("Tanh", ["s2"], ["t"]),
        helper.make_node("MatMul", ["t", "w5"], ["out"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8])],
        [w("w1", (16, 32)), w("w2", (32, 16)), w("w3", (16, 16)), w("w4", (16, 16)), w("w5", (16, 8))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _layers(model: ir.Model) -> list[layerwise.Layer]:
    layers = []
    for key, node in enumerate(n for n in model.graph if n.op_type == "MatMul"):
        value = node.inputs[1]
        assert value is not None
        assert value.const_value is not None
        weight = Weight(value, value.const_value, "initializer", model.graph)
        layer = layerwise.layer_of(key, weight, [(node, 1)], model)
        assert isinstance(layer, layerwise.Layer)
        layers.append(layer)
    return layers


def _staged(monkeypatch: pytest.MonkeyPatch, mode: str) -> tuple[dict[int, layerwise.Stats], int]:
    model = ir.from_proto(_model())
    rng = np.random.default_rng(1)
    feeds = Feeds(
        tuple({"x": rng.standard_normal((n, 4, 16)).astype(np.float32)} for n in (1, 3, 2)), True, "test"
    )
    if mode == "whole":
        monkeypatch.setattr(chain, "plan", lambda *args: "forced")
    elif mode == "prefix":
        monkeypatch.setattr(chain, "KEPT_BYTES", 0)
    elif mode == "overflow":  # the budget runs out in the middle of a stage's feeds
        monkeypatch.setattr(chain, "KEPT_BYTES", 1000)
    seen: dict[int, layerwise.Stats] = {}

    def solve(layer: layerwise.Layer, stats: layerwise.Stats) -> np.ndarray:
        seen[layer.key] = stats
        return (layer.weight.numpy() * 0.5 + 0.01).astype(np.float32)

    context = TechniqueContext(feeds=feeds, evaluate=lambda candidate: None, runtime=RuntimeOptions())
    stages = layerwise.solve_in_stages(model, _layers(model), context, solve, applied={}, passes=8)
    return seen, stages


@pytest.mark.parametrize("mode", ["pieces", "prefix", "overflow"])
def test_pieces_see_what_whole_runs_see(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    with monkeypatch.context() as m:
        whole, stages = _staged(m, "whole")
    got, stages_got = _staged(monkeypatch, mode)
    assert stages == stages_got == 3  # fc1 with fc2, left with right, head
    assert sorted(got) == sorted(whole) == [0, 1, 2, 3, 4]
    for key, stats in whole.items():
        assert got[key].rows == stats.rows == 24
        assert stats.gram is not None and got[key].gram is not None
        np.testing.assert_allclose(got[key].gram, stats.gram, rtol=1e-5, atol=1e-4)
        if key in (0, 1):  # the first stage: nothing replaced yet
            assert stats.cross is None and got[key].cross is None
        else:
            assert stats.cross is not None and got[key].cross is not None
            np.testing.assert_allclose(got[key].cross, stats.cross, rtol=1e-5, atol=1e-4)
            # the replaced weights changed what later layers see
            assert not np.allclose(stats.cross, stats.gram)


def test_plan_cuts_each_node_once() -> None:
    model = ir.from_proto(_model())
    layers = _layers(model)
    targets = [["x"], ["r"], ["yc"], ["t"]]
    pieces = chain.plan(model, targets, [["w1"], ["w2"], ["w3", "w4"], ["w5"]])
    assert not isinstance(pieces, str)
    assert [len(p.nodes) for p in pieces] == [0, 2, 4, 6]
    owned = [i for p in pieces for i in p.nodes]
    assert len(owned) == len(set(owned))
    # the residual and the shape come from the graph input; the Constant's value crosses as "yc"
    assert pieces[2].inputs == ("r", "x")
    assert pieces[1].outputs == pieces[1].keeps == ("r",)
    assert pieces[2].outputs == pieces[2].keeps == ("yc",)
    assert pieces[3].inputs == ("x", "yc")
    assert len(layers) == 5


def test_values_whose_weights_change_later_are_recomputed() -> None:
    # fc1 and fc2 in one stage: fc2's input "r" is computed with fc1's original weight, so the
    # next stage cannot reuse it and runs fc1 again
    model = ir.from_proto(_model())
    pieces = chain.plan(model, [["x", "r"], ["yc"], ["t"]], [["w1", "w2"], ["w3", "w4"], ["w5"]])
    assert not isinstance(pieces, str)
    assert pieces[0].outputs == ("r",) and pieces[0].keeps == ()
    assert len(pieces[1].nodes) == 6 and pieces[1].inputs == ("x",)


def test_inputs_with_defaults_are_not_cut() -> None:
    proto = _model()
    proto.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [16, 32]))
    assert chain.plan(ir.from_proto(proto), [["x"]], [["w1"]]) == "a graph input has an initializer"


def test_subgraphs_are_not_cut() -> None:
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z"])],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    proto = _model()
    proto.graph.node.append(
        helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True)))
    )
    proto.graph.node.append(helper.make_node("If", ["cond"], ["z_out"], then_branch=then, else_branch=then))
    model = ir.from_proto(proto)
    assert chain.plan(model, [["x"]], [["w1"]]) == "the graph has subgraphs"
