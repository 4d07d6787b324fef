#include "llqx_imatrix.h"

#include "llqx_llama.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "llama.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <thread>

struct llqx_imatrix_stats {
    int64_t              n_per_row = 0;
    int64_t              n_expert  = 0;
    std::vector<float>   in_sum2; // float, summed in llama-imatrix's order: bit-identical to its file
    std::vector<double>  in_sum;  // double: a sum with cancellation
    std::vector<int64_t> counts;
};

struct llqx_imatrix_collector {
    llqx_imatrix_params params;

    llama_model *     model      = nullptr;
    llama_context *   ctx        = nullptr;
    ggml_threadpool * threadpool = nullptr;

    int32_t n_seq = 1;

    std::map<std::string, llqx_imatrix_stats> stats;

    // scratch for activations and expert ids that live in device memory
    std::vector<char> src1_data;
    std::vector<char> ids_data;

    double t_collect_s = 0.0; // time spent summing activations (inside the eval callback)

    std::atomic<bool> cancel{false};
    std::atomic<bool> failed{false};
    std::string       fail_msg;
};

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

static void imatrix_fail(llqx_imatrix_collector * col, const std::string & msg) {
    if (!col->failed.exchange(true)) {
        col->fail_msg = msg;
    }
}

static bool imatrix_want(llqx_imatrix_collector * col, const ggml_tensor * t, const std::string & wname) {
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
    return wname.compare(0, 4, "blk.") == 0 || (col->params.process_output && wname == "output.weight");
}

static bool imatrix_collect_mul_mat_id(llqx_imatrix_collector * col, const ggml_tensor * t, const std::string & wname,
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
        imatrix_fail(col, "unsupported layout of the expert matrix multiplication for " + wname);
        return false;
    }

    col->ids_data.resize(ggml_nbytes(ids));
    ggml_backend_tensor_get(ids, col->ids_data.data(), 0, ggml_nbytes(ids));

    llqx_imatrix_stats & e = col->stats[wname];
    if (e.in_sum2.empty()) {
        e.n_per_row = ne0;
        e.n_expert  = n_as;
        e.in_sum2.assign(ne0 * n_as, 0.0f);
        e.in_sum.assign(ne0 * n_as, 0.0);
        e.counts.assign(n_as, 0);
    } else if (e.n_per_row != ne0 || e.n_expert != n_as) {
        imatrix_fail(col, "inconsistent size for " + wname);
        return false;
    }

    std::vector<uint8_t> touched(n_as, 0);
    for (int64_t idx = 0; idx < n_ids; ++idx) {
        for (int64_t row = 0; row < n_tokens; ++row) {
            const int32_t ex = *(const int32_t *) (col->ids_data.data() + row * ids->nb[1] + idx * ids->nb[0]);
            if (ex < 0 || ex >= n_as) {
                imatrix_fail(col, "expert id out of range in " + wname);
                return false;
            }
            const int64_t i11 = idx % src1->ne[1];
            const float * x   = (const float *) (data + i11 * src1->nb[1] + row * src1->nb[2]);
            imatrix_accumulate(e.in_sum2.data() + ex * ne0, e.in_sum.data() + ex * ne0, x, ne0);
            e.counts[ex]++;
            touched[ex] = 1;
        }
    }
    // a non-finite activation makes its sums non-finite: one check per expert, not per row
    for (int64_t ex = 0; ex < n_as; ++ex) {
        if (touched[ex] && !imatrix_all_finite(e.in_sum2.data() + ex * ne0, ne0)) {
            imatrix_fail(col, "non-finite activations in the input of " + wname);
            return false;
        }
    }
    return true;
}

static bool imatrix_collect_mul_mat(llqx_imatrix_collector * col, const ggml_tensor * t, const std::string & wname,
                                    const char * data) {
    const ggml_tensor * src0 = t->src[0];
    const ggml_tensor * src1 = t->src[1];

    const int64_t n_mat = src0->ne[2] * src0->ne[3];
    const int64_t ne0   = src1->ne[0];

    llqx_imatrix_stats & e = col->stats[wname];
    if (e.in_sum2.empty()) {
        e.n_per_row = ne0;
        e.n_expert  = n_mat;
        e.in_sum2.assign(ne0 * n_mat, 0.0f);
        e.in_sum.assign(ne0 * n_mat, 0.0);
        e.counts.assign(1, 0);
    } else if (e.n_per_row != ne0 || e.n_expert != n_mat) {
        imatrix_fail(col, "inconsistent size for " + wname);
        return false;
    }

    for (int64_t i3 = 0; i3 < src1->ne[3]; ++i3) {
        for (int64_t i2 = 0; i2 < src1->ne[2]; ++i2) {
            // 3-D+ activations of a 2-D weight are flattened into its one matrix
            const int64_t mat_id = (i3 % src0->ne[3]) * src0->ne[2] + (i2 % src0->ne[2]);
            float *  s2 = e.in_sum2.data() + mat_id * ne0;
            double * s1 = e.in_sum.data()  + mat_id * ne0;
            for (int64_t row = 0; row < src1->ne[1]; ++row) {
                const float * x = (const float *) (data + row * src1->nb[1] + i2 * src1->nb[2] + i3 * src1->nb[3]);
                imatrix_accumulate(s2, s1, x, ne0);
            }
        }
    }
    if (!imatrix_all_finite(e.in_sum2.data(), (int64_t) e.in_sum2.size())) {
        imatrix_fail(col, "non-finite activations in the input of " + wname);
        return false;
    }
    // one count per dense tensor, like llama-imatrix (rows per matrix)
    for (auto & c : e.counts) {
        c += ggml_nrows(src1) / n_mat;
    }
    return true;
}

static bool imatrix_eval_cb(ggml_tensor * t, bool ask, void * user_data) {
    auto * col = (llqx_imatrix_collector *) user_data;
    if (col->failed.load()) {
        return false;
    }
    const ggml_tensor * src0 = t->src[0];
    if (src0 == nullptr || t->src[1] == nullptr) {
        return ask ? false : true;
    }
    const std::string wname = imatrix_weight_name(src0->name);
    if (ask) {
        return imatrix_want(col, t, wname);
    }

    const ggml_tensor * src1 = t->src[1];
    if (src1->type != GGML_TYPE_F32 || src1->nb[0] != sizeof(float)) {
        imatrix_fail(col, "activations of " + wname + " are not contiguous F32 rows");
        return false;
    }
    const auto t0 = std::chrono::steady_clock::now();
    struct timer {
        llqx_imatrix_collector * col;
        std::chrono::steady_clock::time_point t0;
        ~timer() { col->t_collect_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
    } guard{ col, t0 };
    const bool is_host = src1->buffer == nullptr || ggml_backend_buffer_is_host(src1->buffer);
    const char * data = (const char *) src1->data;
    if (!is_host) {
        col->src1_data.resize(ggml_nbytes(src1));
        ggml_backend_tensor_get(src1, col->src1_data.data(), 0, ggml_nbytes(src1));
        data = col->src1_data.data();
    }
    if (t->op == GGML_OP_MUL_MAT_ID) {
        return imatrix_collect_mul_mat_id(col, t, wname, data);
    }
    return imatrix_collect_mul_mat(col, t, wname, data);
}

static bool imatrix_abort_cb(void * user_data) {
    return ((llqx_imatrix_collector *) user_data)->failed.load();
}

void llqx_imatrix_free(llqx_imatrix_collector * col) {
    if (col == nullptr) {
        return;
    }
    if (col->ctx != nullptr) {
        llama_detach_threadpool(col->ctx);
        llama_free(col->ctx);
    }
    if (col->threadpool != nullptr) {
        ggml_threadpool_free(col->threadpool);
    }
    if (col->model != nullptr) {
        llama_model_free(col->model);
    }
    delete col;
}

llqx_imatrix_collector * llqx_imatrix_init(const llqx_imatrix_params & params, llqx_error & err) {
    if (params.n_ctx <= 0) {
        err = { LLQX_STATUS_INPUT, "the context size (chunk size) must be > 0" };
        return nullptr;
    }
    if (params.n_batch <= 0 || params.n_ubatch <= 0) {
        err = { LLQX_STATUS_INPUT, "batch sizes must be > 0" };
        return nullptr;
    }
    if (params.n_threads <= 0) {
        err = { LLQX_STATUS_INPUT, "the number of threads must be > 0" };
        return nullptr;
    }
    auto * col = new llqx_imatrix_collector();
    col->params = params;

    col->model = llqx_model_load(params.model_path, params.n_gpu_layers, params.repack, false, err);
    if (col->model == nullptr) {
        llqx_imatrix_free(col);
        return nullptr;
    }

    // like llama-imatrix: a batch that holds several chunks runs them as parallel sequences
    const int32_t n_ctx = params.n_ctx;
    col->n_seq = std::max(1, params.n_batch / n_ctx);
    const int32_t n_kv = col->n_seq * n_ctx;
    const int32_t n_batch = std::min(params.n_batch, n_kv);
    if (!(n_batch < n_ctx || n_batch % n_ctx == 0)) {
        err = { LLQX_STATUS_INPUT, "the batch size must be smaller than the context or a multiple of it" };
        llqx_imatrix_free(col);
        return nullptr;
    }

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx             = n_kv;
    cparams.n_seq_max         = col->n_seq;
    cparams.n_batch           = n_batch;
    cparams.n_ubatch          = params.n_ubatch;
    cparams.n_threads         = params.n_threads;
    cparams.n_threads_batch   = params.n_threads;
    cparams.cb_eval           = imatrix_eval_cb;
    cparams.cb_eval_user_data = col;
    cparams.abort_callback      = imatrix_abort_cb;
    cparams.abort_callback_data = col;
    cparams.no_perf           = false;
    cparams.swa_full          = false; // llama-imatrix's (common) default
    col->ctx = llama_init_from_model(col->model, cparams);
    if (col->ctx == nullptr) {
        err = { LLQX_STATUS_CORE, "cannot create a context for " + params.model_path };
        llqx_imatrix_free(col);
        return nullptr;
    }

    // a persistent thread pool, like llama.cpp's tools: the callback splits every graph into many computes
    ggml_threadpool_params tpp = ggml_threadpool_params_default(params.n_threads);
    col->threadpool = ggml_threadpool_new(&tpp);
    if (col->threadpool != nullptr) {
        llama_attach_threadpool(col->ctx, col->threadpool, nullptr);
    }
    return col;
}

bool llqx_imatrix_tokenize(llqx_imatrix_collector * col, const std::string & text, bool parse_special,
                           std::vector<int32_t> & tokens, llqx_error & err) {
    return llqx_vocab_tokenize(llama_model_get_vocab(col->model), text, true, parse_special, tokens, err);
}

int32_t llqx_imatrix_n_vocab(const llqx_imatrix_collector * col) {
    return llama_vocab_n_tokens(llama_model_get_vocab(col->model));
}

int32_t llqx_imatrix_chunk_size(const llqx_imatrix_collector * col) {
    return col->params.n_ctx;
}

int32_t llqx_imatrix_n_seq(const llqx_imatrix_collector * col) {
    return col->n_seq;
}

void llqx_imatrix_cancel(llqx_imatrix_collector * col) {
    col->cancel.store(true);
}

// -log p(token) for rows [0, n) of logits, split over threads; sums into nll/nll2 in a fixed order
static void imatrix_nll(int32_t n_vocab, const float * logits, const llama_token * next, int32_t n, int32_t n_threads,
                        double & nll, double & nll2) {
    std::vector<double> v(n);
    auto work = [&](int32_t i0, int32_t i1) {
        for (int32_t i = i0; i < i1; ++i) {
            const float * l = logits + (size_t) i * n_vocab;
            float max_logit = l[0];
            for (int32_t k = 1; k < n_vocab; ++k) {
                max_logit = std::max(max_logit, l[k]);
            }
            double sum_exp = 0.0;
            for (int32_t k = 0; k < n_vocab; ++k) {
                sum_exp += expf(l[k] - max_logit);
            }
            v[i] = -(l[next[i]] - max_logit - log(sum_exp));
        }
    };
    const int32_t n_workers = std::max(1, std::min(n_threads, n));
    std::vector<std::thread> workers;
    const int32_t step = (n + n_workers - 1) / n_workers;
    for (int32_t w = 1; w < n_workers; ++w) {
        const int32_t i0 = std::min(n, w * step);
        const int32_t i1 = std::min(n, i0 + step);
        workers.emplace_back(work, i0, i1);
    }
    work(0, std::min(n, step));
    for (auto & w : workers) {
        w.join();
    }
    for (int32_t i = 0; i < n; ++i) {
        nll  += v[i];
        nll2 += v[i] * v[i];
    }
}

bool llqx_imatrix_run(llqx_imatrix_collector * col, const std::vector<int32_t> & tokens_in, int32_t n_chunk,
                      llqx_imatrix_progress_cb progress, void * user_data,
                      llqx_imatrix_run_result & result, llqx_error & err) {
    result = llqx_imatrix_run_result();
    col->cancel.store(false);
    col->t_collect_s = 0.0;

    const int32_t n_ctx = col->params.n_ctx;
    if (n_chunk <= 0 || (int64_t) n_chunk * n_ctx > (int64_t) tokens_in.size()) {
        err = { LLQX_STATUS_INPUT,
                "not enough tokens for " + std::to_string(n_chunk) + " chunks of " + std::to_string(n_ctx) + " tokens" };
        return false;
    }

    const llama_vocab * vocab = llama_model_get_vocab(col->model);
    const bool add_bos = llama_vocab_get_add_bos(vocab);
    const llama_token bos = llama_vocab_bos(vocab);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    const int32_t n_batch = (int32_t) llama_n_batch(col->ctx);
    const int32_t n_seq   = col->n_seq;
    const int32_t num_batches = (n_ctx + n_batch - 1) / n_batch;
    const bool compute_ppl = col->params.compute_ppl;

    std::vector<llama_token> tokens(tokens_in.begin(), tokens_in.end());
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab) {
            err = { LLQX_STATUS_INPUT, "token id " + std::to_string(t) + " is outside the vocabulary" };
            return false;
        }
    }

    llama_batch batch = llama_batch_init(std::min(n_batch, n_ctx) * n_seq, 0, 1);
    std::vector<float> logits;
    if (compute_ppl && num_batches > 1) {
        logits.reserve((size_t) n_ctx * n_vocab);
    }

    double nll = 0.0;
    double nll2 = 0.0;
    int64_t count = 0;
    const auto t_start = std::chrono::steady_clock::now();
    bool ok = true;

    for (int32_t i = 0; i < n_chunk; i += n_seq) {
        const int32_t start = i * n_ctx;
        const int32_t end   = start + n_ctx;
        const int32_t n_seq_batch = std::min(n_seq, n_chunk - i);

        llama_memory_clear(llama_get_memory(col->ctx), true);

        for (int32_t j = 0; j < num_batches && ok; ++j) {
            const int32_t batch_start = start + j * n_batch;
            const int32_t batch_size  = std::min(end - batch_start, n_batch);

            batch.n_tokens = 0;
            for (int32_t seq = 0; seq < n_seq_batch; ++seq) {
                const int32_t seq_start = batch_start + seq * n_ctx;
                for (int32_t k = 0; k < batch_size; ++k) {
                    const int32_t b = batch.n_tokens++;
                    // BOS in front of every chunk; every position gives an output (all rows reach the last layer)
                    batch.token[b]     = (add_bos && j == 0 && k == 0) ? bos : tokens[seq_start + k];
                    batch.pos[b]       = j * n_batch + k;
                    batch.n_seq_id[b]  = 1;
                    batch.seq_id[b][0] = seq;
                    batch.logits[b]    = 1;
                }
            }

            const int32_t ret = llama_decode(col->ctx, batch);
            if (col->failed.load()) {
                err = { LLQX_STATUS_CORE, col->fail_msg };
                ok = false;
                break;
            }
            if (ret != 0) {
                err = { LLQX_STATUS_CORE, "llama_decode failed with status " + std::to_string(ret) };
                ok = false;
                break;
            }
            if (compute_ppl && num_batches > 1) {
                const float * batch_logits = llama_get_logits(col->ctx);
                logits.insert(logits.end(), batch_logits, batch_logits + (size_t) batch_size * n_vocab);
            }
        }
        if (!ok) {
            break;
        }

        if (compute_ppl) {
            const int32_t first = n_ctx / 2;
            for (int32_t seq = 0; seq < n_seq_batch; ++seq) {
                const float * all_logits = num_batches > 1 ? logits.data() : llama_get_logits_ith(col->ctx, seq * n_ctx);
                const llama_token * next = tokens.data() + start + seq * n_ctx + first + 1;
                imatrix_nll(n_vocab, all_logits + (size_t) first * n_vocab, next, n_ctx - 1 - first,
                            col->params.n_threads, nll, nll2);
                count += n_ctx - 1 - first;
            }
            logits.clear();
        }

        result.n_chunk_done += n_seq_batch;
        result.n_tokens     += (int64_t) n_seq_batch * n_ctx;
        result.t_eval_s      = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();

        if (progress != nullptr) {
            llqx_imatrix_progress p;
            p.n_chunk_done  = result.n_chunk_done;
            p.n_chunk       = n_chunk;
            p.n_tokens_done = result.n_tokens;
            p.n_tokens      = (int64_t) n_chunk * n_ctx;
            p.ppl           = count > 0 ? std::exp(nll / count) : std::nan("");
            p.t_elapsed_s   = result.t_eval_s;
            if (!progress(p, user_data)) {
                col->cancel.store(true);
            }
        }
        if (col->cancel.load() && result.n_chunk_done < n_chunk) {
            result.cancelled = true;
            break;
        }
    }

    llama_batch_free(batch);
    result.t_collect_s = col->t_collect_s;
    if (!ok) {
        return false;
    }

    if (compute_ppl && count > 0) {
        const double m  = nll / count;
        const double m2 = nll2 / count - m * m;
        result.ppl      = std::exp(m);
        result.ppl_err  = (m2 > 0 && count > 1) ? std::sqrt(m2 / (count - 1)) * result.ppl : 0.0;
    } else {
        result.ppl = std::nan("");
    }
    return true;
}

void llqx_imatrix_entries(const llqx_imatrix_collector * col, std::vector<llqx_imatrix_sums> & out) {
    out.clear();
    out.reserve(col->stats.size());
    for (const auto & kv : col->stats) {
        llqx_imatrix_sums e;
        e.name      = kv.first;
        e.n_per_row = kv.second.n_per_row;
        e.n_expert  = kv.second.n_expert;
        e.in_sum2   = kv.second.in_sum2;
        e.in_sum    = kv.second.in_sum;
        e.counts    = kv.second.counts;
        if ((int64_t) e.counts.size() != e.n_expert) {
            // a dense 3-D weight has one count: its matrices form one row, like llama-imatrix writes it
            e.n_per_row = e.n_per_row * e.n_expert / (int64_t) e.counts.size();
            e.n_expert  = (int64_t) e.counts.size();
        }
        out.push_back(std::move(e));
    }
}
