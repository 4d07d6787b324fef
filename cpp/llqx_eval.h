// evaluation of a model on text as llama-perplexity does it: chunks of n_ctx tokens, the second
// half of each chunk scored; the base model's log-probabilities stored compactly (uint16 rows,
// llama-perplexity's --kl-divergence-base layout) and quantized models compared against them
#pragma once

#include "llqx_error.h"

#include <cstdint>
#include <string>
#include <vector>

struct ggml_tensor;

// llama_context_params.cb_eval: called with ask = true for every graph node before it is computed
typedef bool (*llqx_eval_graph_cb_t)(struct ggml_tensor * t, bool ask, void * user_data);

struct llqx_eval_params {
    int32_t n_ctx        = 512; // tokens per chunk
    int32_t n_threads    = 1;   // decode and per-token math
    int32_t n_gpu_layers = 0;   // passed to llama_model_params
    bool    repack       = false; // CPU extra buffer types (repack, AMX): off by default, since ggml's
                                  // AMX path crashes on Q4_0 at this llama.cpp version (llama-perplexity -nr)
    // for changing weights between passes (llqx_probe): the weights loaded into writable buffers in ggml's
    // own layout (llqx_model_load_writable; repack ignored) and no op offload, so that every weight a graph
    // node reads is the model's own tensor
    bool                 writable          = false;
    llqx_eval_graph_cb_t cb_eval           = nullptr;
    void *               cb_eval_user_data = nullptr;
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

// a model loaded once with a context for chunks of params.n_ctx tokens, for several passes over the same
// tokens (llqx_eval_base and llqx_eval_compare open one for a single pass)
struct llqx_eval_session;

// expect_vocab > 0: fail unless the model's vocabulary has that many tokens; nullptr with err set on failure
llqx_eval_session * llqx_eval_session_init(const std::string & model_path, const llqx_eval_params & params,
                                           int32_t expect_vocab, llqx_error & err);
void                llqx_eval_session_free(llqx_eval_session * s);

int32_t llqx_eval_session_n_vocab(const llqx_eval_session * s);

// as llqx_eval_base and llqx_eval_compare, on the session's model as it is now
bool llqx_eval_session_base(llqx_eval_session * s, const int32_t * tokens, int32_t n_chunk, uint16_t * rows,
                            float * nll, llqx_eval_progress_t progress, void * user_data, llqx_error & err);
bool llqx_eval_session_compare(llqx_eval_session * s, const int32_t * tokens, int32_t n_chunk,
                               const uint16_t * rows, const llqx_eval_token_stats & out,
                               llqx_eval_progress_t progress, void * user_data, llqx_error & err);
