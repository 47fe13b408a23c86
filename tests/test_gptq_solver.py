"""The fast paths of GPTQ's solver give what the plain formulas give.

The column loop spreads errors in groups and lazy blocks, the inverse factor is built by
blocks, and the scale refit scores rows in closed form: each is checked here against the
textbook version on random rows, so a speed change cannot silently change the answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from modelshrink.techniques import layerwise
from modelshrink.techniques.quantize import gptq as solvers
from modelshrink.techniques.quantize.lowbit import Grid, Layout


def _hessian(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * k, k))
    x[:, :3] *= 20  # outlier channels
    return x.T @ x


@pytest.mark.parametrize("width", [37, 600])  # a leaf, and three levels of blocks
def test_inverse_factor_in_any_order(width: int) -> None:
    h = _hessian(width)
    order = np.random.default_rng(1).permutation(width)
    damped, upper, used = layerwise.inverse_factor(h, 0.01, order)
    assert used == 0.01
    assert np.allclose(upper, np.triu(upper)) and (np.diag(upper) > 0).all()
    permuted = damped[np.ix_(order, order)]
    np.testing.assert_allclose(upper.T @ upper @ permuted, np.eye(width), atol=1e-8)
    # the textbook route: the upper Cholesky factor of the inverse
    reference = np.linalg.cholesky(np.linalg.inv(permuted)).T
    np.testing.assert_allclose(upper, reference, rtol=1e-8, atol=1e-10)


def _plain_column_loop(
    target: np.ndarray, upper: np.ndarray, per_value: np.ndarray, grid: Grid
) -> np.ndarray:
    w = target.copy()
    codes = np.empty(w.shape, np.int8)
    for j in range(w.shape[1]):
        q = np.clip(np.rint(w[:, j] / per_value[:, j] - grid.offset), grid.lo, grid.hi)
        codes[:, j] = q
        err = (w[:, j] - (q + grid.offset) * per_value[:, j]) / upper[j, j]
        w[:, j + 1 :] -= np.outer(err, upper[j, j + 1 :])
    return codes


@pytest.mark.parametrize("bits", [3, 4])
def test_column_loop_matches_the_plain_one(bits: int) -> None:
    rng = np.random.default_rng(2)
    c, k = 24, 300  # several lazy blocks and groups, ragged ends
    rows = rng.standard_normal((c, k))
    h = _hessian(k, 3)
    order = np.argsort(-np.diag(h), kind="stable")
    _, upper, _ = layerwise.inverse_factor(h, 0.01, order)
    grid = Grid(bits)
    start = solvers.rtn(rows, grid, 32, np.dtype(np.float32))
    per_value = Layout(rows.shape, 0, 32).expand(start.scales.astype(np.float64))
    got = solvers._round_columns(rows, upper, per_value, grid, order)
    plain = _plain_column_loop(rows[:, order], upper, per_value[:, order], grid)
    want = np.empty_like(plain)
    want[:, order] = plain
    assert (got == want).mean() > 0.999  # float order of the sums may flip a tie
    assert solvers.output_error(solvers.Fit(got, start.scales).values(grid, 32) - rows, h).sum() <= 1.001 * (
        solvers.output_error(solvers.Fit(want, start.scales).values(grid, 32) - rows, h).sum()
    )


@pytest.mark.parametrize("block", [None, 16])
def test_refit_scores_rows_as_the_output_error_does(block: int | None) -> None:
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((10, 64))
    h = _hessian(64, 5)
    grid = Grid(3)
    fit = solvers.rtn(rows, grid, block, np.dtype(np.float32))
    scales, improved = solvers._refit(rows, fit, h, grid, block, np.dtype(np.float32))
    before = solvers.output_error(fit.values(grid, block) - rows, h)
    after = solvers.output_error(solvers.Fit(fit.codes, scales).values(grid, block) - rows, h)
    assert improved == int((scales != fit.scales).any(axis=1).sum()) > 0
    assert (after <= before * (1 + 1e-9)).all()
    changed = (scales != fit.scales).any(axis=1)
    assert (after[changed] < before[changed]).all()
