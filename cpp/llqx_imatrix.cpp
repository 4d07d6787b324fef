#include "llqx_imatrix.h"

#include "llqx_imatrix_accum.h"
#include "llqx_llama.h"

#include "ggml-cpu.h"
#include "ggml.h"
#include "llama.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>

// the model, its context and the sums the context's eval callback fills
struct llqx_imatrix_collector {
    llqx_imatrix_params params;

    llama_model *     model      = nullptr;
    llama_context *   ctx        = nullptr;
    ggml_threadpool * threadpool = nullptr;

    int32_t n_seq = 1;

    llqx_imatrix_accum accum;

    std::atomic<bool> cancel{false};
};

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
    col->accum.process_output = params.process_output;
    col->accum.sketch_rank    = params.sketch_rank < 0 ? 0 : params.sketch_rank;

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
    cparams.cb_eval           = llqx_imatrix_accum_cb_eval;
    cparams.cb_eval_user_data = &col->accum;
    cparams.abort_callback      = llqx_imatrix_accum_cb_abort;
    cparams.abort_callback_data = &col->accum;
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
    col->accum.t_collect_s = 0.0;

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
            if (col->accum.failed.load()) {
                err = { LLQX_STATUS_CORE, col->accum.fail_msg };
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
    result.t_collect_s = col->accum.t_collect_s;
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
    llqx_imatrix_accum_entries(col->accum, out);
}
