"""The examples in the docs run, on the sample models, and end as the docs say.

Per page (``README.md``, ``docs/*.md``), in a fresh folder holding a copy of
``sample_models/``, in page order (so an example may read what an earlier one wrote):

- every command line of an ``sh`` block that calls ``modelshrink`` is run in-process, with
  ``--no-latency`` added unless the example is about latency. It must exit 0, or the code a
  trailing ``# exit N`` comment gives. It must be runnable: made only of ``modelshrink`` stages
  (optionally fed by ``cat FILE`` and ending in ``> FILE``), reading files that exist there
  (the samples, or what an earlier example wrote). A block that cannot (it names your model,
  needs a GPU, takes minutes) is marked ``<!-- illustrative: REASON -->``: its lines are only
  parsed (``tests/test_docs.py``), and the reason must say why in a few words;
- every ``python`` block preceded by ``<!-- run -->`` is executed; any other must be marked
  ``<!-- illustrative: REASON -->`` (it needs pillow, your photos, ...) and still compile;
- every ``text`` block preceded by ``<!-- output -->`` is what the example just before it prints:
  each of its lines (latency aside; whitespace collapsed, since the terminal's width decides the
  wrapping) must be in what that example prints now.

Every page has at least one example that runs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import docpages
import pytest
from docpages import PAGES, ROOT
from typer.testing import CliRunner

from modelshrink.cli import app

SAMPLES = ROOT / "sample_models"


def _why_not_runnable(line: docpages.CommandLine) -> str | None:
    """Why a command line cannot run in the current folder, or None."""
    if line.foreign:
        return line.foreign
    for stage in line.stages:
        files = [stage.argv[1]] if stage.argv[:1] == ("cat",) else docpages.files_read(stage.argv)
        missing = [f for f in files if not Path(f).exists()]
        if missing:
            return f"reads {missing[0]}, which is neither a sample nor written by an earlier example"
    return None


def _run_line(line: docpages.CommandLine, runner: CliRunner) -> str:
    """Run one runnable command line in the current folder: what it printed on stderr."""
    data: bytes | None = None
    code = 0
    printed = ""
    for stage in line.stages:
        if stage.argv[:1] == ("cat",):
            data = Path(stage.argv[1]).read_bytes()
            continue
        result = runner.invoke(app, list(docpages.with_speed(stage.argv)), input=data)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(
                f"{line.where}: 'modelshrink {' '.join(stage.argv)}' raised {result.exception!r}"
            ) from result.exception
        code = result.exit_code
        data = result.stdout_bytes
        printed = result.stderr
        if code != 0 and stage is not line.stages[-1]:
            break
    if line.redirect and data is not None:
        Path(line.redirect).write_bytes(data)
    if code != line.expect:
        tail = result.stderr.strip().splitlines()[-3:]
        raise AssertionError(f"{line.where}: '{line.text}' exited {code}, the docs say {line.expect}: {tail}")
    return printed


def _run_python(block: docpages.Block) -> None:
    try:
        exec(compile(block.text, block.where, "exec"), {"__name__": "__doc_example__"})
    except Exception as exc:
        raise AssertionError(f"{block.where}: the python example failed: {exc!r}") from exc


def _check_output(block: docpages.Block, printed: str | None) -> None:
    """A pasted output is what the example before it prints (latency aside)."""
    assert printed is not None, f"{block.where}: '<!-- output -->' follows no example that ran"
    now = docpages.flat(printed)
    missing = [line for line in docpages.printed_lines(block.text) if line not in now]
    assert not missing, (
        f"{block.where}: the pasted output differs from what the example prints now; "
        f"lines no longer printed: {missing[:5]}"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sample_models").mkdir()
    for f in SAMPLES.iterdir():
        if f.suffix in (".onnx", ".npz"):
            shutil.copyfile(f, tmp_path / "sample_models" / f.name)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    ran = []
    not_run = []
    start = time.perf_counter()
    printed: str | None = None
    for block in docpages.blocks(page):
        began = time.perf_counter()
        if block.lang == "python" and block.mark == docpages.RUN_MARK:
            _run_python(block)
            ran.append((block.where, time.perf_counter() - began))
        elif block.mark == docpages.OUTPUT_MARK:
            _check_output(block, printed)
        elif block.lang == "python":
            reason = block.illustrative
            assert reason is not None, (
                f"{block.where}: a python example runs ('<!-- run -->' before it) or says why it "
                "cannot ('<!-- illustrative: why -->')"
            )
            assert len(reason.split()) >= 3, f"{block.where}: say why it is illustrative, in a few words"
            compile(block.text, block.where, "exec")  # still valid Python
        elif block.lang == "sh" and (reason := block.illustrative) is not None:
            printed = None
            assert len(reason.split()) >= 3, f"{block.where}: say why it is illustrative, in a few words"
            assert any(line.calls for line in docpages.command_lines(block)), (
                f"{block.where}: marked illustrative but shows no modelshrink command: drop the mark"
            )
        elif block.lang == "sh":
            for line in docpages.command_lines(block):
                if not line.calls:
                    continue
                if (why := _why_not_runnable(line)) is not None:
                    not_run.append(f"{line.where}: '{line.text[:80]}': {why}")
                    printed = None
                    continue
                began = time.perf_counter()
                printed = _run_line(line, runner)
                ran.append((line.text, time.perf_counter() - began))
    seconds = time.perf_counter() - start
    assert not not_run, (
        "examples that cannot run on the sample models: make them run, or mark their block "
        "'<!-- illustrative: why -->':\n  " + "\n  ".join(not_run)
    )
    assert ran, f"{page.relative_to(ROOT)} has no example that runs on the sample models"
    slowest = sorted(ran, key=lambda r: -r[1])[:3]
    print(f"{page.relative_to(ROOT)}: {len(ran)} examples in {seconds:.1f} s; slowest:")
    for text, took in slowest:
        print(f"  {took:5.1f} s  {text[:110]}")
