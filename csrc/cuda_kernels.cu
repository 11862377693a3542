// cuda_kernels.cu -- CUDA kernels of the fused DDPM step, q_sample and counter-based randn.
//
// No torch headers: raw pointers and strides in, the plain C launchers of cuda_kernels.h out.
// All math (Philox, Box-Muller, the update) is fastddpm_math.h, shared with the CPU kernels.
//
// Work decomposition: blockIdx.y walks the samples b, the x dimension the element groups of a
// sample; one thread makes one Philox call and handles the 4 consecutive elements 4*g .. 4*g+3
// of its group g, with one vector load/store per tensor (16 bytes for float32, 8 for 16-bit
// types) when the sample's base address is aligned, element-wise accesses otherwise.
//
// Bytes per element of the step (in-kernel noise): reads x, m (+ v) and writes prev (+ x0), i.e.
// 4 (5) element-sized accesses; coef / rows / tval / rng are a few scalars per sample.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include "cuda_kernels.h"
#include "fastddpm_math.h"

namespace fastddpm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksX = 1 << 16;  // grid-stride beyond this
constexpr int64_t kMaxBlocksY = 65535;    // CUDA limit on gridDim.y; samples beyond are strided

// ---- conversions ------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
// Round to nearest even with integer ops, NaN -> 0x7fc0: the bits of c10::BFloat16, of the CPU
// kernels and of the Triton kernels (cvt.rn.bf16.f32 would write NaN as 0x7fff).
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  const uint32_t u = __float_as_uint(v);
  const uint32_t r = v != v ? 0x7fc0u : (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  return __ushort_as_bfloat16(static_cast<unsigned short>(r));
}
template <>
__device__ __forceinline__ double from_float<double>(float v) {
  return static_cast<double>(v);
}

// ---- 4-element loads and stores ----------------------------------------------------------------
// Four consecutive elements, aligned to their total size (16 bytes of float, 8 of half): one
// vector memory instruction (two for double).
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ bool is_pack_aligned(const void* row) {
  return (reinterpret_cast<uintptr_t>(row) % sizeof(Pack4<T>)) == 0;
}

// out[k] = row[e + k] for e + k < n (0 past the end); `aligned`: is_pack_aligned(row).
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ row, int64_t e, int64_t n, bool aligned, float out[4]) {
  if (aligned && e + 4 <= n) {
    const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(row + e);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = to_float(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = e + k < n ? to_float(row[e + k]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* __restrict__ row, int64_t e, int64_t n, bool aligned, const float in[4]) {
  if (aligned && e + 4 <= n) {
    Pack4<T> pk;
#pragma unroll
    for (int k = 0; k < 4; ++k) pk.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Pack4<T>*>(row + e) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (e + k < n) row[e + k] = from_float<T>(in[k]);
    }
  }
}

// A [B, N] input whose dtype is only known at run time (the caller's noise tensor).
struct AnyRow {
  const void* base;
  int dtype;
};

// Row b of a [B, N] tensor of run-time dtype `dtype` (float32, float16, bfloat16 or float64).
__device__ __forceinline__ AnyRow any_row(const void* base, int dtype, int64_t stride, int64_t b) {
  const int64_t elem = dtype == FDDPM_FLOAT64 ? 8 : dtype == FDDPM_FLOAT32 ? 4 : 2;
  return AnyRow{base ? static_cast<const char*>(base) + b * stride * elem : nullptr, dtype};
}

__device__ __forceinline__ void load4_any(const AnyRow& r, int64_t e, int64_t n, float out[4]) {
  switch (r.dtype) {
    case FDDPM_FLOAT16: {
      const __half* p = static_cast<const __half*>(r.base);
      load4(p, e, n, is_pack_aligned<__half>(p), out);
      break;
    }
    case FDDPM_BFLOAT16: {
      const __nv_bfloat16* p = static_cast<const __nv_bfloat16*>(r.base);
      load4(p, e, n, is_pack_aligned<__nv_bfloat16>(p), out);
      break;
    }
    case FDDPM_FLOAT64: {
      const double* p = static_cast<const double*>(r.base);
      load4(p, e, n, is_pack_aligned<double>(p), out);
      break;
    }
    default: {
      const float* p = static_cast<const float*>(r.base);
      load4(p, e, n, is_pack_aligned<float>(p), out);
      break;
    }
  }
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, int64_t stride, int64_t b) {
  return static_cast<const T*>(base) + b * stride;
}

template <typename T>
__device__ __forceinline__ T* row_ptr_mut(void* base, int64_t stride, int64_t b) {
  return static_cast<T*>(base) + b * stride;
}

__device__ __forceinline__ StepCoef nan_coef() {
  const float q = __int_as_float(0x7fc00000);
  return StepCoef{q, q, q, q, q, q, q, q, q, q, q, q};
}

// ---- kernels ------------------------------------------------------------------------------------

// The fused step. T: dtype of x, m, v, prev; X0T: dtype of x0 (T, or float in x0_only mode).
template <typename T, typename X0T>
__global__ void __launch_bounds__(kThreads) step_kernel(const fddpm_step_params p) {
  const int64_t n = p.numel;
  const int64_t groups = (n + 3) / 4;
  const int64_t seed = p.rng[0];
  const int64_t sample_offset = p.rng[p.rng_stride];
  const bool x0_only = p.x0_only != 0;
  const int clip = x0_only && p.clip_mode == CLIP_THRESHOLD ? CLIP_NONE : p.clip_mode;
  const bool learned = !x0_only && p.var_mode == VAR_LEARNED && p.noise_mode != NOISE_NONE;

  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const int64_t row = p.rows[b * p.rows_stride];
    const bool bad_row = row < 0 || row >= p.num_rows;  // outputs NaN rather than reading out of bounds
    const StepCoef c = bad_row ? nan_coef() : load_step_coef(p.coef + row * NCOEF);
    const int64_t t = bad_row ? 0 : p.tval[row * p.tval_stride];
    const PhiloxStream st = philox_stream(seed, sample_offset + b, t, STREAM_STEP);
    const bool add_noise = !x0_only && p.noise_mode != NOISE_NONE && c.gate != 0.0f;
    const float s = clip == CLIP_THRESHOLD ? p.thresh[b * p.thresh_stride] : 1.0f;

    const T* x = row_ptr<T>(p.x, p.x_stride, b);
    const T* m = row_ptr<T>(p.m, p.m_stride, b);
    const T* v = learned ? row_ptr<T>(p.v, p.v_stride, b) : nullptr;
    const AnyRow noise = any_row(add_noise && p.noise_mode == NOISE_TENSOR ? p.noise : nullptr, p.noise_dtype,
                                 p.noise_stride, b);
    T* prev = x0_only ? nullptr : row_ptr_mut<T>(p.prev, p.prev_stride, b);
    X0T* x0 = p.x0 ? row_ptr_mut<X0T>(p.x0, p.x0_stride, b) : nullptr;
    const bool ax = is_pack_aligned<T>(x), am = is_pack_aligned<T>(m);
    const bool av = v && is_pack_aligned<T>(v), ap = prev && is_pack_aligned<T>(prev);
    const bool ax0 = x0 && is_pack_aligned<X0T>(x0);

    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t e = 4 * g;
      float xv[4], mv[4], vv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, zv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, pv[4], x0v[4];
      load4(x, e, n, ax, xv);
      load4(m, e, n, am, mv);
      if (x0_only) {
#pragma unroll
        for (int k = 0; k < 4; ++k) x0v[k] = predict_x0(c, xv[k], mv[k], clip, p.clip_range, 1.0f);
        store4(x0, e, n, ax0, x0v);
        continue;
      }
      if (add_noise) {
        if (learned) load4(v, e, n, av, vv);
        if (p.noise_mode == NOISE_PHILOX) {
          philox_normal4(st, static_cast<uint32_t>(g), zv[0], zv[1], zv[2], zv[3]);
        } else {
          load4_any(noise, e, n, zv);
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        pv[k] = step_update(c, xv[k], mv[k], vv[k], zv[k], add_noise, clip, learned ? VAR_LEARNED : VAR_FIXED,
                            p.clip_range, s, x0v[k]);
      }
      store4(prev, e, n, ap, pv);
      if (x0) store4(x0, e, n, ax0, x0v);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(const fddpm_q_sample_params p) {
  const int64_t n = p.numel;
  const int64_t groups = (n + 3) / 4;
  const int64_t seed = p.rng[0];
  const int64_t sample_offset = p.rng[p.rng_stride];
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const int64_t t = p.t[b * p.t_stride];
    const bool bad_t = t < 0 || t >= p.num_timesteps;
    const float nan = __int_as_float(0x7fc00000);
    const float qa = bad_t ? nan : p.table[t * QS_NCOL + QS_A];
    const float qb = bad_t ? nan : p.table[t * QS_NCOL + QS_B];
    const PhiloxStream st = philox_stream(seed, sample_offset + b, t, STREAM_QSAMPLE);
    const T* x0 = row_ptr<T>(p.x0, p.x0_stride, b);
    T* out = row_ptr_mut<T>(p.out, p.out_stride, b);
    const AnyRow noise = any_row(p.noise_mode == NOISE_TENSOR ? p.noise : nullptr, p.noise_dtype, p.noise_stride, b);
    const bool ax = is_pack_aligned<T>(x0), ao = is_pack_aligned<T>(out);
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t e = 4 * g;
      float xv[4], zv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ov[4];
      load4(x0, e, n, ax, xv);
      if (p.noise_mode == NOISE_PHILOX) {
        philox_normal4(st, static_cast<uint32_t>(g), zv[0], zv[1], zv[2], zv[3]);
      } else if (p.noise_mode == NOISE_TENSOR) {
        load4_any(noise, e, n, zv);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) ov[k] = q_sample_update(qa, qb, xv[k], zv[k]);
      store4(out, e, n, ao, ov);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) randn_kernel(const fddpm_randn_params p) {
  const int64_t n = p.numel;
  const int64_t groups = (n + 3) / 4;
  const int64_t seed = p.rng[0];
  const int64_t sample_offset = p.rng[p.rng_stride];
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const PhiloxStream st = philox_stream(seed, sample_offset + b, p.t[b * p.t_stride], p.stream);
    T* out = row_ptr_mut<T>(p.out, p.out_stride, b);
    const bool ao = is_pack_aligned<T>(out);
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float z[4];
      philox_normal4(st, static_cast<uint32_t>(g), z[0], z[1], z[2], z[3]);
      store4(out, 4 * g, n, ao, z);
    }
  }
}

dim3 grid_for(int64_t batch, int64_t numel) {
  const int64_t groups = (numel + 3) / 4;
  int64_t bx = (groups + kThreads - 1) / kThreads;
  bx = bx < kMaxBlocksX ? bx : kMaxBlocksX;
  const int64_t by = batch < kMaxBlocksY ? batch : kMaxBlocksY;
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by), 1);
}

template <typename T>
void launch_step(const fddpm_step_params& p, cudaStream_t stream) {
  const dim3 grid = grid_for(p.batch, p.numel);
  if (p.x0_only) {
    step_kernel<T, float><<<grid, kThreads, 0, stream>>>(p);
  } else {
    step_kernel<T, T><<<grid, kThreads, 0, stream>>>(p);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastddpm

using namespace fastddpm::cuda;

extern "C" cudaError_t fddpm_step_cuda(const fddpm_step_params* params, cudaStream_t stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  const fddpm_step_params& p = *params;
  if (p.batch <= 0 || p.numel <= 0) return cudaSuccess;
  switch (p.dtype) {
    case FDDPM_FLOAT32:
      launch_step<float>(p, stream);
      break;
    case FDDPM_FLOAT16:
      launch_step<__half>(p, stream);
      break;
    case FDDPM_BFLOAT16:
      launch_step<__nv_bfloat16>(p, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t fddpm_q_sample_cuda(const fddpm_q_sample_params* params, cudaStream_t stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  const fddpm_q_sample_params& p = *params;
  if (p.batch <= 0 || p.numel <= 0) return cudaSuccess;
  const dim3 grid = grid_for(p.batch, p.numel);
  switch (p.dtype) {
    case FDDPM_FLOAT32:
      q_sample_kernel<float><<<grid, kThreads, 0, stream>>>(p);
      break;
    case FDDPM_FLOAT16:
      q_sample_kernel<__half><<<grid, kThreads, 0, stream>>>(p);
      break;
    case FDDPM_BFLOAT16:
      q_sample_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t fddpm_randn_cuda(const fddpm_randn_params* params, cudaStream_t stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  const fddpm_randn_params& p = *params;
  if (p.batch <= 0 || p.numel <= 0) return cudaSuccess;
  const dim3 grid = grid_for(p.batch, p.numel);
  switch (p.dtype) {
    case FDDPM_FLOAT32:
      randn_kernel<float><<<grid, kThreads, 0, stream>>>(p);
      break;
    case FDDPM_FLOAT16:
      randn_kernel<__half><<<grid, kThreads, 0, stream>>>(p);
      break;
    case FDDPM_BFLOAT16:
      randn_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
      break;
    case FDDPM_FLOAT64:
      randn_kernel<double><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
