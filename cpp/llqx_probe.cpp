#include "llqx_probe.h"

#include "llqx_parallel.h"
#include "llqx_types.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <thread>

namespace {

// the weight tensors the graph reads, by name, recorded by the graph callback while collect is set. A name
// can have several tensors: llama.cpp duplicates a tied head (token_embd read by the output matmul) into
// the output layer's buffer when that lives on another device
struct probe_weights {
    std::map<std::string, std::vector<ggml_tensor *>> by_name;
    bool collect = false;
};

// llama_context_params.cb_eval: records src[0] of every node that reads a weight matrix; asks for no data
bool probe_graph_cb(ggml_tensor * t, bool ask, void * user_data) {
    probe_weights * w = static_cast<probe_weights *>(user_data);
    if (!ask || !w->collect) {
        return false;
    }
    if (t->op != GGML_OP_MUL_MAT && t->op != GGML_OP_MUL_MAT_ID && t->op != GGML_OP_GET_ROWS) {
        return false;
    }
    ggml_tensor * src = t->src[0];
    while (src != nullptr && src->view_src != nullptr) {
        src = src->view_src;
    }
    if (src == nullptr || src->buffer == nullptr ||
        ggml_backend_buffer_get_usage(src->buffer) != GGML_BACKEND_BUFFER_USAGE_WEIGHTS) {
        return false;
    }
    std::vector<ggml_tensor *> & v = w->by_name[ggml_get_name(src)];
    if (std::find(v.begin(), v.end(), src) == v.end()) {
        v.push_back(src);
    }
    return false;
}

// the base pass and every mix report their chunks as one count
struct probe_progress {
    llqx_eval_progress_t fn;
    void *               user_data;
    int32_t              done;  // chunks of the passes before this one
    int32_t              total;
};

bool probe_progress_cb(int32_t chunks_done, int32_t /*n_chunk*/, void * user_data) {
    probe_progress * p = static_cast<probe_progress *>(user_data);
    return p->fn(p->done + chunks_done, p->total, p->user_data);
}

// one tensor of a mix, resolved to the model's tensors and checked
struct probe_target {
    const llqx_probe_tensor *  req;
    std::vector<ggml_tensor *> tensors;
};

bool storage_type_ok(ggml_type type) {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16;
}

bool probe_target_resolve(const probe_weights & w, const llqx_probe_tensor & req, probe_target & tg,
                          llqx_error & err) {
    const auto it = w.by_name.find(req.name);
    if (it == w.by_name.end()) {
        err = { LLQX_STATUS_INPUT, "tensor " + req.name + " is not used by the model's graph" };
        return false;
    }
    const ggml_tensor * t = it->second[0];
    for (const ggml_tensor * c : it->second) {
        if (!storage_type_ok(c->type)) {
            err = { LLQX_STATUS_INPUT, "probing needs a full-precision model (" + req.name + " is " +
                    ggml_type_name(c->type) + ")" };
            return false;
        }
        if (c->type != t->type || !ggml_are_same_shape(c, t) || !ggml_is_contiguous(c)) {
            err = { LLQX_STATUS_CORE, "tensor " + req.name + " has copies of different layouts" };
            return false;
        }
    }
    llqx_type_info info;
    if (!llqx_type_info_get(req.type, info) || !info.can_quantize) {
        err = { LLQX_STATUS_INPUT, "tensor " + req.name + ": type id " + std::to_string(req.type) +
                " is not a type ggml can quantize to" };
        return false;
    }
    const int64_t n_per_row = t->ne[0];
    if (llqx_row_size(req.type, n_per_row) == 0) {
        err = { LLQX_STATUS_INPUT, "tensor " + req.name + ": rows of " + std::to_string(n_per_row) +
                " values do not split into " + info.name + " blocks of " + std::to_string(info.block_size) };
        return false;
    }
    const int64_t n_slice = t->ne[2]*t->ne[3];
    if (req.importance != nullptr) {
        if (req.n_importance != n_per_row*n_slice) {
            err = { LLQX_STATUS_INPUT, "tensor " + req.name + ": importance has " + std::to_string(req.n_importance) +
                    " values, expected " + std::to_string(n_per_row*n_slice) + " (" + std::to_string(n_per_row) +
                    " per expert slice)" };
            return false;
        }
        for (int64_t i = 0; i < req.n_importance; ++i) {
            if (!std::isfinite(req.importance[i])) {
                err = { LLQX_STATUS_INPUT, "tensor " + req.name + ": importance has a non-finite value" };
                return false;
            }
        }
    } else if (llqx_tensor_requires_imatrix(req.name, req.type)) {
        err = { LLQX_STATUS_INPUT, "tensor " + req.name + " needs importance data to be quantized to " + info.name };
        return false;
    }
    tg.req     = &req;
    tg.tensors = it->second;
    return true;
}

bool probe_mix_resolve(const probe_weights & w, const llqx_probe_mix & mix, int32_t i_mix,
                       std::vector<probe_target> & targets, llqx_error & err) {
    targets.assign(mix.tensors.size(), probe_target());
    for (size_t i = 0; i < mix.tensors.size(); ++i) {
        for (size_t j = 0; j < i; ++j) {
            if (mix.tensors[j].name == mix.tensors[i].name) {
                err = { LLQX_STATUS_INPUT,
                        "tensor " + mix.tensors[i].name + " appears twice in mix " + std::to_string(i_mix) };
                return false;
            }
        }
        if (!probe_target_resolve(w, mix.tensors[i], targets[i], err)) {
            return false;
        }
    }
    return true;
}

// dst = the weights of src (the bytes of tensor t) after quantization to req.type as llama_model_quantize does
// it (rows in blocks that never cross an expert slice, each slice with its own importance), dequantization and
// conversion back to t's type. Rows are independent, so the bytes do not depend on n_threads.
bool probe_round_trip(const ggml_tensor * t, const llqx_probe_tensor & req, const uint8_t * src, uint8_t * dst,
                      int32_t n_threads, llqx_error & err) {
    const int32_t type_src  = t->type;
    const int64_t n_per_row = t->ne[0];
    const int64_t n_row     = t->ne[1]; // per slice
    const int64_t n_slice   = t->ne[2]*t->ne[3];
    const size_t  row_src   = ggml_row_size(t->type, n_per_row);
    const size_t  row_q     = llqx_row_size(req.type, n_per_row);
    // llama_model_quantize's chunk: at least 32*512 values
    const int64_t rows_per_block = std::max<int64_t>(1, (32*512)/n_per_row);
    const int64_t n_block_slice  = (n_row + rows_per_block - 1)/rows_per_block;
    const int64_t n_block        = n_block_slice*n_slice;
    if (n_block > INT32_MAX) {
        err = { LLQX_STATUS_INPUT, "tensor " + req.name + " is too large" };
        return false;
    }
    std::vector<llqx_error> block_err(n_block);
    llqx_parallel_for((int32_t) n_block, n_threads, [&](int32_t b) {
        const int64_t slice = b/n_block_slice;
        const int64_t row0  = (b % n_block_slice)*rows_per_block;
        const int64_t nr    = std::min(rows_per_block, n_row - row0);
        const size_t  first = size_t(slice*n_row + row0);
        const float * imp   = req.importance ? req.importance + slice*n_per_row : nullptr;
        std::vector<float>   f32(size_t(nr*n_per_row));
        std::vector<uint8_t> q(nr*row_q);
        llqx_error & e = block_err[b];
        if (!llqx_dequantize_rows(type_src, src + first*row_src, f32.data(), nr, n_per_row, e) ||
            llqx_quantize_rows(req.type, f32.data(), q.data(), nr, n_per_row, imp, e) < 0) {
            return;
        }
        if (!ggml_validate_row_data((ggml_type) req.type, q.data(), q.size())) {
            e = { LLQX_STATUS_CORE, "tensor " + req.name + ": quantized data validation failed" };
            return;
        }
        if (!llqx_dequantize_rows(req.type, q.data(), f32.data(), nr, n_per_row, e)) {
            return;
        }
        llqx_quantize_rows(type_src, f32.data(), dst + first*row_src, nr, n_per_row, nullptr, e);
    });
    for (const llqx_error & e : block_err) {
        if (e.status != LLQX_STATUS_OK) {
            err = e;
            return false;
        }
    }
    return true;
}

struct session_deleter {
    void operator()(llqx_eval_session * s) const { llqx_eval_session_free(s); }
};

} // namespace

bool llqx_probe_mixes(const std::string & model_path, const llqx_probe_params & params, const int32_t * tokens,
                      int32_t n_chunk, const std::vector<llqx_probe_mix> & mixes,
                      std::vector<llqx_probe_result> & results, double & nll_base,
                      llqx_eval_progress_t progress, void * user_data, llqx_error & err) {
    if (n_chunk < 1) {
        err = { LLQX_STATUS_INPUT, "probing needs at least one chunk" };
        return false;
    }
    const int64_t n_pass = 1 + int64_t(mixes.size());
    if (n_pass*n_chunk > INT32_MAX) {
        err = { LLQX_STATUS_INPUT, "too many mixes and chunks" };
        return false;
    }
    const int32_t n_threads = params.n_threads > 0 ? params.n_threads
                                                   : std::max(1, (int32_t) std::thread::hardware_concurrency());
    probe_weights weights;
    llqx_eval_params ep;
    ep.n_ctx             = params.n_ctx;
    ep.n_threads         = n_threads;
    ep.n_gpu_layers      = params.n_gpu_layers;
    ep.writable          = true;
    ep.cb_eval           = probe_graph_cb;
    ep.cb_eval_user_data = &weights;
    std::unique_ptr<llqx_eval_session, session_deleter> s(llqx_eval_session_init(model_path, ep, 0, err));
    if (!s) {
        return false;
    }
    const int32_t n_ctx    = params.n_ctx;
    const int32_t n_scored = llqx_eval_n_scored(n_ctx);
    const int64_t n_tok    = int64_t(n_chunk)*n_scored;
    const int64_t nv       = llqx_eval_row_size(llqx_eval_session_n_vocab(s.get()));

    probe_progress pp = { progress, user_data, 0, int32_t(n_pass*n_chunk) };
    llqx_eval_progress_t pcb = progress ? probe_progress_cb : nullptr;

    // base pass: the first chunk alone records the weights, so that the mixes are checked before the rest
    std::vector<uint16_t> rows(size_t(n_tok*nv));
    std::vector<float>    nll(n_tok);
    weights.collect = true;
    const bool ok_first = llqx_eval_session_base(s.get(), tokens, 1, rows.data(), nll.data(), pcb, &pp, err);
    weights.collect = false;
    if (!ok_first) {
        return false;
    }
    std::vector<std::vector<probe_target>> targets(mixes.size());
    for (size_t m = 0; m < mixes.size(); ++m) {
        if (!probe_mix_resolve(weights, mixes[m], (int32_t) m, targets[m], err)) {
            return false;
        }
    }
    pp.done = 1;
    if (n_chunk > 1 && !llqx_eval_session_base(s.get(), tokens + n_ctx, n_chunk - 1, rows.data() + n_scored*nv,
                                               nll.data() + n_scored, pcb, &pp, err)) {
        return false;
    }
    pp.done = n_chunk;
    double sum = 0.0;
    for (int64_t i = 0; i < n_tok; ++i) {
        sum += nll[i];
    }
    nll_base = sum/double(n_tok);

    std::vector<float>   q_nll(n_tok), q_nll_base(n_tok), q_kld(n_tok), q_p_diff(n_tok);
    std::vector<uint8_t> q_same_top(n_tok);
    const llqx_eval_token_stats out = { q_nll.data(), q_nll_base.data(), q_kld.data(), q_p_diff.data(),
                                        q_same_top.data() };
    results.assign(mixes.size(), llqx_probe_result());
    for (size_t m = 0; m < mixes.size(); ++m) {
        // change the weights, keeping each tensor's original bytes
        std::vector<std::vector<uint8_t>> saved(targets[m].size());
        bool ok = true;
        size_t n_set = 0;
        for (size_t i = 0; i < targets[m].size() && ok; ++i) {
            const probe_target & tg = targets[m][i];
            const ggml_tensor * t = tg.tensors[0];
            const size_t nbytes = ggml_nbytes(t);
            saved[i].resize(nbytes);
            ggml_backend_tensor_get(t, saved[i].data(), 0, nbytes);
            llqx_quantize_init(tg.req->type);
            std::vector<uint8_t> changed(nbytes);
            ok = probe_round_trip(t, *tg.req, saved[i].data(), changed.data(), n_threads, err);
            if (ok) {
                for (ggml_tensor * c : tg.tensors) {
                    ggml_backend_tensor_set(c, changed.data(), 0, nbytes);
                }
                n_set = i + 1;
            }
        }
        if (ok) {
            ok = llqx_eval_session_compare(s.get(), tokens, n_chunk, rows.data(), out, pcb, &pp, err);
        }
        // restore the original bytes, whatever happened
        for (size_t i = 0; i < n_set; ++i) {
            for (ggml_tensor * c : targets[m][i].tensors) {
                ggml_backend_tensor_set(c, saved[i].data(), 0, saved[i].size());
            }
        }
        if (!ok) {
            return false;
        }
        pp.done += n_chunk;
        double sum_kld = 0.0;
        double sum_nll = 0.0;
        for (int64_t i = 0; i < n_tok; ++i) {
            sum_kld += q_kld[i];
            sum_nll += q_nll[i];
        }
        results[m].kld = sum_kld/double(n_tok);
        results[m].nll = sum_nll/double(n_tok);
    }
    return true;
}
