"""Output file names: plain (``cbv.nii.gz``) or BIDS-derivative (``sub-01_cbv.nii.gz``), and finding them.

An analyze folder's report.json records each output's file name ("files"); readers (report.html,
compare, batch) look a file up there first (:func:`output_path`) and fall back on the plain name for
older reports.
"""

from __future__ import annotations

import re
from pathlib import Path

from perfusion.errors import InputError

#: Non-NIfTI outputs: key -> plain file name. Every other key is a NIfTI map "<key>.nii.gz" (+ "<key>.json").
PLAIN_FILES = {"aif": "aif.tsv", "aif_json": "aif.json", "curves": "curves.tsv", "curves_json": "curves.json",
               "report": "report.json", "report_html": "report.html", "anat_xfm": "anat_to_dsc.tfm",
               "motion": "motion.tsv", "motion_json": "motion.json", "ftb_dseg": "ftb_dseg.tsv"}


#: BIDS-derivative names (batch over a BIDS dataset): "<prefix>_" + this, by the BIDS derivatives rules
#: (BIDS 1.11 defines no DSC file yet, BEP009; so the grammar, entity order and suffix conventions of
#: the common derivatives, as the validator checks them):
#: - maps on the DSC grid carry no space- entity (BIDS: omitted = the source series' own space, as
#:   fMRIPrep names its native-space BOLD outputs); suffixes are the lower-case parameter names of the
#:   ASL derivatives proposal (cbf, cbv, ...); variants carry a desc- entity;
#: - the FTB classes are a discrete segmentation: ``desc-ftb_dseg.nii.gz`` with its ``desc-ftb_dseg.tsv``
#:   lookup table (index, name); masks end in ``_mask`` (desc- for what the tool made, label- for ROIs);
#: - the baseline image is 3-D, the mean of the pre-bolus gradient-echo frames: a T2*-weighted image,
#:   so BIDS's ``T2starw`` suffix (``desc-baseline_T2starw``), never ``_dsc`` (a 4-D series);
#: - the T1 resampled on the DSC grid is ``space-dsc`` (a space other than its own); the transform
#:   follows BIDS's from-/to- xfm naming.
BIDS_FILES = {
    "cbv": "cbv.nii.gz", "cbf": "cbf.nii.gz", "mtt": "mtt.nii.gz", "ttp": "ttp.nii.gz", "tmax": "tmax.nii.gz",
    "rcbv": "rcbv.nii.gz", "srcbv": "desc-standardized_rcbv.nii.gz", "ftb": "desc-ftb_dseg.nii.gz",
    "ftb_dseg": "desc-ftb_dseg.tsv", "k2": "k2.nii.gz",
    "cbv_uncorrected": "desc-uncorrected_cbv.nii.gz",
    "gv_cbv": "desc-gammavariate_cbv.nii.gz", "gv_peak": "desc-gammavariate_peak.nii.gz",
    "gv_ttp": "desc-gammavariate_ttp.nii.gz", "gv_fwhm": "desc-gammavariate_fwhm.nii.gz",
    "gv_quality": "desc-gammavariate_quality.nii.gz",
    "brain_mask": "desc-brain_mask.nii.gz", "aif_mask": "desc-aif_mask.nii.gz",
    "reference_mask": "desc-reference_mask.nii.gz", "baseline": "desc-baseline_T2starw.nii.gz",
    "anat": "space-dsc_T1w.nii.gz", "anat_xfm": "from-T1w_to-dsc_mode-image_xfm.tfm",
    "aif": "desc-aif_timeseries.tsv", "aif_json": "desc-aif_timeseries.json",
    "curves": "desc-curves_timeseries.tsv", "curves_json": "desc-curves_timeseries.json",
    "motion": "desc-motion_timeseries.tsv", "motion_json": "desc-motion_timeseries.json",
    "report": "report.json", "report_html": "report.html",
}


def output_file(key: str, prefix: str | None = None) -> str:
    """File name of output ``key`` in an analyze folder: plain ("cbv.nii.gz") or, with a BIDS ``prefix``
    ("sub-01_ses-1"), BIDS-derivative ("sub-01_ses-1_cbv.nii.gz")."""
    if prefix:
        return f"{prefix}_{BIDS_FILES[key]}"
    return PLAIN_FILES.get(key, f"{key}.nii.gz")


def is_analyze_output(name: str) -> bool:
    """True for a file name that ``perfusion analyze`` writes in plain naming (maps and their sidecars,
    tables, reports, mask copies)."""
    known = {output_file(k) for k in BIDS_FILES}
    known |= {sidecar_of(n) for n in known if n.endswith(".nii.gz")}
    return name in known or bool(re.fullmatch(r"mask-[A-Za-z0-9._-]+\.(nii\.gz|json)", name))


def analyze_output_names(roi_names=(), prefix: str | None = None) -> set[str]:
    """Every file name an analyze run with ROIs ``roi_names`` may write into its folder (which of them
    it writes depends on the options and the data: ftb only with ROIs, k2 only with leakage, ...)."""
    names = {output_file(k, prefix) for k in BIDS_FILES} | set(roi_mask_files(list(roi_names), prefix).values())
    return names | {sidecar_of(n) for n in names if n.endswith(".nii.gz")}


def sidecar_of(name: str) -> str:
    """JSON sidecar file name of a NIfTI output file name."""
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".json"
    return name + ".json"


def roi_mask_files(names, prefix: str | None = None) -> dict[str, str]:
    """ROI name -> file name of its mask's copy: plain ``mask-<name>.nii.gz`` with characters outside
    [A-Za-z0-9._-] replaced by '_'; BIDS ``<prefix>_label-<alphanumeric name>_mask.nii.gz``. Numbered
    where two names collide."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        if prefix:
            base = f"{prefix}_label-{re.sub(r'[^A-Za-z0-9]', '', name) or 'roi'}"
            end = "_mask.nii.gz"
        else:
            base = "mask-" + (re.sub(r"[^A-Za-z0-9._-]", "_", name) or "roi")
            end = ".nii.gz"
        stem_, k = base, 2
        while stem_ in used:
            stem_, k = f"{base}{k}" if prefix else f"{base}-{k}", k + 1
        used.add(stem_)
        out[name] = stem_ + end
    return out


def find_report(path: Path) -> Path:
    """The report of one analysis: ``path`` itself when it is a report file (``report.json`` or a
    BIDS-named ``*_report.json``: a BIDS folder ``sub-01/ses-1/perf/`` holds one per run), else the
    report.json of folder ``path`` or its one ``*_report.json``. InputError otherwise; for a folder
    holding several analyses, one line listing their reports so the user can give one of them."""
    path = Path(path)
    if path.is_file():
        if path.name == "report.json" or path.name.endswith("_report.json"):
            return path
        raise InputError(f"{path}: not a report; give a folder written by 'perfusion analyze' or its "
                         "report.json (*_report.json)")
    plain = path / "report.json"
    if plain.is_file():
        return plain
    named = sorted(p for p in path.glob("*_report.json") if p.is_file() and not p.name.startswith("."))
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise InputError(f"{path}: holds {len(named)} analyses ({', '.join(p.name for p in named)}); give the "
                         f"report file of one, e.g. {path / named[0].name}")
    raise InputError(f"{plain}: not found; give a folder written by 'perfusion analyze' or its report.json")


def analysis_of(path: Path) -> tuple[Path, Path]:
    """(folder, report file) of one analysis given as its folder or as its report file (find_report):
    the outputs lie beside the report, named in its "files"."""
    report = find_report(path)
    return report.parent, report


def output_path(folder: Path, report: dict, key: str) -> Path:
    """Path of output ``key`` in ``folder`` by report.json "files", or its plain name (older reports)."""
    files = report.get("files")
    if not isinstance(files, dict):
        files = {}
    name = files.get(key) or output_file(key)
    return Path(folder) / Path(str(name)).name
