// cuda_binding.cpp -- thin torch binding of the CUDA kernels: checks the arguments
// (torch_checks.h), fills the plain C parameter structs of cuda_kernels.h and launches on the
// current CUDA stream. Index tensors (rows, tval, t) and rng are only passed as device pointers:
// nothing here reads device memory, so every op is safe inside CUDA-graph capture.
//
// Built on first use by fastddpm/_build.py together with cuda_kernels.cu.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include "cuda_kernels.h"
#include "cuda_multistep.h"
#include "fastddpm_math.h"
#include "fastddpm_multistep.h"
#include "torch_checks.h"

namespace fastddpm {
namespace cuda_binding {
namespace {

int kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FDDPM_FLOAT32;
    case at::kHalf:
      return FDDPM_FLOAT16;
    case at::kBFloat16:
      return FDDPM_BFLOAT16;
    case at::kDouble:
      return FDDPM_FLOAT64;
    default:
      TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got one on ", t.device());
}

// Per-sample stride of a [B, N] view (any value when B == 1).
int64_t sample_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : 0; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastddpm ", op, " kernel launch failed: ", cudaGetErrorString(err));
}

void step(const at::Tensor& x, const at::Tensor& m, const std::optional<at::Tensor>& v,
          const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& prev_out,
          const std::optional<at::Tensor>& x0_out, const at::Tensor& coef, const at::Tensor& tval,
          const at::Tensor& rows, const std::optional<at::Tensor>& thresh, const at::Tensor& rng, int64_t clip_mode,
          double clip_range, int64_t var_mode, int64_t noise_mode, bool x0_only) {
  check_on_cuda(x, "x");
  const checks::StepPlan plan = checks::check_step_args(x, m, v, noise, prev_out, x0_out, coef, tval, rows, thresh,
                                                        rng, clip_mode, var_mode, noise_mode, x0_only);
  if (plan.B == 0 || plan.N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());

  fddpm_step_params p{};
  p.x = x.data_ptr();
  p.x_stride = sample_stride(x);
  p.m = m.data_ptr();
  p.m_stride = sample_stride(m);
  if (plan.learned) {
    p.v = v->data_ptr();
    p.v_stride = sample_stride(*v);
  }
  if (plan.noise_tensor) {
    p.noise = noise->data_ptr();
    p.noise_stride = sample_stride(*noise);
    p.noise_dtype = kernel_dtype(*noise);
  }
  if (!x0_only) {
    p.prev = prev_out->data_ptr();
    p.prev_stride = sample_stride(*prev_out);
  }
  if (x0_out.has_value()) {
    p.x0 = x0_out->data_ptr();
    p.x0_stride = sample_stride(*x0_out);
  }
  p.coef = coef.data_ptr<float>();
  p.tval = tval.data_ptr<int64_t>();
  p.tval_stride = tval.stride(0);
  p.rows = rows.data_ptr<int64_t>();
  p.rows_stride = rows.stride(0);
  if (plan.use_thresh) {
    p.thresh = thresh->data_ptr<float>();
    p.thresh_stride = thresh->stride(0);
  }
  p.rng = rng.data_ptr<int64_t>();
  p.rng_stride = rng.stride(0);
  p.batch = plan.B;
  p.numel = plan.N;
  p.num_rows = plan.R;
  p.dtype = kernel_dtype(x);
  p.clip_mode = static_cast<int>(clip_mode);
  p.clip_range = static_cast<float>(clip_range);
  p.var_mode = static_cast<int>(var_mode);
  p.noise_mode = static_cast<int>(noise_mode);
  p.x0_only = x0_only ? 1 : 0;
  check_launch(fddpm_step_cuda(&p, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()), "step");
}

void q_sample(const at::Tensor& x0, const std::optional<at::Tensor>& noise, const at::Tensor& out,
              const at::Tensor& table, const at::Tensor& t, const at::Tensor& rng, int64_t noise_mode) {
  check_on_cuda(x0, "x0");
  const auto shape = checks::check_q_sample_args(x0, noise, out, table, t, rng, noise_mode);
  if (shape.first == 0 || shape.second == 0) return;
  const c10::cuda::CUDAGuard guard(x0.device());

  fddpm_q_sample_params p{};
  p.x0 = x0.data_ptr();
  p.x0_stride = sample_stride(x0);
  if (noise_mode == NOISE_TENSOR) {
    p.noise = noise->data_ptr();
    p.noise_stride = sample_stride(*noise);
    p.noise_dtype = kernel_dtype(*noise);
  }
  p.out = out.data_ptr();
  p.out_stride = sample_stride(out);
  p.table = table.data_ptr<float>();
  p.num_timesteps = table.size(0);
  p.t = t.data_ptr<int64_t>();
  p.t_stride = t.stride(0);
  p.rng = rng.data_ptr<int64_t>();
  p.rng_stride = rng.stride(0);
  p.batch = shape.first;
  p.numel = shape.second;
  p.dtype = kernel_dtype(x0);
  p.noise_mode = static_cast<int>(noise_mode);
  check_launch(fddpm_q_sample_cuda(&p, c10::cuda::getCurrentCUDAStream(x0.device().index()).stream()), "q_sample");
}

void randn(const at::Tensor& out, const at::Tensor& t, const at::Tensor& rng, int64_t stream) {
  check_on_cuda(out, "out");
  const auto shape = checks::check_randn_args(out, t, rng, stream);
  if (shape.first == 0 || shape.second == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());

  fddpm_randn_params p{};
  p.out = out.data_ptr();
  p.out_stride = sample_stride(out);
  p.t = t.data_ptr<int64_t>();
  p.t_stride = t.stride(0);
  p.rng = rng.data_ptr<int64_t>();
  p.rng_stride = rng.stride(0);
  p.batch = shape.first;
  p.numel = shape.second;
  p.dtype = kernel_dtype(out);
  p.stream = static_cast<int>(stream);
  check_launch(fddpm_randn_cuda(&p, c10::cuda::getCurrentCUDAStream(out.device().index()).stream()), "randn");
}

// The fused multistep-solver step (cuda_multistep.cu); see fastddpm/backends/__init__.py for the arguments.
// Metadata checks only: the step counter is read by the kernel (out of range -> NaN outputs).
void multistep(const at::Tensor& x, const at::Tensor& m, const std::optional<at::Tensor>& xp,
               const std::optional<at::Tensor>& hist, const std::optional<at::Tensor>& noise,
               const std::optional<at::Tensor>& x0_out, const at::Tensor& coef, const at::Tensor& tval,
               const at::Tensor& step, const std::optional<at::Tensor>& thresh, const at::Tensor& rng,
               int64_t clip_mode, double clip_range, int64_t noise_mode, bool x0_only) {
  check_on_cuda(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be a [B, N] view, got shape ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1);
  const at::Device dev = x.device();
  checks::check_rows_view(x, "x", B, N, dev);
  checks::check_dtype(x, "x", at::kFloat);
  checks::check_rows_view(m, "m", B, N, dev);
  checks::check_kernel_float(m, "m");
  checks::check_device(coef, "coef", dev);
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(1) == NMS && coef.scalar_type() == at::kFloat && coef.is_contiguous(),
                    "coef must be a contiguous float32 [S, ", static_cast<int>(NMS), "] table, got ", coef.sizes());
  checks::check_device(tval, "tval", dev);
  TORCH_CHECK_VALUE(tval.dim() == 1 && tval.size(0) == coef.size(0) && tval.scalar_type() == at::kLong,
                    "tval must be int64 [S], got ", tval.sizes());
  checks::check_device(step, "step", dev);
  TORCH_CHECK_VALUE(step.numel() == 1 && step.scalar_type() == at::kLong, "step must be int64 [1]");
  checks::check_device(rng, "rng", dev);
  TORCH_CHECK_VALUE(rng.dim() == 1 && rng.size(0) == 2 && rng.scalar_type() == at::kLong, "rng must be int64 [2]");
  TORCH_CHECK_VALUE(clip_mode >= CLIP_NONE && clip_mode <= CLIP_THRESHOLD, "clip_mode must be a CLIP_* value");
  TORCH_CHECK_VALUE(noise_mode >= NOISE_NONE && noise_mode <= NOISE_PHILOX, "noise_mode must be a NOISE_* value");
  fddpm_multistep_params p{};
  if (x0_only) {
    TORCH_CHECK_VALUE(x0_out.has_value(), "x0_only needs x0_out (float32)");
    checks::check_output(*x0_out, "x0_out", B, N, dev);
    checks::check_dtype(*x0_out, "x0_out", at::kFloat);
    p.x0 = x0_out->data_ptr<float>();
    p.x0_stride = sample_stride(*x0_out);
  } else {
    TORCH_CHECK_VALUE(xp.has_value() && hist.has_value(), "xp and hist are required unless x0_only");
    checks::check_output(*xp, "xp", B, N, dev);
    checks::check_dtype(*xp, "xp", at::kFloat);
    const at::Tensor& h = *hist;
    checks::check_device(h, "hist", dev);
    TORCH_CHECK_VALUE(h.dim() == 3 && h.size(0) == MS_HIST && h.size(1) == B && h.size(2) == N &&
                          h.scalar_type() == at::kFloat && (N <= 1 || h.stride(2) == 1),
                      "hist must be a float32 [3, B, N] ring with unit inner stride, got ", h.sizes());
    p.xp = xp->data_ptr<float>();
    p.xp_stride = sample_stride(*xp);
    p.hist = h.data_ptr<float>();
    p.hist_slot_stride = h.stride(0);
    p.hist_stride = B > 1 ? h.stride(1) : 0;
    if (noise_mode == NOISE_TENSOR) {
      TORCH_CHECK_VALUE(noise.has_value(), "noise_mode NOISE_TENSOR needs a noise tensor");
      checks::check_rows_view(*noise, "noise", B, N, dev);
      checks::check_noise_dtype(*noise);
      p.noise = noise->data_ptr();
      p.noise_stride = sample_stride(*noise);
      p.noise_dtype = kernel_dtype(*noise);
    }
    if (clip_mode == CLIP_THRESHOLD) {
      TORCH_CHECK_VALUE(thresh.has_value(), "clip_mode CLIP_THRESHOLD needs thresh");
      checks::check_device(*thresh, "thresh", dev);
      TORCH_CHECK_VALUE(thresh->dim() == 1 && thresh->size(0) == B && thresh->scalar_type() == at::kFloat,
                        "thresh must be float32 [B]");
      p.thresh = thresh->data_ptr<float>();
      p.thresh_stride = thresh->stride(0);
    }
  }
  if (B == 0 || N == 0) return;
  const c10::cuda::CUDAGuard guard(dev);
  p.x = x.data_ptr<float>();
  p.x_stride = sample_stride(x);
  p.m = m.data_ptr();
  p.m_stride = sample_stride(m);
  p.m_dtype = kernel_dtype(m);
  p.coef = coef.data_ptr<float>();
  p.tval = tval.data_ptr<int64_t>();
  p.tval_stride = tval.stride(0);
  p.step = step.data_ptr<int64_t>();
  p.rng = rng.data_ptr<int64_t>();
  p.rng_stride = rng.stride(0);
  p.batch = B;
  p.numel = N;
  p.num_rows = coef.size(0);
  p.clip_mode = static_cast<int>(clip_mode);
  p.clip_range = static_cast<float>(clip_range);
  p.noise_mode = static_cast<int>(noise_mode);
  p.x0_only = x0_only ? 1 : 0;
  check_launch(fddpm_multistep_cuda(&p, c10::cuda::getCurrentCUDAStream(dev.index()).stream()), "multistep");
}

}  // namespace
}  // namespace cuda_binding
}  // namespace fastddpm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.doc() = "fastddpm CUDA kernels: fused DDPM/DDIM step, q_sample and counter-based randn";
  module.def("step", &fastddpm::cuda_binding::step, "Fused DDPM/DDIM step on [B, N] CUDA tensors", py::arg("x"),
             py::arg("m"), py::arg("v"), py::arg("noise"), py::arg("prev_out"), py::arg("x0_out"), py::arg("coef"),
             py::arg("tval"), py::arg("rows"), py::arg("thresh"), py::arg("rng"), py::kw_only(), py::arg("clip_mode"),
             py::arg("clip_range"), py::arg("var_mode"), py::arg("noise_mode"), py::arg("x0_only"));
  module.def("q_sample", &fastddpm::cuda_binding::q_sample, "x_t = QA[t] * x0 + QB[t] * z on [B, N] CUDA tensors",
             py::arg("x0"), py::arg("noise"), py::arg("out"), py::arg("table"), py::arg("t"), py::arg("rng"),
             py::kw_only(), py::arg("noise_mode"));
  module.def("randn", &fastddpm::cuda_binding::randn, "Counter-based standard normals into a [B, N] CUDA tensor",
             py::arg("out"), py::arg("t"), py::arg("rng"), py::kw_only(), py::arg("stream"));
  module.def("multistep", &fastddpm::cuda_binding::multistep, "Fused multistep-solver step on [B, N] CUDA tensors",
             py::arg("x"), py::arg("m"), py::arg("xp"), py::arg("hist"), py::arg("noise"), py::arg("x0_out"),
             py::arg("coef"), py::arg("tval"), py::arg("step"), py::arg("thresh"), py::arg("rng"), py::kw_only(),
             py::arg("clip_mode"), py::arg("clip_range"), py::arg("noise_mode"), py::arg("x0_only"));
}
