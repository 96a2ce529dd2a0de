// The torch side of the CUDA kernels, and the only one: registers the drmm_C:: CUDA implementations and turns
// tensors into the raw pointers, sizes, element strides and current stream of csrc/cuda/launchers.h (the .cu
// files include no torch header, so nvcc compiles them alone; tests/kernels/backends/test_cuda_build.py checks that).
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE headers.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <climits>

#include "common/checks.h"
#include "cuda/launchers.h"

namespace drmm {
namespace cuda_glue {

namespace dcu = drmm::cuda;

// A failed launch (or a sticky error from earlier work on the stream) becomes a RuntimeError that names
// the kernel and the shapes. The message arguments are only evaluated on failure.
#define DRMM_CUDA_CHECK(err, op, ...)                                                         \
  TORCH_CHECK((err) == cudaSuccess, "drmm_kernels." op ": CUDA kernel failed (", __VA_ARGS__, \
              "): ", cudaGetErrorName(err), ": ", cudaGetErrorString(err))

dcu::DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return dcu::DType::kFloat32;
    case at::kDouble:
      return dcu::DType::kFloat64;
    case at::kHalf:
      return dcu::DType::kFloat16;
    case at::kBFloat16:
      return dcu::DType::kBFloat16;
    default:
      DRMM_CHECK(false, op, name, " has unsupported dtype ", t.scalar_type(),
                 " on CUDA (float16, bfloat16, float32, float64)");
  }
}

dcu::Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The kernels compute offsets inside one image (dims 1..3) in 32 bits and image offsets in 64 bits.
void check_4d(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  drmm::check_4d(op, name, t);
  DRMM_CHECK(t.is_cuda() && t.device() == ref.device(), op, name, " is on ", t.device(), ", expected ", ref.device());
  int64_t span = 0;
  for (int d = 1; d < 4; ++d) {
    DRMM_CHECK(t.stride(d) >= 0, op, name, " has a negative stride ", t.strides());
    if (t.size(d) > 0) span += (t.size(d) - 1) * t.stride(d);
  }
  DRMM_CHECK(span < INT_MAX, op, name, " of shape ", t.sizes(), " and strides ", t.strides(),
             " spans more than 2^31 elements per image");
}

void check_switches(const at::Tensor& sw, const at::Tensor& ref, const char* op) {
  check_4d(sw, ref, op, "switches");
  DRMM_CHECK(sw.scalar_type() == at::kByte, op, "switches must be uint8, got ", sw.scalar_type());
}

int to_int(int64_t v, const char* op, const char* what) {
  DRMM_CHECK(v >= 0 && v < INT_MAX, op, what, " = ", v, " is out of the supported range");
  return static_cast<int>(v);
}

// The checked geometry (csrc/common/checks.h) in the kernels' 32-bit form, pooled by max_pool2d window `pw`.
dcu::ConvGeom make_geom(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh, int64_t kw,
                        int64_t stride, int64_t padding, const PoolWindow& pw, const char* op) {
  // the conv's geometry (pool 1: the pooled size of any window is checked below)
  const ConvGeometry<int64_t> g64 = checked_geometry(op, n, c_in, h, w, c_out, kh, kw, stride, padding, 1);
  const int64_t hp = pooled_len(g64.hc, pw), wp = pooled_len(g64.wc, pw);
  DRMM_CHECK(hp >= 1 && wp >= 1, op, "pool ", pw.k, " (stride ", pw.s, ", padding ", pw.p,
             ") is larger than the conv output (", g64.hc, ", ", g64.wc, ") of input size (", h, ", ", w, ")");
  dcu::ConvGeom g{};
  g.n = to_int(g64.n, op, "batch");
  g.c_in = to_int(g64.c_in, op, "C_in");
  g.h = to_int(g64.h, op, "H");
  g.w = to_int(g64.w, op, "W");
  g.c_out = to_int(g64.c_out, op, "C_out");
  g.kh = to_int(g64.kh, op, "KH");
  g.kw = to_int(g64.kw, op, "KW");
  g.stride = to_int(g64.stride, op, "stride");
  g.padding = to_int(g64.padding, op, "padding");
  g.pool = static_cast<int>(pw.k);
  g.ps = static_cast<int>(pw.s);
  g.pp = static_cast<int>(pw.p);
  g.hc = to_int(g64.hc, op, "H_conv");
  g.wc = to_int(g64.wc, op, "W_conv");
  g.hp = static_cast<int>(hp);
  g.wp = static_cast<int>(wp);
  to_int(g64.c_in * g64.kh * g64.kw, op, "C_in * KH * KW");
  to_int(g64.c_out * g64.kh * g64.kw, op, "C_out * KH * KW");
  return g;
}

at::Tensor acc_vector(const std::optional<at::Tensor>& v, const at::Tensor& ref, int64_t channels, const char* op,
                      const char* name) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  DRMM_CHECK(v->dim() == 1 && v->size(0) == channels && v->device() == ref.device(), op, name, " must be a vector of ",
             channels, " elements on ", ref.device(), ", got shape ", v->sizes(), " on ", v->device());
  return v->to(ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// fp32 follows the cuDNN convolution TF32 switch (torch.backends.cudnn.allow_tf32), like F.conv2d.
bool allow_tf32() { return at::globalContext().allowTF32CuDNN(); }

cudaStream_t stream_for(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

int num_sms(const at::Tensor& t) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.device().index()) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; fall back to the H100 count for the split-K plan only
    sms = 132;
  }
  return sms;
}

std::tuple<at::Tensor, at::Tensor> conv_relu_pool(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& scale,
                                                  const std::optional<at::Tensor>& shift, int64_t stride,
                                                  int64_t padding, int64_t pool, int64_t pool_stride,
                                                  int64_t pool_padding, bool ceil_mode, double negative_slope) {
  const char* op = "conv_relu_pool";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(x, x, op, "x");
  check_4d(weight, x, op, "weight");
  check_same_dtype(op, "weight", weight, "x", x);
  DRMM_CHECK(weight.size(1) == x.size(1), op, "weight ", weight.sizes(), " does not match x ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const auto dt = to_dtype(x, op, "x");
  const auto g = make_geom(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2), weight.size(3),
                           stride, padding, pw, op);
  to_int(static_cast<int64_t>(g.n) * g.hp * g.wp, op, "N * H_pool * W_pool");
  const at::Tensor w = weight.contiguous();
  const at::Tensor sc = acc_vector(scale, x, g.c_out, op, "scale");
  const at::Tensor sh = acc_vector(shift, x, g.c_out, op, "shift");
  at::Tensor y = at::empty({g.n, g.c_out, g.hp, g.wp}, x.options());
  at::Tensor sw = at::empty({g.n, g.c_out, g.hp, g.wp}, x.options().dtype(at::kByte));
  const cudaError_t err =
      dcu::conv_relu_pool(dt, x.data_ptr(), strides4(x), w.data_ptr(), ptr_or_null(sc), ptr_or_null(sh), g,
                          negative_slope, allow_tf32(), y.data_ptr(), sw.data_ptr<uint8_t>(), stream_for(x));
  DRMM_CUDA_CHECK(err, "conv_relu_pool", "x ", x.sizes(), " ", x.scalar_type(), ", weight ", weight.sizes(),
                  ", stride ", stride, ", padding ", padding, ", pool ", pool);
  return {y, sw};
}

std::tuple<at::Tensor, at::Tensor> bn_pool(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                                           int64_t pool, int64_t pool_stride, int64_t pool_padding, bool ceil_mode,
                                           double negative_slope) {
  const char* op = "bn_pool";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(z, z, op, "z");
  const int64_t hp64 = pooled_len(z.size(2), pw), wp64 = pooled_len(z.size(3), pw);
  DRMM_CHECK(z.size(2) >= 1 && z.size(3) >= 1 && hp64 >= 1 && wp64 >= 1, op, "pool ", pool, " (stride ", pool_stride,
             ", padding ", pool_padding, ") does not fit z of shape ", z.sizes());
  c10::cuda::CUDAGuard guard(z.device());
  const auto dt = to_dtype(z, op, "z");
  const int n = to_int(z.size(0), op, "batch"), c = to_int(z.size(1), op, "C");
  const int hc = to_int(z.size(2), op, "H"), wc = to_int(z.size(3), op, "W");
  const at::Tensor sc = acc_vector(scale, z, c, op, "scale");
  const at::Tensor sh = acc_vector(shift, z, c, op, "shift");
  const int hp = static_cast<int>(hp64), wp = static_cast<int>(wp64);
  at::Tensor y = at::empty({n, c, hp, wp}, z.options());
  at::Tensor sw = at::empty({n, c, hp, wp}, z.options().dtype(at::kByte));
  const cudaError_t err =
      dcu::bn_pool(dt, z.data_ptr(), strides4(z), n, c, hc, wc, ptr_or_null(sc), ptr_or_null(sh),
                   static_cast<int>(pool), static_cast<int>(pool_stride), static_cast<int>(pool_padding), hp, wp,
                   negative_slope, y.data_ptr(), sw.data_ptr<uint8_t>(), stream_for(z));
  DRMM_CUDA_CHECK(err, "bn_pool", "z ", z.sizes(), " ", z.scalar_type(), ", pool ", pool);
  return {y, sw};
}

at::Tensor render(const at::Tensor& mu, const at::Tensor& switches, const at::Tensor& weight,
                  const std::optional<at::Tensor>& scale, int64_t stride, int64_t padding, int64_t pool,
                  int64_t pool_stride, int64_t pool_padding, bool ceil_mode, int64_t out_h, int64_t out_w,
                  double negative_slope) {
  const char* op = "render";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(mu, mu, op, "mu");
  check_switches(switches, mu, op);
  check_4d(weight, mu, op, "weight");
  check_same_dtype(op, "weight", weight, "mu", mu);
  DRMM_CHECK(switches.sizes() == mu.sizes() && weight.size(0) == mu.size(1), op, "mu ", mu.sizes(), ", switches ",
             switches.sizes(), " and weight ", weight.sizes(), " do not match");
  c10::cuda::CUDAGuard guard(mu.device());
  const auto dt = to_dtype(mu, op, "mu");
  const auto g = make_geom(mu.size(0), weight.size(1), out_h, out_w, weight.size(0), weight.size(2), weight.size(3),
                           stride, padding, pw, op);
  DRMM_CHECK(g.hp == mu.size(2) && g.wp == mu.size(3), op, "out_size (", out_h, ", ", out_w, ") gives pooled size (",
             g.hp, ", ", g.wp, ") but mu has shape ", mu.sizes());
  to_int(static_cast<int64_t>(g.n) * g.h * g.w, op, "N * H * W");
  const at::Tensor w = weight.contiguous();
  const at::Tensor sc = acc_vector(scale, mu, g.c_out, op, "scale");
  at::Tensor out = at::empty({g.n, g.c_in, g.h, g.w}, mu.options());
  const cudaError_t err =
      dcu::render(dt, mu.data_ptr(), strides4(mu), switches.data_ptr<uint8_t>(), strides4(switches), w.data_ptr(),
                  ptr_or_null(sc), g, negative_slope, allow_tf32(), out.data_ptr(), stream_for(mu));
  DRMM_CUDA_CHECK(err, "render", "mu ", mu.sizes(), " ", mu.scalar_type(), ", weight ", weight.sizes(), ", out_size (",
                  out_h, ", ", out_w, "), stride ", stride, ", padding ", padding, ", pool ", pool);
  return out;
}

at::Tensor gather_conv(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& switches, int64_t stride,
                       int64_t padding, int64_t pool, int64_t pool_stride, int64_t pool_padding, bool ceil_mode) {
  const char* op = "gather_conv";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(src, src, op, "src");
  check_4d(weight, src, op, "weight");
  check_same_dtype(op, "weight", weight, "src", src);
  check_switches(switches, src, op);
  DRMM_CHECK(weight.size(1) == src.size(1) && switches.size(0) == src.size(0) && switches.size(1) == weight.size(0), op,
             "src ", src.sizes(), ", weight ", weight.sizes(), " and switches ", switches.sizes(), " do not match");
  c10::cuda::CUDAGuard guard(src.device());
  const auto dt = to_dtype(src, op, "src");
  const auto g = make_geom(src.size(0), src.size(1), src.size(2), src.size(3), weight.size(0), weight.size(2),
                           weight.size(3), stride, padding, pw, op);
  DRMM_CHECK(g.hp == switches.size(2) && g.wp == switches.size(3), op, "switches has shape ", switches.sizes(),
             " but the conv of src ", src.sizes(), " pools to (", g.hp, ", ", g.wp, ")");
  to_int(static_cast<int64_t>(g.n) * g.hp * g.wp, op, "N * H_pool * W_pool");
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({g.n, g.c_out, g.hp, g.wp}, src.options());
  const cudaError_t err =
      dcu::gather_conv(dt, src.data_ptr(), strides4(src), w.data_ptr(), switches.data_ptr<uint8_t>(),
                       strides4(switches), g, allow_tf32(), out.data_ptr(), stream_for(src));
  DRMM_CUDA_CHECK(err, "gather_conv", "src ", src.sizes(), " ", src.scalar_type(), ", weight ", weight.sizes(),
                  ", switches ", switches.sizes(), ", stride ", stride, ", padding ", padding, ", pool ", pool);
  return out;
}

at::Tensor render_wgrad(const at::Tensor& src, const at::Tensor& mu, const at::Tensor& switches,
                        const std::optional<at::Tensor>& scale, int64_t stride, int64_t padding, int64_t pool,
                        int64_t pool_stride, int64_t pool_padding, bool ceil_mode, double negative_slope,
                        int64_t kernel_h, int64_t kernel_w) {
  const char* op = "render_wgrad";
  const PoolWindow pw = checked_window(op, pool, pool_stride, pool_padding, ceil_mode);
  check_4d(src, src, op, "src");
  check_4d(mu, src, op, "mu");
  check_same_dtype(op, "mu", mu, "src", src);
  check_switches(switches, src, op);
  DRMM_CHECK(switches.sizes() == mu.sizes() && mu.size(0) == src.size(0), op, "src ", src.sizes(), ", mu ", mu.sizes(),
             " and switches ", switches.sizes(), " do not match");
  c10::cuda::CUDAGuard guard(src.device());
  const auto dt = to_dtype(src, op, "src");
  const auto g = make_geom(src.size(0), src.size(1), src.size(2), src.size(3), mu.size(1), kernel_h, kernel_w, stride,
                           padding, pw, op);
  DRMM_CHECK(g.hp == mu.size(2) && g.wp == mu.size(3), op, "mu has shape ", mu.sizes(), " but the conv of src ",
             src.sizes(), " pools to (", g.hp, ", ", g.wp, ")");
  to_int(static_cast<int64_t>(g.n) * pooled_cover(g.hp, g.pool, g.ps, g.pp, g.hc) *
             pooled_cover(g.wp, g.pool, g.ps, g.pp, g.wc),
         op, "N * H_cov * W_cov");
  const at::Tensor sc = acc_vector(scale, src, g.c_out, op, "scale");
  const bool tf32 = allow_tf32();
  const int sms = num_sms(src);
  const int64_t ws_elems = dcu::render_wgrad_workspace_elems(dt, g, tf32, sms);
  at::Tensor ws;
  if (ws_elems > 0)
    ws = at::empty({ws_elems}, src.options().dtype(dt == dcu::DType::kFloat64 ? at::kDouble : at::kFloat));
  at::Tensor dw = at::empty({g.c_out, g.c_in, g.kh, g.kw}, src.options());
  const cudaError_t err =
      dcu::render_wgrad(dt, src.data_ptr(), strides4(src), mu.data_ptr(), strides4(mu), switches.data_ptr<uint8_t>(),
                        strides4(switches), ptr_or_null(sc), g, negative_slope, tf32, sms,
                        ws.defined() ? ws.data_ptr() : nullptr, dw.data_ptr(), stream_for(src));
  DRMM_CUDA_CHECK(err, "render_wgrad", "src ", src.sizes(), " ", src.scalar_type(), ", mu ", mu.sizes(), ", kernel ",
                  kernel_h, "x", kernel_w, ", stride ", stride, ", padding ", padding, ", pool ", pool);
  return dw;
}

#undef DRMM_CUDA_CHECK

}  // namespace cuda_glue
}  // namespace drmm

TORCH_LIBRARY_IMPL(drmm_C, CUDA, m) {
  m.impl("conv_relu_pool", &drmm::cuda_glue::conv_relu_pool);
  m.impl("bn_pool", &drmm::cuda_glue::bn_pool);
  m.impl("render", &drmm::cuda_glue::render);
  m.impl("gather_conv", &drmm::cuda_glue::gather_conv);
  m.impl("render_wgrad", &drmm::cuda_glue::render_wgrad);
}
