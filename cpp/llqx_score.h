// scoring pass of the target-bpw method: per tensor and candidate type, the weighted quantization
// error of deterministically sampled rows, and the exact output energy of all rows (docs/method.md, scoring)
#pragma once

#include "llqx_error.h"

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

struct llqx_score_job {
    std::string          name;         // tensor name, also the seed of its row sampling
    int32_t              src_type;     // ggml type of the data in the file
    int64_t              ne[3];        // n_per_row, rows per expert, experts
    uint64_t             offset;       // absolute byte offset of the data in the file
    std::vector<int32_t> candidates;   // ggml types to score (already width-compatible)
    std::vector<float>   weights;      // ne[2] * ne[0] importance values (E[x^2]) for the quantizer, or empty: plain MSE
    // the second moments E[x xᵀ] the error is weighted with: diag(diagonal) + Σ_d dir_d dir_dᵀ per expert
    std::vector<float>   diagonal;     // ne[2] * ne[0], or empty: the importance values
    std::vector<float>   directions;   // ne[2] * n_dir * ne[0] (e.g. the mean activation, n_dir = 1), or empty
    int32_t              n_dir = 0;
    // per-column variances of noise added to the input (e.g. the 8-bit rounding of activations a kind of dot
    // product makes): n_noise * ne[2] * ne[0]; each gets the expected squared output it causes (errors below)
    std::vector<float>   noise;
    int32_t              n_noise = 0;
    // a second error metric, of the same form as the first (e.g. the input weighted per token by where its
    // output lands): each candidate's error under it too; empty: none
    std::vector<float>   alt_diagonal;   // ne[2] * ne[0]
    std::vector<float>   alt_directions; // ne[2] * alt_n_dir * ne[0]
    int32_t              alt_n_dir = 0;
    int64_t              sample_elements = 0; // elements to sample (over all experts); 0: the run's default
};

struct llqx_score_params {
    int32_t nthread         = 1;
    int64_t sample_elements = 1 << 20; // elements sampled per tensor (split over its experts)
    int64_t min_rows        = 16;      // rows sampled per expert slice at least (all when fewer)
};

// the expected squared output of a row of error (or weight) d: dᵀ·(diag(diagonal) + Σ dir dirᵀ)·d
// called (serialized, from any thread) when one job's curve is complete. errors holds
// (n_candidates + 1 + n_noise) * n_expert values: errors[c * n_expert + e] is the summed expected squared output
// error of expert slice e under candidates[c] (estimated from the sampled rows, each weighted by the inverse
// of its inclusion probability), errors[n_candidates * n_expert + e] the slice's summed expected squared
// output over all its rows (exact), errors[(n_candidates + 1 + i) * n_expert + e] the slice's summed expected
// squared output of input noise i over all its rows (exact: Σ_rows Σ_k w_k² noise_k), and with a second metric
// errors[(n_candidates + 1 + n_noise + c) * n_expert + e] candidate c's error under it (same rows, same weights,
// so n_errors is (2 * n_candidates + 1 + n_noise) * n_expert). Returning false cancels.
typedef bool (*llqx_score_done_t)(int32_t job, const double * errors, int32_t n_errors, int64_t n_rows_sampled,
                                  void * user_data);

// scores every job; errors[j] receives job j's values as passed to done (empty when the job did not finish).
// Returns 1 when complete, 0 when cancelled (by the flag or the callback), -1 with err set on failure.
int32_t llqx_score_run(const std::string & path, const std::vector<llqx_score_job> & jobs,
                       const llqx_score_params & params, std::vector<std::vector<double>> & errors,
                       llqx_score_done_t done, void * user_data, const std::atomic<bool> * cancel,
                       llqx_error & err);
