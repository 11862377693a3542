// cuda_multistep.cu -- CUDA kernel of the fused multistep-solver step (DPM-Solver++ 2M/3M/2M-SDE,
// UniPC): D0, clipping / thresholding, UniPC's corrector, the solver update, SDE noise and the
// history update in one pass. No torch headers: raw pointers in, the C launcher of
// cuda_multistep.h out. The per-element math is fastddpm_multistep.h (shared with the CPU kernel;
// products and sums with __fmul_rn / __fadd_rn, so nvcc never contracts them into FMAs and the
// result equals the other backends bit for bit), the noise fastddpm_math.h's Philox with STREAM_SDE.
//
// Work decomposition: blockIdx.y walks the samples b (strided past 65535), the x dimension the
// 4-element groups of a sample; one thread makes one Philox call and handles elements 4g .. 4g+3.
// Bytes per element (float32 state): read x, xp, D1..D3 (20) + m, write x, xp, D0 (12).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include "cuda_multistep.h"
#include "fastddpm_multistep.h"

namespace fastddpm {
namespace cuda_multistep {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksX = 1 << 16;  // grid-stride beyond this
constexpr int64_t kMaxBlocksY = 65535;    // CUDA limit on gridDim.y; samples beyond are strided

// Element e of row `base` (run-time dtype) as float.
__device__ __forceinline__ float load_any(const void* base, int dtype, int64_t e) {
  switch (dtype) {
    case FDDPM_FLOAT16:
      return __half2float(static_cast<const __half*>(base)[e]);
    case FDDPM_BFLOAT16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[e]);
    case FDDPM_FLOAT64:
      return static_cast<float>(static_cast<const double*>(base)[e]);
    default:
      return static_cast<const float*>(base)[e];
  }
}

__device__ __forceinline__ const void* row_of(const void* base, int dtype, int64_t stride, int64_t b) {
  const int64_t elem = dtype == FDDPM_FLOAT64 ? 8 : dtype == FDDPM_FLOAT32 ? 4 : 2;
  return static_cast<const char*>(base) + b * stride * elem;
}

template <int CLIP, int NOISE, bool X0_ONLY>
__global__ void __launch_bounds__(kThreads) multistep_kernel(const fddpm_multistep_params p) {
  const int64_t i = *p.step;
  const bool bad_row = i < 0 || i >= p.num_rows;
  const int64_t row = bad_row ? 0 : i;
  const MultistepCoef c = load_multistep_coef(p.coef + row * NMS);
  const float nan = __int_as_float(0x7fffffff);
  const int64_t s1 = (row + 2) % MS_HIST, s2 = (row + 1) % MS_HIST, s0 = row % MS_HIST;
  const int64_t groups = (p.numel + 3) / 4;
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const void* mrow = row_of(p.m, p.m_dtype, p.m_stride, b);
    float* xrow = p.x + b * p.x_stride;
    PhiloxStream st{};
    float s = 1.0f;
    if (!X0_ONLY) {
      if (NOISE == NOISE_PHILOX) st = philox_stream(p.rng[0], p.rng[p.rng_stride] + b, p.tval[row * p.tval_stride], STREAM_SDE);
      if (CLIP == CLIP_THRESHOLD) s = p.thresh[b * p.thresh_stride];
    }
    for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
         g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t e0 = 4 * g;
      float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (!X0_ONLY && NOISE == NOISE_PHILOX) philox_normal4(st, static_cast<uint32_t>(g), z[0], z[1], z[2], z[3]);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t e = e0 + k;
        if (e >= p.numel) break;
        float d0 = multistep_d0(c, xrow[e], load_any(mrow, p.m_dtype, e), CLIP, p.clip_range);
        if (X0_ONLY) {
          p.x0[b * p.x0_stride + e] = bad_row ? nan : d0;
          continue;
        }
        if (CLIP == CLIP_THRESHOLD) d0 = multistep_threshold(d0, s);
        float* h = p.hist + b * p.hist_stride + e;
        float* xpe = p.xp + b * p.xp_stride + e;
        float xc, xn;
        multistep_update(c, xrow[e], *xpe, d0, h[s1 * p.hist_slot_stride], h[s2 * p.hist_slot_stride],
                         h[s0 * p.hist_slot_stride], xc, xn);
        if (NOISE == NOISE_TENSOR) {
          xn = multistep_add_noise(c, xn, load_any(row_of(p.noise, p.noise_dtype, p.noise_stride, b), p.noise_dtype, e));
        } else if (NOISE == NOISE_PHILOX) {
          xn = multistep_add_noise(c, xn, z[k]);
        }
        h[s0 * p.hist_slot_stride] = bad_row ? nan : d0;
        *xpe = bad_row ? nan : xc;
        xrow[e] = bad_row ? nan : xn;
      }
    }
  }
}

template <int CLIP, int NOISE>
cudaError_t launch_x0(const fddpm_multistep_params& p, dim3 grid, cudaStream_t stream) {
  if (p.x0_only) {
    multistep_kernel<CLIP, NOISE_NONE, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    multistep_kernel<CLIP, NOISE, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <int CLIP>
cudaError_t launch_noise(const fddpm_multistep_params& p, dim3 grid, cudaStream_t stream) {
  switch (p.noise_mode) {
    case NOISE_TENSOR:
      return launch_x0<CLIP, NOISE_TENSOR>(p, grid, stream);
    case NOISE_PHILOX:
      return launch_x0<CLIP, NOISE_PHILOX>(p, grid, stream);
    default:
      return launch_x0<CLIP, NOISE_NONE>(p, grid, stream);
  }
}

}  // namespace
}  // namespace cuda_multistep
}  // namespace fastddpm

extern "C" cudaError_t fddpm_multistep_cuda(const fddpm_multistep_params* params, cudaStream_t stream) {
  using namespace fastddpm;
  using namespace fastddpm::cuda_multistep;
  const fddpm_multistep_params& p = *params;
  if (p.batch <= 0 || p.numel <= 0) return cudaSuccess;
  const int64_t groups = (p.numel + 3) / 4;
  int64_t bx = (groups + kThreads - 1) / kThreads;
  bx = bx < kMaxBlocksX ? bx : kMaxBlocksX;
  const int64_t by = p.batch < kMaxBlocksY ? p.batch : kMaxBlocksY;
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  switch (p.clip_mode) {
    case CLIP_RANGE:
      return launch_noise<CLIP_RANGE>(p, grid, stream);
    case CLIP_THRESHOLD:
      return launch_noise<CLIP_THRESHOLD>(p, grid, stream);
    default:
      return launch_noise<CLIP_NONE>(p, grid, stream);
  }
}
