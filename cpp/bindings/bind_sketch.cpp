#include "bindings.h"

#include "llqx_sketch.h"

// the sketch of rows given at once: what the imatrix pass keeps per tensor
static py::array_t<float> sketch_rows(py::array_t<float, py::array::c_style | py::array::forcecast> rows, int32_t p) {
    if (rows.ndim() != 2) {
        error_raise({ LLQX_STATUS_INPUT, "sketch_rows takes a 2-D array of rows" });
    }
    if (p < 1) {
        error_raise({ LLQX_STATUS_INPUT, "the sketch needs at least one column" });
    }
    const int64_t m = rows.shape(0);
    const int64_t n = rows.shape(1);
    std::vector<float> out;
    {
        py::gil_scoped_release release;
        llqx_sketch sk;
        llqx_sketch_init(sk, n, p);
        llqx_sketch_add_rows(sk, rows.data(), m, n);
        llqx_sketch_result(sk, out);
    }
    py::array_t<float> arr({ (py::ssize_t) p, (py::ssize_t) n });
    std::copy(out.begin(), out.end(), arr.mutable_data());
    return arr;
}

static py::array_t<float> sketch_test_matrix(int64_t n, int32_t p) {
    if (n < 1 || p < 1) {
        error_raise({ LLQX_STATUS_INPUT, "the test matrix needs at least one row and one column" });
    }
    std::vector<float> omega;
    llqx_sketch_test_matrix(n, p, omega);
    py::array_t<float> arr({ (py::ssize_t) p, (py::ssize_t) n });
    float * dst = arr.mutable_data();
    for (int64_t j = 0; j < n; ++j) {
        for (int32_t i = 0; i < p; ++i) {
            dst[(size_t) i * (size_t) n + (size_t) j] = omega[(size_t) (j * p + i)];
        }
    }
    return arr;
}

void bind_sketch(py::module_ & m) {
    m.def("sketch_rows", &sketch_rows, py::arg("rows"), py::arg("p"),
          "the second-moment sketch of rows (m × n): (Σ x·(Ωᵀx))ᵀ, p × n, as the imatrix pass stores it");
    m.def("sketch_test_matrix", &sketch_test_matrix, py::arg("n"), py::arg("p"),
          "the sketch's fixed test matrix Ω for rows of n values, transposed: p × n entries ±1");
}
