/* cuda_multistep.h -- plain C launcher of the fused multistep-solver step (no torch headers).
 *
 * Tensors are [B, N] views: a base pointer, a per-sample stride in elements and unit stride inside
 * a sample; the ring hist is [3, B, N] (slot stride, sample stride). The step counter, coefficient
 * table, timestep table and rng are read by the kernel from device memory, so a captured CUDA graph
 * replays every step; a step counter out of [0, num_rows) makes the outputs NaN. The math is
 * fastddpm_multistep.h, the contract the MS_* columns of fastddpm/_layout.py.
 */
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "cuda_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fddpm_multistep_params {
  float* x;                 /* [B, N] float32 state x_i, overwritten with x_{i+1} */
  int64_t x_stride;
  const void* m;            /* [B, N] model output, `m_dtype` (float32/16, bfloat16) */
  int64_t m_stride;
  float* xp;                /* [B, N] float32 previous corrected sample, overwritten (NULL when x0_only) */
  int64_t xp_stride;
  float* hist;              /* [3, B, N] float32 ring of data predictions (NULL when x0_only) */
  int64_t hist_slot_stride;
  int64_t hist_stride;
  const void* noise;        /* [B, N] caller noise, `noise_dtype` (NOISE_TENSOR only) */
  int64_t noise_stride;
  float* x0;                /* [B, N] float32 output D0 (x0_only only) */
  int64_t x0_stride;
  const float* coef;        /* [S, NMS] contiguous coefficient table */
  const int64_t* tval;      /* [S] timestep value of each step */
  int64_t tval_stride;
  const int64_t* step;      /* [1] device step counter i */
  const float* thresh;      /* [B] dynamic threshold s (CLIP_THRESHOLD only) */
  int64_t thresh_stride;
  const int64_t* rng;       /* [2] (seed, sample_offset) */
  int64_t rng_stride;
  int64_t batch;            /* B */
  int64_t numel;            /* N */
  int64_t num_rows;         /* S */
  int m_dtype;              /* fddpm_dtype of m */
  int noise_dtype;          /* fddpm_dtype of noise */
  int clip_mode;            /* CLIP_* */
  float clip_range;
  int noise_mode;           /* NOISE_* */
  int x0_only;              /* nonzero: write only D0 (clipped, not thresholded) */
} fddpm_multistep_params;

cudaError_t fddpm_multistep_cuda(const fddpm_multistep_params* params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
