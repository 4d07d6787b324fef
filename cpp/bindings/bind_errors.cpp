#include "bindings.h"

#include <string>

// the class of each llqx_status, made once by bind_errors; the module keeps them alive as well
static py::handle g_error_load;
static py::handle g_error_input;
static py::handle g_error_core;

static py::handle error_class_new(py::module_ & m, const char * name, const char * doc, py::handle bases) {
    const std::string qualified = std::string("llqx._core.") + name;
    PyObject * cls = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases.ptr(), nullptr);
    if (cls == nullptr) {
        throw py::error_already_set();
    }
    m.add_object(name, cls);
    return cls;
}

void error_raise(const llqx_error & err) {
    py::handle cls = g_error_core;
    switch (err.status) {
        case LLQX_STATUS_INPUT: cls = g_error_input; break;
        case LLQX_STATUS_LOAD:  cls = g_error_load;  break;
        default:                break;
    }
    PyErr_SetString(cls.ptr(), err.msg.c_str());
    throw py::error_already_set();
}

bool py_callback::progress(int32_t done, int32_t total, void * user_data) {
    py_callback * cb = static_cast<py_callback *>(user_data);
    return cb->call([&] { return cb->fn(done, total); });
}

void py_callback::discard(const char * where) {
    if (!error) {
        return;
    }
    std::exception_ptr e = error;
    error = nullptr;
    try {
        std::rethrow_exception(e);
    } catch (py::error_already_set & ex) {
        ex.discard_as_unraisable(where);
    } catch (const std::exception & ex) {
        PyErr_SetString(PyExc_RuntimeError, ex.what());
        py::error_already_set().discard_as_unraisable(where);
    } catch (...) {
        PyErr_SetString(PyExc_RuntimeError, "unknown C++ exception");
        py::error_already_set().discard_as_unraisable(where);
    }
}

void bind_errors(py::module_ & m) {
    py::handle base = error_class_new(m, "Error", "a failure reported by the llqx C++ core", PyExc_Exception);
    g_error_load = error_class_new(m, "LoadError", "a model or file that cannot be read or loaded", base);
    const py::tuple input_bases = py::make_tuple(base, py::handle(PyExc_ValueError));
    g_error_input = error_class_new(m, "InputError", "bad arguments to a core function", input_bases);
    const py::tuple core_bases = py::make_tuple(base, py::handle(PyExc_RuntimeError));
    g_error_core = error_class_new(m, "CoreError", "llama.cpp or ggml failed while running", core_bases);
}
