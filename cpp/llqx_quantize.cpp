#include "llqx_quantize.h"

#include "llqx_llama.h"

#include "ggml.h"
#include "llama.h"

#include <cstring>
#include <exception>

bool llqx_model_quantize(const llqx_quantize_request & req, llqx_error & err) {
    if (req.output_tensor_type >= GGML_TYPE_COUNT || req.token_embedding_type >= GGML_TYPE_COUNT) {
        err = { LLQX_STATUS_INPUT, "invalid tensor type id" };
        return false;
    }
    for (const auto & kv : req.kv_overrides) {
        if (kv.key.size() >= 128) {
            err = { LLQX_STATUS_INPUT, "metadata key too long: " + kv.key };
            return false;
        }
    }

    llama_model_quantize_params params = llama_model_quantize_default_params();
    params.nthread                = req.nthread;
    params.ftype                  = (llama_ftype) req.ftype;
    params.output_tensor_type     = req.output_tensor_type < 0 ? GGML_TYPE_COUNT : (ggml_type) req.output_tensor_type;
    params.token_embedding_type   = req.token_embedding_type < 0 ? GGML_TYPE_COUNT : (ggml_type) req.token_embedding_type;
    params.allow_requantize       = req.allow_requantize;
    params.quantize_output_tensor = req.quantize_output_tensor;
    params.only_copy              = req.only_copy;
    params.pure                   = req.pure;
    params.keep_split             = req.keep_split;
    params.dry_run                = req.dry_run;
    if (req.max_buf_size > 0) {
        params.max_buf_size = (size_t) req.max_buf_size;
    }

    // the C API takes terminated plain arrays pointing into our containers
    std::vector<llama_model_imatrix_data> imatrix;
    if (!req.imatrix.empty()) {
        imatrix.reserve(req.imatrix.size() + 1);
        for (const auto & e : req.imatrix) {
            imatrix.push_back({ e.name.c_str(), e.values.data(), e.values.size() });
        }
        imatrix.push_back({ nullptr, nullptr, 0 });
        params.imatrix = imatrix.data();
    }

    std::vector<llama_model_kv_override> kv_overrides;
    if (!req.kv_overrides.empty()) {
        kv_overrides.reserve(req.kv_overrides.size() + 1);
        for (const auto & kv : req.kv_overrides) {
            llama_model_kv_override o;
            std::memset(&o, 0, sizeof(o));
            std::strncpy(o.key, kv.key.c_str(), sizeof(o.key) - 1);
            o.tag = (llama_model_kv_override_type) kv.tag;
            switch (kv.tag) {
                case LLQX_KV_OVERRIDE_INT:   o.val_i64  = kv.val_i64;  break;
                case LLQX_KV_OVERRIDE_FLOAT: o.val_f64  = kv.val_f64;  break;
                case LLQX_KV_OVERRIDE_BOOL:  o.val_bool = kv.val_bool; break;
                case LLQX_KV_OVERRIDE_STR:
                    std::strncpy(o.val_str, kv.val_str.c_str(), sizeof(o.val_str) - 1);
                    break;
                default:
                    err = { LLQX_STATUS_INPUT, "invalid metadata override type for " + kv.key };
                    return false;
            }
            kv_overrides.push_back(o);
        }
        kv_overrides.emplace_back();
        std::memset(&kv_overrides.back(), 0, sizeof(llama_model_kv_override));
        params.kv_overrides = kv_overrides.data();
    }

    std::vector<llama_model_tensor_override> tt_overrides;
    if (!req.tensor_overrides.empty()) {
        tt_overrides.reserve(req.tensor_overrides.size() + 1);
        for (const auto & tt : req.tensor_overrides) {
            tt_overrides.push_back({ tt.pattern.c_str(), (ggml_type) tt.type });
        }
        tt_overrides.push_back({ nullptr, GGML_TYPE_COUNT });
        params.tt_overrides = tt_overrides.data();
    }

    std::vector<int32_t> prune_layers;
    if (!req.prune_layers.empty()) {
        prune_layers = req.prune_layers;
        prune_layers.push_back(-1);
        params.prune_layers = prune_layers.data();
    }

    llqx_backend_init();
    uint32_t rc = 1;
    try {
        rc = llama_model_quantize(req.input.c_str(), req.output.c_str(), &params);
    } catch (const std::exception & e) {
        err = { LLQX_STATUS_CORE, e.what() };
        return false;
    }
    if (rc != 0) {
        err = { LLQX_STATUS_CORE, "llama.cpp failed to quantize " + req.input };
        return false;
    }
    return true;
}
