// CPU kernels of the conv_relu_pool op (registered as drmm_C::conv_relu_pool and drmm_C::bn_pool): the
// convolution (oneDNN, or a batched product for 1x1 kernels), then one epilogue pass over its output z that
// applies scale/shift, pools, records the switch byte and applies the activation. Only y and the switches are
// written. bn_pool is the same epilogue on a given z (conv_bn_relu_pool's normalization folded into scale/shift).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/switch_byte.h"
#include "cpu/pointwise.h"
#include "cpu/simd.h"
#include "cpu/work_queue.h"

namespace drmm {
namespace cpu {
namespace {

// Window argmax in the order of PyTorch's CPU max_pool2d, which scans row-major and updates when
// `v > max || isnan(v)` from (-inf, offset 0): the result is the last NaN if there is one, else the
// first maximum. As a total order on (value, offset) that reduction can run in any grouping:
// `better(a, b)` says candidate a replaces the current best b.
template <typename T, typename O>
inline bool better(T av, O ao, T bv, O bo) {
  const bool an = av != av, bn = bv != bv;
  return an ? (!bn || ao > bo) : (!bn && (av > bv || (av == bv && ao < bo)));
}

template <typename V, typename I>
inline I better_v(V av, I ao, V bv, I bo) {
  const I an = av != av, bn = bv != bv;
  return (an & (~bn | (ao > bo))) | (~an & ~bn & ((av > bv) | ((av == bv) & (ao < bo))));
}

#ifdef DRMM_HAVE_SHUFFLEVECTOR
// Folds window columns DX.. into the running (max, offset) of W windows at once.
template <typename T, int P, int DX>
inline void fold_columns(const typename Simd<T>::V* cv, const typename Simd<T>::I* cy, typename Simd<T>::V& m,
                         typename Simd<T>::I& o) {
  if constexpr (DX < P) {
    using V = typename Simd<T>::V;
    using I = typename Simd<T>::I;
    constexpr auto lanes = std::make_integer_sequence<int, Simd<T>::W>{};
    const V v = deinterleave<V, I, P, DX>(cv, V{}, lanes);
    const I ov = deinterleave<I, I, P, DX>(cy, I{}, lanes) * P + DX;
    const I upd = better_v(v, ov, m, o);
    m = upd ? v : m;
    o = upd ? ov : o;
    fold_columns<T, P, DX + 1>(cv, cy, m, o);
  }
}
#endif

// One (n, c) plane of an NCHW z in two vectorized steps: (1) down each column of every window row
// (contiguous loads, the scan rule over dy), (2) across the P columns of each window, over the
// windows of the whole plane indexed linearly (rows hold few windows; short loops would stay scalar
// and mispredict on random data).
template <typename T, int P>
void pool_plane_nchw(const T* __restrict__ z, int64_t wc, T s, T b, T slope, bool leaky, T* __restrict__ y,
                     uint8_t* __restrict__ sw, int64_t hp, int64_t wp, T* __restrict__ colv,
                     typename Simd<T>::IS* __restrict__ coly) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  using IS = typename Simd<T>::IS;
  constexpr int W = Simd<T>::W;
  const V vs = vbroadcast(s), vb = vbroadcast(b), vslope = vbroadcast(slope);
  if constexpr (P == 1) {
    // No window: one elementwise pass (offset 0 everywhere).
    const int64_t len = hp * wp;
    int64_t q = 0;
    for (; q + W <= len; q += W) {
      const V m = vload(z + q) * vs + vb;
      const I pos = m > V{};
      V neg = m * vslope;
      neg = (neg == neg) ? neg : V{};
      vstore(y + q, (pos | (m != m)) ? m : neg);
      const I code = pos & kOnBit;
      store_bytes<T>(sw + q, code);
    }
    for (; q < len; ++q) {
      const T m = z[q] * s + b;
      y[q] = (m > T(0) || m != m) ? m : (leaky ? m * slope : T(0));
      sw[q] = m > T(0) ? kOnBit : 0;
    }
    return;
  }
  const int64_t wu = wp * P;  // used columns (trailing ones dropped)
  for (int64_t py = 0; py < hp; ++py) {
    const T* __restrict__ r0 = z + py * P * wc;
    T* __restrict__ cv = colv + py * wu;
    IS* __restrict__ cy = coly + py * wu;
    int64_t x = 0;
    for (; x + W <= wu; x += W) {
      V m = vload(r0 + x) * vs + vb;
      I d = I{};
      for (int dy = 1; dy < P; ++dy) {
        const V v = vload(r0 + dy * wc + x) * vs + vb;
        const I upd = (v > m) | (v != v);
        m = upd ? v : m;
        d = upd ? (I{} + dy) : d;
      }
      vstore(cv + x, m);
      vstore(cy + x, d);
    }
    for (; x < wu; ++x) {
      T m = r0[x] * s + b;
      IS d = 0;
      for (int dy = 1; dy < P; ++dy) {
        const T v = r0[dy * wc + x] * s + b;
        if (v > m || v != v) {
          m = v;
          d = dy;
        }
      }
      cv[x] = m;
      cy[x] = d;
    }
  }
  const int64_t q_end = hp * wp;
  int64_t q = 0;
#ifdef DRMM_HAVE_SHUFFLEVECTOR
  for (; q + W <= q_end; q += W) {
    V cvv[P];
    I cyv[P];
    for (int k = 0; k < P; ++k) {
      cvv[k] = vload(colv + q * P + k * W);
      cyv[k] = vload_as<I>(coly + q * P + k * W);
    }
    constexpr auto lanes = std::make_integer_sequence<int, W>{};
    V m = deinterleave<V, I, P, 0>(cvv, V{}, lanes);
    I o = deinterleave<I, I, P, 0>(cyv, I{}, lanes) * P;
    fold_columns<T, P, 1>(cvv, cyv, m, o);
    const I pos = m > V{};
    // act(max): NaN propagates (as in F.relu / F.leaky_relu); -inf maps to 0 under ReLU.
    // slope is 0 under ReLU; -inf * 0 = NaN there becomes 0. (No `leaky ? vec : vec`: GCC 12 turns a
    // scalar bool condition into a one-lane mask.)
    V neg = m * vslope;
    neg = (neg == neg) ? neg : V{};
    vstore(y + q, (pos | (m != m)) ? m : neg);
    const I code = o | (pos & kOnBit);
    store_bytes<T>(sw + q, code);
  }
#endif
  for (; q < q_end; ++q) {
    T m = colv[q * P];
    IS o = coly[q * P] * P;
    for (int dx = 1; dx < P; ++dx) {
      const T v = colv[q * P + dx];
      const IS ov = coly[q * P + dx] * P + dx;
      if (better(v, ov, m, o)) {
        m = v;
        o = ov;
      }
    }
    y[q] = (m > T(0) || m != m) ? m : (leaky ? m * slope : T(0));
    sw[q] = static_cast<uint8_t>(o | (m > T(0) ? kOnBit : 0));
  }
}

template <typename T, int P>
void epilogue_nchw(const T* z, const T* s, const T* b, int64_t n, int64_t c, int64_t hc, int64_t wc, T slope,
                   bool leaky, T* y, uint8_t* sw) {
  const int64_t hp = hc / P, wp = wc / P;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hc * wc));
  WorkQueue queue(n * c, grain);
  queue.run([&](int64_t, WorkQueue& wq) {
    std::vector<T> colv(hp * wp * P);
    std::vector<typename Simd<T>::IS> coly(hp * wp * P);
    for (int64_t begin, end; wq.take(&begin, &end);)
      for (int64_t i = begin; i < end; ++i) {
        const int64_t ch = i % c;
        pool_plane_nchw<T, P>(z + i * hc * wc, wc, s[ch], b[ch], slope, leaky, y + i * hp * wp, sw + i * hp * wp, hp,
                              wp, colv.data(), coly.data());
      }
  });
}

// pool == 1 on NCHW: one sample's C*H*W values as one flat run, with scale/shift expanded to per-element
// arrays (one sample long, built once per call, L1/L2-resident for small maps). Per-plane calls paid a fixed cost
// and left a scalar tail in every plane, which made this pass several times slower than a ReLU on 6x6 maps.
template <typename T>
void epilogue_nchw_flat(const T* z, const T* s, const T* b, int64_t n, int64_t c, int64_t plane, T slope, T* y,
                        uint8_t* sw) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  constexpr int W = Simd<T>::W;
  const int64_t len = c * plane;
  std::vector<T> se(len), be(len);
  for (int64_t ch = 0; ch < c; ++ch) {
    std::fill(se.begin() + ch * plane, se.begin() + (ch + 1) * plane, s[ch]);
    std::fill(be.begin() + ch * plane, be.begin() + (ch + 1) * plane, b[ch]);
  }
  const T* sp = se.data();
  const T* bp = be.data();
  const V vslope = vbroadcast(slope);
  WorkQueue queue(n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, len)));
  queue.run([&](int64_t, WorkQueue& wq) {
    for (int64_t begin, end; wq.take(&begin, &end);)
      for (int64_t i = begin; i < end; ++i) {
        const T* zi = z + i * len;
        T* yi = y + i * len;
        uint8_t* si = sw + i * len;
        int64_t q = 0;
        for (; q + W <= len; q += W) {
          const V m = vload(zi + q) * vload(sp + q) + vload(bp + q);
          const I pos = m > V{};
          V neg = m * vslope + V{};        // + 0: ReLU's m * 0 is -0.0 for negative m; F.relu gives +0.0
          neg = (neg == neg) ? neg : V{};  // -inf * 0 under ReLU is 0, not NaN
          vstore(yi + q, (pos | (m != m)) ? m : neg);
          store_bytes<T>(si + q, pos & kOnBit);
        }
        for (; q < len; ++q) {
          const T m = zi[q] * sp[q] + bp[q];
          const T neg = m * slope + T(0);
          yi[q] = (m > T(0) || m != m) ? m : (neg == neg ? neg : T(0));
          si[q] = m > T(0) ? kOnBit : 0;
        }
      }
  });
}

// One pooled row of a channels-last z: a window is P*P channel vectors, so the compare/select runs
// over channels (vectorized); results go transposed into the NCHW y / switches (channel stride cs).
// A separate function with by-value sizes: uint8 stores may alias anything, which would otherwise
// force reloads of captured sizes and block vectorization.
template <typename T, int P>
void pool_row_nhwc(const T* __restrict__ zrow, int64_t wc, int64_t c, const T* __restrict__ s, const T* __restrict__ b,
                   T slope, bool leaky, T* __restrict__ y, uint8_t* __restrict__ sw, int64_t wp, int64_t cs,
                   T* __restrict__ m, uint8_t* __restrict__ d) {
  for (int64_t px = 0; px < wp; ++px) {
    for (int64_t ch = 0; ch < c; ++ch) {
      m[ch] = -std::numeric_limits<T>::infinity();
      d[ch] = 0;
    }
    for (int dy = 0; dy < P; ++dy) {
      for (int dx = 0; dx < P; ++dx) {
        const T* __restrict__ zp = zrow + (dy * wc + px * P + dx) * c;
        const uint8_t o = static_cast<uint8_t>(dy * P + dx);
        for (int64_t ch = 0; ch < c; ++ch) {
          const T v = zp[ch] * s[ch] + b[ch];
          const bool upd = (v > m[ch]) | (v != v);
          m[ch] = upd ? v : m[ch];
          d[ch] = upd ? o : d[ch];
        }
      }
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      const T mx = m[ch];
      y[px + ch * cs] = (mx > T(0) || mx != mx) ? mx : (leaky ? mx * slope : T(0));
      sw[px + ch * cs] = static_cast<uint8_t>(d[ch] | (mx > T(0) ? kOnBit : 0));
    }
  }
}

template <typename T, int P>
void epilogue_nhwc(const T* z, const T* s, const T* b, int64_t n, int64_t c, int64_t hc, int64_t wc, T slope,
                   bool leaky, T* y, uint8_t* sw) {
  const int64_t hp = hc / P, wp = wc / P;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, c * wc));
  WorkQueue queue(n * hp, grain);
  queue.run([&](int64_t, WorkQueue& wq) {
    std::vector<T> mx(c);
    std::vector<uint8_t> id(c);
    for (int64_t begin, end; wq.take(&begin, &end);)
      for (int64_t i = begin; i < end; ++i) {
        const int64_t in = i / hp, py = i % hp;
        const int64_t base = in * c * hp * wp + py * wp;
        pool_row_nhwc<T, P>(z + (in * hc + py * P) * wc * c, wc, c, s, b, slope, leaky, y + base, sw + base, wp,
                            hp * wp, mx.data(), id.data());
      }
  });
}

// Any other max_pool2d window (overlapping, padded, ceil mode), on NCHW planes, separably as the plain kernel does:
// (1) per pooled row, down each map column over the window's rows clipped to the map (contiguous vector loads; the
// scan rule over dy: first maximum, last NaN), (2) across each window's columns, with the offset dy * k + dx counted
// from the window's unclipped origin so it never points into the padding. better() on (value, offset) makes the
// two steps pick what max_pool2d's row-major scan picks (first maximum, last NaN; the first position inside the map
// when every value is -inf). Windows that lie inside the map take W at a time: lane l's column x + l * s is lane l
// of the s vectors loaded from x, deinterleaved.
template <typename T, int S>
void pool_row_window(const T* __restrict__ cv, const typename Simd<T>::IS* __restrict__ cy, int64_t wc, int64_t k,
                     int64_t p, int64_t wp, T slope, bool leaky, T* __restrict__ y, uint8_t* __restrict__ sw) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  using IS = typename Simd<T>::IS;
  constexpr int W = Simd<T>::W;
  auto scalar = [&](int64_t px) {
    const int64_t w0 = px * S - p, ws = std::max<int64_t>(w0, 0), we = std::min<int64_t>(w0 + k, wc);
    T m = cv[ws];
    IS o = static_cast<IS>(cy[ws] * k + (ws - w0));
    for (int64_t w = ws + 1; w < we; ++w) {
      const T v = cv[w];
      const IS ov = static_cast<IS>(cy[w] * k + (w - w0));
      if (better(v, ov, m, o)) {
        m = v;
        o = ov;
      }
    }
    y[px] = (m > T(0) || m != m) ? m : (leaky ? m * slope : T(0));
    sw[px] = static_cast<uint8_t>(o | (m > T(0) ? kOnBit : 0));
  };
  // interior windows: w0 = px * S - p >= 0 and w0 + k <= wc
  const int64_t lo = std::min<int64_t>(wp, (p + S - 1) / S);
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(wp, wc + p - k >= 0 ? (wc + p - k) / S + 1 : 0));
  int64_t px = 0;
  for (; px < lo; ++px) scalar(px);
#ifdef DRMM_HAVE_SHUFFLEVECTOR
  constexpr auto lanes = std::make_integer_sequence<int, W>{};
  const V vslope = vbroadcast(slope);
  for (; px + W <= hi; px += W) {
    const int64_t w0 = px * S - p;
    // window column dx of W windows: lane l is column w0 + dx + l * S
    auto column = [&](int64_t dx, V& v, I& ov) {
      V cvv[S];
      I cyv[S];
      for (int j = 0; j < S; ++j) {
        cvv[j] = vload(cv + w0 + dx + j * W);
        cyv[j] = vload_as<I>(cy + w0 + dx + j * W);
      }
      v = deinterleave<V, I, S, 0>(cvv, V{}, lanes);
      ov = deinterleave<I, I, S, 0>(cyv, I{}, lanes) * static_cast<IS>(k) + static_cast<IS>(dx);
    };
    V m;
    I o;
    column(0, m, o);
    for (int64_t dx = 1; dx < k; ++dx) {
      V v;
      I ov;
      column(dx, v, ov);
      const I upd = better_v(v, ov, m, o);
      m = upd ? v : m;
      o = upd ? ov : o;
    }
    const I pos = m > V{};
    V neg = m * vslope;
    neg = (neg == neg) ? neg : V{};
    vstore(y + px, (pos | (m != m)) ? m : neg);
    store_bytes<T>(sw + px, o | (pos & kOnBit));
  }
#endif
  for (; px < wp; ++px) scalar(px);
}

template <typename T, int S>
void epilogue_window(const T* z, const T* s, const T* b, int64_t n, int64_t c, int64_t hc, int64_t wc,
                     const PoolWindow& pw, int64_t hp, int64_t wp, T slope, bool leaky, T* y, uint8_t* sw) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  using IS = typename Simd<T>::IS;
  constexpr int W = Simd<T>::W;
  const int64_t plane = hc * wc, pplane = hp * wp, k = pw.k;
  WorkQueue queue(n * c, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, plane)));
  queue.run([&](int64_t, WorkQueue& wq) {
    // one pooled row's column maxima; the tail pads the deinterleaving loads of the last interior windows
    std::vector<T> colv(wc + 4 * W);
    std::vector<IS> coly(wc + 4 * W);
    T* __restrict__ cv = colv.data();
    IS* __restrict__ cy = coly.data();
    for (int64_t begin, end; wq.take(&begin, &end);)
      for (int64_t i = begin; i < end; ++i) {
        const T sc = s[i % c], sh = b[i % c];
        const V vs = vbroadcast(sc), vb = vbroadcast(sh);
        const T* __restrict__ zi = z + i * plane;
        for (int64_t py = 0; py < hp; ++py) {
          const int64_t h0 = py * pw.s - pw.p, hs = std::max<int64_t>(h0, 0), he = std::min<int64_t>(h0 + k, hc);
          const T* __restrict__ r0 = zi + hs * wc;
          const IS d0 = static_cast<IS>(hs - h0);
          int64_t x = 0;
          for (; x + W <= wc; x += W) {
            V m = vload(r0 + x) * vs + vb;
            I d = I{} + d0;
            for (int64_t h = hs + 1; h < he; ++h) {
              const V v = vload(zi + h * wc + x) * vs + vb;
              const I upd = (v > m) | (v != v);
              m = upd ? v : m;
              d = upd ? (I{} + static_cast<IS>(h - h0)) : d;
            }
            vstore(cv + x, m);
            vstore(cy + x, d);
          }
          for (; x < wc; ++x) {
            T m = r0[x] * sc + sh;
            IS d = d0;
            for (int64_t h = hs + 1; h < he; ++h) {
              const T v = zi[h * wc + x] * sc + sh;
              if (v > m || v != v) {
                m = v;
                d = static_cast<IS>(h - h0);
              }
            }
            cv[x] = m;
            cy[x] = d;
          }
          pool_row_window<T, S>(cv, cy, wc, k, pw.p, wp, slope, leaky, y + i * pplane + py * wp,
                                sw + i * pplane + py * wp);
        }
      }
  });
}

template <typename T>
void run_epilogue_window(const T* z, const T* s, const T* b, int64_t n, int64_t c, int64_t hc, int64_t wc,
                         const PoolWindow& pw, int64_t hp, int64_t wp, T slope, bool leaky, T* y, uint8_t* sw) {
  switch (pw.s) {  // checked_window: 1 <= s <= k <= 4
    case 1:
      return epilogue_window<T, 1>(z, s, b, n, c, hc, wc, pw, hp, wp, slope, leaky, y, sw);
    case 2:
      return epilogue_window<T, 2>(z, s, b, n, c, hc, wc, pw, hp, wp, slope, leaky, y, sw);
    case 3:
      return epilogue_window<T, 3>(z, s, b, n, c, hc, wc, pw, hp, wp, slope, leaky, y, sw);
    default:
      return epilogue_window<T, 4>(z, s, b, n, c, hc, wc, pw, hp, wp, slope, leaky, y, sw);
  }
}

template <typename T>
void run_epilogue(const at::Tensor& z, const T* s, const T* b, int64_t pool, T slope, bool leaky, at::Tensor& y,
                  at::Tensor& sw) {
  const int64_t n = z.size(0), c = z.size(1), hc = z.size(2), wc = z.size(3);
  T* yp = y.data_ptr<T>();
  uint8_t* swp = sw.data_ptr<uint8_t>();
  // A tensor with C == 1 or H*W == 1 is both; the NCHW kernel then handles it.
  const bool nhwc = !z.is_contiguous() && z.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor zc = nhwc ? z : z.contiguous();
  const T* zp = zc.data_ptr<T>();
#define DRMM_EPI(P)                                                     \
  if (nhwc)                                                             \
    epilogue_nhwc<T, P>(zp, s, b, n, c, hc, wc, slope, leaky, yp, swp); \
  else                                                                  \
    epilogue_nchw<T, P>(zp, s, b, n, c, hc, wc, slope, leaky, yp, swp);
  switch (pool) {
    case 1:
      if (nhwc) {
        DRMM_EPI(1)
      } else {
        epilogue_nchw_flat<T>(zp, s, b, n, c, hc * wc, slope, yp, swp);
      }
      break;
    case 2:
      DRMM_EPI(2) break;
    case 3:
      DRMM_EPI(3) break;
    case 4:
      DRMM_EPI(4) break;
    default:
      check_pool("bn_pool", pool);
  }
#undef DRMM_EPI
}

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t c, const at::Tensor& ref) {
  check_channel_vector(op, name, t, c);
  check_same_dtype(op, name, t, "x", ref);
  DRMM_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor");
}

// z -> (y, switches) with optional per-channel scale/shift (absent = 1 / 0, which is exact).
std::tuple<at::Tensor, at::Tensor> epilogue(const char* op, const at::Tensor& z, const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& shift, const PoolWindow& pw,
                                            double negative_slope, bool z_is_scratch = false) {
  const int64_t pool = pw.k;
  DRMM_CHECK(negative_slope >= 0.0 && negative_slope < 1.0, op, "negative_slope must be in [0, 1), got ",
             negative_slope);
  const int64_t n = z.size(0), c = z.size(1), hp = pooled_len(z.size(2), pw), wp = pooled_len(z.size(3), pw);
  // (an empty map has no window even where the pool padding would give it an output size, as in max_pool2d)
  DRMM_CHECK(z.size(2) >= 1 && z.size(3) >= 1 && hp >= 1 && wp >= 1, op, "pool ", pool, " (stride ", pw.s, ", padding ",
             pw.p, ") is larger than the conv output ", z.sizes());
  if (scale.has_value()) check_vector(op, "scale", *scale, c, z);
  if (shift.has_value()) check_vector(op, "shift", *shift, c, z);
  // Without pooling, y has z's shape: when z is our own temporary (conv_relu_pool), write y over it instead of
  // allocating (first-touch page faults of a fresh full-size buffer cost as much as the pass itself). Each
  // element is read before the same element is written, so the overlap of z and y is harmless.
  const bool in_place = z_is_scratch && pool == 1 && pw.plain() && z.is_contiguous();
  at::Tensor y = in_place ? z : at::empty({n, c, hp, wp}, z.options());
  at::Tensor sw = at::empty({n, c, hp, wp}, z.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "drmm_cpu_epilogue", [&] {
    std::vector<scalar_t> s(c, scalar_t(1)), b(c, scalar_t(0));
    if (scale.has_value()) {
      const at::Tensor sc = scale->contiguous();
      std::copy_n(sc.data_ptr<scalar_t>(), c, s.begin());
    }
    if (shift.has_value()) {
      const at::Tensor sh = shift->contiguous();
      std::copy_n(sh.data_ptr<scalar_t>(), c, b.begin());
    }
    if (pw.plain()) {
      run_epilogue<scalar_t>(z, s.data(), b.data(), pool, static_cast<scalar_t>(negative_slope), negative_slope > 0.0,
                             y, sw);
    } else {
      const at::Tensor zc = z.contiguous();
      run_epilogue_window<scalar_t>(zc.data_ptr<scalar_t>(), s.data(), b.data(), n, c, z.size(2), z.size(3), pw, hp, wp,
                                    static_cast<scalar_t>(negative_slope), negative_slope > 0.0, y.data_ptr<scalar_t>(),
                                    sw.data_ptr<uint8_t>());
    }
  });
  return {y, sw};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_relu_pool(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& scale,
                                                  const std::optional<at::Tensor>& shift, int64_t stride,
                                                  int64_t padding, int64_t pool, int64_t pool_stride,
                                                  int64_t pool_padding, bool ceil_mode, double negative_slope) {
  const char* op = "conv_relu_pool";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(op, "x", x);
  check_4d(op, "weight", weight);
  DRMM_CHECK(weight.size(1) == x.size(1), op, "weight expects ", weight.size(1), " input channels but x has ",
             x.size(1));
  check_same_dtype(op, "weight", weight, "x", x);
  // the conv's geometry (pool 1 here: the epilogue checks the pooled size of any window)
  checked_geometry(op, x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2), weight.size(3),
                   stride, padding, 1);
  at::Tensor z;
  if (is_pointwise(x, weight, stride, padding)) {
    z = pointwise_conv(x, weight);
  } else {
    // oneDNN (or ATen's fallback) for the convolution; it may return channels_last, which the epilogue reads.
    z = at::convolution(x, weight, std::nullopt, {stride, stride}, {padding, padding}, {1, 1}, false, {0, 0}, 1);
  }
  return epilogue(op, z, scale, shift, pw, negative_slope, /*z_is_scratch=*/true);
}

std::tuple<at::Tensor, at::Tensor> bn_pool(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                                           int64_t pool, int64_t pool_stride, int64_t pool_padding, bool ceil_mode,
                                           double negative_slope) {
  const char* op = "bn_pool";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(op, "z", z);
  return epilogue(op, z, scale, shift, pw, negative_slope);
}

}  // namespace cpu
}  // namespace drmm

TORCH_LIBRARY_IMPL(drmm_C, CPU, m) {
  m.impl("conv_relu_pool", &drmm::cpu::conv_relu_pool);
  m.impl("bn_pool", &drmm::cpu::bn_pool);
}
