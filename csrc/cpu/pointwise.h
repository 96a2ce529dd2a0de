// A 1x1, stride-1, unpadded convolution of a contiguous NCHW x is a batched matrix product W (Co x Ci) times
// x[n] (Ci x HW). oneDNN first reorders NCHW into its blocked layout; the product skips that (the 5-layer MNIST
// net's last layer, 128->10 on 6x6, is the case that gains most: bench/results/cpu_ops.md).
#pragma once

#include <ATen/ATen.h>

namespace drmm {
namespace cpu {

inline bool is_pointwise(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding) {
  return weight.size(2) == 1 && weight.size(3) == 1 && stride == 1 && padding == 0 && x.is_contiguous();
}

// conv2d(x, weight) for is_pointwise inputs, contiguous NCHW.
inline at::Tensor pointwise_conv(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t n = x.size(0), ci = x.size(1), h = x.size(2), w = x.size(3), co = weight.size(0);
  // bmm over a stride-0 expanded weight: at::matmul would instead transpose x into one (N*HW x Ci) copy.
  return at::bmm(weight.reshape({co, ci}).expand({n, co, ci}), x.reshape({n, ci, h * w})).view({n, co, h, w});
}

// conv_transpose2d(g, weight) (= conv2d's input gradient) for a 1x1 weight: W^T (Ci x Co) times g[n].
inline at::Tensor pointwise_conv_transpose(const at::Tensor& g, const at::Tensor& weight) {
  const int64_t n = g.size(0), co = g.size(1), h = g.size(2), w = g.size(3), ci = weight.size(1);
  return at::bmm(weight.reshape({co, ci}).t().expand({n, ci, co}), g.reshape({n, co, h * w})).view({n, ci, h, w});
}

}  // namespace cpu
}  // namespace drmm
