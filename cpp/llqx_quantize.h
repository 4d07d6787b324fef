// llama_model_quantize with every field of llama_model_quantize_params, in owning containers
#pragma once

#include "llqx_error.h"

#include <cstdint>
#include <string>
#include <vector>

struct llqx_tensor_override {
    std::string pattern; // regex, matched as a substring (llama.cpp's rule)
    int32_t     type;
};

struct llqx_imatrix_entry {
    std::string        name;
    std::vector<float> values; // per-expert E[x^2], concatenated
};

enum llqx_kv_override_tag {
    LLQX_KV_OVERRIDE_INT   = 0,
    LLQX_KV_OVERRIDE_FLOAT = 1,
    LLQX_KV_OVERRIDE_BOOL  = 2,
    LLQX_KV_OVERRIDE_STR   = 3,
};

struct llqx_kv_override {
    std::string key;
    int32_t     tag;
    int64_t     val_i64  = 0;
    double      val_f64  = 0.0;
    bool        val_bool = false;
    std::string val_str;
};

struct llqx_quantize_request {
    std::string input;
    std::string output;
    int32_t     nthread                = 0;
    int32_t     ftype                  = 7; // LLAMA_FTYPE_MOSTLY_Q8_0
    int32_t     output_tensor_type     = -1; // -1: llama.cpp's choice
    int32_t     token_embedding_type   = -1;
    bool        allow_requantize       = false;
    bool        quantize_output_tensor = true;
    bool        only_copy              = false;
    bool        pure                   = false;
    bool        keep_split             = false;
    bool        dry_run                = false;
    uint64_t    max_buf_size           = 0;
    std::vector<llqx_imatrix_entry>   imatrix;
    std::vector<llqx_kv_override>     kv_overrides;
    std::vector<llqx_tensor_override> tensor_overrides;
    std::vector<int32_t>              prune_layers;
};

// false with err set when llama.cpp refuses or fails; never throws
bool llqx_model_quantize(const llqx_quantize_request & req, llqx_error & err);

