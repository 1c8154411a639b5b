"""Baseline, bolus arrival and signal -> delta R2*(t).

delta R2*(t) = -ln(S(t) / S0) / TE (single-echo gradient echo; 1/s with TE in s), with S0 the mean
of the pre-bolus frames found from the data, never a fixed window.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy import ndimage

from perfusion._kernels import curves as _kernels_curves
from perfusion._kernels import parallel as _parallel

#: Smallest S/S0 used in the log: a voxel whose signal falls to the noise floor would otherwise
#: give an infinite delta R2*. At TE 30 ms this caps delta R2* at -ln(1e-3)/0.03 = 230 1/s.
MIN_SIGNAL_RATIO = 1e-3

#: Frames left out between the end of the baseline and the bolus arrival of the whole-brain mean
#: curve, in s: arteries fill 1-3 s before the average tissue does.
ARRIVAL_MARGIN_S = 3.0

#: Fewest baseline frames we accept: S0 is a mean, and its noise is only judged against the frames'
#: spread from 3 frames on (with 2 the window-growing arrival test below has no reference).
MIN_BASELINE_FRAMES = 3

#: Fewer baseline frames than this get a warning with the count. S0's noise enters every frame of
#: delta R2* as the same offset, and it falls as 1/sqrt(n): 0.58 of one frame's noise with 3 frames,
#: 0.41 with 6, 0.30 with 11 (the phantom's baseline at TR 1.5 s). A judgement, not a measurement: below 6
#: the offset is more than 0.4 of a frame's noise in every frame of the curve; the 2020 consensus asks
#: for tens of baseline frames (report.html's acquisition table checks that).
WARN_BASELINE_FRAMES = 6

#: The whole-brain mean signal must drop by at least this fraction at the bolus peak.
MIN_BOLUS_DROP = 0.01


#: The series must cover the first pass: after its minimum the whole-brain mean signal regains at
#: least this share of its bolus drop before the series ends (a normal brain regains 80-95 % within
#: about 10 s; 50 % is the half width of the first pass).
MIN_FIRST_PASS_RECOVERY = 0.5


class BaselineError(ValueError):
    """The series has no usable baseline or no bolus (the pipeline adds the file name)."""


@dataclass(frozen=True)
class Baseline:
    """Frames [start, stop) form the baseline; ``arrival`` is the first bolus frame of the mean curve."""

    start: int
    stop: int
    arrival: int
    peak: int

    @property
    def frames(self) -> slice:
        return slice(self.start, self.stop)

    def as_dict(self, tr: float) -> dict:
        return {
            "start_frame": self.start,
            "stop_frame": self.stop,
            "bolus_arrival_frame": self.arrival,
            "bolus_arrival_s": self.arrival * tr,
            "bolus_peak_frame": self.peak,
            "n_frames": self.stop - self.start,
            "min_frames": MIN_BASELINE_FRAMES,
            "warn_below_frames": WARN_BASELINE_FRAMES,
        }


def _robust_sd(x: np.ndarray) -> float:
    """Noise SD from first differences (insensitive to slow drift): 1.4826 MAD / sqrt(2)."""
    d = np.diff(x)
    if d.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def find_baseline(curve: np.ndarray, *, tr: float, margin_s: float = ARRIVAL_MARGIN_S) -> Baseline:
    """Find the baseline frames and the bolus arrival in a mean signal curve (a.u., shape (n_t,)).

    The noise SD is read from the first differences of the whole curve (median-based: the bolus and
    the frames before the steady state are a few outliers among them). Leading frames still
    approaching the steady state (brighter than the median of the next 3 frames by more than
    max(5 noise SD, 1 %)) are skipped. The window then grows from 3 frames while the next frame stays
    above the window mean minus max(4 noise SD, 0.5 %); the first of two frames below it is the bolus
    arrival. The baseline stops ``margin_s`` seconds before that (at least one frame), so
    earlier-arriving voxels keep a clean S0; where that would leave fewer than 3 frames it stops at
    the arrival.

    The noise and the steady-state test used to be read from the first half of the pre-peak frames:
    with 2 bright frames and 3-4 steady ones (the phantom at TR 5 s) those frames were the bright ones,
    the noise SD came out as the steady-state step, the bright frames stayed in S0 (5 % too high) and
    the reference CBV came out 9 times too high.
    """
    g = np.asarray(curve, dtype=np.float64)
    peak = int(np.argmin(g))
    if peak < MIN_BASELINE_FRAMES + 1:
        raise BaselineError(
            f"the signal minimum is at frame {peak}: the bolus arrives before {MIN_BASELINE_FRAMES} baseline frames"
        )
    sd = _robust_sd(g)
    start = _steady_start(g, peak, sd)
    ref = float(np.median(g[start: start + MIN_BASELINE_FRAMES]))
    if not np.isfinite(ref) or ref <= 0:
        raise BaselineError("the baseline signal is zero or negative")
    drop = (ref - g[peak]) / ref
    if drop < MIN_BOLUS_DROP:
        raise BaselineError(
            f"no bolus: the mean signal drops by only {100 * drop:.2f} % (at least {100 * MIN_BOLUS_DROP:g} % expected)"
        )
    arrival = _arrival(g, start, peak, sd)
    margin = max(1, int(round(margin_s / tr)))
    stop = arrival - margin
    if stop - start < MIN_BASELINE_FRAMES:
        stop = min(arrival, start + MIN_BASELINE_FRAMES)
    if stop - start < MIN_BASELINE_FRAMES:
        raise BaselineError(
            f"only {stop - start} baseline frames before the bolus arrives at frame {arrival}; "
            f"at least {MIN_BASELINE_FRAMES} are needed"
        )
    return Baseline(start=start, stop=stop, arrival=arrival, peak=peak)


def _steady_start(g: np.ndarray, peak: int, sd: float) -> int:
    """The first of 3 frames within max(8 noise SD, 1 %) of each other: frames approaching the steady
    state step down by more, and so does the bolus; the search stops halfway to the minimum."""
    for s in range(0, max(1, peak // 2 + 1)):
        w = g[s: s + MIN_BASELINE_FRAMES]
        if w.size == MIN_BASELINE_FRAMES and np.ptp(w) <= max(8 * sd, 0.01 * abs(float(np.median(w)))):
            return s
    raise BaselineError(
        f"no steady baseline: the mean signal never stays level for {MIN_BASELINE_FRAMES} frames between "
        f"frame 0 and frame {peak // 2 + MIN_BASELINE_FRAMES - 1}, before the bolus minimum at frame {peak}; "
        f"at least {MIN_BASELINE_FRAMES} steady pre-bolus frames are needed"
    )


def _arrival(g: np.ndarray, start: int, peak: int, sd: float) -> int:
    """The bolus arrival: the window grows from ``start`` while the next frame stays above its mean
    minus max(4 noise SD, 0.5 %); the first of two frames below that; the minimum when none is."""
    n = g.size
    k = start + MIN_BASELINE_FRAMES
    while k < peak:
        window = g[start:k]
        m = float(window.mean())
        thr = m - max(4 * sd, 0.005 * m)
        if g[k] < thr and g[min(k + 1, n - 1)] < thr:
            return k
        k += 1
    return peak


def check_first_pass(curve: np.ndarray, base: Baseline, *, tr: float) -> float:
    """The share of its bolus drop that the mean signal ``curve`` (a.u., (n_t,)) regains after its
    minimum; BaselineError when below MIN_FIRST_PASS_RECOVERY (the series stops before the bolus has
    passed: CBV and CBF would miss the rest of the first pass)."""
    g = np.asarray(curve, dtype=np.float64)
    ref = float(np.mean(g[base.start: base.stop]))
    drop = ref - g[base.peak]
    after = g[base.peak + 1:]
    regained = float((after.max() - g[base.peak]) / drop) if after.size and drop > 0 else 0.0
    if regained < MIN_FIRST_PASS_RECOVERY:
        ends = f"{(g.size - 1 - base.peak) * tr:g} s after the bolus peak" if after.size else "at the bolus peak"
        raise BaselineError(
            f"the series ends {ends}, before the first pass is over "
            f"(the mean signal regains {100 * max(regained, 0.0):.0f} % of its drop, "
            f"at least {100 * MIN_FIRST_PASS_RECOVERY:.0f} % expected)"
        )
    return regained


def to_delta_r2s(signal: np.ndarray, *, te: float, baseline: slice) -> tuple[np.ndarray, np.ndarray]:
    """Convert signal (n_vox, n_t) to delta R2* (n_vox, n_t) in 1/s; also return S0 (n_vox,).

    S0 is the mean of the baseline frames. Rows whose S0 is not positive are NaN.
    """
    d, s0, _, _ = to_delta_r2s_with_ratio(signal, te=te, baseline=baseline)
    return d, s0


def to_delta_r2s_with_ratio(signal: np.ndarray, *, te: float, baseline: slice, out: np.ndarray | None = None):
    """``to_delta_r2s`` and, in the same pass, the statistics of S/S0 that AIF selection uses.

    signal (n_vox, n_t), a.u., any float dtype (read as float64); te in s; ``baseline``: the S0 frames.
    Returns (delta R2* (n_vox, n_t) 1/s, S0 (n_vox,), min_t S/S0 (n_vox,), SD of S/S0 over the
    baseline frames (ddof 1, n_vox,)). The ratio statistics use the plain ratio (no MIN_SIGNAL_RATIO
    floor), whatever S0. delta R2* is written into ``out`` (float32 or float64, (n_vox, n_t)) when
    given, else into a new float64 array.
    """
    s = np.asarray(signal)
    if s.ndim != 2:
        raise ValueError(f"signal must be (n_vox, n_t), got shape {s.shape}")
    s = np.ascontiguousarray(s if s.dtype in (np.float32, np.float64) else s.astype(np.float64))
    n_vox, n_t = s.shape
    base = np.arange(n_t)[baseline]
    if out is None:
        out = np.empty((n_vox, n_t))
    elif out.shape != s.shape or out.dtype not in (np.float32, np.float64):
        raise ValueError(f"out must be a float32 or float64 array of shape {s.shape}")
    s0, ratio_min, ratio_sd = np.empty(n_vox), np.empty(n_vox), np.empty(n_vox)
    te = float(te)
    _parallel.run_chunks(lambda sl: _kernels_curves._delta_r2s(s[sl], base, te, MIN_SIGNAL_RATIO, out[sl], s0[sl],
                                                               ratio_min[sl], ratio_sd[sl]), n_vox)
    return out, s0, ratio_min, ratio_sd


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) of a 1-D sample. Where the maximum is a plateau
    (empty bins between two well separated classes, as between background noise and brain), the middle
    of the plateau: its first bin sat on the edge of the noise, so the mask changed with the noise."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    hist, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    top = np.flatnonzero(between >= between.max() * (1.0 - 1e-12))
    first, last = int(top[0]), int(top[-1])
    if np.all(between[first:last + 1] >= between.max() * (1.0 - 1e-12)):  # one contiguous plateau
        return float(0.5 * (centres[first] + centres[last]))
    return float(centres[first])


def auto_head_mask(mean_image: np.ndarray) -> np.ndarray:
    """Head mask (bool, x y z) from a mean image: Otsu threshold, holes filled per slice, the largest
    3-D connected component kept. It holds the brain and whatever the threshold joins to it (scalp,
    orbits, skull base, CSF); the motion metric samples it, and the brain mask starts from it."""
    img = np.asarray(mean_image, dtype=np.float64)
    mask = img > otsu_threshold(img[img > 0]) if np.any(img > 0) else np.zeros(img.shape, bool)
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return _largest_component(mask)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


#: In-plane radius of the erosion that cuts the brain from what touches it across a thin bridge (mm):
#: the optic nerve with its sheath (4-6 mm across), the skull base, a scalp shell that the threshold
#: joins to the brain where the skull's signal gap is partial. A disc of radius r removes every
#: bridge narrower than 2 r; the cortex survives it (the brain is > 60 mm across on every slice the
#: analysis needs).
BRIDGE_RADIUS_MM = 5.0

#: A voxel whose signal drops by less than this fraction of the brain's median bolus drop does not
#: take up the bolus: CSF (ventricles, cisterns, the fourth ventricle) or vitreous. Grey and white
#: matter drop by 15-35 % at the peak of a single-dose bolus, CSF by 0 + noise. Measured on the
#: realistic head at SNR 30 (``bolus_drop``): the brain's median drop 0.14, white matter 0.14 +- 0.02
#: (lowest 0.065), CSF and orbits 0.014 +- 0.010 (the window's maximum biases them up; highest
#: 0.045). A quarter of the median (0.036) sits 5 SD below white matter and 2 SD above CSF: no
#: tissue voxel goes, <= 2 % of the ventricles stay (partial volume, noise).
NON_PERFUSED_DROP_FRACTION = 0.25

#: Only voxels brighter at baseline than this multiple of the brain's median are taken for CSF or
#: vitreous (both are T2-bright, 1.5-2 times white matter on gradient-echo EPI); a dark or
#: tissue-bright voxel that does not drop (a necrotic core, a haemorrhage, a T1-leaky lesion) stays.
BRIGHT_FRACTION = 1.15


def bolus_drop(data: np.ndarray, *, baseline: slice, peak: int, tr: float, window_s: tuple[float, float] = (-3.0, 9.0)
               ) -> tuple[np.ndarray, np.ndarray]:
    """Baseline image S0 (mean of the ``baseline`` frames, a.u.) and relative bolus drop (1 - S/S0,
    dimensionless), both float64 (x, y, z), from a series (x, y, z, t). The drop is the largest of
    3-frame running means of 1 - S/S0 over ``window_s`` seconds around the whole-brain bolus ``peak``
    frame, so a territory whose bolus comes a few seconds late still counts as perfused. A voxel with
    S0 <= 0 gets drop 0."""
    n_t = data.shape[3]
    s0 = data[..., baseline].mean(axis=3, dtype=np.float64)
    lo = max(baseline.stop, peak + int(np.floor(window_s[0] / tr)) - 1)
    hi = min(n_t, peak + int(np.ceil(window_s[1] / tr)) + 2)
    frames = data[..., lo:hi].astype(np.float64)
    if frames.shape[3] >= 3:
        frames = (frames[..., :-2] + frames[..., 1:-1] + frames[..., 2:]) / 3.0
    low = frames.min(axis=3) if frames.shape[3] else s0
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.where(s0 > 0, 1.0 - low / s0, 0.0)
    return s0, drop


def _disc(radius_vox: tuple[int, int]) -> np.ndarray:
    rx, ry = radius_vox
    x, y = np.meshgrid(np.arange(-rx, rx + 1), np.arange(-ry, ry + 1), indexing="ij")
    return ((x / max(rx, 0.5)) ** 2 + (y / max(ry, 0.5)) ** 2 <= 1.0)[:, :, None]


def auto_brain_mask(mean_image: np.ndarray, *, drop: np.ndarray | None = None,
                    voxel_mm: tuple[float, float, float] | None = None, keep: np.ndarray | None = None
                    ) -> np.ndarray:
    """Brain mask (bool, x y z) of a gradient-echo EPI series: the brain without scalp, orbits, skull
    base and (given ``drop``) CSF spaces. ``mean_image``: mean signal (a.u., x y z; the baseline
    frames' mean is best); ``drop``: relative signal drop at the bolus peak (dimensionless, x y z; ``bolus_drop``);
    ``voxel_mm``: voxel size (mm; None: 2 mm in-plane); ``keep``: voxels (bool, x y z) the CSF step
    leaves in the mask (the lesion ROIs: a necrotic or cystic part is the lesion's, not CSF).

    1. foreground: Otsu threshold of the positive voxels;
    2. erosion per slice by a disc of BRIDGE_RADIUS_MM (in-plane, so one slice works like a whole
       brain): cuts the thin bridges to scalp, orbits and skull base and removes the scalp shell;
    3. the largest 3-D connected component, grown back within the foreground by as many steps as the
       disc's radius, 8-connected in-plane and to the slices above and below (a geodesic dilation: it
       regains the brain's edge and a top or bottom slice smaller than the disc, and reaches only one
       radius along a cut bridge);
    4. holes filled per slice (dark vessels, a necrotic core, a dark ventricle);
    5. with ``drop``: voxels bright at baseline (> BRIGHT_FRACTION x the mask's median) that do not
       take up the bolus (drop < NON_PERFUSED_DROP_FRACTION x the mask's median drop) are removed:
       ventricles, cisterns, vitreous; then the largest component again.
    """
    img = np.asarray(mean_image, dtype=np.float64)
    if not np.any(img > 0):
        return np.zeros(img.shape, bool)
    fg = img > otsu_threshold(img[img > 0])
    vx, vy = (2.0, 2.0) if voxel_mm is None else (float(voxel_mm[0]), float(voxel_mm[1]))
    disc = _disc((max(1, int(round(BRIDGE_RADIUS_MM / vx))), max(1, int(round(BRIDGE_RADIUS_MM / vy)))))
    core = _largest_component(ndimage.binary_erosion(fg, structure=disc))
    if not core.any():  # smaller than the disc on every slice: no brain to cut from a head
        core = _largest_component(fg)
    step = np.zeros((3, 3, 3), bool)  # 8-connected in-plane (r steps cover the disc) and to the slices
    step[:, :, 1] = True  # above and below, so a top or bottom slice smaller than the disc comes back
    step[1, 1, :] = True
    mask = ndimage.binary_dilation(core, structure=step, iterations=max(disc.shape[:2]) // 2, mask=fg) | core
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    if drop is not None:
        d = np.asarray(drop, dtype=np.float64)
        if d.shape != img.shape:
            raise ValueError(f"drop has shape {d.shape}, the mean image {img.shape}")
        ref_drop = float(np.median(d[mask]))
        if ref_drop > 0:
            still = (d < NON_PERFUSED_DROP_FRACTION * ref_drop) & (img > BRIGHT_FRACTION * np.median(img[mask]))
            if keep is not None:
                still &= ~np.asarray(keep, dtype=bool)
            mask = _largest_component(mask & ~still)
    return mask


def mean_curve(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean signal (float64, (n_t,)) of the ``mask`` voxels (bool, x y z) of a series (x, y, z, t),
    one slice at a time (no copy of every masked voxel's curve at once)."""
    mask = np.asarray(mask, dtype=bool)
    total = np.zeros(data.shape[3])
    for z in range(data.shape[2]):
        if mask[:, :, z].any():
            total += data[:, :, z][mask[:, :, z]].sum(axis=0, dtype=np.float64)
    return total / max(int(mask.sum()), 1)


def auto_brain_mask_dsc(data: np.ndarray, *, tr: float, voxel_mm: tuple[float, float, float] | None = None,
                        keep: np.ndarray | None = None) -> np.ndarray:
    """Brain mask (bool, x y z) of a DSC series (x, y, z, t; TR ``tr`` s): ``auto_brain_mask`` of the
    mean image (the coarse brain, CSF kept) gives the baseline and the bolus peak on its mean curve
    (find_baseline; BaselineError when there is none), then ``auto_brain_mask`` of the baseline image
    with the bolus drop (``bolus_drop``) removes what does not take up the bolus, except ``keep``."""
    coarse = auto_brain_mask(data.mean(axis=3), voxel_mm=voxel_mm)
    if not coarse.any():
        return coarse
    base = find_baseline(mean_curve(data, coarse), tr=tr)
    s0, drop = bolus_drop(data, baseline=base.frames, peak=base.peak, tr=tr)
    return auto_brain_mask(s0, drop=drop, voxel_mm=voxel_mm, keep=keep)


# --- frames that are not images of the patient: dropped, duplicated, spiking

#: A slice of a frame whose head signal is below this fraction of the slice's median over the series is
#: dropped (all-zero or near-zero: a reconstruction or transfer failure). The bolus never gets there:
#: the deepest real curve at hand, an arterial ROI at TE 30 ms (OSIPI LCB_BNI dual-echo data), keeps
#: 42 % of its baseline and normal white matter 76 %; a whole slice of head averages brain with scalp,
#: bone marrow and CSF, which drop less.
DROPPED_FRACTION = 0.3

#: A slice of a frame whose head signal lies above both neighbouring frames by more than
#: max(SPIKE_NOISE_SD noise SD, SPIKE_FRACTION of its median) spikes; below both by as much, outside
#: the bolus window, too. Real curves at hand (OSIPI LCB_BNI: tumour, white matter and arterial ROIs,
#: 121 frames, TE 2 and 30 ms) step by at most 4.4 % above both neighbours and 4.3 % below them outside
#: the bolus, with a noise SD of 1-1.2 %: small ROIs; a slice of head averages thousands of voxels.
SPIKE_FRACTION = 0.05
SPIKE_NOISE_SD = 8.0

#: Around the whole-head bolus minimum (s before, s after), a frame below both neighbours is the bolus:
#: at TR 3 s the first pass is 2-3 frames wide. Only a dropped frame is found there.
BOLUS_WINDOW_S = (15.0, 30.0)

#: More frames with a bad slice than this share of the series (at least 1) are refused: each repair is
#: a straight line through the gap, and the shape of the curves is the measurement.
MAX_BAD_FRAME_FRACTION = 0.05

#: Fewest head voxels in a slice for its own curve to be checked (a top or bottom slice that only
#: touches the skull is too noisy to tell a spike from noise).
MIN_SLICE_VOXELS = 50


@dataclass(frozen=True)
class BadFrame:
    """One frame to repair: ``frame`` (0-based), ``kind`` ("dropped", "duplicated" or "spike") and the
    ``slices`` (0-based, along the third axis) that are bad in it."""

    frame: int
    kind: str
    slices: tuple[int, ...]

    def as_dict(self, n_slices: int) -> dict:
        return {"frame": self.frame, "kind": self.kind,
                "slices": "all" if len(self.slices) == n_slices else list(self.slices)}


def find_bad_frames(data: np.ndarray, *, tr: float, head: np.ndarray | None = None) -> list[BadFrame]:
    """Dropped, duplicated and spiking frames of a series (x, y, z, t, a.u.), slice by slice, from the
    mean signal of the head (``head``: bool x y z; None: auto_head_mask of the mean image).

    dropped: the slice's head signal is below DROPPED_FRACTION of its median; duplicated: the slice is
    identical, to the last bit, to the same slice of the frame before (a noisy image never repeats);
    spike: see SPIKE_FRACTION and BOLUS_WINDOW_S. The first and last frames have one neighbour and are
    not tested for spikes (a bright first frame is the approach to the steady state). Sorted by frame.
    """
    n_x, n_y, n_z, n_t = data.shape
    if head is None:
        head = auto_head_mask(data.mean(axis=3, dtype=np.float64))
    head = np.asarray(head, dtype=bool)
    curves = np.full((n_z, n_t), np.nan)
    counts = head.sum(axis=(0, 1))
    for z in range(n_z):
        if counts[z] >= MIN_SLICE_VOXELS:
            curves[z] = data[:, :, z][head[:, :, z]].mean(axis=0, dtype=np.float64)
    checked = np.flatnonzero(np.isfinite(curves[:, 0]))
    kinds: dict[int, dict[int, str]] = {}  # frame -> slice -> kind

    med = np.nanmedian(curves, axis=1)
    # a slice identical to the frame before has the same sum, to the last bit (same values, same order):
    # only those pairs are compared voxel by voxel
    sums = data.sum(axis=(0, 1), dtype=np.float64)  # (z, t)
    same_sum = sums[:, 1:] == sums[:, :-1]
    for z in checked.tolist():  # Python ints: slice and frame numbers are dict keys and BadFrame fields
        for k in np.flatnonzero(curves[z] < DROPPED_FRACTION * med[z]).tolist():
            kinds.setdefault(int(k), {})[int(z)] = "dropped"
        for k in (np.flatnonzero(same_sum[z]) + 1).tolist():
            if z not in kinds.get(k, {}) and np.array_equal(data[:, :, z, k], data[:, :, z, k - 1]):
                kinds.setdefault(k, {})[int(z)] = "duplicated"

    if checked.size:  # spikes, on curves with the frames found so far filled in from their neighbours
        whole = np.average(curves[checked], axis=0, weights=counts[checked])
        bad_any = np.zeros(n_t, bool)
        bad_any[list(kinds)] = True
        whole = _fill(whole, bad_any)
        # the bolus minimum of the 3-frame running median: one dark frame is no bolus, even at TR 5 s
        # the whole-head first pass spans 3 frames or more (the phantoms)
        peak = int(np.argmin(ndimage.median_filter(whole, size=3, mode="nearest")))
        lo = peak - int(np.ceil(BOLUS_WINDOW_S[0] / tr))
        hi = peak + int(np.ceil(BOLUS_WINDOW_S[1] / tr))
        for z in checked.tolist():
            bad = np.array([z in kinds.get(k, {}) for k in range(n_t)])
            g = _fill(curves[z], bad)
            thr = max(SPIKE_NOISE_SD * _robust_sd(g), SPIKE_FRACTION * med[z])
            up = g[1:-1] - np.maximum(g[:-2], g[2:])
            down = np.minimum(g[:-2], g[2:]) - g[1:-1]
            for k in range(1, n_t - 1):
                if bad[k]:
                    continue
                if up[k - 1] > thr or (down[k - 1] > thr and not lo <= k <= hi):
                    kinds.setdefault(k, {})[int(z)] = "spike"
    out = []
    for k in sorted(kinds):
        by = kinds[k]
        order = ("dropped", "spike", "duplicated")
        kind = min(by.values(), key=order.index)
        out.append(BadFrame(frame=k, kind=kind, slices=tuple(sorted(by))))
    return out


def _fill(curve: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """``curve`` (n_t,) with the ``bad`` frames linearly interpolated from the good ones (nearest at the ends)."""
    if not bad.any() or bad.all():
        return curve.copy()
    t = np.arange(curve.size)
    out = curve.copy()
    out[bad] = np.interp(t[bad], t[~bad], curve[~bad])
    return out


def bad_frame_problem(bad: list[BadFrame], n_t: int) -> str:
    """Why ``bad`` frames cannot be repaired (two adjacent frames bad in one slice, or more than
    MAX_BAD_FRAME_FRACTION of the ``n_t`` frames), or "" when they can."""
    limit = max(1, int(MAX_BAD_FRAME_FRACTION * n_t))
    if len(bad) > limit:
        return (f"{len(bad)} of {n_t} frames are dropped, duplicated or spiking (frames "
                f"{_listed([b.frame for b in bad])}; at most {limit} can be repaired)")
    for a, b in pairwise(bad):
        if b.frame == a.frame + 1 and set(a.slices) & set(b.slices):
            return (f"frames {a.frame} and {b.frame} are both bad ({a.kind}, {b.kind}): two adjacent bad frames "
                    "cannot be interpolated")
    return ""


def _listed(frames: list[int]) -> str:
    return ", ".join(str(f) for f in frames[:10]) + (", ..." if len(frames) > 10 else "")


def repair_frames(data: np.ndarray, bad: list[BadFrame]) -> np.ndarray:
    """A copy of ``data`` (x, y, z, t) with each bad slice of each bad frame replaced, voxel by voxel, by
    the straight line between the nearest good frames of that slice (the nearest good frame at either
    end of the series). float32."""
    out = np.array(data, dtype=np.float32, copy=True)
    n_t = out.shape[3]
    for z in sorted({z for b in bad for z in b.slices}):
        bad_t = np.zeros(n_t, bool)
        bad_t[[b.frame for b in bad if z in b.slices]] = True
        good = np.flatnonzero(~bad_t)
        for k in np.flatnonzero(bad_t):
            after = good[good > k]
            before = good[good < k]
            if before.size and after.size:
                a, b = int(before[-1]), int(after[0])
                w = (k - a) / (b - a)
                out[:, :, z, k] = (1 - w) * out[:, :, z, a] + w * out[:, :, z, b]
            else:
                out[:, :, z, k] = out[:, :, z, int((before if before.size else after)[-1 if before.size else 0])]
    return out


def describe_bad_frames(bad: list[BadFrame], n_slices: int) -> str:
    """One sentence naming the repaired frames (0-based) and what was wrong with each."""
    parts = []
    for b in bad:
        where = "" if len(b.slices) == n_slices else f" in slice{'s' if len(b.slices) > 1 else ''} " + \
            ", ".join(str(z) for z in b.slices)
        parts.append(f"{b.frame} ({b.kind}{where})")
    return (f"frame{'s' if len(bad) > 1 else ''} {', '.join(parts)} (0-based) replaced by linear interpolation in "
            "time from the neighbouring frames: check the acquisition or the export")
