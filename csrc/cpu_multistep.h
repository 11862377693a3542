// cpu_multistep.h -- declaration of the fused multistep-solver step for CPU tensors (cpu_multistep.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastddpm {
namespace cpu {

// One step of a multistep solver (DPM-Solver++ 2M/3M/2M-SDE, UniPC) on [B, N] views; see
// fastddpm/backends/__init__.py for every argument and fastddpm/_layout.py (MS_*) for the math.
// Updates x, xp and the ring hist[3, B, N] in place; with x0_only writes only x0_out.
void multistep(const at::Tensor& x, const at::Tensor& m, const std::optional<at::Tensor>& xp,
               const std::optional<at::Tensor>& hist, const std::optional<at::Tensor>& noise,
               const std::optional<at::Tensor>& x0_out, const at::Tensor& coef, const at::Tensor& tval,
               const at::Tensor& step, const std::optional<at::Tensor>& thresh, const at::Tensor& rng,
               int64_t clip_mode, double clip_range, int64_t noise_mode, bool x0_only);

}  // namespace cpu
}  // namespace fastddpm
