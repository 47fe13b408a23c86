"""Static int8 with accuracy control: fidelity on held-out rows, latency against float, layers in float.

    python bench/run.py static

For each model: ``modelshrink quantize --mode static`` calibrates (and runs its gate-driven
search) on one set of rows; ``modelshrink compare`` then scores the written model against the
original, with the same gate, on other rows it never saw. Latency: the float and the int8 model
timed in alternation in this process (one thread, one held-out input, warm-up first; the ratio
of the medians). Printed per model: the gate, the held-out figures and whether the gate holds
there, the latency ratio, the layers kept in float, the tool's time.

1. The sample CNN (``sample_models/digits_cnn.onnx``): rows of ``digits_cnn.npz`` split in two
   by a seeded permutation (180 calibrate, 180 score), gate ``--min-agreement 0.99``. Timed too,
   on the same inputs: onnxruntime's own ``quantize_static`` (its defaults, the same 180 rows).
2. rapidocr's PP-OCRv4 text detector (``ch_PP-OCRv4_det_infer.onnx`` from the
   ``rapidocr-onnxruntime==1.4.4`` wheel, downloaded once into build/realmodels/): its output is a
   text-probability map, not class scores, so the gate is ``--min-cosine`` (cosine similarity of
   the map over every held-out page): the floor the tool holds non-class outputs to (0.99), and a
   stricter 0.998 that makes the search keep layers in float. Inputs are text pages rendered with
   Pillow (bench/render_text_pages.py: words and numbers at 10-30 px on light paper, 320x320,
   pre-processed by rapidocr's own ``DetPreProcess``: BGR, mean and std 0.5), 24 to calibrate and
   24 others to score. rapidocr and Pillow are never modelshrink dependencies: the bench makes its
   own venv for them (build/bench-ocr); without PyPI this part prints a skip line with the reason. Also printed: the share of text pixels
   (probability > 0.3, the DB post-processing threshold) both models agree on (IoU).

Targets (issue 16): the gate holds on the held-out rows, and the int8 model's latency is at most
0.8x the float model's (one thread).
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, cli_json, latency_ratio, ocr_python, ort_session, wheel_file

SAMPLES = ROOT / "sample_models"
WHEEL = "rapidocr-onnxruntime==1.4.4"
DETECTOR = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
LATENCY_TARGET = 0.8
LATENCY_ROUNDS = 60
PAGES = 24
PAGE_SIZE = 320
TEXT_THRESHOLD = 0.3


def _kept(doc: dict) -> str:
    fallback = doc["details"].get("fallback")
    if fallback is None:
        return "none (every layer in int8 passes the gate)"
    kept = fallback["kept_in_float"]
    int8 = len(doc["changes"])
    return f"{len(kept)} of {len(kept) + int8}: {', '.join(kept)}" if kept else "none"


def measure(
    name: str,
    model: Path,
    data: tuple[Path, Path, int],
    gate: list[str],
    tmp: Path,
    feeds: dict[str, dict[str, np.ndarray]],
) -> tuple[bool, Path | None]:
    """Quantize on the first rows, score on the others; print one block; whether both targets hold.

    ``data``: the calibration file, the held-out file, and how many rows to use of each.
    ``feeds``: the inputs latency is timed on, by label; the target applies to the first.
    """
    calibrate, held, rows = data
    out = tmp / f"{name.split()[0]}.{gate[-1]}.static.onnx"
    quantize = ["quantize", str(model), "-o", str(out), "--mode", "static", "--force", "--no-latency"]
    code, doc, err, seconds = cli_json(*quantize, "--data", str(calibrate), "--samples", str(rows), *gate)
    if code != 0 or doc is None:
        print(f"  {name}: quantize exited {code}: {err.splitlines()[-1] if err else ''}")
        return False, None
    cal = doc["fidelity"]["worst"]
    compare = ["compare", str(model), str(out), "--no-latency"]
    code_held, held_doc, err_held, _ = cli_json(*compare, "--data", str(held), "--samples", str(rows), *gate)
    if held_doc is None:
        print(f"  {name}: compare exited {code_held}: {err_held}")
        return False, None
    f = held_doc["fidelity"]["worst"]
    top1 = f"top-1 agreement {f['top1_agreement']:.2%}, " if f["top1_agreement"] is not None else ""
    gate_ok = code_held == 0
    timed = {label: latency_ratio(model, out, feed, LATENCY_ROUNDS) for label, feed in feeds.items()}
    fast = next(iter(timed.values()))[2] <= LATENCY_TARGET
    print(f"  {name}, gate {' '.join(gate)}:")
    print(
        f"    calibration rows ({doc['fidelity']['samples']}): cosine {cal['cosine']:.5f}"
        + (f", top-1 {cal['top1_agreement']:.2%}" if cal["top1_agreement"] is not None else "")
    )
    print(
        f"    held-out rows ({held_doc['fidelity']['samples']}): {top1}cosine {f['cosine']:.5f}, "
        f"max |err| {f['max_abs_error']:.4g}, mean |err| {f['mean_abs_error']:.4g}: gate "
        f"{'met' if gate_ok else 'MISSED'}"
    )
    for i, (label, (p50a, p50b, ratio)) in enumerate(timed.items()):
        verdict = "met" if ratio <= LATENCY_TARGET else "MISSED"
        target = f" (target <= {LATENCY_TARGET}x: {verdict}{'' if i == 0 else ', not the one judged'})"
        print(
            f"    latency, {label} (1 thread, {LATENCY_ROUNDS} alternating runs): float {p50a:.3f} ms, "
            f"int8 {p50b:.3f} ms, ratio {ratio:.3f}x{target}"
        )
    print(f"    kept in float: {_kept(doc)}; size {doc['ratios']['size']:.3f}x; tool time {seconds:.1f} s")
    return gate_ok and fast, out


def _ort_static(model: Path, calibrate: np.ndarray, out: Path) -> Path:
    """onnxruntime's own ``quantize_static`` with its defaults (QDQ, every op it knows), same rows."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(calibrate[i : i + 1] for i in range(len(calibrate)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            row = next(self.rows, None)
            return None if row is None else {"image": row}

    logging.disable(logging.WARNING)  # its advice to pre-process first, on every call
    try:
        quantize_static(str(model), str(out), Rows())
    finally:
        logging.disable(logging.NOTSET)
    return out


def bench_cnn(tmp: Path) -> bool:
    model = SAMPLES / "digits_cnn.onnx"
    data = np.load(SAMPLES / "digits_cnn.npz")
    images = data["image"]
    order = np.random.default_rng(0).permutation(len(images))
    half = len(images) // 2
    np.savez(tmp / "cnn_cal.npz", image=images[order[:half]])
    np.savez(tmp / "cnn_held.npz", image=images[order[half:]])
    held = images[order[half:]]
    feeds = {"batch 1": {"image": held[:1]}, "batch 32": {"image": held[:32]}}
    ok, _ = measure(
        "digits_cnn",
        model,
        (tmp / "cnn_cal.npz", tmp / "cnn_held.npz", half),
        ["--min-agreement", "0.99"],
        tmp,
        feeds,
    )
    ort_model = _ort_static(model, images[order[:half]], tmp / "digits_cnn.ort-static.onnx")
    ratios = [latency_ratio(model, ort_model, feed, LATENCY_ROUNDS) for feed in feeds.values()]
    per_row = ratios[1][0] * 1e3 / len(held[:32])
    print(
        "    for comparison, onnxruntime's quantize_static (defaults, same rows): latency "
        + ", ".join(f"{label} {r[2]:.3f}x" for label, r in zip(feeds, ratios, strict=True))
        + f" (the float model takes {per_row:.1f} us per row at batch 32)"
    )
    return ok


def _text_iou(original: Path, result: Path, held: Path) -> float:
    pages = np.load(held)["x"]
    a, b = ort_session(original), ort_session(result)
    inter = union = 0
    for page in pages:
        ya = a.run(None, {"x": page[None]})[0] > TEXT_THRESHOLD
        yb = b.run(None, {"x": page[None]})[0] > TEXT_THRESHOLD
        inter += int((ya & yb).sum())
        union += int((ya | yb).sum())
    return inter / union if union else 1.0


def bench_detector(tmp: Path) -> bool:
    model, why = wheel_file(WHEEL, DETECTOR)
    if model is None:
        print(f"  PP-OCRv4 detector: skipped ({why})")
        return True
    python, why = ocr_python()
    if python is None:
        why = f"rapidocr and Pillow, needed to render text pages, could not be installed: {why}"
        print(f"  PP-OCRv4 detector: skipped ({why})")
        return True
    render = ROOT / "bench" / "render_text_pages.py"
    for name, seed in (("pages_cal", 1), ("pages_held", 2)):
        cmd = [str(python), str(render), str(tmp / f"{name}.npz"), "--count", str(PAGES), "--seed", str(seed)]
        subprocess.run([*cmd, "--size", str(PAGE_SIZE)], check=True)
    feed = {"x": np.load(tmp / "pages_held.npz")["x"][:1]}
    ok = True
    for cosine in ("0.99", "0.998"):
        met, out = measure(
            f"PP-OCRv4 det ({PAGES} pages {PAGE_SIZE}x{PAGE_SIZE})",
            model,
            (tmp / "pages_cal.npz", tmp / "pages_held.npz", PAGES),
            ["--min-cosine", cosine],
            tmp,
            {f"one page {PAGE_SIZE}x{PAGE_SIZE}": feed},
        )
        if out is not None:
            iou = _text_iou(model, out, tmp / "pages_held.npz")
            print(f"    held-out text pixels (probability > {TEXT_THRESHOLD}) in both maps: IoU {iou:.4f}")
        ok = ok and met
    return ok


def run() -> bool:
    with tempfile.TemporaryDirectory(prefix="modelshrink-bench-static-") as folder:
        tmp = Path(folder)
        print("static int8: calibrate on some rows, score on others (modelshrink compare, same gate)")
        results = [bench_cnn(tmp), bench_detector(tmp)]
    return all(results)
