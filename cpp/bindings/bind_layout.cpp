#include "bindings.h"

#include "llqx_layout.h"

void bind_layout(py::module_ & m) {
    m.def("layout_meta_size", [](const std::string & path, const std::vector<llqx_kv_override> & kv_overrides,
                                 int32_t ftype) {
        llqx_error err;
        int64_t size = -1;
        {
            py::gil_scoped_release release;
            size = llqx_layout_meta_size(path, kv_overrides, ftype, err);
        }
        if (size < 0) {
            error_raise(err);
        }
        return size;
    }, py::arg("path"), py::arg("kv_overrides"), py::arg("ftype") = 7,
       "metadata bytes (padded) llama_model_quantize writes for this model and these metadata overrides; "
       "LoadError for a file that cannot be read");
}
