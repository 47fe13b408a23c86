"""Model I/O: validated loading, external data, guarded and atomic output."""

from __future__ import annotations

import io as pyio
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from modelshrink import io
from modelshrink.errors import ConfigError, InvalidModelError, OutputError
from modelshrink.runtime import RuntimeOptions, Session

import models


def test_load_path_keeps_metadata_and_sizes(mlp_path: Path) -> None:
    loaded = io.load_model(str(mlp_path))
    assert loaded.path == mlp_path
    assert loaded.file_bytes == mlp_path.stat().st_size
    assert loaded.model.metadata_props["classes"].startswith("0,1")
    assert loaded.model.doc_string == "tiny test MLP"
    assert loaded.external_files == ()


def test_load_stdin_bytes(mlp_path: Path) -> None:
    raw = mlp_path.read_bytes()
    loaded = io.load_model("-", stdin=pyio.BytesIO(raw))
    assert loaded.path is None and loaded.raw == raw and loaded.label == "<stdin>"
    assert [n.op_type for n in loaded.model.graph][:2] == ["MatMul", "Add"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "empty"),
        (os.urandom(4096), "not"),
        (b"hello, this is a text file\nwith lines\n", "not"),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidModelError, match=message) as info:
        io.load_model(str(path))
    assert "\n" not in str(info.value)


def test_load_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="directory"):
        io.load_model(str(tmp_path))


def test_load_rejects_truncated(mlp_path: Path) -> None:
    raw = mlp_path.read_bytes()
    mlp_path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InvalidModelError):
        io.load_model(str(mlp_path))


def test_load_rejects_checker_failure(tmp_path: Path) -> None:
    model = models.mlp()
    model.graph.node[0].input[1] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InvalidModelError, match="checker") as info:
        io.load_model(str(path))
    assert "\n" not in str(info.value)


def test_external_data_loads_lazily_and_runs(tmp_path: Path) -> None:
    path = models.save_external(models.mlp(), tmp_path / "ext.onnx")
    loaded = io.load_model(str(path))
    assert loaded.external_files == ((tmp_path / "ext.onnx.data").resolve(),)
    assert loaded.external_bytes > 0
    w = loaded.model.graph.initializers["W0"].const_value
    assert isinstance(w, ir.ExternalTensor)
    np.testing.assert_array_equal(w.numpy(), onnx.numpy_helper.to_array(models.mlp().graph.initializer[0]))


def test_external_data_missing_file(tmp_path: Path) -> None:
    path = models.save_external(models.mlp(), tmp_path / "ext.onnx")
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(InvalidModelError, match="not found"):
        io.load_model(str(path))


def test_external_data_short_file(tmp_path: Path) -> None:
    path = models.save_external(models.mlp(), tmp_path / "ext.onnx")
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InvalidModelError, match="truncated"):
        io.load_model(str(path))


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../x.data"])
def test_external_data_escaping_folder_is_refused(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    path = models.save_external(models.mlp(), folder / "ext.onnx")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    (tmp_path / "outside.data").write_bytes(b"\0" * 100_000)
    with pytest.raises(InvalidModelError, match=r"outside|absolute"):
        io.load_model(str(path))


def test_external_data_symlink_out_of_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    path = models.save_external(models.mlp(), folder / "ext.onnx")
    real = tmp_path / "real.data"
    (folder / "ext.onnx.data").rename(real)
    (folder / "ext.onnx.data").symlink_to(real)
    with pytest.raises(InvalidModelError, match="outside"):
        io.load_model(str(path))


def test_stdin_with_external_data_is_refused(tmp_path: Path) -> None:
    path = models.save_external(models.mlp(), tmp_path / "ext.onnx")
    with pytest.raises(InvalidModelError, match="by path"):
        io.load_model("-", stdin=pyio.BytesIO(path.read_bytes()))


# --- output ---------------------------------------------------------------------------------


def test_output_checks(tmp_path: Path, mlp_path: Path) -> None:
    loaded = io.load_model(str(mlp_path))
    with pytest.raises(OutputError, match="input"):
        io.check_output_target(str(mlp_path), force=True, inputs=(loaded,))
    with pytest.raises(OutputError, match="does not exist"):
        io.check_output_target(str(tmp_path / "nope" / "out.onnx"))
    with pytest.raises(OutputError, match="directory"):
        io.check_output_target(str(tmp_path))
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--force"):
        io.check_output_target(str(existing))
    assert io.check_output_target(str(existing), force=True).dest == existing
    with pytest.raises(OutputError, match="terminal"):
        io.check_output_target("-", stdout_isatty=True)
    assert io.check_output_target("-", stdout_isatty=False).dest is None
    with pytest.raises(ConfigError):
        io.check_output_target("-", external_data=True, stdout_isatty=False)


def test_output_refuses_to_clobber_input_external_data(tmp_path: Path) -> None:
    # input a.onnx keeps its tensors in b.onnx.data; writing b.onnx would write b.onnx.data
    path = models.save_external(models.mlp(), tmp_path / "a.onnx", location="b.onnx.data")
    loaded = io.load_model(str(path))
    with pytest.raises(OutputError, match="input"):
        io.check_output_target(str(tmp_path / "b.onnx"), inputs=(loaded,))


def test_stage_commit_and_discard(tmp_path: Path, mlp_path: Path, snapshot) -> None:
    loaded = io.load_model(str(mlp_path))
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    target = io.check_output_target(str(out), inputs=(loaded,))
    staged = io.stage_model(loaded.model, target)
    assert staged.path.exists() and not out.exists()
    staged.discard()
    assert snapshot(out.parent) == {}
    staged = io.stage_model(loaded.model, target)
    staged.commit()
    assert snapshot(out.parent).keys() == {"model.onnx"}
    again = io.load_model(str(out))
    assert again.model.metadata_props == loaded.model.metadata_props
    assert again.model.doc_string == loaded.model.doc_string


@pytest.mark.parametrize("streamed", [False, True])
def test_staged_files_add_no_value_info_for_initializers(
    tmp_path: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    """onnx_ir repeats every initializer's type and shape in value_info (2 % of a small model
    with long names): a result is no larger than its graph needs, in both writers."""
    if streamed:
        monkeypatch.setattr("modelshrink.io.writing.SERIALIZE_WHOLE_BYTES", 0)
    loaded = io.load_model(str(mlp_path))
    assert not onnx.load(str(mlp_path)).graph.value_info
    out = tmp_path / "out.onnx"
    io.stage_model(loaded.model, io.check_output_target(str(out))).commit()
    proto = onnx.load(str(out))
    assert not proto.graph.value_info and proto.graph.initializer
    onnx.checker.check_model(proto, full_check=True)
    assert len(out.read_bytes()) <= mlp_path.stat().st_size + 64


def test_stage_is_deterministic(tmp_path: Path, mlp_path: Path) -> None:
    loaded = io.load_model(str(mlp_path))
    blobs = []
    for name in ("a.onnx", "b.onnx"):
        io.stage_model(loaded.model, io.check_output_target(str(tmp_path / name))).commit()
        blobs.append((tmp_path / name).read_bytes())
    assert blobs[0] == blobs[1]


def test_commit_to_stdout_streams_bytes(tmp_path: Path, mlp_path: Path) -> None:
    loaded = io.load_model(str(mlp_path))
    target = io.check_output_target("-", stdout_isatty=False)
    sink = pyio.BytesIO()
    io.stage_model(loaded.model, target).commit(stdout=sink)
    again = io.load_model("-", stdin=pyio.BytesIO(sink.getvalue()))
    assert len(list(again.model.graph)) == len(list(loaded.model.graph))


def test_no_clobber_when_file_appears_meanwhile(tmp_path: Path, mlp_path: Path) -> None:
    loaded = io.load_model(str(mlp_path))
    out = tmp_path / "late.onnx"
    staged = io.stage_model(loaded.model, io.check_output_target(str(out)))
    out.write_bytes(b"someone else's file")
    with pytest.raises(OutputError, match="appeared"):
        staged.commit()
    assert out.read_bytes() == b"someone else's file"
    assert not any(p.name.startswith(".modelshrink-") for p in tmp_path.iterdir())


def test_external_data_output_round_trip(tmp_path: Path) -> None:
    src = models.save_external(models.conv_net(), tmp_path / "src.onnx")
    loaded = io.load_model(str(src))
    out = tmp_path / "copy.onnx"
    io.stage_model(
        loaded.model, io.check_output_target(str(out), external_data=True, inputs=(loaded,))
    ).commit()
    assert (tmp_path / "copy.onnx.data").exists()
    inline = tmp_path / "inline.onnx"
    io.stage_model(loaded.model, io.check_output_target(str(inline), external_data=False)).commit()
    assert not (tmp_path / "inline.onnx.data").exists()
    feed = {"image": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    ref = Session(src, RuntimeOptions(), label="src").run(feed)[0]
    for path in (out, inline):
        np.testing.assert_array_equal(Session(path, RuntimeOptions(), label="x").run(feed)[0], ref)


STREAMED_MODELS = {
    "mlp": models.mlp,
    "conv_net": models.conv_net,
    "constant_and_subgraph": models.constant_and_subgraph,
    "every_weight_kind": models.every_weight_kind,
    "loop": models.loop_model,
    "token": models.token_model,
}


@pytest.mark.parametrize("name", sorted(STREAMED_MODELS))
@pytest.mark.parametrize("external_input", [False, True])
def test_streamed_one_file_output_reads_back_as_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, external_input: bool
) -> None:
    """Big one-file results are written with their initializers streamed one at a time: the
    file must parse to exactly the model the whole-model serialization writes, and run."""
    proto = STREAMED_MODELS[name]()
    proto.metadata_props.add(key="streamed_test", value="a,b")
    src = tmp_path / "src.onnx"
    if external_input:
        models.save_external(proto, src)
    else:
        models.save(proto, src)
    loaded = io.load_model(str(src))
    whole = tmp_path / "whole.onnx"
    io.stage_model(loaded.model, io.check_output_target(str(whole), external_data=False)).commit()
    monkeypatch.setattr(io.writing, "SERIALIZE_WHOLE_BYTES", 0)
    streamed = tmp_path / "streamed.onnx"
    io.stage_model(loaded.model, io.check_output_target(str(streamed), external_data=False)).commit()
    assert not (tmp_path / "streamed.onnx.data").exists()
    assert streamed.read_bytes() != whole.read_bytes()  # the streamed path really ran
    a, b = onnx.load(str(whole)), onnx.load(str(streamed))
    assert a == b
    onnx.checker.check_model(str(streamed), full_check=True)
    Session(streamed, RuntimeOptions(), label="streamed")  # onnxruntime loads it
    again = tmp_path / "again.onnx"
    io.stage_model(loaded.model, io.check_output_target(str(again), external_data=False)).commit()
    assert again.read_bytes() == streamed.read_bytes()  # same model, same bytes


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 2**31 - 1, 2**35])
def test_varint_matches_protobuf(size: int) -> None:
    from google.protobuf.internal.encoder import _VarintBytes

    assert io.writing._varint(size) == _VarintBytes(size)


def test_sweep_leaves_a_live_runs_folder_whose_lock_is_not_taken_yet(tmp_path: Path) -> None:
    """A run creates its staging folder's lock file, then locks it: a sweep in between finds the
    lock free. The folder is named after its creator's pid, which lives: it stays (the
    concurrency test lost a run's folder this way, on a loaded machine). A folder of a dead pid
    with a free lock is removed."""
    from modelshrink.io import staging

    live = tmp_path / f"{staging.STAGING_PREFIX}{os.getpid()}-abcd"
    live.mkdir()
    (live / ".lock").write_bytes(b"")  # created, not locked yet
    (live / "out.onnx").write_bytes(b"being written")
    dead_pid = 2**22 + 12345  # above the kernel's pid_max default: no such process
    dead = tmp_path / f"{staging.STAGING_PREFIX}{dead_pid}-efgh"
    dead.mkdir()
    (dead / ".lock").write_bytes(b"")
    assert staging.sweep_stale(tmp_path) == [dead]
    assert (live / "out.onnx").read_bytes() == b"being written"
