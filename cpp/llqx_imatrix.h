// importance matrix with activations: per weight tensor and expert Σx², Σx and token counts,
// collected through llama.cpp's graph eval callback while running chunks like llama-imatrix
#pragma once

#include "llqx_error.h"

#include <cstdint>
#include <string>
#include <vector>

struct llqx_imatrix_params {
    std::string model_path;
    int32_t     n_ctx          = 512;  // chunk size (tokens)
    int32_t     n_batch        = 2048; // logical batch; n_batch >= 2*n_ctx runs n_batch/n_ctx chunks at once
    int32_t     n_ubatch       = 512;  // physical batch
    int32_t     n_threads      = 4;
    int32_t     n_gpu_layers   = -1;   // -1: llama.cpp's default
    bool        repack         = true;  // ggml's CPU weight repacking, on as in llama-imatrix (-nr turns it off)
    bool        process_output = false; // also collect output.weight
    bool        compute_ppl    = true;
    int32_t     sketch_rank    = 0;     // columns of each dense tensor's second-moment sketch (llqx_sketch.h); 0: none
};

// the block widths whose per-row maxima are summed: those of the 8-bit activation types ggml's CPU dot products
// round a matrix multiplication's input to (Q8_0/Q8_1: 32 values, Q8_K: 256), each block with scale max |x| / 127
static const int64_t LLQX_IMATRIX_MAX_BLOCKS[2] = { 32, 256 };

// raw sums of one weight tensor: arrays n_expert x n_per_row (row-major) and n_expert counts
struct llqx_imatrix_sums {
    std::string          name;
    int64_t              n_per_row = 0;
    int64_t              n_expert  = 0;
    std::vector<float>   in_sum2; // float, accumulated like llama-imatrix (bit-identical to its file)
    std::vector<double>  in_sum;
    std::vector<int64_t> counts;
    // n_expert x (n_per_row / LLQX_IMATRIX_MAX_BLOCKS[i]): Σ over rows of (max |x| over each block)²; empty when the
    // width is not a whole number of blocks
    std::vector<float>   in_max2[2];
    int32_t              sketch_rank = 0; // rows of in_sketch (0: none)
    std::vector<float>   in_sketch;       // sketch_rank x n_per_row: (Σ x·(Ωᵀx))ᵀ (llqx_sketch.h)
    // residual writers: n_per_row stream-relative sums and the tokens they hold (llqx_imatrix_stream.h); empty, 0
    std::vector<double>  in_sum2_stream;
    std::vector<double>  in_sum_stream;
    std::vector<double>  in_max2_stream[2]; // n_per_row / LLQX_IMATRIX_MAX_BLOCKS[i]: Σ (max |x| over the block)² / ms(s)
    int64_t              count_stream = 0;
};

struct llqx_imatrix_progress {
    int32_t n_chunk_done;   // chunks evaluated in this run
    int32_t n_chunk;        // chunks this run will evaluate
    int64_t n_tokens_done;
    int64_t n_tokens;
    double  ppl;            // running perplexity over the second half of each chunk; NaN without ppl
    double  t_elapsed_s;    // since the first chunk started
};

// called after every group of chunks; return false to stop (what was collected stays, whole chunks only)
typedef bool (*llqx_imatrix_progress_cb)(const llqx_imatrix_progress & progress, void * user_data);

struct llqx_imatrix_run_result {
    int32_t n_chunk_done = 0;
    int64_t n_tokens     = 0;     // tokens evaluated
    double  ppl          = 0.0;   // final estimate (NaN without ppl)
    double  ppl_err      = 0.0;
    bool    cancelled    = false; // the progress callback asked to stop
    double  t_eval_s     = 0.0;   // wall time of the chunk loop
    double  t_collect_s  = 0.0;   // of which summing activations in the eval callback
};

struct llqx_imatrix_collector;

// loads the model and makes a context sized like llama-imatrix's; nullptr with err set on failure
llqx_imatrix_collector * llqx_imatrix_init(const llqx_imatrix_params & params, llqx_error & err);
void                     llqx_imatrix_free(llqx_imatrix_collector * col);

// tokens of text with the model's special tokens added (BOS), like llama-imatrix
bool llqx_imatrix_tokenize(llqx_imatrix_collector * col, const std::string & text, bool parse_special,
                           std::vector<int32_t> & tokens, llqx_error & err);

int32_t llqx_imatrix_n_vocab(const llqx_imatrix_collector * col);
// the chunk size actually used (params.n_ctx) and the sequences evaluated together
int32_t llqx_imatrix_chunk_size(const llqx_imatrix_collector * col);
int32_t llqx_imatrix_n_seq(const llqx_imatrix_collector * col);

// evaluates the first n_chunk chunks of n_ctx tokens (BOS put in front of each when the vocab adds one),
// accumulating into the collector's statistics; false with err set on failure (non-finite activations,
// failed decode, too few tokens)
bool llqx_imatrix_run(llqx_imatrix_collector * col, const std::vector<int32_t> & tokens, int32_t n_chunk,
                      llqx_imatrix_progress_cb progress, void * user_data,
                      llqx_imatrix_run_result & result, llqx_error & err);

// asynchronous stop request (any thread): the run ends after the current group of chunks
void llqx_imatrix_cancel(llqx_imatrix_collector * col);

// snapshot of the statistics collected so far, sorted by tensor name
void llqx_imatrix_entries(const llqx_imatrix_collector * col, std::vector<llqx_imatrix_sums> & out);
