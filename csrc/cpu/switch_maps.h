// Helpers shared by the CPU kernels that read or build maps at the recorded switch positions
// (render_kernel.cpp, render_wgrad_kernel.cpp, switches_kernel.cpp): the CPU form of the layer geometry,
// the activation mask, the zero-padded NHWC image copy and the dense (pool == 1) masked map.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <sys/resource.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "common/checks.h"
#include "common/geometry.h"
#include "common/switch_byte.h"
#include "cpu/work_queue.h"

namespace drmm {
namespace cpu {

// The layer geometry with any max_pool2d window: ps / pp are the pool's stride and padding (ps == pool, pp == 0 for
// non-overlapping windows), and hp / wp max_pool2d's output size.
struct Geometry : ConvGeometry<int64_t> {
  int64_t ps, pp;
  bool all_inside;  // every window lies inside the conv output (non-overlapping pools: always)
};

// The checked geometry of a layer whose pooled tensors (mu, switches) must have shape [n, c_out, hp, wp].
inline Geometry make_geometry(const char* op, int64_t n, int64_t c_out, int64_t c_in, int64_t kh, int64_t kw, int64_t h,
                              int64_t w, int64_t stride, int64_t padding, const PoolWindow& pw, const at::Tensor& mu) {
  Geometry g{checked_geometry(op, n, c_in, h, w, c_out, kh, kw, stride, padding, 1), pw.s, pw.p, false};
  g.pool = pw.k;
  g.hp = pooled_len(g.hc, pw);
  g.wp = pooled_len(g.wc, pw);
  g.all_inside = pw.p == 0 && (g.hp - 1) * pw.s + pw.k <= g.hc && (g.wp - 1) * pw.s + pw.k <= g.wc;
  DRMM_CHECK(g.hp >= 1 && g.wp >= 1, op, "pool ", pw.k, " (stride ", pw.s, ", padding ", pw.p,
             ") is larger than the conv output (", g.hc, ", ", g.wc, ")");
  DRMM_CHECK(mu.size(0) == n && mu.size(1) == c_out && mu.size(2) == g.hp && mu.size(3) == g.wp, op,
             "mu/switches must have shape [", n, ", ", c_out, ", ", g.hp, ", ", g.wp, "] (conv output (", g.hc, ", ",
             g.wc, ") pooled by ", pw.k, "), got ", mu.sizes());
  return g;
}

// The conv-output row and column that window (py, px)'s switch offset o points at; false for an offset outside the
// pool x pool window or a position outside the conv output (in the pool padding, or past a ceil-mode window's end).
inline bool switch_position(const Geometry& g, int64_t py, int64_t px, int o, int64_t* row, int64_t* col) {
  if (o >= g.pool * g.pool) return false;
  *row = py * g.ps - g.pp + o / g.pool;
  *col = px * g.ps - g.pp + o % g.pool;
  return *row >= 0 && *row < g.hc && *col >= 0 && *col < g.wc;
}

// Whether window (py, px)'s offset o is a position inside the conv output (switch_position without computing it:
// the render's per-channel bucketing asks this for every entry, and its windows are usually all inside).
inline bool valid_offset(const Geometry& g, int64_t py, int64_t px, int o) {
  if (o >= g.pool * g.pool) return false;
  if (g.all_inside) return true;
  int64_t row, col;
  return switch_position(g, py, px, o, &row, &col);
}

inline void check_scale(const char* op, const std::optional<at::Tensor>& scale, int64_t c_out, const at::Tensor& ref) {
  check_channel_vector(op, "scale", scale, c_out);
  if (scale.has_value()) check_same_dtype(op, "scale", *scale, "mu", ref);
}

// Per-channel factor that turns a pooled value into the value placed in the unpooled map:
// (1 if the `a` bit is on else slope) * scale[c], computed as the reference does (mu * a) * scale.
template <typename T>
struct Masker {
  const T* scale;  // nullptr: no scale
  T slope;
  bool leaky;
  // false when the entry contributes nothing (ReLU and the `a` bit off).
  inline bool value(T mu, uint8_t sw, int64_t c, T* out) const {
    const bool on = (sw & kOnBit) != 0;
    if (!on && !leaky) return false;
    T g = on ? mu : mu * slope;
    if (scale != nullptr) g = g * scale[c];
    *out = g;
    return true;
  }
};

// Copy image n of src (any strides) into a zero-padded NHWC buffer of hs x ws x ci.
template <typename T>
void load_padded_nhwc(const at::Tensor& src, const T* base, int64_t n, int64_t padding, int64_t hs, int64_t ws,
                      T* buf) {
  const int64_t ci = src.size(1), h = src.size(2), w = src.size(3);
  const int64_t sn = src.stride(0), sc = src.stride(1), sh = src.stride(2), sw = src.stride(3);
  std::fill(buf, buf + hs * ws * ci, T(0));
  const T* img = base + n * sn;
  if (sc == 1) {  // channels_last: rows of channel vectors copy straight through
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        std::copy_n(img + y * sh + x * sw, ci, buf + ((y + padding) * ws + x + padding) * ci);
    return;
  }
  for (int64_t c = 0; c < ci; ++c)
    for (int64_t y = 0; y < h; ++y) {
      const T* row = img + c * sc + y * sh;
      T* dst = buf + ((y + padding) * ws + padding) * ci + c;
      for (int64_t x = 0; x < w; ++x) dst[x * ci] = row[x * sw];
    }
}

// o = (bit 7 ? a : a * slope) * k, and exactly 0 where the bit is off under ReLU (slope 0), whatever a is: a select,
// as ReLU's backward does, not a multiply (inf * 0 would be NaN). Branch-free so it vectorizes.
template <typename T>
void mask_plane(const T* __restrict__ a, const uint8_t* __restrict__ q, T slope, T k, bool scaled, T* __restrict__ o,
                int64_t len) {
  if (slope == T(0)) {
    if (scaled) {
      for (int64_t j = 0; j < len; ++j) o[j] = (q[j] & kOnBit) ? a[j] * k : T(0);
    } else {
      for (int64_t j = 0; j < len; ++j) o[j] = (q[j] & kOnBit) ? a[j] : T(0);
    }
  } else if (scaled) {
    for (int64_t j = 0; j < len; ++j) o[j] = ((q[j] & kOnBit) ? a[j] : a[j] * slope) * k;
  } else {
    for (int64_t j = 0; j < len; ++j) o[j] = (q[j] & kOnBit) ? a[j] : a[j] * slope;
  }
}

// The dense (pool == 1) path's full-size temporary: a fresh allocation, or a per-thread buffer kept across calls.
// Which is faster depends on the allocator (bench/results/cpu_ops.md and cpu_ops_retain.md time both regimes).
// When malloc hands back a recently freed block, fresh is cache-warm and the kept buffer is not. When glibc instead
// returns blocks of that size to the kernel on free, a fresh one is page-faulted in on every call, which costs more
// than the cold cache of a kept buffer. So temporaries are fresh until a fill is seen to
// fault in most of its pages; from then on this thread keeps the ones at least that large (grow-only, one buffer
// per dtype), while smaller ones, which malloc may still recycle, stay fresh.
struct DenseTemporary {
  at::Tensor tensor;
  bool fresh;
};

inline thread_local int64_t keep_dense_from_bytes = std::numeric_limits<int64_t>::max();

inline DenseTemporary dense_temporary(int64_t numel, const at::TensorOptions& opts) {
  if (numel * static_cast<int64_t>(opts.dtype().itemsize()) < keep_dense_from_bytes)
    return {at::empty({numel}, opts), true};
  thread_local at::Tensor buf[2];
  at::Tensor& b = buf[opts.dtype() == at::kDouble ? 1 : 0];
  if (!b.defined() || b.numel() < numel || b.storage().use_count() > 1) b = at::empty({numel}, opts);
  return {b.narrow(0, 0, numel), false};
}

inline int64_t minor_faults() {
#ifdef __linux__
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) == 0) return ru.ru_minflt;
#endif
  return -1;
}

// out = (mu * a') * scale over contiguous NCHW m / s. Without a per-channel factor the run is flat, in large
// blocks: the fixed cost of a per-plane call dominated on small maps.
template <typename T>
void fill_masked(const at::Tensor& m, const at::Tensor& s, const std::optional<at::Tensor>& scale, double slope,
                 T* out) {
  const int64_t c = m.size(1), plane = m.size(2) * m.size(3);
  const T* mp = m.data_ptr<T>();
  const uint8_t* sp = s.data_ptr<uint8_t>();
  const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  const T* scp = scale.has_value() ? sc.data_ptr<T>() : nullptr;
  const T ts = static_cast<T>(slope);
  if (scp == nullptr) {
    WorkQueue queue(m.numel(), 32768);
    queue.run([&](int64_t, WorkQueue& q) {
      for (int64_t b, e; q.take(&b, &e);) mask_plane(mp + b, sp + b, ts, T(1), false, out + b, e - b);
    });
    return;
  }
  WorkQueue queue(m.size(0) * c, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane)));
  queue.run([&](int64_t, WorkQueue& q) {
    for (int64_t b, e; q.take(&b, &e);)
      for (int64_t i = b; i < e; ++i)
        mask_plane(mp + i * plane, sp + i * plane, ts, scp[i % c], true, out + i * plane, plane);
  });
}

// Dense masked map for pool == 1: g = (mu * a') * scale, NCHW, in a dense temporary (which holds at least
// `min_numel` elements, so the caller can view the same storage with another shape).
template <typename T>
at::Tensor masked_map(const at::Tensor& mu, const at::Tensor& switches, const std::optional<at::Tensor>& scale,
                      double slope, int64_t min_numel = 0) {
  const at::Tensor m = mu.contiguous(), s = switches.contiguous();
  const int64_t numel = std::max(min_numel, m.numel());
  const DenseTemporary tmp = dense_temporary(numel, m.options());
  at::Tensor g = tmp.tensor.narrow(0, 0, m.numel()).view(m.sizes());
  const int64_t faults_before = tmp.fresh ? minor_faults() : -1;
  fill_masked<T>(m, s, scale, slope, g.data_ptr<T>());
  if (faults_before >= 0) {
    const int64_t bytes = numel * static_cast<int64_t>(sizeof(T)), pages = m.numel() * sizeof(T) / 4096;
    if (pages >= 256 && minor_faults() - faults_before > pages / 2)
      keep_dense_from_bytes = std::min(keep_dense_from_bytes, bytes);
  }
  return g;
}

}  // namespace cpu
}  // namespace drmm
