"""Shell pipelines through the real CLI, in subprocesses: bytes on stdin and stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "modelshrink"]


def quantize_then_compare(src: Path, data: Path, *flags: str) -> tuple[bytes, dict[str, Any]]:
    """``quantize - -o - FLAGS < src | compare src - --json --data data``: the bytes quantize
    wrote, and compare's report."""
    first = subprocess.run(
        [*CLI, "quantize", "-", "-o", "-", "-q", "--no-latency", "--samples", "4", *flags],
        input=src.read_bytes(),
        capture_output=True,
        check=False,
    )
    assert first.returncode == 0, first.stderr.decode()
    second = subprocess.run(
        [*CLI, "compare", str(src), "-", "--json", "-q", "--no-latency", "--data", str(data)],
        input=first.stdout,
        capture_output=True,
        check=False,
    )
    assert second.returncode == 0, second.stderr.decode()
    doc: dict[str, Any] = json.loads(second.stdout)
    return first.stdout, doc
