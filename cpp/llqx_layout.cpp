#include "llqx_layout.h"

#include "ggml.h"
#include "gguf.h"

int64_t llqx_layout_meta_size(const std::string & path, const std::vector<llqx_kv_override> & kv_overrides,
                              int32_t ftype, llqx_error & err) {
    ggml_context * ctx_data = nullptr;
    gguf_init_params params = { /*no_alloc =*/ true, /*ctx =*/ &ctx_data };
    gguf_context * ctx_in = gguf_init_from_file(path.c_str(), params);
    if (ctx_in == nullptr) {
        err = { LLQX_STATUS_LOAD, "cannot read GGUF " + path };
        return -1;
    }
    // what llama_model_quantize does to the metadata (llama-quant.cpp)
    gguf_context * ctx_out = gguf_init_empty();
    gguf_set_kv(ctx_out, ctx_in);
    gguf_set_val_u32(ctx_out, "general.quantization_version", GGML_QNT_VERSION);
    gguf_set_val_u32(ctx_out, "general.file_type", (uint32_t) ftype);
    gguf_remove_key(ctx_out, "split.no");
    gguf_remove_key(ctx_out, "split.count");
    gguf_remove_key(ctx_out, "split.tensors.count");
    for (const auto & o : kv_overrides) {
        switch (o.tag) {
            case LLQX_KV_OVERRIDE_FLOAT: gguf_set_val_f32(ctx_out, o.key.c_str(), (float) o.val_f64); break;
            case LLQX_KV_OVERRIDE_INT:
                gguf_set_val_u32(ctx_out, o.key.c_str(), (uint32_t) (o.val_i64 < 0 ? -o.val_i64 : o.val_i64));
                break;
            case LLQX_KV_OVERRIDE_BOOL:  gguf_set_val_bool(ctx_out, o.key.c_str(), o.val_bool); break;
            case LLQX_KV_OVERRIDE_STR:
                gguf_set_val_str(ctx_out, o.key.c_str(), o.val_str.substr(0, 127).c_str());
                break;
            default: break;
        }
    }
    const int64_t n_tensors = gguf_get_n_tensors(ctx_in);
    for (int64_t i = 0; i < n_tensors; ++i) {
        const ggml_tensor * t = ggml_get_tensor(ctx_data, gguf_get_tensor_name(ctx_in, i));
        if (t == nullptr) {
            err = { LLQX_STATUS_LOAD, "tensor missing from " + path };
            gguf_free(ctx_out);
            gguf_free(ctx_in);
            ggml_free(ctx_data);
            return -1;
        }
        gguf_add_tensor(ctx_out, t);
    }
    const int64_t size = (int64_t) gguf_get_meta_size(ctx_out);
    gguf_free(ctx_out);
    gguf_free(ctx_in);
    ggml_free(ctx_data);
    return size;
}
