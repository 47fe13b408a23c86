"""Signals and killed runs (issue 14): SIGINT exits 130 and SIGTERM 143, with one line and no
traceback at any moment (imports included), nothing left behind; a signal during the final
renames waits for them; staging folders of killed runs are removed by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from modelshrink import api, io
from modelshrink.pipeline import RunOptions

import models

# The real entry point in a child, with one step made slow so that the signal lands there.
CHILD = textwrap.dedent(
    """
    import sys, time
    {patch}
    sys.argv = ["modelshrink", *{argv!r}]
    from modelshrink._entry import main
    main()
    """
)
SLOW_SAVE = """
import onnx_ir
real_save = onnx_ir.save
def slow_save(*args, **kwargs):
    real_save(*args, **kwargs)
    print("ready", flush=True)
    time.sleep(30)
onnx_ir.save = slow_save
"""
SLOW_IMPORT = """
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "onnx":
            print("ready", flush=True)
            time.sleep(30)
        return None
sys.meta_path.insert(0, Block())
"""
SLOW_COMMIT = """
import os
def slow(real):
    def move(src, dst, **kwargs):
        real(src, dst, **kwargs)
        if str(dst).endswith(".data") and ".modelshrink-" not in str(dst):  # in place, not staged
            print("ready", flush=True)
            time.sleep(1)
    return move
os.replace, os.link = slow(os.replace), slow(os.link)
"""
FAST = ["--no-latency", "--samples", "1", "-q"]
# A child that holds a temporary folder (as an onnxruntime copy of a big candidate does) until killed.
HOLD_TEMPORARY_FOLDER = textwrap.dedent(
    """
    import time
    from modelshrink import io
    with io.temporary_folder() as folder:
        (folder / "candidate.onnx").write_bytes(b"model bytes")
        print(folder, flush=True)
        time.sleep(30)
    """
)


def _start(patch: str, argv: list[str]) -> subprocess.Popen[str]:
    """The child as a command typed at a terminal starts: SIGINT at its default. (A suite run in
    the background, ``bash -c '... &'``, would hand it SIGINT ignored, which the tool keeps
    ignored on purpose: see test_background_job_keeps_ignoring_sigint.)"""
    code = CHILD.format(patch=patch, argv=argv)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _signal_when_ready(proc: subprocess.Popen[str], sig: int) -> tuple[int, str]:
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()
    proc.send_signal(sig)
    start = time.monotonic()
    proc.wait(timeout=20)
    assert time.monotonic() - start < 10
    return proc.returncode, proc.stderr.read()


def _assert_clean_exit(code: int, stderr: str, sig: int) -> None:
    word = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}[signal.Signals(sig)]
    assert code == 128 + sig, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [f"error: {word}"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_save_leaves_nothing(tmp_path: Path, sig: int, snapshot) -> None:
    src = models.save(models.mlp(), tmp_path / "in.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("unrelated file")
    argv = ["quantize", str(src), "-o", str(out_dir / "o.onnx"), "--report", str(out_dir / "r.json"), *FAST]
    proc = _start(SLOW_SAVE, argv)
    assert proc.stdout is not None
    code, stderr = _signal_when_ready(proc, sig)
    _assert_clean_exit(code, stderr, sig)
    assert snapshot(out_dir) == {"keep.txt": b"unrelated file"}
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_imports_is_one_line(tmp_path: Path, sig: int) -> None:
    src = models.save(models.mlp(), tmp_path / "in.onnx")
    proc = _start(SLOW_IMPORT, ["quantize", str(src), "-o", str(tmp_path / "o.onnx"), *FAST])
    code, stderr = _signal_when_ready(proc, sig)
    _assert_clean_exit(code, stderr, sig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


@pytest.mark.slow
def test_signal_between_data_and_model_waits_for_the_model(tmp_path: Path) -> None:
    """SIGTERM after the external data is in place: the model follows, then exit 143."""
    src = models.save_external(models.mlp(sizes=(64, 128, 10)), tmp_path / "in.onnx")
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    reference = tmp_path / "ref" / "o.onnx"
    reference.parent.mkdir()
    api.quantize(str(src), str(reference), options=RunOptions(latency=False, samples=1))
    proc = _start(SLOW_COMMIT, ["quantize", str(src), "-o", str(out), *FAST])
    code, stderr = _signal_when_ready(proc, signal.SIGTERM)
    _assert_clean_exit(code, stderr, signal.SIGTERM)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    for name in ("o.onnx", "o.onnx.data"):  # the complete pair of this run
        assert (out.parent / name).read_bytes() == (reference.parent / name).read_bytes()
    onnx.load(str(out))


@pytest.mark.slow
def test_staging_of_a_killed_run_is_removed_by_the_next_run(tmp_path: Path) -> None:
    src = models.save(models.mlp(), tmp_path / "in.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start(SLOW_SAVE, ["quantize", str(src), "-o", str(out_dir / "a.onnx"), *FAST])
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    (staging,) = [p for p in out_dir.iterdir() if p.name.startswith(".modelshrink-")]
    assert staging.name.startswith(f".modelshrink-{proc.pid}-")
    options = RunOptions(latency=False, samples=1)
    # while its process lives, another run writing there leaves it alone
    api.quantize(str(src), str(out_dir / "b.onnx"), options=options)
    assert staging.exists()
    proc.kill()  # SIGKILL: no clean-up runs
    proc.wait(timeout=20)
    assert staging.exists()
    api.quantize(str(src), str(out_dir / "c.onnx"), options=options)
    assert sorted(p.name for p in out_dir.iterdir()) == ["b.onnx", "c.onnx"]


@pytest.mark.slow
def test_temporary_folder_of_a_killed_run_is_removed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written only for onnxruntime go to io.temporary_folder() in the system temp folder:
    one that SIGKILL left there is removed when the next process makes one, never while its
    process lives."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_TEMPORARY_FOLDER],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert proc.stdout is not None
    left = Path(proc.stdout.readline().strip())
    assert left.parent == temp and left.name.startswith(f".modelshrink-{proc.pid}-")
    with io.temporary_folder() as mine:  # its process lives: left alone
        assert mine.parent == temp and (left / "candidate.onnx").exists()
    assert not mine.exists()
    proc.kill()  # SIGKILL: no clean-up runs
    proc.wait(timeout=20)
    assert left.exists()
    with io.temporary_folder() as mine:
        assert [p.name for p in temp.iterdir()] == [mine.name]
    assert not list(temp.iterdir())


@pytest.mark.slow
def test_background_job_keeps_ignoring_sigint(tmp_path: Path) -> None:
    """A shell starts background jobs with SIGINT ignored; the command must not undo that."""
    src = models.save(models.mlp(), tmp_path / "in.onnx")
    code = CHILD.format(patch=SLOW_SAVE, argv=["quantize", str(src), "-o", str(tmp_path / "o.onnx"), *FAST])
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # still running
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    assert proc.returncode == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_no_signal_handlers_are_left_changed_by_a_commit(tmp_path: Path) -> None:
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    src = models.save(models.mlp(), tmp_path / "in.onnx")
    api.quantize(str(src), str(tmp_path / "o.onnx"), options=RunOptions(latency=False, samples=1))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert os.path.exists(tmp_path / "o.onnx")
