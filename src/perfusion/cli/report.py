"""``perfusion report``: report.html of an analyze folder, written again or first, optionally over a
post-contrast T1 registered to the folder's baseline image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.cli.options import Quiet
from perfusion.errors import InputError, OutputError


def report(
    folder: Annotated[Path, typer.Argument(help="Output folder of 'perfusion analyze' (holds report.json).")],
    anat: Annotated[Optional[Path], typer.Option(
        help="Post-contrast T1 (NIfTI, any grid): registered rigidly to the folder's baseline.nii.gz and "
             "used as the figures' background (writes anat.nii.gz and anat_to_dsc.tfm).")] = None,
    quiet: Quiet = False,
) -> None:
    """Write report.html (verdicts, maps, curves, quality checks; one self-contained file) into FOLDER."""
    run_report(folder=folder, anat=anat, quiet=quiet)


def run_report(*, folder: Path, anat: Path | None = None, quiet: bool = False) -> Path:
    """Write ``folder``/report.html from an analyze output folder; return its path. With ``anat``, first
    register it to the folder's baseline image (anat.nii.gz, anat_to_dsc.tfm, report.json "anat")."""
    from perfusion.report.html import load_report, write_html

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found; give a folder written by 'perfusion analyze'")
    if anat is not None:
        add_anat(folder, Path(anat), load_report(folder))
    path = write_html(folder)
    if not quiet:
        from perfusion.cli.console import console

        console().print(f"Report written to {path}")
    return path


def add_anat(folder: Path, anat: Path, report: dict) -> None:
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

    report_name = find_report(folder).name
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
