"""The command-line options that several commands share, each defined once: its flag, help text and
range check. ``analyze`` and ``batch`` take the analysis options from here; a command's values become
one pipeline Config through :func:`build_config` and, for a batch, one mapping (:func:`batch_params`)
that the batch engine records and analyses every case with.

``batch`` and ``bids`` take every analysis option of ``analyze`` from these same definitions (same flag,
help and range; tests/test_bids.py checks it); the inputs that differ per case come from the dataset
instead, by the options of :data:`PER_CASE`. Defaults stay in the commands' signatures (typer takes
them from there); tests/test_cli.py checks that they are the pipeline Config's. Nothing here imports
more than typer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from perfusion.units import MAX_TE_S, MAX_TR_S

# ------------------------------------------------------------------------------------ range checks

#: Ranges of the numeric options (flag -> low, high, low included, high included, unit); each is
#: checked before any work (:func:`check_options`) and stated in the option's help. TE/TR upper
#: bounds: units.MAX_TE_S and MAX_TR_S (larger values are milliseconds by mistake).
_RANGES = {
    "--threshold": (0.0, 1.0, False, False, ""),
    "--oi-target": (0.0, 1.0, False, False, ""),
    "--te": (0.0, MAX_TE_S, False, True, " s"),
    "--tr": (0.0, MAX_TR_S, False, True, " s"),
    "--rcbv-low": (0.0, None, False, False, ""),
    "--rcbv-high": (0.0, None, False, False, ""),
    "--aif-voxels": (1, None, True, False, ""),
    "--weeks-since-radiation": (0.0, None, True, False, " weeks"),
    "--snr": (0.0, None, False, False, ""),
    "--seed": (0, None, True, False, ""),
    # a clinical DSC series has 40-120 frames; fewer than 30 leave no tail after the bolus
    "--frames": (30, 1000, True, True, ""),
    # phantom_realistic.MAX_ECHOES: one float64 copy of the head per echo
    "--echoes": (1, 8, True, True, ""),
    "--jobs": (1, None, True, False, ""),
    "--repeats": (1, None, True, False, ""),
}


def _range_text(flag: str) -> str:
    lo, hi, lo_in, hi_in, unit = _RANGES[flag]
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo:g}{unit}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}{unit}"


def check_options(values: Mapping[str, Any]) -> None:
    """Refuse (UsageError, exit 2) a numeric option outside its range in _RANGES, NaN and Inf included,
    before any work. ``values``: a command's parameters by Python name (``oi_target`` for --oi-target),
    in the command's order; those without a range, and None (unset), are passed over."""
    from perfusion.errors import UsageError

    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is None or flag not in _RANGES:
            continue
        lo, hi, lo_in, hi_in, unit = _RANGES[flag]
        finite = isinstance(value, int) or math.isfinite(value)
        ok = (finite and (value > lo or (lo_in and value == lo))
              and (hi is None or value < hi or (hi_in and value == hi)))
        if not ok:
            hint = ""
            if unit == " s" and finite and value > hi and 0 < value / 1000 <= hi:
                hint = f"; this looks like milliseconds: give seconds (e.g. {flag} {value / 1000:g})"
            kind = "an integer" if isinstance(lo, int) else "a finite number"
            raise UsageError(f"{flag} {value:g}: must be {kind} {_range_text(flag)}{hint}")


# ------------------------------------------------------------------------------ the Config, once


def build_config(values: Mapping[str, Any]):
    """The validated pipeline Config (UsageError, exit 2) of a command's values: those that name a
    Config field configure it (``vof`` given as a mask file becomes "mask"), the rest (input files,
    TE/TR, output switches) are passed over; options a command does not take keep Config's defaults.
    Imports the pipeline (about 1 s): call it after the checks that can turn a run away at once."""
    import dataclasses

    import perfusion
    from perfusion.case import make_config

    fields = {f.name for f in dataclasses.fields(perfusion.Config)}
    return make_config(**{k: v for k, v in values.items() if k in fields})


#: Options a batch applies to every case besides the Config's: TE and TR (s) overriding sidecars, and
#: whether report.html is written (batch.engine.LOAD_PARAMS).
BATCH_LOAD_OPTIONS = ("te", "tr", "html")

#: analyze's options that a batch takes per case from the dataset instead, and how (the batch option or
#: argument that replaces each); every other analyze option batch and bids take as analyze does.
PER_CASE = {"dsc": "INPUT / BIDS_DIR (every series found)", "out": "OUT_DIR (one folder per case)",
            "mask": "--brain-glob (BIDS: label-brain masks)", "aif": "--aif-glob (BIDS: label-aif masks)",
            "reference": "--reference-glob (BIDS: label-nawm masks)", "roi": "--roi-glob (BIDS: label-<name> masks)",
            "anat": "--anat-glob (BIDS: the session's anat/*_T1w)",
            "force": "none: a batch resumes (done cases are skipped)",
            "dicom_series": "none: a case's dicom/ folder holds one series",
            "label": "none: each case's report is labelled with its case id (its BIDS entities, or its folder's "
                     "name relative to INPUT, as summary.tsv names it)",
            "scan_date": "none: a batch records no scan date (dates are identifiers; a dataset's are per case)",
            "dicom_export": "none: a batch writes no identifiers (run perfusion export-dicom on a case's folder)"}


def batch_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """The analysis options of a ``batch`` command's values, in the command's order: the mapping the
    batch engine analyses every case with and records in each done-marker and summary.json. Keys:
    the Config options (:func:`build_config`) and BATCH_LOAD_OPTIONS; dataset, engine and output
    options are left out."""
    import dataclasses

    import perfusion

    keep = {f.name for f in dataclasses.fields(perfusion.Config)} | set(BATCH_LOAD_OPTIONS)
    return {k: v for k, v in values.items() if k in keep}


def case_inputs(values: Mapping[str, Any]) -> dict[str, Any]:
    """What ``analyze`` loads, as case.compute_case's keywords: the masks (``--roi`` is ``rois``), the
    AIF and VOF (a mask or a mode), the anatomical image, TE and TR (s) and the DICOM series."""
    keys = ("mask", "aif", "reference", "te", "tr", "vof", "anat", "dicom_series")
    return {**{k: values[k] for k in keys}, "rois": list(values["roi"] or [])}


# --------------------------------------------------------------------------------- output options

Force = Annotated[bool, typer.Option("--force", help="Write into a non-empty output folder.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]

# --------------------------------------------------------------------------------- dataset options
# batch and bids: where each case's series, masks and anatomical image are found, and where cases run.

Layout = Annotated[str, typer.Option(help="auto, bids or plain.")]
Derivatives = Annotated[Optional[Path], typer.Option(
    help="BIDS: folder searched for *_label-<name>_mask.nii.gz (default INPUT/derivatives).")]
RoiGlob = Annotated[Optional[list[str]], typer.Option(
    help="Lesion masks by glob pattern, relative to INPUT (BIDS) or the case folder, with {sub} {ses} {case} "
         "placeholders; repeatable.")]
BrainGlob = Annotated[Optional[str], typer.Option(help="Brain mask by glob pattern (as --roi-glob).")]
ReferenceGlob = Annotated[Optional[str], typer.Option(
    help="Reference (normal-appearing white matter) mask by glob pattern.")]
AifGlob = Annotated[Optional[str], typer.Option(help="Arterial mask by glob pattern.")]
AnatGlob = Annotated[Optional[str], typer.Option(
    help="Anatomical image (as --anat) by glob pattern; BIDS default: the session's anat/*_T1w.nii[.gz] "
         "(ce- preferred).")]
Jobs = Annotated[int, typer.Option(
    help="Cases run at once (>= 1): 1 (default) runs in this process; N > 1 starts a local Dask cluster of N "
         "single-threaded worker processes.")]
Scheduler = Annotated[Optional[str], typer.Option(help="Use a running Dask scheduler, e.g. tcp://HOST:8786.")]
SchedulerFile = Annotated[Optional[Path], typer.Option(
    help="Use the Dask scheduler described by this file (dask scheduler --scheduler-file).")]
# -------------------------------------------------------------------------------- analysis options
# analyze, batch and bids take all of them; batch and bids find the files per case (PER_CASE).

Mask = Annotated[Optional[Path], typer.Option(help="Brain mask on the DSC grid (default: automatic).")]
Aif = Annotated[str, typer.Option(help="'auto' or a mask of arterial voxels on the DSC grid.")]
Reference = Annotated[Optional[Path], typer.Option(
    help="Reference tissue mask (normal-appearing white matter) for rCBV (default: automatic).")]
Roi = Annotated[Optional[list[Path]], typer.Option(help="Lesion mask; repeat for several. Its name is the file name.")]
Anat = Annotated[Optional[Path], typer.Option(
    help="Post-contrast T1 (NIfTI, any grid): registered rigidly to the DSC baseline and used as the figures' "
         "background.")]
DicomSeries = Annotated[Optional[int], typer.Option(
    "--series", help="DICOM folder input: SeriesNumber of the DSC series when the folder holds several.")]
Html = Annotated[bool, typer.Option(
    "--html/--no-html", help="Write report.html (about 1 s of figures); `perfusion report DIR` can write it later.")]

Method = Annotated[str, typer.Option(
    help="Deconvolution: model (default: gamma-residue fit with delay), osvd, csvd, ssvd or tikhonov.")]
Threshold = Annotated[Optional[float], typer.Option(
    help="Fixed SVD threshold P as a fraction of the largest singular value, in (0, 1) (ssvd 0.2, csvd 0.1 by "
         "default).")]
OiTarget = Annotated[Optional[float], typer.Option(
    help="oSVD oscillation-index target (dimensionless), in (0, 1) (default 0.095).")]
Leakage = Annotated[str, typer.Option(
    help="Leakage correction: auto (default: bidirectional, Leu 2016, for one echo; bsw, Boxerman 2006, for "
         "multi-echo), bidirectional, bsw, residue (Bjornerud 2011) or none.")]
LeakageGate = Annotated[str, typer.Option(
    help="Where the leakage correction applies: lesion (default: every voxel of the --roi lesions, elsewhere only "
         "where the leak is significant, |K2| > 3 SE), voxel (only where significant, lesions included) or none "
         "(everywhere, as published).")]
Te = Annotated[Optional[float], typer.Option(help="Echo time in s, in (0, 0.2] (overrides the sidecar).")]
Tr = Annotated[Optional[float], typer.Option(help="Repetition time in s, in (0, 10] (overrides sidecar and header).")]
RcbvLow = Annotated[float, typer.Option(help="rCBV below this: likely treatment effect (ratio, > 0).")]
RcbvHigh = Annotated[float, typer.Option(help="rCBV above this: likely recurrence (ratio, > --rcbv-low).")]
AifVoxels = Annotated[int, typer.Option(help="Number of arterial voxels averaged by --aif-selection rank (>= 1).")]
AifSelection = Annotated[str, typer.Option(
    help="Automatic AIF: cluster (k-means, Mouridsen 2006) or rank (peak / width).")]
Vof = Annotated[str, typer.Option(
    help="Partial-volume scaling of the AIF by a venous output function: guarded (default: the automatic VOF, "
         "applied only when it shows the AIF is partial-volumed), auto (always), none, or a mask.")]
Recirculation = Annotated[str, typer.Option(
    help="keep (default) or remove: deconvolve gamma-variate first passes of AIF and tissue.")]
GammaMaps = Annotated[bool, typer.Option(
    "--gamma-maps", help="Also fit a gamma variate to every voxel's first pass and write the gv_* maps (first-pass "
                         "CBV, peak, TTP, FWHM, fit quality). Without it only the ROIs' and the reference's voxels "
                         "are fitted (for the relative peak height); every other output is the same.")]
MotionCorrect = Annotated[str, typer.Option(
    help="Head motion: auto (default: register every frame to the baseline and realign frames displaced by more "
         "than 0.5 mm), on (realign every frame displaced by more than 0.25 mm) or off (no estimate). Writes "
         "motion.tsv (deg, mm).")]
WeeksSinceRadiation = Annotated[Optional[float], typer.Option(
    help="Weeks since the end of chemoradiation (weeks, >= 0); below 12 (RANO 2.0) a high rCBV is 'possible "
         "recurrence or pseudoprogression'.")]
Bevacizumab = Annotated[bool, typer.Option(
    "--bevacizumab", help="The patient is on bevacizumab (lowers rCBV): a low rCBV is at most indeterminate.")]
Steroids = Annotated[bool, typer.Option(
    "--steroids", help="The patient is on corticosteroids (lower rCBV): a low rCBV is at most indeterminate.")]
