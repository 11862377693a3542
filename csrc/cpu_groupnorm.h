// cpu_groupnorm.h -- declaration of the fused CPU GroupNorm (+ time-embedding add) (+ SiLU).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastddpm {
namespace cpu {

// y = silu(group_norm(x + add[:, :, None, None], num_groups, weight, bias, eps)) (add, silu optional).
// x: float32 [B, C, *spatial], contiguous or channels_last; weight, bias: float32 [C]; add: float32
// contiguous [B, C]. Returns y in x's layout. Statistics in double from float partial sums.
at::Tensor group_norm_silu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                           const std::optional<at::Tensor>& add, bool silu);

}  // namespace cpu
}  // namespace fastddpm
