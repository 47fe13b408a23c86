"""Fidelity figures against hand-computed values, and the cases that make models incomparable."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from modelshrink.feeds import Feeds, load_feeds
from modelshrink.runtime import RuntimeOptions, Session
from modelshrink.verify import MismatchError, Reference, class_like_outputs, is_class_like

import models


def _session(proto: onnx.ModelProto, label: str = "m") -> Session:
    return Session(proto.SerializeToString(), RuntimeOptions(), label=label)


def _scaled(proto: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """The MLP with its last bias scaled: a known, input-independent output change."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name == "b1":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, "b1"))
    return out


def test_identical_models_give_exact_zero() -> None:
    proto = models.mlp()
    feeds = load_feeds(ir.serde.deserialize_model(proto), data=None, samples=5)
    ref = Reference(_session(proto), feeds)
    fid = ref.compare(_session(proto, "copy"))
    assert fid.identical and fid.max_abs_error == 0 and fid.cosine == 1.0
    assert math.isinf(fid.snr_db) and fid.top1_agreement == 1.0 and fid.samples == 5


def test_figures_match_numpy() -> None:
    proto = models.mlp()
    cand = _scaled(proto, 1.5)
    feeds = load_feeds(ir.serde.deserialize_model(proto), data=None, samples=6, input_shapes={"x": (3, 16)})
    fid = Reference(_session(proto), feeds).compare(_session(cand, "cand"))
    a = np.concatenate([_session(proto).run(f)[0] for f in feeds.samples]).astype(np.float64)
    b = np.concatenate([_session(cand).run(f)[0] for f in feeds.samples]).astype(np.float64)
    out = fid.outputs[0]
    assert out.max_abs_error == pytest.approx(np.abs(a - b).max(), rel=1e-9)
    assert out.mean_abs_error == pytest.approx(np.abs(a - b).mean(), rel=1e-9)
    cos = (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    assert out.cosine == pytest.approx(cos, rel=1e-9)
    assert out.snr_db == pytest.approx(10 * np.log10((a * a).sum() / ((a - b) ** 2).sum()), rel=1e-9)
    agree = (a.argmax(-1) == b.argmax(-1)).mean()
    assert out.top1_agreement == pytest.approx(agree)
    assert not out.identical


def test_nonfinite_candidate_is_flagged() -> None:
    proto = models.mlp()
    cand = _scaled(proto, np.inf)
    feeds = load_feeds(ir.serde.deserialize_model(proto), data=None, samples=2)
    fid = Reference(_session(proto), feeds).compare(_session(cand, "cand"))
    assert fid.outputs[0].nonfinite > 0 and math.isinf(fid.max_abs_error) and not fid.identical


def test_mismatched_outputs_are_incomparable() -> None:
    feeds = load_feeds(ir.serde.deserialize_model(models.mlp()), data=None, samples=1)
    ref = Reference(_session(models.mlp()), feeds)
    with pytest.raises(MismatchError, match="shape"):
        ref.compare(_session(models.mlp(sizes=(16, 32, 9)), "other"))
    renamed = models.mlp()
    renamed.graph.output[0].name = "out"
    renamed.graph.node[-1].output[0] = "out"
    with pytest.raises(MismatchError, match="no output 'logits'"):
        ref.compare(_session(renamed, "renamed"))


def test_class_like_heuristic() -> None:
    f32 = np.dtype(np.float32)
    assert is_class_like("logits", (1, 10), f32, "Gemm")
    assert is_class_like("output", (4, 1000), f32, "Add")
    assert is_class_like("probs", (1, 16, 50), f32, "Add")
    assert is_class_like("y", (1, 7, 50), f32, "Softmax")
    assert not is_class_like("hidden", (1, 16, 64), f32, "Add")
    assert not is_class_like("pooled", (1, 64), f32, "ReduceMean")
    assert not is_class_like("score", (1, 1), f32, "Gemm")
    assert not is_class_like("labels", (1, 10), np.dtype(np.int64), "ArgMax")


def test_rank_2_regressions_beside_a_softmax_are_not_class_scores() -> None:
    """MTCNN's O-Net: boxes [N, 4] and landmarks [N, 10] from Dense layers beside a Softmax face
    score. Alone, a rank-2 output is still taken for class scores (logits of a classifier)."""
    f32 = np.dtype(np.float32)
    onet = [
        ("dense_5", (8, 4), f32, "Add"),
        ("dense_6", (8, 10), f32, "Add"),
        ("softmax_2", (8, 2), f32, "Softmax"),
    ]
    assert class_like_outputs(onet) == [False, False, True]
    named = [("box", (8, 4), f32, "Gemm"), ("logits", (8, 10), f32, "Gemm")]
    assert class_like_outputs(named) == [False, True]
    assert class_like_outputs([("output", (8, 1000), f32, "Gemm")]) == [True]
    # no output shows which is which: both stay class-like, as before
    assert class_like_outputs([("a", (8, 4), f32, "Gemm"), ("b", (8, 3), f32, "Gemm")]) == [True, True]


def test_per_output_and_worst(tmp_path: Path) -> None:
    proto = models.token_model()
    cand = onnx.ModelProto()
    cand.CopyFrom(proto)
    head = cand.graph.initializer[1]
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 1.1, "head"))
    feeds = load_feeds(ir.serde.deserialize_model(proto), data=None, samples=3, input_shapes={"ids": (2, 5)})
    fid = Reference(_session(proto), feeds, ir.serde.deserialize_model(proto)).compare(_session(cand, "c"))
    by_name = {o.name: o for o in fid.outputs}
    assert by_name["pooled"].identical and by_name["pooled"].top1_agreement is None
    assert not by_name["logits"].identical and by_name["logits"].top1_agreement is not None
    assert fid.max_abs_error == by_name["logits"].max_abs_error
    assert fid.cosine == by_name["logits"].cosine
    assert isinstance(fid, type(fid)) and isinstance(feeds, Feeds)
