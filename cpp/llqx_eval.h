// evaluation of a model on text as llama-perplexity does it: chunks of n_ctx tokens, the second
// half of each chunk scored; the base model's log-probabilities stored compactly (uint16 rows,
// llama-perplexity's --kl-divergence-base layout) and quantized models compared against them
#pragma once

#include "llqx_error.h"

#include <cstdint>
#include <string>
#include <vector>

struct llqx_eval_params {
    int32_t n_ctx        = 512; // tokens per chunk
    int32_t n_threads    = 1;   // decode and per-token math
    int32_t n_gpu_layers = 0;   // passed to llama_model_params
    bool    repack       = false; // CPU extra buffer types (repack, AMX): off by default, since ggml's
                                  // AMX path crashes on Q4_0 at this llama.cpp version (llama-perplexity -nr)
};

// returns false to abort the run (the function then fails with err = "aborted")
typedef bool (*llqx_eval_progress_t)(int32_t chunks_done, int32_t n_chunk, void * user_data);

// uint16 per vocabulary entry plus two floats (scale, min log-prob) per scored token:
// 2*((n_vocab + 1)/2) + 4 uint16 values, exactly one row of llama-perplexity's logits file
int64_t llqx_eval_row_size(int32_t n_vocab);

// tokens scored per chunk: n_ctx - 1 - n_ctx/2 (logits at positions n_ctx/2 .. n_ctx-2)
int32_t llqx_eval_n_scored(int32_t n_ctx);

// tokenize as llama-perplexity does (special tokens added, not parsed); loads the vocabulary only
bool llqx_eval_tokenize(const std::string & model_path, const std::string & text,
                        std::vector<int32_t> & tokens, int32_t & n_vocab, llqx_error & err);

// run the base model over n_chunk chunks of tokens (n_chunk*n_ctx of them); fill per scored token:
// rows (n_chunk*n_scored rows of llqx_eval_row_size) and nll (exact negative log-likelihood)
bool llqx_eval_base(const std::string & model_path, const llqx_eval_params & params,
                    const int32_t * tokens, int32_t n_chunk, uint16_t * rows, float * nll,
                    llqx_eval_progress_t progress, void * user_data, llqx_error & err);

// per scored token of a quantized model against the stored base rows
struct llqx_eval_token_stats {
    float * nll;      // -log p_q(token)
    float * nll_base; // -log p_base(token), from the stored row
    float * kld;      // KL(base || q) over the vocabulary (entries with log p_base > -16)
    float * p_diff;   // p_q(token) - p_base(token)
    uint8_t * same_top; // 1 where both argmax agree
};

bool llqx_eval_compare(const std::string & model_path, const llqx_eval_params & params,
                       const int32_t * tokens, int32_t n_chunk, const uint16_t * rows, int32_t n_vocab,
                       const llqx_eval_token_stats & out,
                       llqx_eval_progress_t progress, void * user_data, llqx_error & err);
