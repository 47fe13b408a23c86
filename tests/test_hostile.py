"""Hostile and broken model files: only clean, one-line errors (exit 1/2), never a crash.

Property-based: valid model bytes are mutated (bit flips, truncation, splices, byte runs) and
every result must either load or raise a ModelshrinkError with a one-line message; the same
mutations go through quantize/prune/factorize, which must either write a valid model or fail
cleanly, writing nothing. A sample of mutations also goes through the real CLI in a subprocess
(where a native crash would show). Crafted cases check memory and time stay bounded: a huge
declared input, a huge initializer or sparse tensor declared over a few bytes, an external
tensor claiming a huge length, a ConstantOfShape asking onnxruntime for gigabytes.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from modelshrink import api, feeds, io
from modelshrink.cli import app
from modelshrink.errors import DataError, ModelshrinkError
from modelshrink.feeds import load_feeds
from modelshrink.inspection import inspect_model
from modelshrink.pipeline import RunOptions

import models
import sweep

# More examples per property when hunting for bugs (see conftest.py): HYPOTHESIS_EXAMPLES_SCALE=20.
SCALE = int(os.environ.get("HYPOTHESIS_EXAMPLES_SCALE", "1"))

SEED_MODELS = {
    "mlp": models.mlp().SerializeToString(),
    "cnn": models.conv_net().SerializeToString(),
    "sub": models.constant_and_subgraph().SerializeToString(),
}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEED_MODELS[draw(st.sampled_from(sorted(SEED_MODELS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "run", "varint"]))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "splice":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "run":
            data[pos : pos + 8] = bytes([draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))]) * 8
        else:  # an inflated length/varint field
            data[pos : pos + 1] = b"\xff\xff\xff\xff\x0f"
        if not data:
            data = bytearray(b"\x08")
    return bytes(data)


def _exercise(path: Path) -> None:
    loaded = io.load_model(str(path))
    inspect_model(loaded)
    load_feeds(loaded.model, data=None, samples=1)


@settings(
    max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=mutated())
def test_mutated_models_fail_cleanly(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    try:
        _exercise(path)
    except ModelshrinkError as exc:
        assert "\n" not in exc.message and exc.exit_code in (1, 2)


def _hostile_cases() -> dict[str, onnx.ModelProto]:
    base = models.mlp()
    cases: dict[str, onnx.ModelProto] = {}

    def case(name: str) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(base)
        cases[name] = m
        return m

    case("huge declared dims").graph.initializer[0].dims[:] = [10**6, 10**6]
    case("negative dims").graph.initializer[0].dims[:] = [-5, 32]
    case("bogus dtype").graph.initializer[0].data_type = 999
    case("bogus input type").graph.input[0].type.tensor_type.elem_type = 999
    case("cycle").graph.node[0].input[0] = "logits"
    case("duplicate names").graph.node[1].output[0] = "mm0"
    case("dangling input").graph.node[0].input[1] = "ghost"
    del case("no outputs").graph.output[:]
    case("huge input dims").graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**12
    case("no opset").opset_import.pop()
    return cases


HOSTILE = _hostile_cases()


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_hostile_models_through_cli(runner: CliRunner, tmp_path: Path, name: str, command: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(HOSTILE[name].SerializeToString())
    args = [str(path)] if command == "inspect" else [str(path), str(path), "--no-latency"]
    result = runner.invoke(app, [command, *args, "-q"])
    if result.exit_code == 0:
        assert command == "inspect"  # only inspect may accept e.g. a huge declared input
        return
    assert result.exit_code in (1, 2), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


@pytest.mark.slow
def test_mutations_through_cli_subprocess(tmp_path: Path) -> None:
    """A seeded sample of mutations through the real CLI: a native crash would show here."""
    rng = np.random.default_rng(7)
    base = SEED_MODELS["cnn"]
    for i in range(10):
        data = bytearray(base)
        for _ in range(3):
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(bytes(data))
        result = subprocess.run(
            [sys.executable, "-m", "modelshrink", "compare", str(path), str(path), "--no-latency", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode in (0, 1, 2), (i, result.returncode, result.stderr[-500:])
        if result.returncode:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), (i, result.stderr[-500:])


# --- the compression commands -------------------------------------------------------------------

COMPRESSION = [name for name, s in sweep.SETTINGS.items() if not s.needs_data]  # static needs --data


@settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=mutated(), setting=st.sampled_from(COMPRESSION))
def test_mutated_models_through_compression_commands(tmp_path: Path, blob: bytes, setting: str) -> None:
    """Either a valid model is written, or one clean line and nothing written; never a traceback."""
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    for old in out_dir.iterdir():
        old.unlink()
    s = sweep.SETTINGS[setting]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            getattr(api, s.command)(
                str(path), str(out_dir / "r.onnx"), s.config(True), RunOptions(latency=False, samples=2)
            )
        noise = [f"{w.category.__name__}: {w.message}" for w in caught]
        assert not noise, f"warnings that would reach stderr: {noise}"  # e.g. signaling NaNs
    except ModelshrinkError as exc:
        assert "\n" not in exc.message and exc.exit_code in (1, 2), exc.message
        assert "modelshrink bug" not in exc.message, exc.message
        assert list(out_dir.iterdir()) == []
        return
    onnx.checker.check_model(str(out_dir / "r.onnx"))


SEMANTIC_SEEDS = {
    "mlp": models.mlp(),
    "cnn": models.conv_net(),
    "if": models.constant_and_subgraph(),
    "tokens": models.token_model(),
    "kinds": models.every_weight_kind(),
    "loop": models.loop_model(),
    "scan": models.scan_model(),
}


@st.composite
def odd_models(draw: st.DrawFn) -> bytes:
    """Well-formed protobufs of odd models: NaN/inf/huge/zero weights, float16/float64 weights,
    initializers made graph inputs, unnamed or duplicate-named nodes, batch 0/1/3. Byte-level
    mutations rarely get past the parser; these reach the techniques."""
    proto = onnx.ModelProto()
    proto.CopyFrom(SEMANTIC_SEEDS[draw(st.sampled_from(sorted(SEMANTIC_SEEDS)))])
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["special", "zeros", "scale", "dtype", "input", "noname", "dupname", "batch"])
        )
        if kind in ("special", "zeros", "scale", "dtype", "input") and floats:
            tensor = floats[draw(st.integers(0, len(floats) - 1))]
            array = onnx.numpy_helper.to_array(tensor).copy()
            if kind == "special" and array.size:
                flat = array.reshape(-1)
                index = draw(st.integers(0, array.size - 1))
                with np.errstate(over="ignore"):  # 3e38 in a tensor made float16 before: inf
                    flat[index] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, 1e-45, 0.0]))
            elif kind == "zeros":
                array[...] = 0
            elif kind == "scale":
                with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # of inf/NaN drawn before
                    array *= draw(st.sampled_from([1e-30, 1e30, -1.0]))
            elif kind == "dtype":
                with np.errstate(over="ignore"):  # huge values become inf in float16: fine
                    array = array.astype(draw(st.sampled_from([np.float16, np.float64])))
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
            if kind == "input" and tensor.name not in {i.name for i in proto.graph.input}:
                proto.graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                )
        elif kind == "noname":
            for node in proto.graph.node:
                node.name = ""
        elif kind == "dupname" and len(proto.graph.node) > 1:
            proto.graph.node[1].name = proto.graph.node[0].name
        elif kind == "batch" and proto.graph.input[0].type.tensor_type.shape.dim:
            proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = draw(st.sampled_from([0, 1, 3]))
    return proto.SerializeToString()


def _huge(blob: bytes) -> bool:
    """The model has a weight of magnitude 1e30 or more (float32's limit is 3.4e38)."""
    proto = onnx.ModelProto.FromString(blob)
    with np.errstate(over="ignore"):
        return any(
            np.abs(onnx.numpy_helper.to_array(t).astype(np.float64)).max(initial=0) >= 1e30
            for t in proto.graph.initializer
        )


@settings(max_examples=80 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=odd_models(), setting=st.sampled_from(COMPRESSION))
def test_odd_models_through_compression_commands(tmp_path: Path, blob: bytes, setting: str) -> None:
    """A valid model within the setting's rules, or one clean line; and nothing else on stderr
    (numpy warnings, onnx-ir's logged warnings are violations too: see sweep.run_model)."""
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    s = sweep.SETTINGS[setting]
    outcome = sweep.run_model(path, s, s.config(True), data=None, samples=2)
    if outcome.status == "violation" and outcome.detail.startswith("error: "):
        assert "modelshrink bug" not in outcome.detail, outcome.detail  # a clean error on an odd model
        return
    if outcome.status == "violation" and "relative error" in outcome.detail:
        return  # NaN/huge weights make tolerances meaningless; validity was checked before
    if outcome.status == "violation" and outcome.detail.startswith("non-finite outputs") and _huge(blob):
        return  # outputs within rounding of float32's limit: any change may overflow them
    assert outcome.status != "violation", outcome.detail


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["quantize", "prune", "factorize"])
def test_hostile_models_through_compression_commands(
    runner: CliRunner, tmp_path: Path, name: str, command: str
) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(HOSTILE[name].SerializeToString())
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(app, [command, str(path), "-o", str(out / "r.onnx"), "--no-latency", "-q"])
    assert result.exit_code in (1, 2), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert list(out.iterdir()) == []


def _memory_cases(folder: Path) -> dict[str, Path]:
    """Small files that declare gigabytes."""
    cases: dict[str, Path] = {}

    def case(name: str, proto: onnx.ModelProto) -> onnx.ModelProto:
        cases[name] = models.save(proto, folder / f"{name}.onnx")
        return proto

    base = models.mlp()
    huge_input = onnx.ModelProto()
    huge_input.CopyFrom(base)  # [16.7M, 16] float32: 1 GB per feed, 8 GB for the default 8 feeds
    huge_input.graph.input[0].type.tensor_type.shape.dim[0].dim_value = (1 << 28) // 16
    case("huge declared input", huge_input)
    huge_init = onnx.ModelProto()
    huge_init.CopyFrom(base)  # 64 GB declared over 2 KB of data
    huge_init.graph.initializer[0].dims[:] = [16, 10**9]
    case("huge initializer dims, tiny data", huge_init)
    sparse = onnx.ModelProto()
    sparse.CopyFrom(base)  # 10 GB dense from one stored value
    del sparse.graph.initializer[0]
    values = onnx.numpy_helper.from_array(np.array([1.0], np.float32), "W0")
    indices = onnx.numpy_helper.from_array(np.array([0], np.int64), "")
    sparse.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [50000, 50000]))
    case("huge sparse tensor dims", sparse)
    external = models.save_external(base, folder / "external.onnx")  # claims a petabyte of it
    proto = onnx.load(str(external), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = str(10**15)
    external.write_bytes(proto.SerializeToString())
    cases["external tensor claiming a huge length"] = external
    fill = onnx.helper.make_graph(  # onnxruntime would fill 6.4 GB at run time
        [
            onnx.helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["w"],
                value=onnx.numpy_helper.from_array(np.array([0.01], np.float32)),
            ),
            onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            onnx.helper.make_node("ReduceSum", ["h"], ["y"], keepdims=0),
        ],
        "fill",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])],
        [onnx.numpy_helper.from_array(np.array([16, 100_000_000], np.int64), "shape")],
    )
    case(
        "ConstantOfShape of 6.4 GB",
        onnx.helper.make_model(fill, opset_imports=[onnx.helper.make_opsetid("", 13)]),
    )
    return cases


def test_synthetic_feeds_stay_within_a_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer feeds than asked when the declared shapes make them big; one too big is refused."""
    model = io.load_model("-", stdin=__import__("io").BytesIO(models.mlp().SerializeToString())).model
    monkeypatch.setattr(feeds, "_MAX_SYNTHETIC_BYTES", 3 * 16 * 4)  # three [1, 16] float32 feeds
    got = load_feeds(model, data=None, samples=8)
    assert len(got.samples) == 3
    assert any("drawing 3 instead of 8" in w for w in got.warnings)
    monkeypatch.setattr(feeds, "_MAX_FEED_BYTES", 16 * 4 - 1)
    with pytest.raises(DataError, match="too many for a test feed"):
        load_feeds(model, data=None, samples=8)


# Address-space limit for the child: a multi-GB allocation fails instead of swapping the machine.
CHILD_ADDRESS_SPACE = 4 << 30
CHILD_MAX_RSS_MB = 1024


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


@pytest.mark.slow
def test_declared_gigabytes_fail_fast_in_bounded_memory(tmp_path: Path) -> None:
    """Each crafted file through each compression command, in a child limited to 4 GB of address
    space: exit 1/2 with one line, in seconds, with a peak RSS far below what was declared."""
    for name, path in _memory_cases(tmp_path).items():
        for command in ("quantize", "prune", "factorize"):
            out = tmp_path / "out.onnx"
            argv = [
                sys.executable,
                "-m",
                "modelshrink",
                command,
                str(path),
                "-o",
                str(out),
                "--no-latency",
                "-q",
            ]
            start = time.perf_counter()
            with open(tmp_path / "stderr", "wb") as err:
                proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_limited)
                _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
            code = os.waitstatus_to_exitcode(status)
            stderr = (tmp_path / "stderr").read_text()
            lines = stderr.strip().splitlines()
            assert code in (1, 2), (name, command, code, stderr[-500:])
            assert len(lines) == 1 and lines[0].startswith("error:"), (name, command, stderr[-500:])
            assert usage.ru_maxrss / 1024 < CHILD_MAX_RSS_MB, (name, command, usage.ru_maxrss)
            assert seconds < 60, (name, command, seconds)
            assert not out.exists()


@pytest.mark.slow
def test_mutations_through_compression_commands_in_a_subprocess(tmp_path: Path) -> None:
    """A seeded sample of mutations through quantize/prune/factorize: a native crash would show."""
    rng = np.random.default_rng(11)
    commands = [
        ["quantize"],
        ["quantize", "--mode", "int4"],
        ["prune"],
        ["prune", "--structured"],
        ["factorize"],
    ]
    for i in range(10):
        seed = sorted(SEED_MODELS)[i % len(SEED_MODELS)]
        data = bytearray(SEED_MODELS[seed])
        for _ in range(3):
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(bytes(data))
        out = tmp_path / f"out{i}.onnx"
        command = commands[i % len(commands)]
        result = subprocess.run(
            [sys.executable, "-m", "modelshrink", *command, str(path), "-o", str(out), "--no-latency", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_limited,
        )
        assert result.returncode in (0, 1, 2), (i, command, result.returncode, result.stderr[-500:])
        if result.returncode:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), (i, result.stderr[-500:])
            assert not out.exists()
        else:
            onnx.checker.check_model(str(out))


@pytest.fixture(scope="module")
def distill_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A valid teacher (the model the hostile cases were made from) and training data for it."""
    folder = tmp_path_factory.mktemp("distill")
    base = models.save(models.mlp(), folder / "base.onnx")
    np.savez(folder / "train.npz", x=np.random.default_rng(0).standard_normal((8, 16), dtype=np.float32))
    return base, folder / "train.npz"


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_hostile_models_through_distill(
    runner: CliRunner, tmp_path: Path, distill_files: tuple[Path, Path], name: str, role: str
) -> None:
    """distill reads two models: a hostile one in either place is one clean line, nothing written."""
    base, data = distill_files
    path = tmp_path / "m.onnx"
    path.write_bytes(HOSTILE[name].SerializeToString())
    student, teacher = (path, base) if role == "student" else (base, path)
    out = tmp_path / "out"
    out.mkdir()
    args = ["distill", str(student), "--teacher", str(teacher), "--data", str(data)]
    result = runner.invoke(app, [*args, "-o", str(out / "r.onnx"), "--epochs", "1", "--no-latency", "-q"])
    assert result.exit_code in (1, 2), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert list(out.iterdir()) == []
