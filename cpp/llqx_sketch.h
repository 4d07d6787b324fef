// the input covariance beyond its diagonal: a one-pass sketch of the second-moment matrix Σ x xᵀ of a
// stream of activation rows, filled by the imatrix pass and read by the scorer through Nyström's
// approximation (python/llqx/imatrix.py; docs/method.md, importance matrix)
#pragma once

#include <cstdint>
#include <vector>

// Y = Σ x·(Ωᵀx) for a fixed test matrix Ω (n × p, entries ±1): linear in the stream, so two runs' sketches
// add up like the sums beside them, and independent of how the rows are batched. Deterministic: the same rows
// in the same order give the same bits
struct llqx_sketch {
    int64_t             n = 0;
    int32_t             p = 0;
    std::vector<float>  omega; // n × p, row-major
    std::vector<float>  y;     // n × p, row-major (float, like llama-imatrix's Σx²: enough for a sketch)
    std::vector<float>  z;     // a block of rows' Ωᵀx
};

// Ω of rows of n values: n × p entries ±1 from a fixed seed, row-major; entry (j, i) depends on j and i
// only, so a narrower or shorter Ω is a corner of a larger one (p < 65536)
void llqx_sketch_test_matrix(int64_t n, int32_t p, std::vector<float> & out);

// p = 0: an empty sketch that ignores its rows
void llqx_sketch_init(llqx_sketch & sk, int64_t n, int32_t p);

// n_rows rows into Y, row r at x + r·stride floats; the same bits however the stream is cut into calls
void llqx_sketch_add_rows(llqx_sketch & sk, const float * x, int64_t n_rows, int64_t stride);

// Y transposed, p × n row-major (row i: Σ x·(ω_iᵀx), ω_i the i-th column of Ω)
void llqx_sketch_result(const llqx_sketch & sk, std::vector<float> & out);
