"""The contract between the Python front end and every fused backend (cpu, cuda, triton).

This file is the single place where the kernel interface is written down. The C++ header
``csrc/fastddpm_math.h`` and the Triton kernels in ``kernels/`` mirror these numbers; a test checks
that the header agrees with this file.

Per-step coefficients
---------------------
All schedule math is done once in float64 by :mod:`fastddpm.schedule` and packed into a float32
table ``coef`` of shape ``[R, NCOEF]`` (one row per (t, prev_t) pair). A kernel never re-derives a
coefficient: for sample ``b`` it reads ``row = rows[b * rows_stride]`` and then ``coef[row, :]``.
The per-element update, for model output ``m``, optional variance channel ``v``, sample ``x``
and standard normal ``z`` is (all arithmetic in float32, in exactly this order, see "Bitwise rules")::

    x0   = (CX (*) x) + (CM (*) m)                            # predict x_0 (eq. 15 of Ho et al.)
    x0   = clamp(x0, -clip_range, clip_range)                 # CLIP_MODE == CLIP_RANGE
    x0   = clamp(x0, -s[b], s[b]) / s[b]                      # CLIP_MODE == CLIP_THRESHOLD
    eps  = ((EX (*) x) + (EM (*) m)) + (E0 (*) x0)            # epsilon, used by DDIM (PE != 0)
    mean = ((P0 (*) x0) + (PX (*) x)) + (PE (*) eps)          # posterior mean (eq. 7) / DDIM (eq. 12)
    std  = STD                                                # VAR_MODE == VAR_FIXED
    std  = exp_f32(0.5 * ((LVA * v) + LVB))                   # VAR_MODE == VAR_LEARNED (log-variance)
    prev = mean + (std * z)          if GATE != 0             # noise is added only where GATE is 1
    prev = mean                      otherwise

``c (*) a`` is the coefficient product with a zero coefficient left out: ``c == 0 ? +0.0 : c * a``.
A term whose coefficient is 0 contributes +0.0 even when ``a`` is infinite or NaN, so an infinite
model output that clipping removes from x0 (or that a DDPM step never uses through ``eps``) cannot
turn the result into NaN (``0 * inf``); this is what the float64 reference, which never forms those
terms, gives.

``X0_ONLY`` mode writes only the (clipped, not thresholded) ``x0`` in float32; it is the first pass
of dynamic thresholding, whose per-sample quantile ``s`` then feeds the fused pass.

q_sample reads a ``[T, 2]`` float32 table ``(sqrt(abar_t), sqrt(1 - abar_t))`` indexed by ``t[b]``::

    x_t = (QA[t] * x0) + (QB[t] * z)

Index checks: a row index ``rows[b]`` outside ``[0, R)`` or a timestep ``t[b]`` outside ``[0, T)``
never reads out of bounds. The cpu backend raises (it checks on the host); the CUDA and Triton
kernels, which cannot raise from the device, clamp the index for the load and write NaN for every
output element of that sample (its coefficients are replaced by NaN).

Counter-based noise (Philox4x32-10)
-----------------------------------
When no noise tensor is given, ``z`` is a pure function of
``(seed, global sample index g = sample_offset + b, timestep value t, element index e, stream)``:

* key     ``(k0, k1) = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)``  (seed: int64 bit pattern)
* counter ``(c0, c1, c2, c3) = (e >> 2, g & 0xffffffff, t & 0xffffffff, stream | (g >> 32) << 8)``
* ``Philox4x32-10(counter, key)`` gives four uint32 ``r0..r3``; element ``e`` takes normal number
  ``n[e & 3]`` where, as in Triton's ``tl.randn4``::

      u_i  = float32(int32(r_i) < 0 ? -int32(r_i) - 1 : int32(r_i)) * UNIFORM_SCALE  # in [0, 1)
      ra   = sqrt(-2 * log_f32(max(u0, UNIFORM_MIN))),  (s1, c1) = sincos_2pi_f32(u1)
      n0   = ra * c1,  n1 = ra * s1
      rb   = sqrt(-2 * log_f32(max(u2, UNIFORM_MIN))),  (s3, c3) = sincos_2pi_f32(u3)
      n2   = rb * c3,  n3 = rb * s3

  with the float32 functions of "Bitwise rules" below (not a libm log / cos / sin).

* ``e`` is the flat index inside one sample (``0 <= e < C*H*W``), so the value of an element never
  depends on the batch it was computed in. Streams keep the uses apart (see ``STREAM_*``).
* ``seed`` and ``sample_offset`` are read by every kernel from a device-resident int64 tensor
  ``rng = [seed, sample_offset]`` so a captured CUDA graph can be replayed for other batches.

Bitwise rules (every backend, every kernel that makes noise or steps, the samplers to come)
-------------------------------------------------------------------------------------------
Given the same inputs (model output, sample, noise tensor or ``(seed, sample_offset)``) every
backend returns the same bits: ``reference`` (float32/16/bf16 inputs), ``cpu``, ``cuda``,
``triton``. This holds because each of them evaluates the very same sequence of float32 operations,
written once per language from this specification:

1. Only ``+ - * /``, ``sqrt``, comparisons/selects, ``min``/``max``, int<->float conversions and bit
   casts, each correctly rounded to nearest even (IEEE 754 binary32, subnormals kept). No fused
   multiply-add, no reassociation, no approximate instruction:

   * C++ (g++/clang): ``-ffp-contract=off`` (``-march=native`` would otherwise contract ``a*b + c``
     into an FMA), never ``-ffast-math``/``-Ofast``/``-freciprocal-math``.
   * CUDA (nvcc): ``--fmad=false``; the defaults ``-prec-div=true -prec-sqrt=true -ftz=false``,
     never ``--use_fast_math``.
   * Triton: launch with ``enable_fp_fusion=False``; divide with ``tl.div_rn``, take roots with
     ``tl.sqrt_rn`` (plain ``/`` and ``tl.sqrt`` lower to approximate instructions on NVIDIA GPUs);
     never ``tl.exp``/``tl.log``/``tl.cos``/``tl.sin`` (libdevice or approximations): use the
     polynomials below. The interpreter (numpy) never fuses.
   * PyTorch (the reference): plain elementwise float32 tensor ops (``+ - *``, comparisons,
     ``where``), never ``torch.exp``/``log``/``sin``/``cos``, ``addcmul``, ``lerp``,
     ``add(..., alpha=a)`` with ``|a| != 1`` or ``torch.compile`` (they fuse or use other
     approximations). ``torch.sqrt`` of float32 is NOT correctly rounded on CPU (MKL/Sleef paths):
     square roots and divisions are taken in float64 and rounded once to float32, which is exact
     (:func:`fastddpm.noise.sqrt_f32`, :func:`fastddpm.noise.div_f32`).
2. Parenthesisation is as written in this file (``a + b + c`` means ``(a + b) + c``); every
   constant is the exact float32 value given below (hex literals in C++, ``float.fromhex`` here).
3. Inputs of another dtype are converted to float32 on load (exact for fp16/bf16; float64 noise is
   rounded to nearest), outputs are rounded to nearest even on store (bf16 and fp16 too).
4. The transcendental functions are these (Cephes single precision, S. Moshier; about 1 ulp):

   ``round_small(x) = (x + ROUND_MAGIC) - ROUND_MAGIC`` (round to nearest even, ``|x| < 2**22``).

   ``log_f32(x)`` for normal ``x > 0``::

       ix = bits(x);  e = float32(int32(ix >> 23) - 126);  f = from_bits((ix & 0x7fffff) | 0x3f000000)
       small = f < SQRTH;  e = e - (small ? 1 : 0);  f = (f + (small ? f : 0)) - 1
       z = f * f;  z2 = z * z
       p01 = (LOG_P7 * f) + LOG_P8;  p23 = (LOG_P5 * f) + LOG_P6
       p45 = (LOG_P3 * f) + LOG_P4;  p67 = (LOG_P1 * f) + LOG_P2
       q0 = (p23 * z) + p01;  q1 = (p67 * z) + p45
       y = (((LOG_P0 * z2) + q1) * z2) + q0;  y = (y * f) * z
       y = y + (LOG_Q1 * e);  y = y + (-0.5 * z)
       log = (f + y) + (LOG_Q2 * e)

   ``sincos_2pi_f32(u)`` for ``0 <= u <= 1`` (sin and cos of ``2 pi u``)::

       q = round_small(4 * u);  r = u - (0.25 * q);  a = r * TWO_PI;  z = a * a
       ps = (((((SIN_P0 * z) + SIN_P1) * z) + SIN_P2) * z) * a + a           # ((.. * z) * a) + a
       pc = ((((((COS_P0 * z) + COS_P1) * z) + COS_P2) * z) * z - (0.5 * z)) + 1
       k = int32(q) & 3;  (sv, cv) = k & 1 ? (pc, ps) : (ps, pc)
       sin = k & 2 ? -sv : sv;  cos = (k + 1) & 2 ? -cv : cv

   ``exp_f32(x)`` for any float32 (NaN kept, 0 below about -104, +inf above about 89)::

       xc = isnan(x) ? 0 : x;  xc = xc < EXP_LO ? EXP_LO : xc;  xc = xc > EXP_HI ? EXP_HI : xc
       n = round_small(xc * LOG2E);  r = xc - (n * EXP_C1);  r = r - (n * EXP_C2);  z = r * r
       y = EXP_P0;  y = (y * r) + EXP_Pk  for k = 1..5;  y = ((y * z) + r) + 1
       ni = int32(n);  n1 = ni >> 1 (arithmetic);  n2 = ni - n1
       y = (y * from_bits((n1 + 127) << 23)) * from_bits((n2 + 127) << 23)
       exp = isnan(x) ? x : y

   Sequences with ``a*b + c`` shapes are written as two roundings on purpose: a backend that has
   a cheaper FMA must not use it here (rule 1).

What is *not* covered: the dynamic-thresholding quantile ``s`` is computed once, by shared torch
code (:func:`fastddpm.reference.dynamic_threshold`), from the bitwise-identical float32 ``x0`` of
the first pass, so it is identical too; the float64 reference (float64 inputs) is a separate,
high-precision spec that the float32 path is compared with by tolerance, not bits.

Memory layout seen by kernels
-----------------------------
Every tensor argument is viewed as ``[B, N]`` (N = elements per sample) with a per-sample stride
(``*_stride_b``, in elements) and unit stride inside a sample; the launcher makes inputs that are not
like that contiguous first. The learned-variance half of a ``2C``-channel model output is the same
buffer at element offset ``N`` with the same per-sample stride. Outputs are written ``[B, N]``
contiguous (``prev``, ``x0``) or with their own per-sample stride.
"""

from __future__ import annotations

# --- coefficient columns of the per-step table -------------------------------------------------
COEF_CX = 0  # x0 = CX * x + CM * m
COEF_CM = 1
COEF_EX = 2  # eps = EX * x + EM * m + E0 * x0
COEF_EM = 3
COEF_E0 = 4
COEF_P0 = 5  # mean = P0 * x0 + PX * x + PE * eps
COEF_PX = 6
COEF_PE = 7
COEF_STD = 8  # fixed standard deviation of the added noise
COEF_LVA = 9  # learned: std = exp(0.5 * (LVA * v + LVB))
COEF_LVB = 10
COEF_GATE = 11  # 1.0 when noise is added at this step, else 0.0
NCOEF = 12

# q_sample table columns
QS_A = 0  # sqrt(abar_t)
QS_B = 1  # sqrt(1 - abar_t)

# --- kernel modes (compile-time constants in Triton, template/switch in C++) -------------------
CLIP_NONE = 0
CLIP_RANGE = 1
CLIP_THRESHOLD = 2

VAR_FIXED = 0
VAR_LEARNED = 1  # the model's extra C channels give a log variance via LVA, LVB

NOISE_NONE = 0  # deterministic update (DDIM eta=0): z is never read or made
NOISE_TENSOR = 1  # z is read from a caller-provided tensor
NOISE_PHILOX = 2  # z is made in the kernel from the counter-based generator

# --- Philox streams: which use a normal number is drawn for ------------------------------------
STREAM_STEP = 0  # z added by a reverse (ddpm/ddim) step at timestep t
STREAM_QSAMPLE = 1  # noise of the forward process q(x_t | x_0) at timestep t (training)
STREAM_INIT = 2  # x_T that starts sampling (drawn with t = num_train_timesteps)
STREAM_SDE = 3  # z of a stochastic multistep solver step (dpmpp_2m_sde) at timestep t

# --- multistep solvers (DPM-Solver++, UniPC): columns of the per-step table coef[S, NMS] ----------
# Per step i (model output m at x = x_i; D1..D3 the data predictions of steps i-1..i-3; xp the
# previous corrected sample), every product rounded, sums left to right, no fused multiply-add:
#     D0 = CX * x + CM * m                                         then clipped as the DDPM step
#     xc = KX * x + KXP * xp + KD0 * D0 + KD1 * D1 + KD2 * D2 + KD3 * D3    (UniPC's corrector)
#     x' = PX * xc + PD0 * D0 + PD1 * D1 + PD2 * D2 + PZ * z              (the solver update)
#     x <- x', xp <- xc, D3 <- D2, D2 <- D1, D1 <- D0
# ``+ PZ * z`` is left out entirely under NOISE_NONE. The kernels keep D1..D3 in a ring
# ``hist[3, B, N]``: at step i, D_k is slot (i - k) % 3 and D0 is written to slot i % 3 (the slot
# of D3, read before it is overwritten, element by element).
MS_CX = 0
MS_CM = 1
MS_KX = 2
MS_KXP = 3
MS_KD0 = 4
MS_KD1 = 5
MS_KD2 = 6
MS_KD3 = 7
MS_PX = 8
MS_PD0 = 9
MS_PD1 = 10
MS_PD2 = 11
MS_PZ = 12
NMS = 13
MS_HIST = 3  # slots of the data-prediction ring buffer

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# --- float32 constants of the noise and step math (exact float32 values; see "Bitwise rules") ---
_f = float.fromhex
UNIFORM_SCALE = _f("0x1.fffffep-32")  # 4.6566127342e-10 in float32: uint32 -> [0, 1)
UNIFORM_MIN = _f("0x1.ad7f2ap-24")  # 1e-7 in float32: smallest uniform fed to the log
TWO_PI = _f("0x1.921fb6p+2")  # 2 pi in float32
ROUND_MAGIC = _f("0x1.8p+23")  # 1.5 * 2**23: (x + M) - M rounds to an integer
# log_f32 (Cephes logf.c): P0..P8 from the highest degree, Q1 + Q2 = log(2) split in two
LOG_P0 = _f("0x1.204376p-4")
LOG_P1 = _f("-0x1.d7a37p-4")
LOG_P2 = _f("0x1.de4a34p-4")
LOG_P3 = _f("-0x1.fcba9ep-4")
LOG_P4 = _f("0x1.23d37ep-3")
LOG_P5 = _f("-0x1.555cap-3")
LOG_P6 = _f("0x1.999d58p-3")
LOG_P7 = _f("-0x1.fffff8p-3")
LOG_P8 = _f("0x1.555554p-2")
LOG_Q1 = _f("-0x1.bd0106p-13")
LOG_Q2 = _f("0x1.63p-1")
SQRTH = _f("0x1.6a09e6p-1")  # sqrt(1/2)
# sincos_2pi_f32 (Cephes sinf.c / cosf.c minimax polynomials on [-pi/4, pi/4])
SIN_P0 = _f("-0x1.9943f2p-13")
SIN_P1 = _f("0x1.11073cp-7")
SIN_P2 = _f("-0x1.555546p-3")
COS_P0 = _f("0x1.99eb9cp-16")
COS_P1 = _f("-0x1.6c0c34p-10")
COS_P2 = _f("0x1.55554ap-5")
# exp_f32 (Cephes expf.c): P0..P5 from the highest degree, C1 + C2 = log(2) split in two
EXP_LO = -104.0
EXP_HI = 89.0
LOG2E = _f("0x1.715476p+0")
EXP_C1 = _f("0x1.63p-1")
EXP_C2 = _f("-0x1.bd0106p-13")
EXP_P0 = _f("0x1.a0d2cep-13")
EXP_P1 = _f("0x1.6e879cp-10")
EXP_P2 = _f("0x1.11121p-7")
EXP_P3 = _f("0x1.555382p-5")
EXP_P4 = _f("0x1.555554p-3")
EXP_P5 = _f("0x1p-1")
del _f
