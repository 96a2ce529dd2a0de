// The schemas of the internal op namespace `drmm_C`, and nothing else: each kernel file registers its own
// implementation (csrc/cpu/<op>_kernel.cpp for CPU, csrc/cuda/torch_glue.cpp for CUDA). The public,
// differentiable ops live in Python (drmm_kernels/ops/, namespace `drmm`) and call these.
#include <Python.h>
#include <torch/library.h>

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

// Written the same in drmm_kernels/schema.py (tests/kernels/test_schema.py keeps the two equal, and checks that the
// Python backends pass the arguments in this order); argument meanings: drmm_kernels/dispatch.py.
TORCH_LIBRARY(drmm_C, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def(
      "conv_relu_pool(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int stride, int padding, int pool, "
      "int pool_stride, int pool_padding, bool ceil_mode, float negative_slope) -> (Tensor, Tensor)");
  m.def(
      "bn_pool(Tensor z, Tensor scale, Tensor shift, int pool, int pool_stride, int pool_padding, bool ceil_mode, "
      "float negative_slope) -> (Tensor, Tensor)");
  m.def(
      "render(Tensor mu, Tensor switches, Tensor weight, Tensor? scale, int stride, int padding, int pool, "
      "int pool_stride, int pool_padding, bool ceil_mode, int out_h, int out_w, float negative_slope) -> Tensor");
  m.def(
      "gather_conv(Tensor src, Tensor weight, Tensor switches, int stride, int padding, int pool, int pool_stride, "
      "int pool_padding, bool ceil_mode) -> Tensor");
  m.def("masked_values(Tensor mu, Tensor switches, Tensor? scale, float negative_slope) -> Tensor");
  m.def(
      "unpool(Tensor values, Tensor switches, int pool, int pool_stride, int pool_padding, bool ceil_mode, "
      "int out_h, int out_w) -> Tensor");
  m.def("batch_stats(Tensor z) -> (Tensor, Tensor)");
  m.def(
      "render_wgrad(Tensor src, Tensor mu, Tensor switches, Tensor? scale, int stride, int padding, int pool, "
      "int pool_stride, int pool_padding, bool ceil_mode, float negative_slope, int kernel_h, int kernel_w) "
      "-> Tensor");
}
