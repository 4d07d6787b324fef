#include "llqx_sketch.h"

#include <algorithm>
#include <cmath>

// eigen-decomposition of the symmetric m×m matrix a (row-major, destroyed) by cyclic Jacobi rotations:
// values descending, vecs[i*m + k] the i-th component of eigenvector k. m is 4·rank, so a few dozen at most
static void sketch_eigen(std::vector<double> & a, int32_t m, std::vector<double> & values, std::vector<double> & vecs) {
    vecs.assign((size_t) m * m, 0.0);
    for (int32_t i = 0; i < m; ++i) {
        vecs[(size_t) i * m + i] = 1.0;
    }
    for (int32_t sweep = 0; sweep < 64; ++sweep) {
        double off = 0.0, diag = 0.0;
        for (int32_t i = 0; i < m; ++i) {
            diag += a[(size_t) i * m + i] * a[(size_t) i * m + i];
            for (int32_t j = i + 1; j < m; ++j) {
                off += a[(size_t) i * m + j] * a[(size_t) i * m + j];
            }
        }
        if (off <= 1e-24 * diag) { // off-diagonal norm below 1e-12 of the diagonal's
            break;
        }
        for (int32_t p = 0; p < m; ++p) {
            for (int32_t q = p + 1; q < m; ++q) {
                const double apq = a[(size_t) p * m + q];
                if (apq == 0.0) {
                    continue;
                }
                const double app = a[(size_t) p * m + p];
                const double aqq = a[(size_t) q * m + q];
                const double theta = (aqq - app) / (2.0 * apq);
                const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
                const double c = 1.0 / std::sqrt(t * t + 1.0);
                const double s = t * c;
                for (int32_t k = 0; k < m; ++k) {
                    const double akp = a[(size_t) k * m + p];
                    const double akq = a[(size_t) k * m + q];
                    a[(size_t) k * m + p] = c * akp - s * akq;
                    a[(size_t) k * m + q] = s * akp + c * akq;
                }
                for (int32_t k = 0; k < m; ++k) {
                    const double apk = a[(size_t) p * m + k];
                    const double aqk = a[(size_t) q * m + k];
                    a[(size_t) p * m + k] = c * apk - s * aqk;
                    a[(size_t) q * m + k] = s * apk + c * aqk;
                }
                for (int32_t k = 0; k < m; ++k) {
                    const double vkp = vecs[(size_t) k * m + p];
                    const double vkq = vecs[(size_t) k * m + q];
                    vecs[(size_t) k * m + p] = c * vkp - s * vkq;
                    vecs[(size_t) k * m + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    // sort descending (stable on ties: the order is part of the result's bits)
    std::vector<int32_t> order((size_t) m);
    for (int32_t i = 0; i < m; ++i) {
        order[(size_t) i] = i;
    }
    std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) {
        return a[(size_t) x * m + x] > a[(size_t) y * m + y];
    });
    std::vector<double> sorted((size_t) m * m);
    values.resize((size_t) m);
    for (int32_t k = 0; k < m; ++k) {
        values[(size_t) k] = a[(size_t) order[(size_t) k] * m + order[(size_t) k]];
        for (int32_t i = 0; i < m; ++i) {
            sorted[(size_t) i * m + k] = vecs[(size_t) i * m + order[(size_t) k]];
        }
    }
    vecs.swap(sorted);
}

// rotates the n_rows rows of the buffer onto their principal directions and keeps the first `keep`, each
// scaled to carry its eigenvalue less delta: row k becomes sqrt(max(λ_k − delta, 0)) · v_k. Returns the
// rows kept (those with something left)
static int32_t sketch_compact(const llqx_sketch & sk, int32_t keep, bool shrink, std::vector<double> & out, double & delta) {
    const int32_t m = sk.n_rows;
    const int64_t n = sk.n;
    std::vector<double> gram((size_t) m * m);
    for (int32_t i = 0; i < m; ++i) {
        const double * ri = sk.rows.data() + (size_t) i * n;
        for (int32_t j = i; j < m; ++j) {
            const double * rj = sk.rows.data() + (size_t) j * n;
            double s = 0.0;
            for (int64_t c = 0; c < n; ++c) {
                s += ri[c] * rj[c];
            }
            gram[(size_t) i * m + j] = s;
            gram[(size_t) j * m + i] = s;
        }
    }
    std::vector<double> values, vecs;
    sketch_eigen(gram, m, values, vecs);
    delta = shrink && keep < m ? std::max(0.0, values[(size_t) keep]) : 0.0;
    int32_t kept = 0;
    out.assign((size_t) keep * n, 0.0);
    for (int32_t k = 0; k < std::min(keep, m); ++k) {
        const double lambda = values[(size_t) k];
        if (!(lambda > delta) || lambda <= 0.0) {
            break;
        }
        // Bᵀu_k = σ_k v_k, so sqrt(λ_k − δ) v_k = sqrt((λ_k − δ) / λ_k) · Bᵀu_k
        const double scale = std::sqrt((lambda - delta) / lambda);
        double * dst = out.data() + (size_t) kept * n;
        for (int32_t i = 0; i < m; ++i) {
            const double w = scale * vecs[(size_t) i * m + k];
            const double * ri = sk.rows.data() + (size_t) i * n;
            for (int64_t c = 0; c < n; ++c) {
                dst[c] += w * ri[c];
            }
        }
        kept++;
    }
    return kept;
}

void llqx_sketch_init(llqx_sketch & sk, int64_t n, int32_t rank) {
    sk.n      = n;
    sk.rank   = rank;
    sk.n_rows = 0;
    sk.shrunk = 0.0;
    sk.rows.assign((size_t) (4 * rank) * (size_t) n, 0.0);
}

void llqx_sketch_add(llqx_sketch & sk, const float * x) {
    if (sk.rank <= 0) {
        return;
    }
    if (sk.n_rows == 4 * sk.rank) {
        // Frequent Directions with 2·rank directions: subtract the (2·rank+1)-th eigenvalue from every
        // direction, which frees at least half the buffer; what is subtracted bounds the sketch's error
        std::vector<double> kept;
        double delta = 0.0;
        const int32_t n_kept = sketch_compact(sk, 2 * sk.rank, true, kept, delta);
        std::fill(sk.rows.begin(), sk.rows.end(), 0.0);
        std::copy(kept.begin(), kept.begin() + (size_t) n_kept * (size_t) sk.n, sk.rows.begin());
        sk.n_rows  = n_kept;
        sk.shrunk += delta;
    }
    double * dst = sk.rows.data() + (size_t) sk.n_rows * (size_t) sk.n;
    for (int64_t c = 0; c < sk.n; ++c) {
        dst[c] = (double) x[c];
    }
    sk.n_rows++;
}

void llqx_sketch_result(const llqx_sketch & sk, std::vector<float> & out) {
    out.assign((size_t) std::max(0, sk.rank) * (size_t) sk.n, 0.0f);
    if (sk.rank <= 0 || sk.n_rows == 0) {
        return;
    }
    std::vector<double> kept;
    double delta = 0.0;
    const int32_t n_kept = sketch_compact(sk, sk.rank, false, kept, delta);
    for (size_t i = 0; i < (size_t) n_kept * (size_t) sk.n; ++i) {
        out[i] = (float) kept[i];
    }
}
