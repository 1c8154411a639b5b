"""``perfusion report``: report.html of an analyze folder, written again or first, optionally over a
post-contrast T1 registered to the folder's baseline image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.cli.options import Quiet
from perfusion.errors import InputError, OutputError


def report(
    folder: Annotated[Path, typer.Argument(
        metavar="FOLDER", help="Output folder of 'perfusion analyze' (holds report.json), or one analysis' report "
                               "file (a BIDS folder holds one per run: sub-01_ses-1_run-1_report.json).")],
    anat: Annotated[Optional[Path], typer.Option(
        help="Post-contrast T1 (NIfTI, any grid): registered rigidly to the folder's baseline.nii.gz and "
             "used as the figures' background (writes anat.nii.gz and anat_to_dsc.tfm).")] = None,
    quiet: Quiet = False,
) -> None:
    """Write report.html (verdicts, maps, curves, quality checks; one self-contained file) into FOLDER."""
    run_report(folder=folder, anat=anat, quiet=quiet)


def run_report(*, folder: Path, anat: Path | None = None, quiet: bool = False) -> Path:
    """Write the report page of one analysis, given as its analyze output folder or as its report file
    (io.find_report: a folder holding several analyses is a one-line InputError listing them); return
    its path. With ``anat``, first register it to the analysis' baseline image (the anat image,
    transform and report.json "anat")."""
    from perfusion.io import read_json_object
    from perfusion.io.names import analysis_of

    given = Path(folder)
    if not given.exists():
        raise InputError(f"{given}: not found; give a folder written by 'perfusion analyze' or its report.json")
    folder, report_path = analysis_of(given)
    if anat is not None:
        report = read_json_object(report_path, what="report", fix="re-run 'perfusion analyze'")
        add_anat(folder, Path(anat), report, report_name=report_path.name)
    from perfusion.report.html import write_html

    path = write_html(report_path)  # reads only this analysis' files, by its report's "files"
    if not quiet:
        from perfusion.cli.console import console

        console().print(f"Report written to {path}")
    return path


def add_anat(folder: Path, anat: Path, report: dict, *, report_name: str | None = None) -> None:
    """Register ``anat`` to ``folder``/baseline.nii.gz and add anat.nii.gz (+ sidecar), anat_to_dsc.tfm
    and report.json "anat" to the folder, so that a failure leaves the folder as it was: the image files
    are written under their own names into a private folder (nibabel and SimpleITK choose the format by
    the extension), report.json whole beside its final name (io.atomic_write); only then are the image
    files renamed into place, and report.json, which names them, last."""
    import os
    import shutil
    import tempfile

    from perfusion.io import atomic_write, find_report, load_volume, output_path, sha256, sidecar_of, write_json
    from perfusion.quantify.register import anat_background
    from perfusion.report.build import anat_entry
    from perfusion.report.outputs import write_anat

    report_name = report_name or find_report(folder).name
    prefix = report_name[: -len("_report.json")] if report_name.endswith("_report.json") else None
    base_path = output_path(folder, report, "baseline")
    if not base_path.is_file():
        raise InputError(f"{base_path}: not found; re-run 'perfusion analyze' (it writes the baseline image)")
    baseline, affine = load_volume(base_path, what="baseline image")
    image = load_volume(anat, what="anatomical image (--anat)")
    bg = anat_background(baseline, affine, *image, path=anat)
    report = {**report, "anat": {**anat_entry(bg, anat, prefix=prefix), "sha256": sha256(anat)}}
    fix = "check free space and permissions"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".anat.", dir=folder))
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write ({exc.strerror or exc}); {fix}") from None
    try:
        files = write_anat(tmp, bg, anat, prefix=prefix)
        report["files"] = {**report.get("files", {}), **files}

        def land(report_tmp: Path) -> None:  # atomic_write renames report_tmp to report.json afterwards
            write_json(report_tmp, report)
            for name in (files["anat"], sidecar_of(files["anat"]), files["anat_xfm"]):
                os.replace(tmp / name, folder / name)

        atomic_write(folder / report_name, land, fix=fix)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write ({exc.strerror or exc}); {fix}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
