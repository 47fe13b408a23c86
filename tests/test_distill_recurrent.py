"""LSTM, GRU and RNN gradient rules (backpropagation through time) against float64 finite differences.

Each variant is one recurrent node in random small shapes: every direction, layouts 0 and 1,
``B`` present or not, ``initial_h``/``initial_c`` given or not, ``sequence_lens`` with padding
steps, GRU ``linear_before_reset`` 0 and 1, some supported non-default activations, and only
some of Y / Y_h / Y_c used. The float64 forward is the stand-in of ``reference_ops.py``
(which follows onnxruntime, checked here in float32); the same gradient graph then runs on
onnxruntime in float32 and must match the float64 gradient. Last, a CRNN text recogniser
(Conv features, bidirectional LSTM, per-frame classes) is pruned and distilled back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_distill_rules import _static_inputs, evaluator, float64_model, gradient_check
from test_distill_rules_real import F32_GRAD_RTOL, _as_float32, _gradients

from modelshrink import DistillConfig, PruneConfig, RunOptions, api
from modelshrink.techniques.distill import recurrent
from modelshrink.techniques.distill.autodiff import append_gradients
from modelshrink.techniques.distill.grad import GradientError
from modelshrink.techniques.distill.rules import RULES

import models
import patterns

F32 = np.float32
I32 = np.int32
# onnxruntime's float32 recurrent kernels against the float64 stand-in
FORWARD_ATOL = 1e-5

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_OUTPUTS = {"LSTM": ("Y", "Y_h", "Y_c"), "GRU": ("Y", "Y_h"), "RNN": ("Y", "Y_h")}


@dataclass(frozen=True)
class Variant:
    """One recurrent node to differentiate."""

    kind: str
    direction: str = "forward"
    layout: int = 0
    bias: bool = True
    lens: bool = False
    initial: bool = False
    used: tuple[str, ...] = ("Y", "Y_h")
    lbr: int = 0
    activations: tuple[str, ...] | None = None
    dynamic: bool = False
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [self.kind.lower(), self.direction[:3], f"l{self.layout}"]
        parts += ["b"] if self.bias else ["nob"]
        parts += ["lens"] if self.lens else []
        parts += ["init"] if self.initial else []
        parts += ["+".join(u.lower() for u in self.used)]
        parts += [f"lbr{self.lbr}"] if self.kind == "GRU" else []
        parts += ["-".join(a.lower() for a in self.activations)] if self.activations else []
        parts += ["dyn"] if self.dynamic else []
        return "_".join(parts)


def _variant_model(v: Variant) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str]]:
    rng = np.random.default_rng(100 + v.seed)
    steps, batch, size, hidden = (int(n) for n in rng.integers([2, 1, 1, 1], [6, 4, 5, 5]))
    if v.lens:
        batch = max(batch, 2)
    dirs = 2 if v.direction == "bidirectional" else 1
    gates = _GATES[v.kind] * hidden
    x = rng.standard_normal((steps, batch, size) if v.layout == 0 else (batch, steps, size))
    feeds: dict[str, np.ndarray] = {
        "x": x,
        "w": 0.6 * rng.standard_normal((dirs, gates, size)),
        "r": 0.6 * rng.standard_normal((dirs, gates, hidden)),
    }
    inputs = ["x", "w", "r", "", "", ""]
    if v.bias:
        feeds["b"] = 0.3 * rng.standard_normal((dirs, 2 * gates))
        inputs[3] = "b"
    if v.lens:
        lens = rng.integers(1, steps + 1, batch).astype(I32)
        lens[0] = steps
        lens[-1] = max(1, steps - 2)
        feeds["lens"] = lens
        inputs[4] = "lens"
    state = (dirs, batch, hidden) if v.layout == 0 else (batch, dirs, hidden)
    if v.initial:
        feeds["h0"] = 0.5 * rng.standard_normal(state)
        inputs[5] = "h0"
        if v.kind == "LSTM":
            feeds["c0"] = 0.5 * rng.standard_normal(state)
            inputs.append("c0")
    while inputs and not inputs[-1]:
        inputs.pop()
    outs = [name if name in v.used else "" for name in _OUTPUTS[v.kind]]
    while outs and not outs[-1]:
        outs.pop()
    attrs: dict[str, object] = {"hidden_size": hidden, "direction": v.direction}
    if v.layout:
        attrs["layout"] = 1
    if v.kind == "GRU" and v.lbr:
        attrs["linear_before_reset"] = 1
    if v.activations:
        attrs["activations"] = list(v.activations) * dirs
    node = helper.make_node(v.kind, inputs, outs, name=f"{v.kind.lower()}_node", **attrs)
    model = float64_model([node], feeds, [o for o in outs if o])
    model = _static_inputs(model, feeds) if not v.dynamic else _dynamic_time_and_batch(model, feeds, v.layout)
    return model, feeds, [o for o in outs if o]


def _dynamic_time_and_batch(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], layout: int
) -> onnx.ModelProto:
    """Static shapes except the time and batch axes of x (and the batch axis of the rest)."""
    model = _static_inputs(model, feeds)
    symbolic = {
        "x": (0, 1),
        "h0": (1,) if layout == 0 else (0,),
        "c0": (1,) if layout == 0 else (0,),
        "lens": (0,),
    }
    for vi in model.graph.input:
        for i in symbolic.get(vi.name, ()):
            d = vi.type.tensor_type.shape.dim[i]
            d.ClearField("dim_value")
            d.dim_param = ("T" if i == (0 if layout == 0 else 1) else "N") if vi.name == "x" else "N"
    return model


def _variants() -> list[Variant]:
    out = []
    for kind in ("LSTM", "GRU", "RNN"):
        extra = ("Y_c",) if kind == "LSTM" else ()
        base = [
            Variant(kind),
            Variant(kind, "reverse", bias=False, used=("Y",)),
            Variant(kind, "bidirectional", initial=True, used=("Y", "Y_h", *extra)),
            Variant(kind, "forward", layout=1, lens=True, initial=True, used=("Y_h", *extra)),
            Variant(kind, "reverse", lens=True, used=("Y", "Y_h")),
            Variant(kind, "bidirectional", layout=1, lens=True, initial=True, bias=False, used=("Y", *extra)),
            Variant(kind, "bidirectional", dynamic=True, used=("Y", "Y_h")),
        ]
        if kind == "GRU":
            base += [
                Variant(kind, "forward", lbr=1, initial=True, used=("Y", "Y_h")),
                Variant(kind, "bidirectional", lbr=1, lens=True, layout=1, used=("Y",)),
                Variant(kind, "reverse", lbr=1, bias=False, initial=True, lens=True, used=("Y_h",)),
            ]
        acts = {"LSTM": ("Sigmoid", "Relu", "Sigmoid"), "GRU": ("Tanh", "Sigmoid"), "RNN": ("Sigmoid",)}[kind]
        base.append(Variant(kind, "forward", activations=acts, initial=True, used=("Y", "Y_h")))
        out += [Variant(**{**vars(b), "seed": i + 10 * len(out)}) for i, b in enumerate(base)]
    out.append(Variant("RNN", "bidirectional", activations=("Relu",), lens=True, used=("Y", "Y_h"), seed=99))
    return out


VARIANTS = _variants()


def _wrt(feeds: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in feeds.items() if v.dtype == np.float64]


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.id)
def test_recurrent_rule_matches_finite_differences(v: Variant) -> None:
    model, feeds, outputs = _variant_model(v)
    gradient_check(model, feeds, _wrt(feeds), static=False, outputs=outputs)


def _skip_layout_1_on_onnxruntime(v: Variant) -> None:
    if v.layout:
        # onnxruntime's CPU kernels refuse it ("Batchwise recurrent operations (layout == 1) are
        # not supported"): such a student cannot run there, but the rule follows the spec
        pytest.skip("onnxruntime's CPU recurrent kernels do not run layout=1")


def _ort(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.id)
def test_reference_forward_follows_onnxruntime(v: Variant) -> None:
    _skip_layout_1_on_onnxruntime(v)
    model, feeds, outputs = _variant_model(v)
    want = evaluator(model).run(outputs, feeds)
    feeds32 = {k: (a.astype(F32) if a.dtype == np.float64 else a) for k, a in feeds.items()}
    got = _ort(_as_float32(model)).run(outputs, feeds32)
    for name, g, w in zip(outputs, got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=FORWARD_ATOL, err_msg=name)


@pytest.mark.parametrize("v", VARIANTS[::2], ids=lambda v: v.id)
def test_recurrent_gradient_on_onnxruntime_matches_float64(v: Variant) -> None:
    _skip_layout_1_on_onnxruntime(v)
    model, feeds, outputs = _variant_model(v)
    values = evaluator(model).run(outputs, feeds)
    rng = np.random.default_rng(1)
    seeds = {o: rng.standard_normal(a.shape) for o, a in zip(outputs, values, strict=True)}
    wrt = _wrt(feeds)
    want = _gradients(model, feeds, wrt, seeds, on_ort=False)
    feeds32 = {k: (a.astype(F32) if a.dtype == np.float64 else a) for k, a in feeds.items()}
    got = _gradients(
        _as_float32(model), feeds32, wrt, {k: a.astype(F32) for k, a in seeds.items()}, on_ort=True
    )
    for w in wrt:
        scale = max(float(np.abs(want[w]).max()), 1e-6)
        np.testing.assert_allclose(got[w], want[w], rtol=0, atol=F32_GRAD_RTOL * scale, err_msg=w)


def test_padding_steps_get_no_gradient() -> None:
    # x beyond each sequence's length does not change any output: its gradient is exactly 0
    v = Variant("LSTM", "bidirectional", lens=True, initial=True, used=("Y", "Y_h", "Y_c"), seed=7)
    model, feeds, outputs = _variant_model(v)
    grads = gradient_check(model, feeds, ["x"], static=False, outputs=outputs)
    lens = feeds["lens"]
    for n, length in enumerate(lens):
        assert not grads["x"][length:, n].any()
        assert grads["x"][:length, n].any()


def test_unrolled_form_matches_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    v = Variant("LSTM", "bidirectional", lens=True, initial=True, used=("Y", "Y_h", "Y_c"), seed=3)
    model, feeds, outputs = _variant_model(v)
    monkeypatch.setattr(recurrent, "FORM", "unroll")
    gradient_check(model, feeds, _wrt(feeds), static=False, outputs=outputs)


@pytest.mark.parametrize(
    ("attrs", "inputs", "match"),
    [
        ({"clip": 3.0}, 3, "'clip' is set"),
        ({"input_forget": 1}, 3, "input_forget"),
        ({"activations": ["Sigmoid", "Tanh", "HardSigmoid"]}, 3, "activation 'HardSigmoid'"),
        ({}, 8, "peephole"),
    ],
)
def test_unsupported_lstm_forms_are_refused_naming_the_node(attrs: dict, inputs: int, match: str) -> None:
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((3, 2, 2)),
        "w": rng.standard_normal((1, 8, 2)),
        "r": rng.standard_normal((1, 8, 2)),
    }
    names = ["x", "w", "r"]
    if inputs == 8:
        feeds["p"] = rng.standard_normal((1, 6))
        names = ["x", "w", "r", "", "", "", "", "p"]
    node = helper.make_node("LSTM", names, ["Y"], name="the_lstm", hidden_size=2, **attrs)
    model = float64_model([node], feeds, ["Y"])
    model.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.DOUBLE, None))
    with pytest.raises(GradientError, match=rf"node 'the_lstm' \(LSTM\).*{match}"):
        append_gradients(model, wrt=["w"], seeds={"Y": "seed"}, rules=RULES)


# --- a CRNN text recogniser, pruned then distilled -------------------------------------------------


def _text_lines(rows: int, rng: np.random.Generator) -> np.ndarray:
    """16 x 32 grey lines with a few bright strokes: something for the recogniser's frames."""
    x = 0.1 * rng.standard_normal((rows, 1, 16, 32)).astype(F32)
    for i in range(rows):
        for _ in range(int(rng.integers(2, 6))):
            col, width = int(rng.integers(0, 28)), int(rng.integers(2, 5))
            top, height = int(rng.integers(0, 6)), int(rng.integers(6, 10))
            x[i, 0, top : top + height, col : col + width] += rng.uniform(0.5, 1.5)
    return x


def _frame_agreement(path: Path, teacher: np.ndarray, images: np.ndarray) -> float:
    out = _ort(onnx.load(str(path))).run(None, {"image": images})[0]
    return float((out.argmax(-1) == teacher.argmax(-1)).mean())


def test_crnn_pruned_then_distilled(tmp_path: Path) -> None:
    teacher_path = models.save(patterns.crnn_ocr(0), tmp_path / "crnn.onnx")
    np.savez(tmp_path / "lines.npz", image=_text_lines(256, np.random.default_rng(1)))
    held_out = _text_lines(64, np.random.default_rng(2))
    teacher_out = _ort(onnx.load(str(teacher_path))).run(None, {"image": held_out})[0]
    options = RunOptions(latency=False)
    pruned, recovered = tmp_path / "pruned.onnx", tmp_path / "recovered.onnx"
    api.prune(
        str(teacher_path),
        str(pruned),
        PruneConfig(sparsity=0.25, structured=True, channel_multiple=1),
        options,
    )
    assert (
        onnx.numpy_helper.to_array(
            next(i for i in onnx.load(str(pruned)).graph.initializer if i.name == "c2_w")
        ).shape[0]
        < 32
    ), "structured pruning removed no channel"
    config = DistillConfig(teacher=str(teacher_path), epochs=5, lr=3e-3)
    train = dataclasses.replace(options, data=str(tmp_path / "lines.npz"))
    report = json.loads(api.distill(str(pruned), str(recovered), config, train).to_json())
    fidelity = report["details"]["teacher_fidelity"]
    assert fidelity["after"]["loss"] < 0.6 * fidelity["before"]["loss"]
    trained = {c["details"]["weight"] for c in report["changes"]}
    assert {"rnn_W", "rnn_R", "rnn_B", "c1_w", "c2_w", "c3_w", "fc_w"} <= trained
    before = _frame_agreement(pruned, teacher_out, held_out)
    after = _frame_agreement(recovered, teacher_out, held_out)
    assert after > before + 0.02, (before, after)
