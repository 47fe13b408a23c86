"""Prune figures, each ratio measured side by side in one run of the tool.

* structured 50 % of channels on generated VGG- and ResNet-style CNNs: latency and size ratios
  (targets: latency <= 0.6x, size <= 0.35x);
* unstructured 80 %: zlib-compressed size ratio (target <= 0.35x), and the report must say
  that dense kernels give no speed-up (the measured latency ratio is printed too);
* the tool's own time per MB of model for two model sizes (target: linear, i.e. the larger
  model costs at most 1.5x the time per MB of the smaller one).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common import mlp_model, run_cli

STRUCTURED_LATENCY_RATIO = 0.6
STRUCTURED_SIZE_RATIO = 0.35
UNSTRUCTURED_ZLIB_RATIO = 0.35
LINEAR_TOLERANCE = 1.5


class _Cnn:
    """Conv/BN/Relu builder with seeded He-scaled weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def _init(self, array: np.ndarray) -> str:
        name = self._name("w")
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(self, x: str, cin: int, cout: int, *, k: int = 3, stride: int = 1, relu: bool = True) -> str:
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        y = self.node(
            "Conv", [x, self._init(w)], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride]
        )
        params = [
            1 + 0.1 * self.rng.standard_normal(cout),
            0.1 * self.rng.standard_normal(cout),
            0.1 * self.rng.standard_normal(cout),
            1 + 0.1 * self.rng.random(cout),
        ]
        y = self.node("BatchNormalization", [y, *[self._init(p) for p in params]])
        return self.node("Relu", [y]) if relu else y

    def model(self, x: str, channels: int, size: int) -> onnx.ModelProto:
        pooled = self.node("Flatten", [self.node("GlobalAveragePool", [x])])
        w = self.rng.standard_normal((10, channels)) / np.sqrt(channels)
        self.nodes.append(
            helper.make_node("Gemm", [pooled, self._init(w), self._init(np.zeros(10))], ["logits"], transB=1)
        )
        graph = helper.make_graph(
            self.nodes,
            "cnn",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def vgg(path: Path, size: int = 64) -> Path:
    """VGG-style: two 3x3 convs per stage, 64-128-256-256 channels, max-pooling between stages."""
    net = _Cnn(1)
    x, cin = "image", 3
    for stage, cout in enumerate((64, 128, 256, 256)):
        x = net.conv_bn(net.conv_bn(x, cin, cout), cout, cout)
        cin = cout
        if stage < 3:
            x = net.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    path.write_bytes(net.model(x, cin, size).SerializeToString())
    return path


def resnet(path: Path, size: int = 64) -> Path:
    """ResNet-style: stem, then per stage a downsampling block (1x1 shortcut) and an identity block."""
    net = _Cnn(2)
    x = net.conv_bn("image", 3, 64)
    cin = 64
    for stage, cout in enumerate((64, 128, 256)):
        stride = 1 if stage == 0 else 2
        for block in range(2):
            s = stride if block == 0 else 1
            y = net.conv_bn(net.conv_bn(x, cin, cout, stride=s), cout, cout, relu=False)
            short = x if (cin == cout and s == 1) else net.conv_bn(x, cin, cout, k=1, stride=s, relu=False)
            x = net.node("Relu", [net.node("Add", [short, y])])
            cin = cout
    path.write_bytes(net.model(x, cin, size).SerializeToString())
    return path


def _prune(src: Path, out: Path, *args: str) -> dict | None:
    run = run_cli("prune", str(src), "-o", str(out), "--force", "--json", "-q", *args)
    if run.returncode != 0:
        print(f"prune {' '.join(args)} failed: {run.stderr.decode()[-600:]}")
        return None
    return run.json()


def bench_structured(tmp: Path) -> bool:
    ok = True
    for name, build in (("VGG-style", vgg), ("ResNet-style", resnet)):
        src = build(tmp / f"{name}.onnx")
        doc = _prune(src, tmp / f"{name}.pruned.onnx", "--structured", "--sparsity", "0.5")
        if doc is None:
            return False
        size = doc["ratios"]["size"]
        latency = 1.0 / doc["latency"]["speedup"]
        met = latency <= STRUCTURED_LATENCY_RATIO and size <= STRUCTURED_SIZE_RATIO
        ok = ok and met
        lat = doc["latency"]
        print(
            f"structured 50% of channels, {name} CNN ({src.stat().st_size / 1e6:.1f} MB, input "
            f"1x3x64x64): latency {latency:.3f}x (p50 {lat['original']['p50_ms']:.2f} -> "
            f"{lat['result']['p50_ms']:.2f} ms, {lat['original']['runs']} interleaved runs; target <= "
            f"{STRUCTURED_LATENCY_RATIO}x), size {size:.3f}x (target <= {STRUCTURED_SIZE_RATIO}x), "
            f"channels removed {doc['details']['channels_removed']} of {doc['details']['channels_prunable']}, "
            f"cosine {doc['fidelity']['worst']['cosine']:.3f}: {'met' if met else 'MISSED'}"
        )
    return ok


def bench_unstructured(tmp: Path) -> bool:
    src = vgg(tmp / "vgg.onnx")
    doc = _prune(src, tmp / "vgg.sparse.onnx", "--sparsity", "0.8")
    if doc is None:
        return False
    zlib = doc["ratios"]["size_zlib"]
    says = any("no speed-up" in note for note in doc["notes"])
    latency = 1.0 / doc["latency"]["speedup"]
    met = zlib <= UNSTRUCTURED_ZLIB_RATIO and says
    print(
        f"unstructured 80%, VGG-style CNN: zlib size {zlib:.3f}x (target <= {UNSTRUCTURED_ZLIB_RATIO}x), "
        f"file size {doc['ratios']['size']:.3f}x, latency {latency:.3f}x (dense kernels: no speed-up "
        f"expected), report states no dense speed-up: {'yes' if says else 'NO'}, achieved sparsity "
        f"{doc['details']['achieved_sparsity']:.4f}: {'met' if met else 'MISSED'}"
    )
    stored = _prune(
        src, tmp / "vgg.sparse-storage.onnx", "--sparsity", "0.8", "--sparse-storage", "--no-latency"
    )
    if stored is not None:
        print(
            f"  with --sparse-storage: file size {stored['ratios']['size']:.3f}x, zlib size "
            f"{stored['ratios']['size_zlib']:.3f}x"
        )
    return met


def bench_linear(tmp: Path) -> bool:
    ok = True
    for mode in (["--sparsity", "0.5"], ["--structured", "--sparsity", "0.5"]):
        per_mb = []
        for width, layers in ((2048, 9), (2048, 17)):
            src = mlp_model(tmp / f"mlp{layers}.onnx", (width,) * layers)
            mb = src.stat().st_size / 1e6
            doc = _prune(src, tmp / "mlp.out.onnx", *mode, "--no-latency", "--samples", "2")
            if doc is None:
                return False
            technique = doc["timings_s"]["technique"]
            per_mb.append((mb, technique, doc["timings_s"]["total"]))
        (mb1, t1, total1), (mb2, t2, total2) = per_mb
        ratio = (t2 / mb2) / (t1 / mb1)
        met = ratio <= LINEAR_TOLERANCE
        ok = ok and met
        print(
            f"tool time, prune {' '.join(mode)}: {mb1:.0f} MB -> technique {t1:.2f} s "
            f"({1000 * t1 / mb1:.1f} ms/MB), whole run {total1:.2f} s; {mb2:.0f} MB -> technique {t2:.2f} s "
            f"({1000 * t2 / mb2:.1f} ms/MB), whole run {total2:.2f} s; per-MB ratio {ratio:.2f} "
            f"(target <= {LINEAR_TOLERANCE}: linear): {'met' if met else 'MISSED'}"
        )
    return ok


def run() -> bool:
    tmp = Path(tempfile.mkdtemp(prefix="modelshrink-bench-prune-"))
    try:
        results = [bench_structured(tmp), bench_unstructured(tmp), bench_linear(tmp)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return all(results)


if __name__ == "__main__":
    raise SystemExit(0 if run() else 1)
