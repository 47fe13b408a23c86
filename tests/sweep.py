"""The conformance sweep: every compression command over every model shipped inside ``onnx``.

Used by ``tests/test_conformance.py`` (assertions) and ``bench/bench_conformance.py``
(``make conformance``: a table of outcomes per command). One run is one command with one
setting on one model, in-process through the Python API, and ends in exactly one of:

- ``ok``: the output was written, passes ``onnx.checker``, loads in onnxruntime, and its
  outputs on the shipped inputs (synthetic ones when none) match the original's within the
  run's tolerance (near-lossless modes), or are finite wherever the original's are (modes
  that change outputs by design); a run that changed nothing reproduces the original exactly.
- ``error``: a :class:`ModelshrinkError` with a one-line message whose reason is one of
  :data:`KNOWN_ERRORS` (the model is one onnxruntime itself cannot run), and nothing written.
- ``violation``: anything else (a traceback, an invalid or unloadable model, outputs out of
  tolerance, a file left behind, an unknown error): a bug to fix.

Two variants of each model:

- ``default``: the shipped file with default settings.
- ``exercised``: a copy in which initializer-backed graph inputs (the IR 3 way of declaring
  weights) became plain initializers and ``ConstantOfShape`` weights of the ``light`` models
  became real (seeded) initializers, run with ``min_elements=0`` so that every weight is in
  play, and with a fixed amount for prune and factorize (sparsity 0.5, energy 0.95: their
  defaults search the most that keeps the fidelity floor, which may leave weights alone). The
  defaults leave almost every shipped model untouched (their weights are small, or graph
  inputs, or made at run time), so this variant is the one that finds bugs.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import shutil
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from modelshrink import api
from modelshrink import io as msio
from modelshrink.errors import ModelshrinkError
from modelshrink.feeds import load_feeds
from modelshrink.pipeline import RunOptions
from modelshrink.techniques import FactorizeConfig, PruneConfig, QuantizeConfig

import models

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
MODELS = sorted(DATA.glob("*/*/model.onnx")) + sorted(DATA.glob("light/*.onnx"))

# Largest ConstantOfShape total (elements) the exercised variant folds into real weights:
# SqueezeNet and ShuffleNet in the test suite; `make conformance` adds the 7-12M ones
# (Inception v1/v2, DenseNet-121). AlexNet, ResNet-50, VGG-19, ZFNet (25-144M) stay as shipped.
FOLD_MAX_ELEMENTS = 2_000_000
BENCH_FOLD_MAX_ELEMENTS = 12_000_000

# Tolerances: max |result - original| / max |original| over the finite values of every float
# output, on the shipped (or synthetic) inputs. Weight-only int8 rounds each weight to 1/254
# of its channel's range; fp16 rounds weights and intermediate values to 11 significant bits;
# dynamic/static also round activations to 8 bits per tensor. Measured: the worst case over
# the shipped models and the models built in test_conformance.py (see bench_conformance).
INT8_REL_ERROR = 0.05  # measured <= 0.023
FP16_REL_ERROR = 0.005  # measured <= 0.0013
DYNAMIC_REL_ERROR = 0.1  # measured <= 0.023
STATIC_REL_ERROR = 0.15  # measured <= 0.049
BF16_REL_ERROR = 0.03  # bfloat16 keeps 8 significant bits of each weight; compute stays float32


@dataclass(frozen=True)
class Setting:
    """One command with one configuration, and how its outputs are judged."""

    name: str
    command: str
    config: Callable[[bool], Any]  # exercised -> config
    tolerance: float | None  # None: changes outputs by design (valid and finite)
    needs_data: bool = False
    flags: tuple[str, ...] = ()  # the same setting on the command line


def _q(mode: str, **extra: Any) -> Callable[[bool], Any]:
    return lambda ex: (
        QuantizeConfig(mode=mode, min_elements=0, **extra) if ex else QuantizeConfig(mode=mode, **extra)  # type: ignore[arg-type]
    )


SETTINGS = {
    s.name: s
    for s in (
        Setting("quantize-int8", "quantize", _q("int8"), INT8_REL_ERROR, flags=("--mode", "int8")),
        Setting("quantize-int4", "quantize", _q("int4"), None, flags=("--mode", "int4")),
        Setting("quantize-fp16", "quantize", _q("fp16"), FP16_REL_ERROR, flags=("--mode", "fp16")),
        Setting(
            "quantize-dynamic", "quantize", _q("dynamic"), DYNAMIC_REL_ERROR, flags=("--mode", "dynamic")
        ),
        Setting("quantize-static", "quantize", _q("static"), STATIC_REL_ERROR, True, ("--mode", "static")),
        Setting("quantize-bf16", "quantize", _q("bf16"), BF16_REL_ERROR, flags=("--mode", "bf16")),
        Setting("quantize-bits3", "quantize", _q("int8", bits=3), None, flags=("--bits", "3")),
        Setting("quantize-int2", "quantize", _q("int2"), None, flags=("--mode", "int2")),
        Setting("quantize-binary", "quantize", _q("binary"), None, flags=("--mode", "binary")),
        Setting(
            "prune",
            "prune",
            lambda ex: PruneConfig(sparsity=0.5, min_elements=0) if ex else PruneConfig(),
            None,
        ),
        Setting(
            "prune-structured",
            "prune",
            lambda ex: (
                PruneConfig(structured=True, sparsity=0.5, min_elements=0)
                if ex
                else PruneConfig(structured=True)
            ),
            None,
            flags=("--structured",),
        ),
        Setting(
            "factorize",
            "factorize",
            lambda ex: FactorizeConfig(energy=0.95, min_elements=0) if ex else FactorizeConfig(),
            None,
        ),
    )
}

# Errors that are right: the model (or what the mode needs) is one onnxruntime cannot run.
KNOWN_ERRORS = {
    "opset < 7 (onnxruntime has no kernel)": "onnxruntime runs opset 7 and newer",
    "op no runtime implements": "ai.onnx.preview.training:Gradient",
    "no system locale (StringNormalizer)": "Failed to construct locale",
    "no QuantizeLinear kernel at this opset": "has no QuantizeLinear/DequantizeLinear kernels at opset",
}


def model_id(path: Path) -> str:
    """``simple/test_sign_model`` or ``light/light_vgg19.onnx``."""
    return str(path.relative_to(DATA).parent if path.name == "model.onnx" else path.relative_to(DATA))


def has_data(path: Path) -> bool:
    """The model ships ``test_data_set_*`` folders (reference inputs)."""
    return path.name == "model.onnx" and any(path.parent.glob("test_data_set_*"))


def constant_of_shape_elements(proto: onnx.ModelProto) -> int:
    """Elements the model's ConstantOfShape nodes make from constant shapes."""
    inits = {i.name: i for i in proto.graph.initializer}
    total = 0
    for node in proto.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            total += int(np.prod(numpy_helper.to_array(inits[node.input[0]]), dtype=np.int64))
    return total


def exercised_copy_skipped(path: Path, fold_max: int = FOLD_MAX_ELEMENTS) -> str | None:
    """Why the exercised variant of this model is not run, or None when it is."""
    if path.parent.name != "light":
        return None
    folded = constant_of_shape_elements(onnx.load(str(path)))
    if folded <= fold_max:
        return None
    return (
        f"its {folded / 1e6:.0f}M ConstantOfShape weights, folded into real initializers, would take "
        "seconds to minutes per command: the suite folds the 1-2M ones (SqueezeNet, ShuffleNet), "
        "`make conformance` also the 7-12M ones; the default variant covers this model as shipped"
    )


def exercised_copy(path: Path, folder: Path, fold_max: int = FOLD_MAX_ELEMENTS) -> Path | None:
    """The exercised variant of a model (see the module docstring), or None if too big to fold."""
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    plain = [i for i in proto.graph.input if i.name not in inits]
    if len(plain) != len(proto.graph.input):
        del proto.graph.input[:]
        proto.graph.input.extend(plain)
        proto.ir_version = max(proto.ir_version, 4)  # IR 4: initializers need not be inputs
    folded = constant_of_shape_elements(proto)
    if folded > fold_max:
        return None
    if folded:
        rng = np.random.default_rng(0)
        for node in [n for n in proto.graph.node if n.op_type == "ConstantOfShape" and n.input[0] in inits]:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
            fill = numpy_helper.to_array(node.attribute[0].t).reshape(-1) if node.attribute else np.zeros(1)
            # Positive spread around the fill: BatchNorm variances stay positive, scales stay sane.
            values = (fill[0] * rng.uniform(0.5, 1.5, size=shape)).astype(fill.dtype)
            proto.graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
            proto.graph.node.remove(node)
    out = folder / model_id(path).replace("/", "__")
    out = out.with_suffix(".onnx") if out.suffix != ".onnx" else out
    onnx.save(proto, str(out))
    return out


@dataclass(frozen=True)
class Outcome:
    """How one run ended: ``ok``, ``error`` (with its known reason) or ``violation``."""

    status: str
    detail: str = ""
    rel_error: float | None = None
    changed: int = 0
    skipped: tuple[str, ...] = ()  # the report's skip reasons

    @property
    def label(self) -> str:
        """``ok``, ``ok (unchanged)``, the error's reason, or ``VIOLATION``."""
        if self.status == "ok":
            return "ok" if self.changed else "ok (unchanged)"
        return self.detail if self.status == "error" else "VIOLATION"


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _judge(
    original: Path, result: Path, feeds: list[dict[str, np.ndarray]], setting: Setting, changed: int
) -> Outcome:
    """Compare the result's outputs with the original's on the same feeds."""
    try:
        onnx.checker.check_model(str(result))
    except Exception as exc:
        return Outcome("violation", f"the written model fails the checker: {exc}")
    try:
        b = _session(result)
    except Exception as exc:
        return Outcome("violation", f"the written model does not load in onnxruntime: {exc}")
    a = _session(original)
    for kind in ("inputs", "outputs"):
        before = [(v.name, v.type) for v in getattr(a, f"get_{kind}")()]
        after = [(v.name, v.type) for v in getattr(b, f"get_{kind}")()]
        if before != after:
            return Outcome("violation", f"the model's {kind} changed: {before} -> {after}")
    worst = 0.0
    for feed, ref in zip(feeds, _reference(original, feeds), strict=True):
        for x, y in zip(ref, b.run(None, feed), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape:
                return Outcome("violation", f"output shape {y.shape} != original {x.shape}")
            if not changed and setting.name != "quantize-fp16":
                if x.dtype.kind in "fc" and not np.array_equal(x, y, equal_nan=True):
                    return Outcome("violation", "nothing changed, yet the outputs differ")
                if x.dtype.kind not in "fc" and not np.array_equal(x, y):
                    return Outcome("violation", "nothing changed, yet the outputs differ")
            if x.dtype.kind != "f":
                continue
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            finite = np.isfinite(x64)
            if not np.all(np.isfinite(y64[finite])):
                return Outcome("violation", "non-finite outputs where the original's are finite")
            if finite.any():
                scale = float(np.max(np.abs(x64[finite])))
                err = float(np.max(np.abs(x64[finite] - y64[finite])))
                worst = max(worst, err / scale if scale > 0 else err)
    if setting.tolerance is not None and worst > setting.tolerance:
        return Outcome("violation", f"relative error {worst:.3g} > {setting.tolerance:g}", worst, changed)
    return Outcome("ok", rel_error=worst, changed=changed)


def known_reason(message: str) -> str | None:
    if "modelshrink bug" in message:
        return None
    for reason, needle in KNOWN_ERRORS.items():
        if needle in message:
            return reason
    return None


_CACHE = Path(tempfile.mkdtemp(prefix="modelshrink-sweep-cache-"))
atexit.register(shutil.rmtree, _CACHE, True)
_COPIES: dict[tuple[Path, int], Path | None] = {}
_REFERENCES: dict[str, list[list[np.ndarray]]] = {}


def _source(path: Path, exercised: bool, fold_max: int) -> Path | None:
    if not exercised:
        return path
    if (path, fold_max) not in _COPIES:
        _COPIES[path, fold_max] = exercised_copy(path, _CACHE, fold_max)
    return _COPIES[path, fold_max]


def _reference(source: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """The original's outputs on ``feeds`` (cached: every setting compares with the same ones)."""
    digest = hashlib.sha1(source.read_bytes())  # a path may be rewritten, two models may be equal
    for feed in feeds:
        for name in sorted(feed):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(feed[name]).tobytes())
    key = digest.hexdigest()
    if key not in _REFERENCES:
        session = _session(source)
        _REFERENCES[key] = [session.run(None, feed) for feed in feeds]
    return _REFERENCES[key]


def samples_for(path: Path) -> int:
    """Feeds per run: one for the 224x224 light models, two elsewhere."""
    return 1 if path.parent.name == "light" else 2


class _Noise(logging.Handler):
    """Collects what a run would print on stderr besides its one line: Python warnings (numpy's
    RuntimeWarnings) and warnings logged by onnx-ir (the CLI silences the logger, but each one
    points at a model written in a way that onnx-ir had to patch up)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self._warnings = warnings.catch_warnings(record=True)
        self._caught: list[warnings.WarningMessage] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")

    def __enter__(self) -> _Noise:
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        logging.getLogger("onnx_ir").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("onnx_ir").removeHandler(self)
        self._warnings.__exit__(*exc)
        self.lines += [f"{w.category.__name__}: {w.message}" for w in self._caught]


def run_one(path: Path, setting: Setting, *, exercised: bool, fold_max: int = FOLD_MAX_ELEMENTS) -> Outcome:
    """Run ``setting`` on a shipped model (or its exercised copy) and judge the outcome."""
    source = _source(path, exercised, fold_max)
    if source is None:
        return Outcome("error", "too big to fold (test budget)")
    data = str(path.parent) if has_data(path) else None
    return run_model(source, setting, setting.config(exercised), data=data, samples=samples_for(path))


def run_model(source: Path, setting: Setting, config: Any, *, data: str | None, samples: int) -> Outcome:
    """Run ``setting`` with ``config`` on the model file ``source`` and judge the outcome."""
    with tempfile.TemporaryDirectory(prefix="modelshrink-sweep-") as tmp:
        out_dir = Path(tmp)
        output = out_dir / "result.onnx"
        options = RunOptions(data=data, latency=False, samples=samples)
        noise = _Noise()
        try:
            with noise:
                report = getattr(api, setting.command)(str(source), str(output), config, options)
        except ModelshrinkError as exc:
            left = sorted(p.name for p in out_dir.iterdir())
            if left:
                return Outcome("violation", f"error, yet files were left behind: {left}")
            if "\n" in exc.message or exc.exit_code not in (1, 2):
                return Outcome("violation", f"exit {exc.exit_code}, message {exc.message!r}")
            reason = known_reason(exc.message)
            if setting.needs_data and data is None and exc.exit_code == 2:
                reason = "needs --data"
            return Outcome("error", reason) if reason else Outcome("violation", f"error: {exc.message}")
        except Exception as exc:  # a traceback: the bug this sweep exists to find
            tb = traceback.format_exception(exc)
            return Outcome("violation", f"{type(exc).__name__}: {exc} | {''.join(tb[-3:])}")
        if noise.lines:
            return Outcome("violation", f"warnings that would reach stderr: {noise.lines[:3]}")
        if not report.written or not output.exists():
            return Outcome("violation", "the run succeeded but wrote nothing")
        feeds = load_feeds(msio.load_model(str(source)).model, data=data, samples=samples).samples
        try:
            outcome = _judge(source, output, feeds, setting, len(report.changes))
        except Exception as exc:
            return Outcome("violation", f"judging failed: {type(exc).__name__}: {exc}")
        return dataclasses.replace(outcome, skipped=tuple(sk.reason for sk in report.skipped))


LATEST_OPSET = onnx.defs.onnx_opset_version()


def built_models() -> dict[str, onnx.ModelProto]:
    """What the shipped models lack, built in code: every opset from 7, IR 3 and the newest IR,
    If/Loop/Scan bodies, weights in Constant nodes and graph inputs, run-time weights."""
    built = {f"opset{op}": models.every_weight_kind(op) for op in range(7, LATEST_OPSET + 1)}
    built["opset7-ir3"] = models.every_weight_kind(7, ir_version=3)
    built[f"opset{LATEST_OPSET}-ir{onnx.IR_VERSION}"] = models.every_weight_kind(
        LATEST_OPSET, ir_version=onnx.IR_VERSION
    )
    built["if"] = models.constant_and_subgraph()
    built["loop"] = models.loop_model()
    built["scan"] = models.scan_model()
    built["run-time-weights"] = models.run_time_weights_model()
    return built


def save_built(folder: Path) -> dict[str, tuple[Path, str]]:
    """Write every built model and four synthetic feeds beside it (``NAME.npz``)."""
    saved = {}
    for name, proto in built_models().items():
        path = models.save(proto, folder / f"{name}.onnx")
        feeds = load_feeds(msio.load_model(str(path)).model, data=None, samples=4).samples
        data = folder / f"{name}.npz"
        np.savez(data, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
        saved[name] = (path, str(data))
    return saved


def run_built(path: Path, data: str, setting: Setting) -> Outcome:
    """A built model through ``setting`` (exercised config; real data only where it is needed)."""
    return run_model(
        path, setting, setting.config(True), data=data if setting.needs_data else None, samples=4
    )
