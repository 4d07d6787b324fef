// row arithmetic of the scoring pass: a source row read as F32, and the expected squared output of a row
// under the error metric (docs/method.md, scoring)
#pragma once

#include <cstdint>

// one row of ne0 values of ggml type src_type at src, as F32 into dst (exact for 16-bit sources)
void llqx_score_read_row(const uint8_t * src, int32_t src_type, int64_t ne0, float * dst);

// dᵀ·(diag(v) + Σ_k a_k a_kᵀ)·d for one row d of n values (a weight row as it is, an error row in double),
// in double: v nullptr counts 1 per column, a holds n_dir rows of n
double llqx_score_quadratic(const float * d, const float * v, const float * a, int32_t n_dir, int64_t n);
double llqx_score_quadratic(const double * d, const float * v, const float * a, int32_t n_dir, int64_t n);
