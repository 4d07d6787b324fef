"""The second-moment sketch (cpp/llqx_sketch.cpp) against numpy's eigendecomposition, and its merge."""

from __future__ import annotations

import numpy as np
import pytest

from llqx import _core
from llqx.imatrix import Imatrix, ImatrixEntry


def _stream(rng: np.random.Generator, n_rows: int, n: int, spectrum: list[float], noise: float) -> np.ndarray:
    """Rows with a few strong directions (a mean among them) plus isotropic noise, float32."""
    basis, _ = np.linalg.qr(rng.standard_normal((n, len(spectrum))))
    coef = rng.standard_normal((n_rows, len(spectrum))) * np.sqrt(spectrum)
    coef[:, 0] += 3.0 * np.sqrt(spectrum[0])  # a mean along the first direction, like a massive activation
    return (coef @ basis.T + noise * rng.standard_normal((n_rows, n))).astype(np.float32)


def _gram(b: np.ndarray) -> np.ndarray:
    b64 = b.astype(np.float64)
    return b64.T @ b64


def test_exact_when_the_stream_has_rank_at_most_the_sketch() -> None:
    rng = np.random.default_rng(0)
    x = _stream(rng, 500, 96, [50.0, 20.0, 9.0, 4.0, 1.0], noise=0.0)
    b = _core.sketch_rows(x, 8)
    assert b.shape == (8, 96)
    m = _gram(x)
    np.testing.assert_allclose(_gram(b), m, atol=1e-4 * np.abs(m).max())
    # rows are orthogonal, largest first; the unused ones are zero
    norms = np.linalg.norm(b.astype(np.float64), axis=1)
    assert np.all(np.diff(norms) <= 1e-6 * norms[0])
    assert np.all(norms[5:] < 1e-3 * norms[0])
    g = b[:5].astype(np.float64) @ b[:5].astype(np.float64).T
    np.testing.assert_allclose(g - np.diag(np.diag(g)), 0.0, atol=1e-4 * norms[0] ** 2)


def test_frequent_directions_bounds_and_principal_directions() -> None:
    rng = np.random.default_rng(1)
    n, k = 128, 8
    x = _stream(rng, 3000, n, [400.0, 100.0, 30.0], noise=1.0)
    b = _core.sketch_rows(x, k)
    m = _gram(x)
    diff = m - _gram(b)
    eig_diff = np.linalg.eigvalsh(diff)
    lam = np.linalg.eigvalsh(m)[::-1]
    # never more than the stream: Σ x xᵀ − BᵀB is positive semi-definite
    assert eig_diff[0] >= -1e-5 * lam[0]
    # and never far below it: Frequent Directions' bound with 2k directions, ||A − A_j||²_F / (2k + 1 − j) for
    # the j = 3 strong directions, plus what keeping only the first k of them leaves out
    j = 3
    bound = lam[j:].sum() / (2 * k + 1 - j)
    assert eig_diff[-1] <= bound + lam[k]
    # the strong directions are numpy's leading eigenvectors; each energy lies between λ_i − bound and λ_i
    vecs = np.linalg.eigh(m)[1][:, ::-1]
    for i in range(j):
        u = b[i].astype(np.float64) / np.linalg.norm(b[i])
        assert abs(u @ vecs[:, i]) > 0.999, i
        energy = np.linalg.norm(b[i].astype(np.float64)) ** 2
        assert lam[i] - bound <= energy <= lam[i] * (1 + 1e-6), i


def test_deterministic_and_validated() -> None:
    rng = np.random.default_rng(2)
    x = _stream(rng, 777, 64, [10.0, 5.0, 2.0, 1.0], noise=0.5)
    assert _core.sketch_rows(x, 4).tobytes() == _core.sketch_rows(x.copy(), 4).tobytes()
    with pytest.raises(_core.InputError):
        _core.sketch_rows(x, 0)
    with pytest.raises(_core.InputError):
        _core.sketch_rows(x[0], 4)


def test_merge_stays_below_the_sum_and_second_moments_keep_the_diagonal() -> None:
    rng = np.random.default_rng(3)
    n, k = 64, 6
    xa = _stream(rng, 400, n, [30.0, 10.0, 3.0], noise=0.3)
    xb = _stream(rng, 600, n, [30.0, 10.0, 3.0], noise=0.3)

    def entry(x: np.ndarray) -> ImatrixEntry:
        sums = (x.astype(np.float64) ** 2).sum(0)
        return ImatrixEntry(sums[None].astype(np.float32), np.array([float(len(x))]), x.sum(0, keepdims=True),
                            _core.sketch_rows(x, k))

    a = Imatrix({"w": entry(xa)}, ["a"], 1, 400)
    merged = a.merge(Imatrix({"w": entry(xb)}, ["b"], 1, 600))
    e = merged.entries["w"]
    assert e.in_sketch is not None
    assert e.in_sketch.shape == (k, n)
    m = _gram(xa) + _gram(xb)
    assert np.linalg.eigvalsh(m - _gram(e.in_sketch))[0] >= -1e-5 * np.linalg.eigvalsh(m)[-1]
    # E[x xᵀ] ≈ diag(d) + Σ a aᵀ: the diagonal is E[x²] exactly, the directions are the sketch per token
    d, dirs = merged.second_moments("w")  # type: ignore[misc]
    np.testing.assert_allclose(d[0] + (dirs[0].astype(np.float64) ** 2).sum(0), merged.values("w")[0], rtol=1e-5)
    assert np.all(d >= 0)
    # an upstream part has no sketch: the merge keeps none (like in_sum)
    plain = Imatrix({"w": ImatrixEntry(entry(xb).in_sum2, np.array([600.0]))}, ["c"], 1, 600)
    assert a.merge(plain).entries["w"].in_sketch is None
