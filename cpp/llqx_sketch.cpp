#include "llqx_sketch.h"

#include "ggml.h" // GGML_RESTRICT

#include <cstddef>

// rows summed together by the hot loop (below)
static const int32_t SKETCH_BLOCK = 8;

// splitmix64: a fixed, platform-independent stream of bits for Ω
static uint64_t sketch_mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

void llqx_sketch_test_matrix(int64_t n, int32_t p, std::vector<float> & out) {
    out.resize((size_t) n * (size_t) p);
    for (int64_t j = 0; j < n; ++j) {
        for (int32_t i = 0; i < p; ++i) {
            const uint64_t bits = sketch_mix(0x6c6c7178736b7400ull ^ ((uint64_t) j << 16 | (uint64_t) i)); // "llqxsk"
            out[(size_t) (j * p + i)] = (bits >> 63) ? -1.0f : 1.0f;
        }
    }
}

void llqx_sketch_init(llqx_sketch & sk, int64_t n, int32_t p) {
    sk.n = n;
    sk.p = p < 0 ? 0 : p;
    llqx_sketch_test_matrix(n, sk.p, sk.omega);
    sk.y.assign((size_t) n * (size_t) sk.p, 0.0f);
    sk.z.assign((size_t) SKETCH_BLOCK * (size_t) sk.p, 0.0f);
}

// the hot loop, over a block of m ≤ SKETCH_BLOCK rows (row t at x + t·stride): Z = XΩ, then Y += XᵀZ. Each
// sum keeps the order it has row by row (columns in order for z, rows in order for y), so the result does not
// depend on how rows are blocked; the block only gives the vector units independent sums. Built for AVX2 too,
// like the imatrix sums: plain adds and multiplies (no FMA), so both builds round alike
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void sketch_add_block(const float * GGML_RESTRICT x, int64_t stride, int32_t m, int64_t n, int32_t p,
                             const float * GGML_RESTRICT omega, float * GGML_RESTRICT y, float * GGML_RESTRICT z) {
    for (int32_t k = 0; k < m * p; ++k) {
        z[k] = 0.0f;
    }
    for (int64_t j = 0; j < n; ++j) {
        const float * o = omega + (size_t) j * (size_t) p;
        for (int32_t t = 0; t < m; ++t) {
            const float xtj = x[(size_t) t * (size_t) stride + (size_t) j];
            float * zt = z + (size_t) t * (size_t) p;
            for (int32_t i = 0; i < p; ++i) {
                zt[i] += xtj * o[i];
            }
        }
    }
    for (int64_t j = 0; j < n; ++j) {
        float * yj = y + (size_t) j * (size_t) p;
        for (int32_t t = 0; t < m; ++t) {
            const float xtj = x[(size_t) t * (size_t) stride + (size_t) j];
            const float * zt = z + (size_t) t * (size_t) p;
            for (int32_t i = 0; i < p; ++i) {
                yj[i] += xtj * zt[i];
            }
        }
    }
}

void llqx_sketch_add_rows(llqx_sketch & sk, const float * x, int64_t n_rows, int64_t stride) {
    if (sk.p == 0) {
        return;
    }
    for (int64_t r = 0; r < n_rows; r += SKETCH_BLOCK) {
        const int32_t m = (int32_t) (n_rows - r < SKETCH_BLOCK ? n_rows - r : SKETCH_BLOCK);
        sketch_add_block(x + (size_t) r * (size_t) stride, stride, m, sk.n, sk.p, sk.omega.data(), sk.y.data(),
                         sk.z.data());
    }
}

void llqx_sketch_result(const llqx_sketch & sk, std::vector<float> & out) {
    out.resize((size_t) sk.p * (size_t) sk.n);
    for (int64_t j = 0; j < sk.n; ++j) {
        for (int32_t i = 0; i < sk.p; ++i) {
            out[(size_t) i * (size_t) sk.n + (size_t) j] = sk.y[(size_t) j * (size_t) sk.p + (size_t) i];
        }
    }
}
