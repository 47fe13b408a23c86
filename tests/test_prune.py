"""``modelshrink prune``: exact sparsity, N:M patterns, structured surgery, skips, CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from modelshrink import api, io
from modelshrink.cli import app
from modelshrink.errors import ConfigError
from modelshrink.feeds import load_feeds
from modelshrink.gates import FLOOR_AGREEMENT, FLOOR_COSINE, Gates
from modelshrink.pipeline import RunOptions, session_for_model
from modelshrink.report import Report
from modelshrink.runtime import RuntimeOptions
from modelshrink.techniques import floor_search
from modelshrink.techniques.base import TechniqueContext, TechniqueResult
from modelshrink.techniques.prune import PruneConfig, prune
from modelshrink.techniques.prune.structured import removed_channels
from modelshrink.verify import Fidelity, Reference

import models

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
# Removing channels whose contribution is exactly zero must keep the outputs up to float
# rounding (unpruned models are compared bit for bit with assert_array_equal).
REWRITE_ATOL = 1e-5


# --- helpers --------------------------------------------------------------------------------


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return onnx.load_from_string(io.model_bytes(model))


def context_for(
    model: ir.Model, *, data: str | None = None, gates: Gates | None = None, samples: int = 4
) -> TechniqueContext:
    feeds = load_feeds(model, data=data, seed=0, samples=samples)
    runtime = RuntimeOptions()
    reference = Reference(session_for_model(model, runtime, label="original"), feeds, model)

    def evaluate(candidate: ir.Model) -> Fidelity:
        return reference.compare(session_for_model(candidate, runtime))

    return TechniqueContext(feeds=feeds, evaluate=evaluate, gates=gates or Gates(), runtime=runtime)


def run_prune(proto: onnx.ModelProto, config: PruneConfig, **ctx: object) -> TechniqueResult:
    model = to_ir(proto)
    return prune(model, config, context_for(model, **ctx))  # type: ignore[arg-type]


def ort_run(model: ir.Model | onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    raw = io.model_bytes(model) if isinstance(model, ir.Model) else model.SerializeToString()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(raw, so, providers=["CPUExecutionProvider"]).run(None, feed)


def checked(model: ir.Model) -> onnx.ModelProto:
    proto = to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def arrays(model: ir.Model) -> dict[str, np.ndarray]:
    """Every weight by name (initializers of all graphs and Constant values)."""
    from modelshrink.graph import weights

    return {w.name: np.array(w.numpy()) for w in weights(model)}


def sample(name: str) -> onnx.ModelProto:
    return onnx.load(str(SAMPLES / f"{name}.onnx"))


def sample_feed(name: str, count: int = 16) -> dict[str, np.ndarray]:
    with np.load(SAMPLES / f"{name}.npz") as npz:
        return {k: npz[k][:count] for k in npz.files if k != "labels"}


def matmul_model(weights: dict[str, np.ndarray], *, gemm_trans_b: bool = False) -> onnx.ModelProto:
    """x -> MatMul(W0) -> Relu -> Gemm(W1, transB as asked) -> y, shapes from the weights."""
    w0, w1 = weights["W0"], weights["W1"]
    k0 = w0.shape[0]
    n1 = w1.shape[0] if gemm_trans_b else w1.shape[1]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "W1"], ["y"], name="gemm", transB=int(gemm_trans_b)),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n1])],
        [models.init("W0", w0), models.init("W1", w1)],
    )
    return models._model(graph)


def random_weights(rng: np.random.Generator, *shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {f"W{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}


# --- unstructured ---------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.77, 0.95])
def test_layer_sparsity_is_exact_per_tensor(sparsity: float) -> None:
    rng = np.random.default_rng(1)
    proto = matmul_model(random_weights(rng, (37, 53), (29, 53)), gemm_trans_b=True)
    result = run_prune(proto, PruneConfig(sparsity=sparsity, min_elements=0))
    after = arrays(result.model)
    assert len(result.changed) == 2
    for name in ("W0", "W1"):
        zeros = int(np.sum(after[name] == 0))
        assert abs(zeros - sparsity * after[name].size) <= 1, (name, zeros)
    assert abs(result.details["achieved_sparsity"] - sparsity) <= 2 / (37 * 53 + 29 * 53)
    layers = {row["weight"]: row for row in result.details["layers"]}
    assert layers["W0"]["zeros"] == int(np.sum(after["W0"] == 0))
    checked(result.model)


def test_layer_sparsity_zeros_the_smallest_magnitudes() -> None:
    rng = np.random.default_rng(2)
    weights = random_weights(rng, (16, 64), (8, 64))
    result = run_prune(matmul_model(weights, gemm_trans_b=True), PruneConfig(sparsity=0.6, min_elements=0))
    after = arrays(result.model)
    for name, before in weights.items():
        pruned = after[name] == 0
        assert np.abs(before[pruned]).max() <= np.abs(before[~pruned]).min()
        np.testing.assert_array_equal(after[name][~pruned], before[~pruned])


def test_global_scope_uses_one_threshold() -> None:
    rng = np.random.default_rng(3)
    weights = {"W0": rng.standard_normal((32, 40)).astype(np.float32)}
    weights["W1"] = (0.1 * rng.standard_normal((10, 40))).astype(np.float32)  # small: loses more
    result = run_prune(
        matmul_model(weights, gemm_trans_b=True), PruneConfig(sparsity=0.5, scope="global", min_elements=0)
    )
    after = arrays(result.model)
    total = sum(w.size for w in weights.values())
    zeros = sum(int(np.sum(after[n] == 0)) for n in weights)
    assert abs(zeros - 0.5 * total) <= len(weights)
    pruned = np.concatenate([np.abs(weights[n][after[n] == 0]) for n in weights])
    kept = np.concatenate([np.abs(weights[n][after[n] != 0]) for n in weights])
    assert pruned.max() <= kept.min()
    assert np.mean(after["W1"] == 0) > np.mean(after["W0"] == 0)


def test_zero_sparsity_changes_nothing() -> None:
    proto = sample("digits_cnn")
    result = run_prune(proto, PruneConfig(sparsity=0.0, min_elements=0))
    assert not result.changed
    feed = sample_feed("digits_cnn")
    for a, b in zip(ort_run(proto, feed), ort_run(result.model, feed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_input_model_is_not_modified() -> None:
    model = to_ir(sample("digits_mlp"))
    before = io.model_bytes(model)
    prune(model, PruneConfig(sparsity=0.7, min_elements=0), context_for(model))
    assert io.model_bytes(model) == before


def test_two_runs_give_identical_bytes() -> None:
    proto = sample("tiny_transformer")
    one = run_prune(proto, PruneConfig(sparsity=0.6, scope="global"))
    two = run_prune(proto, PruneConfig(sparsity=0.6, scope="global"))
    assert io.model_bytes(one.model) == io.model_bytes(two.model)


def test_note_says_no_dense_speedup() -> None:
    result = run_prune(sample("digits_mlp"), PruneConfig(sparsity=0.8))
    assert any("no speed-up" in note and "zlib" in note for note in result.notes)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "tiny_transformer"])
def test_unstructured_on_sample_models_runs(name: str) -> None:
    result = run_prune(sample(name), PruneConfig(sparsity=0.5))
    assert result.changed
    checked(result.model)
    outputs = ort_run(result.model, sample_feed(name))
    assert all(np.isfinite(o).all() for o in outputs)


def test_constant_nodes_and_subgraphs_are_pruned_consistently() -> None:
    proto = models.constant_and_subgraph()
    result = run_prune(proto, PruneConfig(sparsity=0.5, min_elements=0))
    after = arrays(result.model)
    by_weight = {c.details["weight"]: c for c in result.changed}
    assert set(by_weight) == {"w_const", "w_then"}
    assert by_weight["w_const"].details["storage"] == "constant"
    assert by_weight["w_const"].details["shared_by"] == ["main_mm", "else_mm"]
    assert by_weight["w_then"].details["subgraph"] == "then"
    assert np.sum(after["w_const"] == 0) == 32 and np.sum(after["w_then"] == 0) == 32
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    checked(result.model)
    for flag, w2 in ((True, after["w_then"]), (False, after["w_const"])):
        (y,) = ort_run(result.model, {"x": x, "flag": np.array(flag)})
        np.testing.assert_allclose(y, (x @ after["w_const"]) @ w2, rtol=1e-5, atol=1e-5)


def _skip_reasons(result: TechniqueResult) -> dict[str, str]:
    return {s.node: s.reason for s in result.skipped}


def test_skip_reasons() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W_small"], ["a"], name="small"),
            helper.make_node("MatMul", ["a", "W_input"], ["b"], name="overridable"),
            helper.make_node("MatMul", ["b", "W_shared"], ["c"], name="shared"),
            helper.make_node("Add", ["c", "W_shared"], ["d"], name="add_shared"),
            helper.make_node("MatMul", ["d", "W_excl"], ["e"], name="head_proj"),
            helper.make_node("MatMul", ["e", "W_ok"], ["f"], name="ok"),
            helper.make_node("MatMul", ["xi", "W_int"], ["yi"], name="int_mm"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8]),
            helper.make_tensor_value_info("W_input", TensorProto.FLOAT, [8, 8]),
            helper.make_tensor_value_info("xi", TensorProto.INT32, [8, 8]),
        ],
        [
            helper.make_tensor_value_info("f", TensorProto.FLOAT, [8, 8]),
            helper.make_tensor_value_info("yi", TensorProto.INT32, [8, 8]),
        ],
        [
            models.init("W_small", w[:, :8]),
            models.init("W_input", w),
            models.init("W_shared", w),
            models.init("W_excl", w),
            models.init("W_ok", w),
            models.init("W_int", np.arange(64, dtype=np.int32).reshape(8, 8)),
        ],
    )
    proto = models._model(graph)
    result = run_prune(proto, PruneConfig(sparsity=0.5, min_elements=64, exclude=("head*",)))
    reasons = _skip_reasons(result)
    assert [c.node for c in result.changed] == ["small", "ok"]
    assert "also a graph input" in reasons["overridable"]
    assert "also used by Add 'add_shared'" in reasons["shared"]
    assert "excluded by --exclude 'head*'" in reasons["head_proj"]
    assert "int32, not a float tensor" in reasons["int_mm"]
    small = run_prune(proto, PruneConfig(sparsity=0.5, min_elements=65))
    assert "fewer than --min-elements 65" in _skip_reasons(small)["small"]


def test_exclude_matches_op_types_and_weight_names() -> None:
    proto = sample("digits_cnn")
    by_op = run_prune(proto, PruneConfig(sparsity=0.5, exclude=("Conv",)))
    assert {c.op_type for c in by_op.changed} == {"Gemm"}
    by_weight = run_prune(proto, PruneConfig(sparsity=0.5, exclude=("fc1.weight",)))
    assert "fc1" not in {c.node for c in by_weight.changed}
    assert "excluded by --exclude 'fc1.weight'" in _skip_reasons(by_weight)["fc1"]


def test_op_types_widen_what_is_pruned() -> None:
    proto = sample("tiny_transformer")
    default = run_prune(proto, PruneConfig(sparsity=0.5))
    assert "tok_emb_gather" not in {c.node for c in default.changed}
    wider = run_prune(proto, PruneConfig(sparsity=0.5, op_types=("MatMul", "Gemm", "Gather"), min_elements=0))
    assert "tok_emb_gather" in {c.node for c in wider.changed}


# --- N:M ------------------------------------------------------------------------------------


def _groups_ok(weight: np.ndarray, n: int, m: int) -> bool:
    """Rows of a [rows, K] matrix: at most n non-zeros in every m consecutive entries."""
    rows = weight.reshape(weight.shape[0], -1, m)
    return bool((np.count_nonzero(rows, axis=-1) <= n).all())


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_holds_along_the_reduction_dimension(n: int, m: int) -> None:
    rng = np.random.default_rng(5)
    # MatMul W0 [K=32, N=24] along K; Gemm with transB=1: W1 [N=16, K=24] along K (axis 1)
    weights = random_weights(rng, (32, 24), (16, 24))
    result = run_prune(
        matmul_model(weights, gemm_trans_b=True), PruneConfig(pattern=f"{n}:{m}", min_elements=0)
    )
    after = arrays(result.model)
    assert _groups_ok(after["W0"].T, n, m)  # columns of W0 are the K-rows
    assert _groups_ok(after["W1"], n, m)
    for name in weights:
        assert np.sum(after[name] == 0) == after[name].size * (m - n) // m
        # the kept ones in each group are the largest
        rows = (after[name].T if name == "W0" else after[name]).reshape(-1, m)
        orig = (weights[name].T if name == "W0" else weights[name]).reshape(-1, m)
        for r, o in zip(rows, orig, strict=True):
            assert np.abs(o[r == 0]).max() <= np.abs(o[r != 0]).min()
    checked(result.model)


def test_nm_gemm_without_transb_groups_along_axis0() -> None:
    rng = np.random.default_rng(6)
    weights = random_weights(rng, (8, 12), (12, 20))  # Gemm W1 [K=12, N=20]
    result = run_prune(matmul_model(weights), PruneConfig(pattern="2:4", min_elements=0))
    after = arrays(result.model)
    assert _groups_ok(after["W1"].T, 2, 4)


def test_nm_conv_groups_along_input_channels_times_kernel() -> None:
    result = run_prune(sample("digits_cnn"), PruneConfig(pattern="2:4", min_elements=0))
    after = arrays(result.model)
    conv2 = after["conv2.weight"]  # [32, 16, 3, 3]: K = 16*3*3 = 144
    assert _groups_ok(conv2.reshape(32, -1), 2, 4)
    assert _groups_ok(after["fc1.weight"], 2, 4)  # Gemm transB=1: [64, K=1024]
    reasons = _skip_reasons(result)
    assert "conv1" in reasons and "K=9" in reasons["conv1"] and "not a multiple of M=4" in reasons["conv1"]
    checked(result.model)


def test_nm_skips_when_k_is_not_a_multiple_of_m() -> None:
    rng = np.random.default_rng(7)
    result = run_prune(
        matmul_model(random_weights(rng, (30, 8), (8, 8))), PruneConfig(pattern="2:4", min_elements=0)
    )
    assert [c.node for c in result.changed] == ["gemm"]
    assert "K=30) is not a multiple of M=4" in _skip_reasons(result)["mm"]


def test_nm_on_transformer_everywhere() -> None:
    result = run_prune(sample("tiny_transformer"), PruneConfig(pattern="2:4"))
    after = arrays(result.model)
    assert len(result.changed) == 12
    for change in result.changed:
        w = after[change.details["weight"]]
        assert _groups_ok(w.T, 2, 4), change.node  # MatMul W[K, N]: along K
    checked(result.model)


# --- config and CLI -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"sparsity": 1.0}, "--sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "--sparsity must be in [0, 1)"),
        ({"scope": "model"}, "--scope must be one of"),
        ({"pattern": "2-4"}, "--pattern must look like N:M"),
        ({"pattern": "4:4"}, "0 <= N < M"),
        ({"pattern": "2:4", "sparsity": 0.5}, "drop --sparsity"),
        ({"min_elements": -1}, "--min-elements must be >= 0"),
        ({"op_types": ()}, "--op-types needs at least one"),
    ],
)
def test_config_errors_name_the_flag(kwargs: dict, fragment: str) -> None:
    from modelshrink.errors import ConfigError

    with pytest.raises(ConfigError, match=None) as info:
        PruneConfig(**kwargs)
    assert fragment in info.value.message


def test_cli_prune_json(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "p.onnx"
    result = runner.invoke(
        app,
        [
            "prune",
            str(SAMPLES / "digits_mlp.onnx"),
            "-o",
            str(out),
            "--sparsity",
            "0.8",
            "--json",
            "--no-latency",
            "--data",
            str(SAMPLES / "digits_mlp.npz"),
            "--exclude",
            "fc3",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["command"] == "prune"
    assert report["details"]["achieved_sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert report["ratios"]["size_zlib"] < 0.45
    assert {c["node"] for c in report["changes"]} == {"fc1", "fc2"}
    assert any("no speed-up" in n for n in report["notes"])
    assert onnx.load(str(out)).metadata_props[0].key == "classes"


def test_cli_usage_errors_exit_2(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "p.onnx"
    for args in (["--sparsity", "1.5"], ["--pattern", "2:4", "--sparsity", "0.5"], ["--scope", "all"]):
        result = runner.invoke(app, ["prune", str(SAMPLES / "digits_mlp.onnx"), "-o", str(out), *args])
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ")
    assert not out.exists()


def test_cli_gate_failure_writes_nothing(runner: CliRunner, tmp_path: Path, snapshot) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = runner.invoke(
        app,
        [
            "prune",
            str(SAMPLES / "digits_mlp.onnx"),
            "-o",
            str(out_dir / "p.onnx"),
            "--max-size-ratio",
            "0.5",
            "--no-latency",
            "-q",
        ],
    )
    assert result.exit_code == 3
    assert "--max-size-ratio" in result.stderr
    assert snapshot(out_dir) == {}


@pytest.mark.slow
def test_pipeline_through_stdin_and_stdout(tmp_path: Path) -> None:
    src = (SAMPLES / "digits_cnn.onnx").read_bytes()
    cmd = [sys.executable, "-m", "modelshrink"]
    pruned = subprocess.run(
        [*cmd, "prune", "-", "-o", "-", "--pattern", "2:4", "-q", "--no-latency"],
        input=src,
        capture_output=True,
        check=False,
    )
    assert pruned.returncode == 0, pruned.stderr.decode()
    (tmp_path / "p.onnx").write_bytes(pruned.stdout)
    compared = subprocess.run(
        [
            *cmd,
            "compare",
            str(SAMPLES / "digits_cnn.onnx"),
            "-",
            "--json",
            "--no-latency",
            "--data",
            str(SAMPLES / "digits_cnn.npz"),
        ],
        input=pruned.stdout,
        capture_output=True,
        check=False,
    )
    assert compared.returncode == 0, compared.stderr.decode()
    report = json.loads(compared.stdout)
    assert report["result"]["size_zlib_bytes"] < report["original"]["size_zlib_bytes"]
    assert report["fidelity"]["real_data"] is True


# --- structured: generated architectures ------------------------------------------------------


class Net:
    """A tiny graph builder for CNN/MLP families with seeded weights.

    With ``dead=True`` every odd output channel of every Conv/Gemm/MatMul has zero weights and
    bias, so removing exactly those channels (what 50 % structured L1 pruning removes) must
    leave the outputs unchanged up to float rounding: a check of the whole surgery.
    """

    def __init__(self, seed: int = 0, *, dead: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.dead = dead
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def weight(self, shape: tuple[int, ...], out_axis: int | None, scale: float = 0.5, per: int = 1) -> str:
        """A weight; when dead, output channels o with (o // per) odd are zero (per: dw multiplier)."""
        w = (scale * self.rng.standard_normal(shape) / np.sqrt(max(1, np.prod(shape[1:])))).astype(np.float32)
        if self.dead and out_axis is not None:
            dead = (np.arange(shape[out_axis]) // per) % 2 == 1
            np.moveaxis(w, out_axis, 0)[dead] = 0
        name = self.name("w")
        self.inits.append(models.init(name, w))
        return name

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, *, group: int = 1, stride: int = 1) -> str:
        per = cout // group if group > 1 else 1
        w = self.weight((cout, cin // group, k, k), 0, per=per)
        b = self.weight((cout,), 0, 0.1, per=per)
        pad = k // 2
        return self.node(
            "Conv", [x, w, b], kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=group
        )

    def deconv(self, x: str, cin: int, cout: int) -> str:
        """ConvTranspose 2x2 stride 2 (weight [Cin, Cout, 2, 2])."""
        w = self.weight((cin, cout, 2, 2), 1)
        b = self.weight((cout,), 0, 0.1)
        return self.node("ConvTranspose", [x, w, b], kernel_shape=[2, 2], strides=[2, 2])

    def bn(self, x: str, c: int) -> str:
        params = [
            1 + 0.1 * self.rng.standard_normal(c),
            0.1 * self.rng.standard_normal(c),
            0.1 * self.rng.standard_normal(c),
            1 + 0.1 * self.rng.random(c),
        ]
        names = []
        for p in params:
            names.append(self.name("bn_p"))
            self.inits.append(models.init(names[-1], p.astype(np.float32)))
        return self.node("BatchNormalization", [x, *names])

    def gemm(self, x: str, n_in: int, n_out: int) -> str:
        return self.node("Gemm", [x, self.weight((n_out, n_in), 0), self.weight((n_out,), 0, 0.1)], transB=1)

    def matmul(self, x: str, n_in: int, n_out: int, bias: bool = True) -> str:
        y = self.node("MatMul", [x, self.weight((n_in, n_out), 1)])
        return self.node("Add", [y, self.weight((n_out,), 0, 0.1)]) if bias else y

    def head(self, x: str, c: int, classes: int = 10) -> str:
        pooled = self.node("GlobalAveragePool", [x])
        flat = self.node("Flatten", [pooled])
        return self.gemm(flat, c, classes)

    def model(self, out: str, shape: list, *, inputs: list | None = None, opset: int = 17) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["logits"], name="output"))
        graph = helper.make_graph(
            self.nodes,
            "net",
            inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
            self.inits,
        )
        return models._model(graph, opset=opset)


def resnet(dead: bool = False) -> onnx.ModelProto:
    """Stem, an identity residual block, a downsampling block with a 1x1 shortcut; BN only if not dead."""
    n = Net(1, dead=dead)
    bn = (lambda x, c: x) if dead else n.bn
    x = n.node("Relu", [bn(n.conv("x", 3, 16), 16)])
    y = n.node("Relu", [bn(n.conv(x, 16, 16), 16)])
    y = bn(n.conv(y, 16, 16), 16)
    x = n.node("Relu", [n.node("Add", [x, y])])
    y = n.node("Relu", [bn(n.conv(x, 16, 32, stride=2), 32)])
    y = bn(n.conv(y, 32, 32), 32)
    short = bn(n.conv(x, 16, 32, k=1, stride=2), 32)
    x = n.node("Relu", [n.node("Add", [short, y])])
    return n.model(n.head(x, 32), ["N", 10])


def densenet(dead: bool = False) -> onnx.ModelProto:
    """Two dense layers (Concat of all previous features), a 1x1 transition and pooling."""
    n = Net(2, dead=dead)
    x = n.node("Relu", [n.conv("x", 3, 16)])
    y1 = n.node("Relu", [n.conv(x, 16, 8)])
    c1 = n.node("Concat", [x, y1], axis=1)
    y2 = n.node("Relu", [n.conv(c1, 24, 8)])
    c2 = n.node("Concat", [x, y1, y2], axis=1)
    t = n.node(
        "AveragePool", [n.node("Relu", [n.conv(c2, 32, 16, k=1)])], kernel_shape=[2, 2], strides=[2, 2]
    )
    return n.model(n.head(t, 16), ["N", 10])


def mobilenet(dead: bool = False) -> onnx.ModelProto:
    """Depthwise-separable blocks, one depthwise Conv with channel multiplier 2."""
    n = Net(3, dead=dead)
    x = n.node("Relu", [n.conv("x", 3, 16)])
    x = n.node("Relu", [n.conv(x, 16, 16, group=16)])  # depthwise: follows its input
    x = n.node("Relu", [n.conv(x, 16, 32, k=1)])
    x = n.node("Relu", [n.conv(x, 32, 64, group=32)])  # depthwise, multiplier 2
    x = n.node("Relu", [n.conv(x, 64, 32, k=1)])
    return n.model(n.head(x, 32), ["N", 10])


def inception(dead: bool = False) -> onnx.ModelProto:
    """Parallel 1x1 / 1x1-3x3 / pool-1x1 branches joined by Concat."""
    n = Net(4, dead=dead)
    x = n.node("Relu", [n.conv("x", 3, 16)])
    b1 = n.node("Relu", [n.conv(x, 16, 8, k=1)])
    b2 = n.node("Relu", [n.conv(n.node("Relu", [n.conv(x, 16, 8, k=1)]), 8, 8)])
    pooled = n.node("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b3 = n.node("Relu", [n.conv(pooled, 16, 8, k=1)])
    cat = n.node("Concat", [b1, b2, b3], axis=1)
    y = n.node("Relu", [n.conv(cat, 24, 16)])
    return n.model(n.head(y, 16), ["N", 10])


def flatten_mlp(dead: bool = False, *, reshape: bool = False) -> onnx.ModelProto:
    """Conv -> (Flatten | Reshape [-1, C*H*W]) -> MatMul+Add -> Relu -> Gemm: a channel is a block."""
    n = Net(5, dead=dead)
    x = n.node("MaxPool", [n.node("Relu", [n.conv("x", 3, 8)])], kernel_shape=[2, 2], strides=[2, 2])
    if reshape:
        shape = n.name("shape")
        n.inits.append(models.init(shape, np.array([-1, 8 * 4 * 4], dtype=np.int64)))
        flat = n.node("Reshape", [x, shape])
    else:
        flat = n.node("Flatten", [x])
    h = n.node("Relu", [n.matmul(flat, 128, 32)])
    return n.model(n.gemm(h, 32, 10), ["N", 10])


def ffn(dead: bool = False) -> onnx.ModelProto:
    """A transformer FFN block on [N, seq, 16]: MatMul 16->64 + Add + Gelu + MatMul 64->16 + residual."""
    n = Net(6, dead=dead)
    h = n.node("Gelu", [n.matmul("x", 16, 64)])
    y = n.matmul(h, 64, 16)
    out = n.node("Add", ["x", y])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])]
    return n.model(out, ["N", 4, 16], inputs=inputs, opset=20)


def squeeze_excite(dead: bool = False) -> onnx.ModelProto:
    """Conv -> SE (GAP, 1x1 reduce, 1x1 expand, Sigmoid) -> Mul: the expand conv is tied to the trunk."""
    n = Net(7, dead=dead)
    x = n.node("Relu", [n.conv("x", 3, 16)])
    s = n.node("GlobalAveragePool", [x])
    s = n.node("Relu", [n.conv(s, 16, 8, k=1)])
    s = n.node("Sigmoid", [n.conv(s, 8, 16, k=1)])
    y = n.node("Mul", [x, s])
    y = n.node("Relu", [n.conv(y, 16, 16)])
    return n.model(n.head(y, 16), ["N", 10])


def unet(dead: bool = False) -> onnx.ModelProto:
    """Down (stride-2 Conv), up (ConvTranspose) and a skip Concat."""
    n = Net(8, dead=dead)
    x = n.node("Relu", [n.conv("x", 3, 8)])
    d = n.node("Relu", [n.conv(x, 8, 16, stride=2)])
    u = n.node("Relu", [n.deconv(d, 16, 8)])
    y = n.node("Relu", [n.conv(n.node("Concat", [x, u], axis=1), 16, 8)])
    return n.model(n.head(y, 8), ["N", 10])


def reshaped_bias(dead: bool = False) -> onnx.ModelProto:
    """Paddle-style: Conv without bias + Add(Reshape(bias [C], [1, C, 1, 1]))."""
    n = Net(9, dead=dead)
    x = "x"
    for cin, cout in ((3, 16), (16, 16)):
        w = n.weight((cout, cin, 3, 3), 0)
        y = n.node("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        shape = n.name("shape")
        n.inits.append(models.init(shape, np.array([1, cout, 1, 1], dtype=np.int64)))
        b = n.node("Reshape", [n.weight((cout,), 0, 0.1), shape])
        x = n.node("Relu", [n.node("Add", [y, b])])
    return n.model(n.head(x, 16), ["N", 10])


ARCHITECTURES = {
    "unet": unet,
    "reshaped_bias": reshaped_bias,
    "resnet": resnet,
    "densenet": densenet,
    "mobilenet": mobilenet,
    "inception": inception,
    "flatten_mlp": flatten_mlp,
    "reshape_mlp": lambda dead=False: flatten_mlp(dead, reshape=True),
    "ffn": ffn,
    "squeeze_excite": squeeze_excite,
}


def _feed(proto: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    feed = {}
    for value in proto.graph.input:
        dims = [d.dim_value or batch for d in value.type.tensor_type.shape.dim]
        feed[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feed


def _param_count(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_structured_removing_dead_channels_keeps_outputs(arch: str) -> None:
    proto = ARCHITECTURES[arch](True)
    result = run_prune(proto, PruneConfig(structured=True, sparsity=0.5, min_elements=0, importance="l1"))
    out = checked(result.model)
    assert result.details["channels_removed"] > 0
    assert _param_count(out) < _param_count(proto)
    feed = _feed(proto)
    for a, b in zip(ort_run(proto, feed), ort_run(out, feed), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=REWRITE_ATOL, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_structured_zero_percent_is_identical(arch: str) -> None:
    proto = ARCHITECTURES[arch]()
    model = to_ir(proto)
    result = prune(model, PruneConfig(structured=True, sparsity=0.0, min_elements=0), context_for(model))
    assert not result.changed
    assert io.model_bytes(result.model) == io.model_bytes(model)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_structured_half_runs_and_shrinks(arch: str) -> None:
    proto = ARCHITECTURES[arch]()
    result = run_prune(proto, PruneConfig(structured=True, sparsity=0.5, min_elements=0))
    out = checked(result.model)
    assert _param_count(out) < 0.75 * _param_count(proto)
    feed = _feed(proto)
    for a, b in zip(ort_run(proto, feed), ort_run(out, feed), strict=True):
        assert a.shape == b.shape and np.isfinite(b).all()


def _inits(model: ir.Model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(v.const_value.shape) for name, v in model.graph.initializers.items() if v.const_value}


def test_structured_sample_cnn_shapes() -> None:
    result = run_prune(sample("digits_cnn"), PruneConfig(structured=True, sparsity=0.5, min_elements=0))
    shapes = _inits(result.model)
    assert shapes["conv1.weight"] == (8, 1, 3, 3)
    assert shapes["conv2.weight"] == (16, 8, 3, 3)
    assert shapes["res.weight"] == (16, 16, 3, 3)  # tied to conv2 by the residual Add
    assert shapes["bn_res.mean"] == (16,) and shapes["bn2.var"] == (16,)
    assert shapes["conv3.weight"] == (32, 16, 3, 3)
    assert shapes["fc1.weight"] == (32, 32 * 4 * 4)  # Flatten: each channel is a block of 16
    assert shapes["fc2.weight"] == (10, 32)
    groups = result.details["groups"]
    assert ["conv2", "res"] in [g["producers"] for g in groups]
    assert "reach graph output 'logits'" in _skip_reasons(result)["fc2"]
    out = checked(result.model)
    (logits,) = ort_run(out, sample_feed("digits_cnn"))
    assert logits.shape == (16, 10)


def test_structured_keeps_a_multiple_of_the_cpu_channel_block() -> None:
    assert [removed_channels(c, 0.3, 16) for c in (16, 24, 31, 32, 64, 250, 256)] == [5, 7, 9, 16, 16, 74, 80]
    assert [removed_channels(c, 0.3) for c in (32, 64, 250, 256)] == [10, 19, 75, 77]
    assert removed_channels(64, 0.95, 16) == 48  # at least one block stays
    # digits_cnn at 0.4: the conv2+res group (32 channels) keeps 19 exactly, 16 rounded; conv3 and
    # fc1 (64 each) 38 and 32
    rounded = _inits(run_prune(sample("digits_cnn"), PruneConfig(structured=True, sparsity=0.4)).model)
    exact = _inits(
        run_prune(sample("digits_cnn"), PruneConfig(structured=True, sparsity=0.4, channel_multiple=1)).model
    )
    assert [rounded[f"{n}.weight"][0] for n in ("conv2", "res", "conv3", "fc1")] == [16, 16, 32, 32]
    assert [exact[f"{n}.weight"][0] for n in ("conv2", "res", "conv3", "fc1")] == [19, 19, 38, 38]
    with pytest.raises(ConfigError, match="--channel-multiple must be >= 1"):
        PruneConfig(structured=True, channel_multiple=0)


def test_structured_prunes_the_transformer_ffn_only() -> None:
    result = run_prune(sample("tiny_transformer"), PruneConfig(structured=True, sparsity=0.5))
    shapes = _inits(result.model)
    for block in (0, 1):
        assert shapes[f"blocks.{block}.ffn.fc1.weight"] == (64, 128)
        assert shapes[f"blocks.{block}.ffn.fc1.bias"] == (128,)
        assert shapes[f"blocks.{block}.ffn.fc2.weight"] == (128, 64)
        assert shapes[f"blocks.{block}.attn.q.weight"] == (64, 64)
    reasons = _skip_reasons(result)
    assert "splits or moves the channel axis" in reasons["blocks.0.attn.q_matmul"]
    assert "attn_residual" in reasons["blocks.0.attn.o_matmul"]
    out = checked(result.model)
    feed = sample_feed("tiny_transformer")
    logits, pooled = ort_run(out, feed)
    assert logits.shape == (16, 4) and pooled.shape == (16, 64)


def test_structured_keeps_value_info_right() -> None:
    proto = onnx.shape_inference.infer_shapes(resnet())
    assert len(proto.graph.value_info) > 10
    result = run_prune(proto, PruneConfig(structured=True, sparsity=0.5, min_elements=0))
    out = checked(result.model)
    fresh = {v.name: v for v in onnx.shape_inference.infer_shapes(out, strict_mode=True).graph.value_info}
    declared = {v.name: v for v in out.graph.value_info}
    assert declared
    for name, info in declared.items():
        dims = [d.dim_value or d.dim_param for d in info.type.tensor_type.shape.dim]
        want = [d.dim_value or d.dim_param for d in fresh[name].type.tensor_type.shape.dim]
        assert dims == want or not dims, name


def test_structured_weights_in_constant_nodes() -> None:
    proto = models.mlp(sizes=(16, 32, 10))
    w0 = next(t for t in proto.graph.initializer if t.name == "W0")
    proto.graph.initializer.remove(w0)
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["W0"], name="w0_const", value=w0))
    result = run_prune(proto, PruneConfig(structured=True, sparsity=0.5, min_elements=0))
    const = next(n for n in result.model.graph if n.op_type == "Constant")
    assert tuple(const.attributes["value"].as_tensor().shape) == (16, 16)
    assert _inits(result.model)["W1"] == (16, 10)
    checked(result.model)


def test_structured_skips_with_reasons() -> None:
    # main_mm's output is read inside an If branch, and its weight is shared with it
    sub = run_prune(
        models.constant_and_subgraph(), PruneConfig(structured=True, sparsity=0.5, min_elements=0)
    )
    assert "inside a subgraph" in _skip_reasons(sub)["main_mm"]
    assert "--structured prunes the main graph only" in _skip_reasons(sub)["then_mm"]
    assert not sub.changed
    # grouped Conv and a Split on the channels
    n = Net(10)
    stem = n.conv("x", 3, 16)
    grouped = n.conv(n.node("Relu", [stem]), 16, 16, group=4)
    last = n.conv(grouped, 16, 8)
    a, b = "split_a", "split_b"
    n.nodes.append(
        helper.make_node("Split", [n.node("Relu", [last])], [a, b], name="split", axis=1, num_outputs=2)
    )
    z = n.node("Add", [a, b])
    result = run_prune(
        n.model(n.head(z, 4), ["N", 10], opset=18), PruneConfig(structured=True, sparsity=0.5, min_elements=0)
    )
    reasons = _skip_reasons(result)
    assert "grouped Conv (group=4)" in reasons[grouped]
    assert "grouped Conv (group=4)" in reasons[stem]  # its channels are tied by group there
    assert "Split 'split' splits the channels" in reasons[last]
    assert not result.changed
    checked(result.model)


def test_structured_activation_importance_with_data() -> None:
    data = str(SAMPLES / "digits_cnn.npz")
    result = run_prune(
        sample("digits_cnn"), PruneConfig(structured=True, sparsity=0.25), data=data, samples=16
    )
    assert result.details["importance"] == "activation"
    weight_based = run_prune(
        sample("digits_cnn"), PruneConfig(structured=True, sparsity=0.25, importance="l2")
    )
    assert weight_based.details["importance"] == "l2"
    checked(result.model)


def test_structured_two_runs_identical() -> None:
    one = run_prune(sample("digits_cnn"), PruneConfig(structured=True, sparsity=0.5, min_elements=0))
    two = run_prune(sample("digits_cnn"), PruneConfig(structured=True, sparsity=0.5, min_elements=0))
    assert io.model_bytes(one.model) == io.model_bytes(two.model)


def test_cli_structured(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "s.onnx"
    result = runner.invoke(
        app,
        [
            "prune",
            str(SAMPLES / "digits_cnn.onnx"),
            "-o",
            str(out),
            "--structured",
            "--sparsity",
            "0.5",
            "--min-elements",
            "0",
            "--json",
            "--no-latency",
            "--importance",
            "l1",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ratios"]["params"] < 0.35 and report["ratios"]["size"] < 0.4
    assert report["details"]["mode"] == "structured"
    no_data = runner.invoke(
        app,
        [
            "prune",
            str(SAMPLES / "digits_cnn.onnx"),
            "-o",
            str(out),
            "--force",
            "--structured",
            "--importance",
            "activation",
        ],
    )
    assert no_data.exit_code == 2 and "--importance activation needs real inputs" in no_data.stderr


# --- sparse storage ---------------------------------------------------------------------------


def _sparse_constants(proto: onnx.ModelProto) -> int:
    from modelshrink.io.sparse import _proto_graphs

    return sum(
        1
        for g in _proto_graphs(proto.graph)
        for n in g.node
        if n.op_type == "Constant" and any(a.name == "sparse_value" for a in n.attribute)
    )


def test_sparse_storage_is_smaller_and_loads_in_onnxruntime() -> None:
    proto = sample("digits_mlp")
    dense = run_prune(proto, PruneConfig(sparsity=0.9))
    sparse = run_prune(proto, PruneConfig(sparsity=0.9, sparse_storage=True))
    dense_bytes, sparse_bytes = io.model_bytes(dense.model), io.model_bytes(sparse.model)
    assert len(sparse_bytes) < 0.4 * len(dense_bytes)
    out = onnx.load_from_string(sparse_bytes)
    assert _sparse_constants(out) == 3
    assert not any(t.metadata_props for t in out.graph.initializer)
    onnx.checker.check_model(out, full_check=True)
    feed = sample_feed("digits_mlp")
    for a, b in zip(ort_run(onnx.load_from_string(dense_bytes), feed), ort_run(out, feed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert {row["stored"] for row in sparse.details["layers"]} == {"sparse"}
    assert any("--sparse-storage" in n for n in sparse.notes)


def test_sparse_storage_in_subgraphs_constants_and_float16() -> None:
    proto = models.constant_and_subgraph()
    result = run_prune(proto, PruneConfig(sparsity=0.9, min_elements=0, sparse_storage=True))
    out = onnx.load_from_string(io.model_bytes(result.model))
    assert _sparse_constants(out) == 2  # the main-graph Constant and the If branch initializer
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    dense = arrays(result.model)
    for flag, w2 in ((True, dense["w_then"]), (False, dense["w_const"])):
        (y,) = ort_run(out, {"x": x, "flag": np.array(flag)})
        np.testing.assert_allclose(y, (x @ dense["w_const"]) @ w2, rtol=1e-5, atol=1e-5)
    half = models.mlp(sizes=(64, 64, 10))
    for t in half.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*half.graph.input, *half.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    result = run_prune(half, PruneConfig(sparsity=0.95, min_elements=0, sparse_storage=True))
    out = onnx.load_from_string(io.model_bytes(result.model))
    assert _sparse_constants(out) == 2
    feed = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float16)}
    (y,) = ort_run(out, feed)
    (want,) = ort_run(to_proto_dense(result.model), feed)
    np.testing.assert_array_equal(y, want)


def to_proto_dense(model: ir.Model) -> onnx.ModelProto:
    """The model with sparse-storage marks ignored (every tensor dense)."""
    proto = ir.serde.serialize_model(model)
    from modelshrink.io.sparse import _proto_graphs

    for g in _proto_graphs(proto.graph):
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    del a.t.metadata_props[:]
    return proto


def test_sparse_storage_keeps_dense_where_smaller() -> None:
    result = run_prune(sample("digits_mlp"), PruneConfig(sparsity=0.5, sparse_storage=True))
    rows = result.details["layers"]
    assert {row["stored"] for row in rows} == {"dense"}
    assert all(
        "dense is smaller (50.0% zeros; sparse needs more than 67%)" in r["stored_dense_because"]
        for r in rows
    )
    assert _sparse_constants(onnx.load_from_string(io.model_bytes(result.model))) == 0


def test_models_with_sparse_tensors_can_be_read(runner: CliRunner, tmp_path: Path) -> None:
    sparse_out = tmp_path / "sparse.onnx"
    result = runner.invoke(
        app,
        [
            "prune",
            str(SAMPLES / "digits_mlp.onnx"),
            "-o",
            str(sparse_out),
            "--sparsity",
            "0.9",
            "--sparse-storage",
            "-q",
            "--no-latency",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert _sparse_constants(onnx.load(str(sparse_out))) == 3
    # read back: compare, and a second pass keeps the sparse Constants sparse
    compared = runner.invoke(
        app, ["compare", str(SAMPLES / "digits_mlp.onnx"), str(sparse_out), "--json", "--no-latency"]
    )
    assert compared.exit_code == 0, compared.stderr
    loaded = io.load_model(str(sparse_out))
    assert _sparse_constants(onnx.load_from_string(io.model_bytes(loaded.model))) == 3
    # a graph-level sparse_initializer written by another tool is read as a dense initializer
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    w[np.abs(w) < 1] = 0
    flat = w.reshape(-1)
    nz = np.flatnonzero(flat)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            onnx.numpy_helper.from_array(flat[nz], "W"),
            onnx.numpy_helper.from_array(nz.astype(np.int64), ""),
            [16, 4],
        )
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "other.onnx"))
    loaded = io.load_model(str(tmp_path / "other.onnx"))
    np.testing.assert_array_equal(loaded.model.graph.initializers["W"].const_value.numpy(), w)


# --- tolerance-driven search ---------------------------------------------------------------------

MLP_DATA = str(SAMPLES / "digits_mlp.npz")


def test_search_meets_the_gate_and_reports_each_layer() -> None:
    gates = Gates(min_cosine=0.995)
    model = to_ir(sample("digits_mlp"))
    context = context_for(model, data=MLP_DATA, gates=gates, samples=64)
    result = prune(model, PruneConfig(sparsity=0.8), context)
    search = result.details["search"]
    assert search["evaluations"] > 3
    assert [row["layer"] for row in search["layers"]] == ["fc1", "fc2", "fc3"]
    assert all(row["scores"] for row in search["layers"])
    chosen = {row["layer"]: row["chosen"] for row in search["layers"]}
    layers = {row["node"]: row for row in result.details["layers"]}
    for name, level in chosen.items():
        if level > 0:
            assert abs(layers[name]["zeros"] - level * layers[name]["elements"]) <= 1
    fidelity = context.evaluate(result.model)
    assert fidelity.cosine >= 0.995
    assert 0 < search["achieved"] <= 0.8 + 1e-9


def test_search_reaches_the_target_when_the_gate_allows() -> None:
    model = to_ir(sample("digits_mlp"))
    context = context_for(model, gates=Gates(max_error=1e9))
    result = prune(model, PruneConfig(sparsity=0.6), context)
    search = result.details["search"]
    assert not search["limited_by_gates"]
    # the level grid steps by 0.1; fc2 holds 65 % of the weights, so one step is 6.5 % overall
    assert 0.6 <= search["achieved"] <= 0.6 + 0.1 * 32768 / 50432 + 1e-9


def test_search_with_an_impossible_gate_prunes_nothing() -> None:
    model = to_ir(sample("digits_mlp"))
    result = prune(model, PruneConfig(sparsity=0.5), context_for(model, gates=Gates(max_error=0.0)))
    assert not result.changed
    assert result.details["search"]["limited_by_gates"]
    assert "the sensitivity search left it whole" in _skip_reasons(result)["fc1"]


def test_structured_search_meets_the_gate() -> None:
    gates = Gates(min_agreement=0.98)
    model = to_ir(sample("digits_cnn"))
    context = context_for(model, data=str(SAMPLES / "digits_cnn.npz"), gates=gates, samples=64)
    result = prune(model, PruneConfig(structured=True, sparsity=0.5, min_elements=0), context)
    assert result.details["search"]["achieved"] > 0
    fidelity = context.evaluate(result.model)
    assert fidelity.top1_agreement is not None and fidelity.top1_agreement >= 0.98
    checked(result.model)


def test_cli_search_and_no_search(runner: CliRunner, tmp_path: Path, snapshot) -> None:
    base = [
        "prune",
        str(SAMPLES / "digits_mlp.onnx"),
        "--sparsity",
        "0.9",
        "--data",
        MLP_DATA,
        "--no-latency",
    ]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    searched = runner.invoke(app, [*base, "-o", str(out_dir / "a.onnx"), "--min-agreement", "0.98", "--json"])
    assert searched.exit_code == 0, searched.stderr
    report = json.loads(searched.stdout)
    assert report["gates"][0]["passed"] and "search" in report["details"]
    uniform = runner.invoke(
        app, [*base, "-o", str(out_dir / "b.onnx"), "--min-agreement", "0.98", "--no-search"]
    )
    assert uniform.exit_code == 3
    assert "gate failed: --min-agreement" in uniform.stderr
    assert sorted(snapshot(out_dir)) == ["a.onnx"]
    no_gate = runner.invoke(app, [*base, "-o", str(out_dir / "c.onnx"), "--search"])
    assert no_gate.exit_code == 2 and "--search needs a fidelity gate" in no_gate.stderr


def test_structured_blocks_channels_whose_count_is_read_at_run_time() -> None:
    # Conv -> Shape -> Gather(1) (the channel count) used to reshape another tensor
    n = Net(12)
    y = n.node("Relu", [n.conv("x", 3, 16)])
    z = n.node("Relu", [n.conv(y, 16, 16)])
    index = n.name("idx")
    n.inits.append(models.init(index, np.array([0], dtype=np.int64)))
    batch = n.node("Gather", [n.node("Shape", [z]), index])  # reads only the batch size: safe
    rest = n.name("rest")
    n.inits.append(models.init(rest, np.array([-1], dtype=np.int64)))
    flat = n.node("Reshape", [z, n.node("Concat", [batch, rest], axis=0)])
    safe = run_prune(n.model(flat, ["N", 1024]), PruneConfig(structured=True, sparsity=0.5, min_elements=0))
    assert safe.details["channels_removed"] == 8  # the first conv; the second reaches the output
    n = Net(12)
    conv = n.conv("x", 3, 16)
    y = n.node("Relu", [conv])
    channels = n.name("ch")
    n.inits.append(models.init(channels, np.array([1], dtype=np.int64)))
    count = n.node("Gather", [n.node("Shape", [y]), channels])  # the channel count of y
    other = n.node("Reshape", ["x", n.node("Concat", [count, rest_init(n)], axis=0)])
    out = n.node("Add", [n.node("ReduceSum", [y], keepdims=0), n.node("ReduceSum", [other], keepdims=0)])
    reads = run_prune(n.model(out, []), PruneConfig(structured=True, sparsity=0.5, min_elements=0), samples=1)
    assert "its channel count is read by Shape" in _skip_reasons(reads)[conv]
    assert not reads.changed


def rest_init(n: Net) -> str:
    name = n.name("rest")
    n.inits.append(models.init(name, np.array([-1], dtype=np.int64)))
    return name


# --- the default: the largest sparsity that keeps the fidelity floor -------------------------

FLOOR_OPTIONS = RunOptions(latency=False, samples=16)


def _default_note(report: Report) -> str:
    return next(n for n in report.notes if n.startswith("no --sparsity and no gate"))


def test_default_keeps_the_floor_where_an_explicit_amount_does_not(tmp_path: Path) -> None:
    src = models.save(models.mlp(sizes=(64, 128, 128, 10)), tmp_path / "mlp.onnx")
    default = api.prune(str(src), str(tmp_path / "d.onnx"), PruneConfig(), FLOOR_OPTIONS)
    explicit = api.prune(str(src), str(tmp_path / "e.onnx"), PruneConfig(sparsity=0.9), FLOOR_OPTIONS)
    # onnxruntime's figures on the same 16 feeds; class-like logits: the floor is agreement
    assert default.fidelity.top1_agreement is not None and explicit.fidelity.top1_agreement is not None
    assert default.fidelity.top1_agreement >= FLOOR_AGREEMENT > explicit.fidelity.top1_agreement
    assert default.written and explicit.written  # an explicit amount is done as asked
    search = default.details["default_search"]
    assert search["floor"] == {"min_agreement": FLOOR_AGREEMENT}
    assert 0.1 < search["reached"] < 0.9 and 0 < search["evaluations"] <= floor_search.DEFAULT_BUDGET
    assert search["checked"]["top1_agreement"] == default.fidelity.top1_agreement
    assert default.details["requested_sparsity"] is None
    written = onnx.load(str(tmp_path / "d.onnx"))
    zeros = sum(int(np.sum(onnx.numpy_helper.to_array(t) == 0)) for t in written.graph.initializer[::2])
    assert zeros == default.details["zeros"]
    assert zeros / default.details["eligible_elements"] == pytest.approx(search["reached"], abs=1e-6)
    note = _default_note(default)
    assert "the largest sparsity that keeps the fidelity floor (top-1 agreement >= 99%)" in note
    assert f"{100 * search['reached']:.1f}% of the eligible weights reached" in note
    assert "default_search" not in explicit.details
    assert not any(n.startswith("no --sparsity") for n in explicit.notes)
    again = api.prune(str(src), str(tmp_path / "again.onnx"), PruneConfig(), FLOOR_OPTIONS)
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "d.onnx").read_bytes()
    assert again.details["default_search"]["trials"] == search["trials"]


@pytest.mark.parametrize(
    "config",
    [PruneConfig(structured=True, min_elements=0), PruneConfig(scope="global")],
    ids=["structured", "global"],
)
def test_default_structured_and_global_keep_the_floor(tmp_path: Path, config: PruneConfig) -> None:
    src = models.save(models.mlp(sizes=(64, 128, 128, 10)), tmp_path / "mlp.onnx")
    report = api.prune(str(src), str(tmp_path / "p.onnx"), config, FLOOR_OPTIONS)
    assert report.fidelity.top1_agreement is not None and report.fidelity.top1_agreement >= FLOOR_AGREEMENT
    assert report.changes and report.details["default_search"]["reached"] > 0
    assert "no --sparsity: the most that keeps the fidelity floor" in report.notes[0]
    if config.structured:
        assert report.result.params < report.original.params
    else:  # one threshold: a grid of 5 % steps
        assert report.details["default_search"]["reached"] * 20 == pytest.approx(
            round(report.details["default_search"]["reached"] * 20), abs=1e-3
        )


def _equal_magnitudes(path: Path) -> Path:
    """``features = x @ W`` with W of +-1 entries: every weight matters as much, so zeroing any
    5 % of them moves the output by about sqrt(0.05) (cosine ~0.975, under the 0.99 floor)."""
    w = np.random.default_rng(0).choice([-1.0, 1.0], size=(64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["features"], name="mm")],
        "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 4, 64])],
        [models.init("W", w)],
    )
    return models.save(models._model(graph), path)


def test_default_leaves_the_model_unchanged_when_nothing_keeps_the_floor(
    runner: CliRunner, tmp_path: Path
) -> None:
    src = _equal_magnitudes(tmp_path / "flat.onnx")
    out = tmp_path / "p.onnx"
    result = runner.invoke(app, ["prune", str(src), "-o", str(out), "--json", "--no-latency"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["changes"] == [] and report["fidelity"]["identical"]
    assert report["details"]["default_search"]["evaluations"] > 0
    note = next(n for n in report["notes"] if n.startswith("no --sparsity"))
    assert "so nothing was pruned and the model is unchanged" in note
    assert "cosine >= 0.99; the least tried, 5.0% of the eligible weights, gives cosine 0.9" in note
    assert any("no sparsity tried keeps the fidelity floor" in s["reason"] for s in report["skipped"])
    assert out.exists()
    # the search was right: the least it tried, asked explicitly, breaks the floor
    explicit = api.prune(str(src), str(tmp_path / "e.onnx"), PruneConfig(sparsity=0.05), FLOOR_OPTIONS)
    assert explicit.fidelity.cosine < FLOOR_COSINE


def test_no_search_needs_an_amount(runner: CliRunner, tmp_path: Path) -> None:
    args = ["prune", str(SAMPLES / "digits_mlp.onnx"), "-o", str(tmp_path / "p.onnx"), "--no-search"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--no-search with no --sparsity" in result.stderr
    assert runner.invoke(app, [*args, "--sparsity", "0.5", "--no-latency", "-q"]).exit_code == 0


def test_zeroed_subnormal_weights_are_named_as_the_speed_up(tmp_path: Path) -> None:
    """PP-OCRv5's detector holds 14,879 subnormal weights: pruning zeroed them and the result ran
    2.2x faster, under a note that said to expect no speed-up. The note says where it comes from."""
    proto = models.mlp(sizes=(64, 64, 10))
    w0 = proto.graph.initializer[0]
    values = onnx.numpy_helper.to_array(w0).copy()
    values.reshape(-1)[:100] = np.float32(1e-40)  # subnormal: among the smallest, so pruned
    w0.CopyFrom(onnx.numpy_helper.from_array(values, w0.name))
    src = models.save(proto, tmp_path / "m.onnx")
    report = api.prune(
        str(src), str(tmp_path / "p.onnx"), PruneConfig(sparsity=0.5), RunOptions(latency=False)
    )
    (note,) = [n for n in report.notes if "subnormal" in n]
    assert note.startswith("100 of the zeroed weights were subnormal floats")
    plain = api.prune(
        str(models.save(models.mlp(sizes=(64, 64, 10)), tmp_path / "n.onnx")),
        str(tmp_path / "q.onnx"),
        PruneConfig(sparsity=0.5),
        RunOptions(latency=False),
    )
    assert not any("subnormal" in n for n in plain.notes)
