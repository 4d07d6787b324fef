#include "bindings.h"

#include "llqx_quantize.h"

// request fields mirror llama_model_quantize_params; containers are owned here, not by Python
static void model_quantize(const llqx_quantize_request & req) {
    llqx_error err;
    bool ok = false;
    {
        py::gil_scoped_release release;
        ok = llqx_model_quantize(req, err);
    }
    if (!ok) {
        error_raise(err);
    }
}

void bind_quantize(py::module_ & m) {
    py::class_<llqx_kv_override>(m, "KvOverride")
        .def(py::init<>())
        .def_readwrite("key", &llqx_kv_override::key)
        .def_readwrite("tag", &llqx_kv_override::tag)
        .def_readwrite("val_i64", &llqx_kv_override::val_i64)
        .def_readwrite("val_f64", &llqx_kv_override::val_f64)
        .def_readwrite("val_bool", &llqx_kv_override::val_bool)
        .def_readwrite("val_str", &llqx_kv_override::val_str);

    py::class_<llqx_quantize_request>(m, "QuantizeRequest")
        .def(py::init<>())
        .def_readwrite("input", &llqx_quantize_request::input)
        .def_readwrite("output", &llqx_quantize_request::output)
        .def_readwrite("nthread", &llqx_quantize_request::nthread)
        .def_readwrite("ftype", &llqx_quantize_request::ftype)
        .def_readwrite("output_tensor_type", &llqx_quantize_request::output_tensor_type)
        .def_readwrite("token_embedding_type", &llqx_quantize_request::token_embedding_type)
        .def_readwrite("allow_requantize", &llqx_quantize_request::allow_requantize)
        .def_readwrite("quantize_output_tensor", &llqx_quantize_request::quantize_output_tensor)
        .def_readwrite("only_copy", &llqx_quantize_request::only_copy)
        .def_readwrite("pure", &llqx_quantize_request::pure)
        .def_readwrite("keep_split", &llqx_quantize_request::keep_split)
        .def_readwrite("dry_run", &llqx_quantize_request::dry_run)
        .def_readwrite("max_buf_size", &llqx_quantize_request::max_buf_size)
        .def_readwrite("kv_overrides", &llqx_quantize_request::kv_overrides)
        .def_readwrite("prune_layers", &llqx_quantize_request::prune_layers)
        .def("add_tensor_override", [](llqx_quantize_request & r, const std::string & pattern, int32_t type) {
            r.tensor_overrides.push_back({ pattern, type });
        }, py::arg("pattern"), py::arg("type"))
        .def_property_readonly("tensor_overrides", [](const llqx_quantize_request & r) {
            py::list out;
            for (const auto & t : r.tensor_overrides) {
                out.append(py::make_tuple(t.pattern, t.type));
            }
            return out;
        })
        .def("add_imatrix", [](llqx_quantize_request & r, const std::string & name,
                               py::array_t<float, py::array::c_style | py::array::forcecast> values) {
            const float * p = values.data();
            r.imatrix.push_back({ name, std::vector<float>(p, p + values.size()) });
        }, py::arg("name"), py::arg("values"))
        .def_property_readonly("imatrix_names", [](const llqx_quantize_request & r) {
            std::vector<std::string> names;
            for (const auto & e : r.imatrix) {
                names.push_back(e.name);
            }
            return names;
        });

    m.def("model_quantize", &model_quantize, py::arg("request"),
          "run llama_model_quantize; raises InputError for a bad request, CoreError when llama.cpp fails");
}
