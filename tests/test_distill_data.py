"""Training data for distill (and --qat): batching that follows the model, data read from disk.

The audio pattern (``tests/patterns.py::streaming_audio``): ``input [batch, samples]``, a
recurrent ``state [2, batch, 32]`` (batch on axis 1) and an int64 scalar ``sr`` that picks an
``If`` branch. Its weights outside the ``If`` (``w_in``, ``w_rec``, ``w_out``: the recurrent
cell and the head) are what trains here; the convolutions inside the branches are frozen and
listed as skipped (training inside ``If`` bodies is separate work).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from modelshrink import api, io
from modelshrink.cli import app
from modelshrink.dataset import open_dataset
from modelshrink.errors import ConfigError, DataError
from modelshrink.feeds import load_feeds
from modelshrink.inputs import InputSpec, batch_axes, batch_symbol, input_specs
from modelshrink.options import RunOptions, parse_batch_axes
from modelshrink.runtime import RuntimeOptions, Session
from modelshrink.techniques.base import TechniqueContext
from modelshrink.techniques.distill import DistillConfig, Teacher, distill
from modelshrink.techniques.distill import technique as distill_technique
from modelshrink.techniques.distill.targets import teacher_targets
from modelshrink.techniques.distill.trainer import plan_batches
from modelshrink.techniques.quantize import QuantizeConfig

import models
from patterns import streaming_audio

ROWS = 48
SAMPLES = 768  # the 8 kHz branch frames audio by 384: 768 fits any batch
TRAINED = {"w_in", "w_rec", "w_out"}


def _audio_pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    teacher = streaming_audio(seed=0)
    student = streaming_audio(seed=0)
    rng = np.random.default_rng(5)
    for t in student.graph.initializer:
        if t.name in TRAINED:
            a = onnx.numpy_helper.to_array(t)
            t.CopyFrom(
                onnx.numpy_helper.from_array(
                    (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32), t.name
                )
            )
    return teacher, student


def _audio_arrays(rows: int = ROWS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "input": rng.standard_normal((rows, SAMPLES)).astype(np.float32),
        "state": (0.5 * rng.standard_normal((2, rows, 32))).astype(np.float32),
        "sr": np.where(np.arange(rows) % 3 == 0, 8000, 16000).astype(np.int64),
    }


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    teacher, student = _audio_pair()
    models.save(teacher, folder / "teacher.onnx")
    models.save(student, folder / "student.onnx")
    arrays = _audio_arrays()
    np.savez_compressed(folder / "data.npz", **arrays)  # compressed: read whole, in memory
    (folder / "npy").mkdir()
    for name, value in arrays.items():
        np.save(folder / "npy" / f"{name}.npy", value)  # memory-mapped
    (folder / "rows").mkdir()
    for i in range(ROWS):  # one row per file, without the batch axis
        np.savez(
            folder / "rows" / f"row{i}.npz",
            input=arrays["input"][i],
            state=arrays["state"][:, i],
            sr=arrays["sr"][i],
        )
    return folder


def _distill(folder: Path, data: str, *, progress=None, **kw):  # type: ignore[no-untyped-def]
    teacher = io.load_model(str(folder / "teacher.onnx")).model
    config = DistillConfig(
        teacher="teacher",
        teacher_model=Teacher(teacher, "teacher"),
        training=open_dataset(teacher, str(folder / data)),
        **{"epochs": 12, "lr": 3e-2, "batch_size": 8, **kw},
    )
    context = TechniqueContext(feeds=None, evaluate=lambda m: None, seed=0)  # type: ignore[arg-type,return-value]
    if progress is not None:
        context = TechniqueContext(feeds=None, evaluate=lambda m: None, seed=0, progress=progress)  # type: ignore[arg-type,return-value]
    return distill(io.load_model(str(folder / "student.onnx")).model, config, context)


def _mse_to_teacher(folder: Path, student: bytes) -> float:
    arrays = _audio_arrays()
    teacher = ort.InferenceSession(str(folder / "teacher.onnx"))
    mine = ort.InferenceSession(student)
    errors = []
    for i in range(ROWS):
        feed = {
            "input": arrays["input"][i : i + 1],
            "state": arrays["state"][:, i : i + 1],
            "sr": np.asarray(arrays["sr"][i]),
        }
        for a, b in zip(teacher.run(None, feed), mine.run(None, feed), strict=True):
            errors.append(float(np.mean((a - b) ** 2)))
    return float(np.mean(errors))


# --- finding the batch axis --------------------------------------------------------------------


def test_batch_axes_follow_the_declared_dims() -> None:
    specs = input_specs(ir.serde.deserialize_model(streaming_audio()))
    axes = batch_axes(specs)
    assert [axes[n].axis for n in ("input", "state", "sr")] == [0, 1, None]
    assert "'batch'" in axes["state"].why and axes["sr"].why == "a scalar"
    assert batch_axes(specs, {"state": None})["state"].why == "--batch-axis"
    with pytest.raises(ConfigError, match="--batch-axis nope: the model has no such input"):
        batch_axes(specs, {"nope": 0})
    with pytest.raises(ConfigError, match=r"--batch-axis state:3: the input has 3 axes \[2,batch,32\]"):
        batch_axes(specs, {"state": 3})
    assert parse_batch_axes(["state:1", "sr:none"]) == {"state": 1, "sr": None}
    # paddle2onnx's declaration: -1 for the batch, '?' for height and width (not one symbol)
    paddle = [InputSpec("x", np.dtype(np.float32), (-1, 3, "?", "?"), "tensor(float)")]
    assert batch_symbol(paddle) is None
    assert batch_axes(paddle)["x"].axis == 0
    with pytest.raises(ConfigError, match="expected NAME:AXIS"):
        parse_batch_axes(["state=1"])


@pytest.mark.parametrize(
    "dims", [(1, 1, 64, "image_width"), (1, 1, "samples"), (1, 3, "height", "width")], ids=str
)
def test_a_fixed_batch_of_one_with_dynamic_sizes_stacks_rows_on_axis_0(dims: tuple, tmp_path: Path) -> None:
    """ddddocr's OCR model declares ``input1 [1, 1, 64, image_width]``: the symbol is a width,
    not a batch. Rows stack on axis 0 (it used to cut them along the width: 16 rows of
    [1, 1, 64, 160] read as 160 inputs of [16, 1, 64, 1], refused by the model)."""
    spec = InputSpec("x", np.dtype(np.float32), dims, "tensor(float)")
    assert batch_symbol([spec]) is None
    axis = batch_axes([spec])["x"]
    assert axis.axis == 0 and "no dimension is named or placed like a batch" in axis.why
    sizes = [d if isinstance(d, int) else 5 for d in dims]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "m", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    rows = np.random.default_rng(0).standard_normal((4, *sizes[1:])).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=rows)
    feeds = load_feeds(ir.serde.deserialize_model(model), data=str(tmp_path / "d.npz"))
    assert len(feeds) == 4 and feeds.batch_axes == {"x": 0}
    np.testing.assert_array_equal(feeds.samples[2]["x"], rows[2:3])


def test_feeds_cut_rows_along_the_batch_axis_and_a_scalar_given_once_fills_every_feed(tmp_path: Path) -> None:
    arrays = {**_audio_arrays(6), "sr": np.array(16000)}
    np.savez(tmp_path / "d.npz", **arrays)
    feeds = load_feeds(ir.serde.deserialize_model(streaming_audio()), data=str(tmp_path / "d.npz"))
    assert len(feeds) == 6 and feeds.batch_axes == {"input": 0, "state": 1, "sr": None}
    np.testing.assert_array_equal(feeds.samples[4]["state"], arrays["state"][:, 4:5])
    assert all(int(f["sr"]) == 16000 for f in feeds.samples)


# --- the audio pattern trains --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(audio: Path):  # type: ignore[no-untyped-def]
    seen: list[str] = []
    result = _distill(audio, "data.npz", progress=lambda d, done, total: seen.append(d))
    return result, seen


def test_audio_pattern_distills_with_state_on_axis_1_and_sr_scalar(audio: Path, trained) -> None:  # type: ignore[no-untyped-def]
    result, _ = trained
    data = result.details["data"]
    axes = {e["input"]: e["batch_axis"] for e in data["batching"]}
    assert axes == {"input": 0, "state": 1, "sr": None}
    assert data["groups"] == 2 and next(e for e in data["batching"] if e["input"] == "sr")["values"] == 2
    changed = {c.details["weight"] for c in result.changed}
    # both sr values occur, so the convs of both If branches train too (each on its own rows)
    assert changed == TRAINED | {"k8_conv_w", "k8_conv_b", "k16_conv_w", "k16_conv_b"}
    assert any("'sr' fed as it is (a scalar), 2 value(s)" in n for n in result.notes)
    fid = result.details["teacher_fidelity"]
    assert fid["after"]["loss"] < 0.6 * fid["before"]["loss"]  # on the 5 validation rows
    student = (audio / "student.onnx").read_bytes()
    assert _mse_to_teacher(audio, io.model_bytes(result.model)) < 0.25 * _mse_to_teacher(audio, student)


def test_rows_with_different_scalars_go_to_different_batches(audio: Path) -> None:
    teacher = io.load_model(str(audio / "teacher.onnx")).model
    data = open_dataset(teacher, str(audio / "data.npz"))
    sr = _audio_arrays()["sr"]
    order = np.random.default_rng(0).permutation(data.rows)
    batches = plan_batches(order, data.groups, 8, drop_last=False, rng=np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(ROWS))
    for batch in batches:
        assert len(set(sr[batch].tolist())) == 1
        assert int(data.batch(batch)["sr"]) == sr[batch[0]]
    with pytest.raises(ValueError, match="spans 2 groups"):
        data.batch(np.array([0, 1]))


def test_rows_keep_the_same_rows_of_every_source_for_training_and_for_verification(audio: Path) -> None:
    teacher = io.load_model(str(audio / "teacher.onnx")).model
    arrays = _audio_arrays()
    for source in ("data.npz", "rows"):
        data = open_dataset(teacher, str(audio / source), rows="%4=1")
        kept = np.arange(1, ROWS, 4)
        assert data.rows == len(kept) and "--rows %4=1" in data.source
        pairs = set(zip(data.groups.tolist(), arrays["sr"][kept].tolist(), strict=True))
        assert len(pairs) == len({g for g, _ in pairs}) == 2  # one sr value per group
        for i, row in enumerate(kept):
            feed = data.batch(np.array([i]))
            assert np.array_equal(feed["input"][0], arrays["input"][row])
            assert int(feed["sr"]) == arrays["sr"][row]
        feeds = load_feeds(teacher, data=str(audio / source), rows="%4=1")
        assert [float(f["input"][0, 0]) for f in feeds.samples] == arrays["input"][kept, 0].tolist()
    with pytest.raises(DataError, match="selects none"):
        open_dataset(teacher, str(audio / "data.npz"), rows="1000:")
    with pytest.raises(ConfigError, match="non-negative"):
        load_feeds(teacher, data=str(audio / "rows"), rows="-4:")


def test_progress_reports_rows_per_second(trained) -> None:  # type: ignore[no-untyped-def]
    _, seen = trained
    assert any(d.startswith("distilling · epoch 12/12") and "rows/s" in d for d in seen)
    assert any(d.startswith("distilling · running the teacher") for d in seen)


# --- sources: same rows, same bytes ---------------------------------------------------------------


def test_memory_mapped_npy_and_a_folder_of_rows_train_to_the_same_bytes(audio: Path, trained) -> None:  # type: ignore[no-untyped-def]
    expected = io.model_bytes(trained[0].model)
    for source in ("npy", "rows"):
        result = _distill(audio, source)
        assert io.model_bytes(result.model) == expected, source
        assert result.details["data"]["rows"] == ROWS


def test_teacher_per_batch_gives_the_targets_of_the_teacher_cache(
    audio: Path, trained, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    teacher = io.load_model(str(audio / "teacher.onnx")).model
    data = open_dataset(teacher, str(audio / "npy"))
    session = Session(io.model_bytes(teacher), RuntimeOptions(), label="teacher")
    kw = {"rows": ROWS, "chunk": 64, "declared": {}, "progress": lambda done, total: None}
    batch = plan_batches(np.arange(ROWS)[::-1], data.groups, 8, drop_last=False)[0]
    with teacher_targets(session, ["output", "stateN"], data, folder=io.temporary_folder, **kw) as cached:
        a = cached.get(batch, data.batch(batch))
    with teacher_targets(session, ["output", "stateN"], data, folder=None, **kw) as per_batch:
        b = per_batch.get(batch, data.batch(batch))
    assert cached.cached and not per_batch.cached and cached.axes == {"output": 0, "stateN": 1}
    for name in ("output", "stateN"):
        assert a[name].shape == b[name].shape
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(distill_technique, "_CACHE_TEACHER", False)
    result = _distill(audio, "npy")
    assert result.details["data"]["teacher_outputs"] == "computed per batch"
    assert trained[0].details["data"]["teacher_outputs"] == "computed once, kept in a temporary file"
    fid = result.details["teacher_fidelity"]
    assert fid["after"]["loss"] < 0.6 * fid["before"]["loss"]


def test_cli_trains_from_a_folder_of_rows_and_reports_the_batching(audio: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "distill",
            str(audio / "student.onnx"),
            "--teacher",
            str(audio / "teacher.onnx"),
            "--data",
            str(audio / "rows"),
            "-o",
            str(tmp_path / "o.onnx"),
            "--epochs",
            "1",
            "--no-latency",
            "--json",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["details"]["data"]["source"].endswith(f"({ROWS} rows in {ROWS} files)")
    assert report["fidelity"]["samples"] == ROWS


# --- one-line errors ------------------------------------------------------------------------------


def test_inputs_with_different_rows_are_one_line_naming_them(audio: Path, tmp_path: Path) -> None:
    arrays = _audio_arrays()
    np.savez(tmp_path / "bad.npz", **{**arrays, "state": arrays["state"][:, :40]})
    teacher = io.load_model(str(audio / "teacher.onnx")).model
    with pytest.raises(DataError, match="different numbers of samples") as info:
        open_dataset(teacher, str(tmp_path / "bad.npz"))
    message = str(info.value)
    assert "\n" not in message and "input: 48 rows on axis 0" in message
    assert "state: 40 rows on axis 1 of [2,batch,32]" in message and "--batch-axis NAME:AXIS" in message


def _two_input_model() -> onnx.ModelProto:
    """x [batch, 4] plus a fixed-size y [4] added to every row."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["out"])],
        "two",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
        [models.init("w", np.ones((4, 3), np.float32))],
    )
    return models._model(graph)


def test_a_batch_axis_that_cannot_be_found_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    path = models.save(_two_input_model(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 4)), y=rng.standard_normal((16, 4)))
    result = CliRunner().invoke(
        app,
        [
            "distill",
            str(path),
            "--teacher",
            str(path),
            "--data",
            str(tmp_path / "d.npz"),
            "-o",
            str(tmp_path / "o.onnx"),
            "--no-latency",
        ],
    )
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "'y' [4] has no batch axis" in lines[0]
    assert "16 different values in 16 rows" in lines[0] and "--batch-axis y:AXIS" in lines[0]
    assert not (tmp_path / "o.onnx").exists()


def test_qat_reads_its_rows_through_the_same_dataset(tmp_path: Path) -> None:
    samples = Path(__file__).resolve().parent.parent / "sample_models"
    with np.load(samples / "digits_mlp.npz") as npz:
        rows = npz["input"][:40]
    (tmp_path / "rows").mkdir()
    for i, row in enumerate(rows):  # one row per file, a one-input model: plain .npy files
        np.save(tmp_path / "rows" / f"{i}.npy", row)
    report = api.quantize(
        str(samples / "digits_mlp.onnx"),
        str(tmp_path / "q.onnx"),
        QuantizeConfig(mode="binary", qat=True, epochs=1),
        RunOptions(data=str(tmp_path / "rows"), latency=False),
    )
    assert report.details["qat"]["data"]["source"].endswith("(40 rows in 40 files)")
    assert report.details["qat"]["steps"] > 0
