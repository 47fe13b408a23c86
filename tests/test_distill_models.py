"""Whole-model gradients of the three sample models, and the train step run by onnxruntime.

- float64 copies of the sample MLP, CNN and transformer: the engine's gradient of every
  trainable weight against central finite differences (onnx.reference);
- the same gradient graph in float32 on onnxruntime against the float64 gradient;
- one AdamW and one SGD step of the step model against a numpy re-implementation of the
  update on the gradients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_distill_rules import evaluator, gradient_check

from modelshrink import io
from modelshrink.techniques.distill.autodiff import append_gradients
from modelshrink.techniques.distill.optim import OptimizerSpec
from modelshrink.techniques.distill.rules import RULES
from modelshrink.techniques.distill.step import TargetSpec, build_step, prepare_student

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MODELS = ["digits_mlp", "digits_cnn", "tiny_transformer"]
# float32 onnxruntime gradient vs float64 gradient, relative to the gradient's norm
F32_GRAD_RTOL = 2e-4
F32_GRAD_ATOL = 1e-5
# one optimizer step from the ONNX graph vs numpy on the same gradient
STEP_ATOL = 1e-6
STEP_RTOL = 1e-5


def _sample(name: str) -> ir.Model:
    return io.load_model(str(SAMPLES / f"{name}.onnx")).model


def _feeds(name: str, rows: int) -> dict[str, np.ndarray]:
    with np.load(SAMPLES / f"{name}.npz") as npz:
        return {k: npz[k][:rows] for k in npz.files if k != "labels"}


def _to_float64(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = model.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for vi in [*g.input, *g.output]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    del g.value_info[:]
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float64), attr.t.name)
                )
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.DOUBLE
    return model


def _prepared(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    student = prepare_student(_sample(name))
    return student.proto, {p.name: p.value for p in student.params}


@pytest.mark.parametrize("name", MODELS)
def test_whole_model_gradient_matches_finite_differences(name: str) -> None:
    proto, params = _prepared(name)
    feeds = {**_feeds(name, 2), **{k: v.astype(np.float64) for k, v in params.items()}}
    feeds = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    model64 = _to_float64(proto)
    # symbolic batch dims stay symbolic: the gradient graph must not need them
    gradient_check(model64, feeds, list(params), static=False)


@pytest.mark.parametrize("name", MODELS)
def test_float32_gradient_on_onnxruntime_matches_float64(name: str) -> None:
    proto, params = _prepared(name)
    inputs = _feeds(name, 4)
    rng = np.random.default_rng(1)
    outs = [o.name for o in proto.graph.output]
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    values = ref.run(outs, {**inputs, **params})
    seeds = {o: rng.standard_normal(v.shape).astype(np.float32) for o, v in zip(outs, values, strict=True)}

    def grads_of(model: onnx.ModelProto, dtype: type, run: object) -> dict[str, np.ndarray]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        for o, s in seeds.items():
            m.graph.input.append(helper.make_tensor_value_info(f"seed__{o}", elem, list(s.shape)))
        gm, grads, _ = append_gradients(
            m, wrt=list(params), seeds={o: f"seed__{o}" for o in outs}, rules=RULES
        )
        del gm.graph.output[:]
        for p, g in grads.items():
            gm.graph.output.append(helper.make_tensor_value_info(g, elem, list(params[p].shape)))
        feed = {**inputs, **{k: v.astype(dtype) for k, v in params.items()}}
        feed = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in feed.items()}
        feed.update({f"seed__{o}": s.astype(dtype) for o, s in seeds.items()})
        names = [grads[p] for p in params]
        res = run(gm, names, feed)  # type: ignore[operator]
        return dict(zip(params, res, strict=True))

    def on_ort(m: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            names, feed
        )

    def on_ref(m: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return evaluator(m).run(names, feed)

    g32 = grads_of(proto, np.float32, on_ort)
    g64 = grads_of(_to_float64(proto), np.float64, on_ref)
    # gradients that are zero in exact arithmetic (e.g. attention key biases, which softmax
    # cancels) are float32 rounding noise: measure against the largest gradient's scale too
    scale = max(np.linalg.norm(g) for g in g64.values())
    for p in params:
        err = np.linalg.norm(g32[p] - g64[p])
        assert err <= F32_GRAD_RTOL * np.linalg.norm(g64[p]) + F32_GRAD_ATOL * scale, (
            f"{name} {p}: error {err:.2e}"
        )


def _step_models(name: str, optimizer: OptimizerSpec):  # type: ignore[no-untyped-def]
    student = prepare_student(_sample(name))
    out = student.proto.graph.output[0]
    spec = TargetSpec(outputs=((out.name, "mse", None, ("batch", 10)),))
    return student, build_step(student, spec, optimizer)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_step_matches_numpy(kind: str) -> None:
    spec = OptimizerSpec(kind=kind, weight_decay=0.05, momentum=0.8)  # type: ignore[arg-type]
    _student, models = _step_models("digits_mlp", spec)
    x = _feeds("digits_mlp", 8)["input"]
    target = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    params = {p.name: p.value for p in models.params}
    rng = np.random.default_rng(3)
    flat = models.initial_flat()
    state = {s: rng.random(flat.shape).astype(np.float32) for s in models.flat.state_in}
    lr, t = 0.01, 3.0
    feed = {"input": x, models.target_inputs["logits"]: target, models.flat.param: flat, **state}
    feed[models.lr] = np.asarray(lr, np.float32)
    feed[models.step_input] = np.asarray(t, np.float32)
    sess = ort.InferenceSession(models.step.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [models.loss, models.flat.param_out, *models.flat.state_out]
    out = dict(zip(names, sess.run(names, feed), strict=True))
    # the gradient of the same loss, from the gradient-only graph
    g_model, grads, _ = append_gradients(
        _loss_model(models), wrt=list(params), seeds={models.loss: "one"}, rules=RULES
    )
    for p in params:
        g_model.graph.output.append(
            helper.make_tensor_value_info(grads[p], TensorProto.FLOAT, list(params[p].shape))
        )
    g_sess = ort.InferenceSession(g_model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed_g = {"input": x, models.target_inputs["logits"]: target, **params}
    g = models.flatten(dict(zip(params, g_sess.run([grads[p] for p in params], feed_g), strict=True)))
    decay = models.flatten(
        {p: np.full(v.shape, spec.weight_decay if v.ndim >= 2 else 0.0) for p, v in params.items()}
    )
    s_in, s_out = models.flat.state_in, models.flat.state_out
    if kind == "adamw":
        m = 0.9 * state[s_in[0]] + 0.1 * g
        v = 0.999 * state[s_in[1]] + 0.001 * g * g
        want = flat * (1 - lr * decay) - lr / (1 - 0.9**t) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**t) + 1e-8)
        np.testing.assert_allclose(out[s_out[0]], m, atol=STEP_ATOL)
        np.testing.assert_allclose(out[s_out[1]], v, atol=STEP_ATOL)
    else:
        buf = 0.8 * state[s_in[0]] + g + decay * flat
        want = flat - lr * buf
        np.testing.assert_allclose(out[s_out[0]], buf, atol=STEP_ATOL, rtol=STEP_RTOL)
    np.testing.assert_allclose(out[models.flat.param_out], want, atol=STEP_ATOL, rtol=STEP_RTOL)
    # the flat vector maps back to the named weights
    assert all(np.array_equal(models.unflatten(flat)[p], params[p]) for p in params)


def _loss_model(models) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    m = onnx.ModelProto()
    m.CopyFrom(models.eval)
    m.graph.initializer.append(numpy_helper.from_array(np.asarray(1.0, np.float32), "one"))
    return m


def test_batchnorm_train_mode_gradient_matches_finite_differences() -> None:
    from test_distill_rules import _r, float64_model

    from modelshrink.techniques.distill.grad import Builder, TypeInfo
    from modelshrink.techniques.distill.step import _rewrite_bn_train

    feeds = {"x": _r(4, 3, 2, 2), "s": _r(3), "b": _r(3)}
    stats = {"m": np.zeros(3), "v": np.ones(3)}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")
    model = float64_model([node], feeds, ["y"], initializers=stats)
    for vi in model.graph.input:
        for d, size in zip(vi.type.tensor_type.shape.dim, feeds[vi.name].shape, strict=True):
            d.dim_value = size
    b = Builder({"x", "s", "b", "m", "v", "y"}, 18, "bn")
    updates = _rewrite_bn_train(model, TypeInfo.from_model(model), b)
    model.graph.initializer.extend(b.initializers)
    assert set(updates) == {"m", "v"}
    grads = gradient_check(model, feeds, ["x", "s", "b"])
    # batch statistics: the input gradient sums to zero over each channel
    assert np.allclose(grads["x"].sum(axis=(0, 2, 3)), 0.0, atol=1e-9)
