"""analyze(inputs, config) -> Result: a short composition of the stages, and writing its outputs.

Inside, masked voxels are rows of an (n_vox, n_t) array processed in chunks that bound memory,
and scattered back to (x, y, z) maps at the end. A voxel that cannot be fitted is NaN, never 0.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import aif as aif_mod
from . import deconvolution, maps, modelfit, roi, signal
from .errors import InputError, UsageError
from .io import Series
from .units import KH, RHO_BRAIN_G_PER_ML, cbf_scale

LEAKAGE_METHODS = ("none",)

#: Every --method: the SVD family and Tikhonov (deconvolution.py) and the model fit (modelfit.py).
METHODS = (*deconvolution.METHODS, "model")

MAP_UNITS = {
    "cbv": ("mL/100 g", "Cerebral blood volume: kH/rho * area(tissue delta R2*) / area(AIF) * 100"),
    "cbf": ("mL/100 g/min", "Cerebral blood flow: kH/rho * max of the deconvolved residue F*R(t) * 6000"),
    "mtt": ("s", "Mean transit time: CBV / CBF (central volume theorem)"),
    "ttp": ("s", "Time to peak of delta R2*(t), from the first frame"),
    "tmax": ("s", "Time of the maximum of the deconvolved residue F*R(t)"),
    "rcbv": ("ratio", "Relative CBV: CBV / median CBV of the reference tissue"),
}


@dataclass(frozen=True)
class Config:
    """Analysis options. Units: s for times; kh and rho dimensionless and g/mL."""

    method: str = "osvd"
    threshold: float | None = None  # fixed relative SVD threshold P (ssvd, csvd)
    oi_target: float | None = None  # oSVD oscillation-index target
    leakage: str = "none"
    aif_voxels: int = aif_mod.DEFAULT_N_VOXELS
    rcbv_low: float = roi.RCBV_LOW
    rcbv_high: float = roi.RCBV_HIGH
    kh: float = KH
    rho: float = RHO_BRAIN_G_PER_ML
    chunk_voxels: int = 65536

    def validate(self) -> "Config":
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.leakage not in LEAKAGE_METHODS:
            raise UsageError(f"--leakage {self.leakage}: choose one of {', '.join(LEAKAGE_METHODS)}")
        if not 0 < self.rcbv_low < self.rcbv_high:
            raise UsageError(f"rCBV thresholds must satisfy 0 < low < high, got {self.rcbv_low} and {self.rcbv_high}")
        if self.aif_voxels < 1:
            raise UsageError("--aif-voxels must be at least 1")
        return self

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        op_defaults = {"ssvd": deconvolution.DEFAULT_THRESHOLD["ssvd"], "csvd": deconvolution.DEFAULT_THRESHOLD["csvd"]}
        if self.method in op_defaults and self.threshold is None:
            d["threshold"] = op_defaults[self.method]
        if self.method == "osvd" and self.oi_target is None:
            d["oi_target"] = deconvolution.DEFAULT_OI_TARGET
        if self.method != "osvd":
            d.pop("oi_target")
        else:
            d.pop("threshold")
        return d


@dataclass(frozen=True)
class Inputs:
    """A loaded case: the series, optional masks (bool x y z) and the paths they came from."""

    series: Series
    brain: np.ndarray | None = None
    aif: np.ndarray | None = None
    reference: np.ndarray | None = None
    rois: dict[str, np.ndarray] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """Maps (float32, x y z, NaN where not computed) and everything the report needs."""

    maps: dict[str, np.ndarray]
    brain: np.ndarray
    aif_mask: np.ndarray
    reference_mask: np.ndarray
    aif_curve: np.ndarray  # 1/s, (n_t,)
    time_s: np.ndarray
    baseline: signal.Baseline
    aif_info: dict
    reference_info: dict
    rois: list[roi.RoiScore]
    warnings: list[str]
    config: Config
    seconds: float


def _where(path: Path | None, what: str) -> str:
    return str(path) if path else what


def analyze(inputs: Inputs, config: Config = Config()) -> Result:
    """Run the whole analysis on a loaded case."""
    t_start = time.perf_counter()
    config = config.validate()
    s = inputs.series
    notes: list[str] = []
    shape = s.shape3d

    # -- brain mask
    if inputs.brain is not None:
        brain = inputs.brain
        brain_source = str(inputs.paths.get("brain"))
    else:
        brain = signal.auto_brain_mask(s.data.mean(axis=3))
        brain_source = "automatic (Otsu threshold of the mean image, largest component)"
        if brain.sum() < 10:
            raise InputError(f"{s.path}: the automatic brain mask is empty; give a mask with --mask")
    analysis = brain.copy()
    for extra in [inputs.aif, inputs.reference, *inputs.rois.values()]:
        if extra is not None:
            analysis |= extra
    idx = np.flatnonzero(analysis.ravel())
    flat = s.data.reshape(-1, s.n_frames)
    brain_rows = brain.ravel()[idx]

    # -- baseline and delta R2*
    mean_curve = flat[idx[brain_rows]].mean(axis=0, dtype=np.float64)
    try:
        base = signal.find_baseline(mean_curve, tr=s.tr)
    except signal.BaselineError as exc:
        raise InputError(f"{s.path}: {exc}; check that this is a DSC series with a contrast bolus") from None
    # frames before the steady state (base.start) are dropped from the whole analysis
    n_vox = idx.size
    keep = slice(base.start, s.n_frames)
    n_t = s.n_frames - base.start
    bl = slice(0, base.stop - base.start)
    dr2s = np.empty((n_vox, n_t), np.float32)
    ratio_min = np.empty(n_vox)
    ratio_sd = np.empty(n_vox)
    for lo in range(0, n_vox, config.chunk_voxels):
        sl = slice(lo, min(lo + config.chunk_voxels, n_vox))
        sig = flat[idx[sl], keep]
        d, s0 = signal.to_delta_r2s(sig, te=s.te, baseline=bl)
        dr2s[sl] = d
        with np.errstate(invalid="ignore", divide="ignore"):
            r = sig / s0[:, None]
            ratio_min[sl] = np.min(r, axis=1)
            ratio_sd[sl] = np.std(r[:, bl], axis=1, ddof=1)
    tissue_peak_frame = int(np.argmax(np.nanmean(dr2s[brain_rows], axis=0)))

    # -- AIF
    if inputs.aif is not None:
        aif_rows = np.flatnonzero(inputs.aif.ravel()[idx])
        aif_source = str(inputs.paths.get("aif"))
        steps = {}
        bad = ~np.all(np.isfinite(dr2s[aif_rows]), axis=1)
        if bad.all():
            raise InputError(f"{inputs.paths.get('aif')}: no voxel of the AIF mask has a usable signal; check the mask")
    else:
        feats = aif_mod.curve_features(dr2s[brain_rows], ratio_min[brain_rows], ratio_sd[brain_rows],
                                       baseline=bl, tr=s.tr)
        try:
            chosen, steps = aif_mod.select_aif(feats, n_voxels=config.aif_voxels)
        except aif_mod.AifError as exc:
            raise InputError(f"{s.path}: {exc}; give arterial voxels with --aif MASK") from None
        aif_rows = np.flatnonzero(brain_rows)[chosen]
        aif_source = "automatic"
    # arteries fill before the tissue: re-check the baseline on the arterial signal itself
    aif_signal = flat[idx[aif_rows], keep].astype(np.float64)
    aif_bl = bl
    try:
        own = signal.find_baseline(aif_signal.mean(axis=0), tr=s.tr)
        if own.stop < bl.stop:
            aif_bl = slice(0, max(own.stop, signal.MIN_BASELINE_FRAMES))
    except signal.BaselineError:
        pass
    aif_d, _ = signal.to_delta_r2s(aif_signal, te=s.te, baseline=aif_bl)
    aif_curve = np.nanmean(aif_d, axis=0)
    aif_info = {"source": aif_source, "n_voxels": int(aif_rows.size), "selection_steps": steps,
                "baseline_frames": aif_bl.stop - aif_bl.start,
                **aif_mod.aif_quality(aif_curve, tr=s.tr, baseline=aif_bl, tissue_peak_frame=tissue_peak_frame,
                                       t0=base.start * s.tr)}
    notes += aif_info.pop("warnings")
    aif_mask = np.zeros(shape, bool)
    aif_mask.ravel()[idx[aif_rows]] = True

    # -- deconvolution and maps, chunk by chunk
    try:
        if config.method == "model":
            if not np.any(aif_curve > 0):
                raise ValueError("the AIF has no positive value")
            op = modelfit.prepare(aif_curve, tr=s.tr)
        else:
            op = deconvolution.prepare(aif_curve, tr=s.tr, method=config.method, threshold=config.threshold,
                                       oi_target=config.oi_target)
    except ValueError as exc:
        raise InputError(f"{_where(inputs.paths.get('aif'), str(s.path))}: unusable AIF ({exc}); "
                         "give arterial voxels with --aif MASK") from None
    out = {k: np.full(n_vox, np.nan, np.float32) for k in ("cbv", "cbf", "mtt", "ttp", "tmax")}
    for lo in range(0, n_vox, config.chunk_voxels):
        sl = slice(lo, min(lo + config.chunk_voxels, n_vox))
        c = dr2s[sl].astype(np.float64)
        v = maps.cbv(c, aif_curve, tr=s.tr, kh=config.kh, rho=config.rho)
        if config.method == "model":
            fit = modelfit.fit(op, c)
            f = fit.flow * cbf_scale(config.kh, config.rho)
            ok = fit.valid
            mtt_s, tmax_s = fit.mtt, fit.delay  # the exponential residue peaks at the delay
        else:
            res = deconvolution.deconvolve(op, c)
            f = maps.cbf(res.residue, kh=config.kh, rho=config.rho)
            ok = np.isfinite(f) & (f > 0)
            mtt_s, tmax_s = maps.mtt(v, f), maps.tmax(res.residue, tr=s.tr, n_t=n_t)
        out["cbv"][sl] = v
        out["cbf"][sl] = np.where(ok, f, np.nan)
        out["mtt"][sl] = np.where(ok, mtt_s, np.nan)
        out["ttp"][sl] = maps.ttp(c, tr=s.tr) + base.start * s.tr
        out["tmax"][sl] = np.where(ok, tmax_s, np.nan)
    volumes = {}
    for k, vals in out.items():
        vol = np.full(shape, np.nan, np.float32)
        vol.ravel()[idx] = vals
        volumes[k] = vol

    # -- reference tissue and rCBV
    exclude = aif_mask.copy()
    for m in inputs.rois.values():
        exclude |= m
    if inputs.reference is not None:
        ref_mask = inputs.reference & np.isfinite(volumes["cbv"])
        ref_source = str(inputs.paths.get("reference"))
        overlap = [n for n, m in inputs.rois.items() if (m & inputs.reference).any()]
        if overlap:
            notes.append(f"the reference mask overlaps ROI(s) {', '.join(overlap)}")
    else:
        ref_mask = roi.auto_reference(volumes["cbv"], brain, exclude)
        ref_source = "automatic (low, homogeneous CBV away from ROIs and vessels; see README)"
    if not ref_mask.any():
        raise InputError(f"{_where(inputs.paths.get('reference'), str(s.path))}: no reference voxel with a valid CBV; "
                         "give a normal-appearing white-matter mask with --reference")
    ref_cbv = float(np.median(volumes["cbv"][ref_mask]))
    if not ref_cbv > 0:
        raise InputError(f"{_where(inputs.paths.get('reference'), str(s.path))}: reference CBV median is {ref_cbv:.3g}, "
                         "not positive; give a normal-appearing white-matter mask with --reference")
    volumes["rcbv"] = (volumes["cbv"] / ref_cbv).astype(np.float32)
    reference_info = {"source": ref_source, "n_voxels": int(ref_mask.sum()), "cbv_median": ref_cbv,
                      "cbv_iqr": [float(q) for q in np.percentile(volumes["cbv"][ref_mask], [25, 75])]}

    # -- ROIs
    scores = []
    for name, m in inputs.rois.items():
        score = roi.score_roi(name, volumes["rcbv"][m], voxel_volume_ml=s.voxel_volume_ml, n_voxels=int(m.sum()),
                              low=config.rcbv_low, high=config.rcbv_high)
        outside = int((m & ~brain).sum())
        if outside:
            score = replace(score, reasons=score.reasons + (f"{outside} voxels lie outside the brain mask",))
        scores.append(score)

    return Result(maps=volumes, brain=brain, aif_mask=aif_mask, reference_mask=ref_mask, aif_curve=aif_curve,
                  time_s=(base.start + np.arange(n_t)) * s.tr, baseline=base, aif_info=aif_info,
                  reference_info=reference_info, rois=scores, warnings=notes, config=config,
                  seconds=time.perf_counter() - t_start)


def write_result(result: Result, inputs: Inputs, folder: Path) -> None:
    """Write maps with sidecars, masks, aif.tsv and report.json into ``folder`` (a staging folder)."""
    from . import report
    from .io import write_json, write_map, write_tsv

    s = inputs.series
    params = {"method": result.config.method, **{k: v for k, v in result.config.as_dict().items()
                                                 if k in ("threshold", "oi_target", "kh", "rho")},
              "te_s": s.te, "tr_s": s.tr, "aif": result.aif_info["source"], "leakage": result.config.leakage}
    model_desc = {"mtt": "Mean transit time: fitted MTT of the exponential residue (model fit)",
                  "tmax": "Time of the residue maximum: the fitted tissue delay (model fit)",
                  "cbf": "Cerebral blood flow: kH/rho * fitted flow F of the exponential-residue model * 6000"}
    for name, (unit, desc) in MAP_UNITS.items():
        if result.config.method == "model":
            desc = model_desc.get(name, desc)
        p = dict(params)
        if name == "rcbv":
            p["reference"] = result.reference_info["source"]
            p["reference_cbv_median"] = result.reference_info["cbv_median"]
        write_map(folder, name, result.maps[name], s.affine, units=unit, description=desc, parameters=p)
    write_map(folder, "brain_mask", result.brain.astype(np.uint8), s.affine, units="mask",
              description="Brain mask used for the analysis", dtype=np.uint8)
    write_map(folder, "aif_mask", result.aif_mask.astype(np.uint8), s.affine, units="mask",
              description=f"Arterial voxels of the AIF ({result.aif_info['source']})", dtype=np.uint8)
    write_map(folder, "reference_mask", result.reference_mask.astype(np.uint8), s.affine, units="mask",
              description=f"Reference tissue for rCBV ({result.reference_info['source']})", dtype=np.uint8)
    write_tsv(folder / "aif.tsv", {"time_s": result.time_s, "delta_r2s": result.aif_curve})
    write_json(folder / "report.json", report.build_report(result, inputs))


def capture_warnings(func, *args, **kwargs):
    """Call ``func`` and return (its result, the messages of the warnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = func(*args, **kwargs)
    return value, [str(w.message) for w in caught]
