"""The second-moment sketch (cpp/llqx_sketch.cpp) and its Nyström reading (imatrix.py) against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from llqx import _core
from llqx.imatrix import Imatrix, ImatrixEntry
from llqx.imatrix_sketch import nystrom_directions


def _stream(rng: np.random.Generator, n_rows: int, n: int, spectrum: list[float], noise: float) -> np.ndarray:
    """Rows with a few strong directions (a mean along the first, like a massive activation) plus isotropic
    noise, float32."""
    basis, _ = np.linalg.qr(rng.standard_normal((n, len(spectrum))))
    coef = rng.standard_normal((n_rows, len(spectrum))) * np.sqrt(spectrum)
    coef[:, 0] += 3.0 * np.sqrt(spectrum[0])
    return (coef @ basis.T + noise * rng.standard_normal((n_rows, n))).astype(np.float32)


def _moments(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64.T @ x64


def test_sketch_is_y_equals_m_omega() -> None:
    """Y = Σ x·(Ωᵀx) = M·Ω, row by row in float: numpy's product of the same rows and the same Ω."""
    rng = np.random.default_rng(0)
    x = _stream(rng, 777, 96, [50.0, 20.0, 9.0], noise=0.5)
    omega_t = _core.sketch_test_matrix(96, 16)
    assert omega_t.shape == (16, 96)
    assert set(np.unique(omega_t)) == {-1.0, 1.0}
    yt = _core.sketch_rows(x, 16)
    ref = (_moments(x) @ omega_t.T.astype(np.float64)).T
    np.testing.assert_allclose(yt, ref, atol=1e-5 * np.abs(ref).max())
    # deterministic, and the same however the rows are cut into calls (it is a sum: two halves add up)
    assert yt.tobytes() == _core.sketch_rows(x.copy(), 16).tobytes()
    halves = _core.sketch_rows(x[:300], 16).astype(np.float64) + _core.sketch_rows(x[300:], 16)
    np.testing.assert_allclose(halves, yt, atol=1e-5 * np.abs(ref).max())
    # a smaller Ω is a corner of a larger one: its entries depend on their row and column only
    np.testing.assert_array_equal(_core.sketch_test_matrix(40, 4), omega_t[:4, :40])
    with pytest.raises(_core.InputError):
        _core.sketch_rows(x, 0)
    with pytest.raises(_core.InputError):
        _core.sketch_rows(x[0], 16)


def test_nystrom_exact_at_low_rank_and_below_the_moments() -> None:
    rng = np.random.default_rng(1)
    # rank 5 ≤ 8 directions: recovered exactly
    x = _stream(rng, 500, 96, [50.0, 20.0, 9.0, 4.0, 1.0], noise=0.0)
    m = _moments(x)
    a = nystrom_directions(_core.sketch_rows(x, 16), 8)
    np.testing.assert_allclose(a.T @ a, m, atol=1e-3 * np.abs(m).max())
    # full rank: Σ a aᵀ stays below M and finds numpy's leading eigenvectors; their energies it underestimates
    # by a part of the rest's (here a few tenths of a percent, then about 7% and 25%): that stays on the diagonal
    n = 128
    x = _stream(rng, 3000, n, [400.0, 100.0, 30.0], noise=1.0)
    m = _moments(x)
    a = nystrom_directions(_core.sketch_rows(x, 16), 8)
    lam, vecs = np.linalg.eigh(m)
    lam, vecs = lam[::-1], vecs[:, ::-1]
    assert np.linalg.eigvalsh(m - a.T @ a)[0] >= -1e-4 * lam[0]
    for i in range(3):
        energy = float(a[i] @ a[i])
        assert abs(a[i] @ vecs[:, i]) / np.sqrt(energy) > 0.99, i
        assert 0.6 * lam[i] <= energy <= lam[i] * (1 + 1e-6), i
    assert not np.any(nystrom_directions(np.zeros((16, n), np.float32), 8))


def test_merge_adds_sketches_and_second_moments_keep_the_diagonal() -> None:
    rng = np.random.default_rng(3)
    n = 64
    xa = _stream(rng, 400, n, [30.0, 10.0, 3.0], noise=0.3)
    xb = _stream(rng, 600, n, [30.0, 10.0, 3.0], noise=0.3)

    def entry(x: np.ndarray, sketch: bool = True) -> ImatrixEntry:
        sums = (x.astype(np.float64) ** 2).sum(0)[None].astype(np.float32)
        return ImatrixEntry(sums, np.array([float(len(x))]), x.sum(0, keepdims=True),
                            _core.sketch_rows(x, 16) if sketch else None)

    a = Imatrix({"w": entry(xa)}, ["a"], 1, 400)
    merged = a.merge(Imatrix({"w": entry(xb)}, ["b"], 1, 600))
    e = merged.entries["w"]
    assert e.in_sketch is not None
    whole = _core.sketch_rows(np.vstack([xa, xb]), 16)
    np.testing.assert_allclose(e.in_sketch, whole, atol=1e-5 * np.abs(whole).max())
    # E[x xᵀ] ≈ diag(d) + Σ a aᵀ: the diagonal is E[x²] exactly, the directions the sketch's per token
    moments = merged.second_moments("w")
    assert moments is not None
    d, dirs = moments
    assert dirs.shape == (1, 8, n)
    np.testing.assert_allclose(d[0] + (dirs[0].astype(np.float64) ** 2).sum(0), merged.values("w")[0], rtol=1e-5)
    m = _moments(np.vstack([xa, xb])) / 1000
    assert np.linalg.eigvalsh(m - dirs[0].T.astype(np.float64) @ dirs[0])[0] >= -1e-4 * np.abs(m).max()
    # an upstream part has no sketch: the merge keeps none (like in_sum)
    assert a.merge(Imatrix({"w": entry(xb, sketch=False)}, ["c"], 1, 600)).entries["w"].in_sketch is None
