// Shared device helpers of the drmm CUDA kernels: dtype conversion, the activation, switch bytes, and
// the warp-level tensor-core tile used by the implicit-GEMM kernels.
//
// Why WMMA (nvcuda::wmma) rather than hand-written mma.sync: the same source serves fp16, bf16 and
// tf32 (m16n16k16 / m16n16k8) with documented, layout-independent fragment semantics. Every epilogue
// here is a per-element reduction over the pool window that needs (row, col) coordinates, so the
// accumulators go through shared memory anyway; mma.sync's known register layout would only save that
// round trip, at the price of hand-coded fragment maps that no CPU-side test can check. WMMA compiles
// to the same HMMA instructions on sm_90 (not to wgmma; a Hopper wgmma/TMA kernel is the next step if
// the benchmark warrants it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "common/switch_byte.h"
#include "launchers.h"

namespace drmm {
namespace cuda {

// Two tiny traits instead of <type_traits>: these files stick to the CUDA headers and <cstdint>.
template <typename A, typename B>
struct IsSame {
  static constexpr bool value = false;
};
template <typename A>
struct IsSame<A, A> {
  static constexpr bool value = true;
};
template <bool C, typename A, typename B>
struct Cond {
  using type = A;
};
template <typename A, typename B>
struct Cond<false, A, B> {
  using type = B;
};

// ------------------------------------------------------------------ conversions

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Accumulation type: double for double, float for everything else.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T, typename A>
__device__ __forceinline__ A load_as(const T* p) {
  return static_cast<A>(to_f<T>(*p));
}
template <>
__device__ __forceinline__ double load_as<double, double>(const double* p) {
  return *p;
}
template <typename T, typename A>
__device__ __forceinline__ T store_as(A v) {
  return from_f<T>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double store_as<double, double>(double v) {
  return v;
}

template <typename T>
__device__ __forceinline__ T zero_of() {
  return from_f<T>(0.0f);
}

// ------------------------------------------------------------------ epilogue math

// act(v): identity where v > 0 (and for NaN, which propagates as in F.relu / F.leaky_relu), else
// slope * v. slope == 0 is ReLU; it returns an exact 0 (not -inf * 0 = NaN for v = -inf).
template <typename A>
__device__ __forceinline__ A activate(A v, A slope) {
  if (v > A(0) || v != v) return v;
  return slope == A(0) ? A(0) : v * slope;
}

// v = z * scale + shift with two roundings, as the reference computes it (no FMA contraction).
__device__ __forceinline__ float affine(float z, const float* scale, const float* shift, int c) {
  if (scale) z = __fmul_rn(z, scale[c]);
  if (shift) z = __fadd_rn(z, shift[c]);
  return z;
}
__device__ __forceinline__ double affine(double z, const double* scale, const double* shift, int c) {
  if (scale) z = __dmul_rn(z, scale[c]);
  if (shift) z = __dadd_rn(z, shift[c]);
  return z;
}

// The offset of the first position inside the map of a pool x pool window starting at (oh0, ow0) (negative in the pool
// padding): the argmax of a window whose values are all -inf, as in PyTorch.
__host__ __device__ __forceinline__ int first_inside(int oh0, int ow0, int pool) {
  return (oh0 < 0 ? -oh0 : 0) * pool + (ow0 < 0 ? -ow0 : 0);
}

// Running window max, PyTorch's max_pool2d rule: update on a strictly larger value (first maximum on
// ties, in row-major window order) or on NaN (NaN wins).
template <typename A>
__device__ __forceinline__ bool takes_max(A v, A best) {
  return v > best || v != v;
}

// mu * a'(switch), as a select like ReLU's backward: exactly 0 where the a bit is off under ReLU (slope 0), even
// for an infinite or NaN mu (a multiply by 0 would give NaN).
template <typename A>
__device__ __forceinline__ A activation_grad(A mu, uint8_t sw, A slope) {
  const A fac = (sw & kOnBit) ? A(1) : slope;
  return fac == A(0) ? A(0) : mu * fac;  // (one select more than mu * fac; a branch made render spill)
}

// The unpooled, masked, scaled gradient at one conv-output position: mu * a'(switch) * scale[c] when the
// window's recorded offset is `offset`, else 0.
template <typename A>
__device__ __forceinline__ A masked_value(A mu, uint8_t sw, int offset, A slope, A scale_c) {
  if ((sw & kOffsetMask) != offset) return A(0);
  return activation_grad(mu, sw, slope) * scale_c;
}

// The unpooled gradient at conv-output position (oh, ow) of one channel: the sum, over the max_pool2d windows that
// cover it, of mu * a'(switch) for each window whose recorded offset is this position (the scale is the caller's).
// Window (ph, pw) starts at (ph * g.ps - g.pp, pw * g.ps - g.pp); at most ceil(pool / ps)^2 cover a position, and
// they are visited in a fixed order, so the sum is the same bit for bit run to run. Non-overlapping windows: one.
// mu_c / sw_c point at the channel's plane, strides in elements.
template <typename A, typename T, typename G>
__device__ __forceinline__ A unpooled_at(const T* mu_c, int msh, int msw, const uint8_t* sw_c, int ssh, int ssw, int oh,
                                         int ow, const G& g, A slope) {
  A acc = A(0);
  const int ph_last = (oh + g.pp) / g.ps, pw_last = (ow + g.pp) / g.ps;
#pragma unroll 1
  for (int ph = ph_last; ph >= 0; --ph) {
    const int dy = oh + g.pp - ph * g.ps;
    if (dy >= g.pool) break;  // earlier windows end before oh
    if (ph >= g.hp) continue;
#pragma unroll 1
    for (int pw = pw_last; pw >= 0; --pw) {
      const int dx = ow + g.pp - pw * g.ps;
      if (dx >= g.pool) break;
      if (pw >= g.wp) continue;
      const uint8_t s = sw_c[ph * ssh + pw * ssw];
      if ((s & kOffsetMask) == dy * g.pool + dx)
        acc += activation_grad(load_as<T, A>(mu_c + ph * msh + pw * msw), s, slope);
    }
  }
  return acc;
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ tensor-core tile

// Block tile of every implicit-GEMM kernel: BM x BN outputs, BK deep, 4 warps in a 2 x 2 grid, each warp
// owning a 32 x 32 sub-tile = 2 x 2 fragments of 16 x 16.
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kThreads = 128;

namespace wmma = nvcuda::wmma;

// Element type in shared memory / fragment type / MMA depth per global dtype. fp32 inputs go through
// TF32 fragments (m16n16k8) and must be rounded with __float_to_tf32 after the fragment load.
template <typename T>
struct MmaTraits;
template <>
struct MmaTraits<__half> {
  using Frag = __half;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<float> {
  using Frag = wmma::precision::tf32;
  static constexpr int kK = 8;
};

// Shared-memory leading dimensions: a 16-byte pad keeps every WMMA pointer 32-byte aligned (ldm is a
// multiple of 16 bytes and fragment origins sit on multiples of 16 rows / 8-16 columns) while
// breaking the power-of-two stride that would put all rows of a fragment in the same banks.
template <typename T>
struct SmemLd {
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kAColMajor = kBM + kPad;  // A stored m-fastest: element (m, k) at k * ld + m
  static constexpr int kARowMajor = kBK + kPad;  // A stored k-fastest: element (m, k) at m * ld + k
  static constexpr int kB = kBK + kPad;          // B stored k-fastest: element (k, n) at n * ld + k
  static constexpr int kC = kBM + 4;             // float accumulators, m-fastest: (m, n) at n * ld + m
};

// Operand tiles A and B, and the float accumulator tile C, which reuses the operand space: C is only
// written after the K loop's closing barrier, and the caller must barrier again after reading C before
// the next K loop writes A / B. Raw bytes, because a union of __half arrays is not portable.
constexpr int round_up128(int bytes) { return (bytes + 127) / 128 * 128; }

template <typename T, bool kARowMajor>
struct TileSmem {
  static constexpr int kAElems = kARowMajor ? kBM * SmemLd<T>::kARowMajor : kBK * SmemLd<T>::kAColMajor;
  static constexpr int kABytes = round_up128(kAElems * static_cast<int>(sizeof(T)));
  static constexpr int kBBytes = round_up128(kBN * SmemLd<T>::kB * static_cast<int>(sizeof(T)));
  static constexpr int kCBytes = round_up128(kBN * SmemLd<T>::kC * static_cast<int>(sizeof(float)));
  static constexpr int kBytes = (kABytes + kBBytes > kCBytes) ? kABytes + kBBytes : kCBytes;
  alignas(128) unsigned char raw[kBytes];
  __device__ __forceinline__ T* a() { return reinterpret_cast<T*>(raw); }
  __device__ __forceinline__ T* b() { return reinterpret_cast<T*>(raw + kABytes); }
  __device__ __forceinline__ float* c() { return reinterpret_cast<float*>(raw); }
};

template <typename T, bool kARowMajor>
struct WarpMma {
  using Tr = MmaTraits<T>;
  using ALayout = typename Cond<kARowMajor, wmma::row_major, wmma::col_major>::type;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, Tr::kK, typename Tr::Frag, ALayout>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, Tr::kK, typename Tr::Frag, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, Tr::kK, float>;

  FragC acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  template <typename F>
  static __device__ __forceinline__ void round_tf32(F& f) {
    if constexpr (IsSame<T, float>::value) {
#pragma unroll
      for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
    }
  }

  // acc += A[wm*32 .. +32, 0 .. BK) * B[0 .. BK, wn*32 .. +32) from the shared tile.
  __device__ __forceinline__ void step(const T* a, const T* b, int wm, int wn) {
#pragma unroll
    for (int kk = 0; kk < kBK; kk += Tr::kK) {
      FragA fa[2];
      FragB fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m0 = wm * 32 + i * 16;
        const T* pa = kARowMajor ? a + m0 * SmemLd<T>::kARowMajor + kk : a + kk * SmemLd<T>::kAColMajor + m0;
        wmma::load_matrix_sync(fa[i], pa, kARowMajor ? SmemLd<T>::kARowMajor : SmemLd<T>::kAColMajor);
        round_tf32(fa[i]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n0 = wn * 32 + j * 16;
        wmma::load_matrix_sync(fb[j], b + n0 * SmemLd<T>::kB + kk, SmemLd<T>::kB);
        round_tf32(fb[j]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // Accumulators to the shared C tile (m-fastest, float).
  __device__ __forceinline__ void store(float* c, int wm, int wn) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(c + (wn * 32 + j * 16) * SmemLd<T>::kC + wm * 32 + i * 16, acc[i][j], SmemLd<T>::kC,
                                wmma::mem_col_major);
  }
};

}  // namespace cuda
}  // namespace drmm
