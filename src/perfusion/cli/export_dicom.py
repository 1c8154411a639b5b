"""``perfusion export-dicom``: a finished DICOM-folder analysis back into its study, as DICOM objects for PACS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from perfusion.cli.options import DicomSeries, Quiet

#: --dicom-export (analyze) and export-dicom: what they write, where identifiers go (the one place).
DICOM_EXPORT_HELP = (
    "Also write OUT/dicom/: the rCBV, CBV, CBF, MTT and Tmax maps as DICOM Parametric Maps and the ROIs and "
    "reference as a DICOM Segmentation, in the source study (they carry its patient and study data: the one "
    "output that does). DICOM folder input only.")


def export_dicom(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder of a finished 'perfusion analyze' of a DICOM "
                                        "folder (its report.json and maps).")],
    source: Annotated[Path, typer.Option("--source", help="The DICOM folder the analysis read, unchanged (its "
                                         "SHA-256 must equal report.json's).")],
    series: DicomSeries = None,
    quiet: Quiet = False,
) -> None:
    """Write OUT/dicom/ for a finished analysis of a DICOM folder: the maps as DICOM Parametric Maps and the
    ROIs and reference as a DICOM Segmentation, in the source study, for PACS. The objects carry the
    source's patient and study data: OUT/dicom/ is the one output that holds identifiers."""
    run_export_dicom(out=out, source=source, series=series, quiet=quiet)


def run_export_dicom(*, out: Path, source: Path, series: int | None = None, quiet: bool = False) -> list[Path]:
    """Export ``out``'s analysis (io.dicom.export.export_dicom) and print the files written (names relative
    to ``out``) and the disclaimer. Returns the files."""
    from perfusion import DISCLAIMER
    from perfusion.cli.console import console
    from perfusion.errors import InputError
    from perfusion.io.dicom.export import export_dicom as export

    out = Path(out)
    if not out.is_dir():
        raise InputError(f"{out}: analysis folder not found; give the --out folder of 'perfusion analyze'")
    written = export(out, Path(source), series=series)
    if not quiet:
        con = console()
        con.print(f"DICOM export ({len(written)} objects, identifiers of the source study) written to "
                  f"{out / 'dicom'}:", markup=False)
        for path in written:
            con.print(f"  {path.relative_to(out)}", markup=False)
        con.print(DISCLAIMER)
    return written
