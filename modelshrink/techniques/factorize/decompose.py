"""Truncated SVD of a layer's matrix, plain or whitened by the layer's input activations.

Plain: ``S = U Σ Vᵀ``, ``P = U_r Σ_r^½``, ``Q = Σ_r^½ V_rᵀ`` (singular values split as square
roots on both sides, so both factors have the same scale).

Data-aware: a layer computes ``X S`` (input side = rows of ``S``) or ``X Sᵀ`` (input side =
columns) on activations ``X``. With ``G = XᵀX + λI`` (``λ`` = 1% of the mean diagonal) and
its symmetric square root ``R = G^½`` we have ``‖X E‖_F = ‖R E‖_F`` for any error ``E``, so
the rank-r factors minimising the output error on the data are the truncated SVD of the
whitened matrix ``R S = U Σ Vᵀ`` mapped back: ``P = R⁻¹ U_r Σ_r^½``, ``Q = Σ_r^½ V_rᵀ`` (input
side = columns: SVD of ``S R``, ``Q = Σ_r^½ V_rᵀ R⁻¹``). For an embedding table the input is
one-hot, so ``G`` is diagonal (token counts) and ``R`` scales each row by ``√count``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from modelshrink.techniques.factorize.ranks import Spectrum

__all__ = ["DAMPING", "Decomposition", "Gram", "decompose"]

DAMPING = 0.01


@dataclass(frozen=True, eq=False)
class Gram:
    """Input statistics ``XᵀX`` of a layer: a full matrix, or its diagonal for one-hot inputs.

    Attributes:
        side: Which side of ``S`` the input multiplies (``rows`` or ``cols``).
        matrix: ``XᵀX`` (full), or None.
        diagonal: ``diag(XᵀX)`` when the inputs are one-hot (embedding lookups), or None.
        rows_seen: Number of input vectors accumulated.
    """

    side: Literal["rows", "cols"]
    matrix: np.ndarray | None
    diagonal: np.ndarray | None
    rows_seen: int


@dataclass(frozen=True, eq=False)
class Decomposition:
    """A layer's SVD, ready to give factors at any rank.

    Attributes:
        spectrum: Singular values of the (possibly whitened) matrix.
        method: ``svd`` or ``data-aware``.
        u: Left singular vectors.
        vt: Right singular vectors (transposed).
        left: ``R⁻¹`` applied to ``P`` (input side = rows), full or diagonal, or None.
        right: ``R⁻¹`` applied to ``Q`` (input side = columns), full or diagonal, or None.
    """

    spectrum: Spectrum
    method: str
    u: np.ndarray
    vt: np.ndarray
    left: np.ndarray | None = None
    right: np.ndarray | None = None

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(P, Q)`` with ``P Q`` the chosen rank-``rank`` approximation of ``S``."""
        root = np.sqrt(self.spectrum.values[:rank])
        p = self.u[:, :rank] * root
        q = root[:, None] * self.vt[:rank]
        if self.left is not None:
            p = self.left[:, None] * p if self.left.ndim == 1 else self.left @ p
        if self.right is not None:
            q = q * self.right[None, :] if self.right.ndim == 1 else q @ self.right
        return p, q


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``matrix = U diag(s) Vᵀ`` (float64, ``s`` descending) through the Gram matrix.

    With ``A`` the matrix oriented short side first (``k x N``, ``k <= N``): the eigenvectors of
    ``A Aᵀ`` are ``U`` and its eigenvalues ``s²``; then ``Vᵀ = diag(1/s) Uᵀ A``. This is 5-7x
    faster than LAPACK's SVD on layer-shaped matrices (1024 x 4096: 0.2 s against 1.4 s), which
    is most of factorize's time on big models. ``s`` loses relative accuracy only below about
    ``1e-8 s[0]`` (energy shares are unaffected), and any truncation ``U_r diag(s_r) V_rᵀ =
    U_r U_rᵀ A`` is an exact orthogonal projection whatever the accuracy of ``s``, so full rank
    reproduces the matrix. Rows of ``Vᵀ`` whose ``s`` is at rounding level are zero (their
    component of ``A`` is below rounding too). Falls back to LAPACK's SVD if ``eigh`` fails.
    """
    a = matrix.astype(np.float64, copy=False)
    wide = a.shape[0] <= a.shape[1]
    short = a if wide else a.T
    try:
        evals, evecs = np.linalg.eigh(short @ short.T)
    except np.linalg.LinAlgError:
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        return u, s, vt
    evals, u = evals[::-1], evecs[:, ::-1]
    s = np.sqrt(np.maximum(evals, 0.0))
    vt = u.T @ short
    floor = s[0] * np.finfo(np.float64).eps * max(short.shape) if s.size else 0.0
    usable = s > floor
    vt[usable] /= s[usable, None]
    vt[~usable] = 0.0
    if wide:
        return np.ascontiguousarray(u), s, vt
    return np.ascontiguousarray(vt.T), s, np.ascontiguousarray(u.T)


def _roots(gram: Gram) -> tuple[np.ndarray, np.ndarray]:
    """``R`` and ``R⁻¹`` (vectors for a diagonal Gram) with damping."""
    if gram.diagonal is not None:
        d = gram.diagonal.astype(np.float64)
        lam = DAMPING * float(d.mean()) if d.mean() > 0 else 1.0
        root = np.sqrt(d + lam)
        return root, 1.0 / root
    assert gram.matrix is not None
    g = gram.matrix.astype(np.float64)
    g = (g + g.T) / 2
    mean_diag = float(np.trace(g)) / g.shape[0]
    lam = DAMPING * mean_diag if mean_diag > 0 else 1.0
    evals, evecs = np.linalg.eigh(g + lam * np.eye(g.shape[0]))
    evals = np.maximum(evals, lam * 1e-6)
    root = (evecs * np.sqrt(evals)) @ evecs.T
    inv = (evecs / np.sqrt(evals)) @ evecs.T
    return root, inv


def decompose(matrix: np.ndarray, gram: Gram | None) -> Decomposition:
    """SVD of ``matrix`` (float64), whitened by ``gram`` when given."""
    rows, cols = matrix.shape
    if gram is not None and not all(
        np.isfinite(a).all() for a in (gram.matrix, gram.diagonal) if a is not None
    ):
        gram = None  # non-finite activations (NaN/inf upstream): plain SVD of the weight
    if gram is None:
        u, s, vt = _svd(matrix)
        return Decomposition(Spectrum(s, rows, cols), "svd", u, vt)
    root, inv = _roots(gram)
    if gram.side == "rows":
        whitened = root[:, None] * matrix if root.ndim == 1 else root @ matrix
        u, s, vt = _svd(whitened)
        return Decomposition(Spectrum(s, rows, cols), "data-aware", u, vt, left=inv)
    whitened = matrix * root[None, :] if root.ndim == 1 else matrix @ root
    u, s, vt = _svd(whitened)
    return Decomposition(Spectrum(s, rows, cols), "data-aware", u, vt, right=inv)
