#include "bindings.h"

#include "llqx_imatrix.h"

#include <memory>

namespace {

// owns the C++ collector; the Python object is used from one thread at a time (cancel() from any)
struct imatrix_collector_handle {
    llqx_imatrix_collector * col = nullptr;

    ~imatrix_collector_handle() { llqx_imatrix_free(col); }
};

} // namespace

// progress(dict) -> bool|None after each group of chunks: False or an exception stops the run
static bool imatrix_progress(const llqx_imatrix_progress & p, void * user_data) {
    auto * cb = (py_callback *) user_data;
    return cb->call([&] {
        py::dict d;
        d["chunks_done"] = p.n_chunk_done;
        d["chunks"]      = p.n_chunk;
        d["tokens_done"] = p.n_tokens_done;
        d["tokens"]      = p.n_tokens;
        d["ppl"]         = p.ppl;
        d["elapsed_s"]   = p.t_elapsed_s;
        return cb->fn(d);
    });
}

static py::dict imatrix_entries_dict(const llqx_imatrix_collector * col) {
    std::vector<llqx_imatrix_sums> entries;
    llqx_imatrix_entries(col, entries);
    py::dict out;
    for (auto & e : entries) {
        const py::ssize_t ne = (py::ssize_t) e.n_expert;
        const py::ssize_t nr = (py::ssize_t) e.n_per_row;
        py::array_t<float>   in_sum2({ ne, nr });
        py::array_t<double>  in_sum({ ne, nr });
        py::array_t<int64_t> counts(ne);
        std::copy(e.in_sum2.begin(), e.in_sum2.end(), in_sum2.mutable_data());
        std::copy(e.in_sum.begin(), e.in_sum.end(), in_sum.mutable_data());
        std::copy(e.counts.begin(), e.counts.end(), counts.mutable_data());
        py::object in_sketch = py::none();
        if (e.sketch_rank > 0) {
            py::array_t<float> sk({ (py::ssize_t) e.sketch_rank, nr });
            std::copy(e.in_sketch.begin(), e.in_sketch.end(), sk.mutable_data());
            in_sketch = sk;
        }
        py::dict in_max2; // block width -> n_expert x blocks per row
        for (int i = 0; i < 2; ++i) {
            if (!e.in_max2[i].empty()) {
                const py::ssize_t nb = (py::ssize_t) (e.in_max2[i].size() / e.n_expert);
                py::array_t<float> mx({ ne, nb });
                std::copy(e.in_max2[i].begin(), e.in_max2[i].end(), mx.mutable_data());
                in_max2[py::int_(LLQX_IMATRIX_MAX_BLOCKS[i])] = mx;
            }
        }
        py::object stream = py::none(); // (Σ x²/ms(s), Σ x/rms(s), tokens, {width: Σ max²/ms(s)}) of a residual writer
        if (e.count_stream > 0) {
            py::array_t<double> s2(nr);
            py::array_t<double> s1(nr);
            std::copy(e.in_sum2_stream.begin(), e.in_sum2_stream.end(), s2.mutable_data());
            std::copy(e.in_sum_stream.begin(), e.in_sum_stream.end(), s1.mutable_data());
            py::dict smax2;
            for (int i = 0; i < 2; ++i) {
                if (!e.in_max2_stream[i].empty()) {
                    py::array_t<double> mx((py::ssize_t) e.in_max2_stream[i].size());
                    std::copy(e.in_max2_stream[i].begin(), e.in_max2_stream[i].end(), mx.mutable_data());
                    smax2[py::int_(LLQX_IMATRIX_MAX_BLOCKS[i])] = mx;
                }
            }
            stream = py::make_tuple(s2, s1, e.count_stream, smax2);
        }
        out[py::str(e.name)] = py::make_tuple(in_sum2, in_sum, counts, in_sketch, in_max2, stream);
    }
    return out;
}

void bind_imatrix(py::module_ & m) {
    py::class_<llqx_imatrix_params>(m, "ImatrixParams")
        .def(py::init<>())
        .def_readwrite("model_path", &llqx_imatrix_params::model_path)
        .def_readwrite("n_ctx", &llqx_imatrix_params::n_ctx)
        .def_readwrite("n_batch", &llqx_imatrix_params::n_batch)
        .def_readwrite("n_ubatch", &llqx_imatrix_params::n_ubatch)
        .def_readwrite("n_threads", &llqx_imatrix_params::n_threads)
        .def_readwrite("n_gpu_layers", &llqx_imatrix_params::n_gpu_layers)
        .def_readwrite("repack", &llqx_imatrix_params::repack)
        .def_readwrite("process_output", &llqx_imatrix_params::process_output)
        .def_readwrite("compute_ppl", &llqx_imatrix_params::compute_ppl)
        .def_readwrite("sketch_rank", &llqx_imatrix_params::sketch_rank);

    py::class_<imatrix_collector_handle, std::shared_ptr<imatrix_collector_handle>>(m, "ImatrixCollector")
        .def(py::init([](const llqx_imatrix_params & params) {
            llqx_error err;
            llqx_imatrix_collector * col = nullptr;
            {
                py::gil_scoped_release release;
                col = llqx_imatrix_init(params, err);
            }
            if (col == nullptr) {
                error_raise(err);
            }
            auto h = std::make_shared<imatrix_collector_handle>();
            h->col = col;
            return h;
        }), py::arg("params"),
           "load the model and make a context like llama-imatrix's; LoadError, InputError or CoreError on failure")
        .def("tokenize", [](imatrix_collector_handle & h, const std::string & text, bool parse_special) {
            std::vector<int32_t> tokens;
            llqx_error err;
            bool ok = false;
            {
                py::gil_scoped_release release;
                ok = llqx_imatrix_tokenize(h.col, text, parse_special, tokens, err);
            }
            if (!ok) {
                error_raise(err);
            }
            py::array_t<int32_t> out((py::ssize_t) tokens.size());
            std::copy(tokens.begin(), tokens.end(), out.mutable_data());
            return out;
        }, py::arg("text"), py::arg("parse_special") = false,
           "token ids of text (bytes or str) with BOS added when the vocab adds one")
        .def_property_readonly("n_vocab", [](const imatrix_collector_handle & h) { return llqx_imatrix_n_vocab(h.col); })
        .def_property_readonly("chunk_size", [](const imatrix_collector_handle & h) { return llqx_imatrix_chunk_size(h.col); })
        .def_property_readonly("n_seq", [](const imatrix_collector_handle & h) { return llqx_imatrix_n_seq(h.col); })
        .def("run", [](imatrix_collector_handle & h, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens,
                       int32_t n_chunk, py::object progress) {
            std::vector<int32_t> tok(tokens.data(), tokens.data() + tokens.size());
            py_callback cb{ progress, nullptr };
            llqx_imatrix_run_result res;
            llqx_error err;
            bool ok = false;
            {
                py::gil_scoped_release release;
                ok = llqx_imatrix_run(h.col, tok, n_chunk, progress.is_none() ? nullptr : imatrix_progress, &cb, res,
                                      err);
            }
            cb.rethrow();
            if (!ok) {
                error_raise(err);
            }
            py::dict d;
            d["chunks_done"] = res.n_chunk_done;
            d["tokens"]      = res.n_tokens;
            d["ppl"]         = res.ppl;
            d["ppl_err"]     = res.ppl_err;
            d["cancelled"]   = res.cancelled;
            d["eval_s"]      = res.t_eval_s;
            d["collect_s"]   = res.t_collect_s;
            return d;
        }, py::arg("tokens"), py::arg("n_chunk"), py::arg("progress") = py::none(),
           "evaluate n_chunk chunks (GIL released); progress(dict) after each group of chunks may return False "
           "to stop; InputError or CoreError (e.g. non-finite activations) on failure")
        .def("cancel", [](imatrix_collector_handle & h) { llqx_imatrix_cancel(h.col); },
             "ask a running run() to stop after the current group of chunks (callable from any thread)")
        .def("entries", [](const imatrix_collector_handle & h) { return imatrix_entries_dict(h.col); },
             "{name: (in_sum2 float32 (n_expert, n_per_row), in_sum float64, counts int64 (n_expert,), in_sketch, in_max2, "
             "stream sums or None)} collected "
             "so far; call between runs or from the progress callback");
}
