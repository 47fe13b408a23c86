"""Staged runs a piece at a time: each stage runs only the nodes no earlier stage ran.

GPTQ fits stage ``s`` to layer inputs computed by the model whose earlier stages are already
quantized, and needs the original's inputs too (see :func:`layerwise.solve_in_stages`). Run as
whole models, that is two full runs per feed and stage, with the weights fed as run-time
inputs, which onnxruntime runs about 2x slower than constants (no pre-packing). Instead the
graph is cut into *pieces*: piece ``s`` holds the nodes that stage ``s``'s inputs need and no
earlier piece holds. It runs as a small model of its own, with the weights of its time baked
in as constants, on the values earlier pieces left behind, kept per feed for the quantized and
the original model. Every node then runs twice per feed in all, not twice per stage.

When the values kept would pass :data:`KEPT_BYTES`, each later stage runs its whole prefix
from the graph inputs instead (still only the nodes it needs, still with constant weights).
Graphs with subgraphs (whose bodies read outer values this cut does not follow) and graphs
whose inputs have initializers (defaults the feeds may replace) are not cut: :func:`plan`
says why, and the caller runs whole models.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modelshrink.options import RuntimeOptions
from modelshrink.runtime import Session
from modelshrink.sessions import session_for_model

__all__ = ["KEPT_BYTES", "Chain", "Piece", "plan"]

logger = logging.getLogger(__name__)

# Bytes of values kept between stages (both models, all feeds) before falling back to prefixes.
KEPT_BYTES = 1 << 30


@dataclass(frozen=True)
class Piece:
    """The nodes one stage runs.

    Attributes:
        nodes: Positions of its nodes in the graph's order.
        inputs: Values it reads that it does not compute (graph inputs, earlier pieces' values).
        outputs: Values it computes that its stage's layers or later pieces read.
        keeps: Those of ``outputs`` later pieces read (computed with weights that no longer
            change).
    """

    nodes: frozenset[int]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    keeps: tuple[str, ...] = ()


def _producers(graph: ir.Graph) -> tuple[list[ir.Node], dict[str, int]]:
    nodes = list(graph)
    producer = {v.name: i for i, n in enumerate(nodes) for v in n.outputs if v.name}
    return nodes, producer


def _closure(
    nodes: Sequence[ir.Node], producer: Mapping[str, int], names: Sequence[str], done: set[int]
) -> set[int]:
    """The nodes outside ``done`` that computing ``names`` needs."""
    mine: set[int] = set()
    stack = [producer[n] for n in names if n in producer]
    while stack:
        i = stack.pop()
        if i in mine or i in done:
            continue
        mine.add(i)
        stack.extend(
            producer[v.name] for v in nodes[i].inputs if v is not None and v.name and v.name in producer
        )
    return mine


def _reads(
    nodes: Sequence[ir.Node], producer: Mapping[str, int], consts: set[str], mine: set[int]
) -> set[str]:
    """The values the nodes ``mine`` read and do not compute (constants aside)."""
    return {
        v.name
        for i in mine
        for v in nodes[i].inputs
        if v is not None and v.name and v.name not in consts and producer.get(v.name) not in mine
    }


def plan(
    model: ir.Model, targets: Sequence[Sequence[str]], weights: Sequence[Sequence[str]]
) -> list[Piece] | str:
    """One piece per stage, or why the graph is not cut.

    Args:
        model: The model.
        targets: Per stage, the values its layers read.
        weights: Per stage, the weights it replaces (at its end).
    """
    graph = model.graph
    if any(graph.subgraphs()):
        return "the graph has subgraphs"
    if any(v.name in graph.initializers for v in graph.inputs):
        return "a graph input has an initializer"
    nodes, producer = _producers(graph)
    consts = set(graph.initializers)
    # the last stage replacing a weight a node's value depends on (-1: none)
    replaced = {name: s for s, names in enumerate(weights) for name in names}
    last: list[int] = []
    for node in nodes:
        depends = [-1]
        for v in node.inputs:
            if v is None or not v.name:
                continue
            depends.append(replaced.get(v.name, -1))
            if v.name in producer:
                depends.append(last[producer[v.name]])
        last.append(max(depends))
    done: set[int] = set()
    sets: list[set[int]] = []
    for s, names in enumerate(targets):
        mine = _closure(nodes, producer, names, done)
        sets.append(mine)
        # a value computed now stays valid only if no weight it depends on changes later
        done |= {i for i in mine if last[i] < s}
    reads = [_reads(nodes, producer, consts, mine) for mine in sets]
    pieces = []
    for s, mine in enumerate(sets):
        later = set().union(*reads[s + 1 :], *(set(t) for t in targets[s + 1 :]))
        outputs = {name for name in targets[s] if producer.get(name) in mine}
        keeps = {name for name in later if producer.get(name) in mine and last[producer[name]] < s}
        pieces.append(
            Piece(
                frozenset(mine), tuple(sorted(reads[s])), tuple(sorted(outputs | keeps)), tuple(sorted(keeps))
            )
        )
    return pieces


def _submodel(model: ir.Model, piece: Piece, dtypes: Mapping[str, np.dtype]) -> ir.Model:
    """The piece as a model of its own: its inputs as graph inputs, its outputs as outputs."""
    sub = model.clone()
    graph = sub.graph
    nodes = list(graph)
    by_name = {v.name: v for v in graph.inputs}
    by_name.update({v.name: v for n in nodes for v in n.outputs if v.name})
    dropped = [n for i, n in enumerate(nodes) if i not in piece.nodes]
    graph.remove(dropped, safe=False)
    for node in dropped:  # no longer a user of anything (initializers it alone read go)
        for slot in range(len(node.inputs)):
            node.replace_input_with(slot, None)
    inputs = []
    for name in piece.inputs:
        old = by_name[name]
        if old.producer() is None:  # a graph input
            inputs.append(old)
            continue
        new = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(dtypes[name])))
        ir.convenience.replace_all_uses_with(old, new)
        inputs.append(new)
    graph.inputs.clear()
    graph.inputs.extend(inputs)
    graph.outputs.clear()
    graph.outputs.extend(by_name[name] for name in piece.outputs)
    for name in [n for n, v in graph.initializers.items() if not v.uses()]:
        graph.initializers.pop(name)
    return sub


def _replace(sub: ir.Model, weights: Mapping[str, np.ndarray]) -> bool:
    """Put ``weights`` in place of the initializers ``sub`` has of them; whether it had any."""
    found = [(name, value) for name, value in sub.graph.initializers.items() if name in weights]
    for name, value in found:
        value.const_value = ir.Tensor(np.ascontiguousarray(weights[name]), name=name)
    return bool(found)


class Chain:
    """Runs the stages' pieces feed by feed, keeping what later pieces read.

    Per stage: :meth:`start` (with the weights solved so far), :meth:`run` for each feed (any
    number of times: the same feed gives the same values), :meth:`finish`.
    """

    def __init__(
        self,
        model: ir.Model,
        targets: Sequence[Sequence[str]],
        pieces: Sequence[Piece],
        feeds: int,
        runtime: RuntimeOptions,
    ) -> None:
        self.model = model
        self._nodes, self._producer = _producers(model.graph)
        self._consts = set(model.graph.initializers)
        self.targets = [tuple(t) for t in targets]
        self.pieces = list(pieces)
        self.runtime = runtime
        self.kept = True
        # values earlier pieces computed, per feed: in the model with the weights solved so
        # far, and in the original (the same arrays while no weight was replaced)
        self._current: list[dict[str, np.ndarray]] = [{} for _ in range(feeds)]
        self._original: list[dict[str, np.ndarray]] = [{} for _ in range(feeds)]
        self._bytes = 0
        self._stage = -1
        self._piece: Piece | None = None
        self._same = True
        self._sessions: tuple[Session, Session] | None = None

    def _needed_after(self, stage: int) -> set[str]:
        names: set[str] = set()
        for piece, targets in zip(self.pieces[stage + 1 :], self.targets[stage + 1 :], strict=True):
            names.update(piece.inputs, targets)
        return names

    def _prefix(self, stage: int) -> Piece:
        """Stage ``stage``'s targets computed from the graph inputs."""
        targets, producer = self.targets[stage], self._producer
        mine = _closure(self._nodes, producer, targets, set())
        inputs = _reads(self._nodes, producer, self._consts, mine)
        outputs = sorted({name for name in targets if producer.get(name) in mine})
        return Piece(frozenset(mine), tuple(sorted(inputs)), tuple(outputs))

    def start(self, stage: int, weights: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray]) -> None:
        """Build stage ``stage``'s sessions: the original's and one with ``weights`` in place
        (``feed``: any one feed, for the inputs' types)."""
        self._stage = stage
        self._same = not weights
        piece = self.pieces[stage] if self.kept else self._prefix(stage)
        self._piece = piece
        if not piece.nodes:
            self._sessions = None
            return
        dtypes = {k: v.dtype for k, v in (self._current[0].items() if self._current else ())}
        dtypes.update({k: np.asarray(v).dtype for k, v in feed.items()})
        sub = _submodel(self.model, piece, dtypes)
        original = session_for_model(sub, self.runtime, label="activation probe")
        current = original
        if _replace(sub, weights):  # the piece reads solved weights: a session with them
            current = session_for_model(sub, self.runtime, label="activation probe")
        self._sessions = (current, original)

    def run(
        self, index: int, feed: Mapping[str, np.ndarray], names: Sequence[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """The named values on feed ``index`` in the model with the weights given to
        :meth:`start`, and in the original (None while no weight was replaced)."""
        piece = self._piece
        assert piece is not None
        mine: dict[str, np.ndarray] = {}
        theirs: dict[str, np.ndarray] = {}
        if self._sessions is not None:
            current, original = self._sessions
            mine = self._run(current, piece, feed, self._current[index])
            theirs = mine if self._same else self._run(original, piece, feed, self._original[index])
        if self.kept:
            self._keep(index, mine, theirs)
        pick = {n: _lookup(n, feed, mine, self._current[index]) for n in names}
        if self._same:
            return pick, None
        return pick, {n: _lookup(n, feed, theirs, self._original[index]) for n in names}

    @staticmethod
    def _run(
        session: Session, piece: Piece, feed: Mapping[str, np.ndarray], kept: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        given = {n: (kept[n] if n in kept else np.asarray(feed[n])) for n in session.input_names}
        return dict(zip(piece.outputs, session.run(given, piece.outputs), strict=True))

    def _held(self, index: int) -> int:
        mine, theirs = self._current[index], self._original[index]
        total = sum(v.nbytes for v in mine.values())
        return total + sum(v.nbytes for k, v in theirs.items() if mine.get(k) is not v)

    def _keep(self, index: int, mine: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> None:
        before = self._held(index)
        for name in self._piece.keeps if self._piece is not None else ():
            if name in mine:
                self._current[index][name] = mine[name]
                self._original[index][name] = theirs[name]
        self._bytes += self._held(index) - before
        if self._bytes > KEPT_BYTES:
            logger.info(
                "values kept between stages pass %d bytes: later stages run their prefixes", KEPT_BYTES
            )
            self.kept = False

    def finish(self) -> None:
        """Drop what no later piece reads (everything once the budget was passed)."""
        self._sessions = None
        keep = self._needed_after(self._stage) if self.kept else set()
        for index, (mine, theirs) in enumerate(zip(self._current, self._original, strict=True)):
            before = self._held(index)
            for kept in (mine, theirs):
                for name in [n for n in kept if n not in keep]:
                    del kept[name]
            self._bytes += self._held(index) - before


def _lookup(
    name: str, feed: Mapping[str, np.ndarray], fresh: Mapping[str, np.ndarray], kept: Mapping[str, np.ndarray]
) -> np.ndarray:
    if name in fresh:
        return fresh[name]
    if name in kept:
        return kept[name]
    return np.asarray(feed[name])
