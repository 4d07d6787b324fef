// ggml type table and row quantization on top of ggml's public API
#pragma once

#include "llqx_error.h"

#include <cstddef>
#include <cstdint>
#include <string>

struct llqx_type_info {
    int32_t     id;
    std::string name;
    int64_t     block_size;       // elements per block
    int64_t     type_size;        // bytes per block
    double      bpw;              // bits per weight
    bool        is_quantized;
    bool        can_quantize;     // ggml_quantize_chunk can produce it from F32 rows
    bool        requires_imatrix; // llqx_tensor_requires_imatrix for a tensor other than token_embd/output
    bool        has_grid;         // ggml_quantize_init builds a lookup grid for it (megabytes, seconds)
    int64_t     act_block;        // ggml's CPU dot product with it rounds the activations to an 8-bit type with
                                  // blocks of this many values (Q8_0/Q8_1: 32, Q8_K: 256); 0: it keeps them in float
};

int32_t llqx_type_count(void);

// false when id is not a live ggml type (removed ids have no traits)
bool llqx_type_info_get(int32_t id, llqx_type_info & info);

// llama.cpp cannot write tensor `name` as `type` without importance data: its writer refuses
// (tensor_requires_imatrix in llama-quant.cpp: IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS, but never token_embd,
// per_layer_token_embd or output) or ggml aborts (ggml_quantize_requires_imatrix: IQ2_XXS, IQ2_XS, IQ1_S,
// for every tensor). Leaves out llama.cpp's Q2_K case (only inside a Q2_K_S file); false for unknown types.
bool llqx_tensor_requires_imatrix(const std::string & name, int32_t type);

// -1 when the name is unknown; case-insensitive, as llama-quantize parses it
int32_t llqx_type_from_name(const std::string & name);

// bytes of one row of n_per_row elements, 0 when n_per_row is not a multiple of the block size
size_t llqx_row_size(int32_t type, int64_t n_per_row);

// prepares the lookup grids of the IQ types once, so timed or threaded work does not pay for it
void llqx_quantize_init(int32_t type);

// frees every grid llqx_quantize_init (or any quantization) built; the next use of a type builds its
// grid again. Nothing may be quantizing at the time.
void llqx_quantize_free(void);

// quantize nrows rows of n_per_row floats into dst (llqx_row_size(type, n_per_row) * nrows bytes);
// imatrix: n_per_row importance weights or nullptr. Returns bytes written, or -1 with err set.
int64_t llqx_quantize_rows(int32_t type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                           const float * imatrix, llqx_error & err);

// dequantize nrows rows into dst (nrows * n_per_row floats). false with err set on failure.
bool llqx_dequantize_rows(int32_t type, const void * src, float * dst, int64_t nrows, int64_t n_per_row,
                          llqx_error & err);
