#include "llqx_types.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <cctype>
#include <cstring>

// types ggml_quantize_chunk writes (its switch); others would silently write nothing in release builds
static bool type_can_quantize(ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q1_0:
        case GGML_TYPE_Q2_0:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_MXFP4:
        case GGML_TYPE_NVFP4:
        case GGML_TYPE_Q2_K:
        case GGML_TYPE_Q3_K:
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K:
        case GGML_TYPE_Q6_K:
        case GGML_TYPE_TQ1_0:
        case GGML_TYPE_TQ2_0:
        case GGML_TYPE_IQ2_XXS:
        case GGML_TYPE_IQ2_XS:
        case GGML_TYPE_IQ2_S:
        case GGML_TYPE_IQ3_XXS:
        case GGML_TYPE_IQ3_S:
        case GGML_TYPE_IQ1_S:
        case GGML_TYPE_IQ1_M:
        case GGML_TYPE_IQ4_NL:
        case GGML_TYPE_IQ4_XS:
            return true;
        default:
            return false;
    }
}

// tensor_requires_imatrix in llama-quant.cpp, whose Q2_K case (only inside a Q2_K_S file) is left out
static bool tensor_requires_imatrix(const std::string & name, ggml_type type) {
    // tensor_name_match_token_embd, tensor_name_match_output_weight
    if (name == "token_embd.weight" || name == "per_layer_token_embd.weight" || name == "output.weight") {
        return false;
    }
    switch (type) {
        case GGML_TYPE_IQ3_XXS:
        case GGML_TYPE_IQ2_XXS:
        case GGML_TYPE_IQ2_XS:
        case GGML_TYPE_IQ2_S:
        case GGML_TYPE_IQ1_M:
        case GGML_TYPE_IQ1_S:
            return true;
        default:
            return false;
    }
}

// the types ggml_quantize_init builds tables for (ggml.c)
static bool type_has_grid(ggml_type type) {
    switch (type) {
        case GGML_TYPE_IQ2_XXS:
        case GGML_TYPE_IQ2_XS:
        case GGML_TYPE_IQ2_S:
        case GGML_TYPE_IQ1_S:
        case GGML_TYPE_IQ1_M:
        case GGML_TYPE_IQ3_XXS:
        case GGML_TYPE_IQ3_S:
            return true;
        default:
            return false;
    }
}

static bool type_is_live(int32_t id) {
    if (id < 0 || id >= GGML_TYPE_COUNT) {
        return false;
    }
    const ggml_type_traits * traits = ggml_get_type_traits((ggml_type) id);
    return traits->blck_size > 0 && traits->type_name != nullptr && std::strcmp(traits->type_name, "NONE") != 0;
}

int32_t llqx_type_count(void) {
    return GGML_TYPE_COUNT;
}

bool llqx_type_info_get(int32_t id, llqx_type_info & info) {
    if (!type_is_live(id)) {
        return false;
    }
    const ggml_type type = (ggml_type) id;
    const ggml_type_traits * traits = ggml_get_type_traits(type);
    info.id               = id;
    info.name             = traits->type_name;
    info.block_size       = traits->blck_size;
    info.type_size        = (int64_t) traits->type_size;
    info.bpw              = 8.0 * (double) traits->type_size / (double) traits->blck_size;
    info.is_quantized     = traits->is_quantized;
    info.can_quantize     = type_can_quantize(type);
    info.requires_imatrix = llqx_tensor_requires_imatrix("", id); // "": neither token_embd nor output
    info.has_grid         = type_has_grid(type);
    const ggml_type_traits_cpu * cpu = ggml_get_type_traits_cpu(type);
    const ggml_type dot = cpu != nullptr ? cpu->vec_dot_type : GGML_TYPE_F32;
    info.act_block        = ggml_is_quantized(dot) ? ggml_blck_size(dot) : 0;
    return true;
}

bool llqx_tensor_requires_imatrix(const std::string & name, int32_t type) {
    if (!type_is_live(type)) {
        return false;
    }
    // llama.cpp's writer refuses the tensor, or ggml_quantize_chunk asserts, whatever the tensor
    return tensor_requires_imatrix(name, (ggml_type) type) || ggml_quantize_requires_imatrix((ggml_type) type);
}

int32_t llqx_type_from_name(const std::string & name) {
    for (int32_t id = 0; id < GGML_TYPE_COUNT; ++id) {
        if (!type_is_live(id)) {
            continue;
        }
        const char * tn = ggml_type_name((ggml_type) id);
        if (std::strlen(tn) != name.size()) {
            continue;
        }
        bool same = true;
        for (size_t i = 0; i < name.size() && same; ++i) {
            same = std::tolower((unsigned char) tn[i]) == std::tolower((unsigned char) name[i]);
        }
        if (same) {
            return id;
        }
    }
    return -1;
}

size_t llqx_row_size(int32_t type, int64_t n_per_row) {
    if (!type_is_live(type) || n_per_row <= 0 || n_per_row % ggml_blck_size((ggml_type) type) != 0) {
        return 0;
    }
    return ggml_row_size((ggml_type) type, n_per_row);
}

void llqx_quantize_init(int32_t type) {
    if (type_can_quantize((ggml_type) type)) {
        ggml_quantize_init((ggml_type) type);
    }
}

void llqx_quantize_free(void) {
    ggml_quantize_free();
}

int64_t llqx_quantize_rows(int32_t type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                           const float * imatrix, llqx_error & err) {
    if (!type_is_live(type) || !type_can_quantize((ggml_type) type)) {
        err = { LLQX_STATUS_INPUT, std::string("type ") +
                (type_is_live(type) ? ggml_type_name((ggml_type) type) : std::to_string(type)) +
                " cannot be quantized to" };
        return -1;
    }
    if (llqx_row_size(type, n_per_row) == 0) {
        err = { LLQX_STATUS_INPUT, "row length " + std::to_string(n_per_row) + " is not a multiple of the block size " +
                std::to_string(ggml_blck_size((ggml_type) type)) + " of " + ggml_type_name((ggml_type) type) };
        return -1;
    }
    if (imatrix == nullptr && ggml_quantize_requires_imatrix((ggml_type) type)) {
        err = { LLQX_STATUS_INPUT,
                std::string("type ") + ggml_type_name((ggml_type) type) + " requires importance weights" };
        return -1;
    }
    return (int64_t) ggml_quantize_chunk((ggml_type) type, src, dst, 0, nrows, n_per_row, imatrix);
}

bool llqx_dequantize_rows(int32_t type, const void * src, float * dst, int64_t nrows, int64_t n_per_row,
                          llqx_error & err) {
    if (!type_is_live(type)) {
        err = { LLQX_STATUS_INPUT, "unknown type id " + std::to_string(type) };
        return false;
    }
    if (llqx_row_size(type, n_per_row) == 0) {
        err = { LLQX_STATUS_INPUT, "row length " + std::to_string(n_per_row) + " is not a multiple of the block size of " +
                ggml_type_name((ggml_type) type) };
        return false;
    }
    const ggml_type_traits * traits = ggml_get_type_traits((ggml_type) type);
    if (type == GGML_TYPE_F32) {
        std::memcpy(dst, src, sizeof(float) * (size_t) (nrows * n_per_row));
        return true;
    }
    if (traits->to_float == nullptr) {
        err = { LLQX_STATUS_INPUT, std::string("type ") + traits->type_name + " cannot be dequantized" };
        return false;
    }
    traits->to_float(src, dst, nrows * n_per_row);
    return true;
}
