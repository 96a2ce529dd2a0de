// Torch-free interface of the CUDA kernels (csrc/cuda/*_kernel.cu). csrc/cuda/torch_glue.cpp turns tensors into the
// raw pointers, sizes and element strides below and passes the current stream; every launcher returns
// the cudaError_t of its launches (cudaSuccess when there was nothing to do).
//
// Conventions shared by every launcher (argument meanings are those of drmm_kernels/dispatch.py):
// - 4-D tensors are described by a base pointer and element strides in NCHW index order, so NCHW,
//   channels_last and other strided layouts are read in place without a copy.
// - weight is contiguous [C_out, C_in, KH, KW]; outputs are contiguous NCHW (or [C_out, C_in, KH, KW]).
// - scale / shift are contiguous per-output-channel vectors of the accumulation type (float for
//   fp16/bf16/fp32, double for fp64), or nullptr when absent.
// - Tensor cores are used for fp16/bf16 and, when `allow_tf32` is true, for fp32 (TF32); fp64 and
//   fp32 with TF32 disallowed run on CUDA cores with exact fp32/fp64 accumulation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/geometry.h"

namespace drmm {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Strides4 {
  int64_t n, c, h, w;
};

// The layer geometry of csrc/common/geometry.h in 32 bits (offsets inside one image are 32-bit), with any max_pool2d
// window: pool x pool windows every ps rows / columns, the first starting at -pp (docs/ops.md#pooling); ps == pool,
// pp == 0 for non-overlapping windows. hp / wp are max_pool2d's output size.
struct ConvGeom : ConvGeometry<int> {
  int ps, pp;
};

// conv_relu_pool (csrc/cuda/conv_relu_pool_kernel.cu): y[N, C_out, Hp, Wp] and switches (uint8, same shape), both
// contiguous.
cudaError_t conv_relu_pool(DType dt, const void* x, Strides4 xs, const void* weight, const void* scale,
                           const void* shift, const ConvGeom& g, double negative_slope, bool allow_tf32, void* y,
                           uint8_t* switches, cudaStream_t stream);

// gather_conv: out[n, co, ph, pw] = conv2d(src, weight)[n, co, ph*ps - pp + dy, pw*ps - pp + dx] at the recorded
// offset (dy, dx) of the switch byte; out is contiguous, dtype of src.
cudaError_t gather_conv(DType dt, const void* src, Strides4 ss, const void* weight, const uint8_t* switches,
                        Strides4 sws, const ConvGeom& g, bool allow_tf32, void* out, cudaStream_t stream);

// bn_pool: z [N, C, Hc, Wc] (strided) -> y, switches [N, C, hp, wp] contiguous: the max_pool2d windows of pool x pool
// every ps from -pp, whose output size (hp, wp) the caller computed.
cudaError_t bn_pool(DType dt, const void* z, Strides4 zs, int n, int c, int hc, int wc, const void* scale,
                    const void* shift, int pool, int ps, int pp, int hp, int wp, double negative_slope, void* y,
                    uint8_t* switches, cudaStream_t stream);

// render (csrc/cuda/render_kernel.cu): x_hat[N, C_in, H, W] contiguous = conv_transpose2d(masked unpool of mu, weight).
// g.h / g.w are the requested output size; g.hc / g.wc the conv size it implies; g.hp / g.wp = mu's size.
cudaError_t render(DType dt, const void* mu, Strides4 ms, const uint8_t* switches, Strides4 sws, const void* weight,
                   const void* scale, const ConvGeom& g, double negative_slope, bool allow_tf32, void* x_hat,
                   cudaStream_t stream);

// render_wgrad (csrc/cuda/render_wgrad_kernel.cu): dW[C_out, C_in, KH, KW] contiguous. `workspace` must hold
// render_wgrad_workspace_elems(...) elements of the accumulation type (float, or double for fp64);
// partial sums of the K splits are written there and reduced in a fixed order (deterministic).
int64_t render_wgrad_workspace_elems(DType dt, const ConvGeom& g, bool allow_tf32, int num_sms);
cudaError_t render_wgrad(DType dt, const void* src, Strides4 ss, const void* mu, Strides4 ms, const uint8_t* switches,
                         Strides4 sws, const void* scale, const ConvGeom& g, double negative_slope, bool allow_tf32,
                         int num_sms, void* workspace, void* dw, cudaStream_t stream);

}  // namespace cuda
}  // namespace drmm
