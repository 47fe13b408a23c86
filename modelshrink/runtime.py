"""onnxruntime sessions: one place that knows providers, threads and ORT's error messages."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelshrink.errors import UnsupportedModelError
from modelshrink.options import PROVIDERS, RuntimeOptions  # a session's options live with the others

__all__ = [
    "PROVIDERS",
    "RuntimeOptions",
    "Session",
    "clean_ort_message",
    "create_session",
    "executes_qdq",
    "runs_qdq",
]

logger = logging.getLogger(__name__)

# The CLI sets onnxruntime's own log level before this module (and onnxruntime) is imported.
if (_severity := os.environ.get("MODELSHRINK_ORT_LOG_SEVERITY")) is not None:
    ort.set_default_logger_severity(int(_severity))

# Execution providers that run a QDQ model (DequantizeLinear in front of a weight) with int8
# kernels. Elsewhere (the CPU and CUDA providers) a DequantizeLinear of a weight is computed on
# every call, while Cast + Mul of a constant is folded once when the session loads.
QDQ_PROVIDERS = frozenset(
    {
        "TensorrtExecutionProvider",
        "OpenVINOExecutionProvider",
        "QNNExecutionProvider",
        "VitisAIExecutionProvider",
        "NnapiExecutionProvider",
    }
)

_PATH_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")


_LOAD_PREFIX = re.compile(r"^Load model from .*? failed:\s*", re.DOTALL)
_OPSET_TOO_NEW = re.compile(
    r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", re.DOTALL
)


_SOURCE_LOCATION = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s:]+\.(?:cc|cpp|h|hpp|cu):\d+ ")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
# onnxruntime implements ai.onnx kernels from opset 7 on.
_ORT_MIN_OPSET = 7


def _strip_source_location(text: str) -> str:
    """Drop "/path/file.cc:123 ret ns::Func(args...)" (a C++ location and signature)."""
    match = _SOURCE_LOCATION.search(text)
    if match is None:
        return text
    rest = text[match.end() :]
    open_at = rest.find("(")
    if open_at < 0:
        return text[: match.start()] + rest
    depth = 0
    for i in range(open_at, len(rest)):
        if rest[i] == "(":
            depth += 1
        elif rest[i] == ")":
            depth -= 1
            if depth == 0:
                tail = re.sub(r"^(::<lambda\(\)>)+", "", rest[i + 1 :])
                return text[: match.start()] + tail.lstrip()
    return text[: match.start()] + rest


def clean_ort_message(exc: BaseException) -> str:
    """One readable line from an onnxruntime exception (drop codes, C++ paths and signatures)."""
    text = _PATH_PREFIX.sub("", str(exc).strip())
    text = _LOAD_PREFIX.sub("", text)
    if match := _OPSET_TOO_NEW.search(text):
        opset, domain, supported = match.groups()
        domain = domain.rstrip(".")
        return (
            f"it uses opset {opset} of {domain}, newer than this onnxruntime {ort.__version__} "
            f"supports (up to {supported}); upgrade onnxruntime or convert the model to opset "
            f"{supported} or lower"
        )
    if (match := _NO_KERNEL.search(text)) and int(match.group(2)) < _ORT_MIN_OPSET:
        op, version, node = match.groups()
        return (
            f"node '{node}' is {op} from opset {version}; onnxruntime runs opset "
            f"{_ORT_MIN_OPSET} and newer only: convert the model first (onnx.version_converter)"
        )
    for _ in range(3):  # messages can nest several locations
        text = _strip_source_location(text)
    text = text.replace("Fatal error: ", "")
    return " ".join(text.split())


class Session:
    """An ``InferenceSession`` with the names and types a caller needs."""

    def __init__(self, model: str | Path | bytes, options: RuntimeOptions, *, label: str) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 4  # failures come back as exceptions, turned into one line
        so.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if options.optimize
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        providers = options.providers()
        source = str(model) if isinstance(model, Path) else model
        try:
            self._session = ort.InferenceSession(source, so, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... hierarchy
            raise UnsupportedModelError(
                f"{label}: onnxruntime cannot load it: {clean_ort_message(exc)}"
            ) from exc
        self.label = label
        self.options = options
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run once; onnxruntime failures become one-line errors naming the model."""
        try:
            return list(self._session.run(list(outputs) if outputs else None, dict(feed)))
        except Exception as exc:
            raise UnsupportedModelError(
                f"{self.label}: onnxruntime failed while running it: {clean_ort_message(exc)}"
            ) from exc

    def run_fast(self, feed: dict[str, Any]) -> None:
        """Run once without error translation (latency loop; the feed was validated)."""
        self._session.run(None, feed)


def create_session(model: str | Path | bytes, options: RuntimeOptions, *, label: str) -> Session:
    """A session for a model path (external data resolved beside it) or serialized bytes."""
    return Session(model, options, label=label)


def executes_qdq(options: RuntimeOptions) -> bool:
    """Whether the provider in use runs QDQ weights as int8 kernels (see ``QDQ_PROVIDERS``)."""
    return options.provider_name in QDQ_PROVIDERS


@functools.cache
def runs_qdq(opset: int) -> bool:
    """Whether onnxruntime's CPU provider runs int8 QuantizeLinear/DequantizeLinear at ``opset``.

    Its kernel registry can claim an open-ended version range and still lack the newest
    schema (onnxruntime 1.32 loads opset-28 models but has no opset-28 DequantizeLinear), so
    this loads the smallest such model once per opset.
    """
    from onnx import TensorProto, helper  # lazy: only the quantizers need it

    tensors = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("z", TensorProto.INT8, [], [0]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        tensors,
    )
    try:
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = max(helper.find_min_ir_version_for(opsets), 7)
        so = ort.SessionOptions()
        so.log_severity_level = 4
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # any failure means: not here
        return False
    return True
