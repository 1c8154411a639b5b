"""analyze(inputs, config) -> Result: the stages of the analysis, composed in ``_analyze``.

Inside, masked voxels are rows of an (n_vox, n_t) array (``_Voxels``) processed in chunks that bound
memory, and scattered back to (x, y, z) maps at the end. A voxel that cannot be fitted is NaN, never 0.
The stages' numerics live in quantify/; here are the glue of each stage (which rows, which masks,
which error names which file) and the chunked map loop. Options: config.Config; the typed Result and
report entries: results.py; writing them: report/outputs.py. Nothing here prints or writes.
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from perfusion.config import Config, resolve_leakage
from perfusion.errors import InputError
from perfusion.io import Series
from perfusion.quantify import aif as aif_mod
from perfusion.quantify import deconvolution, gammafit, leakage, maps, modelfit, roi, signal
from perfusion.quantify import reference as reference_mod
from perfusion.quantify.register import AnatBackground
from perfusion.quantify.roi import RoiScore
from perfusion.quantify.signal import Baseline
from perfusion.results import AifGammaVariate, ArterialInput, Leakage, Motion, Reference, VenousOutput, with_units
from perfusion.units import cbf_scale, cbv_scale

#: Why cbv.nii.gz is the trapezoid ratio and not the fitted first pass (measured, issue 3).
GV_CBV_CHOICE = ("measured on the phantom (recirculation and an 8 % plateau in the AIF, SNR 150): trapezoid CBV "
                 "median block error 3.5 %, fitted first-pass CBV 9.5 % (the plateau under the first pass is fitted "
                 "into it) with 29 % of tissue voxels unfittable")

#: Maps from the voxel-wise gamma-variate fit (gammafit.py), in Result.maps and written only with
#: Config.gamma_maps (--gamma-maps).
GV_MAPS = ("gv_cbv", "gv_peak", "gv_ttp", "gv_fwhm", "gv_quality")

#: report.json "brain" "source" of the automatic brain mask (signal.auto_brain_mask).
AUTO_BRAIN_SOURCE = ("automatic (signal.auto_brain_mask: Otsu threshold of the baseline image, in-plane erosion that "
                     "cuts scalp, orbits and skull base, largest component dilated back, holes filled; voxels bright "
                     "at baseline that do not drop with the bolus (CSF, vitreous) removed, lesion ROIs kept)")

#: With the "lesion" gate, rCBV divides the lesion's CBV, corrected without a gate, by the reference
#: tissue's CBV under the same ungated correction (not by the reference in the CBV map, which the gate
#: leaves as measured): what the model does to a non-leaking curve whose shape differs from the
#: reference curve's then cancels as far as lesion and reference share it. Measured on the realistic
#: phantom (validate.validate_realistic; README "Realistic phantom"): bidirectional rCBV errors up to 24 %
#: against the reference as measured, within 20 % against the reference corrected alike.
REFERENCE_CORRECTED_ALIKE = True

#: Each sensitivity key as (correct_leakage method, gate_k): in a lesion ROI, every correction without
#: a gate (as the default "lesion" gate applies it), and BSW also with its per-voxel gate.
SENSITIVITY_CORRECTIONS = {"bsw": ("bsw", None), "bsw_gated": ("bsw", leakage.GATE_K), "residue": ("residue", None),
                           "bidirectional": ("bidirectional", None)}

#: Reference candidates must have a baseline coefficient of variation below this percentile of the brain's.
STABLE_BASELINE_PERCENTILE = 90.0

#: Rows per step where the pipeline averages many curves (bounds the float64 copy).
REFERENCE_CHUNK = 16384


@dataclass(frozen=True)
class Inputs:
    """A loaded case: the series, optional masks (bool x y z) and the paths they came from."""

    series: Series
    brain: np.ndarray | None = None
    aif: np.ndarray | None = None
    reference: np.ndarray | None = None
    vof: np.ndarray | None = None
    rois: dict[str, np.ndarray] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """Maps (float32, x y z, NaN where not computed) and everything the report needs. Made once, by
    pipeline.analyze (case.analyze_case adds motion, timings and the anatomical image by making a new
    one with dataclasses.replace): never changed after it is made."""

    maps: dict[str, np.ndarray]
    brain: np.ndarray  # bool x y z
    aif_mask: np.ndarray  # bool x y z
    reference_mask: np.ndarray  # bool x y z
    aif_curve: np.ndarray = with_units("1/s")  # (n_t,)
    time_s: np.ndarray = with_units("s")  # (n_t,), from the start of the series
    baseline: Baseline = with_units()
    aif: ArterialInput = with_units()  # report.json "aif"
    leakage: Leakage = with_units()  # report.json "leakage"
    reference: Reference = with_units()  # report.json "reference"
    rois: list[RoiScore] = with_units()
    warnings: list[str] = with_units()
    config: Config = with_units()
    seconds: float = with_units("s")
    curves: dict[str, np.ndarray] = with_units("1/s", default_factory=dict)  # mean delta R2* per region
    baseline_image: np.ndarray | None = with_units("a.u.", default=None)  # mean signal of the baseline frames (x y z)
    anat: AnatBackground | None = with_units(default=None)  # when --anat was given (case.analyze_case)
    motion: Motion | None = with_units(default=None)  # head motion (case.analyze_case)
    timings: dict[str, float] = with_units("s", default_factory=dict)  # wall s per stage (report.json "timings_s")
    n_voxels: int = with_units("voxels", default=0)  # voxels analysed (brain and every mask)
    brain_source: str = with_units(default="")  # the brain mask's file, or how the automatic one was made
    peak_mb: dict[str, float] = with_units("MB", default_factory=dict)  # traced peak per stage (tracemalloc on only)
    fit: dict = with_units(default_factory=dict)  # report.json "fit": brain voxels by fit outcome (pipeline._fit_info)
    frames_repaired: list = with_units(default_factory=list)  # report.json "frames_repaired" (pipeline.repair_series)


# ============================================================================ the composition


def analyze(inputs: Inputs, config: Config = Config()) -> Result:
    """Run the whole analysis on a loaded case.

    BLAS runs on one thread throughout: the large products run in voxel chunks on threads of their own
    (_kernels/parallel.py), and OpenBLAS's idle threads spin on the cores for a while after every call,
    which slowed the numba loops that follow (the gamma-variate fit by up to 50 % after a csvd product)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _analyze(inputs, config)


def _analyze(inputs: Inputs, config: Config) -> Result:
    """The stages in order; each returns its part of the Result and its warnings (``notes``, in the
    order the stages run). The Result is made once, at the end.

    Long because it is the list of the stages, read top to bottom; splitting it would hide the order."""
    t_start = time.perf_counter()
    stages = Stages()
    config = resolve_leakage(config, inputs.series)
    series, frames_repaired, notes = repair_series(inputs.series)  # done already after case.analyze_case's
    inputs = replace(inputs, series=series)
    s = inputs.series

    # -- brain mask and baseline
    brain, brain_source = _brain_mask(inputs)
    _check_masks(inputs, brain)
    base, mean_curve = _brain_baseline(inputs, brain)
    notes += _baseline_notes(base, tr=s.tr)
    stages.lap("brain_mask")

    # -- delta R2* of every analysed voxel (the brain and every mask), frames before the steady state dropped
    _check_first_pass(inputs, mean_curve, base)
    vox = _delta_r2s(inputs, brain, base, chunk=config.chunk_voxels)
    stages.lap("delta_r2s")

    # -- AIF (and VOF scaling)
    aif_curve, aif_rows, aif, vof_rows, aif_notes = _arterial_input(inputs, config, vox)
    notes += aif_notes
    aif_mask = vox.mask_of(aif_rows)
    stages.lap("aif")

    # -- gamma-variate first pass of the AIF (for the gv_cbv map and --recirculation remove)
    gv_aif, aif_used, gv_notes = _aif_first_pass(inputs, config, vox, aif_curve)
    notes += gv_notes
    stages.lap("gamma_variate")

    # -- the deconvolution operator, and what the leakage correction needs (method, reference curves)
    op = _operator(inputs, config, aif_used)
    stages.lap("deconvolution")
    plan, leak_notes = _leakage_plan(inputs, config, vox, aif_curve)
    notes += leak_notes
    stages.lap("leakage")

    # -- maps, chunk by chunk (leakage correction, gamma-variate fit where every voxel's is needed, deconvolution)
    out, fit_status, leak = _chunk_maps(vox, config, op, plan, aif_curve=aif_curve, aif_used=aif_used, gv_aif=gv_aif,
                                        stages=stages)
    fit_info = _fit_info(config.method, fit_status[vox.brain_rows], out, vox.brain_rows)
    stages.lap("maps")
    volumes = {k: vox.volume(vals) for k, vals in out.items() if config.gamma_maps or k not in GV_MAPS}

    # -- reference tissue, rCBV and standardised rCBV
    vessels = _vessels(inputs, vox, aif_mask, vof_rows)  # the vessel gates of the reference and the lesions
    ref, ref_mask, ref_notes = _reference_tissue(inputs, vox, volumes["cbv"], aif_mask, plan, vessels)
    notes += ref_notes
    volumes["rcbv"] = (volumes["cbv"] / ref.cbv_median).astype(np.float32)
    srcbv, standardized, std_notes = reference_mod.standardized(volumes["cbv"], brain, inputs.rois)
    if srcbv is not None:
        volumes["srcbv"] = srcbv
    ref = replace(ref, standardized=standardized)
    notes += std_notes
    stages.lap("reference_rois")

    # -- the gamma-variate fit of the voxels the ROI scores read (the ROIs' and the reference's), the same
    # with and without --gamma-maps; report.json's share of the fitted brain voxels whose fit succeeded
    gv_rows = vox.rows_of(ref_mask | _any_roi(inputs.rois, vox.shape)) if inputs.rois else np.array([], np.intp)
    gv_region = _region_gamma_variate(vox, config, plan, gv_rows, aif_curve=aif_curve)
    aif = replace(aif, gamma_variate=_aif_gamma_variate(gv_aif, aif_curve, _tissue_fits(config, vox, out, gv_region),
                                                        tr=s.tr, config=config))
    stages.lap("gamma_variate")

    # -- ROIs: leakage sensitivity and bootstrap interval on the ROI and reference rows only, then the verdicts
    scores = []
    if inputs.rois:
        scores, ref, volumes["rcbv"] = _score_rois(inputs, config, vox, volumes, plan=plan, ref=ref, ref_mask=ref_mask,
                                                   aif_curve=aif_curve, aif_used=aif_used,
                                                   aif_quality=aif.quality_score, vessels=vessels,
                                                   gv_peak=vox.volume(gv_region["gv_peak"]))
        volumes["ftb"] = _ftb(inputs.rois, volumes["rcbv"], config)

    # -- mean curves of the reference and the ROIs, before and after leakage correction (for the report)
    curves = _mean_curves(inputs, vox, plan, ref_mask, aif_curve)
    baseline_image = s.data[..., base.start:base.stop].mean(axis=3)
    stages.lap("reference_rois")

    return Result(maps=volumes, brain=brain, aif_mask=aif_mask, reference_mask=ref_mask, aif_curve=aif_curve,
                  time_s=vox.t_frames, baseline=base, aif=aif, leakage=leak, reference=ref, rois=scores,
                  warnings=notes, config=config, seconds=time.perf_counter() - t_start, curves=curves,
                  baseline_image=baseline_image, timings={k: round(v, 4) for k, v in stages.seconds.items()},
                  n_voxels=vox.n_vox, fit=fit_info, peak_mb={k: round(v, 1) for k, v in stages.peak_mb.items()},
                  brain_source=brain_source, frames_repaired=frames_repaired)


class Stages:
    """Wall seconds per named stage: ``lap(name)`` charges the time since the previous lap (or the
    start) to ``name``, summed over repeated laps (the chunk loop's steps)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}  # with tracemalloc on (perfusion bench): peak traced MB per stage
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now
        if tracemalloc.is_tracing():
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), tracemalloc.get_traced_memory()[1] / 1e6)
            tracemalloc.reset_peak()


# ============================================================================ frames, brain mask, baseline


def repair_series(series: Series) -> tuple[Series, list[dict], list[str]]:
    """``series`` with its dropped, duplicated and spiking frames (signal.find_bad_frames) interpolated in
    time (signal.repair_frames); report.json's "frames_repaired" entries and the warning. InputError
    naming the file when they cannot be repaired (signal.bad_frame_problem)."""
    if series.frames_checked:
        return series, [], []
    bad = signal.find_bad_frames(series.data, tr=series.tr)
    if not bad:
        return replace(series, frames_checked=True), [], []
    why = signal.bad_frame_problem(bad, series.n_frames)
    if why:
        raise InputError(f"{series.path}: {why}; re-export the series from the scanner, or repeat the acquisition")
    n_z = series.shape3d[2]
    repaired = replace(series, data=signal.repair_frames(series.data, bad), frames_checked=True)
    return repaired, [b.as_dict(n_z) for b in bad], [signal.describe_bad_frames(bad, n_z)]


def _brain_mask(inputs: Inputs) -> tuple[np.ndarray, str]:
    """The brain (bool x y z): the given mask, or signal.auto_brain_mask_dsc with the lesion ROIs kept
    in it (a necrotic or cystic core is never taken for CSF); and its report.json "brain" "source"."""
    s = inputs.series
    if inputs.brain is not None:
        return inputs.brain, str(inputs.paths.get("brain", "given mask"))
    lesions = _any_roi(inputs.rois, s.shape3d)
    try:  # the coarse brain's baseline and bolus peak, then the brain without what does not take up the bolus
        brain = signal.auto_brain_mask_dsc(s.data, tr=s.tr, voxel_mm=s.voxel_mm, keep=lesions)
    except signal.BaselineError as exc:
        raise InputError(f"{s.path}: {exc}; check that this is a DSC series with a contrast bolus") from None
    if brain.sum() < 10:
        raise InputError(f"{s.path}: the automatic brain mask is empty; give a mask with --mask")
    return brain, AUTO_BRAIN_SOURCE


def _where(path: Path | None, what: str) -> str:
    return str(path) if path else what


def _check_masks(inputs: Inputs, brain: np.ndarray) -> None:
    """InputError for an ROI wholly outside the brain mask (a mask of another case or grid: its rCBV
    would be scored on background) and for a reference mask that overlaps an ROI (the lesion would
    raise its own reference: rCBV biased low)."""
    for name, m in inputs.rois.items():
        if not (m & brain).any():
            where = "--mask" if inputs.brain is not None else "the automatic brain mask"
            raise InputError(f"{_where(inputs.paths.get(f'roi:{name}'), name)}: the ROI ({int(m.sum())} voxels) lies "
                             f"wholly outside the brain ({where}); draw it on the lesion on this series' grid"
                             + (" or give a brain mask that holds it with --mask" if inputs.brain is None else ""))
    if inputs.reference is not None:
        where = _where(inputs.paths.get("reference"), "reference mask")
        brain_where = "--mask" if inputs.brain is not None else "the automatic brain mask"
        n, inside = int(inputs.reference.sum()), int((inputs.reference & brain).sum())
        fix = "draw it in normal-appearing white matter of this series, on its grid"
        if n and (n - inside) / n > reference_mod.MAX_REFERENCE_OUTSIDE_FRACTION:
            raise InputError(f"{where}: {n - inside} of the reference mask's {n} voxels lie outside the brain "
                             f"({brain_where}); {fix}")
        if inside < reference_mod.MIN_REFERENCE_VOXELS:
            raise InputError(f"{where}: the reference mask has {inside} voxels inside the brain, fewer than "
                             f"{reference_mod.MIN_REFERENCE_VOXELS} (its median would be noise); {fix}, about 0.5 mL")
        for name, m in inputs.rois.items():
            shared = int((m & inputs.reference).sum())
            if shared:
                raise InputError(f"{where}: the reference mask overlaps ROI {name} ({shared} voxels); draw it in "
                                 "normal-appearing white matter away from the lesion")


def _brain_baseline(inputs: Inputs, brain: np.ndarray):
    """signal.find_baseline on the mean signal of the ``brain`` voxels; (Baseline, mean curve (n_t,))."""
    s = inputs.series
    curve = signal.mean_curve(s.data, brain)
    try:
        return signal.find_baseline(curve, tr=s.tr), curve
    except signal.BaselineError as exc:
        raise InputError(f"{s.path}: {exc}; check that this is a DSC series with a contrast bolus") from None


def _baseline_notes(base: signal.Baseline, *, tr: float) -> list[str]:
    """The warning for a baseline shorter than signal.WARN_BASELINE_FRAMES (``tr`` in s)."""
    n_base = base.stop - base.start
    if n_base >= signal.WARN_BASELINE_FRAMES:
        return []
    return [f"the baseline has only {n_base} frames ({n_base * tr:g} s, frames {base.start}-{base.stop - 1} "
            f"before the bolus arrives at frame {base.arrival}; at least {signal.WARN_BASELINE_FRAMES} "
            "expected): S0 and every map are noisier; acquire more pre-bolus frames"]


def _check_first_pass(inputs: Inputs, mean_curve: np.ndarray, base: signal.Baseline) -> None:
    """InputError when the series stops before the bolus has passed (signal.check_first_pass)."""
    s = inputs.series
    try:
        signal.check_first_pass(mean_curve, base, tr=s.tr)
    except signal.BaselineError as exc:
        raise InputError(f"{s.path}: {exc}; give the complete series") from None


# ============================================================================ the analysed voxels as rows


@dataclass(frozen=True)
class _Voxels:
    """The analysed voxels (the brain and every mask) as rows, frames from the steady state on
    (``base.start``): the arrays every stage after the baseline reads."""

    series: Series
    brain: np.ndarray  # bool x y z
    base: signal.Baseline  # frames of the whole series
    idx: np.ndarray  # sorted flat (x y z) indices of the rows
    brain_rows: np.ndarray  # bool (n_vox,): the row is a brain voxel
    flat: np.ndarray  # the series' signal, a.u., (n_x * n_y * n_z, n_frames)
    dr2s: np.ndarray  # delta R2*, 1/s, float32 (n_vox, n_t)
    ratio_min: np.ndarray  # per row: the smallest S/S0 (signal.to_delta_r2s_with_ratio)
    ratio_sd: np.ndarray  # per row: the SD of S/S0 over the baseline
    tissue_curve: np.ndarray  # mean delta R2* of the brain rows, 1/s, float64 (n_t,)

    @property
    def n_vox(self) -> int:
        return int(self.idx.size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.series.shape3d

    @property
    def keep(self) -> slice:
        """The frames analysed, in the series' numbering."""
        return slice(self.base.start, self.series.n_frames)

    @property
    def bl(self) -> slice:
        """The baseline frames in the analysed frames' numbering."""
        return slice(0, self.base.stop - self.base.start)

    @property
    def t_first_s(self) -> float:
        """Time (s) of the first analysed frame from the start of the series."""
        return self.base.start * self.series.tr

    @property
    def t_frames(self) -> np.ndarray:
        """Time (s) of each analysed frame from the start of the series."""
        return (self.base.start + np.arange(self.series.n_frames - self.base.start)) * self.series.tr

    @property
    def tissue_peak_frame(self) -> int:
        return int(np.argmax(self.tissue_curve))

    def rows_of(self, mask: np.ndarray) -> np.ndarray:
        """Rows that ``mask`` (bool x y z) selects."""
        return _rows_of(mask, self.idx)

    def mask_of(self, rows: np.ndarray) -> np.ndarray:
        """The voxels of ``rows`` as a mask (bool x y z)."""
        mask = np.zeros(self.shape, bool)
        mask.ravel()[self.idx[rows]] = True
        return mask

    def volume(self, values: np.ndarray) -> np.ndarray:
        """Per-row ``values`` as a float32 map (x y z), NaN outside the analysed voxels."""
        vol = np.full(self.shape, np.nan, np.float32)
        vol.ravel()[self.idx] = values
        return vol


def _rows_of(mask: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows of the analysed voxels (``idx``, sorted flat indices) that ``mask`` (bool x y z) selects."""
    flat_idx = np.flatnonzero(mask.ravel())
    pos = np.clip(np.searchsorted(idx, flat_idx), 0, idx.size - 1)
    return pos[idx[pos] == flat_idx]


def _rows_nanmean(a: np.ndarray, rows: np.ndarray, *, chunk: int) -> np.ndarray:
    """np.nanmean(a[rows], axis=0) (float64) without copying every selected row at once."""
    total = np.zeros(a.shape[1])
    count = np.zeros(a.shape[1])
    sel = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows)
    for lo in range(0, sel.size, chunk):
        part = a[sel[lo: lo + chunk]].astype(np.float64)
        ok = np.isfinite(part)
        total += np.where(ok, part, 0.0).sum(axis=0)
        count += ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count  # NaN where no row is finite, as nanmean


def _delta_r2s(inputs: Inputs, brain: np.ndarray, base: signal.Baseline, *, chunk: int) -> _Voxels:
    """Delta R2* (1/s) of the brain and of every mask's voxels, ``chunk`` rows at a time, with the S/S0
    statistics of AIF selection and the brain's mean curve."""
    s = inputs.series
    analysis = brain.copy()
    for extra in [inputs.aif, inputs.reference, inputs.vof, *inputs.rois.values()]:
        if extra is not None:
            analysis |= extra
    idx = np.flatnonzero(analysis.ravel())
    flat = s.data.reshape(-1, s.n_frames)
    brain_rows = brain.ravel()[idx]
    n_vox = idx.size
    keep = slice(base.start, s.n_frames)
    bl = slice(0, base.stop - base.start)
    dr2s = np.empty((n_vox, s.n_frames - base.start), np.float32)
    ratio_min = np.empty(n_vox)
    ratio_sd = np.empty(n_vox)
    for lo in range(0, n_vox, chunk):
        sl = slice(lo, min(lo + chunk, n_vox))
        _, _, ratio_min[sl], ratio_sd[sl] = signal.to_delta_r2s_with_ratio(flat[idx[sl], keep], te=s.te, baseline=bl,
                                                                           out=dr2s[sl])
    return _Voxels(series=s, brain=brain, base=base, idx=idx, brain_rows=brain_rows, flat=flat, dr2s=dr2s,
                   ratio_min=ratio_min, ratio_sd=ratio_sd,
                   tissue_curve=_rows_nanmean(dr2s, brain_rows, chunk=chunk))


# ============================================================================ AIF


def _arterial_input(inputs: Inputs, config: Config, vox: _Voxels):
    """The AIF stage: the arterial voxels (the --aif mask, or chosen automatically), their mean curve
    (1/s) on their own baseline, its VOF scaling (``config.vof``) and report.json's "aif". Returns (the
    AIF the maps use, its rows, results.ArterialInput, the VOF's rows when the scaling was applied,
    else None (the vessel gates), warnings)."""
    s = vox.series
    # the brain rows' curves: a view when the brain is every analysed voxel (no ROI outside it), else one copy
    brain_dr2s = vox.dr2s if vox.brain_rows.all() else vox.dr2s[vox.brain_rows]
    rows, source, steps, feats = _arterial_rows(inputs, config, vox, brain_dr2s)
    curve, aif_bl = aif_mod.own_baseline_curve(vox.flat[vox.idx[rows], vox.keep].astype(np.float64), te=s.te,
                                               tr=s.tr, bl=vox.bl)
    measured = aif_mod.aif_quality(curve, tr=s.tr, baseline=aif_bl, tissue_peak_frame=vox.tissue_peak_frame,
                                   t0=vox.t_first_s)
    notes = list(measured["warnings"])
    vof, vof_rows = VenousOutput(source="none"), None
    if config.vof != "none":
        curve, vof, vof_rows, vof_notes = _venous_scaling(inputs, config, vox, curve, brain_dr2s=brain_dr2s,
                                                          feats=feats, steps=steps)
        notes += vof_notes
    entry, quality_notes = aif_mod.arterial_entry(
        curve, measured=measured, tr=s.tr, baseline=aif_bl, t0=vox.t_first_s, tissue_peak_frame=vox.tissue_peak_frame,
        tissue_curve=vox.tissue_curve, kh=config.kh, rho=config.rho, source=source, n_voxels=rows.size, steps=steps,
        vof=vof)
    notes += [w for w in quality_notes if w not in notes]
    return curve, rows, entry, vof_rows, notes


def _arterial_rows(inputs: Inputs, config: Config, vox: _Voxels, brain_dr2s: np.ndarray):
    """The AIF's rows, source, selection steps and the brain rows' curve features (None for a mask).
    InputError naming the mask when none of its voxels is usable, or the series when the automatic
    selection finds no artery."""
    s = vox.series
    if inputs.aif is not None:
        rows = np.flatnonzero(inputs.aif.ravel()[vox.idx])
        path = inputs.paths.get("aif")
        if not np.all(np.isfinite(vox.dr2s[rows]), axis=1).any():
            raise InputError(f"{path}: no voxel of the AIF mask has a usable signal; check the mask")
        if not aif_mod.shows_bolus(vox.ratio_min[rows], vox.ratio_sd[rows]).any():
            raise InputError(f"{path}: no voxel of the AIF mask shows a contrast bolus "
                             f"(contrast-to-noise at least {aif_mod.MIN_CNR:g}); draw it on an artery or leave --aif "
                             "out for the automatic selection")
        return rows, str(path), {}, None
    brain_idx = np.flatnonzero(vox.brain_rows)
    feats = aif_mod.curve_features(brain_dr2s, vox.ratio_min[brain_idx], vox.ratio_sd[brain_idx], baseline=vox.bl,
                                   tr=s.tr)
    try:
        chosen, steps = aif_mod.choose_automatic(brain_dr2s, feats, tr=s.tr, selection=config.aif_selection,
                                                 n_voxels=config.aif_voxels)
    except aif_mod.AifError as exc:
        raise InputError(f"{s.path}: {exc}; give arterial voxels with --aif MASK") from None
    return brain_idx[chosen], f"automatic ({config.aif_selection})", steps, feats


def _venous_scaling(inputs: Inputs, config: Config, vox: _Voxels, curve: np.ndarray, *, brain_dr2s, feats, steps):
    """The venous voxels (the --vof mask, or aif.auto_vof on the brain rows after the arteries' first
    moment) and aif.vof_scaling of the AIF ``curve`` (1/s) by their curve. Returns (the AIF,
    results.VenousOutput, the VOF's rows when applied else None, warnings). With "guarded", finding
    no venous voxel leaves the AIF as it is; with "auto" it is an error (aif.AifError)."""
    s = vox.series
    if inputs.vof is not None:
        vof_rows = np.flatnonzero(inputs.vof.ravel()[vox.idx])
        source = str(inputs.paths.get("vof"))
    else:
        brain_idx = np.flatnonzero(vox.brain_rows)
        if feats is None:
            feats = aif_mod.curve_features(brain_dr2s, vox.ratio_min[brain_idx], vox.ratio_sd[brain_idx],
                                           baseline=vox.bl, tr=s.tr)
        art_t = steps.get("first_moment_s") if isinstance(steps, dict) else None
        try:
            vof_rows = brain_idx[aif_mod.auto_vof(brain_dr2s, feats, tr=s.tr, arterial_time_s=art_t)]
        except aif_mod.AifError as exc:
            if config.vof != "guarded":
                raise
            return curve, VenousOutput(source="none", mode="guarded", applied=False, why=str(exc)), None, []
        source = "automatic"
    if vof_rows.size == 0:
        return curve, VenousOutput(source="none"), None, ["no venous voxel found for --vof; the AIF was not scaled"]
    vof_curve, _ = aif_mod.own_baseline_curve(vox.flat[vox.idx[vof_rows], vox.keep].astype(np.float64), te=s.te,
                                              tr=s.tr, bl=vox.bl)
    scaled, entry, notes = aif_mod.vof_scaling(curve, vof_curve, tr=s.tr, mode=config.vof, source=source,
                                               n_voxels=vof_rows.size, tissue_curve=vox.tissue_curve)
    return scaled, entry, (vof_rows if entry.applied else None), notes


def _aif_first_pass(inputs: Inputs, config: Config, vox: _Voxels, aif_curve: np.ndarray):
    """The gamma-variate fit of the AIF's first pass (gammafit.GammaFit of one curve), the AIF the
    deconvolution uses (the fit with --recirculation remove, else ``aif_curve``; 1/s) and warnings.
    InputError when the fit fails and --recirculation remove needs it."""
    s = vox.series
    gv_aif = gammafit.fit_gamma_variate(aif_curve[None], tr=s.tr, t_first=vox.t_first_s)
    ok = bool(gv_aif.valid[0])
    aif_used = aif_curve
    if config.recirculation == "remove":
        if not ok:
            raise InputError(f"{s.path}: the gamma-variate fit of the AIF failed; run without --recirculation remove")
        aif_used = gammafit.evaluate(gv_aif, vox.t_frames)[0]
    failed = "the gamma-variate fit of the AIF failed" + (": the gv_cbv map is empty" if config.gamma_maps else "")
    return gv_aif, aif_used, ([] if ok else [failed])


def _aif_gamma_variate(gv_aif, aif_curve: np.ndarray, tissue: tuple[np.ndarray, str], *, tr: float,
                       config: Config) -> AifGammaVariate:
    """report.json "aif" "gamma_variate": the AIF's fit and the share of the fitted brain voxels whose
    own fit succeeded (``tissue``: their fit quality, NaN where the fit failed, and which voxels they
    are: _tissue_fits); NaN (null) when no brain voxel was fitted."""
    quality, fitted = tissue
    gv_ok = np.isfinite(quality)
    return AifGammaVariate(valid=bool(gv_aif.valid[0]), first_pass_area=float(gv_aif.area[0]),
                           trapezoid_area=float(maps.trapezoid(aif_curve, dx=tr)),
                           quality_nrmse=float(gv_aif.quality[0]),
                           tissue_valid_fraction=float(gv_ok.mean()) if gv_ok.size else float("nan"),
                           tissue_fitted=fitted, tissue_fitted_voxels=int(gv_ok.size),
                           default_cbv="trapezoid" if config.recirculation == "keep" else "gamma-variate first pass",
                           why=GV_CBV_CHOICE)


def _fits_every_voxel(config: Config) -> bool:
    """Whether the chunk loop fits the gamma variate to every voxel: for the gv_* maps (--gamma-maps), and
    for --recirculation remove, which deconvolves every voxel's fitted first pass."""
    return config.gamma_maps or config.recirculation == "remove"


def _tissue_fits(config: Config, vox: _Voxels, out: dict[str, np.ndarray],
                 region: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """The fit quality (NaN where the fit failed) of the brain voxels whose gamma variate was fitted, and
    report.json's words for which they are: every brain voxel when the chunk loop fitted them all
    (_fits_every_voxel), else those of the ROIs and the reference that lie in the brain (``region``:
    _region_gamma_variate), none without an ROI."""
    if _fits_every_voxel(config):
        why = "--gamma-maps" if config.gamma_maps else "--recirculation remove"
        return out["gv_quality"][vox.brain_rows], f"every brain voxel ({why})"
    quality = region["gv_quality"][vox.brain_rows]
    fitted = region["fitted"][vox.brain_rows]
    if not fitted.any():
        return quality[fitted], "none (no ROI: nothing reads the fit; --gamma-maps fits every voxel)"
    return quality[fitted], "the ROIs' and the reference's voxels (--gamma-maps fits every voxel)"


# ============================================================================ deconvolution


def prepare_operator(aif_curve: np.ndarray, *, tr: float, config: Config):
    """The deconvolution operator of ``config.method`` for an AIF (1/s, (n_t,)); raises ValueError."""
    if config.method == "model":
        if not np.any(np.asarray(aif_curve) > 0):
            raise ValueError("the AIF has no positive value")
        return modelfit.prepare(aif_curve, tr=tr)
    return deconvolution.prepare(aif_curve, tr=tr, method=config.method, threshold=config.threshold,
                                 oi_target=config.oi_target)


def _operator(inputs: Inputs, config: Config, aif_used: np.ndarray):
    """prepare_operator, or InputError naming the AIF mask (or the series) when the AIF is unusable."""
    s = inputs.series
    try:
        return prepare_operator(aif_used, tr=s.tr, config=config)
    except ValueError as exc:
        raise InputError(f"{_where(inputs.paths.get('aif'), str(s.path))}: unusable AIF ({exc}); "
                         "give arterial voxels with --aif MASK") from None


def quantify(op, curves: np.ndarray, aif_curve: np.ndarray, *, tr: float, config: Config) -> dict[str, np.ndarray]:
    """CBV, CBF, MTT and Tmax of tissue curves (delta R2*, 1/s, (n_vox, n_t)); NaN where no valid flow.
    With the model, also "fit_status" (modelfit.STATUS_*): voxels the model does not fit (a bound, a
    residual far above oSVD's, a failed fit) take oSVD's CBF, MTT = CBV / CBF and Tmax."""
    c = np.asarray(curves, dtype=np.float64)
    v = maps.cbv(c, aif_curve, tr=tr, kh=config.kh, rho=config.rho)
    if config.method == "model":
        fit = modelfit.fit(op, c)
        res = deconvolution.deconvolve(op.fallback, c)
        status = modelfit.fit_status(fit, deconvolution.residual_sse(op.fallback, c, res.residue),
                                     np.einsum("vn,vn->v", c, c))
        svd = status != modelfit.STATUS_MODEL
        f_svd = maps.cbf(res.residue, kh=config.kh, rho=config.rho)
        f = np.where(svd, f_svd, fit.flow * cbf_scale(config.kh, config.rho))
        ok = np.isfinite(f) & (f > 0)
        # the gamma-distribution residue is 1 until the delay: Tmax = delay (modelfit.fit: with the
        # delay prior where the least-squares delay lies in its early tail)
        mtt_s = np.where(svd, maps.mtt(v, f_svd), fit.mtt)
        tmax_s = np.where(svd, maps.tmax(res.residue, tr=tr, n_t=c.shape[1]), fit.tmax)
        extra = {"fit_status": status.astype(np.float32)}
    else:
        res = deconvolution.deconvolve(op, c)
        f = maps.cbf(res.residue, kh=config.kh, rho=config.rho)
        ok = np.isfinite(f) & (f > 0)
        mtt_s, tmax_s = maps.mtt(v, f), maps.tmax(res.residue, tr=tr, n_t=c.shape[1])
        extra = {}
    return {"cbv": v, "cbf": np.where(ok, f, np.nan), "mtt": np.where(ok, mtt_s, np.nan),
            "tmax": np.where(ok, tmax_s, np.nan), **extra}


# ============================================================================ leakage


def leakage_key(method: str, gate: str) -> str:
    """The sensitivity key (roi.SENSITIVITY_METHODS, or ``<method>_gated``) of what the analysis did in
    the lesion ROIs: with the "lesion" or no gate they are corrected without a gate."""
    if method == "none" or gate != "voxel":
        return method
    return f"{method}_gated"


def correct_leakage(c: np.ndarray, *, method: str, gate: str, in_lesion: np.ndarray | None, tr: float,
                    reference, aif, baseline: slice, bsw_reference=None) -> leakage.LeakageFit:
    """``method``'s leakage correction of delta R2* rows (1/s, (n, n_t)), applied where the --leakage-gate
    ``gate`` says (config.LEAKAGE_GATES): the rows in lesion ROIs (``in_lesion``, bool (n,)) with "lesion",
    and with "lesion" or "voxel" the rows whose BSW K2 is significant (leakage.bsw_significant, against
    ``bsw_reference``, BSW's reference curve): the one test that does not read a delayed or dispersed
    curve as leakage, whichever method corrects."""
    fit = leakage.correct_leakage(c, tr=tr, method=method, reference=reference, aif=aif, baseline=baseline,
                                  gate_k=None)
    if gate == "none":
        return fit
    if method == "bsw" or bsw_reference is None:  # BSW's own test, or the method's when no BSW reference exists
        with np.errstate(invalid="ignore"):
            rows = np.abs(fit.k2) > leakage.GATE_K * fit.k2_se
    else:
        rows = leakage.bsw_significant(c, bsw_reference, tr=tr, baseline=baseline)
    if gate == "lesion" and in_lesion is not None:
        rows = rows | in_lesion
    return leakage.restrict(fit, rows)


@dataclass(frozen=True)
class _LeakagePlan:
    """What the leakage correction of the maps needs, fixed before the chunk loop."""

    method: str  # the correction applied: config.leakage, or "bsw" when the residue method cannot run
    gate: str  # config.leakage_gate
    reference: np.ndarray | None  # the method's reference curve (BSW, bidirectional), 1/s (n_t,)
    bsw_reference: np.ndarray | None  # BSW's reference curve: the gate's test and the lesions' sensitivity
    reference_voxels: int | None  # voxels averaged into ``reference``
    in_lesion: np.ndarray  # bool (n_vox,): the row lies in a lesion ROI
    non_enhancing: np.ndarray  # bool (n_brain,): BSW's non-enhancing brain rows
    baseline_cv: np.ndarray  # (n_brain,): coefficient of variation of each brain row's baseline signal

    def correct(self, c: np.ndarray, *, in_lesion, tr: float, aif: np.ndarray, baseline: slice):
        """correct_leakage of rows ``c`` (delta R2*, 1/s) with this plan's method, gate and references."""
        return correct_leakage(c, method=self.method, gate=self.gate, in_lesion=in_lesion, tr=tr,
                               reference=self.reference, aif=aif, baseline=baseline, bsw_reference=self.bsw_reference)


def _leakage_plan(inputs: Inputs, config: Config, vox: _Voxels, aif_curve: np.ndarray):
    """The leakage stage before the maps: the method (the residue-domain method needs a tail after the
    first pass: probed once, else BSW), the brain rows' signal statistics, the reference curves and
    the lesion rows; and warnings."""
    s = vox.series
    notes = []
    method = config.leakage
    if method == "residue":
        try:  # the residue-domain method needs a tail after the first pass; probe once
            leakage.correct_leakage(vox.dr2s[:1].astype(np.float64), tr=s.tr, method="residue", aif=aif_curve,
                                    baseline=vox.bl)
        except ValueError as exc:
            method = "bsw"
            notes.append(f"residue-domain leakage correction impossible ({exc}); fell back to BSW")
    ne, cv = _brain_signal_stats(vox, chunk=config.chunk_voxels)
    ref, n_ref = _leakage_reference(method, vox, non_enhancing=ne)
    # BSW's reference curve: the leakage gate's test (correct_leakage) and the lesions' leakage sensitivity
    bsw_ref = ref if method in ("bsw", "bidirectional") else None
    if bsw_ref is None and (method != "none" or inputs.rois):
        try:
            bsw_ref, _ = _leakage_reference("bsw", vox, non_enhancing=ne)
        except InputError:
            notes.append("no non-enhancing brain voxel for a BSW reference curve: the leakage gate uses the "
                         "correction's own test, and the leakage sensitivity has no bsw, bsw_gated or bidirectional "
                         "entry")
    in_lesion = _any_roi(inputs.rois, vox.shape).ravel()[vox.idx]
    return _LeakagePlan(method=method, gate=config.leakage_gate, reference=ref, bsw_reference=bsw_ref,
                        reference_voxels=n_ref, in_lesion=in_lesion, non_enhancing=ne, baseline_cv=cv), notes


def _brain_signal_stats(vox: _Voxels, *, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the brain voxels' signal: BSW's non-enhancing flag (late signal within 1 baseline
    SD) and the baseline coefficient of variation, each (n_brain,), in the order of the brain rows."""
    rows = np.flatnonzero(vox.brain_rows)
    ne = np.zeros(rows.size, bool)
    cv = np.full(rows.size, np.inf)
    bl = vox.bl
    for lo in range(0, rows.size, chunk):
        sl = slice(lo, min(lo + chunk, rows.size))
        sig = vox.flat[vox.idx[rows[sl]], vox.keep].astype(np.float64)
        ne[sl] = leakage.non_enhancing_mask(sig, baseline=bl)
        with np.errstate(divide="ignore", invalid="ignore"):
            cv[sl] = np.std(sig[:, bl], axis=1, ddof=1) / np.mean(sig[:, bl], axis=1)
    return ne, cv


def _leakage_reference(method: str, vox: _Voxels, *, non_enhancing: np.ndarray):
    """BSW's whole-brain non-enhancing reference curve (1/s) and its number of voxels; (None, None) for
    no correction or the residue-domain method, which needs no reference. InputError naming the
    series when no non-enhancing brain voxel has a finite curve."""
    path = vox.series.path
    if method in ("none", "residue"):
        return None, None
    if not non_enhancing.any():
        raise InputError(f"{path}: no non-enhancing brain voxel for the leakage reference; run with --leakage none")
    rows = np.flatnonzero(vox.brain_rows)[non_enhancing]
    # leakage.reference_curve (the mean of the finite rows), chunked: no float64 copy of every row
    total, count = np.zeros(vox.dr2s.shape[1]), 0
    for lo in range(0, rows.size, REFERENCE_CHUNK):
        part = vox.dr2s[rows[lo: lo + REFERENCE_CHUNK]].astype(np.float64)
        part = part[np.all(np.isfinite(part), axis=1)]
        total += part.sum(axis=0)
        count += part.shape[0]
    if count == 0:
        raise InputError(f"{path}: no non-enhancing brain voxel with a finite curve for the leakage reference; "
                         "run with --leakage none")
    return total / count, int(non_enhancing.sum())


def _leakage_entry(plan: _LeakagePlan, *, n_applied: int, r2_values: list[np.ndarray], n_vox: int) -> Leakage:
    """report.json "leakage": the method, its reference, the gate and, with a correction, how many
    voxels it corrected and the median R^2 of its fits (``r2_values``: the valid fits' R^2, by chunk)."""
    if plan.method == "none":
        return Leakage(method="none", reference_voxels=plan.reference_voxels, gate=plan.gate)
    r2_all = np.concatenate(r2_values) if r2_values else np.array([])
    return Leakage(method=plan.method, reference_voxels=plan.reference_voxels, gate=plan.gate, n_corrected=n_applied,
                   fraction_corrected=n_applied / max(n_vox, 1),
                   fit_r2_median=float(np.median(r2_all)) if r2_all.size else float("nan"))


# ============================================================================ maps


def _chunk_maps(vox: _Voxels, config: Config, op, plan: _LeakagePlan, *, aif_curve, aif_used, gv_aif,
                stages: Stages) -> tuple[dict[str, np.ndarray], np.ndarray, Leakage]:
    """Every map's values per row (float32 (n_vox,), NaN where not computed), ``config.chunk_voxels``
    rows at a time: leakage correction, gamma-variate fit (GV_MAPS, only where every voxel's fit is
    needed: _fits_every_voxel), deconvolution (``quantify``). Returns them, the model's fit status per
    row and report.json's "leakage". ``aif_curve``: the AIF (1/s) the leakage correction and CBV
    uncorrected use; ``aif_used``: the one deconvolved (1/s)."""
    s = vox.series
    n_vox = vox.n_vox
    fit_gamma = _fits_every_voxel(config)
    leakage_maps = ("k2", "cbv_uncorrected") if config.leakage != "none" else ()
    names = ("cbv", "cbf", "mtt", "ttp", "tmax", *(GV_MAPS if fit_gamma else ()), *leakage_maps)
    out = {k: np.full(n_vox, np.nan, np.float32) for k in names}
    fit_status = np.full(n_vox, np.nan, np.float32)  # modelfit.STATUS_* (model only)
    n_applied, r2_values = 0, []
    for lo in range(0, n_vox, config.chunk_voxels):
        sl = slice(lo, min(lo + config.chunk_voxels, n_vox))
        c = vox.dr2s[sl].astype(np.float64)
        if plan.method != "none":
            out["cbv_uncorrected"][sl] = maps.cbv(c, aif_curve, tr=s.tr, kh=config.kh, rho=config.rho)
            c, fit = _corrected(c, plan, plan.in_lesion[sl], vox=vox, aif_curve=aif_curve)
            out["k2"][sl] = np.where(fit.valid, fit.k2, np.nan)
            n_applied += int(fit.applied.sum())
            r2_values.append(fit.r2[fit.valid])
        stages.lap("leakage")
        c_used = c
        if fit_gamma:
            gv = gammafit.fit_gamma_variate(c, tr=s.tr, t_first=vox.t_first_s)
            c_used = gammafit.evaluate(gv, vox.t_frames) if config.recirculation == "remove" else c
            _put_gamma_maps(out, sl, gv, gv_aif, config)
        stages.lap("gamma_variate")
        for key, values in quantify(op, c_used, aif_used, tr=s.tr, config=config).items():
            (fit_status if key == "fit_status" else out[key])[sl] = values
        stages.lap("deconvolution")
        out["ttp"][sl] = maps.ttp(c, tr=s.tr) + vox.t_first_s
    return out, fit_status, _leakage_entry(plan, n_applied=n_applied, r2_values=r2_values, n_vox=n_vox)


def _corrected(c: np.ndarray, plan: _LeakagePlan, in_lesion: np.ndarray, *, vox: _Voxels, aif_curve: np.ndarray):
    """Rows ``c`` (delta R2*, 1/s, float64 (n, n_t)) corrected for leakage by the plan (``in_lesion``:
    bool (n,), the rows in lesion ROIs), each left as measured where the correction was not valid or
    not applied; and the leakage.LeakageFit."""
    fit = plan.correct(c, in_lesion=in_lesion, tr=vox.series.tr, aif=aif_curve, baseline=vox.bl)
    return np.where(fit.valid[:, None], fit.corrected, c), fit


def _put_gamma_maps(out: dict[str, np.ndarray], sl, gv, gv_aif, config: Config) -> None:
    """The GV_MAPS values of the rows ``sl`` from their gammafit.GammaFit ``gv``; gv_cbv (mL/100 g) only
    when the AIF's own fit ``gv_aif`` is valid (it is the ratio of the two first-pass areas)."""
    if bool(gv_aif.valid[0]):
        out["gv_cbv"][sl] = cbv_scale(config.kh, config.rho) * gv.area / gv_aif.area[0]
    out["gv_peak"][sl] = gv.peak
    out["gv_ttp"][sl] = gv.ttp
    out["gv_fwhm"][sl] = gv.fwhm
    out["gv_quality"][sl] = gv.quality


def _any_roi(rois: dict[str, np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    """The union of the ROI masks (bool x y z)."""
    union = np.zeros(shape, bool)
    for m in rois.values():
        union |= m
    return union


def _region_gamma_variate(vox: _Voxels, config: Config, plan: _LeakagePlan, rows: np.ndarray, *,
                          aif_curve: np.ndarray) -> dict[str, np.ndarray]:
    """The gamma-variate fit of ``rows`` (the ROIs' and the reference's), ``config.chunk_voxels`` at a
    time, of their curves corrected for leakage as the chunk loop corrects them: "gv_peak" (1/s) and
    "gv_quality" per row (float32 (n_vox,), NaN outside ``rows`` and where the fit failed) and "fitted"
    (bool (n_vox,)). Run the same way with and without --gamma-maps, so that the ROI scores do not depend
    on it: the leakage correction's products may round a row's last bit differently among other rows
    (measured with the bidirectional model: 1e-16), and the chunk loop groups the rows differently."""
    s = vox.series
    out = {k: np.full(vox.n_vox, np.nan, np.float32) for k in ("gv_peak", "gv_quality")}
    fitted = np.zeros(vox.n_vox, bool)
    for lo in range(0, rows.size, config.chunk_voxels):
        part = rows[lo: lo + config.chunk_voxels]
        c = vox.dr2s[part].astype(np.float64)
        if plan.method != "none":
            c, _ = _corrected(c, plan, plan.in_lesion[part], vox=vox, aif_curve=aif_curve)
        gv = gammafit.fit_gamma_variate(c, tr=s.tr, t_first=vox.t_first_s)
        out["gv_peak"][part] = gv.peak
        out["gv_quality"][part] = gv.quality
        fitted[part] = True
    return {**out, "fitted": fitted}


def _fit_info(method: str, status: np.ndarray, out: dict, brain_rows: np.ndarray) -> dict:
    """report.json "fit": brain voxels whose CBV, CBF or MTT is not finite, and with the model, those it
    did not fit (modelfit.STATUS_*: at a bound, residual, failed), whose values are oSVD's. Unusable:
    either (a value at a fit bound is where the optimiser stopped, not an estimate)."""
    n = int(brain_rows.sum())
    bad = np.zeros(n, bool)
    for k in ("cbv", "cbf", "mtt"):
        bad |= ~np.isfinite(out[k][brain_rows])
    info = {"method": method, "brain_voxels": n, "non_finite": int(bad.sum())}
    if method == "model":
        counts = {name: int(np.count_nonzero(status == code)) for code, name in
                  ((modelfit.STATUS_BOUND, "model_at_bound"), (modelfit.STATUS_RESIDUAL, "model_residual_high"),
                   (modelfit.STATUS_INVALID, "model_failed"))}
        info.update(counts)
        info["fallback_osvd"] = sum(counts.values())
        info["fallback_rule"] = (f"oSVD's CBF, MTT and Tmax where the model fit sits on a bound (MTT "
                                 f"{modelfit.MTT_BOUNDS_S[0]:g}-{modelfit.MTT_BOUNDS_S[1]:g} s, delay "
                                 f"{modelfit.DELAY_BOUNDS_S[0]:g}..{modelfit.DELAY_BOUNDS_S[1]:g} s), its residual "
                                 f"exceeds {modelfit.FALLBACK_SSE_RATIO:g} x oSVD's, or it failed")
        bad |= status != modelfit.STATUS_MODEL
    info["unusable"] = int(bad.sum())
    info["unusable_fraction"] = float(bad.sum() / n) if n else float("nan")
    return info


# ============================================================================ reference tissue


def _vessels(inputs: Inputs, vox: _Voxels, aif_mask: np.ndarray, vof_rows: np.ndarray | None) -> np.ndarray:
    """Arterial and venous voxels (bool x y z): the AIF's, the --vof mask's and the automatic VOF's
    when it scaled the AIF."""
    vessels = aif_mask.copy()
    if inputs.vof is not None:
        vessels |= inputs.vof
    if vof_rows is not None:
        vessels.ravel()[vox.idx[vof_rows]] = True
    return vessels


def _steady_non_enhancing(plan: _LeakagePlan, vox: _Voxels) -> np.ndarray:
    """Brain voxels (bool x y z) that are non-enhancing and have a stable baseline (CV below the
    STABLE_BASELINE_PERCENTILE of the brain's), from the plan's brain-row statistics."""
    ne, cv = plan.non_enhancing, plan.baseline_cv
    rows = np.flatnonzero(vox.brain_rows)
    finite = np.isfinite(cv)
    stable = finite & (cv <= np.percentile(cv[finite], STABLE_BASELINE_PERCENTILE)) if finite.any() else finite
    out = np.zeros(vox.shape, bool)
    out.ravel()[vox.idx[rows[ne & stable]]] = True
    return out


def _reference_tissue(inputs: Inputs, vox: _Voxels, cbv: np.ndarray, aif_mask: np.ndarray, plan: _LeakagePlan,
                      vessels: np.ndarray) -> tuple[Reference, np.ndarray, list[str]]:
    """reference.select_reference with this case's masks: the --reference mask or the automatic choice
    among non-enhancing voxels with a stable baseline, away from the arterial and venous voxels.
    ``cbv``: the CBV map (mL/100 g)."""
    s = inputs.series
    exclude = aif_mask.copy()
    if inputs.vof is not None:
        exclude |= inputs.vof
    return reference_mod.select_reference(
        cbv, vox.brain, affine=s.affine, given=inputs.reference, given_source=str(inputs.paths.get("reference")),
        rois=inputs.rois, exclude=exclude, eligible=_steady_non_enhancing(plan, vox), vessels=vessels,
        where=_where(inputs.paths.get("reference"), str(s.path)))


# ============================================================================ ROIs


def _leakage_sensitivity(curves: np.ndarray, *, tr: float, aif_curve, aif_used, bsw_ref, bl, config: Config,
                         t_frames, t_first: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """CBV (mL/100 g) and leakage-fit R^2 of ``curves`` (delta R2*, 1/s, (n, n_t)) under every correction of
    roi.SENSITIVITY_METHODS, each computed as the chunk loop computes the maps; NaN where a correction
    is impossible (no BSW reference curve, a series too short for the residue method)."""
    cbv, r2 = {}, {}
    nan = np.full(curves.shape[0], np.nan)
    for key in roi.SENSITIVITY_METHODS:
        c = curves
        r2[key] = nan
        if key != "none":
            method, gate_k = SENSITIVITY_CORRECTIONS[key]
            if method != "residue" and bsw_ref is None:
                cbv[key] = nan
                continue
            try:
                fit = leakage.correct_leakage(curves, tr=tr, method=method, reference=bsw_ref, aif=aif_curve,
                                              baseline=bl, gate_k=gate_k)
            except ValueError:
                cbv[key] = nan
                continue
            c = np.where(fit.valid[:, None], fit.corrected, curves)
            r2[key] = np.where(fit.valid, fit.r2, np.nan)
        if config.recirculation == "remove":
            c = gammafit.evaluate(gammafit.fit_gamma_variate(c, tr=tr, t_first=t_first), t_frames)
        cbv[key] = maps.cbv(c, aif_used, tr=tr, kh=config.kh, rho=config.rho)
    return cbv, r2


@dataclass(frozen=True)
class _Sensitivity:
    """The lesions' leakage sensitivity: CBV (mL/100 g) and fit R^2 under every correction
    (roi.SENSITIVITY_METHODS) of the sensitivity rows (the reference's ``n_ref`` first, then each ROI's),
    the reference's median CBV per correction, the corrections pooled into the interval and their
    bootstrap reference medians."""

    key: str  # leakage_key: what the analysis did in the lesions
    cbv: dict[str, np.ndarray]
    r2: dict[str, np.ndarray]
    n_ref: int
    ref_median: dict[str, float]
    pooled: list[str]
    ref_boot: dict[str, np.ndarray]


def _score_rois(inputs: Inputs, config: Config, vox: _Voxels, volumes: dict[str, np.ndarray], *, plan: _LeakagePlan,
                ref: Reference, ref_mask: np.ndarray, aif_curve, aif_used, aif_quality: float, vessels: np.ndarray,
                gv_peak: np.ndarray):
    """The ROI stage: the leakage sensitivity and the bootstrap interval on the ROI and reference rows
    only, then each ROI's score and verdict (roi.decide). ``gv_peak``: the fitted gamma variate's peak
    (1/s, x y z) in the ROIs and the reference (_region_gamma_variate), for the relative peak height.
    Returns (the scores, the reference entry with its medians by correction, the rCBV map: divided by
    the reference corrected alike when it is)."""
    s = vox.series
    key = leakage_key(plan.method, config.leakage_gate)
    roi_rows = {name: vox.rows_of(m) for name, m in inputs.rois.items()}
    ref_rows = vox.rows_of(ref_mask)
    sens_rows = np.concatenate([ref_rows, *roi_rows.values()])
    sens_cbv, sens_r2 = _leakage_sensitivity(vox.dr2s[sens_rows].astype(np.float64), tr=s.tr, aif_curve=aif_curve,
                                             aif_used=aif_used, bsw_ref=plan.bsw_reference, bl=vox.bl, config=config,
                                             t_frames=vox.t_frames, t_first=vox.t_first_s)
    # the correction the maps used: the lesions' values from the maps themselves (identical computation);
    # the reference's from the maps too, unless it is corrected alike (REFERENCE_CORRECTED_ALIKE)
    map_cbv = np.asarray(volumes["cbv"].ravel()[vox.idx[sens_rows]], dtype=np.float64)
    sens_cbv, ref, rcbv, ref_med = _reference_under_leakage(sens_cbv, map_cbv, n_ref=ref_rows.size, key=key,
                                                            config=config, ref=ref, cbv=volumes["cbv"],
                                                            rcbv=volumes["rcbv"])
    pooled = [k for k in dict.fromkeys((key, *config.leakage_plausible)) if np.isfinite(ref_med[k])]
    ref_boot = {k: roi.resample_reference(sens_cbv[k][:ref_rows.size]) for k in pooled}
    ref, ref_boot, reference_note = _automatic_reference_spread(ref, ref_boot, volumes["cbv"], ref_mask, s.affine)
    ref = replace(ref, cbv_median_by_leakage=ref_med)
    sens = _Sensitivity(key=key, cbv=sens_cbv, r2=sens_r2, n_ref=ref_rows.size, ref_median=ref_med, pooled=pooled,
                        ref_boot=ref_boot)
    volumes = {**volumes, "rcbv": rcbv, "gv_peak": gv_peak}
    gv_ref = gv_peak[ref_mask]
    ref_peak = float(np.nanmedian(gv_ref)) if np.isfinite(gv_ref).any() else np.nan
    scores, start = [], ref_rows.size
    for name, m in inputs.rois.items():
        sl = slice(start, start + roi_rows[name].size)
        start = sl.stop
        leak = _roi_leakage(sens, sl, roi_rows[name], config=config, vox=vox, plan=plan, aif_curve=aif_curve)
        scores.append(_score_roi(name, m, volumes, inputs, config, brain=vox.brain, keep=vox.keep, bl=vox.bl,
                                 ref_peak=ref_peak, aif_quality=aif_quality, vessels=vessels, leak_key=key,
                                 reference_note=reference_note, reference_problem=ref.problem, **leak))
    return scores, ref, rcbv


def _reference_under_leakage(sens_cbv: dict, map_cbv: np.ndarray, *, n_ref: int, key: str, config: Config,
                             ref: Reference, cbv: np.ndarray, rcbv: np.ndarray):
    """The sensitivity's entry ``key`` (the correction the maps used) set from the maps' CBV
    (``map_cbv``, the sensitivity rows), its reference rows kept as computed when the reference is
    corrected alike (REFERENCE_CORRECTED_ALIKE with the "lesion" gate); the reference's median CBV
    (mL/100 g; NaN unless positive) per correction; and when corrected alike, the reference entry and
    the rCBV map (``cbv`` divided by that median) that follow. Returns (sensitivity CBV, reference,
    rCBV map, medians)."""
    alike = REFERENCE_CORRECTED_ALIKE and key in sens_cbv and config.leakage_gate == "lesion"
    sens_cbv = {**sens_cbv, key: np.concatenate([sens_cbv[key][:n_ref], map_cbv[n_ref:]]) if alike else map_cbv}
    ref_med = {}
    for k, v in sens_cbv.items():
        med = float(np.nanmedian(v[:n_ref])) if np.isfinite(v[:n_ref]).any() else float("nan")
        ref_med[k] = med if med > 0 else float("nan")
    if alike and np.isfinite(ref_med[key]):
        ref = replace(ref, cbv_median_map=ref.cbv_median, cbv_median=ref_med[key], corrected_alike=key)
        rcbv = (cbv / ref_med[key]).astype(np.float32)
    return sens_cbv, ref, rcbv, ref_med


def _automatic_reference_spread(ref: Reference, ref_boot: dict, cbv: np.ndarray, ref_mask: np.ndarray, affine):
    """For an automatic reference, the confidence reflects where it could have been taken: the spread
    between its two halves (roi.reference_spread) widens the bootstrap medians, and the lesions' note
    says so. Returns (reference entry, bootstrap medians, note)."""
    if not ref.automatic:
        return ref, ref_boot, ""
    spread = roi.reference_spread(cbv, ref_mask, np.linalg.norm(affine[:3, :3], axis=0))
    note = (f"the reference tissue was chosen automatically "
            f"({ref.side} hemisphere{'s' if ref.side == 'both' else ''}); "
            f"its two halves differ by +/-{spread:.0%}, included in the interval; give --reference with a "
            "normal-appearing white-matter mask to replace it")
    return (replace(ref, regional_spread=spread), {k: roi.widen_reference(v, spread) for k, v in ref_boot.items()},
            note)


def _roi_leakage(sens: _Sensitivity, sl: slice, rows: np.ndarray, *, config: Config, vox: _Voxels,
                 plan: _LeakagePlan, aif_curve: np.ndarray) -> dict:
    """One ROI's leakage figures for _score_roi: its median rCBV under each correction, the bootstrap
    rCBV interval pooled over the plausible corrections, the median fit R^2 of the analysis's own
    correction and the R^2 of the model fitted to the ROI's mean curve (ungated: only its R^2 is used).
    ``sl``: the ROI's sensitivity rows; ``rows``: its analysed rows."""
    s = vox.series
    by_leakage = {}
    for k in roi.SENSITIVITY_METHODS:
        v = sens.cbv[k][sl]
        by_leakage[k] = {"rcbv_median": float(np.nanmedian(v)) / sens.ref_median[k]
                         if np.isfinite(v).any() and np.isfinite(sens.ref_median[k]) else float("nan")}
    interval = roi.rcbv_interval({k: sens.cbv[k][sl] for k in sens.pooled}, sens.ref_boot, low=config.rcbv_low,
                                 high=config.rcbv_high) if sens.pooled else None
    # the fit R^2 of the analysis's own correction; a per-voxel gate (``<method>_gated``) only decides where
    # the method's fit is applied, so its R^2 is the method's
    r2 = sens.r2[sens.key if sens.key in sens.r2 else plan.method][sl]
    fit_r2 = float(np.nanmedian(r2)) if np.isfinite(r2).any() else float("nan")
    fit_r2_curve = float("nan")
    if plan.method != "none":
        mean_curve = np.nanmean(vox.dr2s[rows].astype(np.float64), axis=0)[None]
        if np.all(np.isfinite(mean_curve)):
            try:
                fit_r2_curve = float(leakage.correct_leakage(
                    mean_curve, tr=s.tr, method=plan.method, reference=plan.reference,
                    aif=aif_curve, baseline=vox.bl, gate_k=None).r2[0])
            except ValueError:
                pass
    return {"interval": interval, "by_leakage": by_leakage, "fit_r2_median": fit_r2, "fit_r2_curve": fit_r2_curve}


def _score_roi(name, m, volumes, inputs, config, *, brain, keep, bl, ref_peak, aif_quality, vessels, interval,
               by_leakage, fit_r2_median, fit_r2_curve, leak_key, reference_note="", reference_problem=""):
    """One ROI's score with signal recovery, relative peak height and the verdict's context."""
    s = inputs.series
    mean_signal = s.data[m][:, keep].mean(axis=0, dtype=np.float64)
    peaks = volumes["gv_peak"][m]
    rph = float(np.nanmedian(peaks) / ref_peak) if np.isfinite(peaks).any() and ref_peak > 0 else float("nan")
    k2 = volumes.get("k2")
    k2_med = float(np.nanmedian(k2[m])) if k2 is not None and np.isfinite(k2[m]).any() else float("nan")
    change = float("nan")
    if "cbv_uncorrected" in volumes and np.isfinite(volumes["cbv_uncorrected"][m]).any():
        corr = float(np.nanmedian(volumes["cbv"][m]))
        change = (corr - float(np.nanmedian(volumes["cbv_uncorrected"][m]))) / abs(corr) if corr else float("nan")
    ctx = roi.Context(leakage=leak_key, fit_r2_median=fit_r2_median, fit_r2_curve=fit_r2_curve,
                      k2_median_per_s=k2_med, aif_quality=aif_quality, outside_brain=int((m & ~brain).sum()),
                      on_vessel=int((m & vessels).sum()), weeks_since_radiation=config.weeks_since_radiation,
                      bevacizumab=config.bevacizumab, steroids=config.steroids, leakage_cbv_change=change,
                      reference_note=reference_note, reference_problem=reference_problem)
    score = roi.decide(name, volumes["rcbv"][m], voxel_volume_ml=s.voxel_volume_ml, n_voxels=int(m.sum()),
                       interval=interval, by_leakage=by_leakage, context=ctx, low=config.rcbv_low,
                       high=config.rcbv_high, mixed_fraction=config.mixed_fraction)
    return replace(score, psr_percent=roi.percentage_signal_recovery(mean_signal, baseline=bl),
                   relative_peak_height=rph)


def _ftb(rois: dict[str, np.ndarray], rcbv: np.ndarray, config: Config) -> np.ndarray:
    """Fractional tumour burden classes (uint8 x y z) inside the ROIs: 1 rCBV below rcbv_low, 2 between,
    3 above rcbv_high, 0 outside."""
    ftb = np.zeros(rcbv.shape, np.uint8)
    for m in rois.values():
        ftb[m & (rcbv < config.rcbv_low)] = 1
        ftb[m & (rcbv >= config.rcbv_low) & (rcbv <= config.rcbv_high)] = 2
        ftb[m & (rcbv > config.rcbv_high)] = 3
    return ftb


def _mean_curves(inputs: Inputs, vox: _Voxels, plan: _LeakagePlan, ref_mask: np.ndarray,
                 aif_curve: np.ndarray) -> dict[str, np.ndarray]:
    """Mean delta R2* (1/s) of the reference and of each ROI (keys "reference", "roi:<name>"), before
    ("<key>_uncorrected") and after the leakage correction, for the report."""
    curves = {}
    regions = {"reference": ref_mask, **{f"roi:{n}": m for n, m in inputs.rois.items()}}
    for label, m in regions.items():
        rows = vox.rows_of(m)
        if rows.size == 0:
            continue
        raw = vox.dr2s[rows].astype(np.float64)
        curves[f"{label}_uncorrected"] = np.nanmean(raw, axis=0)
        if plan.method != "none":
            fit = plan.correct(raw, in_lesion=np.full(rows.size, label.startswith("roi:")), tr=vox.series.tr,
                               aif=aif_curve, baseline=vox.bl)
            raw = np.where(fit.valid[:, None], fit.corrected, raw)
        curves[label] = np.nanmean(raw, axis=0)
    return curves
