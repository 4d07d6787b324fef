#include "bindings.h"

#include "llqx_probe.h"

#include <string>
#include <vector>

namespace {

using float_array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// mixes: a list of mixes, each a list of (name, type id, importance or None); the importance arrays are
// converted to float32 where needed and kept alive in keep while the core reads them
std::vector<llqx_probe_mix> mixes_from_py(const py::list & mixes, std::vector<float_array> & keep) {
    std::vector<llqx_probe_mix> out(mixes.size());
    for (size_t m = 0; m < mixes.size(); ++m) {
        const std::string bad = "mix " + std::to_string(m) + ": expected a list of (tensor name, type id, "
                                "importance array or None)";
        if (!py::isinstance<py::sequence>(mixes[m]) || py::isinstance<py::str>(mixes[m])) {
            error_raise({ LLQX_STATUS_INPUT, bad });
        }
        const py::sequence mix = mixes[m].cast<py::sequence>();
        out[m].tensors.resize(mix.size());
        for (size_t i = 0; i < mix.size(); ++i) {
            const py::handle item = mix[i];
            if (!py::isinstance<py::tuple>(item) && !py::isinstance<py::list>(item)) {
                error_raise({ LLQX_STATUS_INPUT, bad });
            }
            const py::sequence entry = item.cast<py::sequence>();
            // the type id: a Python or numpy integer (anything with __index__)
            if ((entry.size() != 2 && entry.size() != 3) || !py::isinstance<py::str>(entry[0]) ||
                !PyIndex_Check(entry[1].ptr())) {
                error_raise({ LLQX_STATUS_INPUT, bad });
            }
            llqx_probe_tensor & t = out[m].tensors[i];
            t.name = entry[0].cast<std::string>();
            t.type = py::int_(entry[1]).cast<int32_t>();
            if (entry.size() == 3 && !entry[2].is_none()) {
                float_array values = float_array::ensure(entry[2]);
                if (!values) {
                    error_raise({ LLQX_STATUS_INPUT, "mix " + std::to_string(m) + ": importance of " + t.name +
                                                     " is not an array of numbers" });
                }
                t.importance   = values.data();
                t.n_importance = (int64_t) values.size();
                keep.push_back(std::move(values));
            }
        }
    }
    return out;
}

using int32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

py::dict probe_mixes(const std::string & model_path, const int32_array & tokens, int32_t n_ctx,
                     const py::list & mixes, int32_t n_threads, int32_t n_gpu_layers, py::object progress) {
    if (n_ctx < 4 || tokens.size() < n_ctx || tokens.size() % n_ctx != 0) {
        error_raise({ LLQX_STATUS_INPUT, "tokens: expected whole chunks of n_ctx = " + std::to_string(n_ctx) +
                                         " tokens, got " + std::to_string(tokens.size()) });
    }
    const int32_t n_chunk = (int32_t) (tokens.size()/n_ctx);
    std::vector<float_array> keep;
    const std::vector<llqx_probe_mix> cmixes = mixes_from_py(mixes, keep);
    llqx_probe_params p;
    p.n_ctx        = n_ctx;
    p.n_threads    = n_threads;
    p.n_gpu_layers = n_gpu_layers;
    const int32_t * tok = tokens.data();
    std::vector<llqx_probe_result> results;
    double nll_base = 0.0;
    py_callback cb{ progress, nullptr };
    llqx_error err;
    bool ok = false;
    {
        py::gil_scoped_release release;
        ok = llqx_probe_mixes(model_path, p, tok, n_chunk, cmixes, results, nll_base,
                              progress.is_none() ? nullptr : py_callback::progress, &cb, err);
    }
    cb.rethrow();
    if (!ok) {
        error_raise(err);
    }
    py::array_t<double> kld((py::ssize_t) results.size());
    py::array_t<double> nll((py::ssize_t) results.size());
    for (size_t i = 0; i < results.size(); ++i) {
        kld.mutable_data()[i] = results[i].kld;
        nll.mutable_data()[i] = results[i].nll;
    }
    py::dict d;
    d["kld"]      = kld;
    d["nll"]      = nll;
    d["nll_base"] = nll_base;
    d["n_tokens"] = (int64_t) n_chunk*llqx_eval_n_scored(n_ctx);
    return d;
}

} // namespace

void bind_probe(py::module_ & m) {
    m.def("probe_mixes", &probe_mixes, py::arg("model_path"), py::arg("tokens"), py::arg("n_ctx"),
          py::arg("mixes"), py::arg("n_threads") = 0, py::arg("n_gpu_layers") = 0, py::arg("progress") = py::none(),
          "KL divergence of type mixes of a full-precision model, measured in memory (GIL released). tokens: "
          "int32, whole chunks of n_ctx (cut and scored as eval does); mixes: list of mixes, each a list of "
          "(tensor name, ggml type id, float32 importance or None), importance as llama_model_quantize takes "
          "the imatrix (n_per_row per expert). Returns a dict: kld and nll (float64 per mix: mean KL(base || "
          "mixed) and mean -log p_mixed over the scored tokens), nll_base (the base model's mean -log p) and "
          "n_tokens. progress(done, total) counts chunks over the base pass and every mix; False or an "
          "exception stops it");
}
