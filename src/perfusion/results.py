"""The typed report.json entries of an analysis, each a frozen dataclass, which ``pipeline.Result``
carries (pipeline.analyze, case.analyze_case).

Each entry's ``as_report()`` gives exactly its report.json entry (the same keys, values and order as
the dicts of earlier versions: tests/test_golden.py pins every key path); report/build.py puts them
together. Units are in each field's metadata (``fields(X)[i].metadata["units"]``). A field marked
optional in its metadata is left out of report.json when it is None (it applies to some analyses
only, e.g. the automatic reference's criteria); every other field is always written.

The entries are keyword-only (``kw_only``): each is made by name, and an optional field may come
before a required one so the fields stand in report.json's order. This module imports nothing of the
package: the stages build these entries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def with_units(units: str | None = None, **kwargs) -> Any:
    """A dataclass field with its units in its metadata (None: a text, a flag or a nested entry)."""
    return field(metadata={"units": units}, **kwargs)


_f = with_units


def _opt(units: str | None = None) -> Any:
    """An optional field: None, and then left out of report.json."""
    return field(default=None, metadata={"units": units, "optional": True})


def _plain(value):
    """A field's value as JSON writes it: nested entries by their as_report(), tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.as_report()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def report_entry(entry, *, leave_out: tuple[str, ...] = ()) -> dict:
    """The report.json dict of a dataclass entry: its fields in order, without ``leave_out`` and
    without the optional fields that are None."""
    out = {}
    for f in dataclasses.fields(entry):
        value = getattr(entry, f.name)
        if f.name in leave_out or (value is None and f.metadata.get("optional")):
            continue
        out[f.name] = _plain(value)
    return out


# ------------------------------------------------------------------------------------ the AIF


@dataclass(frozen=True, kw_only=True)
class VenousOutput:
    """report.json "aif" "vof": the partial-volume scaling of the AIF by a venous output function
    (--vof; aif.vof_scaling). ``source`` "none" and no ``mode`` when no VOF was used."""

    source: str  # "none", "automatic" or the VOF mask's file
    mode: str | None = _opt()  # Config.vof: "guarded", "auto" or "mask"
    applied: bool | None = _opt()  # the AIF was scaled
    n_voxels: int | None = _opt("voxels")
    scale_factor: float | None = _opt("ratio")  # VOF area / AIF area over the first pass
    vof_area_ratio: float | None = _opt("ratio")  # "guarded": VOF area / tissue area (large vessel test)
    why: str | None = _opt()  # why the AIF was not scaled

    def as_report(self) -> dict:
        """The entry; "guarded" lists the measurements before "applied", the other modes after it
        (the order of earlier versions)."""
        out: dict = {"source": self.source}
        if self.mode is None:
            return out
        out["mode"] = self.mode
        measured = {k: v for k, v in (("n_voxels", self.n_voxels), ("scale_factor", self.scale_factor),
                                      ("vof_area_ratio", self.vof_area_ratio)) if v is not None}
        if self.mode == "guarded":
            out.update(measured)
            out["applied"] = self.applied
        else:
            out["applied"] = self.applied
            out.update(measured)
        if self.why is not None:
            out["why"] = self.why
        return out


@dataclass(frozen=True, kw_only=True)
class AifGammaVariate:
    """report.json "aif" "gamma_variate": the gamma-variate fit of the AIF's first pass and of the tissue."""

    valid: bool  # the AIF's fit succeeded (else the gv_cbv map, with --gamma-maps, is empty)
    first_pass_area: float = _f("1/s x s")  # area of the fitted first pass of the AIF
    trapezoid_area: float = _f("1/s x s")  # trapezoid area of the measured AIF (recirculation included)
    quality_nrmse: float = _f("ratio")  # RMS residual in the fit window / fitted peak
    # of the brain voxels whose own fit was run (tissue_fitted: every brain voxel with --gamma-maps or
    # --recirculation remove, else the ROIs' and the reference's), the share whose fit succeeded; null if none
    tissue_valid_fraction: float = _f("fraction")
    tissue_fitted: str = _f()  # which voxels were fitted, in words (pipeline._tissue_fits)
    tissue_fitted_voxels: int = _f("voxels")  # brain voxels fitted (tissue_valid_fraction's denominator)
    default_cbv: str = _f()  # what cbv.nii.gz is: "trapezoid" or "gamma-variate first pass"
    why: str = _f()  # why (pipeline.GV_CBV_CHOICE)

    def as_report(self) -> dict:
        return report_entry(self)


@dataclass(frozen=True, kw_only=True)
class ArterialInput:
    """report.json "aif": where the arterial input function came from and how good it is
    (aif.arterial_entry). The measures of the curve (peak, time, width, CNR) are those of the mean
    arterial curve before any VOF scaling; the quality score and absolute checks judge the curve
    the maps use (after it)."""

    source: str  # the AIF mask's file or "automatic (<selection>)"
    n_voxels: int = _f("voxels")
    selection_steps: dict = _f()  # voxels left after each step of the automatic selection ({} for a mask)
    baseline_frames: int = _f("frames")  # the AIF's own baseline (its voxels' mean signal)
    peak_delta_r2s_per_s: float = _f("1/s")
    peak_time_s: float = _f("s")  # from the start of the series
    fwhm_s: float = _f("s")
    cnr: float = _f("ratio")  # peak / baseline SD
    vof: VenousOutput = _f()
    quality_score: float = _f("0-1")  # aif.aif_quality_score
    quality: dict = _f()  # the score's components
    absolute_quantification: bool = _f()  # absolute CBV/CBF trustworthy (aif.check_absolute)
    absolute_quantification_reasons: tuple[str, ...] = _f()
    absolute_checks: dict = _f()  # {"measures", "bounds"}
    relative_maps_valid: bool = _f()  # rCBV and the verdict are ratios: the AIF's area cancels
    absolute_statement: str | None = _opt()  # when not quantitative
    gamma_variate: AifGammaVariate | None = _opt()  # set after the maps (tissue fraction)

    def as_report(self) -> dict:
        return report_entry(self)


# ------------------------------------------------------------------------------------ leakage


@dataclass(frozen=True, kw_only=True)
class Leakage:
    """report.json "leakage": the correction the maps used, where, and how much it did."""

    method: str  # leak method applied: "none" or a correction (residue falls back to "bsw" on a short series)
    reference_voxels: int | None = _opt("voxels")  # BSW / bidirectional reference: non-enhancing brain voxels
    gate: str = _f()  # Config.leakage_gate
    n_corrected: int | None = _opt("voxels")  # voxels whose correction was applied
    fraction_corrected: float | None = _opt("fraction")  # of the analysed voxels
    fit_r2_median: float | None = _opt("ratio")  # median R^2 of the leakage fit over the fitted voxels

    def as_report(self) -> dict:
        return report_entry(self)


# ------------------------------------------------------------------------------------ reference tissue


@dataclass(frozen=True, kw_only=True)
class Standardized:
    """report.json "reference" "standardized": standardised rCBV (reference.standardize_cbv)."""

    landmarks: dict | None = _f()  # None when not computed
    rois: dict[str, float] = _f("standardized units")  # median per ROI
    why_not: str | None = _opt()

    def as_report(self) -> dict:
        return report_entry(self)


@dataclass(frozen=True, kw_only=True)
class Reference:
    """report.json "reference": the reference tissue of rCBV (reference.select_reference), its median
    CBV and its plausibility; with ROIs, its median under each leakage correction."""

    source: str  # the --reference mask's file, or how the automatic one was chosen
    automatic: bool = _f()
    side: str = _f()  # "left", "right" or "both" (patient sides)
    preferred_side: str | None = _opt()  # automatic: the side away from the ROIs
    why_side: str | None = _opt()
    roi_sides: dict[str, str] | None = _opt()
    roi_margin: str | None = _opt()  # "15 mm" or "2 voxels"
    fallback: str | None = _f()  # why the automatic choice fell back (always written, None when it did not)
    hemispheres: dict = _f()  # reference.Hemispheres.as_dict
    candidate_counts: dict | None = _opt("voxels")
    criteria: dict | None = _opt()
    n_voxels: int = _f("voxels")
    cbv_median: float = _f("mL/100 g")  # the divisor of rCBV
    cbv_iqr: tuple[float, float] = _f("mL/100 g")
    plausibility: dict = _f()  # reference.check_reference's figures and "problem" (None when plausible)
    standardized: Standardized | None = _opt()
    cbv_median_map: float | None = _opt("mL/100 g")  # corrected alike: the median in the CBV map
    corrected_alike: str | None = _opt()  # corrected alike: the sensitivity key of the correction
    regional_spread: float | None = _opt("fraction")  # automatic, with ROIs: +/- between the two halves
    cbv_median_by_leakage: dict[str, float] | None = _opt("mL/100 g")  # with ROIs

    @property
    def problem(self) -> str:
        """Why the reference is not plausible white matter ("" when it is): a verdict gate."""
        return self.plausibility["problem"] or ""

    def as_report(self) -> dict:
        return report_entry(self)


# ------------------------------------------------------------------------------------ head motion


@dataclass(frozen=True, kw_only=True)
class Motion:
    """report.json "motion" (motion.correct_series; numbers in mm and s) and the motion.tsv columns
    (``timeseries``, not in report.json). Only assessed, correction and applied when motion was not
    assessed (``reason``: why, for "auto")."""

    assessed: bool
    correction: str = _f()  # Config.motion_correct
    applied: bool = _f()  # a frame was realigned
    reason: str | None = _opt()
    n_frames_corrected: int | None = _opt("frames")
    frames_corrected: tuple[int, ...] | None = _opt("frame index")
    fd_max_mm: float | None = _opt("mm")
    fd_mean_mm: float | None = _opt("mm")
    fd_threshold_mm: float | None = _opt("mm")
    fd_threshold_source: str | None = _opt()
    n_frames_above_threshold: int | None = _opt("frames")
    frames_above_threshold: tuple[int, ...] | None = _opt("frame index")
    displacement_max_mm: float | None = _opt("mm")
    correction_threshold_mm: float | None = _opt("mm")
    frames_registered: tuple[int, ...] | None = _opt("frame index")
    frames_registered_full_resolution: tuple[int, ...] | None = _opt("frame index")
    reference: dict | None = _opt()
    method: str | None = _opt()
    parameters: str | None = _opt()
    screening_threshold_mm: float | None = _opt("mm")
    refinement_threshold_mm: float | None = _opt("mm")
    parameters_estimated: str | None = _opt()
    seconds: float | None = _opt("s")
    timeseries: dict[str, np.ndarray] | None = _opt()  # motion.tsv columns (units in the names)

    @classmethod
    def of(cls, entry: dict) -> Motion:
        """From motion.correct_series's dict (report.json "motion" plus "timeseries"); a key this class
        does not know is a TypeError, so a new one cannot be dropped from report.json unnoticed."""
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
        return cls(**values)  # each value of its own field's type, hence Any

    def as_report(self) -> dict:
        return report_entry(self, leave_out=("timeseries",))
