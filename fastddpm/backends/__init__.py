"""Fused backends. Each module here (``cpu``, ``cuda``, ``triton``) exposes the same three launchers.

The public ops in :mod:`fastddpm.ops` validate inputs, compute the per-step coefficient table in
float64 (:mod:`fastddpm.schedule`), and hand every backend tensors already shaped as the kernel
contract of :mod:`fastddpm._layout` wants them:

``step(x, m, v, noise, prev_out, x0_out, coef, tval, rows, thresh, rng, *, clip_mode, clip_range,
var_mode, noise_mode, x0_only) -> None``
    x        [B, N] sample x_t, fp32/fp16/bf16, ``stride(1) == 1``, any ``stride(0)``.
    m        [B, N] model output (first C channels), same dtype as x, ``stride(1) == 1``.
    v        [B, N] learned-variance channels (same buffer as m at offset N) or None.
    noise    [B, N] caller noise (NOISE_TENSOR) or None.
    prev_out [B, N] output x_{t-1}, dtype of x, ``stride(1) == 1``; None when ``x0_only``.
    x0_out   [B, N] output x0 (dtype of x; float32 when ``x0_only``) or None (not written).
    coef     [R, NCOEF] float32 contiguous per-step coefficients.
    tval     [R] int64 timestep value of each row (the Philox counter's t).
    rows     [B] int64 row of ``coef``/``tval`` used by each sample (may be an expanded view with
             ``stride(0) == 0``, e.g. a device-resident step counter during CUDA-graph replay).
    thresh   [B] float32 per-sample dynamic threshold s (CLIP_THRESHOLD) or None.
    rng      [2] int64 ``(seed, sample_offset)``, read on the device by the kernel.
    clip_mode, var_mode, noise_mode: the ``CLIP_*``, ``VAR_*``, ``NOISE_*`` constants.
    clip_range: float, used when ``clip_mode == CLIP_RANGE``.
    x0_only: write only the clipped x0 (float32) -- first pass of dynamic thresholding.

``q_sample(x0, noise, out, table, t, rng, *, noise_mode) -> None``
    x0 [B, N], noise [B, N] or None, out [B, N] (dtype of x0), table [T, 2] float32
    ``(sqrt(abar), sqrt(1-abar))``, t [B] int64 (may have stride 0), rng [2] int64.
    Noise stream STREAM_QSAMPLE, counter t = t[b].

``randn(out, t, rng, *, stream) -> None``
    out [B, N] any float dtype, ``stride(1) == 1``; t [B] int64 (may have stride 0);
    fills out[b, e] with the counter-based normal for (seed, sample_offset + b, t[b], e, stream).

``multistep(x, m, xp, hist, noise, x0_out, coef, tval, step, thresh, rng, *, clip_mode, clip_range,
noise_mode, x0_only) -> None``
    One step of a multistep solver (``MS_*`` columns of :mod:`fastddpm._layout`), in place.
    x        [B, N] float32 state x_i, overwritten with x_{i+1}, ``stride(1) == 1``.
    m        [B, N] model output at x_i (first C channels), fp32/fp16/bf16, ``stride(1) == 1``.
    xp       [B, N] float32 previous corrected sample (UniPC), overwritten with this step's xc.
    hist     [3, B, N] float32 ring of data predictions: D_k of step i is slot ``(i - k) % 3``; D0 is
             written to slot ``i % 3``. ``xp``/``hist`` may be None when ``x0_only``.
    noise    [B, N] caller noise (NOISE_TENSOR) or None.
    x0_out   [B, N] float32 output of the ``x0_only`` pass (D0, clipped under CLIP_RANGE), else None.
    coef     [S, NMS] float32 contiguous table (float64 too on the reference backend).
    tval     [S] int64 timestep of each step (the SDE noise counter's t, stream STREAM_SDE).
    step     [1] int64 device step counter i (the row of coef/tval; read on the device).
    thresh   [B] float32 dynamic threshold (CLIP_THRESHOLD) or None.
    rng      [2] int64 ``(seed, sample_offset)``.

Every launcher also has ``available() -> tuple[bool, str]`` saying whether it can run here and, if
not, why (no compiler, no GPU, triton missing, build failed, ...).

Given the same tensors every backend writes the same bits (the "Bitwise rules" of
:mod:`fastddpm._layout`; tests/test_bitwise.py), and every launcher accepts ``B == 0`` or ``N == 0``
and then launches nothing. A row or timestep index out of range raises on ``cpu`` (checked on the
host) and makes that sample's outputs NaN on ``cuda`` and ``triton`` (checked on the device).
"""
