"""The CLI contract: exit codes, one-line errors, stdout discipline, JSON, nothing written on failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from typer.testing import CliRunner

from modelshrink import cli
from modelshrink.cli import app
from modelshrink.runtime import RuntimeOptions, Session

import models
from helpers import SCALE

# A toy compression command built from the same shared pieces every real command uses, so the
# output-side contract (-o, --force, -o -, gates, --report) is tested independently of any
# technique.
toy = typer.Typer(cls=cli._Group, pretty_exceptions_enable=False)


@toy.callback()
def _toy_root() -> None:
    """Toy."""


cli.add_technique(toy, SCALE)
# The toy's runs are quick ones: few feeds, no latency.
TOY_FLAGS = ["--no-latency", "--samples", "4"]


def _toy(runner: CliRunner, args: list[str]):
    return runner.invoke(toy, [*args, *TOY_FLAGS])


def _one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "expected an error message on stderr"
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


# --- the error table -----------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model path, expected message fragment)."""
    good = models.save(models.mlp(), tmp / "good.onnx")
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing path"] = (tmp / "missing.onnx", "no such file")
    folder = tmp / "folder.onnx"
    folder.mkdir()
    cases["directory"] = (folder, "directory")
    (tmp / "empty.onnx").write_bytes(b"")
    cases["empty file"] = (tmp / "empty.onnx", "empty")
    (tmp / "random.onnx").write_bytes(np.random.default_rng(1).bytes(5000))
    cases["random bytes"] = (tmp / "random.onnx", "not")
    (tmp / "truncated.onnx").write_bytes(good.read_bytes()[:700])
    cases["truncated model"] = (tmp / "truncated.onnx", "not")
    (tmp / "text.onnx").write_text("name,value\nalpha,1\n")
    cases["text file"] = (tmp / "text.onnx", "not")
    broken = models.mlp()
    broken.graph.node[0].input[1] = "nowhere"
    cases["fails the checker"] = (models.save(broken, tmp / "broken.onnx"), "checker")
    future = models.mlp()
    future.opset_import[0].version = 99
    cases["opset too new for onnxruntime"] = (models.save(future, tmp / "future.onnx"), "opset 99")
    ext_dir = tmp / "ext_missing"
    ext_dir.mkdir()
    models.save_external(models.mlp(), ext_dir / "m.onnx")
    (ext_dir / "m.onnx.data").unlink()
    cases["missing external data"] = (ext_dir / "m.onnx", "not found")
    esc_dir = tmp / "ext_escape"
    esc_dir.mkdir()
    models.save_external(models.mlp(), esc_dir / "m.onnx")
    proto = onnx.load(str(esc_dir / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    onnx.save(proto, str(esc_dir / "m.onnx"))
    (tmp / "secret.data").write_bytes(b"\0" * 100_000)
    cases["external data escaping the folder"] = (esc_dir / "m.onnx", "outside")
    return cases


BAD = [
    "missing path",
    "directory",
    "empty file",
    "random bytes",
    "truncated model",
    "text file",
    "fails the checker",
    "opset too new for onnxruntime",
    "missing external data",
    "external data escaping the folder",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_model_compare(runner: CliRunner, tmp_path: Path, case: str) -> None:
    path, fragment = _bad_inputs(tmp_path)[case]
    good = tmp_path / "good.onnx"
    result = runner.invoke(app, ["compare", str(path), str(good), "--no-latency"])
    assert result.exit_code == 1, result.stderr
    assert fragment in _one_line_error(result)
    assert result.stdout == ""


@pytest.mark.parametrize("case", BAD)
def test_bad_model_writes_nothing(runner: CliRunner, tmp_path: Path, case: str, snapshot) -> None:
    path, fragment = _bad_inputs(tmp_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = _toy(runner, ["scale", str(path), "-o", str(out_dir / "o.onnx")])
    assert result.exit_code == 1, result.stderr
    assert fragment in _one_line_error(result)
    assert snapshot(out_dir) == {}


@pytest.mark.parametrize("case", BAD)
def test_bad_model_inspect(runner: CliRunner, tmp_path: Path, case: str) -> None:
    path, fragment = _bad_inputs(tmp_path)[case]
    result = runner.invoke(app, ["inspect", str(path)])
    if case == "opset too new for onnxruntime":
        assert result.exit_code == 0  # inspect reads the file; it does not need to run it
        return
    assert result.exit_code == 1
    assert fragment in _one_line_error(result)


def test_data_not_matching_inputs(runner: CliRunner, tmp_path: Path, mlp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", image=np.zeros((2, 16), np.float32))
    result = runner.invoke(app, ["compare", str(mlp_path), str(mlp_path), "--data", str(tmp_path / "d.npz")])
    assert result.exit_code == 1
    assert "no array for input 'x'" in _one_line_error(result)


def test_output_folder_missing(runner: CliRunner, tmp_path: Path, mlp_path: Path) -> None:
    result = _toy(runner, ["scale", str(mlp_path), "-o", str(tmp_path / "nope" / "o.onnx")])
    assert result.exit_code == 2
    assert "does not exist" in _one_line_error(result)


def test_output_exists_needs_force(runner: CliRunner, tmp_path: Path, mlp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep")
    result = _toy(runner, ["scale", str(mlp_path), "-o", str(out)])
    assert result.exit_code == 2 and "--force" in _one_line_error(result)
    assert out.read_bytes() == b"keep"
    result = _toy(runner, ["scale", str(mlp_path), "-o", str(out), "--force", "-q"])
    assert result.exit_code == 0 and out.read_bytes() != b"keep"


def test_output_onto_input_refused(runner: CliRunner, mlp_path: Path) -> None:
    before = mlp_path.read_bytes()
    result = _toy(runner, ["scale", str(mlp_path), "-o", str(mlp_path), "--force"])
    assert result.exit_code == 2 and "input" in _one_line_error(result)
    assert mlp_path.read_bytes() == before


# --- stdout discipline, JSON, gates --------------------------------------------------------


def test_json_and_model_on_stdout_is_usage_error(runner: CliRunner, mlp_path: Path) -> None:
    result = _toy(runner, ["scale", str(mlp_path), "-o", "-", "--json"])
    assert result.exit_code == 2
    assert "--report" in _one_line_error(result)


def test_model_bytes_on_stdout_report_on_stderr(runner: CliRunner, tmp_path: Path, mlp_path: Path) -> None:
    result = _toy(runner, ["scale", str(mlp_path), "-o", "-", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.stderr
    model = onnx.load_from_string(result.stdout_bytes)
    assert model.graph.node[0].op_type == "MatMul"
    assert "modelshrink scale" in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema_version"] == 1 and report["output"] == {"path": "<stdout>", "written": True}


def test_json_report_shape(runner: CliRunner, tmp_path: Path, mlp_path: Path) -> None:
    result = _toy(runner, ["scale", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--json", "-q"])
    assert result.exit_code == 0
    assert result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1 and doc["command"] == "scale" and doc["passed"] is True
    assert doc["fidelity"]["identical"] is True and doc["fidelity"]["worst"]["snr_db"] is None
    assert doc["fidelity"]["real_data"] is False and doc["fidelity"]["samples"] == 4
    assert doc["latency"] is None and doc["latency_skipped"] == "--no-latency"
    assert doc["original"]["params"] == doc["result"]["params"] > 0
    assert doc["settings"]["config"] == {"factor": 1.0, "min_elements": 1}
    assert {"node", "op_type", "what", "params_before", "params_after", "details"} <= set(doc["changes"][0])


def test_gate_failure_exit_3(runner: CliRunner, tmp_path: Path, mlp_path: Path, snapshot) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = _toy(
        runner,
        [
            "scale",
            str(mlp_path),
            "-o",
            str(out_dir / "o.onnx"),
            "--factor",
            "2",
            "--max-error",
            "1e-4",
            "--json",
        ],
    )
    assert result.exit_code == 3
    doc = json.loads(result.stdout)
    assert doc["passed"] is False and doc["output"]["written"] is False
    gate = doc["gates"][0]
    assert gate["name"] == "max_error" and gate["passed"] is False and gate["margin"] < 0
    assert "gate failed: --max-error" in _one_line_error(result)
    assert snapshot(out_dir) == {}


def test_compare_json_and_report_file(runner: CliRunner, tmp_path: Path, mlp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "compare",
            str(mlp_path),
            str(mlp_path),
            "--json",
            "--latency-runs",
            "5",
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc == json.loads((tmp_path / "r.json").read_text())
    assert doc["fidelity"]["identical"] is True
    assert doc["latency"]["original"]["runs"] == 5 and doc["latency"]["result"]["runs"] == 5
    assert doc["ratios"]["size"] == 1.0


def test_compare_stdin(runner: CliRunner, mlp_path: Path) -> None:
    result = runner.invoke(
        app, ["compare", "-", str(mlp_path), "--json", "--no-latency"], input=mlp_path.read_bytes()
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["original"]["source"] == "<stdin>" and doc["fidelity"]["identical"]


def test_compare_both_stdin_is_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(app, ["compare", "-", "-"])
    assert result.exit_code == 2 and "only one" in _one_line_error(result)


@pytest.mark.parametrize(
    "args",
    [
        ["compare", "a.onnx"],
        ["compare", "a.onnx", "b.onnx", "--max-error", "lots"],
        ["compare", "a.onnx", "b.onnx", "--bogus"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2_one_line(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    _one_line_error(result)


def test_bad_flag_values_exit_2(runner: CliRunner, mlp_path: Path) -> None:
    for extra in (
        ["--min-cosine", "2"],
        ["--input-shape", "x"],
        ["--provider", "quantum"],
        ["--threads", "-1"],
    ):
        result = runner.invoke(app, ["compare", str(mlp_path), str(mlp_path), *extra])
        assert result.exit_code == 2, (extra, result.stderr)
        _one_line_error(result)


def test_debug_env_shows_traceback(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.onnx")], env={"MODELSHRINK_DEBUG": "1"})
    assert result.exit_code == 1 and result.exception is not None


def test_version_and_help(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("modelshrink ")
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "Exit codes" in result.stdout


# --- inspect --------------------------------------------------------------------------------


def test_inspect_json(runner: CliRunner, tmp_path: Path) -> None:
    path = models.save(models.constant_and_subgraph(), tmp_path / "m.onnx")
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1 and doc["command"] == "inspect"
    assert doc["ops"] == {"Constant": 1, "If": 1, "MatMul": 3}
    assert doc["weight_locations"]["constant_nodes"] == {"count": 1, "bytes": 256}
    assert doc["weight_locations"]["subgraphs"] == {"count": 1, "bytes": 256}
    assert doc["inputs"][0] == {"name": "x", "type": "float32", "shape": "[batch,8]"}
    assert {w["name"] for w in doc["largest_weights"]} == {"w_const", "w_then"}
    assert any("then_mm (MatMul)" in c for w in doc["largest_weights"] for c in w["consumers"])


def test_inspect_external_data(runner: CliRunner, tmp_path: Path) -> None:
    path = models.save_external(models.conv_net(), tmp_path / "m.onnx")
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    doc = json.loads(result.stdout)
    assert doc["external_files"] == ["m.onnx.data"]
    assert doc["external_data_bytes"] == os.path.getsize(tmp_path / "m.onnx.data")
    assert doc["weight_locations"]["external_data"]["count"] == 8
    assert (
        doc["technique_bytes"]["prune"] == (8 * 3 * 3 * 3 + 10 * 128) * 4 - 8 * 27 * 4
    )  # conv_w < 1024 elements


SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.mark.parametrize(
    "args",
    [
        ["quantize"],
        ["quantize", "--mode", "fp16"],
        ["prune", "--structured", "--sparsity", "0.25"],
        ["factorize", "--rank-ratio", "0.5"],
    ],
)
def test_quiet_means_silent(runner: CliRunner, tmp_path: Path, args: list[str]) -> None:
    """-q: nothing on stderr, not even warnings logged by the libraries we call."""
    model = SAMPLES / "digits_cnn.onnx"
    result = runner.invoke(app, [*args, str(model), "-o", str(tmp_path / "o.onnx"), "-q", "--no-latency"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""


def test_output_keeps_the_inputs_external_data_layout(runner: CliRunner, tmp_path: Path) -> None:
    """An input with external data gives an output with external data by default (a one-file
    copy of a big model is parsed whole by every reader, and writing it held 4x the model);
    --no-external-data, `-o -` and sparse storage (inline only) keep one file."""
    src = models.save_external(models.mlp(sizes=(64, 256, 10)), tmp_path / "ext.onnx")
    base = ["prune", str(src), "--sparsity", "0.9", "--min-elements", "0", "--no-latency", "-q"]

    def files(name: str) -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name))

    assert runner.invoke(app, [*base, "-o", str(tmp_path / "a.onnx")]).exit_code == 0
    assert files("a.") == ["a.onnx", "a.onnx.data"]
    a = onnx.load(str(tmp_path / "a.onnx"), load_external_data=False)
    weights = [t for t in a.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert runner.invoke(app, [*base, "-o", str(tmp_path / "b.onnx"), "--no-external-data"]).exit_code == 0
    assert files("b.") == ["b.onnx"]
    assert runner.invoke(app, [*base, "-o", str(tmp_path / "c.onnx"), "--sparse-storage"]).exit_code == 0
    assert files("c.") == ["c.onnx"]
    c = onnx.load(str(tmp_path / "c.onnx"))
    assert any(a.name == "sparse_value" for n in c.graph.node for a in n.attribute)
    piped = runner.invoke(app, [*base, "-o", "-"])
    assert piped.exit_code == 0
    assert onnx.load_from_string(piped.stdout_bytes).graph.initializer  # inline, in the bytes
    # every one computes what the one-file copy computes
    feed = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    ref = Session(tmp_path / "b.onnx", RuntimeOptions(), label="b").run(feed)[0]
    for name in ("a.onnx", "c.onnx"):
        np.testing.assert_array_equal(
            Session(tmp_path / name, RuntimeOptions(), label=name).run(feed)[0], ref
        )
