#!/usr/bin/env python3
"""Deterministically train and export the modelshrink sample ONNX models.

Usage::

    python sample_models/make_samples.py [--out DIR]

Writes ``digits_mlp``, ``digits_cnn`` and ``tiny_transformer`` (``.onnx`` plus a
held-out ``.npz`` input set each) into DIR (default: this file's folder).

Byte-identical output on any machine
------------------------------------
Floating-point training normally drifts between CPUs (BLAS kernels sum in a
different order, use FMA or not, libm ``exp`` differs) and SGD amplifies that
drift until the stored weights differ.  This script avoids the drift instead of
hoping that a final rounding hides it:

* every matrix product and every reduction goes through :func:`xmm` /
  :func:`xsum`, which round the operands to integers times a power of two, with
  few enough bits that every product and every partial sum is an exactly
  representable float64 integer.  The result is then exact, so it does not
  depend on the summation order, the BLAS kernel, FMA or the thread count;
* ``exp`` and ``erf`` are computed with IEEE basic operations only
  (:func:`xexp`, :func:`xerf`), never with libm or numpy's SIMD transcendentals;
* everything else is element-wise ``+ - * /``, ``sqrt``, ``max`` and rounding,
  which IEEE 754 defines bit-exactly;
* random numbers come from ``np.random.default_rng`` integer streams
  (``integers``, ``permutation``, ``random``), which are platform independent;
* ``.npz`` files are written uncompressed with fixed zip timestamps and ``.onnx``
  files are plain protobuf serialisations without maps.

onnxruntime is only used to check the exported models, never to produce bytes.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

Array = np.ndarray
Params = dict[str, Array]
Back = Callable[[Array], Array]

PRODUCER_NAME = "modelshrink-samples"
PRODUCER_VERSION = "1"
DIGITS_SEED = 20240601
MLP_SEED = 11
CNN_SEED = 12
TF_SEED = 13
TF_DATA_SEED = 14
N_DIGITS_TEST = 360
N_TF_TEST = 256
TF_TEST_LEN = 16
DIGIT_CLASSES = ",".join(str(i) for i in range(10))
TF_CLASSES = "tokens_0_15,tokens_16_31,tokens_32_47,tokens_48_63"
BN_EPS = 1e-5
LN_EPS = 1e-5

# --------------------------------------------------------------------------
# Order-independent (exact) arithmetic
# --------------------------------------------------------------------------

_MANTISSA_BITS = 53


def _ceil_log2(n: int) -> int:
    """Return ceil(log2(n)) for n >= 1 (at least 1)."""
    return max(1, (n - 1).bit_length())


def _to_ints(x: Array, bits: int) -> tuple[Array, int]:
    """Round ``x`` to float64 integers ``q`` with ``|q| <= 2**bits`` and ``x ~= q * 2**-shift``."""
    x = np.asarray(x, dtype=np.float64)
    peak = max(float(np.max(x)), -float(np.min(x))) if x.size else 0.0
    if not math.isfinite(peak):
        raise FloatingPointError("non-finite value in training")
    if peak == 0.0:
        return np.zeros_like(x), 0
    shift = bits - math.frexp(peak)[1]
    q = np.ldexp(x, shift) if abs(shift) > 1000 else x * math.ldexp(1.0, shift)  # exact power-of-two scaling
    return np.round(q, out=q), shift


def xmm(a: Array, b: Array) -> Array:
    """Matrix product (numpy ``@`` semantics) that is exact, hence bit-reproducible.

    Operands are rounded to ``bits`` significant bits relative to their largest
    entry, chosen so that ``K * 2**(2*bits) <= 2**53``: every product and every
    partial sum is then an exactly representable integer, whatever order and
    kernel BLAS uses.
    """
    bits = (_MANTISSA_BITS - _ceil_log2(a.shape[-1])) // 2
    qa, sa = _to_ints(a, bits)
    qb, sb = _to_ints(b, bits)
    return np.ldexp(qa @ qb, -(sa + sb))


def xsum(x: Array, axis: int | tuple[int, ...], keepdims: bool = False) -> Array:
    """Sum over ``axis`` exactly (after rounding to ``53 - ceil(log2 n)`` bits)."""
    axes = (axis,) if isinstance(axis, int) else axis
    count = int(np.prod([x.shape[a] for a in axes]))
    q, shift = _to_ints(x, _MANTISSA_BITS - _ceil_log2(count))
    return np.ldexp(np.sum(q, axis=axis, keepdims=keepdims), -shift)


_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00


def xexp(x: Array) -> Array:
    """``exp`` from IEEE basic operations only (Cody-Waite reduction + degree-10 Taylor, rel. err < 1e-11)."""
    x = np.clip(x, -700.0, 700.0)
    k = np.round(x * _INV_LN2)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = np.full_like(r, 1.0 / math.factorial(10))
    for i in range(9, -1, -1):
        p *= r
        p += 1.0 / math.factorial(i)
    return np.ldexp(p, k.astype(np.int64))


def xerf(x: Array, exp_neg_x2: Array | None = None) -> Array:
    """``erf`` via Abramowitz & Stegun 7.1.26 (abs. error < 1.5e-7), basic ops only.

    ``exp_neg_x2`` may pass a precomputed ``exp(-x*x)``.
    """
    s = np.where(x < 0, -1.0, 1.0)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t
    e = xexp(-(a * a)) if exp_neg_x2 is None else exp_neg_x2
    return s * (1.0 - poly * e)


def softmax(x: Array, axis: int = -1) -> Array:
    """Numerically stable softmax along ``axis``."""
    e = xexp(x - np.max(x, axis=axis, keepdims=True))
    return e / xsum(e, axis, keepdims=True)


# --------------------------------------------------------------------------
# Tiny training framework (closures that back-propagate)
# --------------------------------------------------------------------------


class Tape:
    """Records backward closures of a sequential computation."""

    def __init__(self) -> None:
        """Start an empty tape."""
        self.backs: list[Back] = []

    def push(self, out: tuple[Array, Back]) -> Array:
        """Record ``out``'s backward closure and return its value."""
        self.backs.append(out[1])
        return out[0]

    def backward(self, grad: Array) -> Array:
        """Run all recorded closures in reverse order."""
        for back in reversed(self.backs):
            grad = back(grad)
        return grad


def uniform_init(rng: np.random.Generator, shape: tuple[int, ...], limit: float) -> Array:
    """Uniform(-limit, limit) init using only the platform-independent ``random()`` stream."""
    return (rng.random(shape) * 2.0 - 1.0) * limit


def he_limit(fan_in: int) -> float:
    """He-uniform bound ``sqrt(6 / fan_in)``."""
    return math.sqrt(6.0 / fan_in)


class Adam:
    """Adam optimiser updating a parameter dict in place (bit-reproducible)."""

    def __init__(self, params: Params, lr: float, weight_decay: float = 0.0) -> None:
        """Create moment buffers for every parameter."""
        self.params = params
        self.lr = lr
        self.weight_decay = weight_decay
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.b1t, self.b2t = 1.0, 1.0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: Params) -> None:
        """Apply one update from ``grads``."""
        self.b1t *= self.beta1
        self.b2t *= self.beta2
        for name, g in grads.items():
            p = self.params[name]
            if self.weight_decay and p.ndim > 1:
                g = g + self.weight_decay * p
            self.m[name] = self.beta1 * self.m[name] + (1.0 - self.beta1) * g
            self.v[name] = self.beta2 * self.v[name] + (1.0 - self.beta2) * (g * g)
            m_hat = self.m[name] / (1.0 - self.b1t)
            v_hat = self.v[name] / (1.0 - self.b2t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def affine(x: Array, params: Params, name: str, grads: Params, trans_b: bool) -> tuple[Array, Back]:
    """``x @ W (+ b)``; ``W`` is ``(out, in)`` if ``trans_b`` (Gemm) else ``(in, out)`` (MatMul)."""
    w = params[f"{name}.weight"]
    wm = w.T if trans_b else w
    y = xmm(x, wm) + params[f"{name}.bias"]

    def back(dy: Array) -> Array:
        x2 = x.reshape(-1, x.shape[-1])
        d2 = dy.reshape(-1, dy.shape[-1])
        gw = xmm(x2.T, d2)
        grads[f"{name}.weight"] = gw.T if trans_b else gw
        grads[f"{name}.bias"] = xsum(d2, 0)
        return xmm(dy, wm.T)

    return y, back


def relu(x: Array) -> tuple[Array, Back]:
    """Rectified linear unit."""
    return np.maximum(x, 0.0), lambda dy: dy * (x > 0)


def gelu(x: Array) -> tuple[Array, Back]:
    """Exact (erf) GELU as in ONNX ``Gelu``; erf is approximated to 1.5e-7."""
    gauss = xexp(-0.5 * (x * x))
    cdf = 0.5 * (1.0 + xerf(x * (1.0 / math.sqrt(2.0)), gauss))
    pdf = gauss * (1.0 / math.sqrt(2.0 * math.pi))
    return x * cdf, lambda dy: dy * (cdf + x * pdf)


def softmax_xent_grad(logits: Array, labels: Array) -> Array:
    """Gradient of the mean cross-entropy w.r.t. ``logits``."""
    p = softmax(logits)
    p[np.arange(len(labels)), labels] -= 1.0
    return p / len(labels)


def _norm_backward(dxh: Array, xh: Array, inv: Array, axis: int) -> Array:
    """Input gradient of ``xh = (x - mean) * inv`` with statistics over ``axis``."""
    n = xh.shape[axis]
    s1 = xsum(dxh, axis, keepdims=True)
    s2 = xsum(dxh * xh, axis, keepdims=True)
    return (inv / n) * ((n * dxh - s1) - xh * s2)


def layernorm(x: Array, params: Params, name: str, grads: Params) -> tuple[Array, Back]:
    """LayerNormalization over the last axis (ONNX semantics, epsilon ``LN_EPS``)."""
    n = x.shape[-1]
    xc = x - xsum(x, -1, keepdims=True) / n
    inv = 1.0 / np.sqrt(xsum(xc * xc, -1, keepdims=True) / n + LN_EPS)
    xh = xc * inv
    g = params[f"{name}.weight"]

    def back(dy: Array) -> Array:
        grads[f"{name}.weight"] = xsum((dy * xh).reshape(-1, n), 0)
        grads[f"{name}.bias"] = xsum(dy.reshape(-1, n), 0)
        return _norm_backward(dy * g, xh, inv, -1)

    return xh * g + params[f"{name}.bias"], back


def batchnorm(
    x: Array, params: Params, name: str, grads: Params, stats: Params, mode: str
) -> tuple[Array, Back]:
    """BatchNormalization of channels-last ``x``.

    ``mode``: ``"batch"`` uses batch statistics (training), ``"fit"`` also
    stores them in ``stats``, ``"use"`` normalises with the stored statistics.
    """
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    m = x2.shape[0]
    if mode == "use":
        mean, var = stats[f"{name}.mean"], stats[f"{name}.var"]
    else:
        mean = xsum(x2, 0) / m
        var = xsum((x2 - mean) * (x2 - mean), 0) / m
        if mode == "fit":
            stats[f"{name}.mean"], stats[f"{name}.var"] = mean, var
    inv = 1.0 / np.sqrt(var + BN_EPS)
    xh = (x2 - mean) * inv
    g = params[f"{name}.scale"]

    def back(dy: Array) -> Array:
        d2 = dy.reshape(-1, c)
        grads[f"{name}.scale"] = xsum(d2 * xh, 0)
        grads[f"{name}.bias"] = xsum(d2, 0)
        return _norm_backward(d2 * g, xh, inv, 0).reshape(x.shape)

    return (xh * g + params[f"{name}.bias"]).reshape(x.shape), back


def _im2col(x: Array) -> Array:
    """Channels-last ``(N,H,W,C)`` -> ``(N*H*W, C*9)`` patches of a 3x3, pad-1 conv (ONNX order c,kh,kw)."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = np.empty((n, h, w, c, 3, 3))
    for i in range(3):
        for j in range(3):
            cols[:, :, :, :, i, j] = xp[:, i : i + h, j : j + w, :]
    return cols.reshape(n * h * w, c * 9)


def _col2im(dcols: Array, shape: tuple[int, ...]) -> Array:
    """Adjoint of :func:`_im2col`."""
    n, h, w, c = shape
    d = dcols.reshape(n, h, w, c, 3, 3)
    dxp = np.zeros((n, h + 2, w + 2, c))
    for i in range(3):
        for j in range(3):
            dxp[:, i : i + h, j : j + w, :] += d[:, :, :, :, i, j]
    return dxp[:, 1:-1, 1:-1, :]


def conv3x3(x: Array, params: Params, name: str, grads: Params) -> tuple[Array, Back]:
    """Bias-free 3x3 convolution, stride 1, pad 1, on channels-last ``x``; weight is ONNX ``(O, I, 3, 3)``."""
    w = params[f"{name}.weight"]
    wm = w.reshape(w.shape[0], -1)
    cols = _im2col(x)
    n, h, wd, _ = x.shape
    y = xmm(cols, wm.T).reshape(n, h, wd, w.shape[0])

    def back(dy: Array) -> Array:
        d2 = dy.reshape(-1, w.shape[0])
        grads[f"{name}.weight"] = xmm(d2.T, cols).reshape(w.shape)
        return _col2im(xmm(d2, wm), x.shape)

    return y, back


def maxpool2(x: Array) -> tuple[Array, Back]:
    """2x2 stride-2 max pooling of channels-last ``x`` (ties go to the first element)."""
    n, h, w, c = x.shape
    win = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)
    idx = np.argmax(win, axis=-1)
    y = np.take_along_axis(win, idx[..., None], axis=-1)[..., 0]

    def back(dy: Array) -> Array:
        dwin = np.zeros_like(win)
        np.put_along_axis(dwin, idx[..., None], dy[..., None], axis=-1)
        return dwin.reshape(n, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(x.shape)

    return y, back


def accuracy(logits: Array, labels: Array) -> float:
    """Top-1 accuracy."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Fixed train / held-out split of a labelled data set."""

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array


def digits_split() -> Split:
    """Load the 8x8 digits bundled with sklearn, scaled to [0, 1], with a fixed 360-sample held-out set."""
    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SEED).permutation(len(y))
    test, train = perm[:N_DIGITS_TEST], perm[N_DIGITS_TEST:]
    return Split(x[train], y[train], x[test], y[test])


def upsample_images(x: Array) -> Array:
    """``(N, 64)`` 8x8 digits -> ``(N, 1, 16, 16)`` by 2x nearest-neighbour upsampling (np.kron)."""
    img = x.reshape(-1, 8, 8)
    return np.kron(img, np.ones((2, 2)))[:, None, :, :]


def token_sequences(rng: np.random.Generator, n: int, length: int) -> tuple[Array, Array]:
    """Random token sequences (vocab 64) whose label is the strictly most frequent range of 16 tokens."""
    out_ids: list[Array] = []
    out_y: list[Array] = []
    have = 0
    while have < n:
        ids = rng.integers(0, 64, size=(2 * n, length), dtype=np.int64)
        counts = np.stack([np.sum(ids // 16 == r, axis=1) for r in range(4)], axis=1)
        top2 = np.sort(counts, axis=1)[:, -2:]
        keep = top2[:, 1] > top2[:, 0]
        out_ids.append(ids[keep])
        out_y.append(np.argmax(counts[keep], axis=1).astype(np.int64))
        have += int(np.sum(keep))
    return np.concatenate(out_ids)[:n], np.concatenate(out_y)[:n]


# --------------------------------------------------------------------------
# Model 1: digits MLP
# --------------------------------------------------------------------------

MLP_DIMS = (64, 256, 128, 10)


def mlp_init(rng: np.random.Generator) -> Params:
    """He-uniform weights, zero biases; Gemm layout ``(out, in)``."""
    p: Params = {}
    for i, (din, dout) in enumerate(itertools.pairwise(MLP_DIMS), start=1):
        p[f"fc{i}.weight"] = uniform_init(rng, (dout, din), he_limit(din))
        p[f"fc{i}.bias"] = np.zeros(dout)
    return p


def mlp_forward(p: Params, x: Array, grads: Params) -> tuple[Array, Tape]:
    """Logits of the MLP and the tape to back-propagate through it."""
    tape = Tape()
    h = tape.push(relu(tape.push(affine(x, p, "fc1", grads, True))))
    h = tape.push(relu(tape.push(affine(h, p, "fc2", grads, True))))
    return tape.push(affine(h, p, "fc3", grads, True)), tape


def train_mlp(data: Split) -> Params:
    """Adam, batch 64, 40 epochs, L2 1e-4 on weights."""
    rng = np.random.default_rng(MLP_SEED)
    p = mlp_init(rng)
    opt = Adam(p, lr=1e-3, weight_decay=1e-4)
    for _ in range(40):
        perm = rng.permutation(len(data.y_train))
        for s in range(0, len(perm), 64):
            idx = perm[s : s + 64]
            grads: Params = {}
            logits, tape = mlp_forward(p, data.x_train[idx], grads)
            tape.backward(softmax_xent_grad(logits, data.y_train[idx]))
            opt.step(grads)
    return p


# --------------------------------------------------------------------------
# Model 2: digits CNN
# --------------------------------------------------------------------------

CNN_CONVS = (
    ("conv1", 1, 16, "bn1"),
    ("conv2", 16, 32, "bn2"),
    ("res", 32, 32, "bn_res"),
    ("conv3", 32, 64, "bn3"),
)


def cnn_init(rng: np.random.Generator) -> Params:
    """He-uniform conv / Gemm weights, BN scale 1 and bias 0."""
    p: Params = {}
    for conv, cin, cout, bn in CNN_CONVS:
        p[f"{conv}.weight"] = uniform_init(rng, (cout, cin, 3, 3), he_limit(cin * 9))
        p[f"{bn}.scale"] = np.ones(cout)
        p[f"{bn}.bias"] = np.zeros(cout)
    p["fc1.weight"] = uniform_init(rng, (64, 1024), he_limit(1024))
    p["fc1.bias"] = np.zeros(64)
    p["fc2.weight"] = uniform_init(rng, (10, 64), he_limit(64))
    p["fc2.bias"] = np.zeros(10)
    return p


def _conv_bn(
    x: Array, p: Params, conv: str, bn: str, grads: Params, stats: Params, mode: str, tape: Tape
) -> Array:
    """Conv -> BatchNormalization, recorded on ``tape``."""
    y = tape.push(conv3x3(x, p, conv, grads))
    return tape.push(batchnorm(y, p, bn, grads, stats, mode))


def _residual(x: Array, p: Params, grads: Params, stats: Params, mode: str) -> tuple[Array, Back]:
    """``Relu(x + BN(Conv(x)))``: the tied Add group of the CNN."""
    sub = Tape()
    s = x + _conv_bn(x, p, "res", "bn_res", grads, stats, mode, sub)
    y, relu_back = relu(s)

    def back(dy: Array) -> Array:
        ds = relu_back(dy)
        return ds + sub.backward(ds)

    return y, back


def cnn_forward(p: Params, image: Array, grads: Params, stats: Params, mode: str) -> tuple[Array, Tape]:
    """Logits of the CNN for NCHW ``image`` (computed channels-last internally)."""
    tape = Tape()
    x = image.transpose(0, 2, 3, 1)
    x = tape.push(maxpool2(tape.push(relu(_conv_bn(x, p, "conv1", "bn1", grads, stats, mode, tape)))))
    x = tape.push(maxpool2(tape.push(relu(_conv_bn(x, p, "conv2", "bn2", grads, stats, mode, tape)))))
    x = tape.push(_residual(x, p, grads, stats, mode))
    x = tape.push(relu(_conv_bn(x, p, "conv3", "bn3", grads, stats, mode, tape)))
    shape = x.shape
    x = tape.push(
        (
            x.transpose(0, 3, 1, 2).reshape(len(x), -1),
            lambda d: d.reshape(shape[0], shape[3], shape[1], shape[2]).transpose(0, 2, 3, 1),
        )
    )
    x = tape.push(relu(tape.push(affine(x, p, "fc1", grads, True))))
    return tape.push(affine(x, p, "fc2", grads, True)), tape


def train_cnn(data: Split) -> tuple[Params, Params]:
    """Adam, batch 64, 10 epochs (lr halved for the last 3); then fit BN running stats on the train set."""
    rng = np.random.default_rng(CNN_SEED)
    p = cnn_init(rng)
    opt = Adam(p, lr=2e-3, weight_decay=1e-4)
    images = upsample_images(data.x_train)
    for epoch in range(10):
        if epoch == 7:
            opt.lr *= 0.5
        perm = rng.permutation(len(data.y_train))
        for s in range(0, len(perm), 64):
            idx = perm[s : s + 64]
            grads: Params = {}
            logits, tape = cnn_forward(p, images[idx], grads, {}, "batch")
            tape.backward(softmax_xent_grad(logits, data.y_train[idx]))
            opt.step(grads)
    stats: Params = {}
    cnn_forward(p, images, {}, stats, "fit")
    return p, stats


# --------------------------------------------------------------------------
# Model 3: tiny transformer
# --------------------------------------------------------------------------

TF_VOCAB, TF_MAX_LEN, TF_DIM, TF_HEADS, TF_FF, TF_BLOCKS, TF_CLASSES_N = 64, 32, 64, 4, 256, 2, 4
TF_STEPS, TF_BATCH, TF_LR, TF_MIN_TRAIN_LEN = 400, 32, 2e-3, 8


def tf_init(rng: np.random.Generator) -> Params:
    """Embeddings U(+-0.1), MatMul weights ``(in, out)`` Xavier-uniform, LN weight 1, biases 0."""
    p: Params = {
        "tok_emb.weight": uniform_init(rng, (TF_VOCAB, TF_DIM), 0.1),
        "pos_emb.weight": uniform_init(rng, (TF_MAX_LEN, TF_DIM), 0.1),
    }

    def lin(name: str, din: int, dout: int) -> None:
        p[f"{name}.weight"] = uniform_init(rng, (din, dout), math.sqrt(6.0 / (din + dout)))
        p[f"{name}.bias"] = np.zeros(dout)

    def ln(name: str) -> None:
        p[f"{name}.weight"] = np.ones(TF_DIM)
        p[f"{name}.bias"] = np.zeros(TF_DIM)

    for b in range(TF_BLOCKS):
        ln(f"blocks.{b}.ln1")
        for proj in ("q", "k", "v", "o"):
            lin(f"blocks.{b}.attn.{proj}", TF_DIM, TF_DIM)
        ln(f"blocks.{b}.ln2")
        lin(f"blocks.{b}.ffn.fc1", TF_DIM, TF_FF)
        lin(f"blocks.{b}.ffn.fc2", TF_FF, TF_DIM)
    ln("ln_f")
    p["head.weight"] = uniform_init(rng, (TF_CLASSES_N, TF_DIM), math.sqrt(6.0 / (TF_DIM + TF_CLASSES_N)))
    p["head.bias"] = np.zeros(TF_CLASSES_N)
    return p


def attention(h: Array, p: Params, name: str, grads: Params) -> tuple[Array, Back]:
    """Multi-head self-attention (no mask) with output projection."""
    b, s, d = h.shape
    dh = d // TF_HEADS
    scale = 1.0 / math.sqrt(dh)
    q, q_back = affine(h, p, f"{name}.q", grads, False)
    k, k_back = affine(h, p, f"{name}.k", grads, False)
    v, v_back = affine(h, p, f"{name}.v", grads, False)

    def split(t: Array) -> Array:
        return t.reshape(b, s, TF_HEADS, dh).transpose(0, 2, 1, 3)

    def merge(t: Array) -> Array:
        return t.transpose(0, 2, 1, 3).reshape(b, s, d)

    qh, kh, vh = split(q), split(k), split(v)
    probs = softmax(xmm(qh, kh.transpose(0, 1, 3, 2)) * scale)
    out, o_back = affine(merge(xmm(probs, vh)), p, f"{name}.o", grads, False)

    def back(dy: Array) -> Array:
        dctx = split(o_back(dy))
        dv = xmm(probs.transpose(0, 1, 3, 2), dctx)
        dp = xmm(dctx, vh.transpose(0, 1, 3, 2))
        ds = probs * (dp - xsum(dp * probs, -1, keepdims=True)) * scale
        dq = xmm(ds, kh)
        dk = xmm(ds.transpose(0, 1, 3, 2), qh)
        return q_back(merge(dq)) + k_back(merge(dk)) + v_back(merge(dv))

    return out, back


def _pre_ln_residual(x: Array, fn: Callable[[Array, Tape], Array]) -> tuple[Array, Back]:
    """``x + fn(x)`` where ``fn`` records its own tape."""
    sub = Tape()
    y = x + fn(x, sub)
    return y, lambda dy: dy + sub.backward(dy)


def tf_forward(p: Params, ids: Array, grads: Params) -> tuple[Array, Array, Tape]:
    """``(logits, pooled, tape)`` for int token ids ``(B, S)``."""
    b, s = ids.shape
    onehot = (ids.reshape(-1, 1) == np.arange(TF_VOCAB)).astype(np.float64)
    x = p["tok_emb.weight"][ids] + p["pos_emb.weight"][:s]
    tape = Tape()

    def embed_back(dx: Array) -> Array:
        grads["tok_emb.weight"] = xmm(onehot.T, dx.reshape(-1, TF_DIM))
        pos = np.zeros((TF_MAX_LEN, TF_DIM))
        pos[:s] = xsum(dx, 0)
        grads["pos_emb.weight"] = pos
        return dx

    tape.backs.append(embed_back)
    for blk in range(TF_BLOCKS):
        name = f"blocks.{blk}"

        def attn_fn(t: Array, sub: Tape, name: str = name) -> Array:
            return sub.push(
                attention(sub.push(layernorm(t, p, f"{name}.ln1", grads)), p, f"{name}.attn", grads)
            )

        def ffn_fn(t: Array, sub: Tape, name: str = name) -> Array:
            h = sub.push(layernorm(t, p, f"{name}.ln2", grads))
            h = sub.push(gelu(sub.push(affine(h, p, f"{name}.ffn.fc1", grads, False))))
            return sub.push(affine(h, p, f"{name}.ffn.fc2", grads, False))

        x = tape.push(_pre_ln_residual(x, attn_fn))
        x = tape.push(_pre_ln_residual(x, ffn_fn))
    x = tape.push(layernorm(x, p, "ln_f", grads))
    pooled = tape.push((xsum(x, 1) / s, lambda d: np.broadcast_to(d[:, None, :] / s, (b, s, TF_DIM))))
    return tape.push(affine(pooled, p, "head", grads, True)), pooled, tape


def train_transformer() -> Params:
    """Adam on fresh synthetic batches of 64 sequences with random length 8..32 per step."""
    rng = np.random.default_rng(TF_SEED)
    p = tf_init(rng)
    opt = Adam(p, lr=TF_LR, weight_decay=1e-4)
    for step in range(TF_STEPS):
        if step == TF_STEPS * 3 // 4:
            opt.lr *= 0.25
        ids, labels = token_sequences(rng, TF_BATCH, int(rng.integers(TF_MIN_TRAIN_LEN, TF_MAX_LEN + 1)))
        grads: Params = {}
        logits, _, tape = tf_forward(p, ids, grads)
        tape.backward(softmax_xent_grad(logits, labels))
        opt.step(grads)
    return p


# --------------------------------------------------------------------------
# ONNX export helpers
# --------------------------------------------------------------------------


def f32(x: Array) -> Array:
    """Cast to little-endian float32 (round-to-nearest, deterministic)."""
    return np.asarray(x, dtype="<f4")


def init(name: str, x: Array) -> onnx.TensorProto:
    """float32 initializer."""
    return numpy_helper.from_array(f32(x), name)


def i64(name: str, values: list[int]) -> onnx.TensorProto:
    """int64 1-D initializer."""
    return numpy_helper.from_array(np.asarray(values, dtype="<i8"), name)


def finish_model(
    graph: onnx.GraphProto, opset: int, ir_version: int, doc: str, metadata: dict[str, str]
) -> onnx.ModelProto:
    """Wrap ``graph`` into a model with fixed producer info, IR version and metadata."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        doc_string=doc,
        model_version=1,
    )
    model.ir_version = ir_version
    helper.set_model_props(model, metadata)
    return model


def export_mlp(p: Params) -> onnx.ModelProto:
    """Gemm/Relu MLP; the last bias lives in a ``Constant`` node."""
    inits = [init(f"fc{i}.{k}", p[f"fc{i}.{k}"]) for i in (1, 2) for k in ("weight", "bias")]
    inits.append(init("fc3.weight", p["fc3.weight"]))
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("Gemm", ["relu1_out", "fc2.weight", "fc2.bias"], ["fc2_out"], name="fc2", transB=1),
        helper.make_node("Relu", ["fc2_out"], ["relu2_out"], name="relu2"),
        helper.make_node(
            "Constant",
            [],
            ["fc3.bias"],
            name="fc3_bias_const",
            value=init("fc3.bias", p["fc3.bias"]),
            doc_string="Last-layer bias stored as a Constant node rather than an initializer.",
        ),
        helper.make_node("Gemm", ["relu2_out", "fc3.weight", "fc3.bias"], ["logits"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
        doc_string="MLP 64-256-128-10 (Gemm transB=1 + Relu) on 8x8 digits scaled to [0, 1].",
    )
    return finish_model(
        graph, 13, 7, "modelshrink sample: digits MLP classifier.", {"classes": DIGIT_CLASSES}
    )


def export_cnn(p: Params, stats: Params) -> onnx.ModelProto:
    """Conv/BN/Relu/MaxPool CNN with one residual Add; BN kept unfolded."""
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv_bn(x: str, conv: str, bn: str) -> str:
        inits.append(init(f"{conv}.weight", p[f"{conv}.weight"]))
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{conv}.weight"],
                [f"{conv}_out"],
                name=conv,
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
        )
        bn_in = [f"{bn}.scale", f"{bn}.bias", f"{bn}.mean", f"{bn}.var"]
        inits.extend(init(n, p[n] if n in p else stats[n]) for n in bn_in)
        nodes.append(
            helper.make_node(
                "BatchNormalization", [f"{conv}_out", *bn_in], [f"{bn}_out"], name=bn, epsilon=BN_EPS
            )
        )
        return f"{bn}_out"

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    x = node("MaxPool", [node("Relu", [conv_bn("image", "conv1", "bn1")], "relu1")], "pool1", **pool)
    x = node("MaxPool", [node("Relu", [conv_bn(x, "conv2", "bn2")], "relu2")], "pool2", **pool)
    x = node("Relu", [node("Add", [x, conv_bn(x, "res", "bn_res")], "res_add")], "res_relu")
    x = node("Flatten", [node("Relu", [conv_bn(x, "conv3", "bn3")], "relu3")], "flatten", axis=1)
    inits.extend(init(n, p[n]) for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    x = node("Relu", [node("Gemm", [x, "fc1.weight", "fc1.bias"], "fc1", transB=1)], "relu4")
    nodes.append(helper.make_node("Gemm", [x, "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1))
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
        doc_string="3-stage Conv-BN-Relu CNN with a residual 32->32 conv block, on 16x16 upsampled digits.",
    )
    return finish_model(
        graph, 17, 8, "modelshrink sample: digits CNN classifier.", {"classes": DIGIT_CLASSES}
    )


class _GraphBuilder:
    """Collects nodes and initializers with unique, deterministic names."""

    def __init__(self) -> None:
        """Start an empty graph."""
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def op(
        self, op: str, inputs: list[str], name: str, outputs: list[str] | None = None, **attrs: Any
    ) -> str:
        """Add a node; its (first) output is ``<name>_out`` unless ``outputs`` is given."""
        outs = outputs or [f"{name}_out"]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0]

    def const(self, tensor: onnx.TensorProto) -> str:
        """Add an initializer and return its name."""
        self.inits.append(tensor)
        return tensor.name


def export_transformer(p: Params) -> onnx.ModelProto:
    """Pre-LN 2-block encoder; outputs ``logits`` and mean-pooled ``pooled``."""
    g = _GraphBuilder()
    for name in sorted(p):
        g.const(init(name, p[name]))
    heads_shape = g.const(i64("shape_heads", [0, 0, TF_HEADS, TF_DIM // TF_HEADS]))
    model_shape = g.const(i64("shape_model", [0, 0, TF_DIM]))
    zero = g.const(i64("const_zero", [0]))
    seq_axis = g.const(i64("const_axis1", [1]))
    scale = g.const(
        numpy_helper.from_array(np.asarray(1.0 / math.sqrt(TF_DIM // TF_HEADS), "<f4"), "attn_scale")
    )

    def linear(x: str, name: str) -> str:
        mm = g.op("MatMul", [x, f"{name}.weight"], f"{name}_matmul")
        return g.op("Add", [mm, f"{name}.bias"], f"{name}_add")

    def layer_norm(x: str, name: str) -> str:
        return g.op(
            "LayerNormalization", [x, f"{name}.weight", f"{name}.bias"], name, axis=-1, epsilon=LN_EPS
        )

    def heads(x: str, name: str, perm: list[int]) -> str:
        return g.op(
            "Transpose",
            [g.op("Reshape", [x, heads_shape], f"{name}_reshape")],
            f"{name}_transpose",
            perm=perm,
        )

    tok = g.op("Gather", ["tok_emb.weight", "input_ids"], "tok_emb_gather")
    seq_len = g.op("Shape", ["input_ids"], "seq_len", start=1, end=2)
    pos = g.op("Slice", ["pos_emb.weight", zero, seq_len, zero], "pos_emb_slice")
    x = g.op("Add", [tok, pos], "embed_add")
    for blk in range(TF_BLOCKS):
        n = f"blocks.{blk}"
        h = layer_norm(x, f"{n}.ln1")
        q = heads(linear(h, f"{n}.attn.q"), f"{n}.attn.q", [0, 2, 1, 3])
        k = heads(linear(h, f"{n}.attn.k"), f"{n}.attn.k", [0, 2, 3, 1])
        v = heads(linear(h, f"{n}.attn.v"), f"{n}.attn.v", [0, 2, 1, 3])
        scores = g.op("Mul", [g.op("MatMul", [q, k], f"{n}.attn.qk"), scale], f"{n}.attn.scale")
        probs = g.op("Softmax", [scores], f"{n}.attn.softmax", axis=-1)
        ctx = g.op(
            "Transpose",
            [g.op("MatMul", [probs, v], f"{n}.attn.pv")],
            f"{n}.attn.ctx_transpose",
            perm=[0, 2, 1, 3],
        )
        ctx = g.op("Reshape", [ctx, model_shape], f"{n}.attn.ctx_reshape")
        x = g.op("Add", [x, linear(ctx, f"{n}.attn.o")], f"{n}.attn_residual")
        h = g.op("Gelu", [linear(layer_norm(x, f"{n}.ln2"), f"{n}.ffn.fc1")], f"{n}.ffn.gelu")
        x = g.op("Add", [x, linear(h, f"{n}.ffn.fc2")], f"{n}.ffn_residual")
    x = layer_norm(x, "ln_f")
    g.op("ReduceMean", [x, seq_axis], "mean_pool", outputs=["pooled"], keepdims=0)
    g.op("Gemm", ["pooled", "head.weight", "head.bias"], "head", outputs=["logits"], transB=1)
    graph = helper.make_graph(
        g.nodes,
        "tiny_transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", TF_CLASSES_N]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", TF_DIM]),
        ],
        initializer=g.inits,
        doc_string=(
            "Pre-LN transformer encoder: vocab 64, d_model 64, 4 heads, FFN 256 (Gelu), 2 blocks, "
            "learned positions (max 32), mean pooling, 4-way classifier."
        ),
    )
    meta = {"classes": TF_CLASSES}
    return finish_model(graph, 20, 9, "modelshrink sample: tiny transformer sequence classifier.", meta)


# --------------------------------------------------------------------------
# Output files and checks
# --------------------------------------------------------------------------


def write_npz(path: Path, arrays: dict[str, Array]) -> None:
    """Uncompressed ``.npz`` with fixed timestamps / attributes, so bytes are reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            payload = io.BytesIO()
            np.lib.format.write_array(payload, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, payload.getvalue())
    path.write_bytes(buf.getvalue())


def run_onnx(model: onnx.ModelProto, feeds: dict[str, Array]) -> list[Array]:
    """Check ``model`` fully and run it with onnxruntime on CPU."""
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


@dataclass(frozen=True)
class Sample:
    """One exported model with its held-out inputs and the reference (numpy) outputs."""

    name: str
    model: onnx.ModelProto
    inputs: dict[str, Array]
    labels: Array
    reference: list[Array]
    min_accuracy: float


def check_and_write(sample: Sample, out_dir: Path) -> str:
    """Verify ORT accuracy and agreement with the training code, write files, return a summary line."""
    outputs = run_onnx(sample.model, sample.inputs)
    for got, want in zip(outputs, sample.reference, strict=True):
        diff = float(np.max(np.abs(got - want)))
        assert diff < 1e-3, f"{sample.name}: onnxruntime differs from training code by {diff}"
    acc = accuracy(outputs[0], sample.labels)
    assert acc >= sample.min_accuracy, f"{sample.name}: accuracy {acc:.4f} < {sample.min_accuracy}"
    onnx_path = out_dir / f"{sample.name}.onnx"
    onnx_path.write_bytes(sample.model.SerializeToString())
    npz_path = out_dir / f"{sample.name}.npz"
    write_npz(npz_path, {**sample.inputs, "labels": sample.labels.astype("<i8")})
    n = len(sample.labels)
    return (
        f"{sample.name:17s} held-out accuracy {acc:.4f} (N={n})  "
        f"{onnx_path.stat().st_size / 1024:.0f} KiB onnx, {npz_path.stat().st_size / 1024:.0f} KiB npz"
    )


def build_mlp(data: Split) -> Sample:
    """Train and export the MLP."""
    p = train_mlp(data)
    ref, _ = mlp_forward(p, data.x_test, {})
    return Sample("digits_mlp", export_mlp(p), {"input": f32(data.x_test)}, data.y_test, [ref], 0.93)


def build_cnn(data: Split) -> Sample:
    """Train and export the CNN."""
    p, stats = train_cnn(data)
    images = upsample_images(data.x_test)
    ref, _ = cnn_forward(p, images, {}, stats, "use")
    return Sample("digits_cnn", export_cnn(p, stats), {"image": f32(images)}, data.y_test, [ref], 0.93)


def build_transformer() -> Sample:
    """Train and export the transformer; also check a batch of length-32 sequences."""
    p = train_transformer()
    model = export_transformer(p)
    long_ids, _ = token_sequences(np.random.default_rng(TF_DATA_SEED + 1), 8, TF_MAX_LEN)
    long_ref, long_pooled, _ = tf_forward(p, long_ids, {})
    for got, want in zip(run_onnx(model, {"input_ids": long_ids}), (long_ref, long_pooled), strict=True):
        assert float(np.max(np.abs(got - want))) < 1e-3, "tiny_transformer: mismatch at seq=32"
    ids, labels = token_sequences(np.random.default_rng(TF_DATA_SEED), N_TF_TEST, TF_TEST_LEN)
    logits, pooled, _ = tf_forward(p, ids, {})
    return Sample("tiny_transformer", model, {"input_ids": ids.astype("<i8")}, labels, [logits, pooled], 0.9)


def main(argv: list[str] | None = None) -> None:
    """Train, export, check and write all sample models."""
    parser = argparse.ArgumentParser(description="Train and write the modelshrink sample models.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    np.seterr(over="raise", invalid="raise", divide="raise")
    data = digits_split()
    for build in (lambda: build_mlp(data), lambda: build_cnn(data), build_transformer):
        start = time.perf_counter()
        line = check_and_write(build(), args.out)
        print(f"{line}  [{time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
    main()
