"""Write faults at every step of a run (issue 14): ENOSPC or EIO at the Nth write, rename, link,
mkdir or fsync, through the Python API. Whichever fails, the old model, its external data and the
old report stay byte for byte, nothing is left behind, and the error is one ModelshrinkError line.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io as pyio
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelshrink import api
from modelshrink.errors import ModelshrinkError
from modelshrink.pipeline import RunOptions
from modelshrink.techniques import QuantizeConfig

import models

OPTIONS = RunOptions(latency=False, samples=1)
OS_CALLS = ("replace", "link", "rename", "mkdir", "fsync")


class Faults:
    """Counts write-like calls; the ``fail_at``-th raises ``OSError(err)``."""

    def __init__(self, fail_at: int, err: int) -> None:
        self.fail_at, self.err, self.count = fail_at, err, 0
        self.failed: str | None = None

    def tick(self, what: str) -> None:
        self.count += 1
        if self.count == self.fail_at:
            self.failed = what
            raise OSError(self.err, os.strerror(self.err))


class _Writer:
    """A file opened for writing whose ``write`` counts; no ``fileno``, so every byte goes
    through ``write`` (onnx_ir copies external tensors with copy_file_range otherwise)."""

    def __init__(self, file: Any, faults: Faults) -> None:
        self._file, self._faults = file, faults

    def write(self, data: Any) -> int:
        self._faults.tick("write")
        return self._file.write(data)

    def fileno(self) -> int:
        raise pyio.UnsupportedOperation("fileno")

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@contextlib.contextmanager
def injected(monkeypatch: pytest.MonkeyPatch, faults: Faults) -> Iterator[None]:
    real_open = builtins.open

    def fopen(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        return _Writer(f, faults) if any(c in mode for c in "wax+") else f

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", fopen)
        m.setattr(pyio, "open", fopen)
        for name in OS_CALLS:
            real = getattr(os, name)

            def call(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
                # A folder's fsync comes after the renames: its failure is logged, not fatal.
                if not (_name == "fsync" and stat.S_ISDIR(os.fstat(args[0]).st_mode)):
                    faults.tick(_name)
                return _real(*args, **kwargs)

            m.setattr(os, name, call)
        yield


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _run_until_it_passes(
    monkeypatch: pytest.MonkeyPatch, err: int, run: Any, check_failed: Any
) -> tuple[int, set[str]]:
    """Fail the 1st, 2nd, ... write-like call until a run makes it through; check each failure."""
    points: set[str] = set()
    for n in range(1, 500):
        faults = Faults(n, err)
        with injected(monkeypatch, faults):
            try:
                run()
            except ModelshrinkError as exc:
                assert faults.failed is not None, exc
                assert "\n" not in exc.message and exc.exit_code in (1, 2), exc.message
                assert "Traceback" not in exc.message
                points.add(faults.failed)
                check_failed(n, faults.failed, exc)
                continue
        assert faults.failed is None, f"write {n} ({faults.failed}) failed but the run reported success"
        return n, points
    raise AssertionError("never got through")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_faults_replacing_an_output_keep_the_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    (tmp_path / "in").mkdir()
    src = models.save_external(models.mlp(sizes=(64, 128, 10)), tmp_path / "in" / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, report = out_dir / "o.onnx", out_dir / "r.json"
    api.quantize(str(src), str(out), QuantizeConfig(mode="fp16"), OPTIONS, report=report)
    old = _files(out_dir)
    assert sorted(old) == ["o.onnx", "o.onnx.data", "r.json"]

    def run() -> None:
        api.quantize(str(src), str(out), QuantizeConfig(), OPTIONS, force=True, report=report)

    def check_failed(n: int, what: str, exc: ModelshrinkError) -> None:
        assert _files(out_dir) == old, f"fault {n} ({what}): {exc.message}"
        assert not list((tmp_path / "in").glob(".modelshrink-*"))

    n, points = _run_until_it_passes(monkeypatch, err, run, check_failed)
    new = _files(out_dir)
    assert sorted(new) == sorted(old) and all(new[k] != old[k] for k in ("o.onnx", "o.onnx.data"))
    assert {"write", "mkdir", "replace", "fsync"} <= points, points  # every kind was hit
    assert n > 10


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_faults_writing_a_new_output_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    (tmp_path / "in").mkdir()
    src = models.save_external(models.mlp(sizes=(64, 128, 10)), tmp_path / "in" / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def run() -> None:
        api.quantize(str(src), str(out_dir / "o.onnx"), None, OPTIONS, report=out_dir / "r.json")

    def check_failed(n: int, what: str, exc: ModelshrinkError) -> None:
        assert _files(out_dir) == {}, f"fault {n} ({what}): {exc.message}"

    n, points = _run_until_it_passes(monkeypatch, err, run, check_failed)
    assert sorted(_files(out_dir)) == ["o.onnx", "o.onnx.data", "r.json"]
    assert n > 10
    assert {"write", "mkdir", "link"} <= points, points  # nothing replaced: no fsync
