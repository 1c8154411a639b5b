"""Follow-up comparison: two ``perfusion analyze`` output folders of one patient, prior and current
(each the folder or its report file: a BIDS folder ``sub-01/ses-1/perf/`` holds one analysis per run,
``sub-01_ses-1_run-1_report.json``, ...; :func:`analysis`).

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

Before any number is read, three checks (issue 21), each first on the terminal, at the top of
compare.html and in compare.json: the same patient (patient_check: the BIDS subject labels, refused
when they differ unless the caller allows it; the anatomy, the two baselines' correlation after
registration), the same reference (reference_check: its kind, and its median relative to its brain's),
and per ROI the overlap of the two masks (Dice 0: "no overlap", never a direction or a pattern).

compare.json, compare.html (one self-contained page, everything from files HTML-escaped: built by
:mod:`perfusion.followup.page`) and, when registered, prior_to_current.tfm are written by
:func:`write_comparison` into a staging folder. This module holds the numbers and the patterns, not
the page. Library code: no printing, errors are PerfusionError subclasses with one-line messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from perfusion import DISCLAIMER, __version__
from perfusion.errors import InputError
from perfusion.io import find_report, load_volume, output_path, sha256
from perfusion.quantify.register import Rigid, Volume, resample, rigid, same_grid
from perfusion.report.html import VERDICT_WORDS, num, roi_mask_paths

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

# ----------------------------------------------------------------------- same patient, same reference

#: The first words of patient_check's warning and of a reference_check problem about the kind of
#: reference (the banners' and panels' titles say them: page.banner_text).
PATIENT_PREFIX = "DIFFERENT PATIENTS? "
REFERENCE_PREFIX = "references differ: "

#: BIDS subject entity in a file name or label: ``sub-<label>`` at the start or after ``_`` or ``/``.
SUBJECT_RE = re.compile(r"(?:^|[_/])sub-([A-Za-z0-9]+)")

#: The two baseline images (mean pre-bolus signal, the prior one on the current grid after compare's
#: rigid registration) correlating below this (Pearson r over the union of the two brain masks) get
#: the "different patients?" warning. Measured with compare's registration, on phantoms only (no pairs
#: of patient scans were available; tests/test_compare.py makes these pairs again): one head at two
#: time points r 0.995-0.999 (the tests' textured phantom, seeds 0 and 1, lesions grown, on one grid and
#: moved by 6 deg / 5 mm; the realistic head, seeds 0 and 1, on one grid and moved by 8 deg / 7 mm), and
#: 0.60-0.65 (two noise draws) for the realistic head with all seven lesions against the same head with
#: none (the largest change of one head we could make); different heads r -0.36 to 0.26 (the textured
#: phantom with its gain blobs mirrored, 0.16 on one grid and -0.36 moved; the realistic head against
#: one 12 % and one 17 % smaller, 0.26 and 0.24; the realistic head against the textured phantom, -0.07
#: to 0.06). 0.5 lies between the groups: 0.1 below the most changed one head, 0.24 above the most
#: similar two heads.
ANATOMY_MIN_R = 0.5

#: The anatomy check needs contrast inside the brain: the current baseline's interquartile range over
#: its median, in the brain, at least this (a uniform disc phantom: 0.01, its noise; the textured phantom
#: 0.2; a brain's grey / white matter / CSF contrast more). Below it the check is not made (null).
ANATOMY_MIN_CONTRAST = 0.05

#: The reference tissue's median CBV relative to its brain's median CBV (report.json
#: reference.plausibility.cbv_ratio_to_brain_median, free of the AIF's scale) differing by more than this
#: factor between the time points means the references lie in different tissue: every rCBV moves by
#: that factor on this account alone. sqrt(2) is half the log-distance to the doubling / halving at which
#: a median rCBV "rises" or "falls" (RCBV_RISE, RCBV_FALL).
REFERENCE_SHIFT_FACTOR = 2.0 ** 0.5

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


def load_time_point(folder: Path, *, roi_names: list[str], label: str, report: dict | None = None,
                    report_path: Path | None = None) -> TimePoint:
    """Read what the comparison needs from an analyze output folder ``label`` ('prior' or 'current'),
    or from its report file (``report_path``: a BIDS folder holds one analysis per run); ``report`` is
    that report when already read."""
    folder = Path(folder)
    report_path = find_report(folder) if report_path is None else Path(report_path)
    report = read_report(report_path) if report is None else report
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
    return TimePoint(folder=folder, report=report, report_path=report_path,
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


#: Pattern of a ROI whose prior and current masks share no voxel on the current grid (Dice 0): whatever
#: its numbers, not a change of one lesion, so never "stable" nor any other pattern.
NO_OVERLAP = ("no_overlap",
              "no overlap: the prior and current ROI share no voxel on the current grid (Dice 0): not the same "
              "lesion, or it moved; the numbers are not a change of one lesion. Check both ROIs and the "
              "registration figure.")


def describe_pattern(volume_dir: str, rcbv_dir: str, *, verdict_prior: str | None = None,
                     verdict_current: str | None = None, dice: float | None = None) -> tuple[str, str]:
    """(code, sentence) for a pair of directions; the sentence notes a verdict change. ``dice``: the
    overlap of the prior and current ROI masks on the current grid; 0 gives NO_OVERLAP."""
    if dice == 0.0:
        return NO_OVERLAP
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
    """Dice overlap of two masks; None when either is empty (no overlap to speak of: an empty ROI is
    not a lesion that moved)."""
    na, nb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    return None if na == 0 or nb == 0 else 2.0 * int(np.count_nonzero(a & b)) / (na + nb)


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
    analysis parameters, TE / TR, field strength (the reference tissue: reference_check)."""
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


def _reference_summary(report: dict) -> dict[str, Any]:
    """One time point's reference as reference_check reads it from report.json "reference"."""
    ref = report.get("reference") or {}
    return {"kind": _reference_kind(ref.get("source")), "cbv_median": num(ref.get("cbv_median")),
            "ratio_to_brain_median": num((ref.get("plausibility") or {}).get("cbv_ratio_to_brain_median"))}


def reference_check(prior: dict, current: dict) -> dict[str, Any]:
    """compare.json "reference_check": whether the two analyses normalised rCBV alike: the same kind of
    reference (automatic or a given mask) and reference medians within REFERENCE_SHIFT_FACTOR of each
    other, each relative to its own brain's median CBV; ``problems`` the sentences for the first screen."""
    p, c = _reference_summary(prior), _reference_summary(current)
    problems = []
    if p["kind"] != c["kind"]:
        problems.append(f"{REFERENCE_PREFIX}chosen differently (prior: {p['kind']}; current: {c['kind']}), so rCBV "
                        "is normalised differently at the two time points; give a reference mask at both or at neither")
    rp, rc = p["ratio_to_brain_median"], c["ratio_to_brain_median"]
    if rp and rc and rp > 0 and rc > 0 and max(rp / rc, rc / rp) > REFERENCE_SHIFT_FACTOR:
        problems.append(f"reference medians far apart: the reference's median CBV is {rp:.2f} x its brain's median at "
                        f"the prior and {rc:.2f} x at the current time point (a factor {max(rp / rc, rc / rp):.2f}, "
                        f"limit {REFERENCE_SHIFT_FACTOR:.2f}): every rCBV moves by that factor on this account "
                        "alone; check that both references lie in normal-appearing white matter")
    return {"prior": p, "current": c, "match": not problems, "shift_limit_factor": REFERENCE_SHIFT_FACTOR,
            "problems": problems}


def subject_label(report: dict) -> str | None:
    """The BIDS subject label (without ``sub-``) of an analysis: from its DSC input's file name
    (report.json "inputs" holds file names only), else another input's, else report.json "case"."label";
    None when none carries one."""
    inputs = report.get("inputs") or {}
    names = [(inputs.get("dsc") or {}).get("file")]
    names += [v.get("file") for k, v in inputs.items() if k != "dsc" and isinstance(v, dict)]
    names.append((report.get("case") or {}).get("label"))
    for name in names:
        match = SUBJECT_RE.search(name) if isinstance(name, str) else None
        if match:
            return match.group(1)
    return None


def anatomy_check(prior_baseline: np.ndarray, current_baseline: np.ndarray,
                  brains: list[np.ndarray]) -> dict[str, Any]:
    """Whether the two baselines (a.u.; the prior one on the current grid) show one head: Pearson r
    over the union of ``brains`` (the two brain masks on the current grid; without any, the voxels above
    a tenth of the current baseline's 99th percentile), against ANATOMY_MIN_R. ``match`` None (not
    checked) when a baseline has too little contrast inside the brain (ANATOMY_MIN_CONTRAST)."""
    cur = np.nan_to_num(current_baseline.astype(np.float64))
    pri = np.nan_to_num(prior_baseline.astype(np.float64))
    if brains:
        mask = np.logical_or.reduce(brains)
    else:
        mask = cur > 0.1 * np.percentile(cur, 99)
    out: dict[str, Any] = {"measure": "Pearson correlation of the baseline images over the union of the brain "
                                      "masks, prior registered onto the current grid",
                           "threshold": ANATOMY_MIN_R, "voxels": int(mask.sum()), "correlation": None, "match": None}
    contrast = []
    for img in (pri, cur):
        v = img[mask]
        q1, med, q3 = np.percentile(v, [25, 50, 75]) if v.size else (0.0, 0.0, 0.0)
        contrast.append((q3 - q1) / med if med > 0 else 0.0)
    out["contrast"] = [round(float(x), 4) for x in contrast]
    if mask.sum() < 64 or min(contrast) < ANATOMY_MIN_CONTRAST:
        out["note"] = ("not checked: a baseline image has too little contrast inside the brain (interquartile range "
                       f"below {ANATOMY_MIN_CONTRAST:g} of the median) to recognise a head by")
        return out
    r = float(np.corrcoef(pri[mask], cur[mask])[0, 1])
    out.update(correlation=round(r, 4), match=bool(r >= ANATOMY_MIN_R))
    return out


def patient_check(prior: dict, current: dict, anatomy: dict[str, Any], *, different_patients_ok: bool) -> dict:
    """compare.json "patient_check": the BIDS subject labels (when both carry one) and the anatomy check;
    ``same_patient`` False when either says otherwise, True when one says so and none otherwise, None
    when neither could be made; ``warning`` the loud sentence, None when nothing speaks against."""
    p, c = subject_label(prior), subject_label(current)
    subject = {"prior": p, "current": c, "match": None if p is None or c is None else p == c}
    against = []
    if subject["match"] is False:
        against.append(f"the BIDS subjects differ (prior sub-{p}, current sub-{c})")
    if anatomy["match"] is False:
        against.append(f"the baseline images do not show one head after registration (correlation "
                       f"{anatomy['correlation']:.2f}, below {ANATOMY_MIN_R:g}; one head measured 0.60 or more)")
    checks = (subject["match"], anatomy["match"])
    same = False if against else (True if True in checks else None)
    warning = None
    if against:
        warning = (PATIENT_PREFIX + "; ".join(against) + ". Every change below may compare two people: "
                   "check that both folders belong to one patient before reading it")
    return {"same_patient": same, "subject": subject, "anatomy": anatomy,
            "different_patients_ok": different_patients_ok, "warning": warning}


def _refuse_other_subject(p_rep: dict, c_rep: dict, prior_path: Path, current_path: Path) -> None:
    """InputError (exit 4) when both analyses carry a BIDS subject label and the labels differ."""
    p, c = subject_label(p_rep), subject_label(c_rep)
    if p is not None and c is not None and p != c:
        raise InputError(f"{prior_path} and {current_path}: the BIDS subjects differ "
                         f"(sub-{p} and sub-{c}), so these look like two patients; give two analyses of one patient, "
                         "or add --different-patients-ok when both labels name one person")


def analysis(path: Path) -> tuple[Path, Path]:
    """(folder, report file) of one analysis given as its output folder or as its report file
    (``OUT/sub-01/ses-1/perf/sub-01_ses-1_run-1_report.json``: a BIDS folder holds one analysis per
    run, and a folder with several is a one-line InputError listing them: io.find_report)."""
    from perfusion.io.names import analysis_of

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found; give a folder written by 'perfusion analyze' or its report.json")
    return analysis_of(path)


def read_report(path: Path) -> dict:
    """The report file ``path`` as a dict; InputError naming it when broken."""
    from perfusion.io import read_json_object

    return read_json_object(path, what="report", fix="re-run 'perfusion analyze'")


def compare_folders(prior_folder: Path, current_folder: Path, *, different_patients_ok: bool = False) -> Comparison:
    """Compare two analyses, each an analyze output folder or its report file (analysis); see the module
    docstring. InputError for unusable input, and for two analyses whose BIDS subject labels differ
    unless ``different_patients_ok`` (then the comparison carries the loud warning of patient_check)."""
    (prior_folder, p_path), (current_folder, c_path) = analysis(prior_folder), analysis(current_folder)
    p_rep, c_rep = read_report(p_path), read_report(c_path)
    if not different_patients_ok:
        _refuse_other_subject(p_rep, c_rep, p_path, c_path)
    common, only_prior, only_current = match_rois(p_rep, c_rep, prior_path=p_path, current_path=c_path)
    prior = load_time_point(prior_folder, roi_names=common, label="prior", report=p_rep, report_path=p_path)
    current = load_time_point(current_folder, roi_names=common, label="current", report=c_rep, report_path=c_path)
    references = reference_check(p_rep, c_rep)
    warns = references["problems"] + _warnings(p_rep, c_rep) + prior.notes + current.notes
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
    brains = [b for b in (moved.brain, current.brain) if b is not None]
    patient = patient_check(p_rep, c_rep, anatomy_check(moved.baseline, current.baseline.data, brains),
                            different_patients_ok=different_patients_ok)
    if patient["warning"]:
        warns.insert(0, patient["warning"])
    rows = _roi_rows(common, prior, current, moved)
    thr = c_rep.get("thresholds", {})
    low, high = num(thr.get("rcbv_low")) or 1.0, num(thr.get("rcbv_high")) or 1.75
    data = _comparison_data(prior, current, moved.registration, rows, (low, high), warns,
                            unmatched={"prior_only": only_prior, "current_only": only_current},
                            checks={"patient_check": patient, "reference_check": references})
    onto = current.baseline
    return Comparison(data=data, transform=moved.transform, background=onto.data, affine=onto.affine,
                      prior_rcbv=moved.rcbv, current_rcbv=current.rcbv, current_masks=current.masks,
                      prior_masks=moved.masks, thresholds=(low, high))


@dataclass
class _Moved:
    """The prior time point on the current grid: its rCBV, baseline (a.u.), ROI masks and brain mask,
    the transform (None on a shared grid) and compare.json's "registration"."""

    baseline: np.ndarray
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
        same = {"performed": False,
                "reason": "the two baseline.nii.gz share one grid (shape and affine): no registration; the prior "
                          "maps are used voxel for voxel"}
        return _Moved(baseline=prior.baseline.data, rcbv=prior.rcbv, masks=dict(prior.masks), brain=prior.brain,
                      transform=None, registration=same)
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
    return _Moved(baseline=resample(prior.baseline, onto, transform),
                  rcbv=_resample_map(prior.rcbv, aff, onto, transform),
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
        dice = _dice(moved.masks[name], current.masks[name]) if name in moved.masks and name in current.masks else None
        # no overlap: no direction either (a word like "stable" would read as one lesion's change)
        vol["direction"] = "no_overlap" if dice == 0.0 else volume_direction(vol["relative_change"])
        med["direction"] = "no_overlap" if dice == 0.0 else rcbv_direction(med["relative_change"])
        code, sentence = describe_pattern(vol["direction"], med["direction"], verdict_prior=p.get("verdict"),
                                          verdict_current=c.get("verdict"), dice=dice)
        in_current = None
        if name in current.masks:
            v = moved.rcbv[current.masks[name]]
            v = v[np.isfinite(v)]
            in_current = float(np.median(v)) if v.size else None
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
                     unmatched: dict[str, list[str]], checks: dict[str, dict]) -> dict[str, Any]:
    """What compare.json holds (its keys in order); ``verdict_thresholds``: the current analysis's rCBV
    thresholds (ratio); ``checks``: patient_check and reference_check, first after the inputs."""
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
        **checks,
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
