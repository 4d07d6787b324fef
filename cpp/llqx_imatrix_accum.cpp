#include "llqx_imatrix_accum.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

// "CUDA0#blk.0.attn_k.weight#0" -> "blk.0.attn_k.weight"
static std::string imatrix_weight_name(const char * name) {
    const char * p = strchr(name, '#');
    if (p == nullptr) {
        return name;
    }
    p++;
    const char * q = strchr(p, '#');
    return q != nullptr ? std::string(p, q - p) : std::string(p);
}

static bool imatrix_all_finite(const float * x, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
        if (!std::isfinite(x[j])) {
            return false;
        }
    }
    return true;
}

// the hot loop: one activation row into the sums. Σx² is summed in float exactly as llama-imatrix does
// (same operations, same order), so the file's in_sum2 and every quantization made with it are identical
// to upstream's; Σx, whose terms cancel, is summed in double.
// Built for AVX2 too where the compiler can dispatch at run time: plain adds and multiplies
// (AVX2 without FMA), so both builds round exactly like llama-imatrix's loop.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void imatrix_accumulate(float * GGML_RESTRICT s2, double * GGML_RESTRICT s1, const float * GGML_RESTRICT x, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
        s2[j] += x[j] * x[j];
        s1[j] += (double) x[j];
    }
}

// the block maxima of one activation row: per block of each width, (max |x|)² added to m[i]
static void imatrix_accumulate_max(std::vector<double> * m, int64_t slice, const float * x, int64_t n) {
    for (int i = 0; i < 2; ++i) {
        if (m[i].empty()) {
            continue;
        }
        const int64_t bs = LLQX_IMATRIX_MAX_BLOCKS[i];
        llqx_imatrix_block_max2_add(m[i].data() + slice * (n / bs), x, n / bs, bs, 1.0);
    }
}

// t's data in host memory: in place on the CPU, else copied into scratch
static const char * imatrix_host_data(const ggml_tensor * t, std::vector<char> & scratch) {
    if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
        return (const char *) t->data;
    }
    scratch.resize(ggml_nbytes(t));
    ggml_backend_tensor_get(t, scratch.data(), 0, ggml_nbytes(t));
    return scratch.data();
}

static void imatrix_fail(llqx_imatrix_accum * acc, const std::string & msg) {
    if (!acc->failed.exchange(true)) {
        acc->fail_msg = msg;
    }
}

// the sums of wname (n_mat matrices of rows of n_per_row, n_counts counts), zeroed on first sight;
// nullptr, and the run fails, when a later graph gives the same weight another size
static llqx_imatrix_stats * imatrix_stats_get(llqx_imatrix_accum * acc, const std::string & wname, int64_t n_per_row,
                                              int64_t n_mat, int64_t n_counts) {
    llqx_imatrix_stats & e = acc->stats[wname];
    if (e.in_sum2.empty()) {
        e.n_per_row = n_per_row;
        e.n_expert  = n_mat;
        e.in_sum2.assign(n_per_row * n_mat, 0.0f);
        e.in_sum.assign(n_per_row * n_mat, 0.0);
        e.counts.assign(n_counts, 0);
        for (int i = 0; i < 2; ++i) {
            const int64_t bs = LLQX_IMATRIX_MAX_BLOCKS[i];
            e.in_max2[i].assign(n_per_row % bs == 0 ? n_mat * (n_per_row / bs) : 0, 0.0);
        }
        llqx_sketch_init(e.sketch, n_per_row, n_mat == 1 ? acc->sketch_rank : 0);
    } else if (e.n_per_row != n_per_row || e.n_expert != n_mat) {
        imatrix_fail(acc, "inconsistent size for " + wname);
        return nullptr;
    }
    return &e;
}

static bool imatrix_want(llqx_imatrix_accum * acc, const ggml_tensor * t, const std::string & wname) {
    if (t->op == GGML_OP_MUL_MAT_ID) {
        return true;
    }
    if (t->op != GGML_OP_MUL_MAT) {
        return false;
    }
    const ggml_tensor * src1 = t->src[1];
    // like llama-imatrix: small batches (< 16 rows) and non-F32 activations are not collected
    if (src1->ne[1] < 16 || src1->type != GGML_TYPE_F32) {
        return false;
    }
    return wname.compare(0, 4, "blk.") == 0 || (acc->process_output && wname == "output.weight");
}

static bool imatrix_collect_mul_mat_id(llqx_imatrix_accum * acc, const ggml_tensor * t, const std::string & wname,
                                       const char * data) {
    const ggml_tensor * src0 = t->src[0];
    const ggml_tensor * src1 = t->src[1];
    const ggml_tensor * ids  = t->src[2];

    // ids -> [n_expert_used, n_tokens], src1 -> [cols, n_expert_used or 1, n_tokens]
    const int64_t n_as     = src0->ne[2];
    const int64_t n_ids    = ids->ne[0];
    const int64_t ne0      = src1->ne[0];
    const int64_t n_tokens = src1->ne[2];

    if (ids->ne[1] != n_tokens || ggml_nrows(src1) != src1->ne[1] * src1->ne[2] || ids->type != GGML_TYPE_I32) {
        imatrix_fail(acc, "unsupported layout of the expert matrix multiplication for " + wname);
        return false;
    }

    acc->ids_data.resize(ggml_nbytes(ids));
    ggml_backend_tensor_get(ids, acc->ids_data.data(), 0, ggml_nbytes(ids));

    llqx_imatrix_stats * es = imatrix_stats_get(acc, wname, ne0, n_as, n_as);
    if (es == nullptr) {
        return false;
    }
    llqx_imatrix_stats & e = *es;

    std::vector<uint8_t> touched(n_as, 0);
    for (int64_t idx = 0; idx < n_ids; ++idx) {
        for (int64_t row = 0; row < n_tokens; ++row) {
            const int32_t ex = *(const int32_t *) (acc->ids_data.data() + row * ids->nb[1] + idx * ids->nb[0]);
            if (ex < 0 || ex >= n_as) {
                imatrix_fail(acc, "expert id out of range in " + wname);
                return false;
            }
            const int64_t i11 = idx % src1->ne[1];
            const float * x   = (const float *) (data + i11 * src1->nb[1] + row * src1->nb[2]);
            imatrix_accumulate(e.in_sum2.data() + ex * ne0, e.in_sum.data() + ex * ne0, x, ne0);
            imatrix_accumulate_max(e.in_max2, ex, x, ne0);
            e.counts[ex]++;
            touched[ex] = 1;
        }
    }
    // a non-finite activation makes its sums non-finite: one check per expert, not per row
    for (int64_t ex = 0; ex < n_as; ++ex) {
        if (touched[ex] && !imatrix_all_finite(e.in_sum2.data() + ex * ne0, ne0)) {
            imatrix_fail(acc, "non-finite activations in the input of " + wname);
            return false;
        }
    }
    return true;
}

// a residual writer's input waits for the stream it is added to; a writer whose stream never came (another
// graph layout, fewer output rows) is dropped when the next writer arrives
static void imatrix_hold_writer(llqx_imatrix_accum * acc, const std::string & wname, const ggml_tensor * src1,
                                const char * data) {
    std::string stream;
    if (!llqx_imatrix_stream_name(wname, stream) || src1->ne[2] != 1 || src1->ne[3] != 1) {
        return;
    }
    std::vector<llqx_imatrix_pending> & pending = acc->pending;
    pending.erase(std::remove_if(pending.begin(), pending.end(),
                                 [&](const llqx_imatrix_pending & p) { return p.stream != stream || p.wname == wname; }),
                  pending.end());
    llqx_imatrix_pending p;
    p.wname  = wname;
    p.stream = stream;
    p.ne0    = src1->ne[0];
    p.n_rows = src1->ne[1];
    p.x.resize((size_t) p.ne0 * (size_t) p.n_rows);
    for (int64_t row = 0; row < p.n_rows; ++row) {
        memcpy(p.x.data() + row * p.ne0, data + row * src1->nb[1], (size_t) p.ne0 * sizeof(float));
    }
    pending.push_back(std::move(p));
}

static bool imatrix_is_stream(const char * name) {
    return strncmp(name, "ffn_inp-", 8) == 0 || strncmp(name, "l_out-", 6) == 0;
}

// the stream t has been computed: the writers waiting for it add their rows, weighted by it
static void imatrix_collect_stream(llqx_imatrix_accum * acc, const ggml_tensor * t) {
    std::vector<llqx_imatrix_pending> & pending = acc->pending;
    const bool wanted = std::any_of(pending.begin(), pending.end(),
                                    [&](const llqx_imatrix_pending & p) { return p.stream == t->name; });
    if (!wanted) {
        return;
    }
    const int64_t n_embd = t->ne[0];
    const int64_t n_rows = ggml_nrows(t);
    if (t->type == GGML_TYPE_F32 && t->nb[0] == sizeof(float) && t->ne[2] * t->ne[3] == 1) {
        const char * data = imatrix_host_data(t, acc->stream_data);
        for (const auto & p : pending) {
            if (p.stream == t->name && p.n_rows == n_rows) {
                llqx_imatrix_stream_add(acc->stats[p.wname].stream, p.x.data(), p.ne0, p.ne0, (const float *) data,
                                        n_embd, (int64_t) (t->nb[1] / sizeof(float)), n_rows);
            }
        }
    }
    pending.erase(std::remove_if(pending.begin(), pending.end(),
                                 [&](const llqx_imatrix_pending & p) { return p.stream == t->name; }),
                  pending.end());
}

static bool imatrix_collect_mul_mat(llqx_imatrix_accum * acc, const ggml_tensor * t, const std::string & wname,
                                    const char * data) {
    const ggml_tensor * src0 = t->src[0];
    const ggml_tensor * src1 = t->src[1];

    const int64_t n_mat = src0->ne[2] * src0->ne[3];
    const int64_t ne0   = src1->ne[0];

    llqx_imatrix_stats * es = imatrix_stats_get(acc, wname, ne0, n_mat, 1);
    if (es == nullptr) {
        return false;
    }
    llqx_imatrix_stats & e = *es;

    for (int64_t i3 = 0; i3 < src1->ne[3]; ++i3) {
        for (int64_t i2 = 0; i2 < src1->ne[2]; ++i2) {
            // 3-D+ activations of a 2-D weight are flattened into its one matrix
            const int64_t mat_id = (i3 % src0->ne[3]) * src0->ne[2] + (i2 % src0->ne[2]);
            float *  s2 = e.in_sum2.data() + mat_id * ne0;
            double * s1 = e.in_sum.data()  + mat_id * ne0;
            const char * rows = data + i2 * src1->nb[2] + i3 * src1->nb[3];
            for (int64_t row = 0; row < src1->ne[1]; ++row) {
                const float * x = (const float *) (rows + row * src1->nb[1]);
                imatrix_accumulate(s2, s1, x, ne0);
                imatrix_accumulate_max(e.in_max2, mat_id, x, ne0);
            }
            // rows are contiguous F32 (checked by the callback), nb[1] a whole number of floats
            llqx_sketch_add_rows(e.sketch, (const float *) rows, src1->ne[1], (int64_t) (src1->nb[1] / sizeof(float)));
        }
    }
    if (!imatrix_all_finite(e.in_sum2.data(), (int64_t) e.in_sum2.size())) {
        imatrix_fail(acc, "non-finite activations in the input of " + wname);
        return false;
    }
    imatrix_hold_writer(acc, wname, src1, data);
    // one count per dense tensor, like llama-imatrix (rows per matrix)
    for (auto & c : e.counts) {
        c += ggml_nrows(src1) / n_mat;
    }
    return true;
}

bool llqx_imatrix_accum_cb_eval(ggml_tensor * t, bool ask, void * user_data) {
    auto * acc = (llqx_imatrix_accum *) user_data;
    if (acc->failed.load()) {
        return false;
    }
    if (imatrix_is_stream(t->name)) {
        if (!ask) {
            imatrix_collect_stream(acc, t);
        }
        return true;
    }
    const ggml_tensor * src0 = t->src[0];
    if (src0 == nullptr || t->src[1] == nullptr) {
        return ask ? false : true;
    }
    const std::string wname = imatrix_weight_name(src0->name);
    if (ask) {
        return imatrix_want(acc, t, wname);
    }

    const ggml_tensor * src1 = t->src[1];
    if (src1->type != GGML_TYPE_F32 || src1->nb[0] != sizeof(float)) {
        imatrix_fail(acc, "activations of " + wname + " are not contiguous F32 rows");
        return false;
    }
    const auto t0 = std::chrono::steady_clock::now();
    struct timer {
        llqx_imatrix_accum * acc;
        std::chrono::steady_clock::time_point t0;
        ~timer() { acc->t_collect_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
    } guard{ acc, t0 };
    const char * data = imatrix_host_data(src1, acc->src1_data);
    if (t->op == GGML_OP_MUL_MAT_ID) {
        return imatrix_collect_mul_mat_id(acc, t, wname, data);
    }
    return imatrix_collect_mul_mat(acc, t, wname, data);
}

bool llqx_imatrix_accum_cb_abort(void * user_data) {
    return ((llqx_imatrix_accum *) user_data)->failed.load();
}

void llqx_imatrix_accum_entries(const llqx_imatrix_accum & acc, std::vector<llqx_imatrix_sums> & out) {
    out.clear();
    out.reserve(acc.stats.size());
    for (const auto & kv : acc.stats) {
        llqx_imatrix_sums e;
        e.name      = kv.first;
        e.n_per_row = kv.second.n_per_row;
        e.n_expert  = kv.second.n_expert;
        e.in_sum2   = kv.second.in_sum2;
        e.in_sum    = kv.second.in_sum;
        e.counts    = kv.second.counts;
        for (int i = 0; i < 2; ++i) {
            e.in_max2[i].assign(kv.second.in_max2[i].begin(), kv.second.in_max2[i].end());
        }
        if (kv.second.sketch.p > 0) {
            e.sketch_rank = kv.second.sketch.p;
            llqx_sketch_result(kv.second.sketch, e.in_sketch);
        }
        e.in_sum2_stream.assign(kv.second.stream.in_sum2.begin(), kv.second.stream.in_sum2.end());
        e.in_sum_stream.assign(kv.second.stream.in_sum.begin(), kv.second.stream.in_sum.end());
        e.count_stream = kv.second.stream.count;
        for (int i = 0; i < 2; ++i) {
            e.in_max2_stream[i] = kv.second.stream.in_max2[i];
        }
        if ((int64_t) e.counts.size() != e.n_expert) {
            // a dense 3-D weight has one count: its matrices form one row, like llama-imatrix writes it
            e.n_per_row = e.n_per_row * e.n_expert / (int64_t) e.counts.size();
            e.n_expert  = (int64_t) e.counts.size();
        }
        out.push_back(std::move(e));
    }
}
