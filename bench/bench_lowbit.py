"""Low-bit benchmarks: QAT against post-training quantization, sizes against the physical limit,
latency of packed models against the float model.

    python bench/run.py lowbit

1. Fidelity at 4 bits and below. ``modelshrink quantize --bits N`` (post-training) and
   ``--bits N --qat`` (default settings) give two files of the same size, both scored against
   the float model on held-out rows: top-1 agreement of ``logits`` and mean |error| of the
   logits. Digits models: a seeded third of the ``.npz`` rows is held out, QAT trains on the
   other 240. Transformer: its 256 ``.npz`` rows are held out and QAT trains on 2000 fresh
   sequences from the task's own input distribution (uniform tokens, length 16; distillation
   needs no labels): its 171 non-held-out rows were too few (at 2-4 bits QAT then lost to PTQ on
   the held-out rows: mean |error| 0.75x-1.25x of PTQ's). Target per model and width: QAT's
   agreement >= PTQ's and QAT's mean |error| <= 0.7x PTQ's (a clear margin).
2. Size. Every width 1..8 on the samples and on a weight-dominated MLP: the stored tensors
   against ``bits x params / 8 + scales`` (``details.packing``) and the whole file against that
   limit plus the float tensors left alone. Target: file <= 1.05x on the weight-dominated model.
3. Latency. onnxruntime folds the unpacking at load, so a packed model should run at the float
   model's speed: p50 latency of packed (1, 2, 3, 4, 8 bits) over float, interleaved in one run,
   1 thread, on a Gemm MLP 1024-2048-2048-1000 (batch 1) and the sample CNN: median over 6 fresh
   pairs of sessions (float, packed), each pair timed interleaved, in alternating order (on this
   shared machine one pair of sessions of the 33 MB model can differ by up to 17 %, whichever
   files they load). The float file against itself measures the noise. Target: every ratio within 1 +- max(0.1, 1.5 x that noise).
   Session creation time is printed too (the folding happens there).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from modelshrink.measure import measure_latency
from modelshrink.runtime import RuntimeOptions, Session

from common import ROOT, mlp_model, run_cli

SAMPLES = ROOT / "sample_models"
MODELS = ("digits_mlp", "digits_cnn", "tiny_transformer")
WIDTHS = (4, 3, 2, 1)
ERROR_RATIO_TARGET = 0.7
FILE_LIMIT_TARGET = 1.05
LATENCY_BAND = 0.1  # |packed / float - 1|, at least (more when the float copy shows more noise)


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _logits(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(_session(path).run(["logits"], feeds)[0])


TRANSFORMER_TRAIN_ROWS = 2000


def _split(name: str, folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    with np.load(SAMPLES / f"{name}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "labels"}
    if name == "tiny_transformer":
        ids = np.random.default_rng(1).integers(0, 64, (TRANSFORMER_TRAIN_ROWS, 16)).astype(np.int64)
        np.savez(folder / f"{name}.train.npz", input_ids=ids)
        return folder / f"{name}.train.npz", arrays
    rows = len(next(iter(arrays.values())))
    order = np.random.default_rng(0).permutation(rows)
    held, train = np.sort(order[: rows // 3]), np.sort(order[rows // 3 :])
    np.savez(folder / f"{name}.train.npz", **{k: v[train] for k, v in arrays.items()})
    return folder / f"{name}.train.npz", {k: v[held] for k, v in arrays.items()}


def _quantize(src: Path, out: Path, *args: str) -> bool:
    run = run_cli(
        "quantize", str(src), "-o", str(out), "--force", "-q", "--no-latency", "--samples", "8", *args
    )
    if run.returncode != 0:
        print(f"    quantize {' '.join(args)} failed (exit {run.returncode}): {run.stderr.decode()[-400:]}")
    return run.returncode == 0


def _rows(path: Path) -> int:
    with np.load(path) as npz:
        return len(npz[npz.files[0]])


def fidelity() -> bool:
    print("1. fidelity to the float model on held-out rows (same file size for PTQ and QAT)")
    print(
        f"   {'model':18s} {'bits':>4s}  {'top-1 PTQ':>9s} {'top-1 QAT':>9s}  {'mean|err| PTQ':>13s} {'QAT':>7s} {'ratio':>6s}  {'size':>7s}  ok"
    )
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-lowbit-") as tmp:
        folder = Path(tmp)
        for name in MODELS:
            src = SAMPLES / f"{name}.onnx"
            train, held = _split(name, folder)
            ref = _logits(src, held)
            for bits in WIDTHS:
                ptq, qat = folder / f"{name}.{bits}.ptq.onnx", folder / f"{name}.{bits}.qat.onnx"
                start = time.perf_counter()
                if not (
                    _quantize(src, ptq, "--bits", str(bits))
                    and _quantize(src, qat, "--bits", str(bits), "--qat", "--data", str(train))
                ):
                    ok = False
                    continue
                seconds = time.perf_counter() - start
                p, q = _logits(ptq, held), _logits(qat, held)
                agree_p = float(np.mean(p.argmax(-1) == ref.argmax(-1)))
                agree_q = float(np.mean(q.argmax(-1) == ref.argmax(-1)))
                err_p, err_q = float(np.abs(p - ref).mean()), float(np.abs(q - ref).mean())
                same_size = ptq.stat().st_size == qat.stat().st_size
                good = agree_q >= agree_p and err_q <= ERROR_RATIO_TARGET * err_p and same_size
                ok = ok and good
                print(
                    f"   {name:18s} {bits:4d}  {agree_p:9.1%} {agree_q:9.1%}  {err_p:13.4f} {err_q:7.4f} "
                    f"{err_q / err_p:6.2f}  {qat.stat().st_size / src.stat().st_size:7.3f}  "
                    f"{'yes' if good else 'MISSED'}  ({seconds:.1f} s for both, {len(ref)} held-out rows, "
                    f"trained on {_rows(train)})"
                )
    print(
        f"   target: QAT top-1 >= PTQ and QAT mean|err| <= {ERROR_RATIO_TARGET}x PTQ -> {'met' if ok else 'MISSED'}"
    )
    return ok


def sizes() -> bool:
    print("2. size against the physical limit (bits x params / 8 + scales)")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-lowbit-") as tmp:
        folder = Path(tmp)
        big = mlp_model(folder / "mlp.onnx", (1024, 2048, 2048, 1000))
        for name, src in [("weight-dominated MLP 1024-2048-2048-1000", big)] + [
            (m, SAMPLES / f"{m}.onnx") for m in MODELS
        ]:
            print(f"   {name} ({src.stat().st_size:,} bytes)")
            for bits in range(1, 9):
                out = folder / f"out.{bits}.onnx"
                run = run_cli(
                    "quantize",
                    str(src),
                    "-o",
                    str(out),
                    "--force",
                    "-q",
                    "--no-latency",
                    "--samples",
                    "2",
                    "--bits",
                    str(bits),
                    "--json",
                )
                if run.returncode != 0:
                    print(f"     {bits} bits failed: {run.stderr.decode()[-300:]}")
                    ok = False
                    continue
                packing = run.json()["details"]["packing"]
                limit = packing["physical_limit_bytes"]
                floats_left = _float_bytes_left(out, packing["scale_bytes"])
                file_ratio = out.stat().st_size / (limit + floats_left)
                line = (
                    f"     {bits} bits: tensors {packing['code_bytes'] + packing['scale_bytes']:,} B vs limit "
                    f"{limit:,.0f} B ({packing['stored_over_limit']:.4f}x); file {out.stat().st_size:,} B vs "
                    f"limit + {floats_left:,} B float tensors left = {file_ratio:.4f}x"
                )
                if src is big:
                    met = file_ratio <= FILE_LIMIT_TARGET
                    ok = ok and met
                    line += f" (target <= {FILE_LIMIT_TARGET}x: {'met' if met else 'MISSED'})"
                print(line)
    return ok


def _float_bytes_left(path: Path, scale_bytes: int) -> int:
    """Bytes of float tensors other than the packed weights' scales (biases, norms, skipped).

    The scales are float32 or float16 tensors (whichever the weight's scales fit), so both
    widths are counted before the scales' bytes are taken off.
    """
    width = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}
    model = onnx.load(str(path))
    tensors = list(model.graph.initializer)
    tensors += [n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute]
    total = sum(int(np.prod(t.dims)) * width[t.data_type] for t in tensors if t.data_type in width)
    return total - scale_bytes


LATENCY_ROUNDS = 6


def _paired_ratio(a: Path, b: Path, runtime: RuntimeOptions, feed: dict[str, np.ndarray]) -> float:
    """Median over fresh session pairs of p50(b) / p50(a), each pair timed interleaved, the
    pair's order alternating (the first session of a pair tends to differ)."""
    ratios = []
    for i in range(LATENCY_ROUNDS):
        pair = [a, b] if i % 2 == 0 else [b, a]
        stats = measure_latency([Session(p, runtime, label=str(p)) for p in pair], feed, budget_s=1.5)
        ratio = stats[1].p50_ms / stats[0].p50_ms
        ratios.append(ratio if i % 2 == 0 else 1 / ratio)
    return float(np.median(ratios))


def latency() -> bool:
    print("3. latency of packed models over the float model (p50, interleaved, 1 thread)")
    ok = True
    runtime = RuntimeOptions(threads=1)
    with tempfile.TemporaryDirectory(prefix="bench-lowbit-") as tmp:
        folder = Path(tmp)
        big = mlp_model(folder / "mlp.onnx", (1024, 2048, 2048, 1000))
        cases = [("MLP 1024-2048-2048-1000, batch 1", big, {"x": np.ones((1, 1024), np.float32)})]
        with np.load(SAMPLES / "digits_cnn.npz") as npz:
            cases.append(("digits_cnn, batch 1", SAMPLES / "digits_cnn.onnx", {"image": npz["image"][:1]}))
        for label, src, feed in cases:
            outs = []
            for bits, block in ((1, None), (2, None), (3, None), (4, 32), (8, None)):
                out = folder / f"{src.stem}.{bits}.{block}.onnx"
                args = ["--bits", str(bits)] + (["--block-size", str(block)] if block else [])
                if not _quantize(src, out, *args):
                    ok = False
                    continue
                outs.append(
                    (f"{bits} bit{'s' if bits > 1 else ''}" + (f", blocks of {block}" if block else ""), out)
                )
            start = time.perf_counter()
            Session(src, runtime, label="float")
            float_load = time.perf_counter() - start
            noise = _paired_ratio(src, src, runtime, feed)
            band = max(LATENCY_BAND, 1.5 * abs(noise - 1))
            print(
                f"   {label}: float session created in {float_load * 1000:.0f} ms; float file against "
                f"itself: {noise:.3f}x (noise)"
            )
            for name, out in outs:
                start = time.perf_counter()
                Session(out, runtime, label=name)
                load = time.perf_counter() - start
                ratio = _paired_ratio(src, out, runtime, feed)
                met = abs(ratio - 1) <= band
                ok = ok and met
                print(
                    f"     {name:22s} latency {ratio:.3f}x of float; session created in {load * 1000:.0f} ms; "
                    f"file {out.stat().st_size / src.stat().st_size:.3f}x -> {'within' if met else 'OUTSIDE'} "
                    f"1 +- {band:.3f}"
                )
    return ok


PARTS = {"fidelity": fidelity, "sizes": sizes, "latency": latency}


def run() -> bool:
    """All three parts (``LOWBIT_BENCH_PARTS=latency,sizes`` runs some)."""
    wanted = [
        p.strip() for p in os.environ.get("LOWBIT_BENCH_PARTS", ",".join(PARTS)).split(",") if p.strip()
    ]
    results = [PARTS[name]() for name in wanted]
    return all(results)
