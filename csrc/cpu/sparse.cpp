// Top-down / backward kernels that work only at the recorded switch positions: render (masked unpool +
// transposed conv as a scatter), gather_conv (conv read at the recorded positions) and render_wgrad
// (sparse weight gradient). With pool = P at most 1/P^2 of the conv-output positions carry a value, and
// with ReLU only those whose `a` bit is on, so a scatter/gather over them beats oneDNN's dense
// transposed / backward convolution. pool == 1 has no such sparsity and uses ATen's dense kernels.
//
// Layouts: the weight is transposed to Wt[co][kh][kw][ci], and images live in zero-padded NHWC
// buffers, so for a fixed (co, kh) a kernel row is one contiguous run of KW*C_in values in both, and
// all inner loops are unit-stride vector loops over (kw, ci).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>
#ifdef __linux__
#include <sys/resource.h>
#endif

#include "cpu/cpu_ops.h"
#include "cpu/simd.h"
#include "cpu/work_queue.h"

namespace drmm {
namespace cpu {
namespace {

constexpr uint8_t kOnBit = 0x80;
constexpr uint8_t kOffsetMask = 0x0F;

struct Geometry {
  int64_t n, co, ci, kh, kw;  // batch, output / input channels, kernel size
  int64_t h, w;               // bottom-up input size (render's output size)
  int64_t hc, wc;             // conv output size
  int64_t hp, wp;             // pooled size
  int64_t stride, padding, pool;
};

Geometry make_geometry(const char* op, int64_t n, int64_t co, int64_t ci, int64_t kh, int64_t kw, int64_t h,
                       int64_t w, int64_t stride, int64_t padding, int64_t pool, const at::Tensor& mu) {
  TORCH_CHECK(stride >= 1, "drmm_C.", op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, "drmm_C.", op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(pool >= 1 && pool <= 4, "drmm_C.", op, ": pool must be in [1, 4], got ", pool);
  Geometry g{n, co, ci, kh, kw, h, w, 0, 0, 0, 0, stride, padding, pool};
  g.hc = (h + 2 * padding - kh) / stride + 1;
  g.wc = (w + 2 * padding - kw) / stride + 1;
  TORCH_CHECK(h + 2 * padding >= kh && w + 2 * padding >= kw, "drmm_C.", op, ": input size (", h, ", ", w,
              ") with padding ", padding, " is smaller than the kernel (", kh, ", ", kw, ")");
  g.hp = g.hc / pool;
  g.wp = g.wc / pool;
  TORCH_CHECK(mu.size(0) == n && mu.size(1) == co && mu.size(2) == g.hp && mu.size(3) == g.wp, "drmm_C.", op,
              ": mu/switches must have shape [", n, ", ", co, ", ", g.hp, ", ", g.wp, "] (conv output (", g.hc,
              ", ", g.wc, ") pooled by ", pool, "), got ", mu.sizes());
  return g;
}

void check_switches(const char* op, const at::Tensor& switches, const at::Tensor& mu) {
  TORCH_CHECK(switches.scalar_type() == at::kByte, "drmm_C.", op, ": switches must be uint8, got ",
              switches.scalar_type());
  TORCH_CHECK(switches.sizes() == mu.sizes(), "drmm_C.", op, ": switches shape ", switches.sizes(),
              " does not match mu shape ", mu.sizes());
}

void check_scale(const char* op, const std::optional<at::Tensor>& scale, int64_t co, const at::Tensor& ref) {
  if (!scale.has_value()) return;
  TORCH_CHECK(scale->dim() == 1 && scale->size(0) == co, "drmm_C.", op, ": scale must have shape [", co,
              "], got ", scale->sizes());
  TORCH_CHECK(scale->scalar_type() == ref.scalar_type(), "drmm_C.", op, ": scale dtype ", scale->scalar_type(),
              " differs from ", ref.scalar_type());
}

void raise_bad_offset(const char* op, bool bad, int64_t pool) {
  TORCH_CHECK(!bad, "drmm_C.", op, ": switches hold a window offset >= pool*pool = ", pool * pool,
              " (bits 0-3 must be dy*pool+dx)");
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
void mask_plane(const T* __restrict__ a, const uint8_t* __restrict__ q, T slope, T k, bool scaled,
                T* __restrict__ o, int64_t len) {
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
// Which is faster depends on the allocator. When malloc hands back a recently freed block, fresh is cache-warm and
// the kept buffer is not: the render of conv_small layer 2 (12.8 MB temporary) took 7.5 ms fresh vs 8.4 ms kept.
// When glibc instead returns blocks of that size to the kernel on free, a fresh one is page-faulted in on every
// call (~1 us per 4 KiB page here): 16 ms fresh vs 12.5 ms kept. So temporaries are fresh until a fill is seen to
// fault in most of its pages; from then on this thread keeps the ones at least that large (grow-only, one buffer
// per dtype), while smaller ones, which malloc may still recycle, stay fresh.
struct DenseTemporary {
  at::Tensor tensor;
  bool fresh;
};

thread_local int64_t keep_dense_from_bytes = std::numeric_limits<int64_t>::max();

DenseTemporary dense_temporary(int64_t numel, const at::TensorOptions& opts) {
  if (numel * static_cast<int64_t>(opts.dtype().itemsize()) < keep_dense_from_bytes)
    return {at::empty({numel}, opts), true};
  thread_local at::Tensor buf[2];
  at::Tensor& b = buf[opts.dtype() == at::kDouble ? 1 : 0];
  if (!b.defined() || b.numel() < numel || b.storage().use_count() > 1) b = at::empty({numel}, opts);
  return {b.narrow(0, 0, numel), false};
}

int64_t minor_faults() {
#ifdef __linux__
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) == 0) return ru.ru_minflt;
#endif
  return -1;
}

// out = (mu * a') * scale over contiguous NCHW m / s. Without a per-channel factor the run is flat, in large
// blocks: per-plane calls cost ~10 ns each, which dominated on small maps.
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

// ------------------------------------------------------------------------------------------- render

template <typename T>
void render_sparse(const Geometry& g, const T* mu, const uint8_t* sw, const T* wt, const Masker<T>& mask, T* out,
                   std::atomic<bool>& bad) {
  const int64_t p2 = g.pool * g.pool, plane = g.hp * g.wp;
  // Buffer rows/cols are conv-input coordinates shifted by +padding; sized to hold every tap so the
  // scatter needs no bounds checks. Output rows beyond it (output_padding) stay zero.
  const int64_t hb = (g.hc - 1) * g.stride + g.kh, wb = (g.wc - 1) * g.stride + g.kw;
  const int64_t row_len = g.kw * g.ci;
  // Kernel rows are split into column chunks whose weights for all C_out fit in L1 (~24 KiB): each
  // chunk is scattered for every position before the next one, so the weights are read from L1, not
  // L2, and every bucket pass still keeps its destination in registers.
  // Chunks are 16, 12, 8, 6 or 4 vectors (one register block, one pass over each bucket).
  constexpr int W = Simd<T>::W;
  const int64_t fit = 32768 / static_cast<int64_t>(sizeof(T) * W * std::max<int64_t>(1, g.co));
  int64_t chunk = W * (fit >= 16 ? 16 : fit >= 12 ? 12 : fit >= 8 ? 8 : fit >= 6 ? 6 : 4);
  if (chunk >= row_len) chunk = row_len;
  WorkQueue queue(g.n, 1);
  queue.run([&](int64_t, WorkQueue& wq) {
    std::vector<T> buf(hb * wb * g.ci);
    // All (position, offset) buckets of one sample, stored compactly: bucket b holds entries
    // [start[b], start[b] + count[b]) of coef / ptr.
    std::vector<T> coef(plane * g.co), tmp_coef(p2 * g.co);
    std::vector<const T*> ptr(plane * g.co), tmp_ptr(p2 * g.co);
    std::vector<int> start(plane * p2), count(plane * p2);
    for (int64_t n, n_end; wq.take(&n, &n_end);) {
      std::fill(buf.begin(), buf.end(), T(0));
      const T* mun = mu + n * g.co * plane;
      const uint8_t* swn = sw + n * g.co * plane;
      int used = 0;
      for (int64_t q = 0; q < plane; ++q) {
        // Bucket the channels by window offset: all channels with the same offset scatter into the
        // same k x k x C_in block, so that block is accumulated in registers over the bucket.
        int* cnt = count.data() + q * p2;
        std::fill(cnt, cnt + p2, 0);
        for (int64_t c = 0; c < g.co; ++c) {
          const uint8_t s = swn[c * plane + q];
          T v;
          if (!mask.value(mun[c * plane + q], s, c, &v)) continue;
          const int o = s & kOffsetMask;
          if (o >= p2) {
            bad = true;
            continue;
          }
          tmp_coef[o * g.co + cnt[o]] = v;
          tmp_ptr[o * g.co + cnt[o]] = wt + c * g.kh * row_len;
          ++cnt[o];
        }
        for (int o = 0; o < p2; ++o) {
          start[q * p2 + o] = used;
          std::copy_n(tmp_coef.data() + o * g.co, cnt[o], coef.data() + used);
          std::copy_n(tmp_ptr.data() + o * g.co, cnt[o], ptr.data() + used);
          used += cnt[o];
        }
      }
      for (int64_t kh = 0; kh < g.kh; ++kh) {
        for (int64_t j0 = 0; j0 < row_len; j0 += chunk) {
          const int64_t len = std::min(chunk, row_len - j0);
          for (int64_t q = 0; q < plane; ++q) {
            const int64_t py = q / g.wp, px = q % g.wp;
            for (int o = 0; o < p2; ++o) {
              const int cnt = count[q * p2 + o];
              if (cnt == 0) continue;
              const int64_t r0 = (py * g.pool + o / g.pool) * g.stride;
              const int64_t c0 = (px * g.pool + o % g.pool) * g.stride;
              const int st = start[q * p2 + o];
              axpy_list(buf.data() + ((r0 + kh) * wb + c0) * g.ci + j0, ptr.data() + st, kh * row_len + j0,
                        coef.data() + st, cnt, len);
            }
          }
        }
      }
      // NHWC buffer -> NCHW output (cropping the padding), channel by channel so the writes are
      // sequential; a block of 16 channels shares the buffer lines it reads.
      T* on = out + n * g.ci * g.h * g.w;
      const int64_t hv = std::max<int64_t>(0, std::min(g.h, hb - g.padding));
      const int64_t wv = std::max<int64_t>(0, std::min(g.w, wb - g.padding));
      for (int64_t c = 0; c < g.ci; ++c) {
        T* oc = on + c * g.h * g.w;
        for (int64_t y = 0; y < g.h; ++y) {
          T* orow = oc + y * g.w;
          if (y >= hv) {
            std::fill(orow, orow + g.w, T(0));
            continue;
          }
          const T* brow = buf.data() + ((y + g.padding) * wb + g.padding) * g.ci + c;
          for (int64_t x = 0; x < wv; ++x) orow[x] = brow[x * g.ci];
          std::fill(orow + wv, orow + g.w, T(0));
        }
      }
    }
  });
}

// -------------------------------------------------------------------------------------- gather_conv

template <typename T>
void gather_sparse(const Geometry& g, const at::Tensor& src, const T* srcp, const uint8_t* sw, const T* wt, T* out,
                   std::atomic<bool>& bad) {
  using V = typename Simd<T>::V;
  const int64_t p2 = g.pool * g.pool, plane = g.hp * g.wp;
  const int64_t hs = g.h + 2 * g.padding, ws = g.w + 2 * g.padding;
  const int64_t row_len = g.kw * g.ci;
  WorkQueue queue(g.n, 1);
  queue.run([&](int64_t, WorkQueue& wq) {
    std::vector<T> buf(hs * ws * g.ci);
    for (int64_t n, n_end; wq.take(&n, &n_end);) {
      load_padded_nhwc(src, srcp, n, g.padding, hs, ws, buf.data());
      for (int64_t c = 0; c < g.co; ++c) {
        const uint8_t* swc = sw + (n * g.co + c) * plane;
        T* oc = out + (n * g.co + c) * plane;
        const T* wc = wt + c * g.kh * row_len;
        for (int64_t py = 0; py < g.hp; ++py) {
          for (int64_t px = 0; px < g.wp; ++px) {
            const int o = swc[py * g.wp + px] & kOffsetMask;
            if (o >= p2) {
              bad = true;
              oc[py * g.wp + px] = T(0);
              continue;
            }
            const int64_t r0 = (py * g.pool + o / g.pool) * g.stride;
            const int64_t c0 = (px * g.pool + o % g.pool) * g.stride;
            V acc = vbroadcast<T>(0);
            for (int64_t kh = 0; kh < g.kh; ++kh)
              dot_accumulate(buf.data() + ((r0 + kh) * ws + c0) * g.ci, wc + kh * row_len, row_len, &acc);
            oc[py * g.wp + px] = hsum<T>(acc);
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------- render_wgrad

// The entries of one (n, c) plane that carry a value: emit(i, value, row, col) for each, with (row, col)
// the recorded conv position times the stride (the top-left input tap); an offset outside the window sets
// `bad`. Returns the count.
template <typename T, typename Emit>
int collect_entries(const Geometry& g, const Masker<T>& mask, const T* muc, const uint8_t* swc, int64_t c,
                    std::atomic<bool>& bad, const Emit& emit) {
  const int64_t p2 = g.pool * g.pool, plane = g.hp * g.wp;
  int cnt = 0;
  for (int64_t q = 0; q < plane; ++q) {
    T v;
    if (!mask.value(muc[q], swc[q], c, &v)) continue;
    const int o = swc[q] & kOffsetMask;
    if (o >= p2) {
      bad = true;
      continue;
    }
    emit(cnt++, v, ((q / g.wp) * g.pool + o / g.pool) * g.stride, ((q % g.wp) * g.pool + o % g.pool) * g.stride);
  }
  return cnt;
}

// dWt[co][kh][kw][ci] accumulated per chunk of samples in a private buffer (no atomics), summed by the
// caller in chunk order. The chunks are fixed by the batch size alone, so the result is bitwise the same
// whatever the thread count or scheduling (exact training resume depends on it).
template <typename T>
void wgrad_sparse(const Geometry& g, const at::Tensor& src, const T* srcp, const T* mu, const uint8_t* sw,
                  const Masker<T>& mask, T* partial, int64_t nchunks, std::atomic<bool>& bad) {
  const int64_t plane = g.hp * g.wp;
  const int64_t hs = g.h + 2 * g.padding, ws = g.w + 2 * g.padding;
  const int64_t row_len = g.kw * g.ci, wsize = g.co * g.kh * row_len;
  WorkQueue queue(nchunks, 1);  // workers take whole sample chunks, so the sums do not depend on scheduling
  queue.run([&](int64_t worker, WorkQueue& wq) {
    std::vector<T> buf(hs * ws * g.ci);
    std::vector<T> coef(plane);
    std::vector<const T*> ptr(plane);
    (void)worker;
    for (int64_t chunk, chunk_end; wq.take(&chunk, &chunk_end);) {
      T* dw = partial + chunk * wsize;
      std::fill(dw, dw + wsize, T(0));  // this sample chunk's private accumulator
      for (int64_t n = chunk * g.n / nchunks, n_end = (chunk + 1) * g.n / nchunks; n < n_end; ++n) {
        load_padded_nhwc(src, srcp, n, g.padding, hs, ws, buf.data());
        for (int64_t c = 0; c < g.co; ++c) {
          const T* muc = mu + (n * g.co + c) * plane;
          const uint8_t* swc = sw + (n * g.co + c) * plane;
          const int cnt = collect_entries(g, mask, muc, swc, c, bad, [&](int i, T v, int64_t r0, int64_t c0) {
            coef[i] = v;
            ptr[i] = buf.data() + (r0 * ws + c0) * g.ci;
          });
          if (cnt == 0) continue;
          // One kernel row of dW (KW*C_in values) stays in registers while the entries stream by.
          for (int64_t kh = 0; kh < g.kh; ++kh)
            axpy_list(dw + (c * g.kh + kh) * row_len, ptr.data(), kh * ws * g.ci, coef.data(), cnt, row_len);
        }
      }
    }
  });
}

// Channel-chunked variant for square 1x1 / 3x3 / 5x5 kernels and C_in >= W/2: the padded image is
// stored as [C_in / W][H][W][W lanes], so one chunk (~20 KiB for 16x16 images) stays in L1, and all
// K*K taps of a chunk are accumulated in registers while one output channel's entries stream by
// (K*K loads from L1 per entry instead of K rows of K*C_in values from L2).
template <typename T, int K>
void wgrad_sparse_chunked(const Geometry& g, const at::Tensor& src, const T* srcp, const T* mu, const uint8_t* sw,
                          const Masker<T>& mask, T* partial, int64_t nchunks, std::atomic<bool>& bad) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::W;
  const int64_t plane = g.hp * g.wp;
  const int64_t hs = g.h + 2 * g.padding, ws = g.w + 2 * g.padding;
  const int64_t cch = (g.ci + W - 1) / W, cbuf = hs * ws * W;
  const int64_t wsize = g.co * cch * K * K * W;
  const int64_t sn = src.stride(0), sc = src.stride(1), sh = src.stride(2), sx = src.stride(3);
  WorkQueue queue(nchunks, 1);
  queue.run([&](int64_t worker, WorkQueue& wq) {
    std::vector<T> buf(cch * cbuf);
    std::vector<T> coef(plane);
    std::vector<int64_t> base(plane);
    (void)worker;
    for (int64_t chunk, chunk_end; wq.take(&chunk, &chunk_end);) {
      T* dw = partial + chunk * wsize;
      std::fill(dw, dw + wsize, T(0));  // this sample chunk's private accumulator
      for (int64_t n = chunk * g.n / nchunks, n_end = (chunk + 1) * g.n / nchunks; n < n_end; ++n) {
        std::fill(buf.begin(), buf.end(), T(0));
        const T* img = srcp + n * sn;
        for (int64_t c = 0; c < g.ci; ++c) {
          T* dst = buf.data() + (c / W) * cbuf + (c % W);
          for (int64_t y = 0; y < g.h; ++y)
            for (int64_t x = 0; x < g.w; ++x)
              dst[((y + g.padding) * ws + x + g.padding) * W] = img[c * sc + y * sh + x * sx];
        }
        for (int64_t c = 0; c < g.co; ++c) {
          const T* muc = mu + (n * g.co + c) * plane;
          const uint8_t* swc = sw + (n * g.co + c) * plane;
          const int cnt = collect_entries(g, mask, muc, swc, c, bad, [&](int i, T v, int64_t r0, int64_t c0) {
            coef[i] = v;
            base[i] = (r0 * ws + c0) * W;
          });
          if (cnt == 0) continue;
          for (int64_t ch = 0; ch < cch; ++ch) {
            const T* cb = buf.data() + ch * cbuf;
            V acc[K * K];
            for (int i = 0; i < K * K; ++i) acc[i] = V{};
            for (int e = 0; e < cnt; ++e) {
              const T* p = cb + base[e];
              asm("" : "+r"(p));  // keep tap offsets as displacements of p (see axpy_list_block)
              const V cv = vbroadcast(coef[e]);
              for (int kh = 0; kh < K; ++kh)
                for (int kw = 0; kw < K; ++kw) acc[kh * K + kw] += cv * vload(p + (kh * ws + kw) * W);
            }
            T* d = dw + (c * cch + ch) * K * K * W;
            for (int i = 0; i < K * K; ++i) vstore(d + i * W, vload(d + i * W) + acc[i]);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor render(const at::Tensor& mu, const at::Tensor& switches, const at::Tensor& weight,
                  const std::optional<at::Tensor>& scale, int64_t stride, int64_t padding, int64_t pool,
                  int64_t out_h, int64_t out_w, double negative_slope) {
  TORCH_CHECK(mu.dim() == 4, "drmm_C.render: mu must be 4-D, got ", mu.sizes());
  TORCH_CHECK(weight.dim() == 4, "drmm_C.render: weight must be 4-D, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == mu.scalar_type(), "drmm_C.render: weight dtype ", weight.scalar_type(),
              " differs from mu dtype ", mu.scalar_type());
  check_switches("render", switches, mu);
  check_scale("render", scale, weight.size(0), mu);
  const Geometry g = make_geometry("render", mu.size(0), weight.size(0), weight.size(1), weight.size(2),
                                   weight.size(3), out_h, out_w, stride, padding, pool, mu);
  if (pool == 1) {
    // The input gradient of conv2d is the transposed conv; ATen's backward kernel beats conv_transpose2d
    // (by 20x for 1x1 kernels). It reads only the sizes of `input`, so that argument is a view of the
    // masked map's own buffer: a separate fresh allocation costs page faults on every call.
    const int64_t in_numel = g.n * g.ci * out_h * out_w;
    at::Tensor gm;
    AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "drmm_cpu_render_dense",
                               [&] { gm = masked_map<scalar_t>(mu, switches, scale, negative_slope, in_numel); });
    if (is_pointwise(gm, weight, stride, padding)) return pointwise_conv_transpose(gm, weight);
    const at::Tensor shape_only =
        gm.as_strided({g.n, g.ci, out_h, out_w}, {g.ci * out_h * out_w, out_h * out_w, out_w, 1}, 0);
    auto grads = at::convolution_backward(gm, shape_only, weight.contiguous(), std::nullopt, {stride, stride},
                                          {padding, padding}, {1, 1}, false, {0, 0}, 1, {true, false, false});
    return std::get<0>(grads).contiguous();
  }
  at::Tensor out = at::empty({g.n, g.ci, out_h, out_w}, mu.options());
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "drmm_cpu_render", [&] {
    const at::Tensor m = mu.contiguous(), s = switches.contiguous();
    const at::Tensor wt = weight.permute({0, 2, 3, 1}).contiguous();
    const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
    const Masker<scalar_t> mask{scale.has_value() ? sc.data_ptr<scalar_t>() : nullptr,
                                static_cast<scalar_t>(negative_slope), negative_slope > 0.0};
    render_sparse<scalar_t>(g, m.data_ptr<scalar_t>(), s.data_ptr<uint8_t>(), wt.data_ptr<scalar_t>(), mask,
                            out.data_ptr<scalar_t>(), bad);
  });
  raise_bad_offset("render", bad, pool);
  return out;
}

at::Tensor gather_conv(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& switches, int64_t stride,
                       int64_t padding, int64_t pool) {
  TORCH_CHECK(src.dim() == 4, "drmm_C.gather_conv: src must be 4-D, got ", src.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == src.size(1), "drmm_C.gather_conv: weight shape ",
              weight.sizes(), " does not match src channels ", src.size(1));
  TORCH_CHECK(weight.scalar_type() == src.scalar_type(), "drmm_C.gather_conv: weight dtype ",
              weight.scalar_type(), " differs from src dtype ", src.scalar_type());
  TORCH_CHECK(switches.dim() == 4 && switches.scalar_type() == at::kByte,
              "drmm_C.gather_conv: switches must be a 4-D uint8 tensor, got ", switches.scalar_type(), " ",
              switches.sizes());
  const Geometry g = make_geometry("gather_conv", src.size(0), weight.size(0), weight.size(1), weight.size(2),
                                   weight.size(3), src.size(2), src.size(3), stride, padding, pool, switches);
  if (pool == 1) {  // every position is "recorded": this is the dense conv
    if (is_pointwise(src, weight, stride, padding)) return pointwise_conv(src, weight);
    return at::convolution(src, weight, std::nullopt, {stride, stride}, {padding, padding}, {1, 1}, false,
                           {0, 0}, 1)
        .contiguous();
  }
  at::Tensor out = at::empty({g.n, g.co, g.hp, g.wp}, src.options());
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "drmm_cpu_gather_conv", [&] {
    const at::Tensor s = switches.contiguous();
    const at::Tensor wt = weight.permute({0, 2, 3, 1}).contiguous();
    gather_sparse<scalar_t>(g, src, src.data_ptr<scalar_t>(), s.data_ptr<uint8_t>(), wt.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), bad);
  });
  raise_bad_offset("gather_conv", bad, pool);
  return out;
}

at::Tensor render_wgrad(const at::Tensor& src, const at::Tensor& mu, const at::Tensor& switches,
                        const std::optional<at::Tensor>& scale, int64_t stride, int64_t padding, int64_t pool,
                        double negative_slope, int64_t kernel_h, int64_t kernel_w) {
  TORCH_CHECK(src.dim() == 4, "drmm_C.render_wgrad: src must be 4-D, got ", src.sizes());
  TORCH_CHECK(mu.dim() == 4, "drmm_C.render_wgrad: mu must be 4-D, got ", mu.sizes());
  TORCH_CHECK(mu.scalar_type() == src.scalar_type(), "drmm_C.render_wgrad: mu dtype ", mu.scalar_type(),
              " differs from src dtype ", src.scalar_type());
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1, "drmm_C.render_wgrad: kernel size must be >= 1, got (", kernel_h,
              ", ", kernel_w, ")");
  check_switches("render_wgrad", switches, mu);
  check_scale("render_wgrad", scale, mu.size(1), mu);
  const Geometry g = make_geometry("render_wgrad", src.size(0), mu.size(1), src.size(1), kernel_h, kernel_w,
                                   src.size(2), src.size(3), stride, padding, pool, mu);
  if (pool == 1) {
    at::Tensor gm;
    AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "drmm_cpu_wgrad_dense",
                               [&] { gm = masked_map<scalar_t>(mu, switches, scale, negative_slope); });
    const at::Tensor shape_only = at::empty({g.co, g.ci, kernel_h, kernel_w}, src.options());
    auto grads = at::convolution_backward(gm, src, shape_only, std::nullopt, {stride, stride}, {padding, padding},
                                          {1, 1}, false, {0, 0}, 1, {false, true, false});
    return std::get<1>(grads).contiguous();
  }
  // Fixed, thread-count independent: enough chunks to balance 2-8 threads dynamically, few enough that the
  // per-chunk weight buffers stay small.
  constexpr int64_t kWgradChunks = 8;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(g.n, kWgradChunks));
  const int64_t lanes = src.scalar_type() == at::kDouble ? Simd<double>::W : Simd<float>::W;
  const bool chunked = kernel_h == kernel_w && (kernel_h == 1 || kernel_h == 3 || kernel_h == 5) &&
                       2 * g.ci >= lanes && (src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble);
  std::atomic<bool> bad{false};
  if (chunked) {
    const int64_t cch = (g.ci + lanes - 1) / lanes;
    at::Tensor partial = at::empty({nchunks, g.co, cch, kernel_h, kernel_w, lanes}, src.options());
    at::Tensor out = at::empty({g.co, g.ci, kernel_h, kernel_w}, src.options());
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "drmm_cpu_render_wgrad_chunked", [&] {
      const at::Tensor m = mu.contiguous(), s = switches.contiguous();
      const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
      const Masker<scalar_t> mask{scale.has_value() ? sc.data_ptr<scalar_t>() : nullptr,
                                  static_cast<scalar_t>(negative_slope), negative_slope > 0.0};
      auto run = [&](auto k_const) {
        wgrad_sparse_chunked<scalar_t, decltype(k_const)::value>(g, src, src.data_ptr<scalar_t>(),
                                                                 m.data_ptr<scalar_t>(), s.data_ptr<uint8_t>(),
                                                                 mask, partial.data_ptr<scalar_t>(), nchunks, bad);
      };
      if (kernel_h == 1) run(std::integral_constant<int, 1>{});
      else if (kernel_h == 3) run(std::integral_constant<int, 3>{});
      else run(std::integral_constant<int, 5>{});
      // Sum the per-chunk partials, [co][ci / lanes][kh][kw][ci % lanes] -> [co][ci][kh][kw]. Small
      // (one weight per worker); serial, so it adds no parallel region to the call.
      const scalar_t* pp = partial.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const int64_t kk = kernel_h * kernel_w, wsize = g.co * cch * kk * lanes;
      for (int64_t co = 0; co < g.co; ++co)
        for (int64_t ci = 0; ci < g.ci; ++ci)
          for (int64_t t = 0; t < kk; ++t) {
            const int64_t idx = ((co * cch + ci / lanes) * kk + t) * lanes + ci % lanes;
            scalar_t acc = 0;
            for (int64_t w = 0; w < nchunks; ++w) acc += pp[w * wsize + idx];
            op[(co * g.ci + ci) * kk + t] = acc;
          }
    });
    raise_bad_offset("render_wgrad", bad, pool);
    return out;
  }
  at::Tensor partial = at::empty({nchunks, g.co, kernel_h, kernel_w, g.ci}, src.options());
  at::Tensor out = at::empty({g.co, g.ci, kernel_h, kernel_w}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "drmm_cpu_render_wgrad", [&] {
    const at::Tensor m = mu.contiguous(), s = switches.contiguous();
    const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
    const Masker<scalar_t> mask{scale.has_value() ? sc.data_ptr<scalar_t>() : nullptr,
                                static_cast<scalar_t>(negative_slope), negative_slope > 0.0};
    wgrad_sparse<scalar_t>(g, src, src.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), s.data_ptr<uint8_t>(), mask,
                           partial.data_ptr<scalar_t>(), nchunks, bad);
    // [chunk][co][kh][kw][ci] -> sum over chunks, [co][ci][kh][kw].
    const scalar_t* pp = partial.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t kk = kernel_h * kernel_w, wsize = g.co * kk * g.ci;
    for (int64_t co = 0; co < g.co; ++co)
      for (int64_t ci = 0; ci < g.ci; ++ci)
        for (int64_t t = 0; t < kk; ++t) {
          const int64_t idx = (co * kk + t) * g.ci + ci;
          scalar_t acc = 0;
          for (int64_t w = 0; w < nchunks; ++w) acc += pp[w * wsize + idx];
          op[(co * g.ci + ci) * kk + t] = acc;
        }
  });
  raise_bad_offset("render_wgrad", bad, pool);
  return out;
}

// Each pooled value at its window's recorded offset of a zero (N, C, out_h, out_w) map: the training-mode
// batch-norm backward's max-pool gradient. One plane at a time, so the zero fill and the scattered writes meet in
// cache.
at::Tensor unpool(const at::Tensor& values, const at::Tensor& switches, int64_t pool, int64_t out_h,
                  int64_t out_w) {
  TORCH_CHECK(values.dim() == 4, "drmm_C.unpool: values must be 4-D, got ", values.sizes());
  check_switches("unpool", switches, values);
  TORCH_CHECK(pool >= 1 && pool <= 4, "drmm_C.unpool: pool must be in [1, 4], got ", pool);
  const int64_t n = values.size(0), c = values.size(1), hp = values.size(2), wp = values.size(3);
  TORCH_CHECK(out_h / pool == hp && out_w / pool == wp, "drmm_C.unpool: output size (", out_h, ", ", out_w,
              ") pooled by ", pool, " is not the values' size (", hp, ", ", wp, ")");
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
  raise_bad_offset("unpool", bad, pool);
  return out;
}

// mu * a'(switches) * scale[c] as a fresh NCHW tensor: the pool == 1 backward's activation gradient in one
// pass over the uint8 switches (a bool mask + masked_fill costs three).
at::Tensor masked_values(const at::Tensor& mu, const at::Tensor& switches, const std::optional<at::Tensor>& scale,
                         double negative_slope) {
  TORCH_CHECK(mu.dim() == 4 && switches.sizes() == mu.sizes() && switches.scalar_type() == at::kByte,
              "drmm_C::masked_values: switches ", switches.sizes(), " (", switches.scalar_type(),
              ") must be uint8 with the shape of mu ", mu.sizes());
  TORCH_CHECK(!scale.has_value() || (scale->dim() == 1 && scale->size(0) == mu.size(1)),
              "drmm_C::masked_values: scale must have ", mu.size(1), " elements");
  const at::Tensor m = mu.contiguous(), s = switches.contiguous();
  at::Tensor out = at::empty(m.sizes(), m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "drmm_cpu_masked_values",
                             [&] { fill_masked<scalar_t>(m, s, scale, negative_slope, out.data_ptr<scalar_t>()); });
  return out;
}

}  // namespace cpu
}  // namespace drmm
