// The only place where the compiled kernels meet torch: op schemas of the internal namespace
// `drmm_C` and their CPU / CUDA registrations. The public, differentiable ops live in Python
// (drmm_kernels/ops.py) and dispatch here. csrc/cuda/*.cu include no torch headers.
#include <torch/library.h>
#include <Python.h>

// Importing drmm_kernels._C from Python registers the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace {
bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(drmm_C, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}
