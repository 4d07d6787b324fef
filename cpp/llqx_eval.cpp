#include "llqx_eval.h"

#include "llqx_llama.h"
#include "llqx_parallel.h"

#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

namespace {

struct model_deleter {
    void operator()(llama_model * m) const { llama_model_free(m); }
};
struct context_deleter {
    void operator()(llama_context * c) const { llama_free(c); }
};
struct session_deleter {
    void operator()(llqx_eval_session * s) const { llqx_eval_session_free(s); }
};
using model_ptr   = std::unique_ptr<llama_model, model_deleter>;
using context_ptr = std::unique_ptr<llama_context, context_deleter>;

} // namespace

struct llqx_eval_session {
    model_ptr           model;
    context_ptr         ctx;
    const llama_vocab * vocab     = nullptr;
    int32_t             n_ctx     = 0;
    int32_t             n_vocab   = 0;
    int32_t             n_threads = 1;
    bool                add_bos   = false;
};

namespace {

// same rounding as llama-perplexity's nearest_int (valid for |fval| < 2^22)
inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i;
    std::memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

// base row: store the log-softmax quantized to 16 bits over [max-16, max]; returns -log p(tok)
float base_row_fill(int32_t n_vocab, const float * logits, uint16_t * row, int32_t tok) {
    float max_logit = logits[0];
    float min_logit = logits[0];
    for (int32_t i = 1; i < n_vocab; ++i) {
        max_logit = std::max(max_logit, logits[i]);
        min_logit = std::min(min_logit, logits[i]);
    }
    min_logit = std::max(min_logit, max_logit - 16);
    double sum_exp = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        sum_exp += expf(logits[i] - max_logit);
    }
    const float log_sum_exp  = (float) std::log(sum_exp);
    const float min_log_prob = min_logit - max_logit - log_sum_exp;
    const float scale        = (max_logit - min_logit)/65535.f;
    std::memcpy(row + 0, &scale, sizeof(float));
    std::memcpy(row + 2, &min_log_prob, sizeof(float));
    uint16_t * q = row + 4;
    if (scale) {
        const float inv_scale = 1/scale;
        for (int32_t i = 0; i < n_vocab; ++i) {
            q[i] = logits[i] > min_logit ? (uint16_t) nearest_int(inv_scale*(logits[i] - min_logit)) : 0;
        }
    } else {
        std::memset(q, 0, size_t(n_vocab)*sizeof(uint16_t));
    }
    return max_logit + log_sum_exp - logits[tok];
}

struct token_result {
    float   nll;
    float   nll_base;
    float   kld;
    float   p_diff;
    uint8_t same_top;
};

// one scored token of a quantized model against a stored base row (llama-perplexity's arithmetic)
token_result compare_row(int32_t n_vocab, const float * logits, const uint16_t * row, int32_t tok) {
    float max_logit = logits[0];
    int32_t imax = 0;
    for (int32_t i = 1; i < n_vocab; ++i) {
        if (logits[i] > max_logit) {
            max_logit = logits[i];
            imax = i;
        }
    }
    double sum_exp = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        sum_exp += expf(logits[i] - max_logit);
    }
    const float log_sum_exp = (float) std::log(sum_exp);
    float scale;
    float min_log_prob;
    std::memcpy(&scale, row + 0, sizeof(float));
    std::memcpy(&min_log_prob, row + 2, sizeof(float));
    const uint16_t * q = row + 4;

    token_result r;
    r.nll      = max_logit + log_sum_exp - logits[tok];
    r.nll_base = -(scale*q[tok] + min_log_prob);

    const float log_norm = max_logit + log_sum_exp;
    double sum = 0;
    int32_t imax_base = -1;
    float p_log_base_max = 0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        const float p_log_base = scale*q[i] + min_log_prob;
        if (i == 0 || p_log_base > p_log_base_max) {
            p_log_base_max = p_log_base;
            imax_base = i;
        }
        if (p_log_base > -16.f) {
            const float p_base = expf(p_log_base);
            sum += p_base * (p_log_base - logits[i] + log_norm);
        }
    }
    r.kld      = (float) sum;
    r.same_top = imax == imax_base ? 1 : 0;
    r.p_diff   = expf(-r.nll) - expf(-r.nll_base);
    return r;
}

// decodes each chunk as llama-perplexity does (KV cleared, BOS in front when the vocab adds one,
// logits for the second half) and hands the logits of positions n_ctx/2.. to on_chunk(chunk, logits)
template <typename F>
bool run_chunks(llqx_eval_session * s, const int32_t * tokens, int32_t n_chunk, llqx_eval_progress_t progress,
                void * user_data, F on_chunk, llqx_error & err) {
    const int32_t n_ctx = s->n_ctx;
    const int32_t first = n_ctx/2;
    llama_batch batch = llama_batch_init(n_ctx, 0, 1);
    std::vector<const float *> logits(n_ctx - first);
    bool ok = true;
    for (int32_t c = 0; c < n_chunk && ok; ++c) {
        if (progress && !progress(c, n_chunk, user_data)) {
            err = { LLQX_STATUS_CORE, "aborted" };
            ok = false;
            break;
        }
        llama_memory_clear(llama_get_memory(s->ctx.get()), true);
        const int32_t * chunk = tokens + size_t(c)*n_ctx;
        batch.n_tokens = n_ctx;
        for (int32_t k = 0; k < n_ctx; ++k) {
            batch.token[k]     = (k == 0 && s->add_bos) ? llama_vocab_bos(s->vocab) : chunk[k];
            batch.pos[k]       = k;
            batch.n_seq_id[k]  = 1;
            batch.seq_id[k][0] = 0;
            batch.logits[k]    = k >= first;
        }
        const int32_t rc = llama_decode(s->ctx.get(), batch);
        if (rc != 0) {
            err = { LLQX_STATUS_CORE,
                    "llama_decode failed with status " + std::to_string(rc) + " on chunk " + std::to_string(c) };
            ok = false;
            break;
        }
        // llama_get_logits_ith synchronizes: collect the pointers here, before any worker thread reads them
        for (int32_t k = first; k < n_ctx; ++k) {
            logits[k - first] = llama_get_logits_ith(s->ctx.get(), k);
            if (!logits[k - first]) {
                err = { LLQX_STATUS_CORE, "no logits for position " + std::to_string(k) };
                ok = false;
                break;
            }
        }
        if (ok) {
            on_chunk(c, logits);
        }
    }
    llama_batch_free(batch);
    if (ok && progress) {
        progress(n_chunk, n_chunk, user_data);
    }
    return ok;
}

} // namespace

int64_t llqx_eval_row_size(int32_t n_vocab) {
    return 2*((int64_t(n_vocab) + 1)/2) + 4;
}

int32_t llqx_eval_n_scored(int32_t n_ctx) {
    return n_ctx - 1 - n_ctx/2;
}

bool llqx_eval_tokenize(const std::string & model_path, const std::string & text,
                        std::vector<int32_t> & tokens, int32_t & n_vocab, llqx_error & err) {
    model_ptr model(llqx_model_load(model_path, 0, false, true, err));
    if (!model) {
        return false;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model.get());
    n_vocab = llama_vocab_n_tokens(vocab);
    return llqx_vocab_tokenize(vocab, text, true, false, tokens, err);
}

llqx_eval_session * llqx_eval_session_init(const std::string & model_path, const llqx_eval_params & params,
                                           int32_t expect_vocab, llqx_error & err) {
    const int32_t n_ctx = params.n_ctx;
    if (n_ctx < 4) {
        err = { LLQX_STATUS_INPUT, "context size must be at least 4 tokens" };
        return nullptr;
    }
    std::unique_ptr<llqx_eval_session> s(new llqx_eval_session);
    s->model.reset(params.writable ? llqx_model_load_writable(model_path, params.n_gpu_layers, err)
                                   : llqx_model_load(model_path, params.n_gpu_layers, params.repack, false, err));
    if (!s->model) {
        return nullptr;
    }
    s->vocab = llama_model_get_vocab(s->model.get());
    s->n_vocab = llama_vocab_n_tokens(s->vocab);
    if (expect_vocab > 0 && s->n_vocab != expect_vocab) {
        err = { LLQX_STATUS_INPUT, "vocabulary of " + model_path + " (" + std::to_string(s->n_vocab) +
                " tokens) differs from the base model's (" + std::to_string(expect_vocab) + ")" };
        return nullptr;
    }
    if (llama_vocab_get_add_eos(s->vocab)) {
        err = { LLQX_STATUS_INPUT,
                "models whose vocabulary appends EOS are not supported (as in llama-perplexity)" };
        return nullptr;
    }
    s->add_bos   = llama_vocab_get_add_bos(s->vocab);
    s->n_ctx     = n_ctx;
    s->n_threads = std::max(1, params.n_threads);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = (uint32_t) n_ctx;
    cp.n_batch         = (uint32_t) n_ctx;
    cp.n_ubatch        = (uint32_t) std::min(n_ctx, 512);
    cp.n_seq_max       = 1;
    cp.n_threads       = s->n_threads;
    cp.n_threads_batch = s->n_threads;
    cp.no_perf         = true;
    if (params.writable) {
        cp.op_offload = false;
    }
    cp.cb_eval           = params.cb_eval;
    cp.cb_eval_user_data = params.cb_eval_user_data;
    s->ctx.reset(llama_init_from_model(s->model.get(), cp));
    if (!s->ctx) {
        err = { LLQX_STATUS_CORE,
                "failed to create a context of " + std::to_string(n_ctx) + " tokens for " + model_path };
        return nullptr;
    }
    return s.release();
}

void llqx_eval_session_free(llqx_eval_session * s) {
    delete s;
}

int32_t llqx_eval_session_n_vocab(const llqx_eval_session * s) {
    return s->n_vocab;
}

bool llqx_eval_session_base(llqx_eval_session * s, const int32_t * tokens, int32_t n_chunk, uint16_t * rows,
                            float * nll, llqx_eval_progress_t progress, void * user_data, llqx_error & err) {
    const int32_t n_ctx    = s->n_ctx;
    const int32_t n_vocab  = s->n_vocab;
    const int32_t first    = n_ctx/2;
    const int32_t n_scored = llqx_eval_n_scored(n_ctx);
    const int64_t nv       = llqx_eval_row_size(n_vocab);
    return run_chunks(s, tokens, n_chunk, progress, user_data,
        [&](int32_t c, const std::vector<const float *> & logits) {
            const int32_t * chunk = tokens + size_t(c)*n_ctx;
            llqx_parallel_for(n_scored, s->n_threads, [&](int32_t i) {
                const size_t t = size_t(c)*n_scored + i;
                nll[t] = base_row_fill(n_vocab, logits[i], rows + t*nv, chunk[first + i + 1]);
            });
        }, err);
}

bool llqx_eval_session_compare(llqx_eval_session * s, const int32_t * tokens, int32_t n_chunk,
                               const uint16_t * rows, const llqx_eval_token_stats & out,
                               llqx_eval_progress_t progress, void * user_data, llqx_error & err) {
    const int32_t n_ctx    = s->n_ctx;
    const int32_t n_vocab  = s->n_vocab;
    const int32_t first    = n_ctx/2;
    const int32_t n_scored = llqx_eval_n_scored(n_ctx);
    const int64_t nv       = llqx_eval_row_size(n_vocab);
    return run_chunks(s, tokens, n_chunk, progress, user_data,
        [&](int32_t c, const std::vector<const float *> & logits) {
            const int32_t * chunk = tokens + size_t(c)*n_ctx;
            llqx_parallel_for(n_scored, s->n_threads, [&](int32_t i) {
                const size_t t = size_t(c)*n_scored + i;
                const token_result r = compare_row(n_vocab, logits[i], rows + t*nv, chunk[first + i + 1]);
                out.nll[t]      = r.nll;
                out.nll_base[t] = r.nll_base;
                out.kld[t]      = r.kld;
                out.p_diff[t]   = r.p_diff;
                out.same_top[t] = r.same_top;
            });
        }, err);
}

bool llqx_eval_base(const std::string & model_path, const llqx_eval_params & params,
                    const int32_t * tokens, int32_t n_chunk, uint16_t * rows, float * nll,
                    llqx_eval_progress_t progress, void * user_data, llqx_error & err) {
    std::unique_ptr<llqx_eval_session, session_deleter> s(llqx_eval_session_init(model_path, params, 0, err));
    return s && llqx_eval_session_base(s.get(), tokens, n_chunk, rows, nll, progress, user_data, err);
}

bool llqx_eval_compare(const std::string & model_path, const llqx_eval_params & params,
                       const int32_t * tokens, int32_t n_chunk, const uint16_t * rows, int32_t n_vocab,
                       const llqx_eval_token_stats & out,
                       llqx_eval_progress_t progress, void * user_data, llqx_error & err) {
    std::unique_ptr<llqx_eval_session, session_deleter> s(llqx_eval_session_init(model_path, params, n_vocab, err));
    return s && llqx_eval_session_compare(s.get(), tokens, n_chunk, rows, out, progress, user_data, err);
}
