"""Voxel-wise gamma-variate fit of the first pass of delta R2* curves.

Model (DOMAIN.md): C(t) = K (t - t0)^alpha exp(-(t - t0) / beta) for t > t0, else 0. The fit works in
the equivalent peak form C = A (x / m)^alpha exp(alpha (1 - x / m)), x = t - t0, with A the peak value
(1/s) and m = alpha beta the time from t0 to the peak (s) (Madsen 1992, Phys Med Biol 37:1597, as
commonly cited): A, t0 and m are read off the data for the start, and the parameters have similar
scales, which the K form (K up to 1e40 at alpha 20) does not. K = A (e / m)^alpha, beta = m / alpha.

Fit window, per voxel, in frames of the input (NaN frames are skipped everywhere):
- peak: the largest finite sample, index p;
- foot: the last frame before p whose value is below ``rise_fraction`` (default 10 %) of the peak;
  a curve with no such frame has no baseline before its bolus and is invalid;
- the window starts max(``pre_frames`` (default 3), p - foot) frames before the foot (clipped at
  frame 0): t0 precedes the 10 % point by u m (u = 0.04, 0.21, 0.42 of the rise time m at alpha 1,
  3, 8), which is less than the 10 %-to-peak time (1 - u) m up to alpha about 12, and a few baseline
  samples pin t0;
- it ends with the first frame after p whose value is below ``tail_fraction`` (default 50 %) of the
  peak, that frame included; if the curve never falls that far, at the last frame. The tail beyond
  it, where recirculation and the plateau add to the first pass, is left out. 50 % rather than 30 or
  40 %: on the noise-free phantom (TR 1.5 s, recirculation and plateau) the tissue first-pass area
  for MTT 4-8 s is overestimated by 20-37 % at 50 % and by 23-47 % at 40 % (AIF: 10 % at both);
  with the recirculating pass alone, by 1-9 % at 50 % (AIF 0.02 %).
No bolus: a peak below ``min_snr`` times the noise SD (1.4826 median |first difference| / sqrt 2, a
robust estimate that the smooth bolus barely moves) is invalid without a fit.

Start: A = the peak sample, t0 = the foot's time, m = peak time - t0, alpha = (2.3548 m / FWHM)^2
(the Gaussian limit of the gamma variate; within 2 % of the exact relation for alpha >= 2) with the
FWHM from the half-peak crossings interpolated linearly, clipped to [1, 10]; alpha = 3 when the
curve does not fall to half its peak within the window.

Bounds (a fit that ends on one is invalid): A >= 0; t0 in [t(window start), t(peak sample)];
m in [0.1 TR, t(window end) - t(window start)], so beta = m / alpha > 0; alpha in ``ALPHA_BOUNDS``.
Iterations: bounded Levenberg-Marquardt (``perfusion._kernels.curves._gv_fit``): Marquardt-scaled damping
with Nielsen's update, parameters on a bound held there while the gradient pushes outwards, steps
projected onto the bounds, MINPACK's stopping tests, at most ``max_iter`` trial steps (a fit still
going then is invalid). On the default phantom the valid fits take a median of 11 steps (99th
percentile 58).

Validity: a voxel is valid when it has a bolus and a foot, the fit converged, no parameter is
within ``BOUND_MARGIN`` of a bound, and every output is finite. At low SNR the shape (alpha) and
t0 of a 4-parameter fit are poorly determined and often run to a bound: on the default phantom
(SNR 150, NAWM peak about 7 noise SDs) 67 % of the brain voxels are valid.

Units: times s, delta R2* 1/s, area 1/s * s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import gammaln, lambertw

from perfusion._kernels import curves as _kernels_curves
from perfusion._kernels import parallel as _parallel
from perfusion.units import MAX_TR_S

#: Shape bounds. A tissue curve with a long MTT (fast rise, exponential tail) is no gamma variate and
#: fits best with alpha near or below 1: on the noise-free phantom alpha is 2.8-3.2 at MTT 2 s but
#: 0.46-1.0 at MTT 8 s. 0.25 keeps all of those valid (0.5 lost one MTT-8-s block); on the noisy
#: phantom 0.25 / 0.5 / 1.0 leave 71 / 67 / 57 % of the tissue voxels valid. Above 20 the FWHM is
#: below m / 2, a couple of frames at clinical timing. The phantom's AIF has alpha 3.
ALPHA_BOUNDS = (0.25, 20.0)

#: Smallest m = alpha beta as a fraction of TR: a rise within a tenth of a frame is not resolved.
M_MIN_TR = 0.1

#: Relative margin inside a bound within which a fitted parameter counts as "at the bound".
BOUND_MARGIN = 1e-6

#: FWHM of a Gaussian in units of its SD, for the start value of alpha.
_FWHM_PER_SD = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class GammaFit:
    """Per voxel (n_vox,) arrays; NaN where ``valid`` is False.

    ``quality`` is the normalised RMSE: sqrt(SSE / n) / peak over the n finite samples of the fit
    window (0 is a perfect fit; about noise SD / peak for a good one).
    """

    k: np.ndarray = field(metadata={"unit": "1/s / s^alpha"})
    t0: np.ndarray = field(metadata={"unit": "s"})
    alpha: np.ndarray = field(metadata={"unit": "1"})
    beta: np.ndarray = field(metadata={"unit": "s"})
    area: np.ndarray = field(metadata={"unit": "1/s * s"})
    peak: np.ndarray = field(metadata={"unit": "1/s"})
    ttp: np.ndarray = field(metadata={"unit": "s"})
    fwhm: np.ndarray = field(metadata={"unit": "s"})
    quality: np.ndarray = field(metadata={"unit": "1"})
    valid: np.ndarray = field(metadata={"unit": "bool"})


def gamma_area(peak, m, alpha):
    """First-pass area int C dt = K beta^(alpha+1) Gamma(alpha+1) = A m e^alpha alpha^-(alpha+1)
    Gamma(alpha+1) in the peak form (1/s * s); arguments broadcast."""
    peak, m, alpha = (np.asarray(a, dtype=np.float64) for a in (peak, m, alpha))
    return peak * m * np.exp(alpha - (alpha + 1.0) * np.log(alpha) + gammaln(alpha + 1.0))


def gamma_fwhm(m, alpha):
    """Full width at half maximum (s): m (u2 - u1), u the two roots of alpha (ln u + 1 - u) = -ln 2,
    u = -W(-exp(-1 - ln 2 / alpha)) on the principal (u1) and -1 (u2) branches of Lambert's W."""
    m, alpha = np.asarray(m, dtype=np.float64), np.asarray(alpha, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = -np.exp(-1.0 - np.log(2.0) / alpha)
        u1 = -lambertw(z, 0).real
        u2 = -lambertw(z, -1).real
    return m * (u2 - u1)


def _windows(c: np.ndarray, t: np.ndarray, *, tr: float, rise_fraction: float, tail_fraction: float,
             pre_frames: int, min_snr: float):
    """Fit window [lo, hi), start values and bounds (n_vox, 4) for each row of c (see module docs), and
    the number of finite samples in each window. Rows that cannot be fitted get lo = hi = 0.
    (_kernels_curves._gv_windows; its numpy twin is tests/naive_curves.py gamma_windows.)"""
    n_vox = c.shape[0]
    lo, hi, n_used = (np.empty(n_vox, np.int64) for _ in range(3))
    p0, lower, upper = (np.empty((n_vox, 4)) for _ in range(3))
    win = _kernels_curves.pack_windows(rise_fraction=float(rise_fraction), tail_fraction=float(tail_fraction),
                                       pre_frames=int(pre_frames), min_snr=float(min_snr), m_min=M_MIN_TR * tr,
                                       alpha_lo=ALPHA_BOUNDS[0], alpha_hi=ALPHA_BOUNDS[1], fwhm_per_sd=_FWHM_PER_SD)
    _parallel.run_chunks(lambda sl: _kernels_curves._gv_windows(c[sl], t, win, lo[sl], hi[sl], p0[sl], lower[sl],
                                                                upper[sl], n_used[sl]), n_vox)
    return lo, hi, p0, lower, upper, n_used


def fit_gamma_variate(curves: np.ndarray, *, tr: float, t_first: float = 0.0, rise_fraction: float = 0.1,
                      tail_fraction: float = 0.5, pre_frames: int = 3, min_snr: float = 5.0,
                      max_iter: int = 100) -> GammaFit:
    """Fit a gamma variate to the first pass of each curve.

    curves: (n_vox, n_t) delta R2* in 1/s (float32 or float64; computed in float64); NaN frames are
    skipped. tr: frame spacing, s. t_first: time of the first frame, s (ttp and t0 are measured from
    the same origin). Window, start, bounds and validity are set out in the module docstring.

    Returns a ``GammaFit`` of (n_vox,) arrays. A voxel without a bolus, whose fit did not converge,
    ended on a bound or gave a non-finite value is NaN with ``valid`` False; it never raises.
    Raises ValueError for input that is not a 2-D array, fewer than 5 frames, or a TR outside
    (0, units.MAX_TR_S] (milliseconds given as seconds).
    """
    c_all = np.asarray(curves)
    if c_all.ndim != 2:
        raise ValueError(f"curves must be (n_vox, n_t), got shape {c_all.shape}")
    if c_all.shape[1] < 5:
        raise ValueError(f"a gamma variate has 4 parameters: need at least 5 frames, got {c_all.shape[1]}")
    if not (np.isfinite(tr) and 0 < tr <= MAX_TR_S):
        raise ValueError(f"tr must be in (0, {MAX_TR_S}] s, got {tr!r} (milliseconds given as seconds?)")
    if not np.isfinite(t_first):
        raise ValueError(f"t_first must be finite, got {t_first!r}")
    if not (0 < rise_fraction < tail_fraction < 1):
        raise ValueError("need 0 < rise_fraction < tail_fraction < 1, got "
                         f"{rise_fraction!r} and {tail_fraction!r}")
    if pre_frames < 0 or max_iter < 1:
        raise ValueError("pre_frames must be >= 0 and max_iter >= 1")

    c = np.ascontiguousarray(c_all if c_all.dtype in (np.float32, np.float64) else c_all.astype(np.float64))
    n_vox, n_t = c.shape
    t = float(t_first) + float(tr) * np.arange(n_t)
    lo, hi, p0, lower, upper, n_used = _windows(c, t, tr=float(tr), rise_fraction=rise_fraction,
                                                tail_fraction=tail_fraction, pre_frames=int(pre_frames),
                                                min_snr=min_snr)
    p = np.empty((n_vox, 4))
    sse = np.empty(n_vox)
    n_iter = np.empty(n_vox, dtype=np.int64)
    status = np.empty(n_vox, dtype=np.int64)
    max_iter = int(max_iter)
    _parallel.run_chunks(lambda sl: _kernels_curves._gv_fit(c[sl], t, lo[sl], hi[sl], p0[sl], lower[sl], upper[sl],
                                                            max_iter, p[sl], sse[sl], n_iter[sl], status[sl]), n_vox)
    margin = BOUND_MARGIN * (upper - lower)
    margin[:, 0] = 0.0  # A has no upper bound; A = 0 is caught below
    with np.errstate(invalid="ignore"):
        at_bound = np.any((p <= lower + margin) | (p >= upper - margin), axis=1)

    amp, t0, m, alpha = p.T
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        k = amp * np.exp(alpha * (1.0 - np.log(m)))
        beta = m / alpha
        area = gamma_area(amp, m, alpha)
        quality = np.sqrt(sse / n_used) / amp
        out = [k, t0, alpha, beta, area, amp, t0 + m, quality]
        valid = (status > 0) & ~at_bound & (amp > 0) & np.all([np.isfinite(a) for a in out], axis=0)
        fwhm = np.full(n_vox, np.nan)
        fwhm[valid] = gamma_fwhm(m[valid], alpha[valid])  # Lambert's W: the slowest of these, valid fits only
        valid &= np.isfinite(fwhm)
        out.insert(7, fwhm)
    nan = np.where(valid, 1.0, np.nan)
    return GammaFit(*(a * nan for a in out), valid=valid)  # type: ignore[misc]  # mypy cannot count the 8 maps


def evaluate(fit: GammaFit, t: np.ndarray) -> np.ndarray:
    """The fitted curves K (t - t0)^alpha exp(-(t - t0)/beta) at times t (s, same origin as the fit);
    (n_vox, n_t), NaN rows where the fit is invalid."""
    x = np.asarray(t, dtype=np.float64)[None, :] - fit.t0[:, None]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        xp = np.clip(x, 0.0, None)
        y = fit.k[:, None] * xp ** fit.alpha[:, None] * np.exp(-xp / fit.beta[:, None])
    return np.where(x > 0, y, np.where(np.isnan(fit.k)[:, None], np.nan, 0.0))
