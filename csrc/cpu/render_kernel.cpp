// CPU kernels of the render op (registered as drmm_C::render and drmm_C::gather_conv): the top-down pass
// (masked unpool + transposed conv, as a scatter over the recorded positions) and its adjoint in mu, the conv
// read at the recorded positions. With pool = P at most 1/P^2 of the conv-output positions carry a value, and
// with ReLU only those whose `a` bit is on, so a scatter/gather over them beats oneDNN's dense transposed /
// backward convolution. pool == 1 has no such sparsity and uses ATen's dense kernels.
//
// Layouts: the weight is transposed to Wt[co][kh][kw][ci], and images live in zero-padded NHWC
// buffers, so for a fixed (co, kh) a kernel row is one contiguous run of KW*C_in values in both, and
// all inner loops are unit-stride vector loops over (kw, ci).
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

// ------------------------------------------------------------------------------------------- render

template <typename T>
void render_sparse(const Geometry& g, const T* mu, const uint8_t* sw, const T* wt, const Masker<T>& mask, T* out,
                   std::atomic<bool>& bad) {
  const int64_t p2 = g.pool * g.pool, plane = g.hp * g.wp;
  // Buffer rows/cols are conv-input coordinates shifted by +padding; sized to hold every tap so the
  // scatter needs no bounds checks. Output rows beyond it (output_padding) stay zero.
  const int64_t hb = (g.hc - 1) * g.stride + g.kh, wb = (g.wc - 1) * g.stride + g.kw;
  const int64_t row_len = g.kw * g.c_in;
  // Kernel rows are split into column chunks whose weights for all C_out fit in L1 (~24 KiB): each
  // chunk is scattered for every position before the next one, so the weights are read from L1, not
  // L2, and every bucket pass still keeps its destination in registers.
  // Chunks are 16, 12, 8, 6 or 4 vectors (one register block, one pass over each bucket).
  constexpr int W = Simd<T>::W;
  const int64_t fit = 32768 / static_cast<int64_t>(sizeof(T) * W * std::max<int64_t>(1, g.c_out));
  int64_t chunk = W * (fit >= 16 ? 16 : fit >= 12 ? 12 : fit >= 8 ? 8 : fit >= 6 ? 6 : 4);
  if (chunk >= row_len) chunk = row_len;
  WorkQueue queue(g.n, 1);
  queue.run([&](int64_t, WorkQueue& wq) {
    std::vector<T> buf(hb * wb * g.c_in);
    // All (position, offset) buckets of one sample, stored compactly: bucket b holds entries
    // [start[b], start[b] + count[b]) of coef / ptr.
    std::vector<T> coef(plane * g.c_out), tmp_coef(p2 * g.c_out);
    std::vector<const T*> ptr(plane * g.c_out), tmp_ptr(p2 * g.c_out);
    std::vector<int> start(plane * p2), count(plane * p2);
    for (int64_t n, n_end; wq.take(&n, &n_end);) {
      std::fill(buf.begin(), buf.end(), T(0));
      const T* mun = mu + n * g.c_out * plane;
      const uint8_t* swn = sw + n * g.c_out * plane;
      int used = 0;
      for (int64_t q = 0; q < plane; ++q) {
        // Bucket the channels by window offset: all channels with the same offset scatter into the
        // same k x k x C_in block, so that block is accumulated in registers over the bucket.
        int* cnt = count.data() + q * p2;
        std::fill(cnt, cnt + p2, 0);
        const int64_t qy = q / g.wp, qx = q % g.wp;  // (once per position: a division per channel costs ~15 %)
        for (int64_t c = 0; c < g.c_out; ++c) {
          const uint8_t s = swn[c * plane + q];
          T v;
          if (!mask.value(mun[c * plane + q], s, c, &v)) continue;
          const int o = s & kOffsetMask;
          if (!valid_offset(g, qy, qx, o)) {
            bad = true;
            continue;
          }
          tmp_coef[o * g.c_out + cnt[o]] = v;
          tmp_ptr[o * g.c_out + cnt[o]] = wt + c * g.kh * row_len;
          ++cnt[o];
        }
        for (int o = 0; o < p2; ++o) {
          start[q * p2 + o] = used;
          std::copy_n(tmp_coef.data() + o * g.c_out, cnt[o], coef.data() + used);
          std::copy_n(tmp_ptr.data() + o * g.c_out, cnt[o], ptr.data() + used);
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
              // (overlapping windows that share a position each add their value: the sum render is defined as)
              const int64_t r0 = (py * g.ps - g.pp + o / g.pool) * g.stride;
              const int64_t c0 = (px * g.ps - g.pp + o % g.pool) * g.stride;
              const int st = start[q * p2 + o];
              axpy_list(buf.data() + ((r0 + kh) * wb + c0) * g.c_in + j0, ptr.data() + st, kh * row_len + j0,
                        coef.data() + st, cnt, len);
            }
          }
        }
      }
      // NHWC buffer -> NCHW output (cropping the padding), channel by channel so the writes are
      // sequential; a block of 16 channels shares the buffer lines it reads.
      T* on = out + n * g.c_in * g.h * g.w;
      const int64_t hv = std::max<int64_t>(0, std::min(g.h, hb - g.padding));
      const int64_t wv = std::max<int64_t>(0, std::min(g.w, wb - g.padding));
      for (int64_t c = 0; c < g.c_in; ++c) {
        T* oc = on + c * g.h * g.w;
        for (int64_t y = 0; y < g.h; ++y) {
          T* orow = oc + y * g.w;
          if (y >= hv) {
            std::fill(orow, orow + g.w, T(0));
            continue;
          }
          const T* brow = buf.data() + ((y + g.padding) * wb + g.padding) * g.c_in + c;
          for (int64_t x = 0; x < wv; ++x) orow[x] = brow[x * g.c_in];
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
  const int64_t plane = g.hp * g.wp;
  const int64_t hs = g.h + 2 * g.padding, ws = g.w + 2 * g.padding;
  const int64_t row_len = g.kw * g.c_in;
  WorkQueue queue(g.n, 1);
  queue.run([&](int64_t, WorkQueue& wq) {
    std::vector<T> buf(hs * ws * g.c_in);
    for (int64_t n, n_end; wq.take(&n, &n_end);) {
      load_padded_nhwc(src, srcp, n, g.padding, hs, ws, buf.data());
      for (int64_t c = 0; c < g.c_out; ++c) {
        const uint8_t* swc = sw + (n * g.c_out + c) * plane;
        T* oc = out + (n * g.c_out + c) * plane;
        const T* wc = wt + c * g.kh * row_len;
        for (int64_t py = 0; py < g.hp; ++py) {
          for (int64_t px = 0; px < g.wp; ++px) {
            const int o = swc[py * g.wp + px] & kOffsetMask;
            int64_t row, col;
            if (!switch_position(g, py, px, o, &row, &col)) {
              bad = true;
              oc[py * g.wp + px] = T(0);
              continue;
            }
            const int64_t r0 = row * g.stride, c0 = col * g.stride;
            V acc = vbroadcast<T>(0);
            for (int64_t kh = 0; kh < g.kh; ++kh)
              dot_accumulate(buf.data() + ((r0 + kh) * ws + c0) * g.c_in, wc + kh * row_len, row_len, &acc);
            oc[py * g.wp + px] = hsum<T>(acc);
          }
        }
      }
    }
  });
}

// The conv output read at each window's recorded position: the second half of gather_conv's dense path.
template <typename T>
void gather_recorded(const Geometry& g, const T* conv, const uint8_t* sw, T* out, std::atomic<bool>& bad) {
  const int64_t plane = g.hp * g.wp, conv_plane = g.hc * g.wc;
  at::parallel_for(0, g.n * g.c_out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const T* zc = conv + nc * conv_plane;
      const uint8_t* swc = sw + nc * plane;
      T* oc = out + nc * plane;
      for (int64_t py = 0; py < g.hp; ++py) {
        for (int64_t px = 0; px < g.wp; ++px) {
          int64_t row, col;
          if (!switch_position(g, py, px, swc[py * g.wp + px] & kOffsetMask, &row, &col)) {
            bad = true;
            oc[py * g.wp + px] = T(0);
            continue;
          }
          oc[py * g.wp + px] = zc[row * g.wc + col];
        }
      }
    }
  });
}

}  // namespace

at::Tensor render(const at::Tensor& mu, const at::Tensor& switches, const at::Tensor& weight,
                  const std::optional<at::Tensor>& scale, int64_t stride, int64_t padding, int64_t pool,
                  int64_t pool_stride, int64_t pool_padding, bool ceil_mode, int64_t out_h, int64_t out_w,
                  double negative_slope) {
  const char* op = "render";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(op, "mu", mu);
  check_4d(op, "weight", weight);
  check_same_dtype(op, "weight", weight, "mu", mu);
  check_switches("render", switches, "mu", mu);
  check_scale("render", scale, weight.size(0), mu);
  const Geometry g = make_geometry("render", mu.size(0), weight.size(0), weight.size(1), weight.size(2), weight.size(3),
                                   out_h, out_w, stride, padding, pw, mu);
  if (pool == 1) {
    // The input gradient of conv2d is the transposed conv; ATen's backward kernel beats conv_transpose2d
    // (by far for 1x1 kernels). It reads only the sizes of `input`, so that argument is a view of the
    // masked map's own buffer: a separate fresh allocation costs page faults on every call.
    const int64_t in_numel = g.n * g.c_in * out_h * out_w;
    at::Tensor gm;
    AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "drmm_cpu_render_dense",
                               [&] { gm = masked_map<scalar_t>(mu, switches, scale, negative_slope, in_numel); });
    if (is_pointwise(gm, weight, stride, padding)) return pointwise_conv_transpose(gm, weight);
    const at::Tensor shape_only =
        gm.as_strided({g.n, g.c_in, out_h, out_w}, {g.c_in * out_h * out_w, out_h * out_w, out_w, 1}, 0);
    auto grads = at::convolution_backward(gm, shape_only, weight.contiguous(), std::nullopt, {stride, stride},
                                          {padding, padding}, {1, 1}, false, {0, 0}, 1, {true, false, false});
    return std::get<0>(grads).contiguous();
  }
  at::Tensor out = at::empty({g.n, g.c_in, out_h, out_w}, mu.options());
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
  check_offsets("render", bad, pool);
  return out;
}

at::Tensor gather_conv(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& switches, int64_t stride,
                       int64_t padding, int64_t pool, int64_t pool_stride, int64_t pool_padding, bool ceil_mode) {
  const char* op = "gather_conv";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(op, "src", src);
  check_4d(op, "weight", weight);
  DRMM_CHECK(weight.size(1) == src.size(1), op, "weight shape ", weight.sizes(), " does not match src channels ",
             src.size(1));
  check_same_dtype(op, "weight", weight, "src", src);
  check_4d(op, "switches", switches);
  DRMM_CHECK(switches.scalar_type() == at::kByte, op, "switches must be uint8, got ", switches.scalar_type());
  const Geometry g = make_geometry("gather_conv", src.size(0), weight.size(0), weight.size(1), weight.size(2),
                                   weight.size(3), src.size(2), src.size(3), stride, padding, pw, switches);
  const auto dense_conv = [&] {
    return at::convolution(src, weight, std::nullopt, {stride, stride}, {padding, padding}, {1, 1}, false, {0, 0}, 1)
        .contiguous();
  };
  if (pool == 1) {  // every position is "recorded": this is the dense conv
    if (is_pointwise(src, weight, stride, padding)) return pointwise_conv(src, weight);
    return dense_conv();
  }
  at::Tensor out = at::empty({g.n, g.c_out, g.hp, g.wp}, src.options());
  std::atomic<bool> bad{false};
  // A kernel row shorter than two vectors (an image layer: 1 input channel, 5x5) leaves most lanes of the sparse
  // dot product idle: oneDNN's dense conv of every position and one read per window is faster there
  // (docs/results.md#training-step-throughput, L1). Without input channels the sparse path's zeros are right.
  const at::Tensor s = switches.contiguous();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "drmm_cpu_gather_conv", [&] {
    if (g.c_in > 0 && g.kw * g.c_in < 2 * Simd<scalar_t>::W) {
      const at::Tensor conv = dense_conv();
      gather_recorded<scalar_t>(g, conv.data_ptr<scalar_t>(), s.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), bad);
      return;
    }
    const at::Tensor wt = weight.permute({0, 2, 3, 1}).contiguous();
    gather_sparse<scalar_t>(g, src, src.data_ptr<scalar_t>(), s.data_ptr<uint8_t>(), wt.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), bad);
  });
  check_offsets("gather_conv", bad, pool);
  return out;
}

}  // namespace cpu
}  // namespace drmm

TORCH_LIBRARY_IMPL(drmm_C, CPU, m) {
  m.impl("render", &drmm::cpu::render);
  m.impl("gather_conv", &drmm::cpu::gather_conv);
}
