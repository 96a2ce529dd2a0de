// render / dgrad: x_hat = conv_transpose2d(masked unpool of mu, weight).
//
// Implicit GEMM with M = output pixels (N * H * W), N = C_in, K = C_out * KH * KW. The A operand is the
// unpooled, masked, scaled map, generated in the loader and never materialized: for output pixel
// (ih, iw) and tap (co, kh, kw) the conv position is (oh, ow) = ((ih + p - kh) / s, (iw + p - kw) / s)
// when both divide exactly; it carries mu * (bit 7 ? 1 : negative_slope) * scale[co] only if the
// switch byte of its window records exactly that position, else 0 (also in the rows / columns no window
// reaches, oh >= pooled_cover). With overlapping max_pool2d windows (pool stride < pool) it carries
// the sum over the windows that cover (oh, ow) and record it (unpooled_at, common.cuh), added in a fixed
// order: deterministic, no atomics. B is the weight read as [(co, kh, kw), ci]: the "same weights"
// of the forward. The zeros (>= 3/4 of A for pool 2) are kept as dense tensor-core work; a scatter
// over the recorded positions is the alternative the benchmark should weigh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace drmm {
namespace cuda {
namespace {

template <typename T>
struct RenderArgs {
  const T* mu;
  Strides4 ms;
  const uint8_t* sw;
  Strides4 sws;
  const T* w;  // contiguous [C_out, C_in, KH, KW]
  const float* scale;
  ConvGeom g;
  float slope;
  T* out;  // contiguous [N, C_in, H, W]
};

constexpr int kPerThread = 16;  // A and B elements per thread per k tile
constexpr int kEPerThread = kBM * kBN / kThreads;

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) render_tc_kernel(const RenderArgs<T> p) {
  __shared__ TileSmem<T, false> sm;
  using Ld = SmemLd<T>;
  const ConvGeom& g = p.g;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp % 2, wn = warp / 2;
  const int hw = g.h * g.w;
  const int M = g.n * hw;
  const int khw = g.kh * g.kw;
  const int K = g.c_out * khw;
  const int hcov = pooled_cover(g.hp, g.pool, g.ps, g.pp, g.hc), wcov = pooled_cover(g.wp, g.pool, g.ps, g.pp, g.wc);
  const int m0 = blockIdx.x * kBM;
  const int n0 = blockIdx.y * kBN;

  // A row of this thread (one output pixel) and its 16 consecutive taps, as in the forward kernel.
  const int ml = tid % kBM;
  const int m = m0 + ml;
  const bool m_ok = m < M;
  int img = 0, ih = 0, iw = 0;
  if (m_ok) {
    img = m / hw;
    const int rem = m - img * hw;
    ih = rem / g.w;
    iw = rem - ih * g.w;
  }
  const T* mub = p.mu + static_cast<int64_t>(img) * p.ms.n;
  const uint8_t* swb = p.sw + static_cast<int64_t>(img) * p.sws.n;
  // In-image offsets fit in 32 bits (checked by the binding).
  const int msc = static_cast<int>(p.ms.c), msh = static_cast<int>(p.ms.h), msw = static_cast<int>(p.ms.w);
  const int ssc = static_cast<int>(p.sws.c), ssh = static_cast<int>(p.sws.h), ssw = static_cast<int>(p.sws.w);
  const int ka = (tid / kBM) * kPerThread;
  const int kb = tid % kBK;
  const int nb = tid / kBK;
  const int ne = tid / kBM;
  const T zero = zero_of<T>();
  const int ohn0 = ih + g.padding, own0 = iw + g.padding;

  T ra[kPerThread], rb[kPerThread];
  auto load = [&](int kt) {
    int k = kt * kBK + ka;
    int co = k / khw;
    int r = k - co * khw;
    int kh = r / g.kw;
    int kw = r - kh * g.kw;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      T v = zero;
      const int ohn = ohn0 - kh, own = own0 - kw;
      if (m_ok && k + i < K && ohn >= 0 && own >= 0) {
        const int oh = ohn / g.stride, ow = own / g.stride;
        if (oh * g.stride == ohn && ow * g.stride == own && oh < hcov && ow < wcov) {
          const float u = unpooled_at<float>(mub + co * msc, msh, msw, swb + co * ssc, ssh, ssw, oh, ow, g, p.slope);
          if (u != 0.0f) v = from_f<T>(u * (p.scale ? p.scale[co] : 1.0f));
        }
      }
      ra[i] = v;
      if (++kw == g.kw) {
        kw = 0;
        if (++kh == g.kh) {
          kh = 0;
          ++co;
        }
      }
    }
    const int kk = kt * kBK + kb;
    const int cob = kk / khw;
    const int64_t wbase = static_cast<int64_t>(cob) * g.c_in * khw + (kk - cob * khw);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int ci = n0 + nb + 4 * i;
      rb[i] = (kk < K && ci < g.c_in) ? p.w[wbase + static_cast<int64_t>(ci) * khw] : zero;
    }
  };

  const int ktiles = ceil_div(K, kBK);
  WarpMma<T, false> mma;
  mma.zero();
  load(0);
  for (int kt = 0; kt < ktiles; ++kt) {
    T* sa = sm.a();
    T* sb = sm.b();
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) sa[(ka + i) * Ld::kAColMajor + ml] = ra[i];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) sb[(nb + 4 * i) * Ld::kB + kb] = rb[i];
    __syncthreads();
    if (kt + 1 < ktiles) load(kt + 1);
    mma.step(sa, sb, wm, wn);
    __syncthreads();
  }
  mma.store(sm.c(), wm, wn);
  __syncthreads();

  if (!m_ok) return;
  const float* sc = sm.c();
  const int64_t row = static_cast<int64_t>(img) * g.c_in * hw + (m - img * hw);
#pragma unroll 4
  for (int j = 0; j < kEPerThread; ++j) {
    const int nl = ne + 2 * j;
    const int ci = n0 + nl;
    if (ci < g.c_in) p.out[row + static_cast<int64_t>(ci) * hw] = from_f<T>(sc[nl * Ld::kC + ml]);
  }
}

// CUDA-core kernel (fp64, fp32 without TF32): one thread per output element, a gather over the taps
// that can reach it; only recorded positions contribute.
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    render_simple_kernel(const T* __restrict__ mu, Strides4 ms, const uint8_t* __restrict__ sw, Strides4 sws,
                         const T* __restrict__ w, const A* __restrict__ scale, ConvGeom g, A slope, T* __restrict__ out,
                         int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int iw = static_cast<int>(idx % g.w);
  int64_t q = idx / g.w;
  const int ih = static_cast<int>(q % g.h);
  q /= g.h;
  const int ci = static_cast<int>(q % g.c_in);
  const int img = static_cast<int>(q / g.c_in);
  const int hcov = pooled_cover(g.hp, g.pool, g.ps, g.pp, g.hc), wcov = pooled_cover(g.wp, g.pool, g.ps, g.pp, g.wc);
  const T* mub = mu + img * ms.n;
  const uint8_t* swb = sw + img * sws.n;
  const int nwin = (g.pool + g.ps - 1) / g.ps;
  A acc = A(0);
  for (int kh = 0; kh < g.kh; ++kh) {
    const int ohn = ih + g.padding - kh;
    if (ohn < 0 || ohn % g.stride != 0) continue;
    const int oh = ohn / g.stride;
    if (oh >= hcov) continue;
    const int ph_last = (oh + g.pp) / g.ps, dy_last = oh + g.pp - ph_last * g.ps;
    for (int kw = 0; kw < g.kw; ++kw) {
      const int own = iw + g.padding - kw;
      if (own < 0 || own % g.stride != 0) continue;
      const int ow = own / g.stride;
      if (ow >= wcov) continue;
      // the windows that cover (oh, ow), latest first (one for non-overlapping windows), as unpooled_at visits them
      for (int jh = 0; jh < nwin; ++jh) {
        const int ph = ph_last - jh, dy = dy_last + jh * g.ps;
        if (ph < 0 || dy >= g.pool) break;
        if (ph >= g.hp) continue;
        const int pw_last = (ow + g.pp) / g.ps, dx_last = ow + g.pp - pw_last * g.ps;
        for (int jw = 0; jw < nwin; ++jw) {
          const int pw = pw_last - jw, dx = dx_last + jw * g.ps;
          if (pw < 0 || dx >= g.pool) break;
          if (pw >= g.wp) continue;
          const int offset = dy * g.pool + dx;
#pragma unroll 1
          for (int co = 0; co < g.c_out; ++co) {
            const uint8_t s = swb[co * sws.c + ph * sws.h + pw * sws.w];
            if ((s & kOffsetMask) != offset) continue;
            const A gv = masked_value(load_as<T, A>(mub + co * ms.c + ph * ms.h + pw * ms.w), s, offset, slope,
                                      scale ? scale[co] : A(1));
            acc += gv * load_as<T, A>(w + ((static_cast<int64_t>(co) * g.c_in + ci) * g.kh + kh) * g.kw + kw);
          }
        }
      }
    }
  }
  out[idx] = store_as<T, A>(acc);
}

template <typename T>
cudaError_t launch_tc(const void* mu, Strides4 ms, const uint8_t* sw, Strides4 sws, const void* w, const void* scale,
                      const ConvGeom& g, double slope, void* out, cudaStream_t stream) {
  RenderArgs<T> a;
  a.mu = static_cast<const T*>(mu);
  a.ms = ms;
  a.sw = sw;
  a.sws = sws;
  a.w = static_cast<const T*>(w);
  a.scale = static_cast<const float*>(scale);
  a.g = g;
  a.slope = static_cast<float>(slope);
  a.out = static_cast<T*>(out);
  const int64_t M = static_cast<int64_t>(g.n) * g.h * g.w;
  const dim3 grid(static_cast<unsigned>(ceil_div64(M, kBM)), static_cast<unsigned>(ceil_div(g.c_in, kBN)));
  render_tc_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t launch_simple(const void* mu, Strides4 ms, const uint8_t* sw, Strides4 sws, const void* w,
                          const void* scale, const ConvGeom& g, double slope, void* out, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(g.n) * g.c_in * g.h * g.w;
  render_simple_kernel<T, A><<<static_cast<unsigned>(ceil_div64(total, 256)), 256, 0, stream>>>(
      static_cast<const T*>(mu), ms, sw, sws, static_cast<const T*>(w), static_cast<const A*>(scale), g,
      static_cast<A>(slope), static_cast<T*>(out), total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t render(DType dt, const void* mu, Strides4 ms, const uint8_t* switches, Strides4 sws, const void* weight,
                   const void* scale, const ConvGeom& g, double negative_slope, bool allow_tf32, void* x_hat,
                   cudaStream_t stream) {
  if (static_cast<int64_t>(g.n) * g.c_in * g.h * g.w == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat16:
      return launch_tc<__half>(mu, ms, switches, sws, weight, scale, g, negative_slope, x_hat, stream);
    case DType::kBFloat16:
      return launch_tc<__nv_bfloat16>(mu, ms, switches, sws, weight, scale, g, negative_slope, x_hat, stream);
    case DType::kFloat32:
      if (allow_tf32) return launch_tc<float>(mu, ms, switches, sws, weight, scale, g, negative_slope, x_hat, stream);
      return launch_simple<float, float>(mu, ms, switches, sws, weight, scale, g, negative_slope, x_hat, stream);
    case DType::kFloat64:
      return launch_simple<double, double>(mu, ms, switches, sws, weight, scale, g, negative_slope, x_hat, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace drmm
