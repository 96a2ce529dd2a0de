// render_wgrad: dW[co, ci, kh, kw] = sum over conv positions (n, oh, ow) of g[n, co, oh, ow] *
// src[n, ci, oh * s - p + kh, ow * s - p + kw], where g is the unpooled, masked, scaled map built from
// mu and the switches (nonzero only at each window's recorded offset, and only inside the rows / columns
// the windows cover; with overlapping max_pool2d windows the sum of what each covering window routes
// to a position, unpooled_at in common.cuh).
//
// Tensor-core kernel: GEMM with M = C_out, N = C_in * KH * KW, K = N * Hcov * Wcov (the covered conv
// positions). M and N are small and K is huge, so K is split over gridDim.z; each split writes its
// partial tile to a workspace and a second kernel sums the splits in a fixed order (deterministic, no
// atomics). The g operand is generated in the loader from mu and the switch bytes, as in render.
// CUDA-core kernel (fp64, fp32 without TF32): one block per weight element, a gather over the pooled
// positions (only the recorded position of each window contributes), block reduction in a fixed order.
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
struct WgradArgs {
  const T* src;
  Strides4 ss;
  const T* mu;
  Strides4 ms;
  const uint8_t* sw;
  Strides4 sws;
  const float* scale;
  ConvGeom g;
  float slope;
  int tiles_per_split;
  float* ws;  // [splits, C_out, C_in * KH * KW]
};

constexpr int kPerThread = 16;
constexpr int kEPerThread = kBM * kBN / kThreads;

// Split-K plan shared by the workspace query and the launch: enough (M, N, K) blocks to fill the GPU
// about twice, at least 8 k tiles per split, at most 256 splits.
struct SplitPlan {
  int splits, tiles_per_split;
};

SplitPlan plan_splits(const ConvGeom& g, int num_sms) {
  const int64_t K = static_cast<int64_t>(g.n) * pooled_cover(g.hp, g.pool, g.ps, g.pp, g.hc) *
                    pooled_cover(g.wp, g.pool, g.ps, g.pp, g.wc);
  const int ktiles = static_cast<int>(ceil_div64(K, kBK));
  if (ktiles == 0) return SplitPlan{1, 1};  // empty batch: one split that writes zeros
  const int tiles = ceil_div(g.c_out, kBM) * ceil_div(g.c_in * g.kh * g.kw, kBN);
  int splits = ceil_div(2 * (num_sms > 0 ? num_sms : 132), tiles);
  splits = splits < 1 ? 1 : splits;
  const int max_by_depth = ceil_div(ktiles, 8);
  if (splits > max_by_depth) splits = max_by_depth;
  if (splits > 256) splits = 256;
  if (splits < 1) splits = 1;
  const int tps = ceil_div(ktiles, splits);
  return SplitPlan{ceil_div(ktiles, tps), tps};
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) wgrad_tc_kernel(const WgradArgs<T> p) {
  __shared__ TileSmem<T, true> sm;
  using Ld = SmemLd<T>;
  const ConvGeom& g = p.g;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp % 2, wn = warp / 2;
  const int khw = g.kh * g.kw;
  const int J = g.c_in * khw;
  const int hcov = pooled_cover(g.hp, g.pool, g.ps, g.pp, g.hc), wcov = pooled_cover(g.wp, g.pool, g.ps, g.pp, g.wc);
  const int plane = hcov * wcov;
  const int K = g.n * plane;  // < 2^31, checked by the binding
  const int ktiles = ceil_div(K, kBK);
  const int m0 = blockIdx.x * kBM;
  const int n0 = blockIdx.y * kBN;
  const int kt_begin = blockIdx.z * p.tiles_per_split;
  const int kt_end = min(ktiles, kt_begin + p.tiles_per_split);

  // Loader mapping: lanes run along k (consecutive conv positions: coalesced reads of src, mu and the
  // switches), so both tiles are stored k-fastest. Each thread has one k and rows / columns r + 4 i.
  const int kl = tid % kBK;
  const int r0 = tid / kBK;
  const int msc = static_cast<int>(p.ms.c), msh = static_cast<int>(p.ms.h), msw = static_cast<int>(p.ms.w);
  const int ssc = static_cast<int>(p.sws.c), ssh = static_cast<int>(p.sws.h), ssw = static_cast<int>(p.sws.w);
  const int xsc = static_cast<int>(p.ss.c), xsh = static_cast<int>(p.ss.h), xsw = static_cast<int>(p.ss.w);
  const T zero = zero_of<T>();

  T ra[kPerThread], rb[kPerThread];
  auto load = [&](int kt) {
    const int k = kt * kBK + kl;
    const bool k_ok = k < K;
    int img = 0, oh = 0, ow = 0;
    if (k_ok) {
      img = k / plane;
      const int rem = k - img * plane;
      oh = rem / wcov;
      ow = rem - oh * wcov;
    }
    const T* mub = p.mu + static_cast<int64_t>(img) * p.ms.n;
    const uint8_t* swb = p.sw + static_cast<int64_t>(img) * p.sws.n;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int co = m0 + r0 + 4 * i;
      T v = zero;
      if (k_ok && co < g.c_out) {
        const float u = unpooled_at<float>(mub + co * msc, msh, msw, swb + co * ssc, ssh, ssw, oh, ow, g, p.slope);
        if (u != 0.0f) v = from_f<T>(u * (p.scale ? p.scale[co] : 1.0f));
      }
      ra[i] = v;
    }
    const int ih0 = oh * g.stride - g.padding, iw0 = ow * g.stride - g.padding;
    const T* xb = p.src + static_cast<int64_t>(img) * p.ss.n;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int j = n0 + r0 + 4 * i;
      T v = zero;
      if (k_ok && j < J) {
        const int ci = j / khw;
        const int r = j - ci * khw;
        const int kh = r / g.kw;
        const int ih = ih0 + kh, iw = iw0 + (r - kh * g.kw);
        if (static_cast<unsigned>(ih) < static_cast<unsigned>(g.h) &&
            static_cast<unsigned>(iw) < static_cast<unsigned>(g.w))
          v = xb[ci * xsc + ih * xsh + iw * xsw];
      }
      rb[i] = v;
    }
  };

  WarpMma<T, true> mma;
  mma.zero();
  if (kt_begin < kt_end) load(kt_begin);
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    T* sa = sm.a();
    T* sb = sm.b();
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) sa[(r0 + 4 * i) * Ld::kARowMajor + kl] = ra[i];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) sb[(r0 + 4 * i) * Ld::kB + kl] = rb[i];
    __syncthreads();
    if (kt + 1 < kt_end) load(kt + 1);
    mma.step(sa, sb, wm, wn);
    __syncthreads();
  }
  mma.store(sm.c(), wm, wn);
  __syncthreads();

  // Partial tile -> workspace, lanes along N (contiguous in the workspace row).
  const float* sc = sm.c();
  const int nl = tid % kBN;
  const int j = n0 + nl;
  if (j >= J) return;
  float* wsb = p.ws + static_cast<int64_t>(blockIdx.z) * g.c_out * J + j;
#pragma unroll 4
  for (int i = 0; i < kEPerThread; ++i) {
    const int mlr = tid / kBN + 2 * i;
    const int co = m0 + mlr;
    if (co < g.c_out) wsb[static_cast<int64_t>(co) * J] = sc[nl * Ld::kC + mlr];
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(256)
    wgrad_reduce_kernel(const A* __restrict__ ws, int splits, int64_t count, T* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= count) return;
  A acc = A(0);
  for (int z = 0; z < splits; ++z) acc += ws[z * count + idx];
  out[idx] = store_as<T, A>(acc);
}

constexpr int kSimpleThreads = 256;

template <typename T, typename A>
__global__ void __launch_bounds__(kSimpleThreads)
    wgrad_simple_kernel(const T* __restrict__ src, Strides4 ss, const T* __restrict__ mu, Strides4 ms,
                        const uint8_t* __restrict__ sw, Strides4 sws, const A* __restrict__ scale, ConvGeom g, A slope,
                        T* __restrict__ dw) {
  __shared__ A red[kSimpleThreads];
  const int64_t widx = blockIdx.x;  // flat index into [C_out, C_in, KH, KW]
  const int kw = static_cast<int>(widx % g.kw);
  int64_t q = widx / g.kw;
  const int kh = static_cast<int>(q % g.kh);
  q /= g.kh;
  const int ci = static_cast<int>(q % g.c_in);
  const int co = static_cast<int>(q / g.c_in);
  const A sc = scale ? scale[co] : A(1);
  const int hpwp = g.hp * g.wp;
  const int64_t total = static_cast<int64_t>(g.n) * hpwp;
  A acc = A(0);
  for (int64_t e = threadIdx.x; e < total; e += kSimpleThreads) {
    const int img = static_cast<int>(e / hpwp);
    const int rem = static_cast<int>(e - static_cast<int64_t>(img) * hpwp);
    const int ph = rem / g.wp, pw = rem - ph * g.wp;
    const uint8_t s = sw[img * sws.n + co * sws.c + ph * sws.h + pw * sws.w];
    const int offset = s & kOffsetMask;
    const int dy = offset / g.pool, dx = offset - dy * g.pool;
    if (dy >= g.pool) continue;  // not a valid offset for this pool size
    const int oh = ph * g.ps - g.pp + dy, ow = pw * g.ps - g.pp + dx;
    if (static_cast<unsigned>(oh) >= static_cast<unsigned>(g.hc) ||
        static_cast<unsigned>(ow) >= static_cast<unsigned>(g.wc))
      continue;  // an offset in the pool padding: no position (the contract refuses such switches)
    const int ih = oh * g.stride - g.padding + kh;
    const int iw = ow * g.stride - g.padding + kw;
    if (static_cast<unsigned>(ih) >= static_cast<unsigned>(g.h) ||
        static_cast<unsigned>(iw) >= static_cast<unsigned>(g.w))
      continue;
    const A gv = masked_value(load_as<T, A>(mu + img * ms.n + co * ms.c + ph * ms.h + pw * ms.w), s, offset, slope, sc);
    acc += gv * load_as<T, A>(src + img * ss.n + ci * ss.c + ih * ss.h + iw * ss.w);
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int step = kSimpleThreads / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) red[threadIdx.x] += red[threadIdx.x + step];
    __syncthreads();
  }
  if (threadIdx.x == 0) dw[widx] = store_as<T, A>(red[0]);
}

bool uses_tc(DType dt, bool allow_tf32) {
  return dt == DType::kFloat16 || dt == DType::kBFloat16 || (dt == DType::kFloat32 && allow_tf32);
}

template <typename T>
cudaError_t launch_tc(const void* src, Strides4 ss, const void* mu, Strides4 ms, const uint8_t* sw, Strides4 sws,
                      const void* scale, const ConvGeom& g, double slope, int num_sms, void* workspace, void* dw,
                      cudaStream_t stream) {
  const SplitPlan plan = plan_splits(g, num_sms);
  WgradArgs<T> a;
  a.src = static_cast<const T*>(src);
  a.ss = ss;
  a.mu = static_cast<const T*>(mu);
  a.ms = ms;
  a.sw = sw;
  a.sws = sws;
  a.scale = static_cast<const float*>(scale);
  a.g = g;
  a.slope = static_cast<float>(slope);
  a.tiles_per_split = plan.tiles_per_split;
  a.ws = static_cast<float*>(workspace);
  const int J = g.c_in * g.kh * g.kw;
  const dim3 grid(static_cast<unsigned>(ceil_div(g.c_out, kBM)), static_cast<unsigned>(ceil_div(J, kBN)),
                  static_cast<unsigned>(plan.splits));
  wgrad_tc_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t count = static_cast<int64_t>(g.c_out) * J;
  wgrad_reduce_kernel<T, float><<<static_cast<unsigned>(ceil_div64(count, 256)), 256, 0, stream>>>(
      static_cast<const float*>(workspace), plan.splits, count, static_cast<T*>(dw));
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t launch_simple(const void* src, Strides4 ss, const void* mu, Strides4 ms, const uint8_t* sw, Strides4 sws,
                          const void* scale, const ConvGeom& g, double slope, void* dw, cudaStream_t stream) {
  const int64_t count = static_cast<int64_t>(g.c_out) * g.c_in * g.kh * g.kw;
  wgrad_simple_kernel<T, A><<<static_cast<unsigned>(count), kSimpleThreads, 0, stream>>>(
      static_cast<const T*>(src), ss, static_cast<const T*>(mu), ms, sw, sws, static_cast<const A*>(scale), g,
      static_cast<A>(slope), static_cast<T*>(dw));
  return cudaGetLastError();
}

}  // namespace

int64_t render_wgrad_workspace_elems(DType dt, const ConvGeom& g, bool allow_tf32, int num_sms) {
  if (!uses_tc(dt, allow_tf32)) return 0;
  const SplitPlan plan = plan_splits(g, num_sms);
  return static_cast<int64_t>(plan.splits) * g.c_out * g.c_in * g.kh * g.kw;
}

cudaError_t render_wgrad(DType dt, const void* src, Strides4 ss, const void* mu, Strides4 ms, const uint8_t* switches,
                         Strides4 sws, const void* scale, const ConvGeom& g, double negative_slope, bool allow_tf32,
                         int num_sms, void* workspace, void* dw, cudaStream_t stream) {
  const int64_t count = static_cast<int64_t>(g.c_out) * g.c_in * g.kh * g.kw;
  if (count == 0) return cudaSuccess;
  // An empty batch still defines dW (= 0): the kernels below write every element.
  switch (dt) {
    case DType::kFloat16:
      return launch_tc<__half>(src, ss, mu, ms, switches, sws, scale, g, negative_slope, num_sms, workspace, dw,
                               stream);
    case DType::kBFloat16:
      return launch_tc<__nv_bfloat16>(src, ss, mu, ms, switches, sws, scale, g, negative_slope, num_sms, workspace, dw,
                                      stream);
    case DType::kFloat32:
      if (allow_tf32)
        return launch_tc<float>(src, ss, mu, ms, switches, sws, scale, g, negative_slope, num_sms, workspace, dw,
                                stream);
      return launch_simple<float, float>(src, ss, mu, ms, switches, sws, scale, g, negative_slope, dw, stream);
    case DType::kFloat64:
      return launch_simple<double, double>(src, ss, mu, ms, switches, sws, scale, g, negative_slope, dw, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace drmm
