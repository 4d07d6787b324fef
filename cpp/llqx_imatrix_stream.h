// the stream-relative sums of a residual writer's input (attn_output, ffn_down): its activations weighted per
// token by 1 / mean(s²) of the residual stream s it writes into, which is what the next RMSNorm divides by.
// An error the writer adds to a token's stream reaches the next sub-layer as a change of s / rms(s), so these
// sums price it as the next sub-layer sees it (docs/method.md, scoring). Knows nothing of llama.cpp's graph
// beyond the names of the stream tensors (llqx_imatrix_accum.cpp).
#pragma once

#include "llqx_imatrix.h"

#include <cstdint>
#include <string>
#include <vector>

struct llqx_imatrix_stream_sums {
    std::vector<double> in_sum2; // Σ_t x_t² / ms(s_t)
    std::vector<double> in_sum;  // Σ_t x_t / rms(s_t)
    // per block of LLQX_IMATRIX_MAX_BLOCKS[i] columns: Σ_t (max |x_t| over the block)² / ms(s_t), which prices the
    // 8-bit rounding of the writer's input where its error lands; empty when the width is not whole blocks
    std::vector<double> in_max2[2];
    int64_t             count = 0; // tokens summed
};

// the graph tensor holding the residual stream right after weight wname writes into it ("ffn_inp-N" after
// blk.N.attn_output, "l_out-N" after blk.N.ffn_down and blk.N.ffn_down_shexp); false for other weights
bool llqx_imatrix_stream_name(const std::string & wname, std::string & stream);

// per block of bs values of x (n_blocks blocks), w · (max |x| over the block)² added to dst[b]; the collector's
// plain block maxima (w = 1) and the stream-weighted ones share it
void llqx_imatrix_block_max2_add(double * dst, const float * x, int64_t n_blocks, int64_t bs, double w);

// adds n_rows tokens: x (rows of ne0, row stride x_stride floats) weighted by the matching rows of the stream
// s (rows of n_embd, stride s_stride); a token whose stream is all zero is skipped
void llqx_imatrix_stream_add(llqx_imatrix_stream_sums & sums, const float * x, int64_t ne0, int64_t x_stride,
                             const float * s, int64_t n_embd, int64_t s_stride, int64_t n_rows);
