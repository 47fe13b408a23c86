"""Float64 stand-ins for ``onnx.reference`` ops that do not follow onnxruntime (or the spec).

- ``LSTM``, ``GRU``, ``RNN``: onnx.reference ignores ``sequence_lens`` and ``activations`` and
  reverses the whole time axis for the reverse direction; onnxruntime (and these) reverse each
  sequence within its length, leave padding steps of ``Y`` at zero and return the last valid
  state in ``Y_h``/``Y_c``. ``tests/test_distill_recurrent.py`` checks these against
  onnxruntime in float32 for every variant the gradient tests use.
- ``Scan``: onnx.reference refuses ``scan_input_directions``/``scan_output_directions`` 1
  (reverse); onnxruntime runs them.
- ``Loop``: onnx.reference concatenates the scan outputs of the iterations along their first
  axis (``np.vstack``); onnxruntime (and the spec) stack them along a new first axis.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx.reference.op_run import OpRun

__all__ = ["STAND_IN_OPS"]


def _act(name: str, x: np.ndarray) -> np.ndarray:
    name = name.lower()
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    if name == "relu":
        return np.maximum(x, 0.0)
    raise NotImplementedError(name)


_DEFAULTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


class _Recurrent(OpRun):
    kind = ""

    def _run(  # type: ignore[no-untyped-def]
        self,
        X,
        W,
        R,
        B=None,
        sequence_lens=None,
        initial_h=None,
        initial_c=None,
        P=None,
        activation_alpha=None,
        activation_beta=None,
        activations=None,
        clip=None,
        direction=None,
        hidden_size=None,
        input_forget=None,
        layout=None,
        linear_before_reset=None,
    ):
        kind = self.kind
        layout = layout or 0
        if layout:
            X = np.swapaxes(X, 0, 1)
            initial_h = None if initial_h is None else np.swapaxes(initial_h, 0, 1)
            initial_c = None if initial_c is None else np.swapaxes(initial_c, 0, 1)
        steps, batch, _ = X.shape
        dirs, hidden = W.shape[0], R.shape[-1]
        gates = _GATES[kind]
        if B is None:
            B = np.zeros((dirs, 2 * gates * hidden), dtype=X.dtype)
        acts = [a.decode() if isinstance(a, bytes) else a for a in (activations or _DEFAULTS[kind] * dirs)]
        k = len(_DEFAULTS[kind])
        lens = np.full(batch, steps) if sequence_lens is None else sequence_lens
        direction = direction.decode() if isinstance(direction, bytes) else (direction or "forward")
        y = np.zeros((steps, dirs, batch, hidden), dtype=X.dtype)
        yh = np.zeros((dirs, batch, hidden), dtype=X.dtype)
        yc = np.zeros((dirs, batch, hidden), dtype=X.dtype)
        for d in range(dirs):
            reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
            a = acts[d * k : (d + 1) * k]
            w, r = W[d], R[d]
            wb, rb = B[d][: gates * hidden], B[d][gates * hidden :]
            for n in range(batch):
                h = np.zeros(hidden) if initial_h is None else initial_h[d, n].astype(np.float64)
                c = np.zeros(hidden) if initial_c is None else initial_c[d, n].astype(np.float64)
                order = range(int(lens[n]))
                for t in reversed(order) if reverse else order:
                    x = X[t, n]
                    h, c = self._cell(a, x, h, c, w, r, wb, rb, hidden, linear_before_reset or 0)
                    y[t, d, n] = h
                yh[d, n], yc[d, n] = h, c
        if layout:
            y = np.transpose(y, [2, 0, 1, 3])
            yh, yc = np.swapaxes(yh, 0, 1), np.swapaxes(yc, 0, 1)
        return (y, yh, yc) if kind == "LSTM" else (y, yh)

    def _cell(self, a, x, h, c, w, r, wb, rb, hidden, lbr):  # type: ignore[no-untyped-def]
        raise NotImplementedError


class LSTM(_Recurrent):
    kind = "LSTM"

    def _cell(self, a, x, h, c, w, r, wb, rb, hidden, lbr):  # type: ignore[no-untyped-def]
        gates = w @ x + r @ h + wb + rb
        i, o, f, g = np.split(gates, 4)
        i, o, f, g = _act(a[0], i), _act(a[0], o), _act(a[0], f), _act(a[1], g)
        c = f * c + i * g
        return o * _act(a[2], c), c


class GRU(_Recurrent):
    kind = "GRU"

    def _cell(self, a, x, h, c, w, r, wb, rb, hidden, lbr):  # type: ignore[no-untyped-def]
        wz, wr, wh = np.split(w, 3)
        rz, rr, rh = np.split(r, 3)
        wbz, wbr, wbh = np.split(wb, 3)
        rbz, rbr, rbh = np.split(rb, 3)
        z = _act(a[0], wz @ x + rz @ h + wbz + rbz)
        rg = _act(a[0], wr @ x + rr @ h + wbr + rbr)
        if lbr:
            n = _act(a[1], wh @ x + rg * (rh @ h + rbh) + wbh)
        else:
            n = _act(a[1], wh @ x + rh @ (rg * h) + rbh + wbh)
        return (1 - z) * n + z * h, c


class RNN(_Recurrent):
    kind = "RNN"

    def _cell(self, a, x, h, c, w, r, wb, rb, hidden, lbr):  # type: ignore[no-untyped-def]
        return _act(a[0], w @ x + r @ h + wb + rb), c


class Scan(OpRun):
    """Scan (axes 0) with reverse input and output directions."""

    def need_context(self) -> bool:
        return True

    def _run(  # type: ignore[no-untyped-def]
        self,
        *args: Any,
        context=None,
        body=None,
        num_scan_inputs=None,
        scan_input_axes=None,
        scan_input_directions=None,
        scan_output_axes=None,
        scan_output_directions=None,
        attributes=None,
        bindings=None,
    ):
        assert not any(scan_input_axes or []) and not any(scan_output_axes or [])
        n_state = len(args) - num_scan_inputs
        in_dirs = scan_input_directions or [0] * num_scan_inputs
        scans = [np.flip(v, 0) if dr else v for v, dr in zip(args[n_state:], in_dirs, strict=True)]
        names_in, names_out = self.body.input_names, self.body.output_names
        states = list(args[:n_state])
        results: list[list[np.ndarray]] = [[] for _ in names_out[n_state:]]
        for it in range(scans[0].shape[0]):
            inputs = dict(context or {})
            inputs.update(zip(names_in[:n_state], states, strict=True))
            inputs.update({n: v[it] for n, v in zip(names_in[n_state:], scans, strict=True)})
            outs = self._run_body(inputs, bindings=bindings)  # type: ignore[attr-defined]
            states = list(outs[:n_state])
            for k, value in enumerate(outs[n_state:]):
                results[k].append(value)
        out_dirs = scan_output_directions or [0] * len(results)
        stacked = [np.stack(r) for r in results]
        stacked = [np.flip(v, 0) if dr else v for v, dr in zip(stacked, out_dirs, strict=True)]
        return tuple(states + stacked)


class Loop(OpRun):
    """Loop whose scan outputs are stacked along a new first axis."""

    def need_context(self) -> bool:
        return True

    def _run(self, M, cond, *args: Any, context=None, body=None, attributes=None, bindings=None):  # type: ignore[no-untyped-def]
        names_in, names_out = self.body.input_names, self.body.output_names
        n = len(names_in) - 2
        k = len(names_out) - 1 - n
        states = list(args)
        scans: list[list[np.ndarray]] = [[] for _ in range(k)]
        go = True if cond is None else bool(cond)
        it = 0
        while go and (M is None or it < int(M)):
            inputs = dict(context or {})
            inputs[names_in[0]] = np.asarray(it, dtype=np.int64)
            inputs[names_in[1]] = np.asarray(go)
            inputs.update(zip(names_in[2:], states, strict=True))
            outs = self._run_body(inputs, attributes=attributes, bindings=bindings)  # type: ignore[attr-defined]
            go = bool(outs[0])
            states = list(outs[1 : 1 + n])
            for j in range(k):
                scans[j].append(outs[1 + n + j])
            it += 1
        return tuple(states + [np.stack(s) for s in scans])


STAND_IN_OPS = [LSTM, GRU, RNN, Scan, Loop]
