// one include for every binding file, so pybind11 is configured the same everywhere
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

void bind_eval(py::module_ & m);
void bind_imatrix(py::module_ & m);
void bind_layout(py::module_ & m);
void bind_log(py::module_ & m);
void bind_model(py::module_ & m);
void bind_quantize(py::module_ & m);
void bind_score(py::module_ & m);
void bind_types(py::module_ & m);
