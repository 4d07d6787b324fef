#include "bindings.h"

#include "llqx_sketch.h"

// the sketch of a stream of rows given at once: what the imatrix pass keeps per tensor, and how two
// sketches merge (the sketch of their rows stacked)
static py::array_t<float> sketch_rows(py::array_t<float, py::array::c_style | py::array::forcecast> rows, int32_t rank) {
    if (rows.ndim() != 2) {
        error_raise({ LLQX_STATUS_INPUT, "sketch_rows takes a 2-D array of rows" });
    }
    if (rank < 1) {
        error_raise({ LLQX_STATUS_INPUT, "the sketch rank must be at least 1" });
    }
    const int64_t m = rows.shape(0);
    const int64_t n = rows.shape(1);
    std::vector<float> out;
    {
        py::gil_scoped_release release;
        llqx_sketch sk;
        llqx_sketch_init(sk, n, rank);
        for (int64_t i = 0; i < m; ++i) {
            llqx_sketch_add(sk, rows.data() + i * n);
        }
        llqx_sketch_result(sk, out);
    }
    py::array_t<float> arr({ (py::ssize_t) rank, (py::ssize_t) n });
    std::copy(out.begin(), out.end(), arr.mutable_data());
    return arr;
}

void bind_sketch(py::module_ & m) {
    m.def("sketch_rows", &sketch_rows, py::arg("rows"), py::arg("rank"),
          "Frequent Directions sketch of the rows' second moments Σ x xᵀ: at most rank orthogonal rows "
          "(largest first, zero rows where fewer) B with BᵀB ⪯ Σ x xᵀ");
}
