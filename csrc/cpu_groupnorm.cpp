// cpu_groupnorm.cpp -- silu(group_norm(x + add)) for float32 CPU tensors, the U-Net's res-block
// normalisation (fastddpm.unet._norm_act), in two passes over x instead of PyTorch's three ops.
//
// Layouts: NCHW-contiguous or channels_last (NHWC) [B, C, *spatial]; y gets x's layout.
// Pass 1 (statistics): per (sample, channel) sums of d = h - K and d^2 over the S spatial positions,
//   where h = x + add[b, c] and K is one element of the group (its first, in h): the shifted-data
//   algorithm, so E[d^2] - E[d]^2 does not cancel catastrophically when |mean| >> std. All sums are
//   in double (d too: a float x - K could overflow): NCHW rows in 8 lanes (vectorised, no
//   reassociation needed), NHWC over every channel of a position at once (vectorised across
//   channels). The group's mean and variance are formed in double from its channels' sums.
// Pass 2 (apply): y = silu((x - center[c]) * scale[c] + bias[c]) with center = mean - add[b, c] and
//   scale = rstd * weight[c] (subtracting first keeps the rounding of PyTorch's (h - mean) * rstd form);
//   SiLU through the polynomial exp of fastddpm_math.h, so the loop vectorises.
// Bytes per element: reads x twice, writes y once: 12 (PyTorch's add + group_norm + silu: ~24).
// Threads: torch's intra-op pool, over (sample, slice of positions) (NHWC) or (sample, channel) rows (NCHW).

#include "cpu_groupnorm.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fastddpm_math.h"

namespace fastddpm {
namespace cpu {
namespace {

constexpr int64_t LANES = 8;

FDDPM_INLINE float silu_f32(float v) { return v / (1.0f + exp_f32(-v)); }

// Sum and sum of squares of (p[i] - shift) over n contiguous floats, in 8 double lanes (vectorised;
// double because a pivot far from the group mean leaves E[d^2] - E[d]^2 to cancel).
void row_sums(const float* p, int64_t n, double shift, double& sum, double& sq) {
  double ls[LANES] = {0}, lq[LANES] = {0};
  const double k = shift;
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    for (int64_t j = 0; j < LANES; ++j) {
      const double v = static_cast<double>(p[i + j]) - k;
      ls[j] += v;
      lq[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(p[i]) - k;
    ls[0] += v;
    lq[0] += v * v;
  }
  double s = 0.0, q = 0.0;
  for (int64_t j = 0; j < LANES; ++j) {
    s += ls[j];
    q += lq[j];
  }
  sum = s;
  sq = q;
}

// Per-channel constants of the apply pass: y = (x - center) * scale + beta.
struct Affine {
  float center, scale, beta;
};

void apply_row(const float* x, float* y, int64_t n, const Affine& f, bool silu) {
  // NCHW: one channel, n positions.
  const float m = f.center, a = f.scale, b = f.beta;
  if (silu) {
    for (int64_t i = 0; i < n; ++i) y[i] = silu_f32((x[i] - m) * a + b);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * a + b;
  }
}

void apply_pixel(const float* x, float* y, int64_t C, const float* center, const float* scale, const float* beta,
                 bool silu) {
  // NHWC: one position, all C channels contiguous.
  if (silu) {
    for (int64_t c = 0; c < C; ++c) y[c] = silu_f32((x[c] - center[c]) * scale[c] + beta[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - center[c]) * scale[c] + beta[c];
  }
}

// Per-channel pivot d[c] = K_g - add[c] of sample b, K_g = h at the group's first element
// (channel c0 = g * cpg, position 0, whose x is first_x[g]): x - d[c] = h - K_g.
void channel_pivots(int64_t C, int64_t G, const float* first_x, const float* add, double* pivot_h, double* d) {
  const int64_t cpg = C / G;
  for (int64_t g = 0; g < G; ++g) {
    const double k = static_cast<double>(first_x[g]) + (add ? add[g * cpg] : 0.0);
    pivot_h[g] = k;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) d[c] = k - (add ? add[c] : 0.0);
  }
}

// Per-channel (center, scale, beta) of sample b from its per-channel sums of h - K_g.
void channel_affine(int64_t C, int64_t G, int64_t S, double eps, const double* sum, const double* sq,
                    const double* pivot_h, const float* add, const float* weight, const float* bias, float* center,
                    float* scale, float* beta) {
  const int64_t cpg = C / G;
  const double count = static_cast<double>(cpg * S);
  for (int64_t g = 0; g < G; ++g) {
    double sd = 0.0, sd2 = 0.0;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      sd += sum[c];
      sd2 += sq[c];
    }
    const double md = sd / count;
    const double mean = pivot_h[g] + md;
    const double var = std::max(sd2 / count - md * md, 0.0);
    const double rstd = 1.0 / std::sqrt(var + eps);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      center[c] = static_cast<float>(mean - (add ? add[c] : 0.0));
      scale[c] = static_cast<float>(rstd * (weight ? weight[c] : 1.0));
      beta[c] = bias ? bias[c] : 0.0f;
    }
  }
}

const float* opt_ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

}  // namespace

at::Tensor group_norm_silu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                           const std::optional<at::Tensor>& add, bool silu) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must be [B, C, *spatial], got ", x.dim(), " dims");
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(num_groups > 0 && C % num_groups == 0, "num_groups (", num_groups, ") must divide C (", C, ")");
  const bool nhwc = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(nhwc || x.is_contiguous(), "x must be contiguous or channels_last");
  for (const auto* p : {&weight, &bias}) {
    if (*p) {
      TORCH_CHECK_VALUE((*p)->scalar_type() == at::kFloat && (*p)->is_contiguous() && (*p)->dim() == 1 &&
                            (*p)->size(0) == C,
                        "weight and bias must be contiguous float32 [C]");
      TORCH_CHECK_VALUE((*p)->device().is_cpu(), "weight and bias must be CPU tensors");
    }
  }
  if (add) {
    TORCH_CHECK_VALUE(add->scalar_type() == at::kFloat && add->is_contiguous() && add->dim() == 2 &&
                          add->size(0) == B && add->size(1) == C,
                      "add must be a contiguous float32 [B, C] tensor");
    TORCH_CHECK_VALUE(add->device().is_cpu(), "add must be a CPU tensor");
  }
  at::Tensor y = at::empty_like(x);  // same layout as x
  if (x.numel() == 0) return y;
  const int64_t S = x.numel() / (B * C);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* wp = opt_ptr(weight);
  const float* bp = opt_ptr(bias);
  const float* ap = opt_ptr(add);
  const int64_t G = num_groups;

  // Per (sample, channel) sums of d = x - dshift = h - pivot, then per-channel (center, scale, beta).
  std::vector<double> sum(B * C), sq(B * C), pivot(B * G), dshift(B * C);
  std::vector<float> center(B * C), scale(B * C), beta(B * C);
  const int64_t cpg = C / G;
  // The pivot of group g is h at (b, g * cpg, position 0).
  const int64_t first_stride = nhwc ? 1 : S;  // distance between channels at position 0
  std::vector<float> first(G);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) first[g] = xp[b * C * S + g * cpg * first_stride];
    channel_pivots(C, G, first.data(), ap ? ap + b * C : nullptr, pivot.data() + b * G, dshift.data() + b * C);
  }

  // Pass 1. NHWC: element (b, c, s) at ((b * S) + s) * C + c. The positions of each sample are cut into K
  // slices (enough work items for every thread even at batch 1); each slice sums all channels of its
  // positions into its own row of partial sums, added per sample afterwards. NCHW: element (b, c, s) at
  // (b * C + c) * S + s, rows of S contiguous positions.
  const int64_t per_slice = std::max<int64_t>(1, std::min<int64_t>(S, 4096 / std::max<int64_t>(C, 1)));
  const int64_t K = (S + per_slice - 1) / per_slice;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1));
  if (nhwc) {
    std::vector<double> psum(B * K * C), psq(B * K * C);
    at::parallel_for(0, B * K, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t b = item / K, k = item % K;
        const double* db = dshift.data() + b * C;
        double* ps = psum.data() + item * C;
        double* pq = psq.data() + item * C;
        std::fill(ps, ps + C, 0.0);
        std::fill(pq, pq + C, 0.0);
        const int64_t s_end = std::min(S, (k + 1) * per_slice);
        for (int64_t s = k * per_slice; s < s_end; ++s) {
          const float* row = xp + (b * S + s) * C;
          for (int64_t c = 0; c < C; ++c) {
            const double v = static_cast<double>(row[c]) - db[c];
            ps[c] += v;
            pq[c] += v * v;
          }
        }
      }
    });
    for (int64_t item = 0; item < B * K; ++item) {
      const int64_t b = item / K;
      for (int64_t c = 0; c < C; ++c) {
        sum[b * C + c] += psum[item * C + c];
        sq[b * C + c] += psq[item * C + c];
      }
    }
  } else {
    at::parallel_for(0, B * C, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) row_sums(xp + r * S, S, dshift[r], sum[r], sq[r]);
    });
  }
  for (int64_t b = 0; b < B; ++b) {
    channel_affine(C, G, S, eps, sum.data() + b * C, sq.data() + b * C, pivot.data() + b * G,
                   ap ? ap + b * C : nullptr, wp, bp, center.data() + b * C, scale.data() + b * C,
                   beta.data() + b * C);
  }

  // Pass 2.
  if (nhwc) {
    at::parallel_for(0, B * K, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t b = item / K, k = item % K;
        const int64_t s_end = std::min(S, (k + 1) * per_slice);
        for (int64_t s = k * per_slice; s < s_end; ++s) {
          apply_pixel(xp + (b * S + s) * C, yp + (b * S + s) * C, C, center.data() + b * C, scale.data() + b * C,
                      beta.data() + b * C, silu);
        }
      }
    });
  } else {
    at::parallel_for(0, B * C, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) apply_row(xp + r * S, yp + r * S, S, {center[r], scale[r], beta[r]}, silu);
    });
  }
  return y;
}

}  // namespace cpu
}  // namespace fastddpm
