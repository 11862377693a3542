// cpu_kernels.cpp -- the fused DDPM step, q_sample and counter-based randn for CPU tensors.
//
// Built on first use by fastddpm/_build.py (torch.utils.cpp_extension.load, -O3, -fopenmp,
// -march=native where the compiler has them, -fno-math-errno, -fno-trapping-math, never
// -ffast-math). The math lives in fastddpm_math.h, shared with the CUDA kernels; this file does
// the memory side, the AVX2 Philox and the threading. Argument checks: torch_checks.h.
//
// Work decomposition: every op views its tensors as [B, N] (per-sample stride, unit stride inside
// a sample) and splits each sample into chunks of CHUNK elements; parallel_items spreads the
// B * ceil(N / CHUNK) chunks over torch's intra-op threads. One chunk is handled in one pass: load
// x, m (and v / noise) into float lane buffers (no copy for float32), make the Philox normals of
// the chunk into a stack buffer, run the update over the chunk, store prev (and x0). Every
// inner loop is a fixed-size or counted loop over plain arrays of the inline functions of
// fastddpm_math.h, which gcc/clang vectorise at -O3.
//
// Bytes per element of the step (fp32, in-kernel noise): reads x, m (+ v) = 8 (12) bytes, writes
// prev (+ x0) = 4 (8) bytes.

// Only the headers needed (not torch/extension.h, which triples the build time).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "cpu_groupnorm.h"
#include "cpu_multistep.h"
#include "fastddpm_math.h"
#include "torch_checks.h"

namespace fastddpm {
namespace cpu {
namespace {

constexpr int64_t CHUNK = 256;         // elements per work item (a multiple of 4)
constexpr int64_t GROUPS = CHUNK / 4;  // Philox calls per work item
constexpr int64_t GRAIN = 64;          // work items (16K elements) per parallel task

static_assert(CHUNK % 4 == 0, "a chunk must hold whole Philox groups");

// ---- dtype conversion between tensor storage and float lanes -----------------------------------

enum class DType { F32, F16, BF16, F64 };

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    case at::kDouble:
      return DType::F64;
    default:
      TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

int64_t element_size(DType dt) {
  switch (dt) {
    case DType::F32:
      return 4;
    case DType::F64:
      return 8;
    default:
      return 2;
  }
}

void load_bf16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = uint_as_float(static_cast<uint32_t>(src[i]) << 16);
}

void store_bf16(const float* src, uint16_t* dst, int64_t n) {
  // round to nearest even, NaN -> canonical quiet NaN (as c10::BFloat16)
  for (int64_t i = 0; i < n; ++i) {
    const float f = src[i];
    const uint32_t u = float_as_uint(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
  }
}

void load_f16(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void store_f16(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// A [B, N] view: base pointer, dtype and per-sample stride in elements.
struct View {
  char* data = nullptr;
  DType dtype = DType::F32;
  int64_t stride_b = 0;

  bool defined() const { return data != nullptr; }
  char* at(int64_t b, int64_t e) const { return data + (b * stride_b + e) * element_size(dtype); }
};

View view_of(const at::Tensor& t) {
  View v;
  v.data = static_cast<char*>(t.data_ptr());
  v.dtype = dtype_of(t);
  v.stride_b = t.size(0) > 1 ? t.stride(0) : 0;
  return v;
}

View view_of(const std::optional<at::Tensor>& t) { return t.has_value() ? view_of(*t) : View{}; }

// Elements [e, e + n) of sample b as float: a pointer into the tensor itself for float32, else
// converted into `buf`.
const float* load_lanes(const View& v, int64_t b, int64_t e, int64_t n, float* buf) {
  const char* p = v.at(b, e);
  switch (v.dtype) {
    case DType::F32:
      return reinterpret_cast<const float*>(p);
    case DType::F16:
      load_f16(reinterpret_cast<const c10::Half*>(p), buf, n);
      return buf;
    case DType::BF16:
      load_bf16(reinterpret_cast<const uint16_t*>(p), buf, n);
      return buf;
    case DType::F64:
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(reinterpret_cast<const double*>(p)[i]);
      return buf;
  }
  return buf;
}

// Where the update should write elements [e, e + n) of sample b: straight into the tensor for
// float32, else into `buf` (then flushed by store_lanes).
float* output_lanes(const View& v, int64_t b, int64_t e, float* buf) {
  return v.dtype == DType::F32 ? reinterpret_cast<float*>(v.at(b, e)) : buf;
}

void store_lanes(const View& v, int64_t b, int64_t e, int64_t n, const float* buf) {
  char* p = v.at(b, e);
  switch (v.dtype) {
    case DType::F32:
      return;  // written in place by the update
    case DType::F16:
      store_f16(buf, reinterpret_cast<c10::Half*>(p), n);
      return;
    case DType::BF16:
      store_bf16(buf, reinterpret_cast<uint16_t*>(p), n);
      return;
    case DType::F64:
      for (int64_t i = 0; i < n; ++i) reinterpret_cast<double*>(p)[i] = static_cast<double>(buf[i]);
      return;
  }
}

// ---- vectorised Philox + Box-Muller --------------------------------------------------------------

#if defined(__AVX2__)
// (hi, lo) 32-bit halves of a * m for 8 uint32 lanes: vpmuludq multiplies the even lanes into
// 64-bit products, a 64-bit shift brings the odd lanes down for a second one, blends put the
// halves back into lane order.
inline __m256i mulhilo8(__m256i a, __m256i m, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

// r0..r3[i] = Philox4x32-10 words of element group group0 + i, for i < GROUPS.
void philox_words_chunk(const PhiloxStream& st, uint32_t group0, uint32_t* __restrict__ r0,
                        uint32_t* __restrict__ r1, uint32_t* __restrict__ r2, uint32_t* __restrict__ r3) {
#if defined(__AVX2__)
  // Same rounds as philox4x32_10 in fastddpm_math.h, 8 counters at a time.
  static_assert(GROUPS % 8 == 0, "the AVX2 Philox makes 8 groups at a time");
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(PHILOX_M0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(PHILOX_M1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < GROUPS; i += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(group0 + static_cast<uint32_t>(i))), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(st.c1));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(st.c2));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(st.c3));
    uint32_t k0 = st.k0, k1 = st.k1;
#pragma GCC unroll 16
    for (int round = 0; round < PHILOX_ROUNDS; ++round) {
      __m256i lo0, lo1;
      const __m256i hi0 = mulhilo8(c0, m0, lo0);
      const __m256i hi1 = mulhilo8(c2, m1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + i), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r1 + i), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r2 + i), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r3 + i), c3);
  }
#else
  // Portable: the shared scalar Philox over lanes (auto-vectorised where the target allows).
  for (int64_t i = 0; i < GROUPS; ++i) {
    philox_group(st, group0 + static_cast<uint32_t>(i), r0[i], r1[i], r2[i], r3[i]);
  }
#endif
}

// z[0 .. CHUNK) = the standard normals of elements 4 * group0 .. 4 * group0 + CHUNK - 1 of one
// (seed, sample, t, stream): GROUPS Philox calls in uint32 lanes, Box-Muller in float lanes, then
// the four normals of each group interleaved into element order.
void philox_normal_chunk(const PhiloxStream& st, uint32_t group0, float* __restrict__ z) {
  alignas(64) uint32_t r0[GROUPS], r1[GROUPS], r2[GROUPS], r3[GROUPS];
  alignas(64) float n0[GROUPS], n1[GROUPS], n2[GROUPS], n3[GROUPS];
  philox_words_chunk(st, group0, r0, r1, r2, r3);
  for (int64_t i = 0; i < GROUPS; ++i) {
    box_muller(uint_to_uniform(r0[i]), uint_to_uniform(r1[i]), n0[i], n1[i]);
    box_muller(uint_to_uniform(r2[i]), uint_to_uniform(r3[i]), n2[i], n3[i]);
  }
  for (int64_t i = 0; i < GROUPS; ++i) {
    z[4 * i + 0] = n0[i];
    z[4 * i + 1] = n1[i];
    z[4 * i + 2] = n2[i];
    z[4 * i + 3] = n3[i];
  }
}

// ---- the per-chunk updates, specialised on the modes -----------------------------------------------

struct ChunkArgs {
  const float* x;
  const float* m;
  const float* v;  // VAR_LEARNED only
  const float* z;  // when noise is added only
  float* prev;
  float* x0;
  int64_t n;
  float clip_range;
  float s;  // dynamic threshold of this sample
};

// Everything the loops read besides the lanes is copied into locals first: through the references
// the compiler would have to assume that the stores to prev / x0 may change it, reload it every
// element and give up vectorising.
template <int CLIP, int VAR, bool NOISE>
void update_chunk(const StepCoef& coef, const ChunkArgs& a) {
  const StepCoef c = coef;
  const float* x = a.x;
  const float* m = a.m;
  const float* v = a.v;
  const float* z = a.z;
  float* prev = a.prev;
  float* x0 = a.x0;
  const int64_t n = a.n;
  const float clip_range = a.clip_range;
  const float s = a.s;
  for (int64_t i = 0; i < n; ++i) {
    float x0i;
    const float vi = VAR == VAR_LEARNED ? v[i] : 0.0f;
    const float zi = NOISE ? z[i] : 0.0f;
    const float p = step_update(c, x[i], m[i], vi, zi, NOISE, CLIP, VAR, clip_range, s, x0i);
    x0[i] = x0i;
    prev[i] = p;
  }
}

template <int CLIP>
void x0_only_chunk(const StepCoef& coef, const ChunkArgs& a) {
  const StepCoef c = coef;
  const float* x = a.x;
  const float* m = a.m;
  float* x0 = a.x0;
  const int64_t n = a.n;
  const float clip_range = a.clip_range;
  for (int64_t i = 0; i < n; ++i) x0[i] = predict_x0(c, x[i], m[i], CLIP, clip_range, 1.0f);
}

using ChunkFn = void (*)(const StepCoef&, const ChunkArgs&);

template <int CLIP, int VAR>
ChunkFn pick_update(bool noise) {
  // without noise the variance is never used: one VAR_FIXED instance serves both var modes
  return noise ? &update_chunk<CLIP, VAR, true> : &update_chunk<CLIP, VAR_FIXED, false>;
}

template <int CLIP>
ChunkFn pick_update(int var_mode, bool noise) {
  return var_mode == VAR_LEARNED ? pick_update<CLIP, VAR_LEARNED>(noise) : pick_update<CLIP, VAR_FIXED>(noise);
}

ChunkFn pick_update(int clip_mode, int var_mode, bool noise) {
  switch (clip_mode) {
    case CLIP_RANGE:
      return pick_update<CLIP_RANGE>(var_mode, noise);
    case CLIP_THRESHOLD:
      return pick_update<CLIP_THRESHOLD>(var_mode, noise);
    default:
      return pick_update<CLIP_NONE>(var_mode, noise);
  }
}

// ---- argument checks (metadata checks in torch_checks.h; index values checked here) ------------------

void check_on_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the cpu backend, got one on ", t.device());
}

// Checks that every entry of the 1-D int64 `idx` lies in [0, limit).
void check_index_range(const at::Tensor& idx, const char* name, int64_t limit, const char* what) {
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t st = idx.stride(0);
  for (int64_t b = 0; b < idx.size(0); ++b) {
    const int64_t r = p[b * st];
    TORCH_CHECK_INDEX(r >= 0 && r < limit, name, "[", b, "] = ", r, " is out of range for ", what, " with ", limit,
                      " rows");
  }
}

struct RngArgs {
  int64_t seed;
  int64_t offset;
};

RngArgs read_rng(const at::Tensor& rng) {
  const int64_t* p = rng.data_ptr<int64_t>();
  return {p[0], p[rng.stride(0)]};
}

int64_t num_chunks(int64_t N) { return (N + CHUNK - 1) / CHUNK; }

// Runs fn(begin, end) over [0, n_items) in blocks of GRAIN items on torch's intra-op threads
// (the OpenMP team torch.set_num_threads sizes; the extension shares torch's libgomp).
// Blocks are handed out dynamically rather than split evenly up front as at::parallel_for does:
// on a machine shared with other processes a thread that is descheduled for a while no longer
// holds up half of the work, the others take its blocks. Built without OpenMP it runs serially.
// fn must not throw (all checks happen before).
template <typename F>
void parallel_items(int64_t n_items, const F& fn) {
  const int64_t blocks = (n_items + GRAIN - 1) / GRAIN;
  if (blocks <= 1 || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    fn(0, n_items);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
#endif
  for (int64_t blk = 0; blk < blocks; ++blk) {
    fn(blk * GRAIN, std::min(n_items, (blk + 1) * GRAIN));
  }
}

// ---- ops -------------------------------------------------------------------------------------------------

// See fastddpm/backends/__init__.py for the contract of every argument.
void step(const at::Tensor& x, const at::Tensor& m, const std::optional<at::Tensor>& v,
          const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& prev_out,
          const std::optional<at::Tensor>& x0_out, const at::Tensor& coef, const at::Tensor& tval,
          const at::Tensor& rows, const std::optional<at::Tensor>& thresh, const at::Tensor& rng, int64_t clip_mode,
          double clip_range, int64_t var_mode, int64_t noise_mode, bool x0_only) {
  check_on_cpu(x, "x");
  const checks::StepPlan plan = checks::check_step_args(x, m, v, noise, prev_out, x0_out, coef, tval, rows, thresh,
                                                        rng, clip_mode, var_mode, noise_mode, x0_only);
  check_index_range(rows, "rows", plan.R, "coef");
  const RngArgs rng_args = read_rng(rng);
  const int64_t B = plan.B, N = plan.N;
  if (B == 0 || N == 0) return;
  const int clip = plan.clip_mode;
  const bool learned = plan.learned, noise_philox = plan.noise_philox, use_thresh = plan.use_thresh;

  const View xv = view_of(x), mv = view_of(m);
  const View vv = learned ? view_of(v) : View{};
  const View nv = plan.noise_tensor ? view_of(noise) : View{};
  const View pv = x0_only ? View{} : view_of(prev_out);
  const View x0v = view_of(x0_out);
  const float* coef_p = coef.data_ptr<float>();
  const int64_t* tval_p = tval.data_ptr<int64_t>();
  const int64_t tval_st = tval.stride(0);
  const int64_t* rows_p = rows.data_ptr<int64_t>();
  const int64_t rows_st = rows.stride(0);
  const float* thresh_p = use_thresh ? thresh->data_ptr<float>() : nullptr;
  const int64_t thresh_st = use_thresh ? thresh->stride(0) : 0;
  const float crange = static_cast<float>(clip_range);
  const int64_t nchunk = num_chunks(N);
  const ChunkFn with_noise = pick_update(clip, static_cast<int>(var_mode), true);
  const ChunkFn without_noise = pick_update(clip, static_cast<int>(var_mode), false);
  const ChunkFn x0_fn = clip == CLIP_RANGE ? &x0_only_chunk<CLIP_RANGE> : &x0_only_chunk<CLIP_NONE>;

  parallel_items(B * nchunk, [&](int64_t begin, int64_t end) {
    alignas(64) float xb[CHUNK], mb[CHUNK], vb[CHUNK], zb[CHUNK], pb[CHUNK], x0b[CHUNK];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunk;
      const int64_t e = (item % nchunk) * CHUNK;
      const int64_t n = std::min(CHUNK, N - e);
      const int64_t row = rows_p[b * rows_st];
      const StepCoef c = load_step_coef(coef_p + row * NCOEF);

      ChunkArgs a;
      a.n = n;
      a.clip_range = crange;
      a.s = use_thresh ? thresh_p[b * thresh_st] : 1.0f;
      a.x = load_lanes(xv, b, e, n, xb);
      a.m = load_lanes(mv, b, e, n, mb);
      a.v = nullptr;
      a.z = nullptr;
      if (x0_only) {
        a.prev = nullptr;
        a.x0 = output_lanes(x0v, b, e, x0b);
        x0_fn(c, a);
        store_lanes(x0v, b, e, n, a.x0);
        continue;
      }
      const bool add_noise = noise_mode != NOISE_NONE && c.gate != 0.0f;
      if (learned && add_noise) a.v = load_lanes(vv, b, e, n, vb);
      if (add_noise && noise_philox) {
        const PhiloxStream st =
            philox_stream(rng_args.seed, rng_args.offset + b, tval_p[row * tval_st], STREAM_STEP);
        philox_normal_chunk(st, static_cast<uint32_t>(e >> 2), zb);
        a.z = zb;
      } else if (add_noise) {
        a.z = load_lanes(nv, b, e, n, zb);
      }
      a.prev = output_lanes(pv, b, e, pb);
      a.x0 = x0v.defined() ? output_lanes(x0v, b, e, x0b) : x0b;
      (add_noise ? with_noise : without_noise)(c, a);
      store_lanes(pv, b, e, n, a.prev);
      if (x0v.defined()) store_lanes(x0v, b, e, n, a.x0);
    }
  });
}

// x_t = QA[t[b]] * x0 + QB[t[b]] * z (forward process), z from `noise` or Philox (STREAM_QSAMPLE).
void q_sample(const at::Tensor& x0, const std::optional<at::Tensor>& noise, const at::Tensor& out,
              const at::Tensor& table, const at::Tensor& t, const at::Tensor& rng, int64_t noise_mode) {
  check_on_cpu(x0, "x0");
  const auto shape = checks::check_q_sample_args(x0, noise, out, table, t, rng, noise_mode);
  const int64_t B = shape.first, N = shape.second;
  check_index_range(t, "t", table.size(0), "table");
  const RngArgs rng_args = read_rng(rng);
  if (B == 0 || N == 0) return;

  const View xv = view_of(x0), ov = view_of(out);
  const View nv = noise_mode == NOISE_TENSOR ? view_of(noise) : View{};
  const float* table_p = table.data_ptr<float>();
  const int64_t* t_p = t.data_ptr<int64_t>();
  const int64_t t_st = t.stride(0);
  const int64_t nchunk = num_chunks(N);

  parallel_items(B * nchunk, [&](int64_t begin, int64_t end) {
    alignas(64) float xb[CHUNK], zb[CHUNK], ob[CHUNK];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunk;
      const int64_t e = (item % nchunk) * CHUNK;
      const int64_t n = std::min(CHUNK, N - e);
      const int64_t tb = t_p[b * t_st];
      const float qa = table_p[tb * QS_NCOL + QS_A];
      const float qb = table_p[tb * QS_NCOL + QS_B];
      const float* xp = load_lanes(xv, b, e, n, xb);
      float* op = output_lanes(ov, b, e, ob);
      if (noise_mode == NOISE_NONE) {
        for (int64_t i = 0; i < n; ++i) op[i] = q_sample_update(qa, qb, xp[i], 0.0f);
      } else {
        const float* zp = zb;
        if (noise_mode == NOISE_PHILOX) {
          const PhiloxStream st = philox_stream(rng_args.seed, rng_args.offset + b, tb, STREAM_QSAMPLE);
          philox_normal_chunk(st, static_cast<uint32_t>(e >> 2), zb);
        } else {
          zp = load_lanes(nv, b, e, n, zb);
        }
        for (int64_t i = 0; i < n; ++i) op[i] = q_sample_update(qa, qb, xp[i], zp[i]);
      }
      store_lanes(ov, b, e, n, op);
    }
  });
}

// out[b, e] = the counter-based normal of (seed, sample_offset + b, t[b], e, stream).
void randn(const at::Tensor& out, const at::Tensor& t, const at::Tensor& rng, int64_t stream) {
  check_on_cpu(out, "out");
  const auto shape = checks::check_randn_args(out, t, rng, stream);
  const int64_t B = shape.first, N = shape.second;
  const RngArgs rng_args = read_rng(rng);
  if (B == 0 || N == 0) return;

  const View ov = view_of(out);
  const int64_t* t_p = t.data_ptr<int64_t>();
  const int64_t t_st = t.stride(0);
  const int64_t nchunk = num_chunks(N);
  const int stream_id = static_cast<int>(stream);

  parallel_items(B * nchunk, [&](int64_t begin, int64_t end) {
    alignas(64) float zb[CHUNK];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunk;
      const int64_t e = (item % nchunk) * CHUNK;
      const int64_t n = std::min(CHUNK, N - e);
      const PhiloxStream st = philox_stream(rng_args.seed, rng_args.offset + b, t_p[b * t_st], stream_id);
      float* op = output_lanes(ov, b, e, zb);
      if (n == CHUNK && op != zb) {
        philox_normal_chunk(st, static_cast<uint32_t>(e >> 2), op);  // full float32 chunk: write in place
      } else {
        philox_normal_chunk(st, static_cast<uint32_t>(e >> 2), zb);
        if (op != zb) std::copy(zb, zb + n, op);
        store_lanes(ov, b, e, n, zb);
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastddpm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.doc() = "fastddpm CPU kernels: fused DDPM/DDIM step, q_sample, counter-based randn, GroupNorm+SiLU";
  module.def("step", &fastddpm::cpu::step, "Fused DDPM/DDIM step on [B, N] CPU tensors (see fastddpm.backends)",
             py::arg("x"), py::arg("m"), py::arg("v"), py::arg("noise"), py::arg("prev_out"), py::arg("x0_out"),
             py::arg("coef"), py::arg("tval"), py::arg("rows"), py::arg("thresh"), py::arg("rng"), py::kw_only(),
             py::arg("clip_mode"), py::arg("clip_range"), py::arg("var_mode"), py::arg("noise_mode"),
             py::arg("x0_only"));
  module.def("q_sample", &fastddpm::cpu::q_sample, "x_t = QA[t] * x0 + QB[t] * z on [B, N] CPU tensors",
             py::arg("x0"), py::arg("noise"), py::arg("out"), py::arg("table"), py::arg("t"), py::arg("rng"),
             py::kw_only(), py::arg("noise_mode"));
  module.def("randn", &fastddpm::cpu::randn, "Counter-based standard normals into a [B, N] CPU tensor",
             py::arg("out"), py::arg("t"), py::arg("rng"), py::kw_only(), py::arg("stream"));
  module.def("group_norm_silu", &fastddpm::cpu::group_norm_silu,
             "silu(group_norm(x + add)) for float32 CPU tensors, contiguous or channels_last", py::arg("x"),
             py::arg("weight"), py::arg("bias"), py::arg("num_groups"), py::arg("eps"), py::arg("add"),
             py::arg("silu"));
  module.def("multistep", &fastddpm::cpu::multistep,
             "Fused multistep-solver step on [B, N] CPU tensors (see fastddpm.backends)", py::arg("x"), py::arg("m"),
             py::arg("xp"), py::arg("hist"), py::arg("noise"), py::arg("x0_out"), py::arg("coef"), py::arg("tval"),
             py::arg("step"), py::arg("thresh"), py::arg("rng"), py::kw_only(), py::arg("clip_mode"),
             py::arg("clip_range"), py::arg("noise_mode"), py::arg("x0_only"));
}
