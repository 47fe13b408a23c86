"""NNCF 3.4.0 as a bench-only peer: int4 weight compression (AWQ + scale estimation) of ONNX models.

    cd bench && ../.venv/bin/python peer_nncf.py

NNCF is never a dependency of modelshrink: like onnxsim in ``bench_dataaware.py`` it is installed
into its own virtual environment, ``build/nncf-venv`` (``pip install nncf==3.4.0 onnx onnxruntime
numpy``), on first use, and every job runs there in one child process (``PEER_SCRIPT``) that prints
one JSON line per job.

Per job it calls ``nncf.compress_weights(model, mode=INT4_SYM, group_size=32, ratio=1.0,
dataset=..., awq=True, scale_estimation=True)`` (INT4_ASYM writes files onnxruntime rejects), the
dataset being the calibration rows in items of ``batch`` rows. What NNCF 3.4.0 does with that, read
in its source and seen on the samples:

- Only MatMul/Gemm weights are "ratio-defining" and go to int4 (blocks of 32 along the reduction
  axis; below opset 21 as onnxruntime's ``com.microsoft.MatMulNBits``). The last MatMul/Gemm, the
  Gather tables (embeddings) and every Conv kernel go to the backup precision, int8 asymmetric
  per output channel (``DequantizeLinear``), whatever ``ratio`` says; ``all_layers=True`` (job key
  ``"all_layers"``, off by default) puts the last layer and the Gather tables in int4 too, but on
  a Gather below opset 21 it writes a ``MatMulNBits`` fed with int64 ids, which onnxruntime
  rejects. A Slice-read table (tiny_transformer's positions) is not a weight to NNCF: kept float.
- ``sensitivity_metric`` only ranks layers when ``ratio < 1``: at 1.0 it is unused.
- ``subset_size`` (128) counts dataset *items*, not rows; AWQ uses at most 32 items and scale
  estimation 64. Each item's activation is reduced to its mean over every axis but the channel
  one, batch included, so 128 rows in items of 16 give AWQ and scale estimation 8 mean vectors
  (NNCF warns "Dataset contains only 8 samples").
- AWQ only acts on MatMul/Gemm -> activation -> MatMul/Gemm chains whose second layer is int4; it
  skips the rest silently (or says so at INFO level when nothing matches).
- A weight whose reduction axis is not a multiple of ``group_size`` raises
  ``InvalidGroupSizeError`` (NNCF's default ``group_size_fallback_mode``); a non-float weight is
  skipped and kept as is.

Known failures, hence the retries: scale estimation on a Gemm with ``transB=1`` that goes to int4
crashes when the weight is written (``operands could not be broadcast together``), and the int8
``DequantizeLinear`` NNCF writes for a Conv kernel has a scale of shape ``[C, 1, 1]``, which
onnxruntime refuses when it runs the model. So a job tries, in order, (awq, scale_estimation) =
(True, True), (True, False), (False, True), (False, False), and, when the model has a Conv and all
four failed, the same four again with ``ignored_scope=IgnoredScope(types=["Conv"])`` (Conv kernels
kept in float, as the onnxsim peer keeps them). A try counts only when the written file loads in
onnxruntime (CPUExecutionProvider) and gives finite outputs on the first calibration item.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, bench_python, first_output

NNCF_VENV = ROOT / "build" / "nncf-venv"
NNCF_VERSION = "3.4.0"
TIMEOUT_S = 1800
SAMPLES = ROOT / "sample_models"
SAMPLE_NAMES = ("digits_mlp", "digits_cnn", "tiny_transformer")
CALIBRATION_ROWS = 128
BATCH = 16

# Runs in NNCF's own environment: argv[1] is a JSON job list; prints one JSON line per job on the
# real stdout (NNCF's log and progress bars, which write to stdout, are sent to stderr).
PEER_SCRIPT = """
import json, logging, os, sys, time, traceback
os.environ.setdefault("NNCF_CI", "1")  # NNCF then swaps its telemetry for a stub: nothing is sent
answer = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
import numpy as np, onnx, onnxruntime as ort, nncf
from onnx import TensorProto
from nncf.common.logging import nncf_logger

messages = []
class Keep(logging.Handler):
    def emit(self, record):
        messages.append((record.levelno, record.getMessage()))
nncf_logger.addHandler(Keep())
nncf_logger.setLevel(logging.DEBUG)  # its own stdout handler stays at INFO; AWQ names layers at DEBUG

LADDER = ((True, True), (True, False), (False, True), (False, False))
INT4 = {TensorProto.INT4, TensorProto.UINT4}
FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

def line(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text if len(text) <= 260 else f"{text[:150]} ... {text[-100:]}"
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if "/nncf/" in f.filename and "/nncf/tensor/" not in f.filename]
    return text + (f" [in {os.path.basename(frames[-1].filename)}:{frames[-1].name}]" if frames else "")

def precisions(model):
    inits = {i.name: i.data_type for i in model.graph.initializer}
    got = {"int4": [], "int8": [], "float": []}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            got["int4"].append(node.input[1].removesuffix("_quantized"))
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            kind = "int4" if inits[node.input[0]] in INT4 else "int8"
            got[kind].append(node.input[0].removesuffix("_quantized"))
        elif node.op_type in ("MatMul", "Gemm", "Conv", "Gather"):
            got["float"] += [i for i in node.input[:2] if inits.get(i) in FLOAT]
    return got

def attempt(job, items, awq, se, no_conv):
    kw = {}
    if no_conv:
        kw["ignored_scope"] = nncf.IgnoredScope(types=["Conv"])
    if job.get("all_layers"):
        kw["all_layers"] = True
    model = onnx.load(job["model"])  # fresh each try: a failed try may have changed it in place
    out = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=int(job["group"]), ratio=1.0,
        dataset=nncf.Dataset(items), awq=awq, scale_estimation=se, **kw,
    )
    onnx.save(out, job["out"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 4
    session = ort.InferenceSession(job["out"], so, providers=["CPUExecutionProvider"])
    for value in session.run(None, items[0]):
        if not np.all(np.isfinite(value)):
            raise RuntimeError("onnxruntime ran the file but its outputs are not finite")
    return out

jobs = json.loads(sys.argv[1])
for job in jobs:
    start = time.perf_counter()
    tried = []
    row = {"out": job["out"], "ok": False}
    try:
        if int(job.get("bits", 4)) != 4:
            raise ValueError(f"only 4 bits (INT4_SYM) is run, not {job['bits']}")
        with np.load(job["data"]) as d:
            arrays = {k: d[k] for k in d.files}
        n, b = len(next(iter(arrays.values()))), int(job["batch"])
        items = [{k: v[i:i + b] for k, v in arrays.items()} for i in range(0, n, b)]
        has_conv = any(node.op_type == "Conv" for node in onnx.load(job["model"]).graph.node)
    except Exception as exc:
        row["why"] = line(exc)
        print(json.dumps(row), file=answer, flush=True)
        continue
    tries = [(a, s, False) for a, s in LADDER] + ([(a, s, True) for a, s in LADDER] if has_conv else [])
    for awq, se, no_conv in tries:
        settings = f"awq={awq} scale_estimation={se}" + (" ignored_scope=Conv" if no_conv else "")
        settings += " all_layers=True" if job.get("all_layers") else ""
        messages.clear()
        try:
            out = attempt(job, items, awq, se, no_conv)
        except Exception as exc:
            tried.append(f"{settings}: {type(exc).__name__}: {line(exc)}")
            if os.path.exists(job["out"]):
                os.remove(job["out"])
            continue
        notes = []
        for level, text in messages:
            first = text.strip().splitlines()[0][:200] if text.strip() else ""
            if (level >= logging.WARNING or "skipped" in first) and first not in notes:
                notes.append(first)
        awq_layers = [t.split(" for: ", 1)[1] for lvl, t in messages if "AWQ for: " in t]
        row = {
            "out": job["out"], "ok": True, "settings": settings, "tried": tried, "notes": notes,
            "awq_layers": awq_layers, "precisions": precisions(out),
        }
        break
    else:
        row["why"] = f"every setting failed; first: {tried[0]}" if tried else "nothing tried"
        row["tried"] = tried
    row["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(row), file=answer, flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "NNCF_CI": "1"}


def nncf_python() -> Path | str:
    """NNCF's interpreter in ``build/nncf-venv``, installing nncf==3.4.0 there on first use, or a
    one-line reason when the environment cannot be set up (e.g. no package index)."""
    pinned = f"nncf=={NNCF_VERSION}"
    requirements = [pinned, "onnx", "onnxruntime", "numpy"]
    python, why = bench_python(NNCF_VENV, requirements, "nncf, onnx, onnxruntime", pinned=pinned)
    return python if python is not None else f"{pinned} could not be installed: {why}"


def run_nncf(
    python: Path | str,
    jobs: list[dict[str, object]],
    details: dict[str, dict[str, object]] | None = None,
) -> dict[str, str | None]:
    """Runs the jobs in NNCF's environment; by ``job["out"]``, None when written, else why not.

    A job is ``{"model": float .onnx, "data": .npz of calibration rows keyed by input name,
    "batch": rows per dataset item, "bits": 4, "group": 32, "out": path to write}``, plus
    optionally ``"all_layers": True``. The file is written only when onnxruntime runs it (see the
    module's docstring for the retries); the reason for a failure is one line, and names the
    first setting's error.

    ``details``, when given, is filled by ``job["out"]`` with what happened to each answered
    job: ``settings`` (the ones that worked, e.g. ``"awq=True scale_estimation=False"``; absent
    on failure), ``tried`` (``"settings: error"`` for each failed try, in order), ``notes``
    (NNCF's warnings, and its INFO lines saying a step was skipped), ``awq_layers`` (the layers
    AWQ rescaled), ``precisions`` (weight names by ``int4`` / ``int8`` / ``float`` in the written
    file) and ``seconds``.
    """
    if isinstance(python, str) or not jobs:
        return {str(j["out"]): f"NNCF not installed: {python}" for j in jobs}
    result: dict[str, str | None] = {str(j["out"]): "no answer from NNCF" for j in jobs}
    try:
        run = subprocess.run(
            [str(python), "-c", PEER_SCRIPT, json.dumps(jobs)],
            capture_output=True,
            timeout=TIMEOUT_S,
            env=_env(),
        )
    except subprocess.TimeoutExpired as exc:
        stdout, tail = exc.stdout or b"", f"timed out after {TIMEOUT_S} s"
    except OSError as exc:
        return {out: f"could not run NNCF: {exc}" for out in result}
    else:
        stdout = run.stdout
        last = (run.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        tail = f"exit {run.returncode}: {last[:120]}"
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            result[row["out"]] = None if row["ok"] else row.get("why", "failed")
            if details is not None:
                details[row["out"]] = {k: v for k, v in row.items() if k not in ("out", "ok", "why")}
    return {out: f"{why} ({tail})" if why == "no answer from NNCF" else why for out, why in result.items()}


def main() -> int:
    """NNCF on the three samples: first 128 rows calibrate, the rest score the first output."""
    start = time.perf_counter()
    python = nncf_python()
    print(f"nncf {NNCF_VERSION} in {NNCF_VENV.relative_to(ROOT)}: ", end="")
    if isinstance(python, str):
        print(python)
        return 1
    print(f"ready ({time.perf_counter() - start:.1f} s)")
    with tempfile.TemporaryDirectory(prefix="peer-nncf-") as tmp:
        folder = Path(tmp)
        jobs: list[dict[str, object]] = []
        held: dict[str, dict[str, np.ndarray]] = {}
        for name in SAMPLE_NAMES:
            with np.load(SAMPLES / f"{name}.npz") as npz:
                arrays = {k: npz[k] for k in npz.files if k != "labels"}
            data = folder / f"{name}.calib.npz"
            np.savez(data, **{k: v[:CALIBRATION_ROWS] for k, v in arrays.items()})
            held[name] = {k: v[CALIBRATION_ROWS:] for k, v in arrays.items()}
            model, out = SAMPLES / f"{name}.onnx", folder / f"{name}.nncf.onnx"
            jobs.append(
                {
                    "model": str(model),
                    "data": str(data),
                    "batch": BATCH,
                    "bits": 4,
                    "group": 32,
                    "out": str(out),
                }
            )
        details: dict[str, dict[str, object]] = {}
        begin = time.perf_counter()
        peer = run_nncf(python, jobs, details)
        print(f"NNCF run: {time.perf_counter() - begin:.1f} s for {len(jobs)} models")
        failed = 0
        for name, job in zip(SAMPLE_NAMES, jobs, strict=True):
            out, why = Path(str(job["out"])), peer[str(job["out"])]
            info = details.get(str(out), {})
            if why is not None:
                failed += 1
                print(f"{name:17s} FAILED  {why}")
                continue
            reference = first_output(Path(str(job["model"])), held[name])
            got = first_output(out, held[name])
            error = float(np.abs(got - reference).mean())
            agree = float(np.mean(got.argmax(-1) == reference.argmax(-1)))
            precisions = dict(info.get("precisions") or {})
            layers = " ".join(f"{k} {len(v)}" for k, v in precisions.items())
            print(
                f"{name:17s} ok  {info.get('settings')}  {out.stat().st_size / 1024:.1f} KB"
                f"  mean|err| {error:.4g}  top-1 {agree:.1%}  ({layers}; {info.get('seconds')} s)"
            )
            for label in ("int8", "float"):
                if precisions.get(label):
                    print(f"{'':17s}   {label}: {', '.join(precisions[label])}")
            print(f"{'':17s}   awq rescaled: {', '.join(info.get('awq_layers') or []) or 'nothing'}")
            for line in info.get("tried") or []:
                print(f"{'':17s}   failed try: {line}")
            for line in info.get("notes") or []:
                print(f"{'':17s}   nncf: {line}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
