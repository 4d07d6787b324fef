#include "bindings.h"

#include "llqx_eval.h"

#include <string>

namespace {

// a caller-owned array (e.g. a numpy memmap) written in place: it must already have the right dtype,
// layout and size, since a converted copy would silently drop the results
template <typename T>
T * out_buffer(py::array & a, int64_t n, const char * what) {
    if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style) || !a.writeable()) {
        error_raise({ LLQX_STATUS_INPUT, std::string(what) + ": expected a writable C-contiguous array of " +
                                         py::str(py::dtype::of<T>()).cast<std::string>() });
    }
    if (a.size() != n) {
        error_raise({ LLQX_STATUS_INPUT, std::string(what) + ": expected " + std::to_string(n) + " elements, got " +
                                         std::to_string(a.size()) });
    }
    return static_cast<T *>(a.mutable_data());
}

template <typename T>
const T * in_buffer(const py::array & a, int64_t n, const char * what) {
    if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style)) {
        error_raise({ LLQX_STATUS_INPUT, std::string(what) + ": expected a C-contiguous array of " +
                                         py::str(py::dtype::of<T>()).cast<std::string>() });
    }
    if (a.size() < n) {
        error_raise({ LLQX_STATUS_INPUT, std::string(what) + ": expected at least " + std::to_string(n) +
                                         " elements, got " + std::to_string(a.size()) });
    }
    return static_cast<const T *>(a.data());
}

llqx_eval_params make_params(int32_t n_ctx, int32_t n_threads, int32_t n_gpu_layers, bool repack) {
    llqx_eval_params p;
    p.repack       = repack;
    p.n_ctx        = n_ctx;
    p.n_threads    = n_threads;
    p.n_gpu_layers = n_gpu_layers;
    return p;
}

py::tuple eval_tokenize(const std::string & model_path, const std::string & text) {
    std::vector<int32_t> tokens;
    int32_t n_vocab = 0;
    llqx_error err;
    bool ok = false;
    {
        py::gil_scoped_release release;
        ok = llqx_eval_tokenize(model_path, text, tokens, n_vocab, err);
    }
    if (!ok) {
        error_raise(err);
    }
    py::array_t<int32_t> out(tokens.size());
    std::copy(tokens.begin(), tokens.end(), out.mutable_data());
    return py::make_tuple(out, n_vocab);
}

void eval_base(const std::string & model_path, const py::array & tokens, int32_t n_chunk, py::array & rows,
               py::array & nll, int32_t n_vocab, int32_t n_ctx, int32_t n_threads, int32_t n_gpu_layers,
               bool repack, py::object progress) {
    const int64_t n_tok = int64_t(n_chunk)*llqx_eval_n_scored(n_ctx);
    const int32_t * tok = in_buffer<int32_t>(tokens, int64_t(n_chunk)*n_ctx, "tokens");
    uint16_t * rows_p = out_buffer<uint16_t>(rows, n_tok*llqx_eval_row_size(n_vocab), "rows");
    float * nll_p = out_buffer<float>(nll, n_tok, "nll");
    py_callback cb{ progress, nullptr };
    const llqx_eval_params p = make_params(n_ctx, n_threads, n_gpu_layers, repack);
    llqx_error err;
    bool ok = false;
    {
        py::gil_scoped_release release;
        ok = llqx_eval_base(model_path, p, tok, n_chunk, rows_p, nll_p,
                            progress.is_none() ? nullptr : py_callback::progress, &cb, err);
    }
    cb.rethrow();
    if (!ok) {
        error_raise(err);
    }
}

py::dict eval_compare(const std::string & model_path, const py::array & tokens, int32_t n_chunk,
                      const py::array & rows, int32_t n_vocab, int32_t n_ctx, int32_t n_threads,
                      int32_t n_gpu_layers, bool repack, py::object progress) {
    const int64_t n_tok = int64_t(n_chunk)*llqx_eval_n_scored(n_ctx);
    const int32_t * tok = in_buffer<int32_t>(tokens, int64_t(n_chunk)*n_ctx, "tokens");
    const uint16_t * rows_p = in_buffer<uint16_t>(rows, n_tok*llqx_eval_row_size(n_vocab), "rows");
    py::array_t<float> nll(n_tok), nll_base(n_tok), kld(n_tok), p_diff(n_tok);
    py::array_t<uint8_t> same_top(n_tok);
    llqx_eval_token_stats out{ nll.mutable_data(), nll_base.mutable_data(), kld.mutable_data(),
                               p_diff.mutable_data(), same_top.mutable_data() };
    py_callback cb{ progress, nullptr };
    const llqx_eval_params p = make_params(n_ctx, n_threads, n_gpu_layers, repack);
    llqx_error err;
    bool ok = false;
    {
        py::gil_scoped_release release;
        ok = llqx_eval_compare(model_path, p, tok, n_chunk, rows_p, n_vocab, out,
                               progress.is_none() ? nullptr : py_callback::progress, &cb, err);
    }
    cb.rethrow();
    if (!ok) {
        error_raise(err);
    }
    py::dict d;
    d["nll"]      = nll;
    d["nll_base"] = nll_base;
    d["kld"]      = kld;
    d["p_diff"]   = p_diff;
    d["same_top"] = same_top;
    return d;
}

} // namespace

void bind_eval(py::module_ & m) {
    m.def("eval_row_size", &llqx_eval_row_size, py::arg("n_vocab"),
          "uint16 values per stored base row: 2*((n_vocab+1)/2) + 4 (llama-perplexity's logits-file row)");
    m.def("eval_n_scored", &llqx_eval_n_scored, py::arg("n_ctx"),
          "tokens scored per chunk of n_ctx tokens: n_ctx - 1 - n_ctx/2");
    m.def("eval_tokenize", &eval_tokenize, py::arg("model_path"), py::arg("text"),
          "(tokens as int32 array, n_vocab): the text tokenized as llama-perplexity does (BOS added)");
    m.def("eval_base", &eval_base, py::arg("model_path"), py::arg("tokens"), py::arg("n_chunk"), py::arg("rows"),
          py::arg("nll"), py::arg("n_vocab"), py::arg("n_ctx"), py::arg("n_threads") = 1,
          py::arg("n_gpu_layers") = 0, py::arg("repack") = false, py::arg("progress") = py::none(),
          "run the base model over n_chunk chunks; fill rows (uint16, n_chunk*n_scored*row_size, written in "
          "place: a memmap works) and nll (float32, exact -log p per scored token)");
    m.def("eval_compare", &eval_compare, py::arg("model_path"), py::arg("tokens"), py::arg("n_chunk"),
          py::arg("rows"), py::arg("n_vocab"), py::arg("n_ctx"), py::arg("n_threads") = 1,
          py::arg("n_gpu_layers") = 0, py::arg("repack") = false, py::arg("progress") = py::none(),
          "per scored token of a model against the stored base rows: dict of nll, nll_base, kld, p_diff "
          "(float32) and same_top (uint8)");
}
