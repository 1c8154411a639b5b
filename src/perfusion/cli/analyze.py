"""``perfusion analyze``: one case in, maps, report.json and report.html out, and its summary printed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from perfusion.cli.options import (
    Aif,
    AifSelection,
    AifVoxels,
    Anat,
    Bevacizumab,
    DicomSeries,
    Force,
    GammaMaps,
    Html,
    Leakage,
    LeakageGate,
    Mask,
    Method,
    MotionCorrect,
    OiTarget,
    Quiet,
    RcbvHigh,
    RcbvLow,
    Recirculation,
    Reference,
    Roi,
    Steroids,
    Te,
    Threshold,
    Tr,
    Vof,
    WeeksSinceRadiation,
    case_inputs,
    check_options,
)
from perfusion.errors import OutputError, UsageError

#: --label: a case label the user chooses (a study code, never a name: no identifier is read from the input).
Label = Annotated[Optional[str], typer.Option(
    help="Case label shown at the top of report.html and kept in report.json \"case\" (a study code such as "
         "'case 12, lesion follow-up'; never a patient name or ID).")]
#: --scan-date: the scan's date as the user gives it (report.json "case"; the DICOM date is never read).
ScanDate = Annotated[Optional[str], typer.Option(
    metavar="YYYY-MM-DD", help="Date of the scan, shown beside the label (report.html, report.json \"case\").")]
#: --dicom-export: OUT/dicom/ (io.dicom.export), the one output with the source's identifiers.
DicomExport = Annotated[bool, typer.Option(
    "--dicom-export", help="DICOM folder input: also write OUT/dicom/, the rCBV, CBV, CBF, MTT and Tmax maps as "
                           "DICOM Parametric Maps and the ROIs and reference as a DICOM Segmentation in the source "
                           "study, for PACS (they carry its patient and study data: the one output that does).")]


def analyze(
    dsc: Annotated[list[Path], typer.Argument(
        help="4-D DSC series (.nii or .nii.gz; TE/TR from its BIDS sidecar) or a folder of DICOM files; for a "
             "multi-echo run, one series per echo (any order; each with its sidecar's EchoTime).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created; must be empty unless --force).")],
    mask: Mask = None,
    aif: Aif = "auto",
    reference: Reference = None,
    roi: Roi = None,
    method: Method = "model",
    threshold: Threshold = None,
    oi_target: OiTarget = None,
    leakage: Leakage = "auto",
    leakage_gate: LeakageGate = "lesion",
    te: Te = None,
    tr: Tr = None,
    rcbv_low: RcbvLow = 1.0,
    rcbv_high: RcbvHigh = 1.75,
    aif_voxels: AifVoxels = 10,
    aif_selection: AifSelection = "cluster",
    vof: Vof = "guarded",
    recirculation: Recirculation = "keep",
    gamma_maps: GammaMaps = False,
    weeks_since_radiation: WeeksSinceRadiation = None,
    bevacizumab: Bevacizumab = False,
    steroids: Steroids = False,
    anat: Anat = None,
    motion_correct: MotionCorrect = "auto",
    force: Force = False,
    quiet: Quiet = False,
    dicom_series: DicomSeries = None,
    html: Html = True,
    label: Label = None,
    scan_date: ScanDate = None,
    dicom_export: DicomExport = False,
) -> None:
    """Turn a DSC series into CBV, CBF, MTT, TTP, Tmax and rCBV maps and score each lesion ROI."""
    values = dict(locals())  # every option by name, as the signature orders them
    check_options(values)
    check_scan_date(scan_date)
    if dicom_export:
        check_dicom_export(dsc, out)
    run_analyze(dsc=dsc[0] if len(dsc) == 1 else list(dsc), out=out, options=values, force=force, quiet=quiet,
                html=html, label=label, scan_date=scan_date, dicom_export=dicom_export)


def check_dicom_export(dsc: list[Path], out: Path) -> None:
    """Refuse (UsageError, exit 2) --dicom-export for several inputs, without highdicom, for a NIfTI input
    (it has no DICOM study to attach to) and for a DICOM folder inside OUT/dicom (the export replaces it)."""
    from perfusion.io.dicom.export import check_source_outside, import_highdicom

    if len(dsc) > 1:
        raise UsageError("--dicom-export: give the one DICOM folder of the series (its echoes included), not "
                         f"{len(dsc)} inputs")
    import_highdicom()  # before the analysis: without highdicom the export would fail at its end
    for p in dsc:
        check_source_outside(out, p)
        if Path(p).exists() and not Path(p).is_dir():
            raise UsageError(f"--dicom-export: {p} is a NIfTI series, which has no DICOM study (patient, Study "
                             "Instance UID, frame of reference) to attach the maps to; analyse the DICOM folder "
                             "itself, or leave out --dicom-export")


def check_scan_date(scan_date: str | None) -> None:
    """Refuse (UsageError, exit 2) a --scan-date that is not a calendar date written YYYY-MM-DD."""
    import datetime
    import re

    if scan_date is None:
        return
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", scan_date):
            raise ValueError
        datetime.date.fromisoformat(scan_date)
    except ValueError:
        raise UsageError(f"--scan-date {scan_date!r}: not a date; give it as YYYY-MM-DD (e.g. 2024-03-15)") from None


def run_analyze(*, dsc, out: Path, options: Mapping[str, Any], force: bool = False, quiet: bool = False,
                html: bool = True, label: str | None = None, scan_date: str | None = None,
                dicom_export: bool = False):
    """Analyse one case and write its outputs into ``out``; return the pipeline Result. ``dsc``: a NIfTI
    series, a DICOM folder or the echoes of one run (a list). ``options``: the analyze command's values
    by name (options.py): what the case loads (options.case_inputs; ``dicom_series``: a DICOM folder's
    SeriesNumber when it holds several) and the analysis Config (options.build_config). ``label`` and
    ``scan_date`` (YYYY-MM-DD): report.json "case". ``dicom_export``: also OUT/dicom/ from the DICOM folder
    ``dsc`` (io.dicom.export.export_dicom; staged with the other outputs). On a terminal, a progress bar on
    stderr names the stage (console.stage_progress)."""
    from perfusion.cli.console import stage_progress
    from perfusion.cli.options import build_config
    from perfusion.io import check_output_folder, is_analyze_output, output_lock, staged_output

    # the output checks and the lock come first, before the pipeline is imported (1.3 s here): a second
    # run into the same folder is turned away in the time the interpreter takes to start
    out, inputs = Path(out), case_inputs(options)
    check_output_folder(out, force=force)
    given = _input_files(dsc, inputs)
    _check_out_spares_inputs(out, dsc=dsc, given=given, rois=inputs["rois"])
    with output_lock(out):  # held until the outputs are in place: a second run into ``out`` fails at once
        check_output_folder(out, force=force)  # a run that held the lock before us may have filled it
        with stage_progress(ANALYZE_STAGES if html else ANALYZE_STAGES[:-1], quiet=quiet) as progress:
            progress.stage(ANALYZE_STAGES[0][0])
            from perfusion.case import compute_case
            from perfusion.report.outputs import write_result

            result, loaded = compute_case(build_config(options), dsc=dsc, **inputs,
                                          on_analysis=lambda: progress.stage(ANALYZE_STAGES[1][0]))
            progress.stage(ANALYZE_STAGES[2][0])
            with staged_output(out, force=force, stale=is_analyze_output, keep=given) as stage:
                write_result(result, loaded, stage, label=label, scan_date=scan_date)
                if dicom_export:
                    from perfusion.io.dicom.export import export_dicom

                    export_dicom(stage, Path(dsc), series=options.get("dicom_series"))
                if html:
                    progress.stage(ANALYZE_STAGES[3][0])
                    from perfusion.report.html import write_html

                    write_html(stage)
            if force and not dicom_export:
                _drop_earlier_export(out, dsc)
    if not quiet:
        print_summary(result, out, html=html, warnings=report_warnings(out))
        if dicom_export:
            from perfusion.cli.console import console

            console().print(f"DICOM export (identifiers of the source study) written to {out / 'dicom'}", markup=False)
    return result


def _drop_earlier_export(out: Path, dsc) -> None:
    """--force without --dicom-export: remove OUT/dicom when an earlier export wrote it (only export file
    names in it) and no input lies in it, as --force removes the other files an earlier run wrote: its
    objects describe the earlier maps and carry the patient's identifiers."""
    import shutil

    from perfusion.io.dicom.export import is_export_folder

    folder = out / "dicom"
    given = [dsc] if isinstance(dsc, (str, Path)) else list(dsc)  # one series, or one per echo
    inside = any(Path(p).resolve().is_relative_to(folder.resolve()) for p in given)
    if not inside and is_export_folder(folder):
        shutil.rmtree(folder)


#: analyze's stages for its progress bar: (name, rough share of a default analysis's time), for the bar
#: and the estimate of the time left. Measured here on the phantom case (64 x 64 x 5 x 80, warm): loading
#: 0.02-0.24 s, the analysis 0.8-1.4 s, the maps 0.03 s, report.html 1.0-1.1 s; on a clinical volume the
#: analysis takes several times longer and report.html about as long, hence the analysis's larger share.
#: The estimate is rich's (time so far / share done), corrected at every stage.
ANALYZE_STAGES = (("loading the series and masks", 0.1), ("analysing (deconvolution, leakage, ROIs)", 0.65),
                  ("writing maps and report.json", 0.05), ("writing report.html", 0.2))


def report_warnings(out: Path) -> list[str]:
    """report.json "warnings" of the folder just written (what the page and every reader see: the
    pipeline's, the loader's and the report's own quality checks), [] when it holds none."""
    import json

    from perfusion.io import find_report

    return list(json.loads(find_report(out).read_text(encoding="utf-8")).get("warnings") or [])


def _input_files(dsc, inputs: Mapping[str, Any]) -> list[Path]:
    """Every file an analyze run reads, as given (the series' BIDS sidecar included; a DICOM folder
    is itself). ``inputs``: options.case_inputs."""
    from perfusion.case import dsc_list
    from perfusion.io import sidecar_path_for

    files = []
    for p in dsc_list(dsc):
        files.append(p)
        if not p.is_dir():
            files.append(sidecar_path_for(p))
    files += [Path(p) for p in (inputs["mask"], inputs["reference"], inputs["anat"], *inputs["rois"]) if p is not None]
    files += [Path(p) for p in (inputs["aif"], inputs["vof"]) if p not in ("auto", "none", "guarded")]
    return files


def _check_out_spares_inputs(out: Path, *, dsc, given: list[Path], rois) -> None:
    """Before any work: ``out`` may not be the series' folder nor lie inside a DICOM input folder, and no
    input may sit in ``out`` under a name an output takes (it would be replaced; inputs there under
    other names are kept, never removed as an earlier run's outputs)."""
    from perfusion.case import dsc_list
    from perfusion.io import analyze_output_names, inputs_replaced_in, stem

    target = out.resolve()
    for one in dsc_list(dsc):
        if one.is_dir():
            folder = one.resolve()
            if target == folder or folder in target.parents:
                raise OutputError(f"{out}: lies inside the DICOM folder {one}; choose an output folder outside it")
        elif target in (one.resolve().parent, one.absolute().parent.resolve()):
            raise OutputError(f"{out}: is the folder of the input series; choose a separate --out")
    replaced = inputs_replaced_in(out, given, analyze_output_names([stem(p) for p in rois]))
    if replaced:
        raise UsageError(f"{replaced[0]}: is an input of this run and an output of the same name would replace it "
                         f"in {out}; move the input out of {out} or choose another --out")


def _rule_line(result) -> str:
    from perfusion.quantify.roi import verdict_rule

    return "Rule: " + verdict_rule(result.config.rcbv_low, result.config.rcbv_high,
                                   mixed_fraction=result.config.mixed_fraction)


def print_summary(result, out: Path, *, html: bool = True, warnings: list[str] | None = None) -> None:
    """The terminal summary of an analysis: AIF, reference, one table row and a paragraph per lesion,
    the rule, the warnings (``warnings``: report.json's; default the Result's), where the outputs are,
    and the disclaimer."""
    from perfusion import DISCLAIMER
    from perfusion.cli.console import console

    con = console()
    _print_aif_and_reference(con, result)
    if result.rois:
        _print_rois(con, result)
        con.print(_rule_line(result))
    else:
        con.print("No --roi given: maps only, no verdict.")
    warnings = result.warnings if warnings is None else warnings
    if warnings:
        con.print(f"Warnings ({len(warnings)}; also in report.json and report.html):")
    for w in warnings:
        con.print(f"warning: {w}", markup=False)
    con.print(f"Maps, report.json{' and report.html' if html else ''} written to {out}")
    con.print(DISCLAIMER)


def _print_aif_and_reference(con, result) -> None:
    from perfusion.units import MAP_UNITS

    aif, ref = result.aif, result.reference
    con.print(f"AIF: {aif.n_voxels} voxels ({aif.source}), peak {aif.peak_delta_r2s_per_s:.1f} 1/s at "
              f"{aif.peak_time_s:.1f} s, quality {aif.quality_score:.2f}")
    if aif.absolute_quantification is False:
        from perfusion.quantify.aif import NOT_QUANTITATIVE, RELATIVE_VALID

        con.print(f"AIF: {NOT_QUANTITATIVE} ({RELATIVE_VALID}):")
        for reason in aif.absolute_quantification_reasons:
            con.print(f"  - {reason}")
    side = {"both": "both hemispheres", "left": "patient's left", "right": "patient's right"}.get(ref.side, "")
    con.print(f"Reference: {ref.n_voxels} voxels{', ' + side if side else ''}, median CBV {ref.cbv_median:.2f} "
              f"{MAP_UNITS['cbv']} ({ref.source})")


def _lesion_widths(width: int, names: list[str], verdicts: list[str]) -> dict[str, int]:
    """Column widths of the lesion table for a terminal ``width`` columns wide (80 and up): the figures at
    their natural width where it fits, else the interval on two lines ("3.01 [2.92," / "3.11]"), the
    FTB figures on one ("100/0/0") and the verdict at its longest word; the ROI name takes the rest
    (folded, at least 10). The voxels and mL columns (6 and 4) and the borders (19) are fixed."""
    longest_word = max(len(w) for label in verdicts for w in label.split())
    wide = {"rcbv": len("median rCBV [95 % CI]"), "ftb": len("FTB % lo/mid/hi"),
            "verdict": min(max(map(len, verdicts)), 30)}
    narrow = {"rcbv": len("3.01 [2.92,"), "ftb": len("lo/mid/hi"), "verdict": max(longest_word, 10)}
    room = width - 19 - 6 - 4
    chosen = wide if room - sum(wide.values()) >= min(max(map(len, names)), 24) else narrow
    roi = min(max(map(len, names)), max(10, room - sum(chosen.values())))
    return {"roi": max(roi, 3), **chosen}


def _print_rois(con, result) -> None:
    """The lesions' table, then per lesion its verdict, figures and reasons."""
    from rich.table import Table

    from perfusion.verdicts import VERDICT_LABEL

    table = Table(title="Lesion ROIs (rCBV = CBV / reference median)")
    widths = _lesion_widths(con.width, [r.name for r in result.rois], [VERDICT_LABEL[r.verdict] for r in result.rois])
    # the ROI name folds (never cut: it names the mask file), the interval and the verdict wrap at spaces
    table.add_column("ROI", overflow="fold", width=widths["roi"])
    table.add_column("voxels", no_wrap=True, justify="right")
    table.add_column("mL", no_wrap=True, justify="right")
    table.add_column("median rCBV [95 % CI]", overflow="fold", width=widths["rcbv"])
    table.add_column("FTB % lo/mid/hi", overflow="fold", width=widths["ftb"])
    table.add_column("verdict", overflow="fold", width=widths["verdict"])
    for r in result.rois:
        table.add_row(r.name, str(r.n_voxels), f"{r.volume_ml:.2f}",
                      f"{r.rcbv_median:.2f} [{r.rcbv_ci_low:.2f}, {r.rcbv_ci_high:.2f}]",
                      f"{100 * r.ftb_low:.0f}/{100 * r.ftb_mid:.0f}/{100 * r.ftb_high:.0f}"
                      + (" mixed" if r.mixed else ""),
                      VERDICT_LABEL[r.verdict])
    con.print(table)
    for r in result.rois:
        con.print(f"{r.name}: {VERDICT_LABEL[r.verdict]} (median rCBV {r.rcbv_median:.2f}, 95 % interval "
                  f"{r.rcbv_ci_low:.2f}-{r.rcbv_ci_high:.2f}, PSR {r.psr_percent:.0f} %). {r.next_step}")
        std = result.reference.standardized.rois.get(r.name) if result.reference.standardized is not None else None
        if std is not None:
            con.print(f"  standardised CBV (Bedekar 2010; brain median = 1000): {std:.0f}")
        if r.rcbv_by_leakage:
            con.print("  rCBV by leakage correction: " + ", ".join(
                f"{m} {v['rcbv_median']:.2f}" for m, v in r.rcbv_by_leakage.items()))
        leak = (f"; K2 median {r.k2_median_per_s:.2g} 1/s, leakage correction changed CBV by "
                f"{r.leakage_cbv_change:+.0%}" if r.leakage_cbv_change == r.leakage_cbv_change else "")
        con.print(f"  rCBV mean {r.rcbv_mean:.2f}, p90 {r.rcbv_p90:.2f}; relative peak height "
                  f"{r.relative_peak_height:.2f}" + leak)
        for reason in r.reasons[0 if r.verdict == "not_assessable" else 1:]:
            con.print(f"  - {reason}")
