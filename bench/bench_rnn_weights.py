"""LSTM weights in every mode, on the CRNN-style recognizer of the tests: size, fidelity, latency.

    python bench/run.py rnnweights

The model is ``tests/patterns.py::crnn_ocr_stacked`` (4 Conv, two bidirectional LSTMs, a Linear layer
and per-frame Softmax scores; random weights, generated here). For each mode,
``modelshrink quantize crnn.onnx -o OUT --mode MODE`` (``--format qdq`` where named), then:
the file ratio; the LSTM weights' ratio (the written file's tensors of each quantized ``W``/``R``,
those whose name starts with the weight's, over its float32 bytes in the input); fidelity as the
report measures it (synthetic feeds: 16 frames wide lines, per-frame top-1 agreement and cosine);
latency of the float and the quantized model in alternation (1 thread, one 1x3x32x128 line,
median of 30 runs each).

Target (issue 16): the int8 file at most 0.27x the float file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from bench_int4_conv import _nbytes, _tensors
from onnx import numpy_helper

from common import cli_json, latency_ratio  # (and puts tests/ on sys.path for patterns and models)

INT8_TARGET = 0.27
MODES = (
    ("int8", ()),
    ("int8", ("--format", "qdq")),
    ("dynamic", ()),
    ("int4", ()),
    ("bf16", ()),
)


# Runs of each model timed in alternation (the median is compared).
LATENCY_ROUNDS = 30


def _lstm_bytes(original: Path, written: Path, doc: dict) -> tuple[int, int]:
    """Stored bytes of the quantized LSTM weights in the written file, and their float32 bytes."""
    before = _tensors(onnx.load(str(original)))
    after = _tensors(onnx.load(str(written)))
    weights = {c["details"]["weight"] for c in doc["changes"] if c["op_type"] == "LSTM"}
    stored = sum(_nbytes(t) for name, t in after.items() if any(name.startswith(w + "_") for w in weights))
    return stored, sum(numpy_helper.to_array(before[w]).astype(np.float32).nbytes for w in weights)


def run() -> bool:
    import patterns  # tests/patterns.py, on sys.path through common
    from models import save

    ok = True
    with tempfile.TemporaryDirectory(prefix="modelshrink-bench-rnn-") as folder:
        tmp = Path(folder)
        src = save(patterns.crnn_ocr_stacked(), tmp / "crnn.onnx")
        feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 32, 128)).astype(np.float32)}
        print("LSTM weights: the CRNN-style recognizer (tests/patterns.py), synthetic feeds")
        for mode, extra in MODES:
            label = " ".join((mode, *extra))
            out = tmp / f"crnn.{mode}{''.join(extra)}.onnx"
            code, doc, err, _ = cli_json(
                "quantize", str(src), "-o", str(out), "--mode", mode, *extra, "--force"
            )
            if doc is None or not out.exists():
                print(f"  {label}: quantize exited {code}: {err.splitlines()[-1] if err else ''}")
                ok = False
                continue
            stored, floats = _lstm_bytes(src, out, doc)
            f = doc["fidelity"]["worst"]
            _, _, ratio = latency_ratio(src, out, feed, LATENCY_ROUNDS)
            size = doc["ratios"]["size"]
            target = ""
            if mode == "int8" and not extra:
                met = size <= INT8_TARGET
                ok = ok and met
                target = f" (target <= {INT8_TARGET}x: {'met' if met else 'MISSED'})"
            lstm = [c["details"].get("storage", "") for c in doc["changes"] if c["op_type"] == "LSTM"]
            print(
                f"  {label}: file {size:.4f}x{target}; LSTM weights {stored / floats:.4f}x "
                f"({len(lstm)} of 4, {sorted(set(lstm))}); top-1 {f['top1_agreement']:.1%}, cosine "
                f"{f['cosine']:.5f} ({doc['fidelity']['samples']} samples); latency {ratio:.3f}x float"
            )
    return ok
