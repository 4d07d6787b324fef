#include "llqx_score_row.h"

#include "ggml.h"
#include "ggml-cpu.h"

#include <cstring>

void llqx_score_read_row(const uint8_t * src, int32_t src_type, int64_t ne0, float * dst) {
    // 16-bit sources through the CPU backend's vectorized conversions (exact, as to_float is): every
    // tensor's whole data is read here
    const ggml_type type = (ggml_type) src_type;
    if (type == GGML_TYPE_F32) {
        std::memcpy(dst, src, sizeof(float) * (size_t) ne0);
    } else if (type == GGML_TYPE_F16) {
        ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, dst, ne0);
    } else if (type == GGML_TYPE_BF16) {
        ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) src, dst, ne0);
    } else {
        ggml_get_type_traits(type)->to_float(src, dst, ne0);
    }
}

// each sum runs in four interleaved partial sums, added in a fixed order: four independent chains instead
// of one (every tensor's whole data passes through here), and the same value whatever the thread count
template <typename T>
static double score_quadratic_impl(const T * d, const float * v, const float * a, int32_t n_dir, int64_t n) {
    const int64_t n4 = n - n % 4;
    double s[4] = { 0.0, 0.0, 0.0, 0.0 };
    for (int64_t k = 0; k < n4; k += 4) {
        for (int64_t l = 0; l < 4; ++l) {
            const double x = (double) d[k + l];
            s[l] += (v ? (double) v[k + l] : 1.0) * x * x;
        }
    }
    for (int64_t k = n4; k < n; ++k) {
        const double x = (double) d[k];
        s[k - n4] += (v ? (double) v[k] : 1.0) * x * x;
    }
    double sum = (s[0] + s[1]) + (s[2] + s[3]);
    for (int32_t i = 0; i < n_dir; ++i) {
        const float * ai = a + (size_t) i * (size_t) n;
        double p[4] = { 0.0, 0.0, 0.0, 0.0 };
        for (int64_t k = 0; k < n4; k += 4) {
            for (int64_t l = 0; l < 4; ++l) {
                p[l] += (double) ai[k + l] * (double) d[k + l];
            }
        }
        for (int64_t k = n4; k < n; ++k) {
            p[k - n4] += (double) ai[k] * (double) d[k];
        }
        const double pi = (p[0] + p[1]) + (p[2] + p[3]);
        sum += pi * pi;
    }
    return sum;
}

double llqx_score_quadratic(const float * d, const float * v, const float * a, int32_t n_dir, int64_t n) {
    return score_quadratic_impl(d, v, a, n_dir, n);
}

double llqx_score_quadratic(const double * d, const float * v, const float * a, int32_t n_dir, int64_t n) {
    return score_quadratic_impl(d, v, a, n_dir, n);
}
