// fastddpm_multistep.h -- the per-element math of the fused multistep-solver step (DPM-Solver++
// 2M/3M/2M-SDE, UniPC), shared by the C++ CPU kernel (cpu_multistep.cpp) and the CUDA kernel
// (cuda_multistep.cu). No torch headers.
//
// Mirrors the MS_* columns and STREAM_SDE of fastddpm/_layout.py (a test checks they agree).
// Every product is rounded and the sums run left to right, exactly as written in the reference
// backend and the Triton kernel; the sources must be built without FMA contraction
// (-ffp-contract=off for g++, --fmad=false for nvcc) so every backend gives the same bits.
#pragma once

#include "fastddpm_math.h"

namespace fastddpm {

// ---- columns of the multistep coefficient table coef[S, NMS] (float32) -----------------------
enum MultistepColumn : int {
  MS_CX = 0,  // D0 = CX * x + CM * m
  MS_CM = 1,
  MS_KX = 2,  // xc = KX * x + KXP * xp + KD0 * D0 + KD1 * D1 + KD2 * D2 + KD3 * D3
  MS_KXP = 3,
  MS_KD0 = 4,
  MS_KD1 = 5,
  MS_KD2 = 6,
  MS_KD3 = 7,
  MS_PX = 8,  // x' = PX * xc + PD0 * D0 + PD1 * D1 + PD2 * D2 + PZ * z
  MS_PD0 = 9,
  MS_PD1 = 10,
  MS_PD2 = 11,
  MS_PZ = 12,
  NMS = 13,
};

constexpr int MS_HIST = 3;     // slots of the data-prediction ring: D_k of step i is slot (i - k) % 3
constexpr int STREAM_SDE = 3;  // Philox stream of the SDE solver's noise (counter t = tval[i])

// One row of the multistep coefficient table.
struct MultistepCoef {
  float cx, cm, kx, kxp, kd0, kd1, kd2, kd3, px, pd0, pd1, pd2, pz;
};

FDDPM_HD FDDPM_INLINE MultistepCoef load_multistep_coef(const float* row) {
  MultistepCoef c;
  c.cx = row[MS_CX];
  c.cm = row[MS_CM];
  c.kx = row[MS_KX];
  c.kxp = row[MS_KXP];
  c.kd0 = row[MS_KD0];
  c.kd1 = row[MS_KD1];
  c.kd2 = row[MS_KD2];
  c.kd3 = row[MS_KD3];
  c.px = row[MS_PX];
  c.pd0 = row[MS_PD0];
  c.pd1 = row[MS_PD1];
  c.pd2 = row[MS_PD2];
  c.pz = row[MS_PZ];
  return c;
}

// Correctly rounded product and sum that no compiler may contract into a fused multiply-add:
// CUDA's __fmul_rn / __fadd_rn are never contracted by nvcc; host code is built with -ffp-contract=off.
FDDPM_HD FDDPM_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FDDPM_HD FDDPM_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// D0 = CX * x + CM * m, clipped to [-clip_range, clip_range] under CLIP_RANGE (not thresholded).
FDDPM_HD FDDPM_INLINE float multistep_d0(const MultistepCoef& c, float x, float m, int clip_mode, float clip_range) {
  const float d0 = add_rn(mul_rn(c.cx, x), mul_rn(c.cm, m));
  return clip_mode == CLIP_RANGE ? clamp_keep_nan(d0, -clip_range, clip_range) : d0;
}

// Dynamic thresholding of D0 with the per-sample threshold s (Saharia et al. 2022).
FDDPM_HD FDDPM_INLINE float multistep_threshold(float d0, float s) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(clamp_keep_nan(d0, -s, s), s);
#else
  return clamp_keep_nan(d0, -s, s) / s;
#endif
}

// The corrector xc and the solver update x' (without the noise term), from the clipped D0:
//   xc = ((((KX*x + KXP*xp) + KD0*D0) + KD1*D1) + KD2*D2) + KD3*D3
//   x' = (((PX*xc + PD0*D0) + PD1*D1) + PD2*D2)
FDDPM_HD FDDPM_INLINE void multistep_update(const MultistepCoef& c, float x, float xp, float d0, float d1, float d2,
                                             float d3, float& xc, float& xn) {
  float a = add_rn(mul_rn(c.kx, x), mul_rn(c.kxp, xp));
  a = add_rn(a, mul_rn(c.kd0, d0));
  a = add_rn(a, mul_rn(c.kd1, d1));
  a = add_rn(a, mul_rn(c.kd2, d2));
  a = add_rn(a, mul_rn(c.kd3, d3));
  xc = a;
  float b = add_rn(mul_rn(c.px, a), mul_rn(c.pd0, d0));
  b = add_rn(b, mul_rn(c.pd1, d1));
  xn = add_rn(b, mul_rn(c.pd2, d2));
}

// x' + PZ * z (the SDE noise term).
FDDPM_HD FDDPM_INLINE float multistep_add_noise(const MultistepCoef& c, float xn, float z) {
  return add_rn(xn, mul_rn(c.pz, z));
}

}  // namespace fastddpm
