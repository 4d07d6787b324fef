#include "bindings.h"

PYBIND11_MODULE(_core, m) {
    m.doc() = "llqx C++ core on llama.cpp's public API";
    bind_errors(m);
    bind_eval(m);
    bind_imatrix(m);
    bind_layout(m);
    bind_log(m);
    bind_model(m);
    bind_probe(m);
    bind_quantize(m);
    bind_score(m);
    bind_sketch(m);
    bind_types(m);
}
