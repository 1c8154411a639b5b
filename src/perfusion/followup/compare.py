"""Follow-up comparison: two ``perfusion analyze`` output folders of one patient, prior and current.

One post-treatment scan alone cannot tell pseudoprogression from progression well; the change between
two time points can. Per lesion ROI (matched by name) this module reports the change of volume (mL),
median rCBV (ratio), fractional tumour burden and verdict, classifies the change of size and of rCBV
against documented thresholds and names the pattern (a growing lesion whose rCBV falls is the
pseudoprogression / treatment-effect pattern).

Each time point's own statistics come from its report.json (computed on its native grid). Maps are
only moved for the figures and for one extra number, the prior rCBV inside the *current* ROI: when the
two baseline images lie on different grids (shape or affine), the prior baseline is registered rigidly
to the current one (register.rigid, Mattes mutual information) and the prior rCBV (linear) and ROI
masks (nearest neighbour) are resampled onto the current grid. On the same grid nothing is moved.

compare.json, compare.html (one self-contained page, everything from files HTML-escaped: built by
:mod:`perfusion.followup.page`) and, when registered, prior_to_current.tfm are written by
:func:`write_comparison` into a staging folder. This module holds the numbers and the patterns, not
the page. Library code: no printing, errors are PerfusionError subclasses with one-line messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from perfusion import DISCLAIMER, __version__
from perfusion.errors import InputError
from perfusion.io import find_report, load_volume, output_path, sha256
from perfusion.quantify.register import Rigid, Volume, resample, rigid, same_grid
from perfusion.report.html import VERDICT_WORDS, load_report, num, roi_mask_paths

# ------------------------------------------------------------------------------ pattern thresholds
# Relative change = current / prior - 1, each time point's value from its own report.json.

#: Volume "grows" at a relative change of +40 % or more. RANO 2.0 (Wen et al. 2023, J Clin Oncol
#: 41:5187) and the modified RANO criteria (Ellingson et al. 2017, Neurotherapeutics 14:307) define
#: volumetric progression as a >= 40 % increase of enhancing volume: the volume equivalent of the
#: bidimensional criterion's 25 % increase of the product of diameters (for a sphere the product
#: grows as d^2 and the volume as d^3: 1.25^1.5 = 1.40).
VOLUME_GROWTH = 0.40

#: Volume "shrinks" at a relative change of -65 % or less: the same sources' volumetric partial
#: response, the equivalent of a 50 % decrease of the product of diameters (0.5^1.5 = 0.35). Changes
#: in between are "stable" (RANO's stable disease); the asymmetry is RANO's.
VOLUME_SHRINK = -0.65

#: Median rCBV "rises" when it at least doubles (relative change >= +100 %) and "falls" when it at
#: least halves (<= -50 %): symmetric on the log scale, |ln(current / prior)| >= ln 2 = 0.69. The
#: 95 % repeatability coefficient of a ratio measure is 2.77 x its within-subject coefficient of
#: variation (wCV) on the log scale (Bland-Altman). Prah et al. 2015 (AJNR 36:1654, same-day
#: test-retest DSC in brain tumours, Table 2) report wCV 0.24-0.31 for normalised tumour rCBV with
#: the three most repeatable methods (0.31 for the leakage-corrected trapezoid integral this package
#: uses), i.e. a repeatability coefficient of 0.66-0.86 on the log scale (factor 1.9-2.4). We take
#: factor 2, the round value at the lower end of that range: a smaller change can be measurement
#: noise between two scans of an unchanged lesion, so it is called "stable" and the sentence says
#: so when the verdict changed anyway.
RCBV_RISE = 1.0
RCBV_FALL = -0.5

PATTERN_SOURCE = (
    "volume: RANO 2.0 (Wen et al. 2023, J Clin Oncol 41:5187) / modified RANO (Ellingson et al. 2017, "
    "Neurotherapeutics 14:307) volumetric progression >= +40 % and partial response <= -65 %; median rCBV: "
    "doubling or halving, the 95 % repeatability coefficient on the log scale (2.77 x wCV) for the wCV of "
    "0.24-0.31 that Prah et al. 2015 (AJNR 36:1654) measured for normalised tumour rCBV"
)

#: The brain masks of the two time points, on the current grid after any registration, overlapping
#: less than this (Dice) get a warning: the time points may not be aligned. The phantom's time points
#: (tests/test_compare.py) overlap 1.0 on one grid and after registration (0.99 with 0.9 mm of residual
#: misregistration); automatic brain masks of one head on two days differ at the edge by a voxel or
#: so, which costs a few per cent on a DSC grid (one voxel on the phantom's 44-voxel brain disc: 0.97),
#: while a brain shifted by about an eighth of its width falls below 0.85 (6 voxels: 0.84).
BRAIN_DICE_WARN = 0.85

#: A resampled prior rCBV voxel is kept where at least this fraction of its linear-interpolation
#: weight fell on valid (finite, inside the field of view) prior voxels; NaN elsewhere.
MIN_VALID_WEIGHT = 0.5

#: Analysis parameters (report.json ``parameters``) that change rCBV; a difference between the two
#: time points is a warning, because the change may then come from the analysis, not the lesion.
COMPARED_PARAMETERS = ("method", "leakage", "recirculation", "aif_selection", "vof", "rcbv_low", "rcbv_high", "kh",
                       "rho")

#: TE or TR differing by more than this fraction between the time points gets a warning (rCBV
#: depends on the acquisition; Boxerman et al. 2020 ask for one protocol across follow-up).
ACQ_REL_TOL = 0.05

TRANSFORM_FILE = "prior_to_current.tfm"

#: Pattern per (volume direction, rCBV direction): a short code and the sentence shown to the reader.
PATTERNS: dict[tuple[str, str], tuple[str, str]] = {
    ("grows", "falls"): (
        "pseudoprogression_pattern",
        "growing lesion with falling rCBV: the pseudoprogression / treatment-effect pattern. Growth of enhancement "
        "with less blood volume favours treatment effect; confirm with short-interval follow-up MRI (6-8 weeks) "
        "before calling progression."),
    ("grows", "rises"): (
        "progression_pattern",
        "growing lesion with rising rCBV: the progression pattern. Refer to neuro-oncology for multidisciplinary "
        "review."),
    ("grows", "stable"): (
        "growth_stable_rcbv",
        "growing lesion with stable rCBV: the size changed, the blood volume not beyond repeatability. Read it with "
        "the current verdict; MR spectroscopy, FDG-PET or short-interval follow-up can help."),
    ("stable", "rises"): (
        "rcbv_rising",
        "stable size with rising rCBV: blood volume rising before any growth can precede progression; consider "
        "early follow-up and neuro-oncology review."),
    ("stable", "falls"): (
        "rcbv_falling",
        "stable size with falling rCBV: consistent with treatment effect or response."),
    ("stable", "stable"): (
        "stable",
        "stable size and stable rCBV: no change beyond the thresholds."),
    ("shrinks", "falls"): (
        "response_pattern",
        "shrinking lesion with falling rCBV: the response pattern."),
    ("shrinks", "stable"): (
        "shrinking_stable_rcbv",
        "shrinking lesion with stable rCBV: response in size, blood volume unchanged beyond repeatability."),
    ("shrinks", "rises"): (
        "discordant",
        "shrinking lesion with rising rCBV: discordant. Check that both ROIs outline the same lesion and read it "
        "with the current verdict; under anti-angiogenic therapy shrinking enhancement can be pseudoresponse."),
}

# ---------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class TimePoint:
    """One analyze output folder: its report, baseline and rCBV on its own grid, and its ROI masks."""

    folder: Path
    report: dict
    report_path: Path
    baseline: Volume  # mean baseline signal, a.u.
    rcbv: np.ndarray  # ratio, same grid as baseline; NaN where not computed
    brain: np.ndarray | None  # bool
    masks: dict[str, np.ndarray]  # ROI name -> bool mask on this grid (only those found)
    notes: list[str] = field(default_factory=list)


@overload
def _load_map(folder: Path, report: dict, name: str, *, required: Literal[True]) -> tuple[np.ndarray, np.ndarray]:
    ...


@overload
def _load_map(folder: Path, report: dict, name: str, *, required: bool) -> tuple[np.ndarray, np.ndarray] | None:
    ...


def _load_map(folder: Path, report: dict, name: str, *, required: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Output ``name`` of an analyze folder and its affine; None when missing and not ``required``
    (InputError when ``required``: the overloads say so to the type checker)."""
    path = output_path(folder, report, name)
    if not path.is_file():
        if required:
            raise InputError(f"{path}: not found; re-run 'perfusion analyze' to write the full output folder")
        return None
    return load_volume(path, what=name)


def load_time_point(folder: Path, *, roi_names: list[str], label: str, report: dict | None = None) -> TimePoint:
    """Read what the comparison needs from an analyze output folder ``label`` ('prior' or 'current');
    ``report`` is its report.json when already read."""
    folder = Path(folder)
    report = load_report(folder) if report is None else report
    base, affine = _load_map(folder, report, "baseline", required=True)
    rcbv, rcbv_affine = _load_map(folder, report, "rcbv", required=True)
    if rcbv.shape != base.shape or not np.allclose(rcbv_affine, affine, atol=1e-3):
        raise InputError(f"{output_path(folder, report, 'rcbv')}: grid differs from the baseline image in the same "
                         "folder; re-run 'perfusion analyze'")
    notes: list[str] = []
    brain_map = _load_map(folder, report, "brain_mask", required=False)
    brain = brain_map[0] != 0 if brain_map is not None and brain_map[0].shape == base.shape else None
    masks: dict[str, np.ndarray] = {}
    paths = roi_mask_paths(report, folder)
    for name in roi_names:
        p = paths.get(name)
        if p is None:
            notes.append(f"{label} ROI {name}: mask file not found; no contour and no overlap for it")
            continue
        data, m_affine = load_volume(p, what=f"ROI mask {name}")
        if data.shape != base.shape or not np.allclose(m_affine, affine, atol=1e-3):
            notes.append(f"{label} ROI {name}: mask {p.name} is not on the grid of the maps; not used")
            continue
        masks[name] = data != 0
    return TimePoint(folder=folder, report=report, report_path=find_report(folder),
                     baseline=Volume(base, affine), rcbv=rcbv.astype(np.float64), brain=brain, masks=masks,
                     notes=notes)


def match_rois(prior: dict, current: dict, *, prior_path: Path,
               current_path: Path) -> tuple[list[str], list[str], list[str]]:
    """ROI names in both reports (current report's order), only in the prior, only in the current.
    InputError naming both report.json files when no name is shared."""
    p_names = [str(r.get("name")) for r in prior.get("rois", [])]
    c_names = [str(r.get("name")) for r in current.get("rois", [])]
    common = [n for n in c_names if n in p_names]
    if not common:
        raise InputError(f"{prior_path} and {current_path}: no ROI name in common (prior: "
                         f"{', '.join(p_names) or 'none'}; current: {', '.join(c_names) or 'none'}); "
                         "name the lesion masks the same in both analyses")
    return common, [n for n in p_names if n not in c_names], [n for n in c_names if n not in p_names]


# -------------------------------------------------------------------------------------- numerics


def relative_change(prior: Any, current: Any) -> float | None:
    """current / prior - 1, or None when either is missing or prior is not positive."""
    p, c = num(prior), num(current)
    if p is None or c is None or p <= 0:
        return None
    return c / p - 1.0


def volume_direction(rel: float | None) -> str:
    """'grows', 'shrinks' or 'stable' by VOLUME_GROWTH / VOLUME_SHRINK; 'unknown' without a change."""
    if rel is None:
        return "unknown"
    if rel >= VOLUME_GROWTH:
        return "grows"
    if rel <= VOLUME_SHRINK:
        return "shrinks"
    return "stable"


def rcbv_direction(rel: float | None) -> str:
    """'rises', 'falls' or 'stable' by RCBV_RISE / RCBV_FALL; 'unknown' without a change."""
    if rel is None:
        return "unknown"
    if rel >= RCBV_RISE:
        return "rises"
    if rel <= RCBV_FALL:
        return "falls"
    return "stable"


def describe_pattern(volume_dir: str, rcbv_dir: str, *, verdict_prior: str | None = None,
                     verdict_current: str | None = None) -> tuple[str, str]:
    """(code, sentence) for a pair of directions; the sentence notes a verdict change."""
    if (volume_dir, rcbv_dir) in PATTERNS:
        code, sentence = PATTERNS[(volume_dir, rcbv_dir)]
    else:
        missing = [w for w, d in (("volume", volume_dir), ("median rCBV", rcbv_dir)) if d == "unknown"]
        code, sentence = "not_comparable", (f"cannot classify the change: {' and '.join(missing) or 'a value'} "
                                            "missing or zero at one time point.")
    if verdict_prior and verdict_current and verdict_prior != verdict_current:
        words = VERDICT_WORDS.get(verdict_prior, verdict_prior), VERDICT_WORDS.get(verdict_current, verdict_current)
        extra = f" The verdict changed from {words[0].lower()} to {words[1].lower()}"
        if rcbv_dir == "stable":
            extra += ", although the rCBV change lies within its repeatability"
        sentence += extra + "."
    return code, sentence


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    n = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return None if n == 0 else 2.0 * int(np.count_nonzero(a & b)) / n


def _resample_map(values: np.ndarray, moving_affine: np.ndarray, onto: Volume, tx: Rigid) -> np.ndarray:
    """A map with NaNs resampled linearly: interpolate value x validity and validity, divide, NaN where
    less than MIN_VALID_WEIGHT of the weight was valid (NaN voxels and outside the field of view)."""
    valid = np.isfinite(values)
    weighted = resample(Volume(np.where(valid, values, 0.0).astype(np.float32), moving_affine), onto, tx)
    den = resample(Volume(valid.astype(np.float32), moving_affine), onto, tx)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den >= MIN_VALID_WEIGHT, weighted / np.maximum(den, 1e-12), np.nan)
    return out.astype(np.float64)


def _resample_mask(mask: np.ndarray, moving_affine: np.ndarray, onto: Volume, tx: Rigid) -> np.ndarray:
    return resample(Volume(mask.astype(np.float32), moving_affine), onto, tx, nearest=True) > 0.5


def _diff(prior: Any, current: Any) -> float | None:
    p, c = num(prior), num(current)
    return None if p is None or c is None else c - p


def _pair(prior: Any, current: Any, *, relative: bool = True) -> dict[str, Any]:
    """compare.json's record of one measure: prior, current, change (and relative change)."""
    out = {"prior": num(prior), "current": num(current), "change": _diff(prior, current)}
    if relative:
        out["relative_change"] = relative_change(prior, current)
    return out


@dataclass
class Comparison:
    """Everything compare.json holds (``data``) plus the arrays the figures need (current grid)."""

    data: dict
    transform: Rigid | None
    background: np.ndarray
    affine: np.ndarray  # the current grid's voxel-to-world affine (mm), for the figures' orientation
    prior_rcbv: np.ndarray  # prior rCBV on the current grid
    current_rcbv: np.ndarray
    current_masks: dict[str, np.ndarray]
    prior_masks: dict[str, np.ndarray]  # prior ROI masks on the current grid
    thresholds: tuple[float, float] = (1.0, 1.75)


def _reference_kind(source: Any) -> str:
    """'automatic' or 'mask' from report.json reference.source (a file path when a mask was given)."""
    return "automatic" if str(source).startswith("automatic") else "mask"


def _warnings(prior: dict, current: dict) -> list[str]:
    """Differences between the two reports that make the change less comparable: software version,
    analysis parameters, reference tissue, TE / TR, field strength."""
    out: list[str] = []
    pv = prior.get("software", {}).get("version")
    cv = current.get("software", {}).get("version")
    if pv != cv:
        out.append(f"software versions differ (prior perfusion {pv}, current {cv}): part of a change may come from "
                   "the software; re-run both analyses with one version")
    pp, cp = prior.get("parameters", {}), current.get("parameters", {})
    for key in COMPARED_PARAMETERS:
        if key in pp or key in cp:
            if pp.get(key) != cp.get(key):
                out.append(f"analysis parameter {key} differs (prior {pp.get(key)}, current {cp.get(key)}): the change "
                           "may come from the analysis, not the lesion; analyse both time points alike")
    kinds = [_reference_kind(r.get("reference", {}).get("source")) for r in (prior, current)]
    if kinds[0] != kinds[1]:
        out.append(f"reference tissue chosen differently (prior: {kinds[0]}; current: {kinds[1]}): rCBV is "
                   "normalised differently at the two time points; give a reference mask at both or at neither")
    pa, ca = prior.get("acquisition", {}), current.get("acquisition", {})
    for key, name, unit, scale in (("te", "TE", "ms", 1000.0), ("tr", "TR", "s", 1.0)):
        a, b = num(pa.get(key)), num(ca.get(key))
        if a and b and abs(b / a - 1) > ACQ_REL_TOL:
            out.append(f"{name} differs (prior {a * scale:g} {unit}, current {b * scale:g} {unit}): rCBV depends on "
                       "the protocol; follow-up scans should use one protocol")
    fa, fb = num(pa.get("field_strength_t")), num(ca.get("field_strength_t"))
    if fa and fb and abs(fa - fb) > 0.2:
        out.append(f"field strength differs (prior {fa:g} T, current {fb:g} T): rCBV is not directly comparable")
    return out


def compare_folders(prior_folder: Path, current_folder: Path) -> Comparison:
    """Compare two analyze output folders; see the module docstring. InputError for unusable input."""
    prior_folder, current_folder = Path(prior_folder), Path(current_folder)
    for f in (prior_folder, current_folder):
        if not f.is_dir():
            raise InputError(f"{f}: folder not found; give a folder written by 'perfusion analyze'")
    p_rep, c_rep = load_report(prior_folder), load_report(current_folder)
    common, only_prior, only_current = match_rois(p_rep, c_rep, prior_path=find_report(prior_folder),
                                                  current_path=find_report(current_folder))
    prior = load_time_point(prior_folder, roi_names=common, label="prior", report=p_rep)
    current = load_time_point(current_folder, roi_names=common, label="current", report=c_rep)
    warns = _warnings(p_rep, c_rep) + prior.notes + current.notes
    if same_grid(prior.baseline, current.baseline) and np.array_equal(prior.baseline.data, current.baseline.data):
        warns.append("the two baseline images are identical: both folders analysed the same series, so this compares "
                     "a scan with itself")
    moved = _prior_on_current_grid(prior, current)
    if moved.brain is not None and current.brain is not None:
        dice = _dice(moved.brain, current.brain)
        moved.registration["brain_mask_dice"] = dice
        if dice is not None and dice < BRAIN_DICE_WARN:
            warns.append(f"the brain masks of the two time points overlap only {dice:.2f} (Dice) on the current grid: "
                         "the scans may not be aligned; check the figure before trusting the registered numbers")
    rows = _roi_rows(common, prior, current, moved)
    thr = c_rep.get("thresholds", {})
    low, high = num(thr.get("rcbv_low")) or 1.0, num(thr.get("rcbv_high")) or 1.75
    data = _comparison_data(prior, current, moved.registration, rows, (low, high), warns,
                            unmatched={"prior_only": only_prior, "current_only": only_current})
    onto = current.baseline
    return Comparison(data=data, transform=moved.transform, background=onto.data, affine=onto.affine,
                      prior_rcbv=moved.rcbv, current_rcbv=current.rcbv, current_masks=current.masks,
                      prior_masks=moved.masks, thresholds=(low, high))


@dataclass
class _Moved:
    """The prior time point on the current grid: its rCBV, ROI masks and brain mask, the transform
    (None on a shared grid) and compare.json's "registration"."""

    rcbv: np.ndarray
    masks: dict[str, np.ndarray]
    brain: np.ndarray | None
    transform: Rigid | None
    registration: dict[str, Any]


def _prior_on_current_grid(prior: TimePoint, current: TimePoint) -> _Moved:
    """The prior maps as they are when both baselines share one grid; else registered rigidly to the
    current baseline and resampled onto its grid (module docstring)."""
    onto = current.baseline
    if same_grid(prior.baseline, onto):
        return _Moved(rcbv=prior.rcbv, masks=dict(prior.masks), brain=prior.brain, transform=None, registration={
            "performed": False,
            "reason": "the two baseline.nii.gz share one grid (shape and affine): no registration; the prior maps "
                      "are used voxel for voxel"})
    p_shape, c_shape = prior.baseline.data.shape, onto.data.shape
    why = f"shapes differ ({p_shape} vs {c_shape})" if p_shape != c_shape else "affines differ"
    transform = rigid(onto, prior.baseline, what="prior baseline image (to the current baseline)",
                      path=output_path(prior.folder, prior.report, "baseline"))
    registration = {
        "performed": True,
        "reason": f"the two baseline.nii.gz lie on different grids ({why}): prior registered to current",
        "method": "rigid (6 parameters), Mattes mutual information, SimpleITK; prior rCBV resampled linearly "
                  "(NaN-aware), prior ROI masks by nearest neighbour, onto the current grid",
        # file names only: the folders are often named after the patient (privacy, issue 17)
        "fixed": f"current: {output_path(current.folder, current.report, 'baseline').name}",
        "moving": f"prior: {output_path(prior.folder, prior.report, 'baseline').name}",
        "transform_file": TRANSFORM_FILE,
        **transform.as_dict(),
    }
    aff = prior.baseline.affine
    return _Moved(rcbv=_resample_map(prior.rcbv, aff, onto, transform),
                  masks={n: _resample_mask(m, aff, onto, transform) for n, m in prior.masks.items()},
                  brain=_resample_mask(prior.brain, aff, onto, transform) if prior.brain is not None else None,
                  transform=transform, registration=registration)


def _roi_rows(common: list[str], prior: TimePoint, current: TimePoint, moved: _Moved) -> list[dict[str, Any]]:
    """compare.json's "rois": per ROI in both reports, the change of volume (mL), median rCBV (ratio),
    FTB and verdict, the pattern, the prior rCBV in the current ROI and the ROIs' overlap (Dice)."""
    p_rois = {str(r.get("name")): r for r in prior.report.get("rois", [])}
    c_rois = {str(r.get("name")): r for r in current.report.get("rois", [])}
    rows = []
    for name in common:
        p, c = p_rois[name], c_rois[name]
        vol = _pair(p.get("volume_ml"), c.get("volume_ml"))
        med = _pair(p.get("rcbv_median"), c.get("rcbv_median"))
        vol["direction"] = volume_direction(vol["relative_change"])
        med["direction"] = rcbv_direction(med["relative_change"])
        code, sentence = describe_pattern(vol["direction"], med["direction"], verdict_prior=p.get("verdict"),
                                          verdict_current=c.get("verdict"))
        in_current = None
        if name in current.masks:
            v = moved.rcbv[current.masks[name]]
            v = v[np.isfinite(v)]
            in_current = float(np.median(v)) if v.size else None
        dice = _dice(moved.masks[name], current.masks[name]) if name in moved.masks and name in current.masks else None
        rows.append({
            "name": name,
            "volume_ml": vol,
            "rcbv_median": med,
            "ftb": {k: _pair(p.get(f"ftb_{k}"), c.get(f"ftb_{k}"), relative=False) for k in ("low", "mid", "high")},
            "verdict": {"prior": p.get("verdict"), "current": c.get("verdict"),
                        "changed": p.get("verdict") != c.get("verdict")},
            "prior_rcbv_median_in_current_roi": in_current,
            "roi_overlap_dice": dice,
            "pattern": code,
            "pattern_sentence": sentence,
        })
    return rows


def _comparison_data(prior: TimePoint, current: TimePoint, registration: dict[str, Any], rows: list[dict[str, Any]],
                     verdict_thresholds: tuple[float, float], warns: list[str], *,
                     unmatched: dict[str, list[str]]) -> dict[str, Any]:
    """What compare.json holds (its keys in order); ``verdict_thresholds``: the current analysis's rCBV
    thresholds (ratio)."""
    low, high = verdict_thresholds
    return {
        "software": {"name": "perfusion", "version": __version__},
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
        "inputs": {
            label: {"report_json": tp.report_path.name,
                    "report_sha256": sha256(tp.report_path), "analysis_created_utc": tp.report.get("created_utc"),
                    "software_version": tp.report.get("software", {}).get("version")}
            for label, tp in (("prior", prior), ("current", current))},
        "registration": registration,
        "thresholds": {
            "volume_growth_relative": VOLUME_GROWTH, "volume_shrink_relative": VOLUME_SHRINK,
            "rcbv_rise_relative": RCBV_RISE, "rcbv_fall_relative": RCBV_FALL,
            "relative_change": "current / prior - 1",
            "source": PATTERN_SOURCE,
            "verdict_rcbv_low": low, "verdict_rcbv_high": high,
        },
        "units": {"volume_ml": "mL", "rcbv": "ratio", "ftb": "fraction of ROI voxels (0-1)",
                  "relative_change": "fraction (0.4 = +40 %)", "translation_mm": "mm", "rotation_deg": "deg"},
        "rois": rows,
        "unmatched_rois": unmatched,
        "warnings": warns,
    }
