/* cuda_kernels.h -- plain C launchers of the fastddpm CUDA kernels (no torch headers).
 *
 * Every op sees its tensors as [B, N] views: a base pointer, a per-sample stride in elements
 * (`*_stride`, any value, 0 included for inputs) and unit stride inside a sample. Index and
 * rng tensors are read by the kernels from device memory (so a captured CUDA graph can be
 * replayed with new values); an out-of-range row / timestep makes that sample's outputs NaN.
 * The math is fastddpm_math.h, the contract fastddpm/_layout.py.
 *
 * Each launcher enqueues one kernel on `stream` and returns cudaGetLastError() (cudaSuccess when
 * there is nothing to do).
 */
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of the [B, N] views. */
typedef enum fddpm_dtype {
  FDDPM_FLOAT32 = 0,
  FDDPM_FLOAT16 = 1,
  FDDPM_BFLOAT16 = 2,
  FDDPM_FLOAT64 = 3 /* randn output and caller noise only */
} fddpm_dtype;

/* Arguments of the fused step; see fastddpm/backends/__init__.py for the contract. */
typedef struct fddpm_step_params {
  const void* x;            /* [B, N] sample x_t, `dtype` */
  int64_t x_stride;
  const void* m;            /* [B, N] model output, `dtype` */
  int64_t m_stride;
  const void* v;            /* [B, N] learned-variance channels, `dtype` (VAR_LEARNED only) */
  int64_t v_stride;
  const void* noise;        /* [B, N] caller noise, `noise_dtype` (NOISE_TENSOR only) */
  int64_t noise_stride;
  void* prev;               /* [B, N] output x_{t-1}, `dtype` (NULL when x0_only) */
  int64_t prev_stride;
  void* x0;                 /* [B, N] output x0, `dtype` (float32 when x0_only), or NULL */
  int64_t x0_stride;
  const float* coef;        /* [R, NCOEF] contiguous coefficient table */
  const int64_t* tval;      /* [R] timestep value of each row */
  int64_t tval_stride;
  const int64_t* rows;      /* [B] row of coef used by each sample */
  int64_t rows_stride;
  const float* thresh;      /* [B] dynamic threshold s (CLIP_THRESHOLD only) */
  int64_t thresh_stride;
  const int64_t* rng;       /* [2] (seed, sample_offset) */
  int64_t rng_stride;
  int64_t batch;            /* B */
  int64_t numel;            /* N, elements per sample */
  int64_t num_rows;         /* R */
  int dtype;                /* fddpm_dtype of x, m, v, prev (and x0 unless x0_only) */
  int noise_dtype;          /* fddpm_dtype of noise */
  int clip_mode;            /* CLIP_* */
  float clip_range;         /* CLIP_RANGE bound */
  int var_mode;             /* VAR_* */
  int noise_mode;           /* NOISE_* */
  int x0_only;              /* nonzero: write only the clipped x0, as float32 */
} fddpm_step_params;

/* x_t = QA[t[b]] * x0 + QB[t[b]] * z, z from `noise` or Philox (STREAM_QSAMPLE, counter t = t[b]). */
typedef struct fddpm_q_sample_params {
  const void* x0;           /* [B, N], `dtype` */
  int64_t x0_stride;
  const void* noise;        /* [B, N], `noise_dtype` (NOISE_TENSOR only) */
  int64_t noise_stride;
  void* out;                /* [B, N], `dtype` */
  int64_t out_stride;
  const float* table;       /* [T, 2] contiguous (sqrt(abar), sqrt(1 - abar)) */
  int64_t num_timesteps;    /* T */
  const int64_t* t;         /* [B] */
  int64_t t_stride;
  const int64_t* rng;       /* [2] (seed, sample_offset) */
  int64_t rng_stride;
  int64_t batch;
  int64_t numel;
  int dtype;
  int noise_dtype;
  int noise_mode;           /* NOISE_* */
} fddpm_q_sample_params;

/* out[b, e] = counter-based normal of (seed, sample_offset + b, t[b], e, stream). */
typedef struct fddpm_randn_params {
  void* out;                /* [B, N], `dtype` (float32/16, bfloat16 or float64) */
  int64_t out_stride;
  const int64_t* t;         /* [B] */
  int64_t t_stride;
  const int64_t* rng;       /* [2] (seed, sample_offset) */
  int64_t rng_stride;
  int64_t batch;
  int64_t numel;
  int dtype;
  int stream;               /* STREAM_* */
} fddpm_randn_params;

cudaError_t fddpm_step_cuda(const fddpm_step_params* params, cudaStream_t stream);
cudaError_t fddpm_q_sample_cuda(const fddpm_q_sample_params* params, cudaStream_t stream);
cudaError_t fddpm_randn_cuda(const fddpm_randn_params* params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
