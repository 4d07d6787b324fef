// the imatrix collector's sums: Σx², Σx, token counts, the block maxima (LLQX_IMATRIX_MAX_BLOCKS), the sketch of
// Σ x xᵀ and, for residual writers, the stream-relative sums (llqx_imatrix_stream.h) per weight tensor and expert,
// filled by
// llama.cpp's graph eval callback; knows nothing of the model, context or chunks (llqx_imatrix.cpp)
#pragma once

#include "llqx_imatrix.h"
#include "llqx_imatrix_stream.h"
#include "llqx_sketch.h"

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct ggml_tensor;

struct llqx_imatrix_stats {
    int64_t              n_per_row = 0;
    int64_t              n_expert  = 0;
    std::vector<float>   in_sum2; // float, summed in llama-imatrix's order: bit-identical to its file
    std::vector<double>  in_sum;  // double: a sum with cancellation
    std::vector<int64_t> counts;
    std::vector<double>  in_max2[2]; // per block of LLQX_IMATRIX_MAX_BLOCKS[i] columns: Σ (max |x| over the block)²
    llqx_sketch          sketch;  // dense tensors only: Σ x xᵀ beyond its diagonal
    llqx_imatrix_stream_sums stream; // dense residual writers only
};

// a residual writer's input rows, held until the graph computes the stream they are added to
struct llqx_imatrix_pending {
    std::string        wname;
    std::string        stream; // the name of the stream tensor (llqx_imatrix_stream_name)
    int64_t            ne0    = 0;
    int64_t            n_rows = 0;
    std::vector<float> x;      // n_rows x ne0
};

struct llqx_imatrix_accum {
    bool    process_output = false; // also collect output.weight
    int32_t sketch_rank    = 0;     // columns of each dense tensor's second-moment sketch; 0: none

    std::map<std::string, llqx_imatrix_stats> stats;

    // scratch for activations and expert ids that live in device memory
    std::vector<char> src1_data;
    std::vector<char> ids_data;
    std::vector<char> stream_data;

    // at most one writer's input waits for its stream: the graph computes the stream before the next writer
    std::vector<llqx_imatrix_pending> pending;

    double t_collect_s = 0.0; // time spent summing activations (inside the eval callback)

    // the first failure inside the callback; the decode is aborted and the run reports fail_msg
    std::atomic<bool> failed{false};
    std::string       fail_msg;
};

// llama_context_params.cb_eval and .abort_callback, with user data a llqx_imatrix_accum
bool llqx_imatrix_accum_cb_abort(void * user_data);
bool llqx_imatrix_accum_cb_eval(ggml_tensor * t, bool ask, void * user_data);

// snapshot of the sums, sorted by tensor name (a dense 3-D weight as one row per count)
void llqx_imatrix_accum_entries(const llqx_imatrix_accum & acc, std::vector<llqx_imatrix_sums> & out);
