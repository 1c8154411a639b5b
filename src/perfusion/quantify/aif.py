"""Arterial input function: automatic selection of arterial voxels, or a user mask.

Two automatic selections, both after Mouridsen et al. 2006 (MRM 55:524), among voxels with a clean
baseline (contrast-to-noise >= 5) and no saturation (the signal never falls to within 3 noise SD of
zero, nor to the delta R2* cap):
- ``cluster_aif`` (the pipeline's default, ``--aif-selection cluster``): keep the 10 % with the largest
  area, drop the 25 % most irregular, k-means of the unit-area curves seeded by first-moment quantiles,
  the earliest cluster, with a partial-volume rejection step of our own (one round by default, the
  paper's two on request);
- ``select_aif`` (``--aif-selection rank``): the same first two steps, then the earliest quarter by
  first moment, ranked by peak height / FWHM (high and narrow), the best ``n_voxels`` kept.
The AIF is the mean delta R2* curve of the chosen voxels.

Also here: ``auto_vof`` and ``scale_to_vof`` (venous voxels and the partial-volume scaling of the AIF
to the venous output function's area, ``--vof``) and ``aif_quality_score`` (a 0-1 score of an AIF with
its components and warnings, in every report).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perfusion._kernels import curves as _kernels_curves
from perfusion._kernels import parallel as _parallel
from perfusion.quantify.signal import MIN_SIGNAL_RATIO

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
    float32 or float64 curves, read as float64 (``_kernels_curves._curve_features``). A row with a
    non-finite value is saturated, with first moment and irregularity +inf and CNR 0.
    """
    c = np.asarray(delta_r2s)
    if c.ndim != 2:
        raise ValueError(f"delta_r2s must be (n_vox, n_t), got shape {c.shape}")
    c = np.ascontiguousarray(c if c.dtype in (np.float32, np.float64) else c.astype(np.float64))
    n_vox = c.shape[0]
    peak, area, fwhm, first_moment, irregularity, cnr = (np.empty(n_vox) for _ in range(6))
    peak_frame = np.empty(n_vox, np.int64)
    finite = np.empty(n_vox, bool)
    base, tr = np.arange(c.shape[1])[baseline], float(tr)
    _parallel.run_chunks(lambda sl: _kernels_curves._curve_features(
        c[sl], base, tr, peak[sl], peak_frame[sl], area[sl], fwhm[sl], first_moment[sl], irregularity[sl], cnr[sl],
        finite[sl]), n_vox)
    saturated = (np.asarray(signal_ratio_min) <= MIN_SIGNAL_RATIO * 1.0001) | (
        np.asarray(signal_ratio_min) < 3.0 * np.asarray(ratio_noise_sd))
    return CurveFeatures(peak=peak, peak_frame=peak_frame, area=area, fwhm_frames=fwhm, first_moment=first_moment,
                         irregularity=irregularity, cnr=cnr, saturated=saturated | ~finite)


#: Largest baseline noise (SD of S/S0) of a voxel that can show a bolus: background voxels outside
#: the head (Rayleigh noise, SD/mean 0.52) fail it, arteries (SD/S0 a few %) pass.
MAX_BASELINE_NOISE = 0.2


def shows_bolus(signal_ratio_min: np.ndarray, ratio_noise_sd: np.ndarray) -> np.ndarray:
    """Per voxel (bool): a clean baseline (SD of S/S0 below MAX_BASELINE_NOISE) and a signal drop of
    more than MIN_CNR baseline SDs, saturated or not. A hand-drawn AIF mask needs one such voxel."""
    sd = np.asarray(ratio_noise_sd, dtype=np.float64)
    return (sd < MAX_BASELINE_NOISE) & (1.0 - np.asarray(signal_ratio_min, dtype=np.float64) > MIN_CNR * sd)


def _eligible(f: CurveFeatures) -> np.ndarray:
    """Indices of arterial (or venous) candidates: clean baseline, no saturation, a positive bolus."""
    return np.flatnonzero((f.cnr >= MIN_CNR) & ~f.saturated & (f.peak > 0) & (f.area > 0))


def select_aif(features: CurveFeatures, *, n_voxels: int = DEFAULT_N_VOXELS) -> tuple[np.ndarray, dict]:
    """Indices of the automatically chosen arterial voxels (see the module docstring), and how many
    voxels each selection step kept."""
    f = features
    eligible = _eligible(f)
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


# ---------------------------------------------------------------------------------------------------
# Cluster analysis (Mouridsen et al. 2006), the venous output function, and a quality score.
# ---------------------------------------------------------------------------------------------------

#: Number of k-means clusters (Mouridsen 2006).
DEFAULT_N_CLUSTERS = 5

#: Fraction of all brain voxels kept by area under the curve (Mouridsen 2006: the top 10 %).
TOP_AREA_FRACTION = 0.10

#: Fraction of the area-selected voxels dropped as the most irregular (Mouridsen 2006: 25 %).
IRREGULAR_FRACTION = 0.25

#: Length of the bolus window in which curves are normalised and clustered, s. It starts
#: ``signal.ARRIVAL_MARGIN_S`` before the bolus arrival of the candidates' mean curve and covers the
#: arterial first pass (about 10-15 s) and the venous peak (4-8 s after the arterial one).
BOLUS_WINDOW_S = 25.0

#: Partial-volume rejection after each clustering round (not in Mouridsen 2006; see ``cluster_aif``):
#: keep the voxels whose area is at least this fraction of the cluster's reference area.
PURE_AREA_FRACTION = 0.7

#: The reference area of that step is the median of this many largest areas in the cluster
#: (the median, so that one outlying voxel does not set it).
PURE_REFERENCE_VOXELS = 5

#: A venous voxel's first moment comes at least this long after the arterial one, s. The sagittal
#: sinus follows the arteries by about 4-8 s (transit through the brain); arterial voxels spread over
#: 1-2 s, so 2 s separates the two.
VENOUS_MIN_LAG_S = 2.0

#: Length of the end of a curve whose mean is taken as its late (steady-state) level, s.
END_LEVEL_S = 10.0


def _candidates(f: CurveFeatures, *, top_area: float, drop_irregular: float, min_keep: int) -> tuple[np.ndarray, dict]:
    """Mouridsen's pre-selection, with ``select_aif``'s eligibility (CNR, saturation) as an exclusion.

    The ``top_area`` fraction of all finite voxels with the largest area; of those, the eligible ones
    (``_eligible``); minus the ``drop_irregular`` fraction most irregular. The fraction is of all
    voxels, as in Mouridsen 2006: at low SNR most tissue voxels fail the CNR rule, and a fraction of the
    eligible voxels only would then leave a candidate set made almost only of vessels, which k-means
    must split by noise. Returns the indices and the count after each step.
    """
    eligible = _eligible(f)
    if eligible.size == 0:
        raise AifError("no voxel has a clean, unsaturated bolus")
    finite = np.flatnonzero(np.isfinite(f.first_moment))
    n1 = min(finite.size, max(int(np.ceil(top_area * finite.size)), min_keep))
    by_area = finite[np.argsort(-f.area[finite], kind="stable")[:n1]]
    c1 = by_area[np.isin(by_area, eligible)]
    if c1.size == 0:
        raise AifError("no voxel with a large bolus area has a clean, unsaturated bolus")
    n2 = max(1, int(np.ceil((1.0 - drop_irregular) * c1.size)))
    c2 = c1[np.argsort(f.irregularity[c1], kind="stable")[:n2]]
    return c2, {"eligible": int(eligible.size), "by_area": int(by_area.size), "by_area_eligible": int(c1.size),
                "regular": int(c2.size)}


def bolus_window(curves: np.ndarray, *, tr: float, window_s: float = BOLUS_WINDOW_S) -> slice:
    """Frames of the first pass of the mean of ``curves`` (delta R2*, 1/s, (n_vox, n_t) or (n_t,)).

    The arrival is the last frame before the mean curve's peak that is below 10 % of the peak; the
    window starts ``signal.ARRIVAL_MARGIN_S`` before it (early arteries fill before the mean curve
    rises) and lasts ``window_s`` seconds (at least 3 frames), cut at the end of the series.
    """
    from perfusion.quantify.signal import ARRIVAL_MARGIN_S

    c = np.asarray(curves, dtype=np.float64)
    m = np.nanmean(c, axis=0) if c.ndim == 2 else c
    peak = int(np.nanargmax(m))
    below = np.flatnonzero(m[: peak + 1] < 0.1 * m[peak])
    arrival = int(below[-1]) if below.size else 0
    start = max(0, arrival - int(np.ceil(ARRIVAL_MARGIN_S / tr)))
    return slice(start, min(m.size, start + max(3, int(np.ceil(window_s / tr)))))


def _window_first_moment(c: np.ndarray, window: slice) -> np.ndarray:
    """First moment of each row of ``c`` (n, n_t) inside ``window``, in frames from the window start;
    negative values are clipped to 0; NaN for a row with no positive value there."""
    w = np.clip(np.asarray(c, dtype=np.float64)[:, window], 0.0, None)
    t = np.arange(w.shape[1], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ t) / np.sum(w, axis=1)


def kmeans(x: np.ndarray, init: np.ndarray, *, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means of the rows of ``x`` (n, d) from the centroids ``init`` (k, d); deterministic.

    Squared Euclidean distance; a tie goes to the lower cluster index; a cluster that empties keeps its
    last centroid. Stops when no label changes, or after ``max_iter`` updates.
    Returns (labels (n,), centroids (k, d)).
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    cent = np.array(init, dtype=np.float64, copy=True)
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    for _ in range(max_iter):
        # the assignment in one pass (kernel; the same distances, to the last bit, as numpy's
        # sum((x[:, None] - cent[None]) ** 2, axis=2), whose (n, k, d) temporary took 45 ms an
        # iteration for 130 000 candidates)
        if not any(_parallel.run_chunks(lambda sl: _kernels_curves._kmeans_assign(x[sl], cent, labels[sl]),
                                        x.shape[0])):
            break
        # centroids: per-cluster sums in row order, as x[labels == k].mean(axis=0) adds them
        counts = np.bincount(labels, minlength=cent.shape[0])
        for j in range(x.shape[1]):
            sums = np.bincount(labels, weights=x[:, j], minlength=cent.shape[0])
            cent[counts > 0, j] = sums[counts > 0] / counts[counts > 0]
    return labels, cent


def _cluster_round(norm: np.ndarray, first_moment: np.ndarray, n_clusters: int) -> tuple[np.ndarray, dict]:
    """One round: k-means of unit-area curves ``norm`` (n, n_w) seeded by the mean curves of the
    first-moment quantile groups (quintiles for 5 clusters); returns the members (indices into
    ``norm``) of the non-empty cluster whose centroid has the lowest first moment."""
    k = min(n_clusters, norm.shape[0])
    order = np.argsort(first_moment, kind="stable")
    init = np.stack([norm[g].mean(axis=0) for g in np.array_split(order, k)])
    labels, cent = kmeans(norm, init)
    sizes = np.bincount(labels, minlength=k)
    cent_fm = np.where(sizes > 0, _window_first_moment(cent, slice(None)), np.inf)
    best = int(np.argmin(cent_fm))
    return np.flatnonzero(labels == best), {"sizes": sizes.tolist(), "centroid_first_moment_frames": cent_fm.tolist(),
                                              "chosen_cluster": best}


def cluster_aif(curves: np.ndarray, features: CurveFeatures, *, tr: float, n_clusters: int = DEFAULT_N_CLUSTERS,
                top_area: float = TOP_AREA_FRACTION, drop_irregular: float = IRREGULAR_FRACTION,
                n_rounds: int = 2, window: slice | None = None, window_s: float = BOLUS_WINDOW_S,
                pure_fraction: float | None = PURE_AREA_FRACTION) -> tuple[np.ndarray, dict]:
    """Arterial voxels by cluster analysis, after Mouridsen et al. 2006 (MRM 55:524).

    ``curves``: delta R2* (1/s, (n_vox, n_t)) of the brain voxels; ``features``: their
    ``curve_features``; ``tr`` in s. Steps:

    1. candidates: the ``top_area`` (10 %) of all voxels with the largest area, without the voxels
       ``select_aif`` would never take (contrast-to-noise below ``MIN_CNR``, saturated), minus the
       ``drop_irregular`` (25 %) most irregular (``CurveFeatures.irregularity``: squared second
       differences over squared area, i.e. the roughness of the unit-area curve);
    2. each candidate curve is cut to the bolus window (``bolus_window`` of the candidates' mean curve,
       unless ``window`` is given) and divided by its area there, so that clusters differ in shape
       only;
    3. k-means (``n_clusters``) seeded by the mean curves of the first-moment quantile groups; the
       cluster whose centroid has the lowest first moment is kept;
    4. voxels of that cluster whose area is below ``pure_fraction`` times the cluster's reference area
       (median of its ``PURE_REFERENCE_VOXELS`` largest) are dropped (``pure_fraction=None`` skips
       this);
    5. steps 3-4 are repeated on the kept voxels (``n_rounds`` rounds in all; a round after the first
       is skipped when fewer than 2 ``n_clusters`` voxels remain).

    Step 4 is not in Mouridsen 2006. After unit-area normalisation a partial-volume voxel
    f AIF + (1 - f) tissue has nearly the AIF's shape whenever the tissue area is small next to f times
    the AIF's (f = 0.3 already gives shapes within about 1 % in the phantom), so clustering by shape
    cannot reject it, and its curve would lower the AIF's area by up to 1/f. Among voxels of arterial
    shape the purest are those with the largest area, as in the peak-height criterion of Peruzzo et al.
    2011 (CMPB 104:e148).

    Deterministic (no random initialisation). Returns the chosen row indices (sorted) and an info
    dict: the count after each pre-selection step, ``window_frames`` [start, stop), per round the
    cluster ``sizes``, the centroids' first moments (frames from the window start), the chosen cluster,
    the ``reference_area`` and how many voxels were ``kept``; ``chosen`` (count) and
    ``first_moment_s``, the chosen voxels' mean first moment in the window (s from the first frame).
    Raises ``AifError`` when no voxel is eligible.
    """
    c = np.asarray(curves)  # float32 or float64; only the candidates' rows are taken to float64
    f = features
    if c.ndim != 2 or c.shape[0] != f.area.shape[0]:
        raise ValueError(f"curves must be (n_vox, n_t) with n_vox = {f.area.shape[0]}, got {c.shape}")
    if n_clusters < 2 or n_rounds < 1:
        raise ValueError(f"need n_clusters >= 2 and n_rounds >= 1, got {n_clusters} and {n_rounds}")
    if not (0 < top_area <= 1 and 0 <= drop_irregular < 1):
        raise ValueError(f"need 0 < top_area <= 1 and 0 <= drop_irregular < 1, got {top_area}, {drop_irregular}")
    cand, steps = _candidates(f, top_area=top_area, drop_irregular=drop_irregular, min_keep=4 * n_clusters)
    sub = c[cand].astype(np.float64)
    win = window if window is not None else bolus_window(sub, tr=tr, window_s=window_s)
    area = np.sum(sub[:, win], axis=1)
    cand, sub = cand[area > 0], sub[area > 0]  # a curve with no positive area in the window cannot be normalised
    if cand.size == 0:
        raise AifError("no candidate arterial voxel has a positive bolus in the bolus window")
    norm = sub[:, win] / np.sum(sub[:, win], axis=1, keepdims=True)
    fm = _window_first_moment(sub, win)
    info: dict = {**steps, "window_frames": [int(win.start), int(win.stop)], "rounds": []}
    members = np.arange(cand.size)
    for i in range(n_rounds):
        if i > 0 and members.size < 2 * n_clusters:
            info["note"] = f"round {i + 1} skipped: only {members.size} voxels left"
            break
        chosen, r = _cluster_round(norm[members], fm[members], n_clusters)
        members = members[chosen]
        if pure_fraction is not None:
            members, r["reference_area"] = _purest(members, f.area[cand[members]], pure_fraction)
        r["kept"] = int(members.size)
        info["rounds"].append(r)
    info["chosen"] = int(members.size)
    info["first_moment_s"] = float((np.mean(fm[members]) + win.start) * tr)
    return np.sort(cand[members]), info


def _purest(idx: np.ndarray, values: np.ndarray, fraction: float) -> tuple[np.ndarray, float]:
    """The members of ``idx`` whose ``values`` (aligned with ``idx``) reach ``fraction`` of the
    reference: the median of the ``PURE_REFERENCE_VOXELS`` largest values. Returns them and the reference.
    A threshold, not a top-n ranking: ranking equal voxels by a noisy area would pick the ones whose
    noise raised it, and bias the mean area up."""
    ref = float(np.median(np.sort(values)[::-1][:PURE_REFERENCE_VOXELS]))
    return idx[values >= fraction * ref], ref


def auto_vof(curves: np.ndarray, features: CurveFeatures, *, tr: float, top_area: float = TOP_AREA_FRACTION,
             drop_irregular: float = IRREGULAR_FRACTION, arterial_time_s: float | None = None,
             min_lag_s: float = VENOUS_MIN_LAG_S, pure_fraction: float = PURE_AREA_FRACTION,
             window: slice | None = None, window_s: float = BOLUS_WINDOW_S) -> np.ndarray:
    """Row indices (sorted) of venous voxels for a venous output function (VOF).

    ``curves``: delta R2* (1/s, (n_vox, n_t)); ``features``: their ``curve_features``; ``tr`` in s.
    Candidates as in ``cluster_aif`` (large area, not noisy, not saturated, regular). Of those:

    1. late: a first moment in the bolus window at least ``min_lag_s`` after the arterial time, which
       is ``arterial_time_s`` (s from the first frame; e.g. ``cluster_aif``'s ``first_moment_s``) when
       given, else the 5th percentile of the candidates' first moments (arteries are the earliest
       large-area voxels);
    2. high: a peak at least half the reference peak of the late voxels;
    3. large: an area at least ``pure_fraction`` of the reference area of those (the least
       partial-volumed veins),

    where a reference is the median of the ``PURE_REFERENCE_VOXELS`` largest values. Deterministic.
    Raises ``AifError`` when no voxel is late.
    """
    c = np.asarray(curves)  # float32 or float64; only the candidates' rows are taken to float64
    f = features
    if c.ndim != 2 or c.shape[0] != f.area.shape[0]:
        raise ValueError(f"curves must be (n_vox, n_t) with n_vox = {f.area.shape[0]}, got {c.shape}")
    cand, _ = _candidates(f, top_area=top_area, drop_irregular=drop_irregular, min_keep=4 * DEFAULT_N_CLUSTERS)
    win = window if window is not None else bolus_window(c[cand], tr=tr, window_s=window_s)
    fm_s = (_window_first_moment(c[cand], win) + win.start) * tr
    t_art = float(np.nanpercentile(fm_s, 5)) if arterial_time_s is None else float(arterial_time_s)
    late = cand[fm_s >= t_art + min_lag_s]
    if late.size == 0:
        raise AifError(f"no large-area voxel comes at least {min_lag_s:g} s after the arteries: no venous voxel")
    high, _ = _purest(late, f.peak[late], 0.5)
    chosen, _ = _purest(high, f.area[high], pure_fraction)
    return np.sort(chosen)


def scale_to_vof(aif: np.ndarray, vof: np.ndarray, *, tr: float, window_s: float = BOLUS_WINDOW_S,
                 end_s: float = END_LEVEL_S) -> tuple[np.ndarray, float]:
    """Scale an AIF (delta R2*, 1/s, (n_t,)) so that its area equals the venous output function's.

    Returns (the scaled AIF, the factor it was multiplied by). Both areas are trapezoids over the whole
    series, in s * 1/s. Why the whole series and not the first pass or the steady state: all tracer that
    enters the brain through the arteries leaves through the veins, recirculation included, so the
    complete areas are equal; cutting out a first pass needs a model of where it ends (gamma-variate
    fits), and the venous first pass, dispersed, runs into the recirculation. The steady-state ratio
    of the curves' late levels is biased by the decay of the late level during the venous lag (+4 %
    in the phantom).

    One correction: over a series that ends at T, the tracer still in transit between the arteries and
    the veins is missing from the VOF's area; it is about tau * VOF(T), with tau the venous lag (the
    difference of the curves' first moments in the AIF's bolus window, at least 0) and VOF(T) the mean
    over the last ``end_s`` seconds. In the phantom this moves the factor's error from -2.4 % to -0.7 %
    (tau is underestimated: the window cuts the dispersed venous tail). Raises ``ValueError`` when an
    area is not positive; warns when the factor is below 1 (the AIF larger than the VOF: the VOF is
    itself partial-volumed, or the curves are swapped).
    """
    import warnings

    from perfusion.quantify.maps import trapezoid

    a = np.asarray(aif, dtype=np.float64)
    v = np.asarray(vof, dtype=np.float64)
    if a.shape != v.shape or a.ndim != 1:
        raise ValueError(f"aif and vof must be 1-D curves of the same length, got {a.shape} and {v.shape}")
    area_a = float(trapezoid(a, dx=tr))
    area_v = float(trapezoid(v, dx=tr))
    if not (area_a > 0 and area_v > 0):
        raise ValueError(f"areas must be positive: AIF {area_a:.4g}, VOF {area_v:.4g} (1/s * s)")
    win = bolus_window(a, tr=tr, window_s=window_s)
    fm = _window_first_moment(np.stack([a, v]), win)
    tau = max(0.0, float(fm[1] - fm[0]) * tr) if np.all(np.isfinite(fm)) else 0.0
    n_end = max(1, int(round(end_s / tr)))
    in_transit = tau * max(0.0, float(np.mean(v[-n_end:])))
    factor = (area_v + in_transit) / area_a
    if factor < 1.0:
        warnings.warn(f"the VOF's area is smaller than the AIF's (factor {factor:.3f}): the venous voxels may be "
                      "partial-volumed themselves; the AIF was scaled down", stacklevel=2)
    return a * factor, factor


#: Components of ``aif_quality_score``: (value giving 0, value giving 1); linear in between, clipped.
QUALITY_RAMPS = {
    "cnr": (MIN_CNR, 50.0),  # baseline contrast-to-noise: MIN_CNR is where select_aif stops
    "peak_ratio": (2.0, 6.0),  # AIF peak / mean tissue peak: an artery is many times the tissue
    "lead_s": (0.0, 2.0),  # s the AIF peaks before the mean tissue curve (arteries lead by 1-3 s)
    "fwhm_s": (16.0, 8.0),  # first-pass width: arterial 4-8 s, tissue 10 s and more
    "post_bolus": (0.7, 0.3),  # mean level 6-12 s after the peak / peak: the return after the first pass
}

#: Times after the peak over which the post-bolus level is averaged, s.
POST_BOLUS_S = (6.0, 12.0)

#: Quality score (0-1) at or above which an AIF is called ok, in the report and in the verdict's
#: reasons (``roi.AIF_POOR``): half of the components fully satisfied.
QUALITY_OK = 0.5

#: Bounds beyond which an AIF's own curve says that absolute CBV and CBF cannot be trusted
#: (``check_absolute``). Measured on curves whose physics differs from the tool's model (README, method
#: step 4, has the table):
#:
#: - ``tail_fraction`` (at most): the mean level 6-12 s after the peak (``POST_BOLUS_S``) / peak. A voxel
#:   that holds a fraction of artery adds magnetisations: at the peak the arterial part is dark and the
#:   tissue part dominates, so the peak is flattened while the tail, where both are linear, is not.
#:   Pure arteries 0.14-0.16 (realistic phantom, 3 protocols, seeds 0-2, SNR 30-50), 0.22-0.24 (the old
#:   phantom, a larger recirculation), 0.09 (FAIR-Unipd measured AIF); partial-volume rings 0.29-0.37
#:   (realistic phantom, 20-45 % artery; 60 %: 0.26-0.30), saturated arteries 0.37-0.38 (realistic,
#:   15 mM bolus), the real LCB-BNI AIF ROI 0.37. 0.28: between the pure arteries' 0.24 and 0.29.
#: - ``area_ratio`` (at least): AIF area / the brain's mean tissue curve's area, whole series. It is
#:   (kH / rho) 100 / (mean brain CBV in mL/100 g); 8.5 means a mean brain CBV of 8.3 mL/100 g, above
#:   grey matter's usual value. Pure arteries 9.8-11.1 (realistic: its tissue relaxivity exceeds the
#:   blood's at low concentration, so the ratio is lower than the 15-25 of CBV 3-5 %), 22-25 (old
#:   phantom); partial-volume rings 2.2-5.4 (realistic, 20-60 %), 5.5-7.9 (old phantom, 20-30 %;
#:   45-60 %: 10.8-14, missed: CBV there is 1.7-2.2x too high), saturated 7.5-7.9 (15 mM), the LCB-BNI
#:   AIF 3.0-3.5 (against NAWM; its own worked example gives tumour CBV 38 mL/100 g). 8.5: between the
#:   old phantom's 30 % ring (7.9) and the lowest pure artery (9.8).
#: - ``fwhm_s`` (at most): the first pass's width at half maximum. Pure arteries 6.0-7.5 s (both
#:   phantoms, TR 1.5 s), 6.2 s (FAIR-Unipd); rings 7.5-9 s; saturated 10.5-12 s (15 mM); LCB-BNI
#:   10.5 s. 10 s: above every pure artery by more than a frame; catches saturation, not partial volume.
ABSOLUTE_BOUNDS = {"tail_fraction": 0.28, "area_ratio": 8.5, "fwhm_s": 10.0}

#: The quality score of an AIF that fails ``check_absolute`` is capped here: below ``QUALITY_OK`` (the
#: curve does not pass) and above ``roi.AIF_UNUSABLE`` (0.2), so that rCBV and the verdict, ratios in
#: which the AIF's scale cancels, are not withheld for it.
NOT_QUANTITATIVE_SCORE_CAP = 0.45

#: ``--vof guarded`` (the default) scales the AIF to the automatic VOF only from this factor on. With a
#: pure AIF the factor was 0.965-0.985 on the realistic phantom (seeds 0-1, SNR 30-50: the dispersed
#: venous peak has less of the quadratic blood relaxivity) and 0.999-1.014 on the old phantom; scaling
#: those would move CBV by up to 3.5 % for nothing. A partial-volumed AIF gave 3.4-3.5.
VOF_GUARD_MIN_FACTOR = 1.1

#: The statement written wherever absolute values cannot be trusted (terminal, report.json, report.html).
NOT_QUANTITATIVE = "absolute CBV/CBF not quantitative; relative maps valid"

#: Why relative values survive it.
RELATIVE_VALID = ("rCBV and the verdict are unaffected: ratios to the reference tissue, in which the AIF's "
                  "area cancels")


def _fwhm_frames(c: np.ndarray, peak_frame: int) -> int:
    """Frames of the contiguous run at or above half the peak around ``peak_frame``."""
    above = c >= 0.5 * c[peak_frame]
    lo = hi = peak_frame
    while lo > 0 and above[lo - 1]:
        lo -= 1
    while hi < c.size - 1 and above[hi + 1]:
        hi += 1
    return hi - lo + 1


def _tail_fraction(c: np.ndarray, peak_frame: int, tr: float) -> float | None:
    """Mean of ``c`` ``POST_BOLUS_S`` after the peak / peak; None when the series ends before."""
    k0 = peak_frame + int(np.ceil(POST_BOLUS_S[0] / tr))
    k1 = peak_frame + int(np.floor(POST_BOLUS_S[1] / tr))
    if k1 >= c.size or k1 < k0:
        return None
    return float(np.mean(c[k0: k1 + 1])) / float(c[peak_frame])


def check_absolute(curve: np.ndarray, *, tr: float, tissue_curve: np.ndarray | None = None,
                   kh: float | None = None, rho: float | None = None) -> dict:
    """Whether an AIF (delta R2*, 1/s, (n_t,)) can give absolute CBV and CBF, from the curve itself.

    Three checks against ``ABSOLUTE_BOUNDS`` (their provenance is there): the tail after the first pass
    (``tail_fraction``, dimensionless), the area over the brain tissue's mean curve's area
    (``area_ratio``; needs ``tissue_curve``, delta R2* 1/s (n_t,), the same frames; skipped when its area
    is not positive) and the first-pass width (``fwhm_s``, s). ``tr`` in s; ``kh``, ``rho`` (default
    ``units.KH``, ``units.RHO_BRAIN_G_PER_ML``) convert the area ratio to the mean brain CBV it implies
    (mL/100 g). Returns ``quantitative`` (bool), ``reasons`` (one sentence per failed check),
    ``measures`` and ``bounds``. A curve without a positive peak is not quantitative.
    """
    from perfusion.quantify.maps import trapezoid
    from perfusion.units import KH, RHO_BRAIN_G_PER_ML, cbv_scale

    c = np.asarray(curve, dtype=np.float64)
    bounds = dict(ABSOLUTE_BOUNDS)
    if c.ndim != 1 or not np.any(np.isfinite(c)) or not np.nanmax(c) > 0:
        return {"quantitative": False, "reasons": ["the AIF has no positive peak"], "measures": {}, "bounds": bounds}
    pk = int(np.nanargmax(c))
    measures: dict = {"tail_fraction": _tail_fraction(c, pk, tr), "fwhm_s": _fwhm_frames(c, pk) * tr,
                      "area_ratio": None, "implied_brain_cbv_ml_per_100g": None}
    if tissue_curve is not None:
        area_t = float(trapezoid(np.asarray(tissue_curve, dtype=np.float64), dx=tr))
        if area_t > 0:
            ratio = float(trapezoid(c, dx=tr)) / area_t
            measures["area_ratio"] = ratio
            scale = cbv_scale(KH if kh is None else kh, RHO_BRAIN_G_PER_ML if rho is None else rho)
            measures["implied_brain_cbv_ml_per_100g"] = scale / ratio if ratio > 0 else None
    reasons = []
    tail = measures["tail_fraction"]
    if tail is not None and tail > bounds["tail_fraction"]:
        reasons.append(f"the AIF still holds {tail:.2f} of its peak 6-12 s after it (a pure artery at most "
                       f"{bounds['tail_fraction']:g}): partial volume or saturation flattened its peak, so CBF is "
                       "not quantitative")
    ratio = measures["area_ratio"]
    if ratio is not None and ratio < bounds["area_ratio"]:
        reasons.append(f"the AIF's area is only {ratio:.1f} times the brain tissue's (a pure artery at least "
                       f"{bounds['area_ratio']:g})" + (f": it implies a mean brain CBV of "
                       f"{measures['implied_brain_cbv_ml_per_100g']:.1f} mL/100 g" if ratio > 0 else "")
                       + ", so the AIF is partial-volumed and absolute CBV and CBF are too high")
    if measures["fwhm_s"] > bounds["fwhm_s"]:
        reasons.append(f"the AIF's first pass is {measures['fwhm_s']:.1f} s wide at half maximum (a pure artery at "
                       f"most {bounds['fwhm_s']:g} s): saturation, dispersion or tissue")
    return {"quantitative": not reasons, "reasons": reasons, "measures": measures, "bounds": bounds}


def _ramp(x: float, zero: float, one: float) -> float:
    if not np.isfinite(x):
        return 1.0 if (x > 0) == (one > zero) else 0.0
    return float(np.clip((x - zero) / (one - zero), 0.0, 1.0))


def aif_quality_score(curve: np.ndarray, *, tr: float, baseline: slice, tissue_peak_frame: float,
                      tissue_peak: float | None = None, t0: float = 0.0, tissue_curve: np.ndarray | None = None,
                      kh: float | None = None, rho: float | None = None) -> dict:
    """A quality score in [0, 1] of an AIF (delta R2*, 1/s, (n_t,)) and its components.

    ``baseline``: the pre-bolus frames; ``tissue_peak_frame``: the peak frame of the mean tissue curve
    (same frame numbering); ``tissue_peak``: its peak value (1/s), optional; ``t0``: time (s) of the
    first frame. Each component maps a measurement to [0, 1] linearly between the bounds of
    ``QUALITY_RAMPS`` (clipped):

    - ``cnr``: peak / SD of the baseline;
    - ``peak_ratio``: peak / ``tissue_peak`` (left out when ``tissue_peak`` is None);
    - ``lead_s``: (tissue_peak_frame - AIF peak frame) * tr;
    - ``fwhm_s``: the contiguous run of frames at or above half the peak, around the peak, times tr;
    - ``post_bolus``: mean of the curve 6-12 s after the peak (``POST_BOLUS_S``) / peak (left out when
      the series ends before that).

    score = geometric mean of the components present (Derringer's desirability index, J Qual Technol
    1980, 12:214): a component at 0 (a curve that peaks with or after the tissue, a CNR at or below
    ``MIN_CNR``) gives 0 whatever the others, and a low one weighs more than in an arithmetic mean (one
    component at 0.05 among five caps the score at 0.55). A component below 0.5, or a score below 0.5,
    adds a warning (``QUALITY_OK``, the bar of "ok").

    The components judge the shape; they miss partial volume (a voxel 30 % artery scores like a pure
    one). ``check_absolute`` (with ``tissue_curve``, the brain's mean delta R2*, 1/s, when given) adds the
    tail, area-ratio and width checks; a curve that fails it has its score capped at
    ``NOT_QUANTITATIVE_SCORE_CAP`` (below the bar) and a warning saying that absolute values are not
    quantitative. Returns the score, the components, the measurements, ``absolute`` (the check) and
    ``warnings``.
    """
    c = np.asarray(curve, dtype=np.float64)
    peak_frame = int(np.nanargmax(c))
    peak = float(c[peak_frame])
    out: dict = {"peak_delta_r2s_per_s": peak, "peak_time_s": t0 + peak_frame * tr, "warnings": []}
    if not peak > 0:
        out.update(score=0.0, components={})
        out["warnings"].append("the AIF has no positive peak")
        return out
    base = c[baseline]
    base_sd = float(np.std(base, ddof=1)) if base.size > 1 else float("nan")
    measures = {"cnr": peak / base_sd if base_sd > 0 else (float("inf") if base_sd == 0 else float("nan"))}
    if tissue_peak is not None:
        measures["peak_ratio"] = peak / tissue_peak if tissue_peak > 0 else float("inf")
    measures["lead_s"] = (float(tissue_peak_frame) - peak_frame) * tr
    measures["fwhm_s"] = _fwhm_frames(c, peak_frame) * tr
    tail = _tail_fraction(c, peak_frame, tr)
    if tail is not None:
        measures["post_bolus"] = tail
    components = {k: _ramp(v, *QUALITY_RAMPS[k]) for k, v in measures.items() if not np.isnan(v)}
    vals = np.array(list(components.values()))
    score = float(np.exp(np.mean(np.log(np.maximum(vals, 1e-300))))) if np.all(vals > 0) else 0.0
    texts = {
        "cnr": "the AIF contrast-to-noise ratio is low ({:.1f})",
        "peak_ratio": "the AIF peak is only {:.1f} times the tissue peak: partial volume or not arterial",
        "lead_s": "the AIF peaks {:+.1f} s before the tissue (arteries lead it): the voxels may be tissue or venous",
        "fwhm_s": "the AIF first pass is broad (FWHM {:.1f} s): dispersion, tissue or a slow injection",
        "post_bolus": "the AIF stays at {:.2f} of its peak after the first pass: no clear return to baseline",
    }
    for k, comp in components.items():
        if comp < 0.5:
            out["warnings"].append(texts[k].format(measures[k]))
    absolute = check_absolute(c, tr=tr, tissue_curve=tissue_curve, kh=kh, rho=rho)
    out["score_uncapped"] = score
    if not absolute["quantitative"]:
        score = min(score, NOT_QUANTITATIVE_SCORE_CAP)
        out["warnings"].append(f"{NOT_QUANTITATIVE} ({RELATIVE_VALID}): " + "; ".join(absolute["reasons"]))
    if score < QUALITY_OK:
        out["warnings"].append(f"AIF quality score {score:.2f} is poor (ok from {QUALITY_OK:g}); "
                               "check the arterial voxels")
    out.update(score=score, absolute=absolute, components=components, cnr=measures["cnr"],
               peak_to_tissue_ratio=measures.get("peak_ratio"), lead_s=measures["lead_s"], fwhm_s=measures["fwhm_s"],
               post_bolus_fraction=measures.get("post_bolus"))
    return out


# ---------------------------------------------------------------------------------------------------
# The AIF stage of the pipeline (pipeline._arterial_input): the arterial curve, its scaling to a
# venous output function and report.json's "aif" entry (results.ArterialInput).
# ---------------------------------------------------------------------------------------------------


def choose_automatic(curves: np.ndarray, features: CurveFeatures, *, tr: float, selection: str,
                     n_voxels: int) -> tuple[np.ndarray, dict]:
    """Rows of ``curves`` (delta R2*, 1/s, the brain's) chosen as arterial by ``selection`` ("cluster":
    ``cluster_aif``, one round; "rank": ``select_aif`` keeping ``n_voxels``) and the selection's steps.
    Raises AifError when no voxel qualifies."""
    if selection == "cluster":
        # one round: after the purity step a second k-means only splits pure arteries by noise
        # (phantom: 23 voxels and CBV/CBF within 0.2/0.8 % of the true AIF's, vs 6 voxels
        # and 0.7/1.3 % with Mouridsen's second round)
        return cluster_aif(curves, features, tr=tr, n_rounds=1)
    return select_aif(features, n_voxels=n_voxels)


def own_baseline_curve(signal_rows: np.ndarray, *, te: float, tr: float, bl: slice) -> tuple[np.ndarray, slice]:
    """Mean delta R2* (1/s) of vessel voxels (their signal, a.u. (n, n_t)) with the baseline re-checked on
    their own mean signal: arteries fill before the tissue, so the whole-brain baseline ``bl`` may
    already hold their first bolus frames. Returns the curve and the baseline it used."""
    from perfusion.quantify import signal

    own_bl = bl
    try:
        own = signal.find_baseline(signal_rows.mean(axis=0), tr=tr)
        if own.stop < bl.stop:
            own_bl = slice(0, max(own.stop, signal.MIN_BASELINE_FRAMES))
    except signal.BaselineError:
        pass
    d, _ = signal.to_delta_r2s(signal_rows, te=te, baseline=own_bl)
    return np.nanmean(d, axis=0), own_bl


def vof_scaling(curve: np.ndarray, vof_curve: np.ndarray, *, tr: float, mode: str, source: str, n_voxels: int,
                tissue_curve: np.ndarray):
    """The AIF (1/s, (n_t,)) after the partial-volume scaling to a venous output function ``vof_curve``
    (1/s) of ``n_voxels`` voxels from ``source``; returns (the AIF, results.VenousOutput, warnings).

    ``mode`` "auto" and "mask" always scale (ValueError when an area is not positive). "guarded" (the
    default) scales only when the VOF is a large vessel (its area at least ``ABSOLUTE_BOUNDS["area_ratio"]``
    times the tissue's, ``tissue_curve`` the brain's mean delta R2*, 1/s) and says the AIF is
    partial-volumed (factor at least ``VOF_GUARD_MIN_FACTOR``); otherwise the AIF is left as it is and
    the entry says why."""
    from perfusion.results import VenousOutput

    if mode == "guarded":
        return _guarded_vof_scaling(curve, vof_curve, tr=tr, source=source, n_voxels=n_voxels,
                                    tissue_curve=tissue_curve)
    scaled, factor = scale_to_vof(curve, vof_curve, tr=tr)
    entry = VenousOutput(source=source, mode=mode, applied=True, n_voxels=int(n_voxels), scale_factor=float(factor))
    notes = []
    if not 0.8 <= factor <= 5.0:
        notes.append(f"the VOF scaling factor {factor:.2f} is implausible (expected 1-3); check the venous voxels")
    return scaled, entry, notes


def _guarded_vof_scaling(curve, vof_curve, *, tr: float, source: str, n_voxels: int, tissue_curve):
    """vof_scaling's "guarded" mode (same arguments and return)."""
    import warnings

    from perfusion.quantify.maps import trapezoid
    from perfusion.results import VenousOutput

    area_t = float(trapezoid(tissue_curve, dx=tr))
    vof_ratio = float(trapezoid(vof_curve, dx=tr)) / area_t if area_t > 0 else float("nan")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a factor below 1 is not applied here: no warning
            scaled, factor = scale_to_vof(curve, vof_curve, tr=tr)
    except ValueError as exc:  # an area that is not positive: nothing to scale by
        return curve, VenousOutput(source=source, mode="guarded", applied=False, why=str(exc)), []
    if not vof_ratio >= ABSOLUTE_BOUNDS["area_ratio"]:
        why = (f"the venous curve's area is {vof_ratio:.1f} times the tissue's, below a large vessel's "
               f"{ABSOLUTE_BOUNDS['area_ratio']:g}: no sinus in the volume, or partial-volumed")
    elif factor < VOF_GUARD_MIN_FACTOR:
        why = (f"the factor {factor:.3f} is below {VOF_GUARD_MIN_FACTOR:g}: the AIF's area already matches "
               "the vein's (not partial-volumed)")
    else:
        why = ""
    entry = VenousOutput(source=source, mode="guarded", applied=not why, n_voxels=int(n_voxels),
                         scale_factor=float(factor), vof_area_ratio=vof_ratio, why=why or None)
    if why:
        return curve, entry, []
    return scaled, entry, [f"the AIF was scaled by {factor:.2f} to the area of an automatic venous output function "
                           f"({n_voxels} voxels): partial volume (--vof guarded, the default; --vof none to "
                           "switch off)"]


def arterial_entry(curve: np.ndarray, *, measured: dict, tr: float, baseline: slice, t0: float,
                   tissue_peak_frame: int, tissue_curve: np.ndarray, kh: float, rho: float, source: str,
                   n_voxels: int, steps: dict, vof):
    """report.json "aif" (results.ArterialInput) and the quality warnings of the AIF ``curve`` the maps
    use (1/s, (n_t,), after any VOF scaling: the score and the absolute-quantification checks judge
    it). ``measured``: ``aif_quality`` of the arterial curve before scaling (peak, time, width, CNR);
    ``baseline``: the AIF's own baseline frames; ``t0`` (s): time of the first frame; ``tissue_curve``:
    the brain's mean delta R2* (1/s); ``vof``: results.VenousOutput."""
    from perfusion.results import ArterialInput

    quality = aif_quality_score(curve, tr=tr, baseline=baseline, tissue_peak_frame=tissue_peak_frame,
                                tissue_peak=float(np.nanmax(tissue_curve)), t0=t0, tissue_curve=tissue_curve,
                                kh=kh, rho=rho)
    absolute = quality["absolute"]
    entry = ArterialInput(
        source=source, n_voxels=int(n_voxels), selection_steps=steps, baseline_frames=baseline.stop - baseline.start,
        peak_delta_r2s_per_s=measured["peak_delta_r2s_per_s"], peak_time_s=measured["peak_time_s"],
        fwhm_s=measured["fwhm_s"], cnr=measured["cnr"], vof=vof, quality_score=quality["score"],
        quality={k: v for k, v in quality.items() if k not in ("warnings", "absolute")},
        absolute_quantification=bool(absolute["quantitative"]),
        absolute_quantification_reasons=tuple(absolute["reasons"]),
        absolute_checks={"measures": absolute["measures"], "bounds": absolute["bounds"]},
        relative_maps_valid=True,  # rCBV and the verdict are ratios: the AIF's area cancels
        absolute_statement=None if absolute["quantitative"] else f"{NOT_QUANTITATIVE} ({RELATIVE_VALID})")
    return entry, quality["warnings"]
