#include "llqx_model.h"

#include "ggml.h"
#include "gguf.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>

static bool gguf_type_is_int(gguf_type t) {
    return t == GGUF_TYPE_UINT8  || t == GGUF_TYPE_INT8  || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_INT16 ||
           t == GGUF_TYPE_UINT32 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_UINT64 || t == GGUF_TYPE_INT64;
}

static int64_t gguf_int_at(gguf_type t, const void * data, size_t i) {
    switch (t) {
        case GGUF_TYPE_UINT8:  return ((const uint8_t  *) data)[i];
        case GGUF_TYPE_INT8:   return ((const int8_t   *) data)[i];
        case GGUF_TYPE_UINT16: return ((const uint16_t *) data)[i];
        case GGUF_TYPE_INT16:  return ((const int16_t  *) data)[i];
        case GGUF_TYPE_UINT32: return ((const uint32_t *) data)[i];
        case GGUF_TYPE_INT32:  return ((const int32_t  *) data)[i];
        case GGUF_TYPE_UINT64: return (int64_t) ((const uint64_t *) data)[i];
        case GGUF_TYPE_INT64:  return ((const int64_t  *) data)[i];
        default:               return 0;
    }
}

static double gguf_float_at(gguf_type t, const void * data, size_t i) {
    return t == GGUF_TYPE_FLOAT32 ? (double) ((const float *) data)[i] : ((const double *) data)[i];
}

static void kv_read(const gguf_context * ctx, int64_t id, llqx_kv_record & kv) {
    const gguf_type t = gguf_get_kv_type(ctx, id);
    kv.key           = gguf_get_key(ctx, id);
    kv.gguf_type     = t;
    kv.gguf_arr_type = -1;
    if (t == GGUF_TYPE_STRING) {
        kv.kind = LLQX_KV_STRING;
        kv.s    = gguf_get_val_str(ctx, id);
    } else if (t == GGUF_TYPE_BOOL) {
        kv.kind = LLQX_KV_BOOL;
        kv.i    = gguf_get_val_bool(ctx, id);
    } else if (t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64) {
        kv.kind = LLQX_KV_FLOAT;
        kv.f    = gguf_float_at(t, gguf_get_val_data(ctx, id), 0);
    } else if (gguf_type_is_int(t)) {
        kv.kind = LLQX_KV_INT;
        kv.i    = gguf_int_at(t, gguf_get_val_data(ctx, id), 0);
    } else if (t == GGUF_TYPE_ARRAY) {
        const gguf_type at = gguf_get_arr_type(ctx, id);
        const size_t    n  = gguf_get_arr_n(ctx, id);
        kv.gguf_arr_type = at;
        if (at == GGUF_TYPE_STRING) {
            kv.kind = LLQX_KV_ARRAY_STRING;
            kv.as.reserve(n);
            for (size_t i = 0; i < n; ++i) {
                kv.as.emplace_back(gguf_get_arr_str(ctx, id, i));
            }
        } else if (at == GGUF_TYPE_FLOAT32 || at == GGUF_TYPE_FLOAT64) {
            kv.kind = LLQX_KV_ARRAY_FLOAT;
            const void * data = gguf_get_arr_data(ctx, id);
            kv.af.resize(n);
            for (size_t i = 0; i < n; ++i) {
                kv.af[i] = gguf_float_at(at, data, i);
            }
        } else if (at == GGUF_TYPE_BOOL) {
            kv.kind = LLQX_KV_ARRAY_BOOL;
            const int8_t * data = (const int8_t *) gguf_get_arr_data(ctx, id);
            kv.ai.assign(data, data + n);
        } else {
            kv.kind = LLQX_KV_ARRAY_INT;
            const void * data = gguf_get_arr_data(ctx, id);
            kv.ai.resize(n);
            for (size_t i = 0; i < n; ++i) {
                kv.ai[i] = gguf_int_at(at, data, i);
            }
        }
    }
}

bool llqx_model_inspect(const std::string & path, llqx_model_info & info, llqx_error & err) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) {
        err = { LLQX_STATUS_LOAD,
                std::filesystem::exists(path, ec) ? "not a regular file: " + path : "no such file: " + path };
        return false;
    }
    info.file_size = std::filesystem::file_size(path, ec);

    char magic[4] = {0, 0, 0, 0};
    if (FILE * f = std::fopen(path.c_str(), "rb")) {
        const size_t n = std::fread(magic, 1, sizeof(magic), f);
        std::fclose(f);
        if (n != sizeof(magic) || std::memcmp(magic, "GGUF", 4) != 0) {
            err = { LLQX_STATUS_LOAD, "not a GGUF file: " + path };
            return false;
        }
    } else {
        err = { LLQX_STATUS_LOAD, "cannot open " + path + ": " + std::strerror(errno) };
        return false;
    }

    gguf_init_params params = { /*no_alloc =*/ true, /*ctx =*/ nullptr };
    gguf_context * ctx = gguf_init_from_file(path.c_str(), params);
    if (ctx == nullptr) {
        err = { LLQX_STATUS_LOAD, "corrupt or truncated GGUF file: " + path };
        return false;
    }

    info.path        = path;
    info.version     = gguf_get_version(ctx);
    info.alignment   = gguf_get_alignment(ctx);
    info.data_offset = gguf_get_data_offset(ctx);

    const int64_t n_kv = gguf_get_n_kv(ctx);
    info.metadata.resize(n_kv);
    for (int64_t i = 0; i < n_kv; ++i) {
        kv_read(ctx, i, info.metadata[i]);
    }

    const int64_t n_tensors = gguf_get_n_tensors(ctx);
    info.tensors.resize(n_tensors);
    for (int64_t i = 0; i < n_tensors; ++i) {
        llqx_tensor_record & t = info.tensors[i];
        const int64_t * ne = gguf_get_tensor_ne(ctx, i);
        t.name   = gguf_get_tensor_name(ctx, i);
        t.type   = gguf_get_tensor_type(ctx, i);
        t.offset = info.data_offset + gguf_get_tensor_offset(ctx, i);
        t.size   = gguf_get_tensor_size(ctx, i);
        t.n_dims = 1;
        for (int d = 0; d < 4; ++d) {
            t.ne[d] = ne[d];
            if (ne[d] > 1) {
                t.n_dims = d + 1;
            }
        }
        if (t.offset + t.size > info.file_size) {
            err = { LLQX_STATUS_LOAD, "truncated GGUF file: tensor " + t.name + " ends past the end of " + path };
            gguf_free(ctx);
            return false;
        }
    }
    gguf_free(ctx);
    return true;
}
