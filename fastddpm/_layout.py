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
and standard normal ``z`` is (all arithmetic in float32)::

    x0   = CX * x + CM * m                                    # predict x_0 (eq. 15 of Ho et al.)
    x0   = clamp(x0, -clip_range, clip_range)                 # CLIP_MODE == CLIP_RANGE
    x0   = clamp(x0, -s[b], s[b]) / s[b]                      # CLIP_MODE == CLIP_THRESHOLD
    eps  = EX * x + EM * m + E0 * x0                          # epsilon, used by DDIM (PE != 0)
    mean = P0 * x0 + PX * x + PE * eps                        # posterior mean (eq. 7) / DDIM (eq. 12)
    std  = STD                                                # VAR_MODE == VAR_FIXED
    std  = exp(0.5 * (LVA * v + LVB))                         # VAR_MODE == VAR_LEARNED (log-variance)
    prev = mean + std * z            if GATE != 0             # noise is added only where GATE is 1
    prev = mean                      otherwise

``X0_ONLY`` mode writes only the (clipped, not thresholded) ``x0`` in float32; it is the first pass
of dynamic thresholding, whose per-sample quantile ``s`` then feeds the fused pass.

q_sample reads a ``[T, 2]`` float32 table ``(sqrt(abar_t), sqrt(1 - abar_t))`` indexed by ``t[b]``::

    x_t = QA[t] * x0 + QB[t] * z

Counter-based noise (Philox4x32-10)
-----------------------------------
When no noise tensor is given, ``z`` is a pure function of
``(seed, global sample index g = sample_offset + b, timestep value t, element index e, stream)``:

* key     ``(k0, k1) = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)``  (seed: int64 bit pattern)
* counter ``(c0, c1, c2, c3) = (e >> 2, g & 0xffffffff, t & 0xffffffff, stream | (g >> 32) << 8)``
* ``Philox4x32-10(counter, key)`` gives four uint32 ``r0..r3``; element ``e`` takes normal number
  ``n[e & 3]`` where, as in Triton's ``tl.randn4``::

      u_i  = (int32(r_i) < 0 ? -int32(r_i) - 1 : int32(r_i)) * 4.6566127342e-10     # in [0, 1)
      ra   = sqrt(-2 * log(max(u0, 1e-7))),  n0 = ra * cos(2*pi*u1),  n1 = ra * sin(2*pi*u1)
      rb   = sqrt(-2 * log(max(u2, 1e-7))),  n2 = rb * cos(2*pi*u3),  n3 = rb * sin(2*pi*u3)

* ``e`` is the flat index inside one sample (``0 <= e < C*H*W``), so the value of an element never
  depends on the batch it was computed in. Streams keep the uses apart (see ``STREAM_*``).
* ``seed`` and ``sample_offset`` are read by every kernel from a device-resident int64 tensor
  ``rng = [seed, sample_offset]`` so a captured CUDA graph can be replayed for other batches.

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
UNIFORM_SCALE = 4.6566127342e-10
UNIFORM_MIN = 1.0e-7
TWO_PI = 6.283185307179586
