// cpu_multistep.cpp -- the fused multistep-solver step (DPM-Solver++ 2M/3M/2M-SDE, UniPC) for CPU
// tensors, one pass per step: D0 from the model output, clipping / thresholding, UniPC's corrector,
// the solver update, the SDE noise and the history update.
//
// Built into the CPU extension by fastddpm/_build.py (with -ffp-contract=off: the products and sums
// are rounded one by one, as in the reference backend and the Triton kernel, so all give the same
// bits). The per-element math is fastddpm_multistep.h (shared with the CUDA kernel), the noise the
// Philox / Box-Muller of fastddpm_math.h with stream STREAM_SDE.
//
// Work decomposition as cpu_kernels.cpp: [B, N] views, each sample split into chunks of CHUNK
// elements, chunks spread over torch's intra-op threads. Bytes per element (fp32): read x, m, xp,
// D1..D3 (24), write x, xp, D0 (12).

#include "cpu_multistep.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "fastddpm_multistep.h"

namespace fastddpm {
namespace cpu {
namespace {

constexpr int64_t CHUNK = 256;  // elements per work item (a multiple of 4: whole Philox groups)
constexpr int64_t GRAIN = 64;   // work items per parallel task

// Elements [e, e + n) of sample b of a [B, N] view as float: the tensor itself for float32,
// else converted into buf.
const float* load_lanes(const at::Tensor& t, int64_t b, int64_t e, int64_t n, float* buf) {
  const int64_t off = b * t.stride(0) + e;
  switch (t.scalar_type()) {
    case at::kFloat:
      return t.data_ptr<float>() + off;
    case at::kHalf: {
      const c10::Half* p = t.data_ptr<c10::Half>() + off;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
      return buf;
    }
    case at::kBFloat16: {
      const c10::BFloat16* p = t.data_ptr<c10::BFloat16>() + off;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
      return buf;
    }
    case at::kDouble: {
      const double* p = t.data_ptr<double>() + off;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
      return buf;
    }
    default:
      TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

// The per-chunk update, specialised on the clip mode and on whether noise is added. Pointers are
// copied into locals so the compiler sees plain arrays; d3 and d0_out are the same slot (read
// before written, element by element).
template <int CLIP, bool NOISE>
void update_chunk(const MultistepCoef& coef, float* x, const float* m, float* xp, const float* d1, const float* d2,
                  float* d3_d0, const float* z, int64_t n, float clip_range, float s) {
  const MultistepCoef c = coef;
  for (int64_t i = 0; i < n; ++i) {
    float d0 = multistep_d0(c, x[i], m[i], CLIP, clip_range);
    if (CLIP == CLIP_THRESHOLD) d0 = multistep_threshold(d0, s);
    float xc, xn;
    multistep_update(c, x[i], xp[i], d0, d1[i], d2[i], d3_d0[i], xc, xn);
    if (NOISE) xn = multistep_add_noise(c, xn, z[i]);
    d3_d0[i] = d0;
    xp[i] = xc;
    x[i] = xn;
  }
}

using ChunkFn = void (*)(const MultistepCoef&, float*, const float*, float*, const float*, const float*, float*,
                         const float*, int64_t, float, float);

template <int CLIP>
ChunkFn pick(bool noise) {
  return noise ? &update_chunk<CLIP, true> : &update_chunk<CLIP, false>;
}

ChunkFn pick(int clip_mode, bool noise) {
  switch (clip_mode) {
    case CLIP_RANGE:
      return pick<CLIP_RANGE>(noise);
    case CLIP_THRESHOLD:
      return pick<CLIP_THRESHOLD>(noise);
    default:
      return pick<CLIP_NONE>(noise);
  }
}

void check_cpu_view(const at::Tensor& t, const char* name, int64_t B, int64_t N, bool f32_only) {
  TORCH_CHECK_VALUE(t.defined() && t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == N, name, " must have shape [", B, ", ", N,
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(N <= 1 || t.stride(1) == 1, name, " must have unit stride inside a sample, got ", t.strides());
  const auto s = t.scalar_type();
  if (f32_only) {
    TORCH_CHECK_VALUE(s == at::kFloat, name, " must be float32, got ", s);
  } else {
    TORCH_CHECK_VALUE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
                      " must be a float tensor, got ", s);
  }
}

}  // namespace

void multistep(const at::Tensor& x, const at::Tensor& m, const std::optional<at::Tensor>& xp,
               const std::optional<at::Tensor>& hist, const std::optional<at::Tensor>& noise,
               const std::optional<at::Tensor>& x0_out, const at::Tensor& coef, const at::Tensor& tval,
               const at::Tensor& step, const std::optional<at::Tensor>& thresh, const at::Tensor& rng,
               int64_t clip_mode, double clip_range, int64_t noise_mode, bool x0_only) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 2, "x must be a [B, N] view");
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(clip_mode == CLIP_NONE || clip_mode == CLIP_RANGE || clip_mode == CLIP_THRESHOLD,
                    "clip_mode must be CLIP_NONE, CLIP_RANGE or CLIP_THRESHOLD, got ", clip_mode);
  TORCH_CHECK_VALUE(noise_mode == NOISE_NONE || noise_mode == NOISE_TENSOR || noise_mode == NOISE_PHILOX,
                    "noise_mode must be NOISE_NONE, NOISE_TENSOR or NOISE_PHILOX, got ", noise_mode);
  check_cpu_view(x, "x", B, N, true);
  check_cpu_view(m, "m", B, N, false);
  TORCH_CHECK_VALUE(coef.device().is_cpu() && coef.dim() == 2 && coef.size(1) == NMS &&
                        coef.scalar_type() == at::kFloat && coef.is_contiguous(),
                    "coef must be a contiguous float32 CPU tensor [S, ", static_cast<int>(NMS), "], got ",
                    coef.scalar_type(), " ", coef.sizes());
  const int64_t S = coef.size(0);
  TORCH_CHECK_VALUE(tval.device().is_cpu() && tval.dim() == 1 && tval.size(0) == S &&
                        tval.scalar_type() == at::kLong,
                    "tval must be an int64 CPU tensor [", S, "], got ", tval.scalar_type(), " ", tval.sizes());
  TORCH_CHECK_VALUE(step.device().is_cpu() && step.numel() == 1 && step.scalar_type() == at::kLong,
                    "step must be an int64 CPU tensor [1], got ", step.scalar_type(), " ", step.sizes());
  TORCH_CHECK_VALUE(rng.device().is_cpu() && rng.dim() == 1 && rng.size(0) == 2 && rng.scalar_type() == at::kLong,
                    "rng must be an int64 CPU tensor [2] (seed, sample_offset)");
  const int64_t i = step.data_ptr<int64_t>()[0];
  TORCH_CHECK_INDEX(i >= 0 && i < S, "step = ", i, " is out of range for coef with ", S, " rows");
  const bool use_thresh = !x0_only && clip_mode == CLIP_THRESHOLD;
  const bool noise_tensor = !x0_only && noise_mode == NOISE_TENSOR;
  if (x0_only) {
    TORCH_CHECK_VALUE(x0_out.has_value(), "x0_only needs x0_out (float32)");
    check_cpu_view(*x0_out, "x0_out", B, N, true);
  } else {
    TORCH_CHECK_VALUE(xp.has_value() && hist.has_value(), "xp and hist are required unless x0_only");
    check_cpu_view(*xp, "xp", B, N, true);
    const at::Tensor& h = *hist;
    TORCH_CHECK_VALUE(h.device().is_cpu() && h.dim() == 3 && h.size(0) == MS_HIST && h.size(1) == B &&
                          h.size(2) == N && h.scalar_type() == at::kFloat && (N <= 1 || h.stride(2) == 1),
                      "hist must be a float32 CPU tensor [3, ", B, ", ", N, "] with unit inner stride, got ",
                      h.scalar_type(), " ", h.sizes());
    if (noise_tensor) {
      TORCH_CHECK_VALUE(noise.has_value(), "noise_mode NOISE_TENSOR needs a noise tensor");
      check_cpu_view(*noise, "noise", B, N, false);
    }
    if (use_thresh) {
      TORCH_CHECK_VALUE(thresh.has_value() && thresh->device().is_cpu() && thresh->dim() == 1 &&
                            thresh->size(0) == B && thresh->scalar_type() == at::kFloat,
                        "clip_mode CLIP_THRESHOLD needs thresh, a float32 CPU tensor [", B, "]");
    }
  }
  if (B == 0 || N == 0) return;

  const MultistepCoef c = load_multistep_coef(coef.data_ptr<float>() + i * NMS);
  const int64_t t = tval.data_ptr<int64_t>()[i * tval.stride(0)];
  const int64_t seed = rng.data_ptr<int64_t>()[0], offset = rng.data_ptr<int64_t>()[rng.stride(0)];
  const float crange = static_cast<float>(clip_range);
  const int clip = static_cast<int>(clip_mode);
  const bool philox = !x0_only && noise_mode == NOISE_PHILOX;
  const ChunkFn fn = pick(clip, philox || noise_tensor);
  const int64_t nchunk = (N + CHUNK - 1) / CHUNK;

  float* xd = x.data_ptr<float>();
  const int64_t xs = x.stride(0);
  float* xpd = x0_only ? nullptr : xp->data_ptr<float>();
  const int64_t xps = x0_only ? 0 : xp->stride(0);
  float* hd = x0_only ? nullptr : hist->data_ptr<float>();
  const int64_t hs_slot = x0_only ? 0 : hist->stride(0), hs_b = x0_only ? 0 : hist->stride(1);
  float* x0d = x0_only ? x0_out->data_ptr<float>() : nullptr;
  const int64_t x0s = x0_only ? x0_out->stride(0) : 0;
  const float* thresh_p = use_thresh ? thresh->data_ptr<float>() : nullptr;
  const int64_t thresh_st = use_thresh ? thresh->stride(0) : 0;
  const int64_t s1 = (i + 2) % MS_HIST, s2 = (i + 1) % MS_HIST, s0 = i % MS_HIST;  // D1, D2, D3 -> D0

  at::parallel_for(0, B * nchunk, GRAIN, [&](int64_t begin, int64_t end) {
    alignas(64) float mb[CHUNK], zb[CHUNK];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunk;
      const int64_t e = (item % nchunk) * CHUNK;
      const int64_t n = std::min(CHUNK, N - e);
      float* xb = xd + b * xs + e;
      const float* mp = load_lanes(m, b, e, n, mb);
      if (x0_only) {
        float* out = x0d + b * x0s + e;
        for (int64_t k = 0; k < n; ++k) out[k] = multistep_d0(c, xb[k], mp[k], clip, crange);
        continue;
      }
      const float* zp = nullptr;
      if (philox) {
        if (c.pz != 0.0f) {  // z is finite, so PZ = 0 adds +0 exactly as the other backends do
          const PhiloxStream st = philox_stream(seed, offset + b, t, STREAM_SDE);
          const uint32_t g0 = static_cast<uint32_t>(e >> 2);
          for (int64_t k = 0; 4 * k < n; ++k) {
            philox_normal4(st, g0 + static_cast<uint32_t>(k), zb[4 * k], zb[4 * k + 1], zb[4 * k + 2],
                           zb[4 * k + 3]);
          }
        } else {
          std::fill(zb, zb + n, 0.0f);
        }
        zp = zb;
      } else if (noise_tensor) {
        zp = load_lanes(*noise, b, e, n, zb);
      }
      float* hb = hd + b * hs_b + e;
      const float s = use_thresh ? thresh_p[b * thresh_st] : 1.0f;
      fn(c, xb, mp, xpd + b * xps + e, hb + s1 * hs_slot, hb + s2 * hs_slot, hb + s0 * hs_slot, zp, n, crange, s);
    }
  });
}

}  // namespace cpu
}  // namespace fastddpm
