// CPU kernel of the conv_bn_relu_pool op's training-mode statistics (registered as drmm_C::batch_stats). The
// rest of that op runs on conv_relu_pool_kernel.cpp's epilogue (bn_pool) and switches_kernel.cpp (unpool).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "cpu/simd.h"
#include "cpu/work_queue.h"

namespace drmm {
namespace cpu {
namespace {

// Sum and sum of squares of (v - k) over one plane, in T lanes (planes are short: <= a few thousand values).
template <typename T>
inline void plane_moments(const T* __restrict__ v, int64_t len, T k, double* s1, double* s2) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::W;
  const V vk = vbroadcast(k);
  V a1 = vbroadcast<T>(0), a2 = vbroadcast<T>(0);
  int64_t q = 0;
  for (; q + W <= len; q += W) {
    const V d = vload(v + q) - vk;
    a1 += d;
    a2 += d * d;
  }
  double t1 = static_cast<double>(hsum<T>(a1)), t2 = static_cast<double>(hsum<T>(a2));
  for (; q < len; ++q) {
    const double d = static_cast<double>(v[q] - k);
    t1 += d;
    t2 += d * d;
  }
  *s1 += t1;
  *s2 += t2;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& z) {
  DRMM_CHECK(z.dim() == 4 && z.is_contiguous() && z.numel() > 0, "batch_stats",
             "z must be a non-empty contiguous 4-D (N, C, H, W) tensor, got ", z.sizes());
  const int64_t n = z.size(0), c = z.size(1), plane = z.size(2) * z.size(3);
  at::Tensor mean = at::empty({c}, z.options()), var = at::empty({c}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "drmm_cpu_batch_stats", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    // Shifted by each channel's first value (against cancellation when |mean| >> std), accumulated in double
    // over planes. A fixed number of sample chunks, summed in order: the result does not depend on the threads.
    constexpr int64_t kChunks = 8;
    const int64_t chunks = std::min(n, kChunks);
    std::vector<double> part(2 * chunks * c, 0.0);
    std::vector<scalar_t> shift(c);
    for (int64_t ch = 0; ch < c; ++ch) shift[ch] = zp[ch * plane];
    WorkQueue queue(chunks, 1);
    queue.run([&](int64_t, WorkQueue& wq) {
      for (int64_t b, e; wq.take(&b, &e);)
        for (int64_t k = b; k < e; ++k) {
          double* s1 = part.data() + 2 * k * c;
          double* s2 = s1 + c;
          for (int64_t i = k * n / chunks; i < (k + 1) * n / chunks; ++i)
            for (int64_t ch = 0; ch < c; ++ch)
              plane_moments(zp + (i * c + ch) * plane, plane, shift[ch], s1 + ch, s2 + ch);
        }
    });
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* vp = var.data_ptr<scalar_t>();
    const double count = static_cast<double>(n * plane);
    for (int64_t ch = 0; ch < c; ++ch) {
      double s1 = 0, s2 = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        s1 += part[2 * k * c + ch];
        s2 += part[(2 * k + 1) * c + ch];
      }
      const double m = s1 / count;
      mp[ch] = static_cast<scalar_t>(shift[ch] + m);
      vp[ch] = static_cast<scalar_t>(std::max(0.0, s2 / count - m * m));
    }
  });
  return {mean, var};
}

}  // namespace cpu
}  // namespace drmm

TORCH_LIBRARY_IMPL(drmm_C, CPU, m) { m.impl("batch_stats", &drmm::cpu::batch_stats); }
