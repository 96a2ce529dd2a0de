// Declarations of the C++ CPU kernels (csrc/cpu/*.cpp), registered in csrc/bindings.cpp.
// Argument meanings are those of drmm_kernels/backends.py; outputs are contiguous NCHW.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace drmm {
namespace cpu {

// A 1x1, stride-1, unpadded convolution of a contiguous NCHW x is a batched matrix product W (Co x Ci) times
// x[n] (Ci x HW). oneDNN first reorders NCHW into its blocked layout; the product skips that (measured 2.8x
// faster for the 5-layer MNIST net's last layer, 128->10 on 6x6 at batch 256, 2 threads).
bool is_pointwise(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding);
// conv2d(x, weight) for is_pointwise inputs, contiguous NCHW.
at::Tensor pointwise_conv(const at::Tensor& x, const at::Tensor& weight);
// conv_transpose2d(g, weight) (= conv2d's input gradient) for a 1x1 weight: W^T (Ci x Co) times g[n].
at::Tensor pointwise_conv_transpose(const at::Tensor& g, const at::Tensor& weight);

// conv2d (ATen / oneDNN) followed by one fused scale/shift + activation + pool + switch pass.
std::tuple<at::Tensor, at::Tensor> conv_relu_pool(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& scale,
                                                  const std::optional<at::Tensor>& shift, int64_t stride,
                                                  int64_t padding, int64_t pool, double negative_slope);

// Per-channel mean and biased variance of a contiguous NCHW z (training-mode batch norm), in z's dtype.
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& z);

// The same epilogue on a precomputed conv output z.
std::tuple<at::Tensor, at::Tensor> bn_pool(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                                           int64_t pool, double negative_slope);

// Masked unpool + conv_transpose2d, as a scatter over the recorded positions (pool > 1).
at::Tensor render(const at::Tensor& mu, const at::Tensor& switches, const at::Tensor& weight,
                  const std::optional<at::Tensor>& scale, int64_t stride, int64_t padding, int64_t pool,
                  int64_t out_h, int64_t out_w, double negative_slope);

// conv2d(src, weight) evaluated only at each window's recorded position (pooled shape).
at::Tensor gather_conv(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& switches, int64_t stride,
                       int64_t padding, int64_t pool);

// Weight gradient of conv2d(src, W) for the sparse, masked, scaled map built from mu.
at::Tensor render_wgrad(const at::Tensor& src, const at::Tensor& mu, const at::Tensor& switches,
                        const std::optional<at::Tensor>& scale, int64_t stride, int64_t padding, int64_t pool,
                        double negative_slope, int64_t kernel_h, int64_t kernel_w);

// Pooled values at their recorded offsets of a zero (N, C, out_h, out_w) map.
at::Tensor unpool(const at::Tensor& values, const at::Tensor& switches, int64_t pool, int64_t out_h,
                  int64_t out_w);

// mu * (1 where the a bit is on, else negative_slope) * scale[c], dense (any pool).
at::Tensor masked_values(const at::Tensor& mu, const at::Tensor& switches, const std::optional<at::Tensor>& scale,
                         double negative_slope);

}  // namespace cpu
}  // namespace drmm
