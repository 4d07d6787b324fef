// the KL divergence of type mixes measured in memory, without writing files: a full-precision model is
// loaded once and evaluated once as llqx_eval does (base rows); then, per mix, the listed weight tensors
// are replaced in place by the round trip of their weights through a ggml type (quantized as
// llama_model_quantize quantizes them, dequantized, converted back to the tensor's own storage type),
// the chunks are run again and compared against the base rows, and the original bytes are restored
#pragma once

#include "llqx_error.h"
#include "llqx_eval.h"

#include <cstdint>
#include <string>
#include <vector>

struct llqx_probe_params {
    int32_t n_ctx        = 512; // tokens per chunk
    int32_t n_threads    = 0;   // decode, quantization and per-token math; <= 0: all cores
    int32_t n_gpu_layers = 0;   // passed to llama_model_params
};

// one weight tensor of a mix
struct llqx_probe_tensor {
    std::string   name;                   // as the model's graph reads it, e.g. "blk.0.attn_q.weight"
    int32_t       type         = -1;      // ggml type id its weights go through
    const float * importance   = nullptr; // imatrix values as llama_model_quantize takes them: n_per_row
                                          // per expert slice, slices concatenated; nullptr: none
    int64_t       n_importance = 0;
};

struct llqx_probe_mix {
    std::vector<llqx_probe_tensor> tensors; // none: the base model itself
};

struct llqx_probe_result {
    double kld = 0.0; // mean KL(base || mixed) over the scored tokens
    double nll = 0.0; // mean -log p_mixed(token)
};

// tokens: n_chunk*n_ctx of them, cut and scored as in llqx_eval; results: one per mix; nll_base: the base
// model's exact mean -log p(token). progress(done, total, user_data) counts chunks over every pass (the base
// pass and each mix) and returns false to abort (err = "aborted"). Weights stored as F32, F16 or BF16 only.
bool llqx_probe_mixes(const std::string & model_path, const llqx_probe_params & params, const int32_t * tokens,
                      int32_t n_chunk, const std::vector<llqx_probe_mix> & mixes,
                      std::vector<llqx_probe_result> & results, double & nll_base,
                      llqx_eval_progress_t progress, void * user_data, llqx_error & err);
