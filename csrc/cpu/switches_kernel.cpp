// CPU kernels on switch maps (registered as drmm_C::unpool and drmm_C::masked_values): the pooled values at
// their recorded offsets, and the activation mask of a pooled gradient.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/switch_byte.h"
#include "cpu/pointwise.h"
#include "cpu/simd.h"
#include "cpu/switch_maps.h"
#include "cpu/work_queue.h"

namespace drmm {
namespace cpu {

// Each pooled value at its window's recorded offset of a zero (N, C, out_h, out_w) map: the training-mode
// batch-norm backward's max-pool gradient. One plane at a time, so the zero fill and the scattered writes meet in
// cache.
at::Tensor unpool(const at::Tensor& values, const at::Tensor& switches, int64_t pool, int64_t pool_stride,
                  int64_t pool_padding, bool ceil_mode, int64_t out_h, int64_t out_w) {
  const char* op = "unpool";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(op, "values", values);
  check_switches("unpool", switches, "values", values);
  const int64_t n = values.size(0), c = values.size(1), hp = values.size(2), wp = values.size(3);
  DRMM_CHECK(pooled_len(out_h, pw) == hp && pooled_len(out_w, pw) == wp, op, "output size (", out_h, ", ", out_w,
             ") pooled by ", pool, " (stride ", pool_stride, ", padding ", pool_padding, ") is not the values' size (",
             hp, ", ", wp, ")");
  const at::Tensor v = values.contiguous(), s = switches.contiguous();
  at::Tensor out = at::empty({n, c, out_h, out_w}, values.options());
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "drmm_cpu_unpool", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const uint8_t* sp = s.data_ptr<uint8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t plane = hp * wp, oplane = out_h * out_w, p2 = pool * pool;
    WorkQueue queue(n * c, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, oplane)));
    queue.run([&](int64_t, WorkQueue& wq) {
      for (int64_t b, e; wq.take(&b, &e);)
        for (int64_t i = b; i < e; ++i) {
          scalar_t* o = op + i * oplane;
          std::fill(o, o + oplane, scalar_t(0));
          const scalar_t* vi = vp + i * plane;
          const uint8_t* si = sp + i * plane;
          if (!pw.plain()) {
            // Windows may overlap: a position that is the maximum of several receives their sum, added in window
            // order within this plane (the same result run to run); an offset in the padding is an error.
            for (int64_t py = 0; py < hp; ++py)
              for (int64_t px = 0; px < wp; ++px) {
                const int off = si[py * wp + px] & kOffsetMask;
                const int64_t h = py * pw.s - pw.p + off / pool, w = px * pw.s - pw.p + off % pool;
                if (off >= p2 || h < 0 || h >= out_h || w < 0 || w >= out_w) {
                  bad.store(true, std::memory_order_relaxed);
                  continue;
                }
                o[h * out_w + w] += vi[py * wp + px];
              }
            continue;
          }
          for (int64_t py = 0; py < hp; ++py)
            for (int64_t px = 0; px < wp; ++px) {
              const int off = si[py * wp + px] & kOffsetMask;
              if (off >= p2) {
                bad.store(true, std::memory_order_relaxed);
                continue;
              }
              o[(py * pool + off / pool) * out_w + px * pool + off % pool] = vi[py * wp + px];
            }
        }
    });
  });
  if (pw.plain()) check_offsets(op, bad, pool);
  DRMM_CHECK(!bad, op, "switches hold an offset outside the ", pool, "x", pool, " window or in the pool padding");
  return out;
}

// mu * a'(switches) * scale[c] as a fresh NCHW tensor: the pool == 1 backward's activation gradient in one
// pass over the uint8 switches (a bool mask + masked_fill costs three).
at::Tensor masked_values(const at::Tensor& mu, const at::Tensor& switches, const std::optional<at::Tensor>& scale,
                         double negative_slope) {
  const char* op = "masked_values";
  check_4d(op, "mu", mu);
  check_switches(op, switches, "mu", mu);
  check_channel_vector(op, "scale", scale, mu.size(1));
  const at::Tensor m = mu.contiguous(), s = switches.contiguous();
  at::Tensor out = at::empty(m.sizes(), m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "drmm_cpu_masked_values",
                             [&] { fill_masked<scalar_t>(m, s, scale, negative_slope, out.data_ptr<scalar_t>()); });
  return out;
}

}  // namespace cpu
}  // namespace drmm

TORCH_LIBRARY_IMPL(drmm_C, CPU, m) {
  m.impl("unpool", &drmm::cpu::unpool);
  m.impl("masked_values", &drmm::cpu::masked_values);
}
