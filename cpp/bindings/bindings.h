// one include for every binding file, so pybind11 is configured the same everywhere, with the two things
// every binding shares: the error mapping (bind_errors.cpp) and the bridge for Python callbacks
#pragma once

#include "llqx_error.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <exception>

namespace py = pybind11;

void bind_errors(py::module_ & m);
void bind_eval(py::module_ & m);
void bind_imatrix(py::module_ & m);
void bind_layout(py::module_ & m);
void bind_log(py::module_ & m);
void bind_model(py::module_ & m);
void bind_probe(py::module_ & m);
void bind_quantize(py::module_ & m);
void bind_score(py::module_ & m);
void bind_sketch(py::module_ & m);
void bind_types(py::module_ & m);

// raises the Python class of err.status (LoadError, InputError or CoreError, made by bind_errors) with
// err.msg; call with the GIL held
[[noreturn]] void error_raise(const llqx_error & err);

// a Python callable that C++ calls from its own loop, on any thread. Each call takes the GIL; the first
// exception raised in a call (Python or C++) is kept and makes that call and every later one return false,
// so the loop stops; rethrow() raises it again once the loop has returned (GIL held).
struct py_callback {
    py::object         fn;
    std::exception_ptr error;

    // make() builds the arguments and calls fn under the GIL; true when the loop may go on: no exception
    // so far and the call returned None or something true
    template <typename F>
    bool call(F make) {
        py::gil_scoped_acquire acquire;
        if (error) {
            return false;
        }
        try {
            py::object r = make();
            return r.is_none() || r.cast<bool>();
        } catch (...) {
            error = std::current_exception();
            return false;
        }
    }

    void rethrow() {
        if (error) {
            std::exception_ptr e = error;
            error = nullptr;
            std::rethrow_exception(e);
        }
    }

    // a core progress callback (llqx_eval_progress_t) whose user_data is a py_callback: calls fn(done, total)
    static bool progress(int32_t done, int32_t total, void * user_data);

    // for a callback no Python caller waits on (the log sink): report the kept exception through
    // sys.unraisablehook and forget it, so later calls go ahead
    void discard(const char * where);
};
