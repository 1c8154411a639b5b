"""Writing a Result: maps with JSON sidecars, masks, aif.tsv, curves.tsv, motion.tsv, the registered
anatomical image and report.json, into a (staging) folder. Plain names, or with a BIDS ``prefix`` BIDS
derivative names (io.output_file); report.json "files" lists them.

Beside the stages, not above them: the pipeline computes a Result and writes nothing; this module
imports the pipeline's types for type checking only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    from perfusion.io import Series
    from perfusion.pipeline import Inputs, Result

#: Each map's units and description (its JSON sidecar).
MAP_UNITS = {
    "cbv": ("mL/100 g", "Cerebral blood volume: kH/rho * area(tissue delta R2*) / area(AIF) * 100"),
    "cbf": ("mL/100 g/min", "Cerebral blood flow: kH/rho * max of the deconvolved residue F*R(t) * 6000"),
    "mtt": ("s", "Mean transit time: CBV / CBF (central volume theorem)"),
    "ttp": ("s", "Time to peak of delta R2*(t), from the first frame"),
    "tmax": ("s", "Time of the maximum of the deconvolved residue F*R(t)"),
    "rcbv": ("ratio", "Relative CBV: CBV / median CBV of the reference tissue"),
    "srcbv": ("standardized units", "Standardised rCBV (Bedekar 2010, no reference tissue): the brain's CBV "
                                    "percentiles 1, 50 and 99.8 mapped piecewise linearly onto 0, 1000 and 4095"),
    # the gamma-variate maps: in the Result, and so written, only with --gamma-maps (Config.gamma_maps)
    "gv_cbv": ("mL/100 g", "First-pass CBV: kH/rho * fitted gamma-variate area of the tissue / of the AIF * 100"),
    "gv_peak": ("1/s", "Peak delta R2* of the fitted gamma variate"),
    "gv_ttp": ("s", "Time to peak of the fitted gamma variate, from the first frame"),
    "gv_fwhm": ("s", "Full width at half maximum of the fitted gamma variate"),
    "gv_quality": ("ratio",
                   "Gamma-variate fit quality: RMS residual in the fit window / fitted peak (NaN: fit failed)"),
    "ftb": ("label", "Fractional tumour burden class inside the ROIs: 1 rCBV < low, 2 between, 3 > high, 0 outside"),
    "k2": ("1/s",
           "Leakage rate K2 of the leakage correction (> 0 T1-dominant, < 0 T2*-dominant); NaN where not fitted"),
    "cbv_uncorrected": ("mL/100 g", "CBV before leakage correction (area ratio of the measured curve)"),
}

#: With the model fit (--method model), the descriptions that differ from MAP_UNITS's.
MODEL_DESCRIPTIONS = {
    "mtt": ("Mean transit time: fitted MTT of the gamma transit-time-distribution residue (model fit; "
            "CBV / CBF where the fit fell back to oSVD, report.json fit; elsewhere CBF x MTT / 60 "
            "differs from cbv.nii.gz, which is the trapezoid area ratio: see README)"),
    "tmax": ("Time of the residue maximum: the fitted tissue delay (model fit; where the least-squares "
             "delay is below -1 s, the delay of the fit with the priors; oSVD's where the fit fell "
             "back, report.json fit)"),
    "cbf": ("Cerebral blood flow: kH/rho * fitted flow F of the gamma transit-time-distribution residue "
            "model (Mouridsen et al. 2006, NeuroImage 33:570) * 6000"),
}

#: Sidecar entry of the time column of aif.tsv and curves.tsv.
TIME_COLUMN = ("s", "Time from the start of the series (frames before the steady state dropped)")


class _Outputs:
    """The staging ``folder`` being written and ``files`` (output key -> file name, report.json
    "files"), in the order written; ``roi_files``: ROI name -> its mask copy's file name."""

    def __init__(self, folder: Path, prefix: str | None, affine: np.ndarray, roi_files: dict[str, str],
                 sources: list[str] | None = None):
        self.folder, self.prefix, self.affine, self.roi_files = folder, prefix, affine, roi_files
        self.files: dict[str, str] = {}
        # BIDS "Sources" of every sidecar (BIDS URIs of the input files); RawSources is deprecated
        # (BIDS 1.9) in favour of Sources, so it is not written
        self.extra = {"Sources": list(sources)} if sources is not None else None

    def name(self, key: str) -> str:
        """Record and return the file name of output ``key`` (an ROI mask copy: "roi:<name>")."""
        from perfusion.io import output_file

        self.files[key] = output_file(key, self.prefix) if not key.startswith("roi:") else self.roi_files[key[4:]]
        return self.files[key]

    def map(self, key: str, data: np.ndarray, **kwargs) -> None:
        """io.write_map of output ``key`` on the series' grid."""
        from perfusion.io import write_map

        write_map(self.folder, self.name(key), data, self.affine, extra=self.extra, **kwargs)


def write_result(result: Result, inputs: Inputs, folder: Path, *, prefix: str | None = None,
                 label: str | None = None, scan_date: str | None = None,
                 sources: list[str] | None = None) -> dict[str, str]:
    """Write maps with sidecars, masks, aif.tsv, curves, motion.tsv and report.json into ``folder`` (a staging
    folder), named plainly or, with a BIDS ``prefix``, as BIDS derivatives (io.output_file; the FTB
    classes then also get their ``dseg.tsv`` lookup table); report.json "files" lists them, "case" the
    user's ``label`` and ``scan_date`` (build.build_report). ``sources``: the BIDS URIs of the input
    files (batch), written as ``Sources`` into every map's sidecar. Returns that mapping (key -> file name)."""
    from perfusion.io import Redactor, public_name, roi_mask_files, write_json
    from perfusion.report import build as report

    # no output carries an input's path or folder (folders are often named after the patient): the
    # sources, warnings and reasons quoting one get its file name; report.json does the same
    result = Redactor(report.input_paths(inputs).values())(result)
    out = _Outputs(folder, prefix, inputs.series.affine, roi_mask_files(inputs.rois, prefix), sources)
    _write_maps(out, result, inputs.series)
    if prefix and "ftb" in result.maps:
        _write_ftb_lookup(out)
    _write_masks(out, result, inputs)
    _write_tables(out, result)
    if result.baseline_image is not None:
        out.map("baseline", result.baseline_image, units="a.u.",
                description="Mean signal of the baseline frames (background image for figures)")
    if result.anat is not None:
        out.files.update(write_anat(folder, result.anat, public_name(inputs.paths["anat"]), prefix=prefix,
                                    extra=out.extra))
    if result.motion is not None and result.motion.timeseries is not None:
        _write_motion(out, result.motion.timeseries)
    rep = report.build_report(result, inputs, files=out.files, roi_files=out.roi_files, prefix=prefix,
                              label=label, scan_date=scan_date)
    write_json(folder / out.files["report"], rep)
    return out.files


def _write_maps(out: _Outputs, result: Result, s: Series) -> None:
    """Every map of MAP_UNITS the result holds (ftb only with ROIs), its sidecar naming the parameters."""
    cfg = result.config
    params = {"method": cfg.method,
              **{k: v for k, v in cfg.as_dict().items() if k in ("threshold", "oi_target", "kh", "rho")},
              "te_s": s.te, "tr_s": s.tr, "aif": result.aif.source, "leakage": cfg.leakage}
    for name, (unit, desc) in MAP_UNITS.items():
        if name not in result.maps:
            continue
        if cfg.method == "model":
            desc = MODEL_DESCRIPTIONS.get(name, desc)
        p = dict(params)
        if name in ("rcbv", "ftb"):
            p["reference"] = result.reference.source
            p["reference_cbv_median"] = result.reference.cbv_median
        if name == "ftb":
            p["rcbv_low"], p["rcbv_high"] = cfg.rcbv_low, cfg.rcbv_high
        if name == "srcbv" and result.reference.standardized is not None:  # made with the srcbv map
            p["landmarks"] = result.reference.standardized.landmarks
        out.map(name, result.maps[name], units=unit, description=desc, parameters=p,
                dtype=np.uint8 if name == "ftb" else np.float32)


#: The FTB classes as a BIDS discrete segmentation's lookup table (index, name): the values of the ftb map
#: (0, outside the ROIs, is the background and not listed, as BIDS allows).
FTB_CLASSES = ((1, "low"), (2, "mid"), (3, "high"))


def _write_ftb_lookup(out: _Outputs) -> None:
    """``<prefix>_desc-ftb_dseg.tsv`` beside the FTB map: BIDS common derivatives' segmentation lookup table."""
    from perfusion.io import atomic_write

    text = "index\tname\n" + "".join(f"{i}\t{n}\n" for i, n in FTB_CLASSES)
    atomic_write(out.folder / out.name("ftb_dseg"), text, fix=None)


def _write_masks(out: _Outputs, result: Result, inputs: Inputs) -> None:
    """The brain, AIF and reference masks, and a copy of each ROI (so the folder alone rebuilds its
    report and compares)."""
    from perfusion.io import public_name

    out.map("brain_mask", result.brain.astype(np.uint8), units="mask", description="Brain mask used for the analysis",
            dtype=np.uint8)
    out.map("aif_mask", result.aif_mask.astype(np.uint8), units="mask",
            description=f"Arterial voxels of the AIF ({result.aif.source})", dtype=np.uint8)
    out.map("reference_mask", result.reference_mask.astype(np.uint8), units="mask",
            description=f"Reference tissue for rCBV ({result.reference.source})", dtype=np.uint8)
    for name, m in inputs.rois.items():
        given = inputs.paths.get(f"roi:{name}")
        out.map(f"roi:{name}", np.asarray(m).astype(np.uint8), units="mask",
                description=f"ROI {name} as given to analyze (copy of {public_name(given) if given else name})",
                dtype=np.uint8)


def _write_tables(out: _Outputs, result: Result) -> None:
    """aif.tsv and curves.tsv with their sidecars; also names report.json and report.html."""
    from perfusion.io import write_tsv, write_tsv_sidecar

    for key in ("aif", "aif_json", "curves", "curves_json", "report", "report_html"):
        out.name(key)
    files, folder = out.files, out.folder
    write_tsv(folder / files["aif"], {"time_s": result.time_s, "delta_r2s": result.aif_curve})
    write_tsv_sidecar(folder / files["aif_json"], {
        "time_s": TIME_COLUMN,
        "delta_r2s": ("1/s", f"Arterial input function: mean delta R2* of the AIF voxels ({result.aif.source})")},
        extra=out.extra)
    write_tsv(folder / files["curves"], {"time_s": result.time_s, "aif": result.aif_curve, **result.curves})
    curve_cols = {"time_s": TIME_COLUMN, "aif": ("1/s", "Mean delta R2* of the AIF voxels")}
    for name in result.curves:
        region = name.removesuffix("_uncorrected")
        region = "the reference tissue" if region == "reference" else f"ROI {region}"
        curve_cols[name] = ("1/s", f"Mean delta R2* of {region}"
                            + (", before leakage correction" if name.endswith("_uncorrected") else ""))
    write_tsv_sidecar(folder / files["curves_json"], curve_cols, extra=out.extra)


def _write_motion(out: _Outputs, timeseries: dict[str, np.ndarray]) -> None:
    """motion.tsv (the head motion per frame: Motion.timeseries, units in the column names) and its sidecar."""
    from perfusion.io import write_tsv, write_tsv_sidecar
    from perfusion.quantify.motion import TIMESERIES_COLUMNS

    write_tsv(out.folder / out.name("motion"), timeseries)
    write_tsv_sidecar(out.folder / out.name("motion_json"), {k: v for k, v in TIMESERIES_COLUMNS.items()
                                                             if k in timeseries}, extra=out.extra)


def write_anat(folder: Path, anat, source, *, prefix: str | None = None, extra: dict | None = None) -> dict[str, str]:
    """The registered T1 (+ sidecar, with ``extra``'s fields) and its transform, of a
    register.AnatBackground, into ``folder``; returns the "files" entries written."""
    from perfusion.io import output_file, write_map
    from perfusion.quantify.register import write_transform
    from perfusion.report.build import anat_entry

    files = {"anat": output_file("anat", prefix), "anat_xfm": output_file("anat_xfm", prefix)}
    write_map(folder, files["anat"], anat.data, anat.affine, units="a.u.",
              description=f"Anatomical image (--anat) registered rigidly to the DSC baseline, resampled on the "
                          f"DSC slices at {anat.zoom}x the in-plane resolution (background for figures)",
              parameters=anat_entry(anat, source, prefix=prefix), extra=extra)
    write_transform(folder / files["anat_xfm"], anat.transform)
    return files
