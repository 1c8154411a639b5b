"""report.json, built from a Result (its typed entries give their own parts: results.py). No numerics
here (report.html: html.py; writing the outputs: outputs.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from perfusion import DISCLAIMER, __version__
from perfusion.io import Redactor, public_name, sha256
from perfusion.quantify.roi import (
    CI_PERCENTILES,
    GATE_NEXT_STEP,
    HOTSPOT_PERCENTILE,
    MIXED_SOURCE,
    N_BOOTSTRAP,
    NEXT_STEP,
    PSEUDOPROGRESSION_SOURCE,
    PSEUDOPROGRESSION_WEEKS,
    THRESHOLD_SOURCE,
)
from perfusion.report.quality import all_warnings
from perfusion.verdicts import VERDICT_LABEL  # noqa: F401 - re-exported: the words of each verdict

if TYPE_CHECKING:
    from pathlib import Path

    from perfusion.pipeline import Inputs, Result


def build_report(result: Result, inputs: Inputs, *, files: dict[str, str] | None = None,
                 roi_files: dict[str, str] | None = None, prefix: str | None = None,
                 label: str | None = None, scan_date: str | None = None) -> dict:
    """report.json's content; ``files`` (output key -> file name) and ``roi_files`` (ROI name -> mask
    copy) come from outputs.write_result. ``label`` and ``scan_date`` are the case's label and scan date
    as the user gave them (never read from the input's metadata: a name or a date there may identify the
    patient); report.json "case" holds them, null when not given."""
    s = inputs.series
    redact = Redactor(input_paths(inputs).values())
    result = redact(result)
    cfg = result.config
    import datetime

    from perfusion.io import roi_mask_files

    roi_files = roi_files if roi_files is not None else roi_mask_files(inputs.rois, prefix)

    report = {
        "software": {"name": "perfusion", "version": __version__},
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
        "case": {"label": label, "scan_date": scan_date},
        "inputs": input_entries(inputs),
        "acquisition": {
            "te": s.te, "te_units": "s", "te_source": s.te_source,
            "tr": s.tr, "tr_units": "s", "tr_source": s.tr_source,
            "n_frames": s.n_frames,
            "n_frames_source": ("DICOM (dcm2niix, checked against the headers)" if s.path.is_dir()
                                else "NIfTI header dim[4]"),
            "shape": list(s.data.shape), "voxel_volume_ml": s.voxel_volume_ml,
            "flip_angle_deg": s.sidecar.get("FlipAngle"),
            "field_strength_t": s.sidecar.get("MagneticFieldStrength"),
            # multi-echo (echoes.py): each echo's TE and file, how delta R2* was formed; te is then TE_last - TE1
            "echoes": [e.as_dict() for e in s.echoes] or None,
            "echo_combination": s.echo_combination or "single echo",
        },
        "parameters": cfg.as_dict(),
        "baseline": result.baseline.as_dict(s.tr),
        "frames_repaired": list(result.frames_repaired),
        "brain": {"n_voxels": int(result.brain.sum()),
                  "source": public_name(inputs.paths["brain"]) if "brain" in inputs.paths
                  else (result.brain_source or "automatic")},
        "aif": result.aif.as_report(),
        **({"fit": dict(result.fit)} if result.fit else {}),
        "leakage": result.leakage.as_report(),
        "reference": result.reference.as_report(),
        "thresholds": {"rcbv_low": cfg.rcbv_low, "rcbv_high": cfg.rcbv_high, "source": THRESHOLD_SOURCE,
                       "mixed_fraction": cfg.mixed_fraction, "mixed_source": MIXED_SOURCE,
                       "hotspot_percentile": HOTSPOT_PERCENTILE, "ci_percentiles": list(CI_PERCENTILES),
                       "n_bootstrap": N_BOOTSTRAP, "leakage_plausible": list(cfg.leakage_plausible),
                       "pseudoprogression_weeks": PSEUDOPROGRESSION_WEEKS,
                       "pseudoprogression_source": PSEUDOPROGRESSION_SOURCE},
        "rois": [{**score.as_dict(), "mask_file": roi_files[score.name]} for score in result.rois],
        "next_steps": {**NEXT_STEP, "not_assessable_by_reason": GATE_NEXT_STEP},
        "units": {"cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "ttp": "s", "tmax": "s", "rcbv": "ratio",
                  "volume_ml": "mL", "time": "s", "ftb": "fraction", "k2": "1/s"},
        **({"anat": anat_entry(result.anat, public_name(inputs.paths["anat"]), prefix=prefix)}
           if result.anat is not None else {}),
        **({"motion": result.motion.as_report()} if result.motion is not None else {}),
        "files": {k: v for k, v in (files or {}).items() if not k.startswith("roi:")},
        "warnings": list(result.warnings),
        "seconds": result.seconds,
        "n_voxels_analysed": result.n_voxels,
        "timings_s": dict(result.timings),
    }
    # the quality panel's warnings too (report/quality.py): report.html, the terminal and this list agree
    return redact({**report, "warnings": all_warnings(report)})


def input_paths(inputs: Inputs) -> dict[str, Path]:
    """Every file (or DICOM folder) the case was read from, by role: the keys of ``inputs.paths``
    ("dsc", "brain", "aif", "reference", "vof", "roi:<name>", "anat") and "dsc_sidecar"."""
    paths = {k: p for k, p in inputs.paths.items() if p is not None}
    if inputs.series.sidecar_path is not None:
        paths["dsc_sidecar"] = inputs.series.sidecar_path
    return paths


def input_entries(inputs: Inputs) -> dict[str, dict[str, str]]:
    """report.json "inputs": per role, the file name (no folder: folders are often named after the
    patient) and the SHA-256 of the file's bytes (of a DICOM folder: io.sha256), which identifies the
    exact input without revealing where it was."""
    return {k: {"file": public_name(p), "sha256": sha256(p)} for k, p in input_paths(inputs).items()}


def anat_entry(anat, source, *, prefix: str | None = None) -> dict:
    """report.json "anat": where the registered T1 (a register.AnatBackground) came from and how."""
    from perfusion.io import output_file

    return {"source": str(source), "image": output_file("anat", prefix),
            "transform_file": output_file("anat_xfm", prefix), "zoom_in_plane": anat.zoom,
            "registration": anat.transform.as_dict()}
