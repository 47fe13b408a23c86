"""Every path a command writes, under every kind of target (issue 14), as one table.

Target kinds x roles (``-o``, ``--report``, the output's external data ``OUT.data``) x commands,
run in-process on a tiny model. Each case asserts the exit code, the one-line message, and the
kind and bytes of every file under the test folder afterwards: a refusal changes nothing; a
success changes only what it was asked to write, and leaves no staging folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from modelshrink.cli import app

import models

TECHNIQUE_COMMANDS = ("quantize", "prune", "factorize", "distill")
COMMANDS = (*TECHNIQUE_COMMANDS, "compare", "inspect")
FAST = ("--no-latency", "--samples", "1", "-q")


# --- the folder: inputs, and things to point targets at --------------------------------------


def _mknod_ok() -> bool:
    return hasattr(os, "mknod") and os.geteuid() == 0


@dataclass
class Scene:
    root: Path
    model: Path  # in/m.onnx, one file
    ext: Path  # in/e.onnx with in/e.onnx.data
    data: Path  # in/d.npz
    out: Path  # out/ (empty, writable)
    device: Path | None  # dev/null: a character device (1, 3), when mknod is allowed


def _scene(root: Path) -> Scene:
    (root / "in").mkdir()
    (root / "out").mkdir()
    model = models.save(models.mlp(), root / "in" / "m.onnx")
    ext = models.save_external(models.mlp(), root / "in" / "e.onnx")
    data = root / "in" / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32))
    device = None
    if _mknod_ok():
        (root / "dev").mkdir()
        device = root / "dev" / "null"
        try:
            os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except OSError:
            device = None
    return Scene(root, model, ext, data, root / "out", device)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: kind, and bytes/permissions, link target or device number."""
    entries: dict[str, tuple[object, ...]] = {}
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(folder) / name
            st = os.lstat(path)
            key = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                entries[key] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
            elif stat.S_ISDIR(st.st_mode):
                entries[key] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISCHR(st.st_mode):
                entries[key] = ("chr", st.st_rdev)
            else:
                entries[key] = ("other", stat.S_IFMT(st.st_mode))
    return entries


@contextlib.contextmanager
def without_dac_override() -> Iterator[None]:
    """As root, drop CAP_DAC_OVERRIDE from this thread for the block, so that folder permissions
    apply (what `setpriv --bounding-set=-dac_override` does to a whole process)."""
    if os.geteuid() != 0:
        yield
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("cannot read capabilities")
    saved = data[0].effective
    data[0].effective &= ~(1 << 1)  # CAP_DAC_OVERRIDE
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


class FifoReader(threading.Thread):
    """Reads a FIFO to the end in the background (a writer blocks until a reader opens it)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.data = b""

    def run(self) -> None:
        with self.path.open("rb") as f:
            self.data = f.read()

    def finish(self) -> bytes:
        with contextlib.suppress(OSError):  # nobody wrote: release the reader
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        self.join(10)
        assert not self.is_alive()
        return self.data


# --- the table -------------------------------------------------------------------------------

KINDS = (
    "missing",
    "exists",
    "exists --force",
    "character device",
    "FIFO",
    "symlink to file",
    "symlink to device",
    "hard link of the input",
    "read-only folder",
    "missing folder",
    "the input",
    "another output",
    "an input's external data",
)
ROLES = ("-o", "--report", "external data")
# Paths that are not regular files cannot hold external data (it is refused), and the folder
# of OUT.data is the folder of -o (its rows are the -o rows).
NOT_APPLICABLE = {("external data", "read-only folder"), ("external data", "missing folder")}


@dataclass
class Case:
    argv: list[str]
    path: Path  # the path under test (the role's path)
    expect: str  # "refused: <fragment>", or "written" / "through" (stream) / "link kept"
    fifo: FifoReader | None = None
    changes: tuple[Path, ...] = ()  # paths a success may create or change


def _target_path(scene: Scene, kind: str) -> tuple[Path, str]:
    """Make the target of ``kind`` in ``out/``; return it and what should happen."""
    out = scene.out / "t.onnx"
    if kind == "missing":
        return out, "written"
    if kind in ("exists", "exists --force"):
        out.write_bytes(b"precious")
        out.chmod(0o640)
        return out, "refused: already exists" if kind == "exists" else "written"
    if kind == "character device":
        if scene.device is None:
            pytest.skip("mknod needs root")
        return scene.device, "through"
    if kind == "FIFO":
        os.mkfifo(out)
        return out, "through"
    if kind == "symlink to file":
        (scene.root / "elsewhere").mkdir(exist_ok=True)
        target = scene.root / "elsewhere" / "target.bin"
        target.write_bytes(b"old target")
        out.symlink_to(target)
        return out, "link kept"
    if kind == "symlink to device":
        out.symlink_to(scene.device if scene.device is not None else "/dev/null")
        return out, "through"
    if kind == "hard link of the input":
        os.link(scene.model, out)
        return out, "refused: input"
    if kind == "read-only folder":
        ro = scene.root / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "t.onnx", "refused: not writable"
    if kind == "missing folder":
        return scene.root / "nope" / "t.onnx", "refused: does not exist"
    if kind == "the input":
        return scene.model, "refused: input"
    if kind == "another output":
        return out, "refused: same file"
    if kind == "an input's external data":
        return Path(str(scene.ext) + ".data"), "refused: input"
    raise AssertionError(kind)


def _command_argv(command: str, src: Path, scene: Scene, output: Path | None) -> list[str]:
    if command == "inspect":
        return ["inspect", str(src), "-q"]
    if command == "compare":
        return ["compare", str(src), str(src), *FAST]
    assert output is not None
    argv = [command, str(src), "-o", str(output), *FAST]
    if command == "distill":
        # the same weights in one file (a teacher with external data fails in distill itself)
        argv += ["--teacher", str(scene.model), "--data", str(scene.data), "--epochs", "1"]
    return argv


def _case(scene: Scene, command: str, role: str, kind: str) -> Case:
    default_out = scene.out / "o.onnx"
    if role == "external data":
        return _sidecar_case(scene, command, kind)
    path, expect = _target_path(scene, kind)
    src = scene.ext if kind == "an input's external data" else scene.model
    if role == "-o":
        argv = _command_argv(command, src, scene, path)
        if kind == "another output":
            argv += ["--report", str(path)]
        changes = (path, Path(str(path) + ".data"))
    else:
        argv = _command_argv(command, src, scene, default_out)
        argv += ["--report", str(path)]
        if kind == "another output" and command in TECHNIQUE_COMMANDS:
            argv[argv.index(str(default_out))] = str(path)  # -o X --report X
        elif kind == "another output":
            argv[-1] = "-"
            argv.append("--json")  # --report - and --json: both stdout
        changes = (path, default_out)
    if kind in ("exists --force", "symlink to file"):  # the link's target exists: --force
        argv.append("--force")
    fifo = FifoReader(path) if kind == "FIFO" else None
    return Case(argv, path, expect, fifo, changes)


def _sidecar_case(scene: Scene, command: str, kind: str) -> Case:
    """The role of OUT.data: the input keeps external data, so the output does too."""
    out = scene.out / "o.onnx"
    data = scene.out / "o.onnx.data"
    src = scene.ext
    expect = {
        "missing": "written",
        "exists": "refused: already exists",
        "exists --force": "written",
        "character device": "refused: character device",
        "FIFO": "refused: FIFO",
        "symlink to file": "refused: symbolic link",
        "symlink to device": "refused: symbolic link",
        "hard link of the input": "refused: input",
        "the input": "refused: input",
        "another output": "refused: same file",
        "an input's external data": "refused: input",
    }[kind]
    extra: list[str] = []
    if kind in ("exists", "exists --force"):
        data.write_bytes(b"precious")
        data.chmod(0o640)
    elif kind == "character device":
        if scene.device is None:
            pytest.skip("mknod needs root")
        os.mknod(data, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    elif kind == "FIFO":
        os.mkfifo(data)
    elif kind == "symlink to file":
        (scene.root / "elsewhere").mkdir()
        (scene.root / "elsewhere" / "target.bin").write_bytes(b"old target")
        data.symlink_to(scene.root / "elsewhere" / "target.bin")
    elif kind == "symlink to device":
        data.symlink_to(scene.device if scene.device is not None else "/dev/null")
    elif kind == "hard link of the input":
        os.link(Path(str(scene.ext) + ".data"), data)
    elif kind == "the input":
        src = models.save(models.mlp(), data)  # a model file named like the output's data
    elif kind == "another output":
        extra = ["--report", str(data)]
    elif kind == "an input's external data":
        # in/a.onnx keeps its tensors in in/o.onnx.data: writing in/o.onnx would replace them
        src = models.save_external(models.mlp(), scene.root / "in" / "a.onnx", location="o.onnx.data")
        out, data = scene.root / "in" / "o.onnx", scene.root / "in" / "o.onnx.data"
    argv = [*_command_argv(command, src, scene, out), *extra]
    if kind == "exists --force":
        argv.append("--force")
    return Case(argv, data, expect, None, (out, data))


CASES = [
    pytest.param(command, role, kind, id=f"{command}|{role}|{kind}")
    for role in ROLES
    for kind in KINDS
    for command in (COMMANDS if role == "--report" else TECHNIQUE_COMMANDS)
    if (role, kind) not in NOT_APPLICABLE
]


def _is_model(blob: bytes) -> bool:
    proto = onnx.ModelProto()
    proto.ParseFromString(blob)
    return len(proto.graph.node) > 0


def _is_report(blob: bytes) -> bool:
    return json.loads(blob).get("schema_version") == 1


@pytest.mark.parametrize(("command", "role", "kind"), CASES)
def test_target(tmp_path: Path, command: str, role: str, kind: str) -> None:
    scene = _scene(tmp_path)
    case = _case(scene, command, role, kind)
    before = snapshot(tmp_path)
    if case.fifo is not None:
        case.fifo.start()
    guard = without_dac_override() if kind == "read-only folder" else contextlib.nullcontext()
    with guard:
        result = CliRunner().invoke(app, case.argv)
    streamed = case.fifo.finish() if case.fifo is not None else None
    after = snapshot(tmp_path)
    if kind == "read-only folder":
        (tmp_path / "ro").chmod(0o755)
    assert not any(".modelshrink-" in key for key in after), sorted(after)
    lines = [line for line in result.stderr.splitlines() if line.strip()]

    if case.expect.startswith("refused"):
        fragment = case.expect.split(": ", 1)[1]
        assert result.exit_code == 2, (result.exit_code, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
        assert "Traceback" not in result.stderr
        assert after == before
        return

    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == ""
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    allowed = {str(p.relative_to(tmp_path)) for p in case.changes if p.is_relative_to(tmp_path)}
    if case.expect == "link kept":
        allowed.add("elsewhere/target.bin")
    assert changed <= allowed, (changed, allowed)
    check = _is_model if role != "--report" else _is_report
    key = str(case.path.relative_to(tmp_path))
    if case.expect == "written":
        kind_, blob, mode = after[key]
        assert kind_ == "file" and blob != b"precious"
        assert role == "external data" or check(blob)
        if kind == "exists --force":
            assert mode == 0o640  # a replaced file keeps its permissions
        else:
            assert mode == 0o666 & ~_umask()
        if role == "external data":
            assert onnx.load(str(scene.out / "o.onnx")).graph.node  # with its data
    elif case.expect == "link kept":
        assert after[key] == before[key]
        assert check(after["elsewhere/target.bin"][1])  # type: ignore[arg-type]
    elif case.expect == "through":
        assert after[key] == before[key]  # still the device / FIFO / link
        if streamed is not None:
            assert check(streamed)
    else:
        raise AssertionError(case.expect)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_row_kind_and_role_is_in_the_table() -> None:
    combos = {(role, kind) for _, role, kind in (p.values for p in CASES)}
    assert len(combos) == len(ROLES) * len(KINDS) - len(NOT_APPLICABLE)
    assert {c for c, _, _ in (p.values for p in CASES)} == set(COMMANDS)


def test_report_dash_goes_to_stdout(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    out = scene.out / "o.onnx"
    result = CliRunner().invoke(app, ["quantize", str(scene.model), "-o", str(out), "--report", "-", *FAST])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == {"path": str(out), "written": True}
    for clash in (["-o", "-", "--report", "-"], ["-o", str(scene.out / "p.onnx"), "--report", "-", "--json"]):
        result = CliRunner().invoke(app, ["quantize", str(scene.model), *clash, *FAST])
        assert result.exit_code == 2 and "same file" in result.stderr, result.stderr


@pytest.mark.parametrize("via_link", [False, True])
def test_a_descriptor_of_this_process_is_written_through(tmp_path: Path, via_link: bool) -> None:
    """/proc/self/fd/N (or a link to it) is a stream, like -o -: never replaced."""
    scene = _scene(tmp_path)
    read_end, write_end = os.pipe()
    try:
        target = f"/proc/self/fd/{write_end}"
        if via_link:
            (scene.out / "fd.onnx").symlink_to(target)
            target = str(scene.out / "fd.onnx")
        result = CliRunner().invoke(app, ["quantize", str(scene.model), "-o", target, "--force", *FAST])
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            streamed = f.read()
    finally:
        for fd in (read_end, write_end):
            with contextlib.suppress(OSError):
                os.close(fd)
    assert result.exit_code == 0, result.stderr
    assert _is_model(streamed)
    if via_link:
        assert os.readlink(scene.out / "fd.onnx") == f"/proc/self/fd/{write_end}"
    assert [p.name for p in scene.out.iterdir()] == (["fd.onnx"] if via_link else [])


def test_compare_report_onto_the_candidate_is_refused(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    candidate = models.save(models.mlp(seed=1), scene.out / "b.onnx")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(
        app, ["compare", str(scene.model), str(candidate), "--report", str(candidate), *FAST]
    )
    assert result.exit_code == 2 and "input" in result.stderr
    assert snapshot(tmp_path) == before
