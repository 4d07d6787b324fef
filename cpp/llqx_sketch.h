// the input covariance beyond its diagonal: a Frequent Directions sketch of the second-moment matrix
// Σ x xᵀ of a stream of activation rows, in bounded memory (4·rank rows), filled by the imatrix pass
// and read by the scorer (docs/method.md, importance matrix and scoring)
#pragma once

#include <cstdint>
#include <vector>

// B (2·rank directions, in a buffer of 4·rank rows of n) with 0 ⪯ Σ x xᵀ − BᵀB ⪯ δ·I, δ the total
// shrinkage so far; deterministic: the same rows in the same order give the same bits
struct llqx_sketch {
    int64_t             n      = 0;
    int32_t             rank   = 0;
    int32_t             n_rows = 0; // rows of the buffer in use
    double              shrunk = 0; // δ: the largest eigenvalue Σ x xᵀ − BᵀB can have
    std::vector<double> rows;       // 4·rank × n
};

void llqx_sketch_init(llqx_sketch & sk, int64_t n, int32_t rank);

// one row x (n values) into the sketch; shrinks it when the buffer is full
void llqx_sketch_add(llqx_sketch & sk, const float * x);

// the sketch's rank leading directions as orthogonal rows b_i = σ_i·v_i, largest first, row-major
// rank × n (zero rows where the stream had fewer directions): Σ_i b_i b_iᵀ ⪯ Σ x xᵀ
void llqx_sketch_result(const llqx_sketch & sk, std::vector<float> & out);
