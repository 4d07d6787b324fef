"""Reading back the imatrix's sketch of a tensor input's second moments Σ x xᵀ (cpp/llqx_sketch.h).

The sketch is Y = M·Ω for a fixed ±1 test matrix Ω (n × p), summed over token rows in the imatrix pass; it
is linear in M, so the sketches of two runs add up. Its leading directions come from Nyström's approximation.
"""

from __future__ import annotations

import numpy as np

from . import _core

# leading directions of a sketch that the error estimate uses (of its p columns, which oversample them)
SKETCH_DIRECTIONS = 8


def nystrom_directions(sketch: np.ndarray, n_dir: int) -> np.ndarray:
    """The n_dir leading directions a_i (n_dir × n, float64; zero rows where there are fewer) of the PSD matrix
    M that the sketch Y = M·Ω saw, from Nyström's approximation Y (ΩᵀY)⁺ Yᵀ ⪯ M, with the small shift ν that
    keeps it stable in floating point (Tropp et al., 2017): Σ a_i a_iᵀ ⪯ M, exact where M has rank ≤ p."""
    yt = sketch.astype(np.float64)  # p × n: Yᵀ
    p, n = yt.shape
    omega_t = _core.sketch_test_matrix(n, p).astype(np.float64)
    nu = np.sqrt(n) * np.finfo(np.float32).eps * np.linalg.norm(yt)
    if nu == 0:
        return np.zeros((n_dir, n))
    y_nu = yt + nu * omega_t  # the sketch of M + νI
    core = omega_t @ y_nu.T
    core = (core + core.T) / 2
    vals, vecs = np.linalg.eigh(core)
    keep = vals > vals.max() * 1e-12
    half = y_nu.T @ (vecs[:, keep] / np.sqrt(vals[keep]))  # n × k: Nyström of M + νI is half·halfᵀ
    u, sigma, _ = np.linalg.svd(half, full_matrices=False)
    lam = np.maximum(sigma**2 - nu, 0.0)  # eigenvalues of the approximation of M, descending
    out = np.zeros((n_dir, n))
    k = min(n_dir, lam.size)
    out[:k] = (u[:, :k] * np.sqrt(lam[:k])).T
    return out


def sketch_second_moments(sketch: np.ndarray, count: float, mean_square: np.ndarray,
                          n_dir: int = SKETCH_DIRECTIONS) -> tuple[np.ndarray, np.ndarray]:
    """E[x xᵀ] as diag(d) + Σ_i a_i a_iᵀ from a raw sketch over ``count`` tokens: (d (1, n), a (1, n_dir, n)).

    The a_i are the sketch's leading directions scaled per token; d is what E[x²] (``mean_square``, (1, n))
    leaves on the diagonal beside them, so the diagonal of the whole is exactly E[x²].
    """
    directions = nystrom_directions(sketch, n_dir) / np.sqrt(count)
    rest = mean_square.astype(np.float64) - np.sum(np.square(directions), axis=0)
    return np.maximum(rest, 0.0).astype(np.float32), directions.astype(np.float32)[None]


def merge_sketches(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """The sketch of two runs together; None unless both have one of the same size (one fixed Ω per width)."""
    if a is None or b is None or a.shape != b.shape:
        return None
    return (a.astype(np.float64) + b).astype(np.float32)
