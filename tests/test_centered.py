"""Embedding tables read only through LayerNorms: which graphs count, and what the offset buys.

Models are built here; figures come from onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelshrink.techniques.quantize import centered
from modelshrink.techniques.quantize.config import QuantizeConfig
from modelshrink.techniques.quantize.plan import make_plan

V, D, S, C = 64, 64, 8, 8

# The table's rows offset by what the LayerNorm removes must cut the output error of 3-bit
# round-to-nearest at least this much on the pre-LN model below (measured: 0.85x).
OFFSET_GAIN = 0.93


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _model(
    after_gather: list[onnx.NodeProto], extra: list[onnx.TensorProto], opset: int = 17
) -> onnx.ModelProto:
    """ids -> Gather(table) -> ``after_gather`` (reads ``emb``, writes ``y``); the table's rows
    have a mean of their own, as trained embeddings do."""
    rng = np.random.default_rng(0)
    inits = [
        _const(
            "table", (rng.uniform(-0.1, 0.1, (V, D)) + rng.uniform(-0.05, 0.05, (V, 1))).astype(np.float32)
        ),
        _const("pos", rng.uniform(-0.1, 0.1, (S, D)).astype(np.float32)),
        _const("gamma", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)),
        _const("beta", (0.1 * rng.standard_normal(D)).astype(np.float32)),
        _const("head", (rng.standard_normal((D, C)) / 8).astype(np.float32)),
        *extra,
    ]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"), *after_gather],
        "centered_test",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, C])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _ln(x: str, out: str, name: str, axis: int = -1) -> onnx.NodeProto:
    return helper.make_node("LayerNormalization", [x, "gamma", "beta"], [out], name=name, axis=axis)


def _head(x: str) -> onnx.NodeProto:
    return helper.make_node("MatMul", [x, "head"], ["y"], name="head_mm")


def _pre_ln() -> onnx.ModelProto:
    """tok + pos -> LN -> MatMul -> residual Add -> LN -> head (every read of the stream is a LN)."""
    return _model(
        [
            helper.make_node("Add", ["emb", "pos"], ["x"], name="embed_add"),
            _ln("x", "h", "ln1"),
            helper.make_node("MatMul", ["h", "mix"], ["m"], name="mix_mm"),
            helper.make_node("Add", ["x", "m"], ["x2"], name="residual"),
            _ln("x2", "z", "ln_f"),
            _head("z"),
        ],
        [_const("mix", (np.random.default_rng(1).standard_normal((D, D)) / 8).astype(np.float32))],
    )


def _decomposed(opset: int) -> onnx.ModelProto:
    """The LayerNorm of older exports: x - ReduceMean(x, -1), then scaled (axes: attribute < 18)."""
    extra = [_const("axes", np.array([-1], np.int64))] if opset >= 18 else []
    mean = (
        helper.make_node("ReduceMean", ["x", "axes"], ["mu"], name="mean")
        if opset >= 18
        else helper.make_node("ReduceMean", ["x"], ["mu"], name="mean", axes=[-1])
    )
    return _model(
        [
            helper.make_node("Mul", ["emb", "sqrt_d"], ["e"], name="embed_scale"),
            helper.make_node("Add", ["e", "pos"], ["x"], name="embed_add"),
            mean,
            helper.make_node("Sub", ["x", "mu"], ["c"], name="center"),
            helper.make_node("Mul", ["c", "gamma"], ["g"], name="gain"),
            _head("g"),
        ],
        [_const("sqrt_d", np.array(8.0, np.float32)), *extra],
        opset,
    )


def _centered(model: onnx.ModelProto) -> bool:
    work = ir.serde.deserialize_model(model)
    plan = make_plan(work, QuantizeConfig(bits=3, min_elements=1))
    (table,) = [u for u in plan.units if u.weight.name == "table"]
    return centered.norm_centered(table)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: _model([_ln("emb", "h", "ln"), _head("h")], []), id="gather-ln"),
        pytest.param(_pre_ln, id="pre-ln-residual"),
        pytest.param(lambda: _decomposed(17), id="decomposed-opset17"),
        pytest.param(lambda: _decomposed(18), id="decomposed-opset18"),
    ],
)
def test_tables_read_only_through_layer_norms_are_found(model: object) -> None:
    assert _centered(model())  # type: ignore[operator]


@pytest.mark.parametrize(
    "model",
    [
        # the rows reach a MatMul before any LayerNorm
        pytest.param(lambda: _model([_head("emb")], []), id="matmul"),
        # a LayerNorm over the last two axes mixes the rows' offsets
        pytest.param(lambda: _model([_ln("emb", "h", "ln", axis=-2), _head("h")], []), id="ln-two-axes"),
        # the residual stream also reaches the head without a LayerNorm
        pytest.param(
            lambda: _model(
                [
                    _ln("emb", "h", "ln"),
                    helper.make_node("Add", ["emb", "h"], ["x"], name="skip"),
                    _head("x"),
                ],
                [],
            ),
            id="unnormalized-residual",
        ),
        # a per-channel gain changes the offset from channel to channel
        pytest.param(
            lambda: _model(
                [
                    helper.make_node("Mul", ["emb", "gamma"], ["e"], name="gain"),
                    _ln("e", "h", "ln"),
                    _head("h"),
                ],
                [],
            ),
            id="per-channel-mul",
        ),
    ],
)
def test_other_readers_keep_plain_rounding(model: object) -> None:
    assert not _centered(model())  # type: ignore[operator]


def _outputs(model: onnx.ModelProto | Path, ids: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"ids": row})[0] for row in ids])


def test_offset_rows_cut_the_error_at_no_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3-bit round-to-nearest of the pre-LN model's table, with and without the offsets: the
    same bytes, a smaller error on every token (each row is fed), the report says which table."""
    from modelshrink.gates import Gates
    from modelshrink.pipeline import RunOptions, run_technique
    from modelshrink.techniques.quantize import quantize

    model = _pre_ln()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    ids = np.arange(V, dtype=np.int64).reshape(-1, 1, S) % V
    reference = _outputs(model, ids)

    def run(name: str) -> tuple[float, int, dict]:
        out = tmp_path / f"{name}.onnx"
        report = run_technique(
            "quantize",
            quantize,
            QuantizeConfig(bits=3, min_elements=4096, exclude=("head", "mix")),
            str(src),
            str(out),
            RunOptions(latency=False, gates=Gates()),
            force=True,
        )
        (change,) = report.changes
        return float(np.abs(_outputs(out, ids) - reference).mean()), out.stat().st_size, dict(change.details)

    offset_err, offset_size, details = run("offset")
    assert (
        details["weight"] == "table"
        and details["row_offsets"] == "each row offset by what a LayerNorm after it removes"
    )
    monkeypatch.setattr("modelshrink.techniques.quantize.centered.OFFSETS", ())
    plain_err, plain_size, plain_details = run("plain")
    assert "row_offsets" not in plain_details
    assert offset_size == plain_size
    assert offset_err <= OFFSET_GAIN * plain_err, (offset_err, plain_err)
