#include "bindings.h"

#include "llqx_types.h"

#include <string>

static py::dict type_info_dict(const llqx_type_info & t) {
    py::dict d;
    d["id"]               = t.id;
    d["name"]             = t.name;
    d["block_size"]       = t.block_size;
    d["type_size"]        = t.type_size;
    d["bpw"]              = t.bpw;
    d["is_quantized"]     = t.is_quantized;
    d["can_quantize"]     = t.can_quantize;
    d["requires_imatrix"] = t.requires_imatrix;
    d["has_grid"]         = t.has_grid;
    d["act_block"]        = t.act_block;
    return d;
}

static py::array_t<uint8_t> quantize_rows(int32_t type, py::array_t<float, py::array::c_style | py::array::forcecast> src,
                                          py::object imatrix) {
    if (src.ndim() != 2) {
        error_raise({ LLQX_STATUS_INPUT, "quantize_rows: src must be a 2-D float32 array (rows, n_per_row)" });
    }
    const int64_t nrows     = src.shape(0);
    const int64_t n_per_row = src.shape(1);
    py::array_t<float, py::array::c_style | py::array::forcecast> weights;
    const float * w = nullptr;
    if (!imatrix.is_none()) {
        weights = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(imatrix);
        if (!weights || weights.ndim() != 1 || weights.shape(0) != n_per_row) {
            error_raise({ LLQX_STATUS_INPUT, "quantize_rows: imatrix must be a 1-D array of n_per_row floats" });
        }
        w = weights.data();
    }
    const size_t row_size = llqx_row_size(type, n_per_row);
    py::array_t<uint8_t> dst({ (py::ssize_t) nrows, (py::ssize_t) row_size });
    llqx_error err;
    int64_t written = 0;
    {
        py::gil_scoped_release release;
        if (row_size == 0) {
            llqx_type_info info;
            err = { LLQX_STATUS_INPUT, llqx_type_info_get(type, info) ? "row length " + std::to_string(n_per_row) +
                    " is not a multiple of the block size of " + info.name : "unknown type id " + std::to_string(type) };
            written = -1;
        } else {
            written = llqx_quantize_rows(type, src.data(), dst.mutable_data(), nrows, n_per_row, w, err);
        }
    }
    if (written < 0) {
        error_raise(err);
    }
    return dst;
}

static py::array_t<float> dequantize_rows(int32_t type, py::array_t<uint8_t, py::array::c_style> src, int64_t n_per_row) {
    const size_t row_size = llqx_row_size(type, n_per_row);
    if (row_size == 0) {
        error_raise({ LLQX_STATUS_INPUT, "dequantize_rows: row length " + std::to_string(n_per_row) +
                                         " does not fit the block size of type " + std::to_string(type) });
    }
    if ((size_t) src.nbytes() % row_size != 0) {
        error_raise({ LLQX_STATUS_INPUT, "dequantize_rows: src size is not a whole number of rows" });
    }
    const int64_t nrows = (int64_t) ((size_t) src.nbytes() / row_size);
    py::array_t<float> dst({ (py::ssize_t) nrows, (py::ssize_t) n_per_row });
    llqx_error err;
    bool ok = false;
    {
        py::gil_scoped_release release;
        ok = llqx_dequantize_rows(type, src.data(), dst.mutable_data(), nrows, n_per_row, err);
    }
    if (!ok) {
        error_raise(err);
    }
    return dst;
}

void bind_types(py::module_ & m) {
    m.def("type_count", &llqx_type_count, "number of ggml type ids (some ids are retired)");
    m.def("type_info", [](int32_t id) -> py::object {
        llqx_type_info info;
        if (!llqx_type_info_get(id, info)) {
            return py::none();
        }
        return type_info_dict(info);
    }, py::arg("type"), "ggml type record as a dict, or None for a retired or unknown id");
    m.def("tensor_requires_imatrix", &llqx_tensor_requires_imatrix, py::arg("name"), py::arg("type_id"),
          "llama.cpp cannot write tensor name as this type without importance data (tensor_requires_imatrix in "
          "llama-quant.cpp, or ggml_quantize_requires_imatrix); False for an unknown type");
    m.def("type_from_name", &llqx_type_from_name, py::arg("name"), "ggml type id by name (case-insensitive), -1 if unknown");
    m.def("row_size", &llqx_row_size, py::arg("type"), py::arg("n_per_row"),
          "bytes of one row, 0 when n_per_row does not fit the block size");
    m.def("quantize_init", [](int32_t type) {
        py::gil_scoped_release release;
        llqx_quantize_init(type);
    }, py::arg("type"));
    m.def("quantize_free", []() {
        py::gil_scoped_release release;
        llqx_quantize_free();
    }, "free the IQ lookup grids (rebuilt on next use); nothing may be quantizing meanwhile");
    m.def("quantize_rows", &quantize_rows, py::arg("type"), py::arg("src"), py::arg("imatrix") = py::none(),
          "quantize a 2-D float32 array row by row; returns uint8 (rows, row_size)");
    m.def("dequantize_rows", &dequantize_rows, py::arg("type"), py::arg("src"), py::arg("n_per_row"),
          "dequantize rows of a type back to float32 (rows, n_per_row)");
}
