"""quantize figures: size ratios, fidelity/size/latency against onnxruntime's quantize_dynamic,
and the tool's own wall time and peak RSS on a generated ~1 GB transformer-like model.

    python bench/run.py quantize
    QUANTIZE_BENCH_GB=0.3 python bench/run.py quantize   # a smaller big-model run

Every ratio is measured side by side in one run; nothing is hard-coded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from modelshrink.feeds import load_feeds
from modelshrink.measure import measure_latency
from modelshrink.pipeline import RunOptions, compare, run_technique
from modelshrink.report import Report
from modelshrink.runtime import RuntimeOptions, Session
from modelshrink.techniques import TECHNIQUES
from modelshrink.techniques.quantize import QuantizeConfig

from common import ROOT, Run, mlp_model

# Targets from the issue.
INT8_SIZE_TARGET = 0.26
INT4_SIZE_TARGET = 0.16
BIG_TIME_RATIO_TARGET = 0.5  # our int8 wall time / quantize_dynamic's
BIG_RSS_TARGET = 1.5  # peak RSS / model size
BIG_GB = float(os.environ.get("QUANTIZE_BENCH_GB", "1.0"))
# "Equal or smaller size": per-channel scales cost 4 bytes per output channel that
# quantize_dynamic's per-tensor default does not pay; allow that much.
SIZE_SLACK = 0.01
LATENCY_SLACK = 0.05  # shared-machine noise between two p50s of the same run
SAMPLES = ROOT / "sample_models"


def transformer_like(folder: Path, total_bytes: float, d: int = 1024, seq: int = 16) -> Path:
    """Pre-LN blocks (q/k/v/o d x d, FFN d x 4d x d, Gelu) with weights in one external file.

    Weights are written tensor by tensor, so generating the model needs little memory.
    """
    folder.mkdir(parents=True, exist_ok=True)
    per_block = 12 * d * d * 4
    blocks = max(1, round(total_bytes / per_block))
    rng = np.random.default_rng(0)
    data_name = "big.onnx.data"
    inits: list[TensorProto] = []
    nodes = []
    with (folder / data_name).open("wb") as f:

        def weight(name: str, rows: int, cols: int) -> None:
            array = (rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(np.sqrt(rows))).astype(
                np.float32
            )
            offset = f.tell()
            f.write(array.tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[rows, cols])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(array.nbytes)),
            ):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            inits.append(t)

        inits += [
            onnx.numpy_helper.from_array(np.ones(d, np.float32), "ln_scale"),
            onnx.numpy_helper.from_array(np.zeros(d, np.float32), "ln_bias"),
        ]
        x = "x"
        for b in range(blocks):
            p = f"b{b}"
            for name, rows, cols in (
                ("q", d, d),
                ("k", d, d),
                ("v", d, d),
                ("o", d, d),
                ("fc1", d, 4 * d),
                ("fc2", 4 * d, d),
            ):
                weight(f"{p}.{name}", rows, cols)
            nodes += [
                helper.make_node(
                    "LayerNormalization", [x, "ln_scale", "ln_bias"], [f"{p}.ln1"], name=f"{p}.ln1"
                ),
                helper.make_node("MatMul", [f"{p}.ln1", f"{p}.q"], [f"{p}.qo"], name=f"{p}.q_matmul"),
                helper.make_node("MatMul", [f"{p}.ln1", f"{p}.k"], [f"{p}.ko"], name=f"{p}.k_matmul"),
                helper.make_node("MatMul", [f"{p}.ln1", f"{p}.v"], [f"{p}.vo"], name=f"{p}.v_matmul"),
                helper.make_node("Mul", [f"{p}.qo", f"{p}.ko"], [f"{p}.qk"], name=f"{p}.qk"),
                helper.make_node("Add", [f"{p}.qk", f"{p}.vo"], [f"{p}.mix"], name=f"{p}.mix"),
                helper.make_node("MatMul", [f"{p}.mix", f"{p}.o"], [f"{p}.oo"], name=f"{p}.o_matmul"),
                helper.make_node("Add", [x, f"{p}.oo"], [f"{p}.r1"], name=f"{p}.res1"),
                helper.make_node(
                    "LayerNormalization", [f"{p}.r1", "ln_scale", "ln_bias"], [f"{p}.ln2"], name=f"{p}.ln2"
                ),
                helper.make_node("MatMul", [f"{p}.ln2", f"{p}.fc1"], [f"{p}.h"], name=f"{p}.fc1_matmul"),
                helper.make_node("Gelu", [f"{p}.h"], [f"{p}.g"], name=f"{p}.gelu"),
                helper.make_node("MatMul", [f"{p}.g", f"{p}.fc2"], [f"{p}.f"], name=f"{p}.fc2_matmul"),
                helper.make_node("Add", [f"{p}.r1", f"{p}.f"], [f"{p}.out"], name=f"{p}.res2"),
            ]
            x = f"{p}.out"
    graph = helper.make_graph(
        nodes,
        "transformer_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, seq, d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    (folder / "big.onnx").write_bytes(model.SerializeToString())
    return folder / "big.onnx"


def _files_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _run_python_rss(code: str) -> Run:
    """A Python child with exact peak RSS (os.wait4); output goes through files, not pipes."""
    out_dir = Path(tempfile.mkdtemp(prefix="modelshrink-bench-child-"))
    try:
        start = time.perf_counter()
        with (out_dir / "stdout").open("wb") as so, (out_dir / "stderr").open("wb") as se:
            proc = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=so, stderr=se, cwd=ROOT
            )
            _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        return Run(
            os.waitstatus_to_exitcode(status),
            seconds,
            usage.ru_maxrss / 1024,
            (out_dir / "stdout").read_bytes(),
            (out_dir / "stderr").read_bytes(),
        )
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _cli_rss(*args: str) -> Run:
    code = f"import sys; sys.argv = ['modelshrink', *{list(args)!r}]; from modelshrink._entry import main; main()"
    return _run_python_rss(code)


def bench_big(tmp: Path) -> bool:
    t0 = time.perf_counter()
    src = transformer_like(tmp / "big", BIG_GB * 1e9)
    size = _files_bytes(src)
    print(
        f"generated a {size / 1e9:.2f} GB transformer-like model (external data) in {time.perf_counter() - t0:.0f} s"
    )
    ours = _cli_rss(
        "quantize", str(src), "-o", str(tmp / "big" / "ours.onnx"), "--no-latency", "-q", "--json"
    )
    if ours.returncode != 0:
        print(f"modelshrink quantize failed: {ours.stderr.decode()[-800:]}")
        return False
    doc = json.loads(ours.stdout)
    ort_code = textwrap.dedent(
        f"""
        from onnxruntime.quantization import quantize_dynamic
        quantize_dynamic({str(src)!r}, {str(tmp / "big" / "ort.onnx")!r}, use_external_data_format=True)
        """
    )
    ort = _run_python_rss(ort_code)
    if ort.returncode != 0:
        print(f"quantize_dynamic failed: {ort.stderr.decode()[-800:]}")
        return False
    ort_size = _files_bytes(tmp / "big" / "ort.onnx")
    time_ratio = ours.seconds / ort.seconds
    rss_ratio = ours.peak_rss_mb * 1048576 / size
    ok_time = time_ratio <= BIG_TIME_RATIO_TARGET
    ok_rss = rss_ratio <= BIG_RSS_TARGET
    print(
        f"  modelshrink quantize (int8, with checks and verification on 8 samples): {ours.seconds:.1f} s, "
        f"peak RSS {ours.peak_rss_mb:.0f} MiB = {rss_ratio:.2f}x the model (target <= {BIG_RSS_TARGET}x: "
        f"{'met' if ok_rss else 'MISSED'}), size ratio {doc['ratios']['size']:.3f}, "
        f"cosine {doc['fidelity']['worst']['cosine']:.6f}"
    )
    print(f"    timings: {doc['timings_s']}")
    print(
        f"  onnxruntime quantize_dynamic: {ort.seconds:.1f} s, peak RSS {ort.peak_rss_mb:.0f} MiB, "
        f"size ratio {ort_size / size:.3f}"
    )
    print(
        f"  wall time ratio modelshrink / quantize_dynamic: {time_ratio:.2f} "
        f"(target <= {BIG_TIME_RATIO_TARGET}: {'met' if ok_time else 'MISSED'})"
    )
    # quantize_dynamic neither checks, loads nor runs what it wrote; modelshrink does all
    # three before writing. What that costs, from this run's own phase timings:
    timings = doc["timings_s"]
    checks = sum(timings.get(phase, 0.0) for phase in ("reference", "check", "verify"))
    print(
        f"  of which running the original, checker + onnxruntime load of the result, and "
        f"verifying it: {checks:.1f} s ({checks / ort.seconds:.2f}x quantize_dynamic's time); "
        f"the rest (start-up, load, quantize, save): {ours.seconds - checks:.1f} s = "
        f"{(ours.seconds - checks) / ort.seconds:.2f}x"
    )
    return ok_time and ok_rss


def _quantize(src: Path, out: Path, config: QuantizeConfig, data: str | None = None) -> Report:
    options = RunOptions(data=data, latency=False, samples=8 if data is None else 64)
    return run_technique("quantize", TECHNIQUES["quantize"], config, str(src), str(out), options, force=True)


def bench_sizes(tmp: Path) -> bool:
    """Size ratios on weight-dominated models, int8 and int4, every storage format."""
    models = {
        "MLP 1024-2048-2048-1000 (Gemm)": mlp_model(tmp / "mlp.onnx", (1024, 2048, 2048, 1000)),
        "transformer-like d=512, 8 blocks (MatMul)": transformer_like(tmp / "tl", 100e6, d=512),
    }
    ok = True
    for label, src in models.items():
        size = _files_bytes(src)
        figures = []
        for name, config, target in (
            ("int8", QuantizeConfig(), INT8_SIZE_TARGET),
            ("int8 --format cast", QuantizeConfig(format="cast"), INT8_SIZE_TARGET),
            ("int4", QuantizeConfig(mode="int4"), INT4_SIZE_TARGET),
            ("int4 --format qdq", QuantizeConfig(mode="int4", format="qdq"), INT4_SIZE_TARGET),
        ):
            report = _quantize(src, tmp / "out.onnx", config)
            ratio = report.result.size_bytes / report.original.size_bytes
            ok &= ratio <= target
            mark = "ok" if ratio <= target else "MISSED"
            figures.append(f"{name} {ratio:.4f} (<= {target}: {mark})")
        print(f"size ratio, {label}, {size / 1e6:.0f} MB: " + "; ".join(figures))
    return ok


def _ort_dynamic(src: Path, out: Path, **kwargs: object) -> Path:
    import logging

    from onnxruntime.quantization import quantize_dynamic

    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(src), str(out), **kwargs)  # type: ignore[arg-type]
    finally:
        logging.disable(logging.NOTSET)
    return out


def bench_vs_quantize_dynamic(tmp: Path) -> bool:
    """Ours (dynamic and int8) against onnxruntime's quantize_dynamic, side by side."""
    cases = [
        ("digits_mlp", SAMPLES / "digits_mlp.onnx", str(SAMPLES / "digits_mlp.npz")),
        ("digits_cnn", SAMPLES / "digits_cnn.onnx", str(SAMPLES / "digits_cnn.npz")),
        ("tiny_transformer", SAMPLES / "tiny_transformer.onnx", str(SAMPLES / "tiny_transformer.npz")),
        ("MLP 1024-2048-2048-1000", mlp_model(tmp / "mlp_ort.onnx", (1024, 2048, 2048, 1000)), None),
        ("transformer-like d=512 x2", transformer_like(tmp / "tl2", 25e6, d=512), None),
    ]
    runtime = RuntimeOptions()
    ok = True
    print(
        "vs onnxruntime quantize_dynamic (default settings); fidelity on real data where a sample "
        "model has it, else 8 synthetic inputs; p50 of all five interleaved in one process, 1 thread:"
    )
    header = f"  {'model':26s} {'candidate':22s} {'size':>7s} {'max|err|':>9s} {'cosine':>9s} {'top-1':>7s} {'p50 ms':>8s}"
    print(header)
    for label, src, data in cases:
        cands = {
            "modelshrink dynamic": _quantize(src, tmp / "dyn.onnx", QuantizeConfig(mode="dynamic"), data)
            and tmp / "dyn.onnx",
            "modelshrink int8": _quantize(src, tmp / "int8.onnx", QuantizeConfig(), data)
            and tmp / "int8.onnx",
            "ort quantize_dynamic": _ort_dynamic(src, tmp / "ort.onnx"),
            "ort ... per_channel": _ort_dynamic(src, tmp / "ort_pc.onnx", per_channel=True),
        }
        rows = {}
        for name, path in cands.items():
            report = compare(str(src), str(path), RunOptions(data=data, latency=False, samples=64))
            assert report.fidelity is not None
            rows[name] = (report.result.size_bytes / report.original.size_bytes, report.fidelity)
        sessions = [Session(src, runtime, label="original")] + [
            Session(p, runtime, label=n) for n, p in cands.items()
        ]
        feed = load_feeds(ir.load(src), data=data, samples=1).samples[0]
        stats = measure_latency(sessions, feed, budget_s=3.0)
        print(f"  {label:26s} {'original':22s} {1.0:7.3f} {'':>9s} {'':>9s} {'':>7s} {stats[0].p50_ms:8.3f}")
        for (name, (ratio, f)), st in zip(rows.items(), stats[1:], strict=True):
            top1 = "-" if f.top1_agreement is None else f"{f.top1_agreement:.1%}"
            print(
                f"  {'':26s} {name:22s} {ratio:7.3f} {f.max_abs_error:9.4g} {f.cosine:9.6f} {top1:>7s} {st.p50_ms:8.3f}"
            )
        ours, theirs = rows["modelshrink dynamic"], rows["ort quantize_dynamic"]
        fid_ok = ours[1].max_abs_error <= theirs[1].max_abs_error and ours[1].cosine >= theirs[1].cosine
        size_ok = ours[0] <= theirs[0] * (1 + SIZE_SLACK)
        # The target's ratio comes from a head-to-head run of the two sessions alone: in the
        # five-way round above each session runs after a different neighbour, whose weights
        # evict its own from the caches (the one after the float original always pays most).
        mine, ort_default = measure_latency([sessions[1], sessions[3]], feed, budget_s=2.0)
        mine_pc, ort_pc = measure_latency([sessions[1], sessions[4]], feed, budget_s=2.0)
        lat_ratio = mine.p50_ms / ort_default.p50_ms
        lat_ok = lat_ratio <= 1 + LATENCY_SLACK
        lat_pc = mine_pc.p50_ms / ort_pc.p50_ms
        ok &= fid_ok and size_ok and lat_ok
        print(
            f"  {'':26s} dynamic vs quantize_dynamic: fidelity {'equal or better' if fid_ok else 'WORSE (missed)'}, "
            f"size {ours[0] / theirs[0]:.3f}x ({'ok' if size_ok else 'MISSED'}, <= {1 + SIZE_SLACK:g}x), "
            f"latency head to head {lat_ratio:.2f}x ({'ok' if lat_ok else 'MISSED'}, <= {1 + LATENCY_SLACK:g}x; "
            f"{lat_pc:.2f}x quantize_dynamic per_channel=True)"
        )
    return ok


def run() -> bool:
    tmp = Path(tempfile.mkdtemp(prefix="modelshrink-bench-quantize-"))
    try:
        results = [bench_sizes(tmp), bench_vs_quantize_dynamic(tmp), bench_big(tmp)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return all(results)
