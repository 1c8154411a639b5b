"""Model-based deconvolution: a per-voxel fit of flow, mean transit time, residue shape and delay.

Model: c(t) = F int a(u - tau) R(t - u) du with R(t) = 1 - G(t; lambda, MTT / lambda), the residue of
a gamma distribution of capillary transit times (Mouridsen, Friston, Hjort, Gyldensted, Ostergaard,
Kiebel: Bayesian estimation of cerebral perfusion using a physiological model of microvasculature,
NeuroImage 2006;33:570; Chappell et al. 2015, Verbena): lambda = 1 is the exponential (one-compartment)
residue, large lambda approaches a boxcar. F (1/s) is CBF before kH/rho scaling, MTT (s) the mean transit time, tau (s)
the tissue delay; R peaks at t = tau, so Tmax = tau.

Discretisation: the AIF is taken as piecewise linear between its samples, so the convolution at the
sample times is exact for that interpolant: c_k = F sum_j a_j w_{k-j} with hat-function weights
w_n = [Q((n+1) dt) - 2 Q(n dt) + Q((n-1) dt)] / dt, Q the second antiderivative of R (closed form in
regularised incomplete gamma functions, ``residue_q``). No frame-grid rectangle rule (c = dt A b) is
involved, which is what biases truncated SVD at clinical TR.

Fit: F enters linearly and is projected out (F = max(<y, c> / <y, y>, 0)). Every voxel is scored
against a grid of unit-flow model curves (lambda x MTT x tau) by one matrix product; the best grid
point is refined by one parabolic step in log MTT and in tau on the grid's own residuals, then the
model is evaluated exactly at the refined point and kept if it fits better. Further rounds of parabolic
steps on the exact model follow. Everything after the matrix product runs per voxel in one numba kernel
(``_kernels._model_select``; its plain numpy twin is ``tests/naive.py`` ``model_select``).

Voxels whose least-squares fit lands on a bound or in the tails of weak half-normal priors are fitted
again with the priors (the same kernel, the objective penalised: PRIOR_*); voxels the model still does
not fit take oSVD's answer in the pipeline (``fit_status``, FALLBACK_*). Measured: README, method step 5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammainc

from perfusion._kernels import deconv as _kernels
from perfusion._kernels import parallel as _parallel
from perfusion.quantify import deconvolution

#: Residue shapes (lambda) on the grid: 1 exponential ... 100 nearly a boxcar. Five values: a finer
#: set (8 values, 1-100) was slower and, at SNR 150, fitted noise into the shape (phantom CBF error
#: 9.1 % vs 7.3 %).
LAMBDAS = (1.0, 2.0, 4.0, 10.0, 100.0)

#: Bounds of the fit. MTT in s: below 1 s the residue decays within a frame at clinical TR and,
#: with noise, the fit trades a spike of flow for a short MTT (measured on the phantom: CBF of
#: MTT-2-s blocks overestimated up to 4x with a 0.3 s bound); above 40 s beyond any tissue.
MTT_BOUNDS_S = (1.0, 40.0)
#: Delay in s relative to the AIF: tissue can lead a downstream AIF slightly.
DELAY_BOUNDS_S = (-3.0, 12.0)

#: Grid resolution: MTT values (geometric between the bounds) and the delay step as a fraction of TR.
N_GRID_MTT = 20
DELAY_STEP_TR = 0.5

#: Entries of the unit-response table per shape (log-MTT spacing 0.007: linear interpolation error
#: about 1e-5 relative). With it every model evaluation in the refinement costs O(N), not a convolution.
TABLE_SIZE = 512

#: Rounds of exact parabolic refinement after the grid step (each halves the step).
N_EXACT_ROUNDS = 3

#: Residue shapes refined per voxel: the best grid point of each of the N best shapes is refined and
#: the better fit kept (the coarse grid alone picked the wrong shape on noise-free curves).
N_SHAPES_REFINED = 3

#: Weak priors of the fit (Mouridsen et al. 2006 fit this model with priors, by Bayesian inference):
#: the least-squares residual plus the noise variance times a^2 + b^2, that is minus twice the log
#: posterior up to a constant for Gaussian noise. a = (ln MTT - ln PRIOR_MTT_S) / PRIOR_LOG_MTT_SD
#: below PRIOR_MTT_S and 0 above it; b = (tau - PRIOR_DELAY_S) / PRIOR_DELAY_SD_EARLY_S before
#: PRIOR_DELAY_S and 0 after it: half-normal priors that leave the physiological range flat (no pull
#: on a fit the data decide: a two-sided prior, MTT 4 s x/ 2 and tau SD 3 s late, raised the Bezier
#: DRO's residue-shape CBF errors from 0.3-3 % to 10-20 % at its SNR 20) and rise towards the lower
#: bounds, where the fits collected: at coarse TR and SNR 20-50 MTT, shape and delay trade along a
#: flat valley (forcing tau >= -0.5 s raised the residual of the realistic head's fits with tau < -1 s
#: by a median 1.3 noise variances), and the prior picks its point nearest the physiological range.
#: The noise variance of each voxel is estimated from its best unpenalised grid residual / (N - 4)
#: (an upper bound: the grid's residual includes its discretisation). Measured: README, method step 5.
PRIOR_MTT_S = 2.0
PRIOR_LOG_MTT_SD = float(np.log(2.0) / 2)
PRIOR_DELAY_S = 0.0
PRIOR_DELAY_SD_EARLY_S = 0.5
PRIOR_WEIGHT = 1.0
#: The priors apply only where the least-squares fit needs them: on a bound, or with a penalty above
#: this (beyond 2 SD into a half-normal's tail: MTT < 1.4 s or tau < -1 s); elsewhere the fit is plain
#: least squares (any prior, even flat on the physiological side, moved the Bezier DRO's per-voxel fits
#: at SNR 20, whose delays scatter +/- 1.5 s, and with them its median CBF by 5-10 %).
#: A fit on a bound or in the MTT tail is replaced by the fit with the priors. A fit whose delay alone is
#: in the early tail keeps its flow, MTT and shape and takes the prior fit's delay as Tmax only: taking
#: the whole prior fit there raised flow in the early half of a symmetric delay scatter only, and with it
#: the Bezier DRO's median CBF (gamma residue 6.7 -> 17.0 %, boxcar 16.7 -> 21.1 %), while its Tmax is
#: what keeps the realistic head's Tmax < -1 s under 2 % (measured: README, method step 5).
PRIOR_REFIT_PENALTY = 4.0

#: Per-voxel fallback to oSVD (deconvolution.py) where the model does not fit the curve: the fit sits
#: on a bound of MTT or delay (a bound is where the optimiser stopped, not an estimate), it is not
#: valid, or its residual exceeds FALLBACK_SSE_RATIO times oSVD's. oSVD fits more degrees of freedom,
#: so its residual is the smaller one on good fits: model / oSVD residual median 1.4-1.5, 99.5th
#: percentile 3.4-3.8 on the realistic phantom (TR 1.5-2 s, SNR 30). Measured on the realistic head with
#: lesions (flip 60 and 30, seeds 0-1, SNR 30): the model's CBF scatter about the truth (median |log error|
#: about its median) is the same for ratios 3-5 (0.27-0.40) as below 3 (0.32-0.33), so 3 sent good fits
#: to oSVD (0.6-3 % of voxels, and 2 of the 14 OSIPI curves at ratios 3.2-3.3); above 5 it rises to
#: 0.29-0.67 where oSVD's stays 0.15-0.22.
FALLBACK_SSE_RATIO = 5.0
#: ... and only where that residual exceeds this fraction of the curve's energy sum c^2 (R^2 < 1 - 1e-6):
#: on noise-free curves both residuals are rounding and their ratio means nothing.
FALLBACK_SSE_FLOOR = 1e-6

#: fit_status codes (per voxel): where the maps' CBF, MTT and Tmax come from.
STATUS_MODEL, STATUS_BOUND, STATUS_RESIDUAL, STATUS_INVALID = 0, 1, 2, 3
STATUS_NAMES = {STATUS_MODEL: "model", STATUS_BOUND: "model at a bound of MTT or delay: oSVD",
                STATUS_RESIDUAL: f"model residual > {FALLBACK_SSE_RATIO:g} x oSVD's: oSVD",
                STATUS_INVALID: "model fit failed: oSVD"}

#: Voxels per chunk (one float32 projection matrix of chunk x grid size, 8.6 MB at 1024 x 2100;
#: one chunk per thread at a time).
CHUNK = _parallel.CHUNK


def residue_q(x, mtt, lam):
    """Second antiderivative Q(x) = int_0^x int_0^y R(s) ds dy of R = 1 - G(.; lam, mtt/lam); Q = 0 for x <= 0.

    With theta = mtt / lam and G_k the gamma CDF of shape k and scale theta:
    Q = x^2/2 (1 - G_lam) + lam theta x G_(lam+1) - lam (lam+1) theta^2 / 2 G_(lam+2).
    """
    x = np.maximum(np.asarray(x, dtype=np.float64), 0.0)
    mtt = np.asarray(mtt, dtype=np.float64)
    lam = np.asarray(lam, dtype=np.float64)
    th = mtt / lam
    z = x / th
    return (0.5 * x * x * (1.0 - gammainc(lam, z)) + lam * th * x * gammainc(lam + 1.0, z)
            - 0.5 * lam * (lam + 1.0) * th * th * gammainc(lam + 2.0, z))


def residue_weights(mtt, lam, *, tr: float, n: int) -> np.ndarray:
    """Hat-function weights w_0..w_(n-1) (s) of R for a piecewise-linear input; mtt and lam broadcast,
    the result has their broadcast shape + (n,)."""
    mtt = np.asarray(mtt, dtype=np.float64)[..., None]
    lam = np.asarray(lam, dtype=np.float64)[..., None]
    k = np.arange(-1, n + 1) * tr
    q = residue_q(k, mtt, lam)
    return (q[..., 2:] - 2.0 * q[..., 1:-1] + q[..., :-2]) / tr


def delayed(aif: np.ndarray, *, tr: float, tau) -> np.ndarray:
    """AIF samples delayed by ``tau`` s (scalar or array): a(t_k - tau) by linear interpolation, 0 before
    the first sample and the last value after the end. Shape tau.shape + (N,)."""
    aif = np.asarray(aif, dtype=np.float64)
    n = aif.size
    x = np.arange(n) - np.asarray(tau, dtype=np.float64)[..., None] / tr
    j = np.clip(np.floor(x).astype(np.int64), 0, n - 2)
    w = x - j
    out = aif[j] * (1.0 - w) + aif[j + 1] * w
    out = np.where(x < 0, 0.0, out)
    return np.where(x >= n - 1, aif[-1], out)


def causal_convolve(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_j a_j w_(k-j) for k < N along the last axis (broadcasting), by FFT with zero padding."""
    n = a.shape[-1]
    size = 2 * n
    return np.fft.irfft(np.fft.rfft(a, size) * np.fft.rfft(w, size), size)[..., :n]


def extension(tr: float) -> int:
    """Samples appended after the last frame (the AIF held at its last value) so that a negative delay
    down to DELAY_BOUNDS_S[0] can be read off the unit response."""
    return int(np.ceil(-DELAY_BOUNDS_S[0] / tr)) + 2


def unit_response(aif: np.ndarray, *, tr: float, mtt, lam) -> np.ndarray:
    """Y = a * R at the sample times, over N + extension(tr) samples (the AIF held at its last value
    beyond the series); mtt and lam broadcast."""
    aif = np.asarray(aif, dtype=np.float64)
    ext = extension(tr)
    a_ext = np.concatenate([aif, np.full(ext, aif[-1])])
    return causal_convolve(a_ext, residue_weights(mtt, lam, tr=tr, n=a_ext.size))


def delay_response(y_ext: np.ndarray, *, tr: float, tau, n: int) -> np.ndarray:
    """y_tau(t_k) = Y(t_k - tau) for k < n, Y read by linear interpolation from its samples (0 before
    the first). Convolution commutes with the shift, so this equals convolving the AIF delayed by
    linear interpolation (up to the AIF's first samples, its baseline, which a negative delay drops).
    ``y_ext``: (..., M) with leading shape equal to tau's (or 1-D with a scalar tau)."""
    y_ext = np.asarray(y_ext, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
    x = np.arange(n) - tau[..., None] / tr
    j = np.clip(np.floor(x).astype(np.int64), 0, y_ext.shape[-1] - 2)
    g = np.clip(x - j, 0.0, 1.0)
    lo = np.take_along_axis(y_ext, j, axis=-1)
    hi = np.take_along_axis(y_ext, j + 1, axis=-1)
    return np.where(x < 0, 0.0, lo * (1.0 - g) + hi * g)


def model_curves(aif: np.ndarray, *, tr: float, mtt, lam, tau) -> np.ndarray:
    """Unit-flow model curves int a(u - tau) R(t - u) du at the sample times; parameters broadcast."""
    n = np.asarray(aif).size
    mtt_b, lam_b, tau_b = np.broadcast_arrays(np.asarray(mtt, float), np.asarray(lam, float), np.asarray(tau, float))
    return delay_response(unit_response(aif, tr=tr, mtt=mtt_b, lam=lam_b), tr=tr, tau=tau_b, n=n)


def exp_convolution(a: np.ndarray, *, tr: float, mtt) -> np.ndarray:
    """The lambda = 1 case by its exact recursion (an independent check of the weights):
    y_(k+1) = E y_k + a_k I0 + m_k I1, E = exp(-dt/MTT), I0 = MTT (1 - E),
    I1 = dt I0 - MTT^2 (1 - E (1 + dt/MTT)), m_k the slope of a on [t_k, t_(k+1)]."""
    mtt = np.asarray(mtt, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    e = np.exp(-tr / mtt)
    i0 = mtt * (1 - e)
    i1 = tr * i0 - mtt ** 2 * (1 - e * (1 + tr / mtt))
    lead = np.broadcast_shapes(mtt.shape, a.shape[:-1])
    out = np.zeros(lead + a.shape[-1:])
    y = np.zeros(lead)
    for k in range(a.shape[-1] - 1):
        y = e * y + a[..., k] * i0 + (a[..., k + 1] - a[..., k]) / tr * i1
        out[..., k + 1] = y
    return out


@dataclass(frozen=True)
class ModelOperator:
    """What does not depend on the tissue: the AIF, the grid and its unit-flow model curves."""

    aif: np.ndarray  # 1/s, (N,)
    tr: float
    lambdas: np.ndarray  # (G_l,)
    mtts: np.ndarray  # (G_m,)
    taus: np.ndarray  # (G_t,)
    norms: np.ndarray  # (G,) |y_g| of the grid's unit-flow model curves y_g (shape, MTT, tau)
    unit32: np.ndarray  # (N, G) float32: the curves divided by their norms, transposed, for the projections
    table_log_mtt: np.ndarray  # (T,) uniform fine log-MTT grid of the response table
    table: np.ndarray  # (G_l, T, N + extension) unit responses Y = a * R, interpolated linearly in log MTT
    # (6,) centre of log MTT, 1 / SD below, above; of tau (s), 1 / SD below, above: _kernels._prior_penalty
    prior: np.ndarray
    pen: np.ndarray  # (G,) the prior penalty of each grid point
    fallback: deconvolution.Deconvolver | None = None  # oSVD of the same AIF, for voxels the model does not fit


def prepare(aif: np.ndarray, *, tr: float, fallback: bool = True) -> ModelOperator:
    """The grid, its unit-flow curves and response table for an AIF (delta R2*, 1/s, (N,)) sampled every
    ``tr`` s, and (``fallback``) the oSVD operator of the same AIF."""
    aif = np.asarray(aif, dtype=np.float64)
    lams = np.asarray(LAMBDAS)
    mtts = np.geomspace(*MTT_BOUNDS_S, N_GRID_MTT)
    taus = np.arange(DELAY_BOUNDS_S[0], DELAY_BOUNDS_S[1] + 1e-9, DELAY_STEP_TR * tr)
    curves = model_curves(aif, tr=tr, mtt=mtts[None, :, None], lam=lams[:, None, None], tau=taus[None, None, :])
    curves = curves.reshape(-1, aif.size)
    norms = np.sqrt(np.einsum("gn,gn->g", curves, curves))
    table_log_mtt = np.linspace(np.log(MTT_BOUNDS_S[0]), np.log(MTT_BOUNDS_S[1]), TABLE_SIZE)
    table = unit_response(aif, tr=tr, mtt=np.exp(table_log_mtt)[None, :], lam=lams[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = np.where(norms[:, None] > 0, curves / norms[:, None], 0.0)
    prior = np.array([np.log(PRIOR_MTT_S), 1.0 / PRIOR_LOG_MTT_SD, 0.0, PRIOR_DELAY_S, 1.0 / PRIOR_DELAY_SD_EARLY_S,
                      0.0])
    pen = prior_penalty(np.log(mtts)[None, :, None], taus[None, None, :], prior)
    pen = np.broadcast_to(pen, (lams.size, mtts.size, taus.size)).reshape(-1).copy()
    return ModelOperator(aif=aif, tr=float(tr), lambdas=lams, mtts=mtts, taus=taus, norms=norms,
                         unit32=np.ascontiguousarray(unit.T.astype(np.float32)), table_log_mtt=table_log_mtt,
                         table=table, prior=prior, pen=pen,
                         fallback=deconvolution.prepare(aif, tr=tr, method="osvd") if fallback else None)


def prior_penalty(log_mtt, tau, prior) -> np.ndarray:
    """The priors' penalty in units of the noise variance (numpy form of _kernels._prior_penalty)."""
    a = np.asarray(log_mtt, dtype=np.float64) - prior[0]
    b = np.asarray(tau, dtype=np.float64) - prior[3]
    return (a * np.where(a < 0, prior[1], prior[2])) ** 2 + (b * np.where(b < 0, prior[4], prior[5])) ** 2


def noise_weight(q: np.ndarray, cc: np.ndarray, n_t: int) -> np.ndarray:
    """Per voxel, PRIOR_WEIGHT x the noise variance estimated as the best unpenalised grid residual
    (cc - max(q, 0)^2, q the normalised projections (n_vox, G)) / (n_t - 4), float64 (n_vox,)."""
    qmax = np.maximum(q.max(axis=1).astype(np.float64), 0.0)
    return PRIOR_WEIGHT * np.maximum(cc - qmax * qmax, 0.0) / max(n_t - 4, 1)


@dataclass(frozen=True)
class ModelFit:
    """Per voxel: flow F (1/s), MTT (s), residue shape lambda, delay tau (s), residual sum of squares,
    valid (bool), and Tmax (s): the delay, or where it lies in the delay prior's early tail the delay
    of the fit with the priors (``fit``). Invalid voxels are NaN."""

    flow: np.ndarray
    mtt: np.ndarray
    lam: np.ndarray
    delay: np.ndarray
    sse: np.ndarray
    valid: np.ndarray
    tmax: np.ndarray


def _select(op: ModelOperator, c: np.ndarray, *, prior: bool) -> tuple[np.ndarray, ...]:
    """flow, log MTT, shape index, tau, residual of finite curves c (n_vox, N) by _kernels._model_select,
    least squares or (``prior``) with the priors weighted by each voxel's noise variance."""
    n = c.shape[0]
    out = np.empty((n, _kernels.OUT_SIZE))
    grid = (op.pen, op.norms, np.log(op.mtts), op.taus)
    settings = fit_settings(op)

    def work(sl):
        cs = c[sl]
        cc = np.einsum("vn,vn->v", cs, cs)
        # projections on the unit-norm grid curves in float32: they only pick grid points and the
        # neighbours' residuals of the first parabolic step; the chosen points are re-evaluated in float64
        q = cs.astype(np.float32) @ op.unit32
        s2 = noise_weight(q, cc, cs.shape[1]) if prior else np.zeros(cs.shape[0])
        _kernels._model_select(cs, cc, q, s2, grid, op.table, op.prior, settings, out[sl])

    _parallel.run_chunks(work, n, CHUNK)
    columns = (_kernels.OUT_FLOW, _kernels.OUT_LOGM, _kernels.OUT_SHAPE, _kernels.OUT_TAU, _kernels.OUT_SSE)
    flow, log_m, il, tau, sse = (out[:, j] for j in columns)
    return flow, log_m, il.astype(np.int64), tau, sse


def fit_settings(op: ModelOperator) -> np.ndarray:
    """The scalar settings of _kernels._model_select for ``op`` (_kernels.pack_fit): the response table's
    log-MTT grid, half a grid step in log MTT and in tau as the first refinement steps, the fit's bounds,
    N_SHAPES_REFINED shapes and N_EXACT_ROUNDS rounds."""
    t0, t1 = op.table_log_mtt[0], op.table_log_mtt[1]
    return _kernels.pack_fit(tr=op.tr, t0=t0, dt_table=t1 - t0, h_logm=0.5 * np.log(op.mtts[1] / op.mtts[0]),
                             h_tau=0.5 * (op.taus[1] - op.taus[0]), lo_logm=np.log(MTT_BOUNDS_S[0]),
                             hi_logm=np.log(MTT_BOUNDS_S[1]), lo_tau=DELAY_BOUNDS_S[0], hi_tau=DELAY_BOUNDS_S[1],
                             n_shapes=N_SHAPES_REFINED, rounds=N_EXACT_ROUNDS)


def _on_bound(log_m: np.ndarray, tau: np.ndarray) -> np.ndarray:
    return ((np.abs(log_m - np.log(MTT_BOUNDS_S[0])) < 1e-6) | (np.abs(log_m - np.log(MTT_BOUNDS_S[1])) < 1e-6)
            | (np.abs(tau - DELAY_BOUNDS_S[0]) < 1e-6) | (np.abs(tau - DELAY_BOUNDS_S[1]) < 1e-6))


def fit(op: ModelOperator, curves: np.ndarray) -> ModelFit:
    """Fit tissue curves (delta R2*, 1/s, (n_vox, N)); voxels with NaN or no positive fit are invalid.

    Least squares first. Voxels whose fit lands on a bound or in the MTT prior's tail (penalty above
    PRIOR_REFIT_PENALTY) are fitted again with the priors and keep that fit. Voxels whose delay alone
    lies in the delay prior's early tail keep their least-squares flow, MTT and shape, and take the
    delay of the fit with the priors as their Tmax only (``ModelFit.tmax``; module constants)."""
    c = np.asarray(curves, dtype=np.float64)
    finite = np.all(np.isfinite(c), axis=1)
    c = np.where(finite[:, None], c, 0.0)
    flow, log_m, il, tau, sse = _select(op, c, prior=False)
    tmax = tau.copy()
    if PRIOR_WEIGHT > 0:
        fitted = finite & (flow > 0)
        no_delay = np.full_like(tau, op.prior[3])
        whole = fitted & (_on_bound(log_m, tau) | (prior_penalty(log_m, no_delay, op.prior) > PRIOR_REFIT_PENALTY))
        delay_only = fitted & ~whole & (prior_penalty(log_m, tau, op.prior) > PRIOR_REFIT_PENALTY)
        again = np.flatnonzero(whole | delay_only)
        if again.size:
            new = _select(op, c[again], prior=True)
            keep = whole[again]
            for out, values in zip((flow, log_m, il, tau, sse), new, strict=True):
                out[again[keep]] = values[keep]
            tmax[again] = new[3]
    mtt, lam = np.exp(log_m), op.lambdas[il]
    valid = finite & (flow > 0)
    nan = np.where(valid, 1.0, np.nan)
    return ModelFit(flow=flow * nan, mtt=mtt * nan, lam=lam * nan, delay=tau * nan, sse=sse * nan, valid=valid,
                    tmax=tmax * nan)


def at_bound(fit: ModelFit) -> np.ndarray:
    """bool (n_vox,): valid fits whose MTT or delay lies on a bound of the fit (within 1e-6)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        lm = np.log(fit.mtt)
        on = ((np.abs(lm - np.log(MTT_BOUNDS_S[0])) < 1e-6) | (np.abs(lm - np.log(MTT_BOUNDS_S[1])) < 1e-6)
              | (np.abs(fit.delay - DELAY_BOUNDS_S[0]) < 1e-6) | (np.abs(fit.delay - DELAY_BOUNDS_S[1]) < 1e-6))
    return fit.valid & on


def fit_status(fit: ModelFit, sse_osvd: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """uint8 (n_vox,) STATUS_* per voxel: the model's fit kept, or why the voxel falls back to oSVD
    (``sse_osvd``: oSVD's residual sum of squares of the same curves, deconvolution.residual_sse;
    ``energy``: the curves' sum of squares, 1/s^2, (n_vox,))."""
    status = np.full(fit.valid.shape, STATUS_MODEL, np.uint8)
    with np.errstate(invalid="ignore"):
        poor = fit.sse > FALLBACK_SSE_RATIO * np.asarray(sse_osvd) + FALLBACK_SSE_FLOOR * np.asarray(energy)
    status[fit.valid & poor] = STATUS_RESIDUAL
    status[at_bound(fit)] = STATUS_BOUND
    status[~fit.valid] = STATUS_INVALID
    return status
