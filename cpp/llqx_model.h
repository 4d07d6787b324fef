// GGUF model inspection: tensors and metadata, read without loading tensor data
#pragma once

#include "llqx_error.h"

#include <cstdint>
#include <string>
#include <vector>

struct llqx_tensor_record {
    std::string name;
    int32_t     type;
    int32_t     n_dims;
    int64_t     ne[4];
    uint64_t    offset; // absolute byte offset of the data in the file
    uint64_t    size;   // bytes
};

enum llqx_kv_kind {
    LLQX_KV_INT,
    LLQX_KV_FLOAT,
    LLQX_KV_BOOL,
    LLQX_KV_STRING,
    LLQX_KV_ARRAY_INT,
    LLQX_KV_ARRAY_FLOAT,
    LLQX_KV_ARRAY_BOOL,
    LLQX_KV_ARRAY_STRING,
};

struct llqx_kv_record {
    std::string              key;
    int32_t                  gguf_type;     // gguf_type of the value
    int32_t                  gguf_arr_type; // gguf_type of the elements, -1 for scalars
    llqx_kv_kind             kind;
    int64_t                  i   = 0;
    double                   f   = 0.0;
    std::string              s;
    std::vector<int64_t>     ai;
    std::vector<double>      af;
    std::vector<std::string> as;
};

struct llqx_model_info {
    std::string                     path;
    uint32_t                        version;
    uint64_t                        alignment;
    uint64_t                        data_offset;
    uint64_t                        file_size;
    std::vector<llqx_tensor_record> tensors;
    std::vector<llqx_kv_record>     metadata;
};

// false with err set when the file is missing, not a GGUF, truncated or inconsistent
bool llqx_model_inspect(const std::string & path, llqx_model_info & info, llqx_error & err);
