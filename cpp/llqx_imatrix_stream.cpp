#include "llqx_imatrix_stream.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

bool llqx_imatrix_stream_name(const std::string & wname, std::string & stream) {
    // blk.N.<kind>.weight
    if (wname.compare(0, 4, "blk.") != 0) {
        return false;
    }
    const size_t dot = wname.find('.', 4);
    if (dot == std::string::npos || dot == 4) {
        return false;
    }
    const std::string layer = wname.substr(4, dot - 4);
    for (char c : layer) {
        if (c < '0' || c > '9') {
            return false;
        }
    }
    const std::string kind = wname.substr(dot + 1);
    if (kind == "attn_output.weight") {
        stream = "ffn_inp-" + layer;
        return true;
    }
    if (kind == "ffn_down.weight" || kind == "ffn_down_shexp.weight") {
        stream = "l_out-" + layer;
        return true;
    }
    return false;
}

void llqx_imatrix_block_max2_add(double * dst, const float * x, int64_t n_blocks, int64_t bs, double w) {
    for (int64_t b = 0; b < n_blocks; ++b) {
        float amax = 0.0f;
        for (int64_t k = b * bs; k < (b + 1) * bs; ++k) {
            amax = std::max(amax, std::fabs(x[k]));
        }
        dst[b] += w * (double) amax * (double) amax;
    }
}

void llqx_imatrix_stream_add(llqx_imatrix_stream_sums & sums, const float * x, int64_t ne0, int64_t x_stride,
                             const float * s, int64_t n_embd, int64_t s_stride, int64_t n_rows) {
    if (sums.in_sum2.empty()) {
        sums.in_sum2.assign(ne0, 0.0);
        sums.in_sum.assign(ne0, 0.0);
        for (int i = 0; i < 2; ++i) {
            const int64_t bs = LLQX_IMATRIX_MAX_BLOCKS[i];
            sums.in_max2[i].assign(ne0 % bs == 0 ? ne0 / bs : 0, 0.0);
        }
    }
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * sr = s + r * s_stride;
        double ss = 0.0;
        for (int64_t k = 0; k < n_embd; ++k) {
            ss += (double) sr[k] * (double) sr[k];
        }
        if (!(ss > 0.0) || !std::isfinite(ss)) {
            continue;
        }
        const double w  = (double) n_embd / ss;
        const double sw = std::sqrt(w);
        const float * xr = x + r * x_stride;
        for (int64_t j = 0; j < ne0; ++j) {
            const double v = (double) xr[j];
            sums.in_sum2[j] += w * v * v;
            sums.in_sum[j]  += sw * v;
        }
        for (int i = 0; i < 2; ++i) {
            llqx_imatrix_block_max2_add(sums.in_max2[i].data(), xr, (int64_t) sums.in_max2[i].size(),
                                        LLQX_IMATRIX_MAX_BLOCKS[i], w);
        }
        sums.count++;
    }
}
