#include "bindings.h"

#include "llqx_log.h"

#include <memory>

// the Python callable lives as long as it is installed; replaced or cleared by the next call
static std::unique_ptr<py::object> g_log_callback;

static void log_sink(int32_t level, const char * text, void * /*user_data*/) {
    if (!Py_IsInitialized()) {
        return;
    }
    py::gil_scoped_acquire acquire;
    if (!g_log_callback) {
        return;
    }
    // a copy, so that the callback may replace itself through log_set; nobody waits on the log, so an
    // exception in it is reported (sys.unraisablehook) and the next line is logged again
    py_callback cb{ *g_log_callback, nullptr };
    cb.call([&] {
        cb.fn(level, text);
        return py::none();
    });
    cb.discard(__func__);
}

void bind_log(py::module_ & m) {
    // drop the callback before the interpreter goes away, so the static never outlives Python
    py::module_::import("atexit").attr("register")(py::cpp_function([]() {
        llqx_log_set(nullptr, nullptr);
        g_log_callback.reset();
    }));
    m.def("log_set", [](py::object callback) {
        if (callback.is_none()) {
            llqx_log_set(nullptr, nullptr);
            g_log_callback.reset();
            return;
        }
        g_log_callback = std::make_unique<py::object>(std::move(callback));
        llqx_log_set(log_sink, nullptr);
    }, py::arg("callback"), "route llama.cpp/ggml log lines to callback(level, text); None silences them");
}
