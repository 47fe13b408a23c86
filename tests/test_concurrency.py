"""Runs racing to write one output with external data never leave a mixed pair (issue 14).

Three processes quantize the same input to the same ``out.onnx`` (+ ``out.onnx.data``) in
different modes, 20 rounds, started together: with ``--force`` (the last to commit wins), and
without it on a fresh folder (exactly one wins; the others change nothing). After every round
the model and its data must be byte for byte the pair one of the runs writes alone. Every run
pauses a random 0-50 ms between putting its data file in place and its model, so that without
the lock commits interleave in every order (the test fails then).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import onnx
import pytest

import models

ROUNDS = 20
MODES = ("int8", "fp16", "bf16")
SLOW_RENAME_S = 0.05


def _options() -> Any:
    from modelshrink import RunOptions

    return RunOptions(latency=False, samples=1)


def _slow_renames(seed: int) -> None:
    """Pause (0-50 ms, at random) after a data file is put in place, before the model."""
    real_replace, real_link = os.replace, os.link
    rng = random.Random(seed)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        real_replace(src, dst, **kwargs)
        if str(dst).endswith(".data"):
            time.sleep(rng.uniform(0, SLOW_RENAME_S))

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        real_link(src, dst, **kwargs)
        if str(dst).endswith(".data"):
            time.sleep(rng.uniform(0, SLOW_RENAME_S))

    os.replace, os.link = replace, link  # type: ignore[assignment]


def _worker(mode: str, src: str, out: str, start: Any, done: Any, results: Any) -> None:
    from modelshrink import QuantizeConfig, api
    from modelshrink.errors import ModelshrinkError

    _slow_renames(MODES.index(mode))
    for round_ in range(ROUNDS):
        try:
            start.wait()
        except threading.BrokenBarrierError:
            return
        try:
            api.quantize(src, out, QuantizeConfig(mode=mode), _options(), force=round_ % 2 == 0)  # type: ignore[arg-type]
            outcome = "ok"
        except ModelshrinkError as exc:
            outcome = f"exit {exc.exit_code}: {exc}"
        results.put((round_, mode, outcome))
        try:
            done.wait()
        except threading.BrokenBarrierError:
            return


def _pair(folder: Path) -> tuple[bytes, bytes | None]:
    data = folder / "out.onnx.data"
    return (folder / "out.onnx").read_bytes(), data.read_bytes() if data.exists() else None


@pytest.mark.slow
def test_racing_runs_leave_one_runs_pair(tmp_path: Path) -> None:
    from modelshrink import QuantizeConfig, api

    src = models.save_external(models.mlp(sizes=(64, 128, 10)), tmp_path / "in.onnx")
    references = {}
    for mode in MODES:  # each mode alone: the pair it writes
        (tmp_path / mode).mkdir()
        api.quantize(str(src), str(tmp_path / mode / "out.onnx"), QuantizeConfig(mode=mode), _options())  # type: ignore[arg-type]
        references[_pair(tmp_path / mode)] = mode
    assert len(references) == len(MODES)
    assert all(data is not None for _, data in references)

    shared = tmp_path / "shared"
    shared.mkdir()
    out = shared / "out.onnx"
    ctx = mp.get_context("spawn")
    start, done = ctx.Barrier(len(MODES) + 1), ctx.Barrier(len(MODES) + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(mode, str(src), str(out), start, done, results), daemon=True)
        for mode in MODES
    ]
    for worker in workers:
        worker.start()
    winners = []
    try:
        for round_ in range(ROUNDS):
            if round_ % 2 == 1:  # no --force: a fresh folder, and one winner
                for path in shared.iterdir():
                    path.unlink()
            start.wait(timeout=120)
            outcomes = dict(results.get(timeout=120)[1:] for _ in MODES)
            pair = _pair(shared)
            assert pair in references, f"round {round_}: a mixed pair ({outcomes})"
            winner = references[pair]
            winners.append(winner)
            if round_ % 2 == 1:
                assert [m for m, o in outcomes.items() if o == "ok"] == [winner], outcomes
                assert all(o == "ok" or o.startswith(("exit 1:", "exit 2:")) for o in outcomes.values())
            else:
                assert all(o == "ok" for o in outcomes.values()), outcomes
            assert sorted(p.name for p in shared.iterdir()) == ["out.onnx", "out.onnx.data"]
            onnx.load(str(out))  # and it loads, with its data
            done.wait(timeout=120)
    finally:
        start.abort()  # a failed round: let the workers stop at once
        done.abort()
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert all(w.exitcode == 0 for w in workers)
    assert len(set(winners)) >= 2  # different runs won: the races were real
