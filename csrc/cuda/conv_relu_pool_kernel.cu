// Forward kernels: fused conv + scale/shift + activation + max-pool + switch byte (conv_relu_pool),
// the same GEMM read at the recorded offsets (gather_conv), and the epilogue alone (bn_pool).
//
// Tensor-core kernel (fp16 / bf16 / tf32): implicit GEMM with M = pooled pixels (N * Hp * Wp),
// N = output channels, K = C_in * KH * KW taken in weight order (ci, kh, kw). For every window offset
// t = dy * pool + dx the whole K loop runs into fresh accumulators for the conv outputs at
// (ph * ps - pp + dy, pw * ps - pp + dx); the epilogue applies scale/shift to each candidate *before* the
// running max (so a negative scale is right without tracking minima) and keeps max + argmax in
// registers. The pre-pool map never touches memory: only y and one switch byte per pooled element are
// written. Any max_pool2d window: window (ph, pw) starts at conv row ph * ps - pp; its offsets outside the
// conv output (pool padding, a ceil-mode overhang) never win, and the argmax starts at its first real
// position, as PyTorch's does. Non-overlapping windows compute no conv output twice; overlapping ones
// compute a shared output once per window that covers it ((pool / ps)^2 the work).
// K is not required to be a multiple of the tile depth: the loaders zero-fill k >= K (C_in = 1, 5 x 5
// gives K = 25, one zero-padded 32-deep tile).
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
struct FwdArgs {
  const T* x;
  Strides4 xs;
  const T* w;  // contiguous [C_out, K]
  const float* scale;
  const float* shift;
  ConvGeom g;
  float slope;
  // conv_relu_pool outputs
  T* y;
  uint8_t* sw_out;
  // gather_conv input / output
  const uint8_t* sw_in;
  Strides4 sws;
  T* out;
};

// Per thread: one A row (pooled pixel m = tid % 64) and 16 consecutive k; the epilogue owns the same
// row and the 32 channels n = tid / 64 + 2 j, so the row decode is shared, the y / switch stores of a
// warp (32 consecutive pooled pixels of one channel) are coalesced, and reading the m-fastest C tile
// is free of bank conflicts.
constexpr int kAPerThread = kBM * kBK / kThreads;  // 16
constexpr int kBPerThread = kBN * kBK / kThreads;  // 16
constexpr int kEPerThread = kBM * kBN / kThreads;  // 32
static_assert(kAPerThread == 16 && kBPerThread == 16 && kEPerThread == 32, "tile mapping below assumes these");

template <typename T, bool kGather>
__global__ void __launch_bounds__(kThreads, 3) crp_tc_kernel(const FwdArgs<T> p) {
  __shared__ TileSmem<T, false> sm;
  using Ld = SmemLd<T>;
  const ConvGeom& g = p.g;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp % 2, wn = warp / 2;
  const int hpwp = g.hp * g.wp;
  const int M = g.n * hpwp;
  const int khw = g.kh * g.kw;
  const int K = g.c_in * khw;
  const int m0 = blockIdx.x * kBM;
  const int n0 = blockIdx.y * kBN;

  const int ml = tid % kBM;
  const int m = m0 + ml;
  const bool m_ok = m < M;
  int img = 0, rem = 0, ph = 0, pw = 0;
  if (m_ok) {
    img = m / hpwp;
    rem = m - img * hpwp;
    ph = rem / g.wp;
    pw = rem - ph * g.wp;
  }
  const T* xb = p.x + static_cast<int64_t>(img) * p.xs.n;
  // Offsets inside one image fit in 32 bits (checked by the binding): keeps the 16 prefetch addresses
  // cheap in registers.
  const int xsc = static_cast<int>(p.xs.c), xsh = static_cast<int>(p.xs.h), xsw = static_cast<int>(p.xs.w);
  const int ka = (tid / kBM) * kAPerThread;  // first of this thread's 16 A columns
  const int kb = tid % kBK;                  // this thread's B row (k)
  const int nb = tid / kBK;                  // B columns nb + 4 i
  const int ne = tid / kBM;                  // epilogue channels ne + 2 j

  // Running max / argmax (or, for gather_conv, the recorded offset and the picked value) of the 32
  // outputs this thread owns, kept in shared memory rather than registers so the K loop keeps its
  // registers for operands and accumulators (no spills). Only the owning thread touches an entry.
  __shared__ float s_best[kBN * kBM];  // (n, m) at n * kBM + m
  __shared__ uint8_t s_arg[kBN * kBM];
  const int oh_first = ph * g.ps - g.pp, ow_first = pw * g.ps - g.pp;
  const uint8_t first = static_cast<uint8_t>(first_inside(oh_first, ow_first, g.pool));
#pragma unroll 4
  for (int j = 0; j < kEPerThread; ++j) {
    const int e = (ne + 2 * j) * kBM + ml;
    const int co = n0 + ne + 2 * j;
    uint8_t off = 0xFF;  // gather: never matches a window offset (rows / channels out of range)
    if (kGather && m_ok && co < g.c_out)
      off = p.sw_in[img * p.sws.n + co * p.sws.c + ph * p.sws.h + pw * p.sws.w] & kOffsetMask;
    s_best[e] = kGather ? 0.0f : -INFINITY;
    s_arg[e] = kGather ? off : first;
  }

  const int ktiles = ceil_div(K, kBK);
  const int npool = g.pool * g.pool;
  const T zero = zero_of<T>();

  for (int t = 0; t < npool; ++t) {
    const int dy = t / g.pool, dx = t - dy * g.pool;
    const int oh = oh_first + dy, ow = ow_first + dx;
    const bool inside = static_cast<unsigned>(oh) < static_cast<unsigned>(g.hc) &&
                        static_cast<unsigned>(ow) < static_cast<unsigned>(g.wc);
    const int ih0 = oh * g.stride - g.padding;
    const int iw0 = ow * g.stride - g.padding;

    T ra[kAPerThread], rb[kBPerThread];
    // Global -> registers for k tile kt (prefetched one tile ahead of the MMAs).
    auto load = [&](int kt) {
      int k = kt * kBK + ka;
      int ci = k / khw;
      int r = k - ci * khw;
      int kh = r / g.kw;
      int kw = r - kh * g.kw;
#pragma unroll
      for (int i = 0; i < kAPerThread; ++i) {
        T v = zero;
        const int ih = ih0 + kh, iw = iw0 + kw;
        if (m_ok && k + i < K && static_cast<unsigned>(ih) < static_cast<unsigned>(g.h) &&
            static_cast<unsigned>(iw) < static_cast<unsigned>(g.w))
          v = xb[ci * xsc + ih * xsh + iw * xsw];
        ra[i] = v;
        if (++kw == g.kw) {
          kw = 0;
          if (++kh == g.kh) {
            kh = 0;
            ++ci;
          }
        }
      }
      const int kk = kt * kBK + kb;
#pragma unroll
      for (int i = 0; i < kBPerThread; ++i) {
        const int co = n0 + nb + 4 * i;
        rb[i] = (kk < K && co < g.c_out) ? p.w[static_cast<int64_t>(co) * K + kk] : zero;
      }
    };

    WarpMma<T, false> mma;
    mma.zero();
    load(0);
    for (int kt = 0; kt < ktiles; ++kt) {
      T* sa = sm.a();
      T* sb = sm.b();
#pragma unroll
      for (int i = 0; i < kAPerThread; ++i) sa[(ka + i) * Ld::kAColMajor + ml] = ra[i];
#pragma unroll
      for (int i = 0; i < kBPerThread; ++i) sb[(nb + 4 * i) * Ld::kB + kb] = rb[i];
      __syncthreads();
      if (kt + 1 < ktiles) load(kt + 1);
      mma.step(sa, sb, wm, wn);
      __syncthreads();
    }
    mma.store(sm.c(), wm, wn);
    __syncthreads();

    const float* sc = sm.c();
#pragma unroll 4
    for (int j = 0; j < kEPerThread; ++j) {
      const int nl = ne + 2 * j;
      const int co = n0 + nl;
      const int e = nl * kBM + ml;
      const float c = sc[nl * Ld::kC + ml];
      if (kGather) {
        if (s_arg[e] == t) s_best[e] = c;
      } else if (co < g.c_out && inside) {
        const float v = affine(c, p.scale, p.shift, co);
        if (takes_max(v, s_best[e])) {
          s_best[e] = v;
          s_arg[e] = static_cast<uint8_t>(t);
        }
      }
    }
    __syncthreads();  // C aliases the A / B tiles that the next window's K loop overwrites
  }

  if (!m_ok) return;
  const int64_t row = static_cast<int64_t>(img) * g.c_out * hpwp + rem;
#pragma unroll 4
  for (int j = 0; j < kEPerThread; ++j) {
    const int co = n0 + ne + 2 * j;
    if (co >= g.c_out) continue;
    const int e = (ne + 2 * j) * kBM + ml;
    const int64_t o = row + static_cast<int64_t>(co) * hpwp;
    const float best = s_best[e];
    if (kGather) {
      p.out[o] = from_f<T>(best);
    } else {
      p.y[o] = from_f<T>(activate(best, p.slope));
      p.sw_out[o] = static_cast<uint8_t>(s_arg[e] | (best > 0.0f ? kOnBit : 0));
    }
  }
}

// CUDA-core kernel for fp64 and for fp32 with TF32 disallowed: one thread per pooled output, exact
// accumulation in A (the parity path; consecutive threads share the channel, so weight reads broadcast).
template <typename T, typename A, bool kGather>
__global__ void __launch_bounds__(256)
    crp_simple_kernel(const T* __restrict__ x, Strides4 xs, const T* __restrict__ w, const A* __restrict__ scale,
                      const A* __restrict__ shift, ConvGeom g, A slope, T* __restrict__ y, uint8_t* __restrict__ sw_out,
                      const uint8_t* __restrict__ sw_in, Strides4 sws, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int pw = static_cast<int>(idx % g.wp);
  int64_t q = idx / g.wp;
  const int ph = static_cast<int>(q % g.hp);
  q /= g.hp;
  const int co = static_cast<int>(q % g.c_out);
  const int img = static_cast<int>(q / g.c_out);
  const int khw = g.kh * g.kw;
  const T* xb = x + img * xs.n;
  const T* wb = w + static_cast<int64_t>(co) * g.c_in * khw;

  const int oh_first = ph * g.ps - g.pp, ow_first = pw * g.ps - g.pp;
  auto conv_at = [&](int t) {
    const int dy = t / g.pool, dx = t - dy * g.pool;
    const int ih0 = (oh_first + dy) * g.stride - g.padding;
    const int iw0 = (ow_first + dx) * g.stride - g.padding;
    A acc = A(0);
    for (int ci = 0; ci < g.c_in; ++ci) {
      for (int kh = 0; kh < g.kh; ++kh) {
        const int ih = ih0 + kh;
        if (static_cast<unsigned>(ih) >= static_cast<unsigned>(g.h)) continue;
        for (int kw = 0; kw < g.kw; ++kw) {
          const int iw = iw0 + kw;
          if (static_cast<unsigned>(iw) >= static_cast<unsigned>(g.w)) continue;
          acc +=
              load_as<T, A>(xb + ci * xs.c + ih * xs.h + iw * xs.w) * load_as<T, A>(wb + (ci * g.kh + kh) * g.kw + kw);
        }
      }
    }
    return acc;
  };

  if (kGather) {
    const int off = sw_in[img * sws.n + co * sws.c + ph * sws.h + pw * sws.w] & kOffsetMask;
    y[idx] = store_as<T, A>(off < g.pool * g.pool ? conv_at(off) : A(0));
    return;
  }
  A best = -INFINITY;
  int arg = first_inside(oh_first, ow_first, g.pool);
  for (int t = 0; t < g.pool * g.pool; ++t) {
    const int oh = oh_first + t / g.pool, ow = ow_first + t % g.pool;
    if (static_cast<unsigned>(oh) >= static_cast<unsigned>(g.hc) ||
        static_cast<unsigned>(ow) >= static_cast<unsigned>(g.wc))
      continue;  // pool padding or a ceil-mode overhang: never the maximum
    const A v = affine(conv_at(t), scale, shift, co);
    if (takes_max(v, best)) {
      best = v;
      arg = t;
    }
  }
  y[idx] = store_as<T, A>(activate(best, slope));
  sw_out[idx] = static_cast<uint8_t>(arg | (best > A(0) ? kOnBit : 0));
}

// bn_pool: the same epilogue on a precomputed (strided) conv output z; one thread per pooled element.
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    bn_pool_kernel(const T* __restrict__ z, Strides4 zs, int c, int hc, int wc, int hp, int wp, int pool, int ps,
                   int pp, const A* __restrict__ scale, const A* __restrict__ shift, A slope, T* __restrict__ y,
                   uint8_t* __restrict__ sw, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int pw = static_cast<int>(idx % wp);
  int64_t q = idx / wp;
  const int ph = static_cast<int>(q % hp);
  q /= hp;
  const int ch = static_cast<int>(q % c);
  const int img = static_cast<int>(q / c);
  const T* zb = z + img * zs.n + ch * zs.c;
  const int oh0 = ph * ps - pp, ow0 = pw * ps - pp;
  A best = -INFINITY;
  int arg = first_inside(oh0, ow0, pool);
  for (int dy = 0; dy < pool; ++dy) {
    const int oh = oh0 + dy;
    if (static_cast<unsigned>(oh) >= static_cast<unsigned>(hc)) continue;
    for (int dx = 0; dx < pool; ++dx) {
      const int ow = ow0 + dx;
      if (static_cast<unsigned>(ow) >= static_cast<unsigned>(wc)) continue;
      const A v = affine(load_as<T, A>(zb + oh * zs.h + ow * zs.w), scale, shift, ch);
      if (takes_max(v, best)) {
        best = v;
        arg = dy * pool + dx;
      }
    }
  }
  y[idx] = store_as<T, A>(activate(best, slope));
  sw[idx] = static_cast<uint8_t>(arg | (best > A(0) ? kOnBit : 0));
}

template <typename T, bool kGather>
cudaError_t launch_tc(const void* x, Strides4 xs, const void* w, const void* scale, const void* shift,
                      const ConvGeom& g, double slope, void* y, uint8_t* sw_out, const uint8_t* sw_in, Strides4 sws,
                      void* out, cudaStream_t stream) {
  FwdArgs<T> a;
  a.x = static_cast<const T*>(x);
  a.xs = xs;
  a.w = static_cast<const T*>(w);
  a.scale = static_cast<const float*>(scale);
  a.shift = static_cast<const float*>(shift);
  a.g = g;
  a.slope = static_cast<float>(slope);
  a.y = static_cast<T*>(y);
  a.sw_out = sw_out;
  a.sw_in = sw_in;
  a.sws = sws;
  a.out = static_cast<T*>(out);
  const int64_t M = static_cast<int64_t>(g.n) * g.hp * g.wp;
  const dim3 grid(static_cast<unsigned>(ceil_div64(M, kBM)), static_cast<unsigned>(ceil_div(g.c_out, kBN)));
  crp_tc_kernel<T, kGather><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename A, bool kGather>
cudaError_t launch_simple(const void* x, Strides4 xs, const void* w, const void* scale, const void* shift,
                          const ConvGeom& g, double slope, void* y, uint8_t* sw_out, const uint8_t* sw_in, Strides4 sws,
                          cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(g.n) * g.c_out * g.hp * g.wp;
  const unsigned blocks = static_cast<unsigned>(ceil_div64(total, 256));
  crp_simple_kernel<T, A, kGather><<<blocks, 256, 0, stream>>>(
      static_cast<const T*>(x), xs, static_cast<const T*>(w), static_cast<const A*>(scale),
      static_cast<const A*>(shift), g, static_cast<A>(slope), static_cast<T*>(y), sw_out, sw_in, sws, total);
  return cudaGetLastError();
}

template <bool kGather>
cudaError_t dispatch_fwd(DType dt, const void* x, Strides4 xs, const void* w, const void* scale, const void* shift,
                         const ConvGeom& g, double slope, bool allow_tf32, void* y, uint8_t* sw_out,
                         const uint8_t* sw_in, Strides4 sws, cudaStream_t stream) {
  if (static_cast<int64_t>(g.n) * g.c_out * g.hp * g.wp == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat16:
      return launch_tc<__half, kGather>(x, xs, w, scale, shift, g, slope, y, sw_out, sw_in, sws, y, stream);
    case DType::kBFloat16:
      return launch_tc<__nv_bfloat16, kGather>(x, xs, w, scale, shift, g, slope, y, sw_out, sw_in, sws, y, stream);
    case DType::kFloat32:
      if (allow_tf32)
        return launch_tc<float, kGather>(x, xs, w, scale, shift, g, slope, y, sw_out, sw_in, sws, y, stream);
      return launch_simple<float, float, kGather>(x, xs, w, scale, shift, g, slope, y, sw_out, sw_in, sws, stream);
    case DType::kFloat64:
      return launch_simple<double, double, kGather>(x, xs, w, scale, shift, g, slope, y, sw_out, sw_in, sws, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename A>
cudaError_t launch_bn_pool(const void* z, Strides4 zs, int n, int c, int hc, int wc, int hp, int wp, int pool, int ps,
                           int pp, const void* scale, const void* shift, double slope, void* y, uint8_t* sw,
                           cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(n) * c * hp * wp;
  bn_pool_kernel<T, A><<<static_cast<unsigned>(ceil_div64(total, 256)), 256, 0, stream>>>(
      static_cast<const T*>(z), zs, c, hc, wc, hp, wp, pool, ps, pp, static_cast<const A*>(scale),
      static_cast<const A*>(shift), static_cast<A>(slope), static_cast<T*>(y), sw, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t conv_relu_pool(DType dt, const void* x, Strides4 xs, const void* weight, const void* scale,
                           const void* shift, const ConvGeom& g, double negative_slope, bool allow_tf32, void* y,
                           uint8_t* switches, cudaStream_t stream) {
  return dispatch_fwd<false>(dt, x, xs, weight, scale, shift, g, negative_slope, allow_tf32, y, switches, nullptr,
                             Strides4{0, 0, 0, 0}, stream);
}

cudaError_t gather_conv(DType dt, const void* src, Strides4 ss, const void* weight, const uint8_t* switches,
                        Strides4 sws, const ConvGeom& g, bool allow_tf32, void* out, cudaStream_t stream) {
  return dispatch_fwd<true>(dt, src, ss, weight, nullptr, nullptr, g, 0.0, allow_tf32, out, nullptr, switches, sws,
                            stream);
}

cudaError_t bn_pool(DType dt, const void* z, Strides4 zs, int n, int c, int hc, int wc, const void* scale,
                    const void* shift, int pool, int ps, int pp, int hp, int wp, double negative_slope, void* y,
                    uint8_t* switches, cudaStream_t stream) {
  if (static_cast<int64_t>(n) * c * hp * wp == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat16:
      return launch_bn_pool<__half, float>(z, zs, n, c, hc, wc, hp, wp, pool, ps, pp, scale, shift, negative_slope, y,
                                           switches, stream);
    case DType::kBFloat16:
      return launch_bn_pool<__nv_bfloat16, float>(z, zs, n, c, hc, wc, hp, wp, pool, ps, pp, scale, shift,
                                                  negative_slope, y, switches, stream);
    case DType::kFloat32:
      return launch_bn_pool<float, float>(z, zs, n, c, hc, wc, hp, wp, pool, ps, pp, scale, shift, negative_slope, y,
                                          switches, stream);
    case DType::kFloat64:
      return launch_bn_pool<double, double>(z, zs, n, c, hc, wc, hp, wp, pool, ps, pp, scale, shift, negative_slope, y,
                                            switches, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace drmm
