#include "bindings.h"

#include "llqx_score.h"
#include "llqx_score_sample.h"

#include <atomic>
#include <memory>
#include <string>

namespace {

// a flag another Python thread sets to stop a running score pass (Ctrl+C)
struct score_cancel {
    std::atomic<bool> flag { false };
};

} // namespace

// callback(job, errors, n_rows) -> bool|None as each job finishes: False or an exception stops the run
static bool score_done(int32_t job, const double * errors, int32_t n_errors, int64_t n_rows, void * user_data) {
    auto * cb = (py_callback *) user_data;
    return cb->call([&] {
        py::array_t<double> arr(n_errors);
        std::copy(errors, errors + n_errors, arr.mutable_data());
        return cb->fn(job, arr, n_rows);
    });
}

static std::vector<float> float_vector(py::object obj, const char * what, const std::string & name) {
    if (obj.is_none()) {
        return {};
    }
    auto arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(obj);
    if (!arr) {
        error_raise({ LLQX_STATUS_INPUT, std::string(what) + " of " + name + " must be a float array" });
    }
    return std::vector<float>(arr.data(), arr.data() + arr.size());
}

static py::object score_run(const std::string & path, py::list jobs_in, int32_t nthread, int64_t sample_elements,
                            int64_t min_rows, py::object callback, std::shared_ptr<score_cancel> cancel) {
    std::vector<llqx_score_job> jobs;
    jobs.reserve(jobs_in.size());
    for (py::handle h : jobs_in) {
        py::dict d = py::reinterpret_borrow<py::dict>(h);
        llqx_score_job j;
        j.name     = d["name"].cast<std::string>();
        j.src_type = d["src_type"].cast<int32_t>();
        auto ne    = d["ne"].cast<std::vector<int64_t>>();
        if (ne.size() != 3) {
            error_raise({ LLQX_STATUS_INPUT, "ne of " + j.name + " must have 3 entries" });
        }
        j.ne[0] = ne[0];
        j.ne[1] = ne[1];
        j.ne[2] = ne[2];
        j.offset      = d["offset"].cast<uint64_t>();
        j.candidates  = d["candidates"].cast<std::vector<int32_t>>();
        j.weights     = float_vector(d.contains("weights") ? py::object(d["weights"]) : py::object(py::none()), "weights", j.name);
        j.diagonal    = float_vector(d.contains("diagonal") ? py::object(d["diagonal"]) : py::object(py::none()), "diagonal", j.name);
        j.directions  = float_vector(d.contains("directions") ? py::object(d["directions"]) : py::object(py::none()), "directions", j.name);
        j.n_dir       = d.contains("n_dir") ? d["n_dir"].cast<int32_t>() : 0;
        j.noise       = float_vector(d.contains("noise") ? py::object(d["noise"]) : py::object(py::none()), "noise", j.name);
        j.n_noise     = d.contains("n_noise") ? d["n_noise"].cast<int32_t>() : 0;
        j.alt_diagonal   = float_vector(d.contains("alt_diagonal") ? py::object(d["alt_diagonal"]) : py::object(py::none()), "alt_diagonal", j.name);
        j.alt_directions = float_vector(d.contains("alt_directions") ? py::object(d["alt_directions"]) : py::object(py::none()), "alt_directions", j.name);
        j.alt_n_dir      = d.contains("alt_n_dir") ? d["alt_n_dir"].cast<int32_t>() : 0;
        j.sample_elements = d.contains("sample_elements") ? d["sample_elements"].cast<int64_t>() : 0;
        jobs.push_back(std::move(j));
    }
    llqx_score_params params;
    params.nthread         = nthread;
    params.sample_elements = sample_elements;
    params.min_rows        = min_rows;

    py_callback cb{ callback, nullptr };
    std::vector<std::vector<double>> errors;
    llqx_error err;
    int32_t rc = -1;
    {
        py::gil_scoped_release release;
        rc = llqx_score_run(path, jobs, params, errors, callback.is_none() ? nullptr : score_done, &cb,
                            cancel ? &cancel->flag : nullptr, err);
    }
    cb.rethrow();
    if (rc < 0) {
        error_raise(err);
    }
    py::list out;
    for (const auto & e : errors) {
        if (e.empty()) {
            out.append(py::none());
        } else {
            py::array_t<double> arr((py::ssize_t) e.size());
            std::copy(e.begin(), e.end(), arr.mutable_data());
            out.append(arr);
        }
    }
    return py::make_tuple(rc == 1, out);
}

void bind_score(py::module_ & m) {
    py::class_<score_cancel, std::shared_ptr<score_cancel>>(m, "ScoreCancel", "set() stops a running score_run")
        .def(py::init<>())
        .def("set", [](score_cancel & c) { c.flag = true; })
        .def("is_set", [](const score_cancel & c) { return c.flag.load(); });
    m.def("score_sample_rows", [](const std::string & name, int32_t expert, const std::vector<double> & energy,
                                  int64_t n_sample) {
        std::vector<int64_t> rows;
        std::vector<double>  scales;
        llqx_score_sample_rows(name, expert, energy, n_sample, rows, scales);
        return py::make_tuple(rows, scales);
    }, py::arg("name"), py::arg("expert"), py::arg("energy"), py::arg("n_sample"),
       "the rows the scorer samples from one expert slice given every row's energy, and the inverse of each "
       "row's inclusion probability: (rows, scales)");
    m.def("score_run", &score_run, py::arg("path"), py::arg("jobs"), py::arg("nthread") = 1,
          py::arg("sample_elements") = 1 << 20, py::arg("min_rows") = 16,
          py::arg("callback") = py::none(), py::arg("cancel") = nullptr,
          "score tensors of a GGUF: jobs are dicts (name, src_type, ne[3], offset, candidates, weights, "
          "diagonal, directions, n_dir, noise, n_noise, alt_diagonal, alt_directions, alt_n_dir, sample_elements); callback(job, errors, n_rows) -> bool runs as each finishes. Returns "
          "(complete, [errors or None per job]).");
}
