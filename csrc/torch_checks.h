// torch_checks.h -- argument checks shared by the CPU extension (cpu_kernels.cpp) and the CUDA
// binding (cuda_binding.cpp). Each check names the argument in its message (TORCH_CHECK).
//
// The contract of every argument is written in fastddpm/backends/__init__.py. These checks cover
// what can be read from tensor metadata alone; the CPU kernels also check index values (rows, t)
// on the host, which the CUDA path cannot do without a device sync (its kernels write NaN for a
// sample whose index is out of range instead).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

#include "fastddpm_math.h"

namespace fastddpm {
namespace checks {

inline bool is_kernel_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// Caller noise may also be float64 (it is read and rounded to float32).
inline void check_noise_dtype(const at::Tensor& t) {
  TORCH_CHECK_VALUE(is_kernel_float(t) || t.scalar_type() == at::kDouble,
                    "noise must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got a tensor on ", t.device());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_VALUE(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_kernel_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(is_kernel_float(t), name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// A [B, N] tensor with unit stride inside a sample (any per-sample stride).
inline void check_rows_view(const at::Tensor& t, const char* name, int64_t B, int64_t N, const at::Device& device) {
  check_device(t, name, device);
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [B, N], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) == B && t.size(1) == N, name, " must have shape [", B, ", ", N, "], got ", t.sizes());
  TORCH_CHECK_VALUE(N <= 1 || t.stride(1) == 1, name,
              " must have stride(1) == 1 (contiguous inside a sample), got strides ", t.strides());
}

// An output [B, N] view that does not overlap itself.
inline void check_output(const at::Tensor& t, const char* name, int64_t B, int64_t N, const at::Device& device) {
  check_rows_view(t, name, B, N, device);
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              " must not overlap itself (per-sample stride >= N), got strides ", t.strides());
}

// A 1-D int64 tensor of length `len` (any stride, 0 included).
inline void check_index_vector(const at::Tensor& t, const char* name, int64_t len, const at::Device& device) {
  check_device(t, name, device);
  check_dtype(t, name, at::kLong);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, name, " must have shape [", len, "], got ", t.sizes());
}

inline void check_rng(const at::Tensor& rng, const at::Device& device) {
  check_device(rng, "rng", device);
  check_dtype(rng, "rng", at::kLong);
  TORCH_CHECK_VALUE(rng.dim() == 1 && rng.size(0) == 2, "rng must have shape [2] (seed, sample_offset), got ",
              rng.sizes());
}

inline void check_noise_mode(int64_t noise_mode) {
  TORCH_CHECK_VALUE(noise_mode == NOISE_NONE || noise_mode == NOISE_TENSOR || noise_mode == NOISE_PHILOX,
              "noise_mode must be NOISE_NONE (0), NOISE_TENSOR (1) or NOISE_PHILOX (2), got ", noise_mode);
}

// What the step kernels need to know after the checks.
struct StepPlan {
  int64_t B = 0, N = 0, R = 0;
  int clip_mode = CLIP_NONE;  // CLIP_THRESHOLD is dropped in x0_only mode
  bool learned = false;       // read v (only used where noise is added)
  bool noise_tensor = false;  // read noise
  bool noise_philox = false;  // make noise
  bool use_thresh = false;    // read thresh
};

// Checks every argument of `step` (see fastddpm/backends/__init__.py) for tensors on `device`.
inline StepPlan check_step_args(const at::Tensor& x, const at::Tensor& m, const std::optional<at::Tensor>& v,
                                const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& prev_out,
                                const std::optional<at::Tensor>& x0_out, const at::Tensor& coef,
                                const at::Tensor& tval, const at::Tensor& rows, const std::optional<at::Tensor>& thresh,
                                const at::Tensor& rng, int64_t clip_mode, int64_t var_mode, int64_t noise_mode,
                                bool x0_only) {
  TORCH_CHECK_VALUE(clip_mode == CLIP_NONE || clip_mode == CLIP_RANGE || clip_mode == CLIP_THRESHOLD,
              "clip_mode must be CLIP_NONE (0), CLIP_RANGE (1) or CLIP_THRESHOLD (2), got ", clip_mode);
  TORCH_CHECK_VALUE(var_mode == VAR_FIXED || var_mode == VAR_LEARNED, "var_mode must be VAR_FIXED (0) or VAR_LEARNED (1), got ",
              var_mode);
  check_noise_mode(noise_mode);

  TORCH_CHECK_VALUE(x.defined(), "x must be a tensor, got an undefined tensor");
  const at::Device device = x.device();
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [B, N], got shape ", x.sizes());
  check_kernel_float(x, "x");
  StepPlan plan;
  plan.B = x.size(0);
  plan.N = x.size(1);
  const int64_t B = plan.B, N = plan.N;
  check_rows_view(x, "x", B, N, device);
  check_rows_view(m, "m", B, N, device);
  check_dtype(m, "m", x.scalar_type());

  // In x0_only mode only x, m and x0_out are used: threshold clipping belongs to the second pass.
  plan.clip_mode = x0_only && clip_mode == CLIP_THRESHOLD ? CLIP_NONE : static_cast<int>(clip_mode);
  plan.learned = !x0_only && var_mode == VAR_LEARNED && noise_mode != NOISE_NONE;
  plan.noise_tensor = !x0_only && noise_mode == NOISE_TENSOR;
  plan.noise_philox = !x0_only && noise_mode == NOISE_PHILOX;
  plan.use_thresh = !x0_only && plan.clip_mode == CLIP_THRESHOLD;

  if (plan.learned) {
    TORCH_CHECK_VALUE(v.has_value(),
                      "v (the learned-variance channels) is required when var_mode == VAR_LEARNED and noise is added");
    check_rows_view(*v, "v", B, N, device);
    check_dtype(*v, "v", x.scalar_type());
  }
  if (plan.noise_tensor) {
    TORCH_CHECK_VALUE(noise.has_value(), "noise is required when noise_mode == NOISE_TENSOR");
    check_rows_view(*noise, "noise", B, N, device);
    check_noise_dtype(*noise);
  }
  if (x0_only) {
    TORCH_CHECK_VALUE(x0_out.has_value(), "x0_out is required when x0_only is set");
    check_output(*x0_out, "x0_out", B, N, device);
    check_dtype(*x0_out, "x0_out", at::kFloat);
  } else {
    TORCH_CHECK_VALUE(prev_out.has_value(), "prev_out is required unless x0_only is set");
    check_output(*prev_out, "prev_out", B, N, device);
    check_dtype(*prev_out, "prev_out", x.scalar_type());
    if (x0_out.has_value()) {
      check_output(*x0_out, "x0_out", B, N, device);
      check_dtype(*x0_out, "x0_out", x.scalar_type());
    }
  }

  check_device(coef, "coef", device);
  check_dtype(coef, "coef", at::kFloat);
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(1) == NCOEF && coef.is_contiguous(), "coef must be a contiguous [R, ",
              static_cast<int>(NCOEF), "] float32 table, got shape ", coef.sizes(), " strides ", coef.strides());
  plan.R = coef.size(0);
  check_index_vector(tval, "tval", plan.R, device);
  check_index_vector(rows, "rows", B, device);
  if (plan.use_thresh) {
    TORCH_CHECK_VALUE(thresh.has_value(), "thresh is required when clip_mode == CLIP_THRESHOLD");
    check_device(*thresh, "thresh", device);
    check_dtype(*thresh, "thresh", at::kFloat);
    TORCH_CHECK_VALUE(thresh->dim() == 1 && thresh->size(0) == B, "thresh must have shape [", B, "], got ",
                thresh->sizes());
  }
  check_rng(rng, device);
  return plan;
}

// Checks every argument of `q_sample`; returns {B, N}.
inline std::pair<int64_t, int64_t> check_q_sample_args(const at::Tensor& x0, const std::optional<at::Tensor>& noise,
                                                       const at::Tensor& out, const at::Tensor& table,
                                                       const at::Tensor& t, const at::Tensor& rng,
                                                       int64_t noise_mode) {
  check_noise_mode(noise_mode);
  TORCH_CHECK_VALUE(x0.defined(), "x0 must be a tensor, got an undefined tensor");
  const at::Device device = x0.device();
  TORCH_CHECK_VALUE(x0.dim() == 2, "x0 must be 2-D [B, N], got shape ", x0.sizes());
  check_kernel_float(x0, "x0");
  const int64_t B = x0.size(0), N = x0.size(1);
  check_rows_view(x0, "x0", B, N, device);
  check_output(out, "out", B, N, device);
  check_dtype(out, "out", x0.scalar_type());
  if (noise_mode == NOISE_TENSOR) {
    TORCH_CHECK_VALUE(noise.has_value(), "noise is required when noise_mode == NOISE_TENSOR");
    check_rows_view(*noise, "noise", B, N, device);
    check_noise_dtype(*noise);
  }
  check_device(table, "table", device);
  check_dtype(table, "table", at::kFloat);
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == QS_NCOL && table.is_contiguous(),
              "table must be a contiguous [T, 2] float32 tensor (sqrt(abar), sqrt(1 - abar)), got shape ",
              table.sizes(), " strides ", table.strides());
  check_index_vector(t, "t", B, device);
  check_rng(rng, device);
  return {B, N};
}

// Checks every argument of `randn`; returns {B, N}.
inline std::pair<int64_t, int64_t> check_randn_args(const at::Tensor& out, const at::Tensor& t, const at::Tensor& rng,
                                                    int64_t stream) {
  TORCH_CHECK_VALUE(stream == STREAM_STEP || stream == STREAM_QSAMPLE || stream == STREAM_INIT,
              "stream must be STREAM_STEP (0), STREAM_QSAMPLE (1) or STREAM_INIT (2), got ", stream);
  TORCH_CHECK_VALUE(out.defined(), "out must be a tensor, got an undefined tensor");
  const at::Device device = out.device();
  TORCH_CHECK_VALUE(out.dim() == 2, "out must be 2-D [B, N], got shape ", out.sizes());
  TORCH_CHECK_VALUE(is_kernel_float(out) || out.scalar_type() == at::kDouble,
              "out must be float32, float16, bfloat16 or float64, got ", out.scalar_type());
  const int64_t B = out.size(0), N = out.size(1);
  check_output(out, "out", B, N, device);
  check_index_vector(t, "t", B, device);
  check_rng(rng, device);
  return {B, N};
}

}  // namespace checks
}  // namespace fastddpm
