// Small SIMD helpers for the CPU kernels, written with GCC/Clang vector extensions so one source
// compiles to AVX-512 under -march=native and is split into narrower ops on other targets.
#pragma once
#include <cstdint>
#include <cstring>
#include <utility>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace drmm {
namespace cpu {

template <typename T>
struct Simd;

// 64-byte vectors: one zmm register on AVX-512.
// V: the value vector; I: the integer vector that comparisons of V return (lane masks -1 / 0) and
// that `mask ? a : b` selects with.
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t IS;
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t IS;
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

// memcpy keeps unaligned loads/stores well-defined; it compiles to vmovups.
template <typename VV, typename T>
inline VV vload_as(const T* p) {
  VV v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline typename Simd<T>::V vload(const T* p) {
  return vload_as<typename Simd<T>::V>(p);
}
template <typename T, typename VV>
inline void vstore(T* p, VV v) {
  std::memcpy(p, &v, sizeof(v));
}
// A constructor with W equal elements is the uniform-vector form compilers turn into one broadcast
// (a lane-by-lane fill became a chain of masked broadcasts; `x - V{}` was miscompiled by GCC 12).
template <typename T, int... L>
inline typename Simd<T>::V vbroadcast_impl(T x, std::integer_sequence<int, L...>) {
  return typename Simd<T>::V{((void)L, x)...};
}
template <typename T>
inline typename Simd<T>::V vbroadcast(T x) {
  return vbroadcast_impl<T>(x, std::make_integer_sequence<int, Simd<T>::W>{});
}

// dst[j0 .. j0 + NV*W) += sum_i coef[i] * src[i][j0 .. j0 + NV*W): the accumulators stay in registers
// while the list is walked, so each FMA costs one load. `j0` already includes the common source offset
// of the caller (dst is advanced separately).
template <typename T, int NV>
inline void axpy_list_block(T* dst, const T* const* src, const T* coef, int cnt, int64_t j0) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::W;
  V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = vload(dst + v * W);
  for (int i = 0; i < cnt; ++i) {
    const T* s = src[i] + j0;
    // Opaque to the optimizer: otherwise GCC hoists the NV offsets j0 + v*W into (spilled) registers
    // instead of using s with immediate displacements.
    asm("" : "+r"(s));
    const V c = vbroadcast(coef[i]);
    for (int v = 0; v < NV; ++v) acc[v] += c * vload(s + v * W);
  }
  for (int v = 0; v < NV; ++v) vstore(dst + v * W, acc[v]);
}

// The last len < W elements of an axpy_list / dot. With AVX-512 one masked vector op per entry
// (k * C_in is often short: 5 for a 5x5 kernel on one channel); masked lanes are never read or written.
inline void axpy_list_tail(float* dst, const float* const* src, int64_t off, const float* coef, int cnt, int64_t len) {
#ifdef __AVX512F__
  const __mmask16 m = static_cast<__mmask16>((1u << len) - 1);
  __m512 acc = _mm512_maskz_loadu_ps(m, dst);
  for (int i = 0; i < cnt; ++i)
    acc = _mm512_fmadd_ps(_mm512_set1_ps(coef[i]), _mm512_maskz_loadu_ps(m, src[i] + off), acc);
  _mm512_mask_storeu_ps(dst, m, acc);
#else
  for (int64_t j = 0; j < len; ++j) {
    float a = dst[j];
    for (int i = 0; i < cnt; ++i) a += coef[i] * src[i][off + j];
    dst[j] = a;
  }
#endif
}
inline void axpy_list_tail(double* dst, const double* const* src, int64_t off, const double* coef, int cnt,
                           int64_t len) {
#ifdef __AVX512F__
  const __mmask8 m = static_cast<__mmask8>((1u << len) - 1);
  __m512d acc = _mm512_maskz_loadu_pd(m, dst);
  for (int i = 0; i < cnt; ++i)
    acc = _mm512_fmadd_pd(_mm512_set1_pd(coef[i]), _mm512_maskz_loadu_pd(m, src[i] + off), acc);
  _mm512_mask_storeu_pd(dst, m, acc);
#else
  for (int64_t j = 0; j < len; ++j) {
    double a = dst[j];
    for (int i = 0; i < cnt; ++i) a += coef[i] * src[i][off + j];
    dst[j] = a;
  }
#endif
}

// a[0..len) . b[0..len) for len < W, added lane-wise into acc (lanes >= len add zero).
inline void dot_tail(const float* a, const float* b, int64_t len, Simd<float>::V* acc) {
#ifdef __AVX512F__
  const __mmask16 m = static_cast<__mmask16>((1u << len) - 1);
  Simd<float>::V p;
  const __m512 r = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a), _mm512_maskz_loadu_ps(m, b));
  std::memcpy(&p, &r, sizeof(p));
  *acc += p;
#else
  for (int64_t j = 0; j < len; ++j) (*acc)[j] += a[j] * b[j];
#endif
}
inline void dot_tail(const double* a, const double* b, int64_t len, Simd<double>::V* acc) {
#ifdef __AVX512F__
  const __mmask8 m = static_cast<__mmask8>((1u << len) - 1);
  Simd<double>::V p;
  const __m512d r = _mm512_mul_pd(_mm512_maskz_loadu_pd(m, a), _mm512_maskz_loadu_pd(m, b));
  std::memcpy(&p, &r, sizeof(p));
  *acc += p;
#else
  for (int64_t j = 0; j < len; ++j) (*acc)[j] += a[j] * b[j];
#endif
}

// dst[0 .. len) += sum_{i < cnt} coef[i] * src[i][off .. off + len).
template <typename T>
inline void axpy_list(T* dst, const T* const* src, int64_t off, const T* coef, int cnt, int64_t len) {
  constexpr int W = Simd<T>::W;
  int64_t j = 0;
  // Blocks of up to 16 accumulators (32 zmm registers); 12 covers a 3x3 row of 64 float channels in
  // one pass over the list.
  for (; j + 16 * W <= len; j += 16 * W) axpy_list_block<T, 16>(dst + j, src, coef, cnt, off + j);
  if (j + 12 * W <= len) {
    axpy_list_block<T, 12>(dst + j, src, coef, cnt, off + j);
    j += 12 * W;
  }
  if (j + 8 * W <= len) {
    axpy_list_block<T, 8>(dst + j, src, coef, cnt, off + j);
    j += 8 * W;
  }
  if (j + 6 * W <= len) {
    axpy_list_block<T, 6>(dst + j, src, coef, cnt, off + j);
    j += 6 * W;
  }
  if (j + 4 * W <= len) {
    axpy_list_block<T, 4>(dst + j, src, coef, cnt, off + j);
    j += 4 * W;
  }
  if (j + 2 * W <= len) {
    axpy_list_block<T, 2>(dst + j, src, coef, cnt, off + j);
    j += 2 * W;
  }
  if (j + W <= len) {
    axpy_list_block<T, 1>(dst + j, src, coef, cnt, off + j);
    j += W;
  }
  if (j < len) axpy_list_tail(dst + j, src, off + j, coef, cnt, len - j);
}

// sum_j a[j] * b[j] over len elements, added lane-wise to the running vector accumulator `acc`.
template <typename T>
inline void dot_accumulate(const T* a, const T* b, int64_t len, typename Simd<T>::V* acc) {
  constexpr int W = Simd<T>::W;
  int64_t j = 0;
  // Two independent chains hide FMA latency for the usual lengths (k * C_in >= 64).
  typename Simd<T>::V acc1 = vbroadcast<T>(0);
  for (; j + 2 * W <= len; j += 2 * W) {
    *acc += vload(a + j) * vload(b + j);
    acc1 += vload(a + j + W) * vload(b + j + W);
  }
  if (j + W <= len) {
    *acc += vload(a + j) * vload(b + j);
    j += W;
  }
  *acc += acc1;
  if (j < len) dot_tail(a + j, b + j, len - j, acc);
}

// Narrows the W lanes of an integer vector (values 0..255) to W bytes at dst (one vpmovdb / vpmovqb).
template <typename T>
inline void store_bytes(uint8_t* dst, typename Simd<T>::I v) {
  typedef uint8_t B __attribute__((vector_size(Simd<T>::W)));
  const B b = __builtin_convertvector(v, B);
  std::memcpy(dst, &b, sizeof(b));
}

template <typename T>
inline T hsum(typename Simd<T>::V v) {
  T s = 0;
  for (int i = 0; i < Simd<T>::W; ++i) s += v[i];
  return s;
}

// Lane l of deinterleave<P, DX>(a) is element l*P + DX of the P vectors a[0..P) laid end to end: one
// column of P-wide windows. One in-register permute per source vector plus a masked blend.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define DRMM_HAVE_SHUFFLEVECTOR 1
#endif
#endif

#ifdef DRMM_HAVE_SHUFFLEVECTOR
template <typename VV, int P, int DX, int K, int... L>
inline VV pick_lanes(VV a, std::integer_sequence<int, L...>) {
  constexpr int W = sizeof...(L);
  return __builtin_shufflevector(a, a, ((L * P + DX) / W == K ? (L * P + DX) % W : 0)...);
}

template <typename VV, typename MI, int P, int DX, int K = 0, int... L>
inline VV deinterleave(const VV* a, VV r, std::integer_sequence<int, L...> seq) {
  if constexpr (K == P) {
    return r;
  } else {
    constexpr int W = sizeof...(L);
    const MI from_k = {((L * P + DX) / W == K ? -1 : 0)...};
    r = from_k ? pick_lanes<VV, P, DX, K>(a[K], seq) : r;
    return deinterleave<VV, MI, P, DX, K + 1>(a, r, seq);
  }
}
#endif

}  // namespace cpu
}  // namespace drmm
