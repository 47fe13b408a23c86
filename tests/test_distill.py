"""modelshrink distill: the technique's contract, its losses in numbers, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from modelshrink import io
from modelshrink.cli import app
from modelshrink.errors import ConfigError, DataError
from modelshrink.feeds import load_feeds
from modelshrink.graph import weights
from modelshrink.techniques import TECHNIQUES
from modelshrink.techniques.base import TechniqueContext
from modelshrink.techniques.distill import DistillConfig, Teacher, distill, training_data_from_feeds
from modelshrink.techniques.distill.optim import OptimizerSpec
from modelshrink.techniques.distill.step import TargetSpec, build_step, prepare_student
from modelshrink.techniques.distill.technique import _check_sizes
from modelshrink.techniques.distill.trainer import LoopSettings, lr_at

import models

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
MLP, MLP_DATA = SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_mlp.npz"
# Loss values from the eval graph vs numpy on the same outputs (float32 arithmetic).
LOSS_RTOL = 1e-5
# A pruned MLP distilled for a few epochs must win back most of its agreement.
MIN_RECOVERED_AGREEMENT = 0.9


def _load(path: Path) -> ir.Model:
    return io.load_model(str(path)).model


def _pruned(model: ir.Model, share: float = 0.85) -> ir.Model:
    """Magnitude-prune every matrix: a damaged student."""
    model = model.clone()
    for w in weights(model):
        a = w.numpy()
        if a.ndim >= 2:
            thr = np.quantile(np.abs(a), share)
            w.value.const_value = ir.Tensor(
                np.where(np.abs(a) < thr, 0, a).astype(np.float32), name=w.tensor.name
            )
    return model


def _data(teacher: ir.Model, path: Path, labels: bool = False):  # type: ignore[no-untyped-def]
    feeds = load_feeds(teacher, data=str(path), samples=1 << 30)
    lab = np.load(path)["labels"] if labels else None
    return feeds, training_data_from_feeds(feeds, labels=lab, labels_name="labels" if labels else None)


def _run(
    student: ir.Model, teacher: ir.Model, path: Path = MLP_DATA, *, labels: bool = False, seed: int = 0, **kw
):  # type: ignore[no-untyped-def]
    feeds, data = _data(teacher, path, labels)
    config = DistillConfig(
        teacher="teacher",
        labels="labels" if labels else None,
        teacher_model=Teacher(teacher, "teacher"),
        training=data,
        **kw,
    )
    context = TechniqueContext(feeds=feeds, evaluate=lambda m: None, seed=seed)  # type: ignore[arg-type,return-value]
    return distill(student, config, context)


def _bytes(model: ir.Model) -> bytes:
    return io.model_bytes(model)


def _inits(model: ir.Model) -> dict[str, np.ndarray]:
    return {w.name: w.numpy().copy() for w in weights(model)}


@pytest.fixture(scope="module")
def mlp() -> ir.Model:
    return _load(MLP)


@pytest.fixture(scope="module")
def recovered(mlp: ir.Model):  # type: ignore[no-untyped-def]
    student = _pruned(mlp)
    before = _bytes(student)
    result = _run(student, mlp, epochs=8)
    return student, before, result


# --- the technique ---------------------------------------------------------------------------


def test_registered() -> None:
    assert TECHNIQUES["distill"].technique() is distill


def test_recovers_agreement_with_the_teacher(recovered) -> None:  # type: ignore[no-untyped-def]
    _, _, result = recovered
    fid = result.details["teacher_fidelity"]
    assert fid["before"]["top1_agreement"] < 0.8
    assert fid["after"]["top1_agreement"] >= MIN_RECOVERED_AGREEMENT
    assert fid["after"]["loss"] < fid["before"]["loss"]
    assert any("top-1 agreement with the teacher" in n for n in result.notes)
    history = result.details["history"]
    assert len(history) == 8 and history[-1]["train_loss"] < history[0]["train_loss"]


def test_input_is_not_modified(recovered) -> None:  # type: ignore[no-untyped-def]
    student, before, result = recovered
    assert _bytes(student) == before
    assert result.model is not student


def test_only_weight_values_change(recovered, mlp: ir.Model) -> None:  # type: ignore[no-untyped-def]
    student, _, result = recovered
    a = ir.serde.serialize_model(student)
    b = ir.serde.serialize_model(result.model)
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == [
        (n.name, n.op_type, list(n.input), list(n.output)) for n in b.graph.node
    ]
    assert [i.name for i in a.graph.initializer] == [i.name for i in b.graph.initializer]
    assert a.metadata_props == b.metadata_props and a.doc_string == b.doc_string
    assert a.producer_name == b.producer_name and a.opset_import == b.opset_import
    assert a.graph.input == b.graph.input and a.graph.output == b.graph.output
    onnx.checker.check_model(b, full_check=True)


def test_weight_in_a_constant_node_is_trained_in_place(recovered) -> None:  # type: ignore[no-untyped-def]
    student, _, result = recovered
    old, new = _inits(student), _inits(result.model)
    const = [w for w in weights(result.model) if w.kind == "constant"]
    assert [w.name for w in const] == ["fc3.bias"]
    assert not np.array_equal(old["fc3.bias"], new["fc3.bias"])


def test_zeros_stay_zero_by_default(recovered) -> None:  # type: ignore[no-untyped-def]
    student, _, result = recovered
    old, new = _inits(student), _inits(result.model)
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert np.array_equal(old[name] == 0, new[name] == 0), name
        assert not np.array_equal(old[name], new[name])


def test_no_keep_zeros_trains_pruned_weights(mlp: ir.Model) -> None:
    student = _pruned(mlp)
    result = _run(student, mlp, epochs=1, keep_zeros=False)
    old, new = _inits(student), _inits(result.model)
    assert (new["fc1.weight"][old["fc1.weight"] == 0] != 0).mean() > 0.5


def test_same_seed_same_bytes_other_seed_differs(mlp: ir.Model) -> None:
    student = _pruned(mlp)
    a = _bytes(_run(student, mlp, epochs=2, seed=3).model)
    b = _bytes(_run(student, mlp, epochs=2, seed=3).model)
    c = _bytes(_run(student, mlp, epochs=2, seed=4).model)
    assert a == b and a != c


def test_train_pattern_freezes_the_rest(mlp: ir.Model) -> None:
    student = _pruned(mlp)
    result = _run(student, mlp, epochs=1, train="fc3.*")
    old, new = _inits(student), _inits(result.model)
    assert {c.details["weight"] for c in result.changed} == {"fc3.weight", "fc3.bias"}
    assert np.array_equal(old["fc1.weight"], new["fc1.weight"])
    assert not np.array_equal(old["fc3.weight"], new["fc3.weight"])
    assert any("not matched by --train fc3.*" in s.reason for s in result.skipped)


def test_train_pattern_matching_nothing_is_a_usage_error(mlp: ir.Model) -> None:
    with pytest.raises(ConfigError, match="--train nothing"):
        _run(_pruned(mlp), mlp, epochs=1, train="nothing*")


def test_sgd_constant_schedule_without_validation(mlp: ir.Model) -> None:
    result = _run(_pruned(mlp), mlp, epochs=2, optimizer="sgd", lr=0.05, schedule="constant", val_split=0.0)
    hist = result.details["history"]
    assert [h["lr"] for h in hist] == [0.05, 0.05]
    assert hist[0]["val_loss"] is None and result.details["best_epoch"] == 2
    assert result.details["teacher_fidelity"]["after"]["rows_from"].startswith("training rows")


def test_cosine_schedule_decays_to_zero() -> None:
    s = LoopSettings(epochs=1, batch_size=1, lr=0.1, schedule="cosine", patience=None)
    assert lr_at(s, 0, 10) == pytest.approx(0.1)
    assert lr_at(s, 5, 10) == pytest.approx(0.05)
    assert lr_at(s, 10, 10) == pytest.approx(0.0, abs=1e-12)


def test_patience_stops_early(mlp: ir.Model) -> None:
    # a student identical to the teacher cannot improve on epoch 1's perfect agreement much;
    # SGD with a large constant lr makes the validation loss worse, so patience 1 stops it
    result = _run(mlp.clone(), mlp, epochs=6, optimizer="sgd", lr=0.5, schedule="constant", patience=1)
    assert result.details["stopped_early"]
    assert len(result.details["history"]) < 6
    assert result.details["best_epoch"] <= len(result.details["history"])


def test_labels_add_cross_entropy(mlp: ir.Model) -> None:
    result = _run(_pruned(mlp), mlp, labels=True, alpha=0.5, epochs=1)
    assert result.details["losses"] == [{"output": "logits", "loss": "kl"}]
    with pytest.raises(ConfigError, match="--alpha"):
        _run(_pruned(mlp), mlp, alpha=0.5, epochs=1)


def test_transformer_class_output_gets_kl_and_pooled_gets_mse() -> None:
    teacher = _load(SAMPLES / "tiny_transformer.onnx")
    result = _run(_pruned(teacher, 0.5), teacher, SAMPLES / "tiny_transformer.npz", epochs=1)
    assert result.details["losses"] == [
        {"output": "logits", "loss": "kl"},
        {"output": "pooled", "loss": "mse"},
    ]
    reasons = {s.reason for s in result.skipped}
    assert "attn_scale: a scalar constant: kept as it is" in reasons
    # positions and token embeddings (Slice, Gather) are trained
    assert {"tok_emb.weight", "pos_emb.weight"} <= {c.details["weight"] for c in result.changed}


def test_cnn_bn_train_mode_updates_running_statistics() -> None:
    teacher = _load(SAMPLES / "digits_cnn.onnx")
    student = _pruned(teacher, 0.5)
    result = _run(student, teacher, SAMPLES / "digits_cnn.npz", epochs=1, bn_mode="train", val_split=0.2)
    old, new = _inits(student), _inits(result.model)
    stats = [n for n in old if n.endswith(("running_mean", "running_var", ".mean", ".var"))]
    assert stats and all(not np.array_equal(old[n], new[n]) for n in stats)
    frozen = _run(student, teacher, SAMPLES / "digits_cnn.npz", epochs=1, val_split=0.2)
    kept = _inits(frozen.model)
    assert all(np.array_equal(old[n], kept[n]) for n in stats)


def test_feature_matching(mlp: ir.Model) -> None:
    hidden = next(n.outputs[0].name for n in mlp.graph if n.op_type == "Relu")
    result = _run(_pruned(mlp), mlp, epochs=1, matches=(f"{hidden}={hidden}",))
    assert (
        result.details["teacher_fidelity"]["after"]["loss"]
        < result.details["teacher_fidelity"]["before"]["loss"]
    )
    with pytest.raises(ConfigError, match="--match: the teacher has no tensor named 'nope'"):
        _run(_pruned(mlp), mlp, epochs=1, matches=(f"{hidden}=nope",))


# --- losses in numbers -----------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _eval_loss(spec: TargetSpec, feed: dict[str, np.ndarray]) -> float:
    student = prepare_student(_load(MLP))
    models = build_step(student, spec, OptimizerSpec())
    sess = ort.InferenceSession(models.eval.SerializeToString(), providers=["CPUExecutionProvider"])
    params = {p.name: p.value for p in student.params}
    names = {"teacher": models.target_inputs.get("logits"), "labels": models.labels_input}
    named = {names.get(k, k) or k: v for k, v in feed.items()}
    named.update({models.match_inputs[k]: v for k, v in feed.items() if k in models.match_inputs})
    named = {k: v for k, v in named.items() if k in {i.name for i in models.eval.graph.input}}
    return float(sess.run([models.loss], {**named, **params})[0])


def _student_logits(x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(MLP), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_loss_value(temperature: float) -> None:
    x = np.load(MLP_DATA)["input"][:16]
    t = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32) * 3
    s = _student_logits(x).astype(np.float64)
    pt, ps = _softmax(t / temperature), _softmax(s / temperature)
    want = temperature**2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
    spec = TargetSpec(outputs=(("logits", "kl", None, ("batch", 10)),), temperature=temperature)
    assert _eval_loss(spec, {"input": x, "teacher": t}) == pytest.approx(want, rel=LOSS_RTOL)


def test_mse_and_cross_entropy_loss_values() -> None:
    x = np.load(MLP_DATA)["input"][:16]
    y = np.load(MLP_DATA)["labels"][:16]
    t = np.random.default_rng(1).standard_normal((16, 10)).astype(np.float32)
    s = _student_logits(x).astype(np.float64)
    mse = np.mean((s - t) ** 2)
    ce = -np.mean(np.log(_softmax(s))[np.arange(16), y])
    spec = TargetSpec(
        outputs=(("logits", "mse", None, ("batch", 10)),), labels=("logits", 10, None, ("batch",)), alpha=0.25
    )
    got = _eval_loss(spec, {"input": x, "teacher": t, "labels": y})
    assert got == pytest.approx(0.75 * mse + 0.25 * ce, rel=LOSS_RTOL)


# --- skips and errors ------------------------------------------------------------------------


def _if_model(*, same_name_in_else: bool = False) -> ir.Model:
    """x @ W, then an If whose then branch holds its own weight ``tw``."""
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["h", "tw"], ["o1"])],
        "then",
        [],
        [helper.make_tensor_value_info("o1", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.full(4, 2.0, np.float32), "tw")],
    )
    else_nodes = [helper.make_node("Identity", ["h"], ["o2"])]
    else_inits = []
    if same_name_in_else:  # a sibling body defines a value of the same name
        else_nodes = [helper.make_node("Mul", ["h", "tw"], ["o2"])]
        else_inits = [numpy_helper.from_array(np.full(4, 3.0, np.float32), "tw")]
    else_g = helper.make_graph(
        else_nodes,
        "else",
        [],
        [helper.make_tensor_value_info("o2", TensorProto.FLOAT, None)],
        initializer=else_inits,
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("If", ["cond"], ["logits"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "W"),
            numpy_helper.from_array(np.asarray(True), "cond"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(proto)


def test_labels_alone_pick_the_best_epoch_by_loss_not_by_agreement_with_the_teacher(tmp_path: Path) -> None:
    """Training a fresh model on labels only (--alpha 1, the model is its own --teacher): every
    epoch agrees less with the untrained teacher, so ranking epochs by that agreement kept the
    untrained weights; the loss ranks them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=np.argmax(x[:, :10], axis=1).astype(np.int64))
    fresh = ir.serde.deserialize_model(models.mlp(seed=3))
    result = _run(fresh, fresh, tmp_path / "d.npz", labels=True, alpha=1.0, epochs=20, lr=1e-2)
    fid = result.details["teacher_fidelity"]
    assert fid["after"]["loss"] < 0.7 * fid["before"]["loss"]
    assert fid["after"]["top1_agreement"] < 1.0  # it moved away from the untrained teacher
    assert result.changed


def test_if_branch_weights_train_and_are_written_back_in_their_branch(tmp_path: Path) -> None:
    student, teacher = _if_model(), _if_model()
    for w in weights(teacher):
        if w.name == "tw":
            w.value.const_value = ir.Tensor(np.full(4, 2.5, np.float32), name="tw")
    assert "tw" in [p.name for p in prepare_student(student).params]
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32))
    result = _run(student, teacher, tmp_path / "d.npz", epochs=3, lr=1e-2)
    trained = _inits(result.model)
    assert not np.allclose(trained["tw"], 2.0)
    assert "tw" in {c.details["weight"] for c in result.changed}
    then_branch = (
        next(n for n in result.model.graph if n.op_type == "If").attributes["then_branch"].as_graph()
    )
    assert "tw" in then_branch.initializers and "tw" not in result.model.graph.initializers


def test_body_weight_whose_name_another_body_defines_is_skipped() -> None:
    student = prepare_student(_if_model(same_name_in_else=True))
    reasons = [r for n, _, _, r in student.frozen if n == "tw"]
    assert reasons and all("defined in more than one graph" in r for r in reasons)


def _upsampling_model(seed: int) -> ir.Model:
    """x [N, 2, H, W] -> Conv stride 2 -> Relu -> ConvTranspose stride 2 -> Sigmoid: a detector
    head in miniature, whose spatial sizes are dynamic as exported detectors declare them."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1"], ["h"], name="down", pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("ConvTranspose", ["r", "W2"], ["u"], name="up", strides=[2, 2]),
            helper.make_node("Sigmoid", ["u"], ["y"]),
        ],
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.standard_normal((4, 2, 2, 2)).astype(np.float32), "W2"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def test_dynamic_spatial_sizes_train_at_the_size_of_the_rows(tmp_path: Path) -> None:
    """ConvTranspose's gradient needs static spatial sizes: the step graph takes them from the
    rows (here 8x8); the written model keeps its declared H and W."""
    student, teacher = _upsampling_model(0), _upsampling_model(1)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(2).standard_normal((32, 2, 8, 8)).astype(np.float32))
    result = _run(student, teacher, tmp_path / "d.npz", epochs=2, batch_size=8, lr=1e-2)
    assert {c.details["weight"] for c in result.changed} == {"W1", "W2"}
    shape = result.model.graph.inputs[0].shape
    assert [d if isinstance(d, int) else d.value for d in shape] == ["N", 2, "H", "W"]
    assert any("trained at the size of the --data rows (x [batch, 2, 8, 8])" in n for n in result.notes)
    fed = result.details["teacher_fidelity"]
    assert fed["after"]["loss"] < fed["before"]["loss"]


def test_rows_of_another_size_than_the_first_are_refused() -> None:
    with pytest.raises(DataError, match="input 'x' has rows of shape \\[8, 2, 6, 6\\] and others of"):
        _check_sizes({"x": np.zeros((8, 2, 6, 6), np.float32)}, {"x": (None, 2, 8, 8)})


# --- the command -----------------------------------------------------------------------------


def _cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["distill", *args])


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory: pytest.TempPathFactory, mlp: ir.Model) -> Path:
    path = tmp_path_factory.mktemp("distill") / "pruned.onnx"
    path.write_bytes(_bytes(_pruned(mlp)))
    return path


def test_cli_without_data_explains_and_exits_2(pruned_file: Path, tmp_path: Path) -> None:
    result = _cli(str(pruned_file), "--teacher", str(MLP), "-o", str(tmp_path / "o.onnx"))
    assert result.exit_code == 2
    assert "distill needs --data" in result.stderr and "representative" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_cli_json_report_and_output(pruned_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    args = [str(pruned_file), "--teacher", str(MLP), "--data", str(MLP_DATA), "-o", str(out), "--epochs", "3"]
    result = _cli(*args, "--json", "--no-latency", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["command"] == "distill" and report["output"]["written"]
    fid = report["details"]["teacher_fidelity"]
    assert fid["after"]["top1_agreement"] > fid["before"]["top1_agreement"]
    assert report["settings"]["config"]["teacher"] == str(MLP)
    again = tmp_path / "again.onnx"
    args2 = [a if a != str(out) else str(again) for a in args]
    assert _cli(*args2, "-q", "--no-latency", "--seed", "1").exit_code == 0
    assert out.read_bytes() == again.read_bytes()


def test_cli_gate_failure_writes_nothing(pruned_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    result = _cli(
        str(pruned_file),
        "--teacher",
        str(MLP),
        "--data",
        str(MLP_DATA),
        "-o",
        str(out),
        "--epochs",
        "1",
        "--max-error",
        "1e-9",
        "--no-latency",
        "-q",
    )
    assert result.exit_code == 3
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_verdict_advice_speaks_of_training(pruned_file: Path, tmp_path: Path) -> None:
    """distill has no search and no skipped list: its advice is about the training. The teacher
    as its own student: no epoch does better, the result is unchanged, and a KL of identical
    outputs reads 0, not -4e-08."""
    out = tmp_path / "self.onnx"
    args = [str(MLP), "--teacher", str(MLP), "--data", str(MLP_DATA), "-o", str(out), "--epochs", "1"]
    result = _cli(*args, "--json", "--no-latency")
    assert result.exit_code == 0, result.stderr
    verdict = json.loads(result.stdout)["verdict"]
    assert [f["kind"] for f in verdict["findings"]] == ["unchanged"]
    assert verdict["advice"] == [
        "no epoch did better than the student as it came on the validation rows (details.history has "
        "each epoch's validation loss): try a lower --lr (e.g. 10x) or more --epochs"
    ]
    notes = json.loads(result.stdout)["notes"]
    (loss,) = [n for n in notes if n.startswith("distillation loss against the teacher")]
    assert " -" not in loss.split(":")[1]  # no negative loss
    damaged = _cli(
        str(pruned_file), "--teacher", str(MLP), "--data", str(MLP_DATA), "-o", str(tmp_path / "d.onnx"),
        "--epochs", "1", "--lr", "1e-9", "--json", "--no-latency",
    )  # fmt: skip
    assert damaged.exit_code == 0, damaged.stderr
    verdict = json.loads(damaged.stdout)["verdict"]
    assert not verdict["sound"] and verdict["advice"][0].startswith("train on: more --epochs, another --lr")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss", "huber"], "Invalid value for '--loss': 'huber' is not one of 'auto', 'kl', 'mse'"),
        (["--match", "nonsense"], "--match 'nonsense': expected STUDENT_TENSOR=TEACHER_TENSOR"),
        (["--val-split", "1.5"], "--val-split must be in [0, 1)"),
        (["--alpha", "0.3"], "--alpha mixes in the label loss; it needs --labels NAME"),
        (["--patience", "2", "--val-split", "0"], "--patience needs validation rows"),
    ],
)
def test_cli_usage_errors_exit_2(pruned_file: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    result = _cli(
        str(pruned_file),
        "--teacher",
        str(MLP),
        "--data",
        str(MLP_DATA),
        "-o",
        str(tmp_path / "o.onnx"),
        *flags,
    )
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr


def test_cli_missing_labels_array_exits_1(pruned_file: Path, tmp_path: Path) -> None:
    result = _cli(
        str(pruned_file),
        "--teacher",
        str(MLP),
        "--data",
        str(MLP_DATA),
        "-o",
        str(tmp_path / "o.onnx"),
        "--labels",
        "nope",
    )
    assert result.exit_code == 1
    assert "--labels nope: --data" in result.stderr and "has no array 'nope'" in result.stderr


def test_progress_bar_descriptions_carry_figures_in_one_bar() -> None:
    from modelshrink import cli

    bars = cli._RichProgress()
    bars("distilling · epoch 1/2 loss 1.0", 1, 4)
    bars("distilling · epoch 2/2 loss 0.5", 3, 4)
    bars("measuring latency", 1, 2)
    assert len(bars._tasks) == 2
    task = bars._progress.tasks[0]
    assert task.description == "distilling · epoch 2/2 loss 0.5" and task.completed == 3


@pytest.mark.slow
def test_pipeline_through_stdin_and_stdout(pruned_file: Path) -> None:
    distill_cmd = [
        sys.executable,
        "-m",
        "modelshrink",
        "distill",
        "-",
        "--teacher",
        str(MLP),
        "--data",
        str(MLP_DATA),
        "-o",
        "-",
        "--epochs",
        "5",
        "-q",
        "--no-latency",
    ]
    first = subprocess.run(distill_cmd, input=pruned_file.read_bytes(), capture_output=True, check=False)
    assert first.returncode == 0, first.stderr.decode()
    compare = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelshrink",
            "compare",
            str(MLP),
            "-",
            "--data",
            str(MLP_DATA),
            "--json",
            "-q",
            "--no-latency",
        ],
        input=first.stdout,
        capture_output=True,
        check=False,
    )
    assert compare.returncode == 0, compare.stderr.decode()
    after = json.loads(compare.stdout)["fidelity"]["worst"]["top1_agreement"]
    before_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelshrink",
            "compare",
            str(MLP),
            str(pruned_file),
            "--data",
            str(MLP_DATA),
            "--json",
            "-q",
            "--no-latency",
        ],
        capture_output=True,
        check=False,
    )
    before = json.loads(before_run.stdout)["fidelity"]["worst"]["top1_agreement"]
    assert after > before and math.isfinite(after)


def test_old_opset_student_trains_through_a_converted_step_graph(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        initializer=inits,
    )
    teacher = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    )
    student = teacher.clone()
    student.graph.initializers["w1"].const_value = ir.Tensor(
        rng.standard_normal((8, 5)).astype(np.float32), name="w1"
    )
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((64, 5)).astype(np.float32))
    result = _run(student, teacher, tmp_path / "d.npz", epochs=3, lr=1e-2)
    assert any("the train step ran at opset 13 (the student uses 11)" in n for n in result.notes)
    assert ir.serde.serialize_model(result.model).opset_import[0].version == 11
    fid = result.details["teacher_fidelity"]
    assert fid["after"]["loss"] < fid["before"]["loss"]


def test_fixed_batch_dimension_trains_at_that_size(mlp: ir.Model, tmp_path: Path) -> None:
    proto = ir.serde.serialize_model(_pruned(mlp))
    for vi in [*proto.graph.input, *proto.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_value = 8
    fixed = ir.serde.deserialize_model(proto)
    result = _run(fixed, fixed, epochs=1, batch_size=32)
    assert any("fixed at 8: trained with batches of 8" in n for n in result.notes)
    assert result.details["steps"] == (360 - 32) // 8  # 32 validation rows: whole batches


def test_cli_teacher_from_stdin_is_refused(pruned_file: Path, tmp_path: Path) -> None:
    result = _cli(str(pruned_file), "--teacher", "-", "--data", str(MLP_DATA), "-o", str(tmp_path / "o.onnx"))
    assert result.exit_code == 2 and "--teacher must be a path" in result.stderr


def test_when_no_epoch_beats_the_start_the_student_is_kept(mlp: ir.Model) -> None:
    student = mlp.clone()  # already identical to the teacher: training can only make it worse
    before = _bytes(student)
    result = _run(student, mlp, epochs=3, optimizer="sgd", lr=0.5, schedule="constant")
    assert result.details["best_epoch"] == 0
    assert not result.changed and not result.modified
    assert _bytes(result.model) == before
    assert any("weights are kept unchanged" in n for n in result.notes)
