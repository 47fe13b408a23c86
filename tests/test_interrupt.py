"""Interrupting a run (SIGINT/SIGTERM) while the output is being written leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import models

# A child process running the toy command with a deliberately slow disk: ir.save sleeps after
# writing, so the signal lands while the staged files exist.
CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import onnx_ir
    from modelshrink import cli
    real_save = onnx_ir.save
    def slow_save(*args, **kwargs):
        real_save(*args, **kwargs)
        print("staged", flush=True)
        time.sleep(30)
    onnx_ir.save = slow_save
    import test_cli
    sys.argv = ["modelshrink", "scale", {src!r}, "-o", {out!r}, "-q"]
    import signal
    signal.signal(signal.SIGTERM, cli._on_sigterm)
    test_cli.toy()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_save_leaves_nothing(tmp_path: Path, sig: signal.Signals, snapshot) -> None:
    src = models.save(models.mlp(), tmp_path / "in.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("unrelated file")
    code = CHILD.format(tests=str(Path(__file__).parent), src=str(src), out=str(out_dir / "o.onnx"))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "staged", proc.stderr.read() if proc.stderr else ""
    assert any(p.name.startswith(".modelshrink-") for p in out_dir.iterdir())
    proc.send_signal(sig)
    start = time.monotonic()
    proc.wait(timeout=20)
    assert time.monotonic() - start < 10
    assert proc.returncode == 130
    assert snapshot(out_dir) == {"keep.txt": b"unrelated file"}
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]
