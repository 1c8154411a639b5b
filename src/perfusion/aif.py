"""Arterial input function: automatic selection of arterial voxels, or a user mask.

Automatic selection (after Mouridsen et al. 2006, MRM 55:524, simplified; the clustering version
is tracked in issue 3): among voxels with a clean baseline (contrast-to-noise >= 5) and no
saturation (the signal never falls to within 3 noise SD of zero, nor to the delta R2* cap):
1. keep the 10 % with the largest area under delta R2*(t);
2. drop the 25 % most irregular of those (sum of squared second differences over squared area);
3. keep the earliest quarter by first moment (arteries fill first, veins and tissue later);
4. rank by peak height / FWHM (high and narrow) and keep the best ``n_voxels``.
The AIF is the mean delta R2* curve of the chosen voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .signal import MIN_SIGNAL_RATIO

#: Default number of arterial voxels averaged.
DEFAULT_N_VOXELS = 10

#: Voxels with baseline contrast-to-noise below this are never arterial candidates.
MIN_CNR = 5.0


class AifError(ValueError):
    """No usable arterial voxel (the pipeline adds the file name and the fix)."""


@dataclass(frozen=True)
class CurveFeatures:
    """Per-voxel shape features of delta R2* curves, each (n_vox,)."""

    peak: np.ndarray  # 1/s
    peak_frame: np.ndarray
    area: np.ndarray  # 1/s * s
    fwhm_frames: np.ndarray
    first_moment: np.ndarray  # frames
    irregularity: np.ndarray  # dimensionless
    cnr: np.ndarray
    saturated: np.ndarray  # bool


def curve_features(delta_r2s: np.ndarray, signal_ratio_min: np.ndarray, ratio_noise_sd: np.ndarray, *,
                   baseline: slice, tr: float) -> CurveFeatures:
    """Shape features of each row of ``delta_r2s`` (1/s, (n_vox, n_t)).

    ``signal_ratio_min`` is min_t S/S0 and ``ratio_noise_sd`` the baseline SD of S/S0, per voxel.
    """
    c = np.asarray(delta_r2s, dtype=np.float64)
    finite = np.all(np.isfinite(c), axis=1)
    c = np.where(finite[:, None], c, 0.0)
    peak_frame = np.argmax(c, axis=1)
    peak = c[np.arange(c.shape[0]), peak_frame]
    area = np.sum(c, axis=1) * tr
    above = c >= 0.5 * peak[:, None]
    fwhm = np.sum(above, axis=1).astype(np.float64)
    pos = np.clip(c, 0.0, None)
    t = np.arange(c.shape[1], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        first_moment = (pos @ t) / np.sum(pos, axis=1)
        d2 = np.diff(c, n=2, axis=1)
        irregularity = np.sum(d2 * d2, axis=1) / (area / tr) ** 2
        base_sd = np.std(c[:, baseline], axis=1, ddof=1)
        cnr = peak / base_sd
    saturated = (np.asarray(signal_ratio_min) <= MIN_SIGNAL_RATIO * 1.0001) | (
        np.asarray(signal_ratio_min) < 3.0 * np.asarray(ratio_noise_sd))
    bad = ~finite
    cnr = np.where(bad | ~np.isfinite(cnr), 0.0, cnr)
    return CurveFeatures(peak=peak, peak_frame=peak_frame, area=area, fwhm_frames=fwhm,
                         first_moment=np.where(bad, np.inf, first_moment),
                         irregularity=np.where(bad, np.inf, irregularity), cnr=cnr, saturated=saturated | bad)


def select_aif(features: CurveFeatures, *, n_voxels: int = DEFAULT_N_VOXELS) -> tuple[np.ndarray, dict]:
    """Indices of the automatically chosen arterial voxels (see the module docstring), and how many
    voxels each selection step kept."""
    f = features
    eligible = np.flatnonzero((f.cnr >= MIN_CNR) & ~f.saturated & (f.peak > 0) & (f.area > 0))
    if eligible.size == 0:
        raise AifError("no voxel has a clean, unsaturated bolus")
    steps = {"eligible": int(eligible.size)}
    n1 = max(min(eligible.size, 4 * n_voxels), int(np.ceil(0.10 * eligible.size)))
    c1 = eligible[np.argsort(-f.area[eligible], kind="stable")[:n1]]
    n2 = max(1, int(np.ceil(0.75 * c1.size)))
    c2 = c1[np.argsort(f.irregularity[c1], kind="stable")[:n2]]
    n3 = max(min(c2.size, n_voxels), int(np.ceil(0.25 * c2.size)))
    c3 = c2[np.argsort(f.first_moment[c2], kind="stable")[:n3]]
    score = f.peak[c3] / np.maximum(f.fwhm_frames[c3], 1.0)
    chosen = c3[np.argsort(-score, kind="stable")[:n_voxels]]
    steps.update(by_area=int(c1.size), regular=int(c2.size), earliest=int(c3.size), chosen=int(chosen.size))
    return np.sort(chosen), steps


def aif_quality(curve: np.ndarray, *, tr: float, baseline: slice, tissue_peak_frame: float, t0: float = 0.0) -> dict:
    """``t0`` (s) is the time of the curve's first frame; times in the summary are from the series start."""
    c = np.asarray(curve, dtype=np.float64)
    peak_frame = int(np.argmax(c))
    peak = float(c[peak_frame])
    base_sd = float(np.std(c[baseline], ddof=1)) if (baseline.stop - baseline.start) > 1 else float("nan")
    fwhm = int(np.sum(c >= 0.5 * peak))
    warnings = []
    if peak_frame > tissue_peak_frame:
        warnings.append("the AIF peaks after the average tissue curve: the chosen voxels may be venous or tissue")
    cnr = peak / base_sd if base_sd > 0 else float("inf")
    if cnr < 20:
        warnings.append(f"the AIF contrast-to-noise ratio is low ({cnr:.1f}); check the arterial voxels")
    return {
        "peak_delta_r2s_per_s": peak,
        "peak_time_s": t0 + peak_frame * tr,
        "fwhm_s": fwhm * tr,
        "cnr": cnr,
        "warnings": warnings,
    }
