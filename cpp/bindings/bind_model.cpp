#include "bindings.h"

#include "llqx_model.h"

static py::object kv_value(const llqx_kv_record & kv) {
    switch (kv.kind) {
        case LLQX_KV_INT:          return py::int_(kv.i);
        case LLQX_KV_FLOAT:        return py::float_(kv.f);
        case LLQX_KV_BOOL:         return py::bool_(kv.i != 0);
        case LLQX_KV_STRING:       return py::str(kv.s);
        case LLQX_KV_ARRAY_INT:    return py::cast(kv.ai);
        case LLQX_KV_ARRAY_FLOAT:  return py::cast(kv.af);
        case LLQX_KV_ARRAY_STRING: return py::cast(kv.as);
        case LLQX_KV_ARRAY_BOOL: {
            py::list out;
            for (int64_t v : kv.ai) {
                out.append(py::bool_(v != 0));
            }
            return out;
        }
    }
    return py::none();
}

static py::dict model_inspect(const std::string & path) {
    llqx_model_info info;
    llqx_error err;
    bool ok = false;
    {
        py::gil_scoped_release release;
        ok = llqx_model_inspect(path, info, err);
    }
    if (!ok) {
        error_raise(err);
    }
    py::list tensors;
    for (const auto & t : info.tensors) {
        py::dict d;
        d["name"]   = t.name;
        d["type"]   = t.type;
        d["shape"]  = py::make_tuple(t.ne[0], t.ne[1], t.ne[2], t.ne[3]);
        d["n_dims"] = t.n_dims;
        d["offset"] = t.offset;
        d["size"]   = t.size;
        tensors.append(d);
    }
    py::list metadata;
    for (const auto & kv : info.metadata) {
        metadata.append(py::make_tuple(kv.key, kv.gguf_type, kv.gguf_arr_type, kv_value(kv)));
    }
    py::dict out;
    out["path"]        = info.path;
    out["version"]     = info.version;
    out["alignment"]   = info.alignment;
    out["data_offset"] = info.data_offset;
    out["file_size"]   = info.file_size;
    out["tensors"]     = tensors;
    out["metadata"]    = metadata;
    return out;
}

void bind_model(py::module_ & m) {
    m.def("model_inspect", &model_inspect, py::arg("path"),
          "tensors (name, type, shape as ne[0..3], n_dims, offset, size) and metadata (key, gguf type, "
          "array element type or -1, value) of a GGUF file; raises LoadError for a bad file");
}
