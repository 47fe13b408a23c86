"""``modelshrink auto``: the search's bookkeeping, honest scoring, reproducible recipes, the plot."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelshrink import RunOptions
from modelshrink.auto import AutoConfig
from modelshrink.auto import search as auto_search
from modelshrink.auto.candidates import Weights, recipes
from modelshrink.auto.plot import frontier
from modelshrink.cli import app
from modelshrink.errors import ConfigError
from modelshrink.options import parse_rows

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "sample_models" / "digits_mlp.onnx"
MLP_DATA = ROOT / "sample_models" / "digits_mlp.npz"


def _run(runner: CliRunner, *args: str) -> tuple[int, dict | None, str]:
    result = runner.invoke(app, ["auto", *args, "--json", "-q"])
    doc = json.loads(result.stdout) if result.stdout.strip() else None
    return result.exit_code, doc, result.stderr


def test_the_split_never_leaks_held_out_samples() -> None:
    cfg = AutoConfig(holdout=5)
    keep_calibration, keep_heldout = parse_rows(cfg.calibration_rows), parse_rows(cfg.heldout_rows)
    for total in (5, 37, 360):
        calibration = {i for i in range(total) if keep_calibration(i, total)}
        heldout = {i for i in range(total) if keep_heldout(i, total)}
        assert not calibration & heldout and calibration | heldout == set(range(total))
    plan = auto_search._Plan("m.onnx", "d.npz", RunOptions(), RunOptions(), auto_search.Gates())
    for recipe in recipes(Weights(1000, 800, 800, 800), original="m.onnx", epochs=1):
        for step in recipe.steps:
            argv = auto_search._step_argv(step, "in.onnx", "out.onnx", plan, cfg)
            assert cfg.heldout_rows not in argv  # no technique sees the held-out samples
            assert argv[argv.index("--rows") + 1] == cfg.calibration_rows
    score = auto_search._score_argv("cand.onnx", plan, cfg)
    assert score[score.index("--rows") + 1] == cfg.heldout_rows


def test_dominated_recipes_are_skipped() -> None:
    weights = Weights(size=1000, quantizable=800, prunable=800, factorizable=800)
    by_name = {r.name: r for r in recipes(weights, original="m.onnx", epochs=1)}
    best = auto_search.Tried("4bit", "passed", size_bytes=300, size_ratio=0.3, speedup=1.0)
    assert auto_search._dominated(by_name["bf16"], best, weights, "size")  # >= 0.6 of the size
    assert auto_search._dominated(by_name["2bit"], best, weights, "size") is None
    fast = auto_search.Tried("dynamic", "passed", size_bytes=300, size_ratio=0.3, speedup=1.5)
    assert auto_search._dominated(by_name["int8"], fast, weights, "latency")  # weight-only: not faster
    assert auto_search._dominated(by_name["static"], fast, weights, "latency") is None


def test_frontier_keeps_what_nothing_beats() -> None:
    points = [(0.25, 0.99), (0.15, 0.98), (0.5, 1.0), (0.3, 0.97), (0.15, 0.9)]
    assert frontier(points) == [(0.15, 0.98), (0.25, 0.99), (0.5, 1.0)]


def test_config_errors(runner: CliRunner, tmp_path: Path) -> None:
    for flags, fragment in [
        (["--time-budget", "soon"], "--time-budget 'soon'"),
        (["--holdout", "1"], "--holdout must be >= 2"),
        (["--only", "nope"], "--only nope: no such candidate"),
        (["--rows", "1:5", "--data", str(MLP_DATA)], "drop --rows"),
        (["--plot", "p.svg"], "name it *.png"),
    ]:
        code, _, err = _run(runner, str(MLP), "-o", str(tmp_path / "o.onnx"), *flags)
        assert code == 2, err
        assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(ConfigError, match="pass it by path"):
        auto_search.auto("-", str(tmp_path / "o.onnx"))


def test_auto_writes_the_best_that_passes_and_its_recipe_reproduces_it(
    runner: CliRunner, tmp_path: Path
) -> None:
    out, plot = tmp_path / "small.onnx", tmp_path / "pareto.png"
    code, doc, err = _run(
        runner,
        str(MLP),
        "-o",
        str(out),
        "--data",
        str(MLP_DATA),
        "--only",
        "int8,bf16,3bit",
        "--min-agreement",
        "0.99",
        "--plot",
        str(plot),
        "--latency-runs",
        "20",
    )
    assert code == 0, err
    assert doc is not None and doc["command"] == "auto" and doc["output"]["written"]
    auto = doc["details"]["auto"]
    rows = {r["name"]: r for r in auto["candidates"]}
    assert set(rows) == {"int8", "bf16", "3bit"}
    passed = [r for r in rows.values() if r["status"] == "passed"]
    assert auto["chosen"] == min(passed, key=lambda r: r["size_bytes"])["name"]
    assert doc["result"]["size_bytes"] == rows[auto["chosen"]]["size_bytes"] == out.stat().st_size
    assert doc["fidelity"]["real_data"] and "--rows %5=4" in doc["fidelity"]["source"]
    assert all(g["passed"] for g in doc["gates"])
    # the printed commands are exactly what ran: run them again, get the same bytes
    again = tmp_path / "again.onnx"
    for command in rows[auto["chosen"]]["commands"]:
        argv = shlex.split(command)[1:]
        argv = [str(MLP) if a == "MODEL" else str(again) if a == "OUT" else a for a in argv]
        result = runner.invoke(app, [*argv, "-q", "--force"])
        assert result.exit_code == 0, result.stderr
    assert again.read_bytes() == out.read_bytes()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_nothing_passes_exit_3_nothing_written(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    # bf16 is scored and fails the gate: the report says so; 2bit's own gated search fails first
    code, doc, err = _run(
        runner, str(MLP), "-o", str(out), "--only", "bf16,2bit", "--max-error", "1e-9", "--no-latency"
    )
    assert code == 3, err
    assert doc is not None and not doc["output"]["written"] and doc["details"]["auto"]["chosen"] is None
    statuses = {r["name"]: r["status"] for r in doc["details"]["auto"]["candidates"]}
    assert statuses == {"bf16": "failed gates", "2bit": "failed gates"}
    assert not out.exists()
    code, doc, err = _run(
        runner, str(MLP), "-o", str(out), "--only", "2bit", "--max-error", "1e-9", "--no-latency"
    )
    assert code == 3 and doc is None
    assert err.startswith("error: auto: no candidate passes the gates") and not out.exists()


def test_an_interrupt_writes_nothing_unless_keep_best(tmp_path: Path) -> None:
    calls = {"n": 0}

    def interrupt_after_first(description: str, done: int, total: int) -> None:
        calls["n"] += 1
        if done >= 1:
            raise KeyboardInterrupt

    options = RunOptions(latency=False)
    config = AutoConfig(only=("int8", "bf16"))
    with pytest.raises(KeyboardInterrupt):
        auto_search.auto(str(MLP), str(tmp_path / "a.onnx"), config, options, progress=interrupt_after_first)
    assert not (tmp_path / "a.onnx").exists()
    keep = AutoConfig(only=("int8", "bf16"), keep_best=True)
    with pytest.raises(KeyboardInterrupt):
        auto_search.auto(str(MLP), str(tmp_path / "b.onnx"), keep, options, progress=interrupt_after_first)
    assert (tmp_path / "b.onnx").exists()  # int8 had passed before the interrupt


def test_every_printed_command_builds_the_config_and_options_auto_runs() -> None:
    """auto runs steps in this process; what it runs must be exactly what its commands say."""
    import typer

    from modelshrink import cli
    from modelshrink.gates import Gates
    from modelshrink.techniques import TECHNIQUES

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    cfg = AutoConfig()
    for data in (None, str(MLP_DATA)):
        base = RunOptions(data=data, input_shapes={"x": (1, 64)}, seed=3)
        calibrate = RunOptions(
            data=data, rows=cfg.calibration_rows if data else None, input_shapes={"x": (1, 64)}, seed=3
        )
        plan = auto_search._Plan(str(MLP), data, calibrate, base, Gates(min_agreement=0.99))
        for recipe in recipes(Weights(1000, 800, 800, 800), original=str(MLP), epochs=2):
            for step in recipe.steps:
                argv = auto_search._step_argv(step, "in.onnx", "out.onnx", plan, cfg)
                ctx = commands[step.command].make_context(step.command, argv[1:])
                assert cli.build(TECHNIQUES[step.command].config, ctx.params) == step.config, (
                    recipe.name,
                    argv,
                )
                assert cli.build(RunOptions, ctx.params) == auto_search._step_options(step, plan), (
                    recipe.name,
                    argv,
                )
