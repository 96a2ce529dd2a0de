// Geometry of one layer: a convolution (square stride, zero padding, no dilation) followed by a
// max-pool (PoolWindow below: any max_pool2d window). The only C++/CUDA definition; the Python one is
// drmm_kernels/contract.py. Torch-free, so the CUDA launchers (csrc/cuda/launchers.h) share it.
#pragma once

#include <cstdint>

namespace drmm {

// Input [N, C_in, H, W], weight [C_out, C_in, KH, KW], conv output [N, C_out, Hc, Wc], pooled
// [N, C_out, Hp, Wp]; conv_geometry sets Hp = Hc / pool (non-overlapping windows, floor: trailing rows / columns
// of the conv output are dropped), pooled_len gives any max_pool2d window's size.
// I is int64_t on the CPU and int in the CUDA kernels (which index inside one image in 32 bits).
template <typename I>
struct ConvGeometry {
  I n, c_in, h, w;
  I c_out, kh, kw;
  I stride, padding, pool;
  I hc, wc, hp, wp;
};

// Output size of a convolution along one axis; < 1 when the padded input is smaller than the kernel.
constexpr int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding) {
  return in + 2 * padding < kernel ? 0 : (in + 2 * padding - kernel) / stride + 1;
}

// The geometry of a layer from its input, weight and hyper-parameters (unchecked: see csrc/common/checks.h).
inline ConvGeometry<int64_t> conv_geometry(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh,
                                           int64_t kw, int64_t stride, int64_t padding, int64_t pool) {
  ConvGeometry<int64_t> g{n, c_in, h, w, c_out, kh, kw, stride, padding, pool, 0, 0, 0, 0};
  g.hc = conv_out_size(h, kh, stride, padding);
  g.wc = conv_out_size(w, kw, stride, padding);
  g.hp = g.hc / pool;
  g.wp = g.wc / pool;
  return g;
}

// A max_pool2d window (docs/ops.md#pooling): kernel k, stride s (1 <= s <= k), padding p (<= k / 2), ceil mode.
// Window (i, j) starts at row i * s - p and column j * s - p of the conv output; its switch offset counts from there.
struct PoolWindow {
  int64_t k, s, p;
  bool ceil;
  bool plain() const { return s == k && p == 0 && !ceil; }
};

// max_pool2d's output length along one axis (PyTorch's pooling_output_shape without dilation); < 1 when no window
// fits.
constexpr int64_t pooled_len(int64_t in, const PoolWindow& w) {
  const int64_t num = in + 2 * w.p - w.k + (w.ceil ? w.s - 1 : 0);
  int64_t out = (num >= 0 ? num / w.s : -((-num + w.s - 1) / w.s)) + 1;  // floor division, as PyTorch's div_rtn
  if (w.ceil && (out - 1) * w.s >= in + w.p) --out;                      // a last window may not start in the padding
  return out;
}

// The conv-output rows [0, pooled_cover) that `np` windows of size k every s from -p reach, within a map of n rows:
// the positions a render or weight gradient can route anything to (np * k for non-overlapping windows).
template <typename I>
constexpr I pooled_cover(I np, I k, I s, I p, I n) {
  return (np - 1) * s - p + k < n ? (np - 1) * s - p + k : n;
}

}  // namespace drmm
