// Argument checks of the compiled kernels, in the package's one error style:
//   drmm_kernels.<op>: <argument> ...
// The public Python ops (drmm_kernels/contract.py) check every argument first; these checks guard the
// drmm_C:: ops when they are called directly. Torch side only (the CPU kernels and csrc/cuda/torch_glue.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/geometry.h"

// TORCH_CHECK with the "drmm_kernels.<op>: " prefix; the message arguments are evaluated only on failure.
#define DRMM_CHECK(cond, op, ...) TORCH_CHECK((cond), "drmm_kernels.", (op), ": ", __VA_ARGS__)

namespace drmm {

inline void check_4d(const char* op, const char* name, const at::Tensor& t) {
  DRMM_CHECK(t.dim() == 4, op, name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  DRMM_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " has dtype ", t.scalar_type(), " but ", ref_name,
             " has dtype ", ref.scalar_type());
}

// uint8 switches of exactly the shape of the pooled tensor they belong to.
inline void check_switches(const char* op, const at::Tensor& switches, const char* ref_name, const at::Tensor& ref) {
  DRMM_CHECK(switches.scalar_type() == at::kByte, op, "switches must be uint8, got ", switches.scalar_type());
  DRMM_CHECK(switches.sizes() == ref.sizes(), op, "switches shape ", switches.sizes(), " does not match ", ref_name,
             " shape ", ref.sizes());
}

// An optional per-channel vector (scale, shift): 1-D with `channels` elements.
inline void check_channel_vector(const char* op, const char* name, const std::optional<at::Tensor>& v,
                                 int64_t channels) {
  if (!v.has_value() || !v->defined()) return;
  DRMM_CHECK(v->dim() == 1 && v->size(0) == channels, op, name, " must have shape [", channels, "], got ", v->sizes());
}

inline void check_pool(const char* op, int64_t pool) {
  DRMM_CHECK(pool >= 1 && pool <= 4, op, "pool must be in [1, 4], got ", pool);
}

// A max_pool2d window as the ops take it (docs/ops.md#pooling).
inline PoolWindow checked_window(const char* op, int64_t pool, int64_t pool_stride, int64_t pool_padding,
                                 bool ceil_mode) {
  check_pool(op, pool);
  DRMM_CHECK(pool_stride >= 1 && pool_stride <= pool, op, "pool_stride must be in [1, ", pool, "], got ", pool_stride);
  DRMM_CHECK(pool_padding >= 0 && pool_padding <= pool / 2, op, "pool_padding must be in [0, ", pool / 2, "], got ",
             pool_padding);
  return PoolWindow{pool, pool_stride, pool_padding, ceil_mode};
}

// The geometry of a layer with every hyper-parameter checked and a non-empty pooled map.
inline ConvGeometry<int64_t> checked_geometry(const char* op, int64_t n, int64_t c_in, int64_t h, int64_t w,
                                              int64_t c_out, int64_t kh, int64_t kw, int64_t stride, int64_t padding,
                                              int64_t pool) {
  DRMM_CHECK(stride >= 1, op, "stride must be >= 1, got ", stride);
  DRMM_CHECK(padding >= 0, op, "padding must be >= 0, got ", padding);
  check_pool(op, pool);
  DRMM_CHECK(kh >= 1 && kw >= 1, op, "kernel size must be >= 1, got (", kh, ", ", kw, ")");
  DRMM_CHECK(h + 2 * padding >= kh && w + 2 * padding >= kw, op, "input size (", h, ", ", w, ") with padding ", padding,
             " is smaller than the kernel (", kh, ", ", kw, ")");
  const ConvGeometry<int64_t> g = conv_geometry(n, c_in, h, w, c_out, kh, kw, stride, padding, pool);
  DRMM_CHECK(g.hp >= 1 && g.wp >= 1, op, "pool ", pool, " is larger than the conv output (", g.hc, ", ", g.wc,
             ") of input size (", h, ", ", w, ")");
  return g;
}

// A bad switch offset found by a kernel (bits 0-3 >= pool * pool).
inline void check_offsets(const char* op, bool bad, int64_t pool) {
  DRMM_CHECK(!bad, op, "switches hold a window offset >= pool*pool = ", pool * pool,
             " or one in the pool padding (bits 0-3 must be dy*pool+dx of a position inside the conv output)");
}

}  // namespace drmm
