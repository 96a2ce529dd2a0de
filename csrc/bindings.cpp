// The only place where the compiled kernels meet the torch dispatcher: the schemas of the internal
// namespace `drmm_C` and their CPU / CUDA registrations. The public, differentiable ops live in Python
// (drmm_kernels/ops.py, namespace `drmm`) and call these; nothing is registered twice.
// csrc/cuda/*.cu include no torch headers: the CUDA block below turns tensors into pointers, sizes,
// strides and the current stream, and checks every launch.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_ops.h"

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

// Argument meanings are those of drmm_kernels/backends.py (the primitive contract).
TORCH_LIBRARY(drmm_C, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("conv_relu_pool(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int stride, int padding, int pool, "
        "float negative_slope) -> (Tensor, Tensor)");
  m.def("bn_pool(Tensor z, Tensor scale, Tensor shift, int pool, float negative_slope) -> (Tensor, Tensor)");
  m.def("render(Tensor mu, Tensor switches, Tensor weight, Tensor? scale, int stride, int padding, int pool, "
        "int out_h, int out_w, float negative_slope) -> Tensor");
  m.def("gather_conv(Tensor src, Tensor weight, Tensor switches, int stride, int padding, int pool) -> Tensor");
  m.def("render_wgrad(Tensor src, Tensor mu, Tensor switches, Tensor? scale, int stride, int padding, int pool, "
        "float negative_slope, int kernel_h, int kernel_w) -> Tensor");
}

// ---------------------------------------------------------------- CPU (csrc/cpu)
TORCH_LIBRARY_IMPL(drmm_C, CPU, m) {
  // registrations of csrc/cpu kernels go here
}

// ---------------------------------------------------------------- CUDA (csrc/cuda)
#ifdef WITH_CUDA
// glue for csrc/cuda launchers goes here
#endif
