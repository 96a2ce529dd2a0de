// CPU kernel of render's weight gradient (registered as drmm_C::render_wgrad), which is also the weight
// gradient of conv_relu_pool: the sparse map built from mu and the switches, correlated with the input image
// at the recorded positions only (pool > 1), or ATen's dense weight gradient (pool == 1). Layouts as in
// render_kernel.cpp.
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
namespace {

// ------------------------------------------------------------------------------------- render_wgrad

// The entries of one (n, c) plane that carry a value: emit(i, value, row, col) for each, with (row, col)
// the recorded conv position times the stride (the top-left input tap); an offset outside the window sets
// `bad`. Returns the count.
template <typename T, typename Emit>
int collect_entries(const Geometry& g, const Masker<T>& mask, const T* muc, const uint8_t* swc, int64_t c,
                    std::atomic<bool>& bad, const Emit& emit) {
  const int64_t plane = g.hp * g.wp;
  int cnt = 0;
  for (int64_t q = 0; q < plane; ++q) {
    T v;
    if (!mask.value(muc[q], swc[q], c, &v)) continue;
    const int o = swc[q] & kOffsetMask;
    int64_t row, col;
    if (!switch_position(g, q / g.wp, q % g.wp, o, &row, &col)) {
      bad = true;
      continue;
    }
    emit(cnt++, v, row * g.stride, col * g.stride);
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
  const int64_t row_len = g.kw * g.c_in, wsize = g.c_out * g.kh * row_len;
  WorkQueue queue(nchunks, 1);  // workers take whole sample chunks, so the sums do not depend on scheduling
  queue.run([&](int64_t worker, WorkQueue& wq) {
    std::vector<T> buf(hs * ws * g.c_in);
    std::vector<T> coef(plane);
    std::vector<const T*> ptr(plane);
    (void)worker;
    for (int64_t chunk, chunk_end; wq.take(&chunk, &chunk_end);) {
      T* dw = partial + chunk * wsize;
      std::fill(dw, dw + wsize, T(0));  // this sample chunk's private accumulator
      for (int64_t n = chunk * g.n / nchunks, n_end = (chunk + 1) * g.n / nchunks; n < n_end; ++n) {
        load_padded_nhwc(src, srcp, n, g.padding, hs, ws, buf.data());
        for (int64_t c = 0; c < g.c_out; ++c) {
          const T* muc = mu + (n * g.c_out + c) * plane;
          const uint8_t* swc = sw + (n * g.c_out + c) * plane;
          const int cnt = collect_entries(g, mask, muc, swc, c, bad, [&](int i, T v, int64_t r0, int64_t c0) {
            coef[i] = v;
            ptr[i] = buf.data() + (r0 * ws + c0) * g.c_in;
          });
          if (cnt == 0) continue;
          // One kernel row of dW (KW*C_in values) stays in registers while the entries stream by.
          for (int64_t kh = 0; kh < g.kh; ++kh)
            axpy_list(dw + (c * g.kh + kh) * row_len, ptr.data(), kh * ws * g.c_in, coef.data(), cnt, row_len);
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
  const int64_t cch = (g.c_in + W - 1) / W, cbuf = hs * ws * W;
  const int64_t wsize = g.c_out * cch * K * K * W;
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
        for (int64_t c = 0; c < g.c_in; ++c) {
          T* dst = buf.data() + (c / W) * cbuf + (c % W);
          for (int64_t y = 0; y < g.h; ++y)
            for (int64_t x = 0; x < g.w; ++x)
              dst[((y + g.padding) * ws + x + g.padding) * W] = img[c * sc + y * sh + x * sx];
        }
        for (int64_t c = 0; c < g.c_out; ++c) {
          const T* muc = mu + (n * g.c_out + c) * plane;
          const uint8_t* swc = sw + (n * g.c_out + c) * plane;
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

at::Tensor render_wgrad(const at::Tensor& src, const at::Tensor& mu, const at::Tensor& switches,
                        const std::optional<at::Tensor>& scale, int64_t stride, int64_t padding, int64_t pool,
                        int64_t pool_stride, int64_t pool_padding, bool ceil_mode, double negative_slope,
                        int64_t kernel_h, int64_t kernel_w) {
  const char* op = "render_wgrad";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(op, "src", src);
  check_4d(op, "mu", mu);
  check_same_dtype(op, "mu", mu, "src", src);
  check_switches("render_wgrad", switches, "mu", mu);
  check_scale("render_wgrad", scale, mu.size(1), mu);
  const Geometry g = make_geometry("render_wgrad", src.size(0), mu.size(1), src.size(1), kernel_h, kernel_w,
                                   src.size(2), src.size(3), stride, padding, pw, mu);
  if (pool == 1) {
    at::Tensor gm;
    AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "drmm_cpu_wgrad_dense",
                               [&] { gm = masked_map<scalar_t>(mu, switches, scale, negative_slope); });
    const at::Tensor shape_only = at::empty({g.c_out, g.c_in, kernel_h, kernel_w}, src.options());
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
                       2 * g.c_in >= lanes && (src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble);
  std::atomic<bool> bad{false};
  if (chunked) {
    const int64_t cch = (g.c_in + lanes - 1) / lanes;
    at::Tensor partial = at::empty({nchunks, g.c_out, cch, kernel_h, kernel_w, lanes}, src.options());
    at::Tensor out = at::empty({g.c_out, g.c_in, kernel_h, kernel_w}, src.options());
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "drmm_cpu_render_wgrad_chunked", [&] {
      const at::Tensor m = mu.contiguous(), s = switches.contiguous();
      const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
      const Masker<scalar_t> mask{scale.has_value() ? sc.data_ptr<scalar_t>() : nullptr,
                                  static_cast<scalar_t>(negative_slope), negative_slope > 0.0};
      auto run = [&](auto k_const) {
        wgrad_sparse_chunked<scalar_t, decltype(k_const)::value>(g, src, src.data_ptr<scalar_t>(),
                                                                 m.data_ptr<scalar_t>(), s.data_ptr<uint8_t>(), mask,
                                                                 partial.data_ptr<scalar_t>(), nchunks, bad);
      };
      if (kernel_h == 1)
        run(std::integral_constant<int, 1>{});
      else if (kernel_h == 3)
        run(std::integral_constant<int, 3>{});
      else
        run(std::integral_constant<int, 5>{});
      // Sum the per-chunk partials, [co][ci / lanes][kh][kw][ci % lanes] -> [co][ci][kh][kw]. Small
      // (one weight per worker); serial, so it adds no parallel region to the call.
      const scalar_t* pp = partial.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const int64_t kk = kernel_h * kernel_w, wsize = g.c_out * cch * kk * lanes;
      for (int64_t co = 0; co < g.c_out; ++co)
        for (int64_t ci = 0; ci < g.c_in; ++ci)
          for (int64_t t = 0; t < kk; ++t) {
            const int64_t idx = ((co * cch + ci / lanes) * kk + t) * lanes + ci % lanes;
            scalar_t acc = 0;
            for (int64_t w = 0; w < nchunks; ++w) acc += pp[w * wsize + idx];
            op[(co * g.c_in + ci) * kk + t] = acc;
          }
    });
    check_offsets("render_wgrad", bad, pool);
    return out;
  }
  at::Tensor partial = at::empty({nchunks, g.c_out, kernel_h, kernel_w, g.c_in}, src.options());
  at::Tensor out = at::empty({g.c_out, g.c_in, kernel_h, kernel_w}, src.options());
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
    const int64_t kk = kernel_h * kernel_w, wsize = g.c_out * kk * g.c_in;
    for (int64_t co = 0; co < g.c_out; ++co)
      for (int64_t ci = 0; ci < g.c_in; ++ci)
        for (int64_t t = 0; t < kk; ++t) {
          const int64_t idx = (co * kk + t) * g.c_in + ci;
          scalar_t acc = 0;
          for (int64_t w = 0; w < nchunks; ++w) acc += pp[w * wsize + idx];
          op[(co * g.c_in + ci) * kk + t] = acc;
        }
  });
  check_offsets("render_wgrad", bad, pool);
  return out;
}

}  // namespace cpu
}  // namespace drmm

TORCH_LIBRARY_IMPL(drmm_C, CPU, m) { m.impl("render_wgrad", &drmm::cpu::render_wgrad); }
