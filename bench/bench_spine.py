"""Spine figures: start-up of the command line, inspect on a ~3 GB external-data model, and
compare of a model with itself."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import big_external_model, mlp_model, run_cli, run_cli_rss

HELP_RATIO = 3.0
INSPECT_SECONDS = 5.0
INSPECT_RSS_MB = 500.0
SELF_LATENCY_TOLERANCE = 0.05


def bench_inspect_big(tmp: Path) -> bool:
    path = big_external_model(tmp / "big", 3e9)
    size_gb = sum(p.stat().st_size for p in path.parent.iterdir()) / 1e9
    run = run_cli_rss("inspect", str(path), "--json", "-q")
    if run.returncode != 0:
        print(f"inspect failed: {run.stderr.decode()[-500:]}")
        return False
    doc = run.json()
    ok = run.seconds < INSPECT_SECONDS and run.peak_rss_mb < INSPECT_RSS_MB
    print(
        f"inspect {size_gb:.2f} GB model ({doc['params'] / 1e6:.0f}M params, external data): "
        f"{run.seconds:.2f} s (target < {INSPECT_SECONDS:g} s), peak RSS {run.peak_rss_mb:.0f} MB "
        f"(target < {INSPECT_RSS_MB:g} MB, {run.peak_rss_mb / (size_gb * 1000):.3f}x the model)"
    )
    return ok


def bench_compare_self(tmp: Path) -> bool:
    path = mlp_model(tmp / "mlp.onnx", (1024, 2048, 2048, 1000))
    run = run_cli("compare", str(path), str(path), "--json", "-q")
    if run.returncode != 0:
        print(f"compare failed: {run.stderr.decode()[-500:]}")
        return False
    doc = run.json()
    lat = doc["latency"]
    ratio = lat["result"]["p50_ms"] / lat["original"]["p50_ms"]
    err = doc["fidelity"]["worst"]["max_abs_error"]
    ok = err == 0 and abs(ratio - 1) <= SELF_LATENCY_TOLERANCE
    print(
        f"compare model with itself ({path.stat().st_size / 1e6:.1f} MB MLP): max abs error {err}, "
        f"p50 {lat['original']['p50_ms']:.3f} vs {lat['result']['p50_ms']:.3f} ms over "
        f"{lat['original']['runs']} interleaved runs: ratio {ratio:.3f} "
        f"(target within ±{SELF_LATENCY_TOLERANCE:.0%})"
    )
    return ok


def _wall(cmd: list[str], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_help_startup() -> bool:
    """`modelshrink --help` against the floor of any Typer CLI: importing typer and rich."""
    baseline = _wall([sys.executable, "-c", "import typer, rich"])
    results = {}
    for args in (["--help"], ["quantize", "--help"], ["--version"]):
        results[" ".join(args)] = _wall([sys.executable, "-m", "modelshrink", *args])
    worst = max(results.values()) / baseline
    for name, seconds in results.items():
        print(f"modelshrink {name}: {seconds * 1000:.0f} ms = {seconds / baseline:.2f}x `import typer, rich`")
    print(
        f"python -c 'import typer, rich': {baseline * 1000:.0f} ms (median of 7); target <= {HELP_RATIO:g}x"
    )
    return worst <= HELP_RATIO


def run() -> bool:
    tmp = Path(tempfile.mkdtemp(prefix="modelshrink-bench-"))
    try:
        results = [bench_help_startup(), bench_compare_self(tmp), bench_inspect_big(tmp)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return all(results)
