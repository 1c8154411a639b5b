"""``perfusion convert``: the DSC series of a DICOM folder as a 4-D NIfTI and its BIDS sidecar."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.cli.options import Force, Quiet
from perfusion.errors import OutputError, UsageError

#: A file-name stem for ``convert --name``: BIDS-like entities, nothing that needs quoting.
_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"


def convert(
    dicom_dir: Annotated[Path, typer.Argument(
        metavar="DICOM_DIR", help="Folder of DICOM files from PACS or the scanner (sub-folders searched).")],
    out: Annotated[Path, typer.Argument(
        metavar="OUT", help="Output folder for <name>_dsc.nii.gz and <name>_dsc.json (created; must be empty unless "
                            "--force).")],
    series: Annotated[Optional[int], typer.Option(
        help="SeriesNumber of the DSC series when the folder holds several (see dicom-inspect).")] = None,
    name: Annotated[Optional[str], typer.Option(help="File-name stem, e.g. sub-01 (default series-<N>).")] = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Convert the DSC series of a DICOM folder (through dcm2niix) into a 4-D NIfTI and its BIDS sidecar
    (TE/TR in s; only non-identifying keys). Draw masks for a DICOM analysis on this NIfTI."""
    run_convert(dicom_dir=dicom_dir, out=out, series=series, name=name, force=force, quiet=quiet)


def run_convert(*, dicom_dir: Path, out: Path, series: int | None = None, name: str | None = None,
                force: bool = False, quiet: bool = False) -> dict:
    """Convert the DSC series of a DICOM folder into ``out``/<name>_dsc.nii.gz (float32 signal, a.u.,
    dcm2niix's grid, TR in the header in s) and <name>_dsc.json (the whitelisted sidecar, times in s),
    atomically; a multi-echo series as <name>_echo-<k>_dsc.nii.gz and .json per echo (TE order, BIDS
    names). Returns {"dsc": path, "sidecar": path, "warnings": [...], "echoes": [(nifti, sidecar), ...]}
    ("dsc" and "sidecar" of the first echo; "echoes" empty for one echo)."""
    import re

    from perfusion.io import check_output_folder, output_lock, staged_output, write_json, write_nifti
    from perfusion.io.dicom import read_dicom_echoes

    if name is not None and not re.fullmatch(_NAME_PATTERN, name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only (e.g. sub-01)")
    dicom_dir, out = Path(dicom_dir), Path(out)
    check_output_folder(out, force=force)
    if dicom_dir.is_dir() and (out.resolve() == dicom_dir.resolve() or dicom_dir.resolve() in out.resolve().parents):
        raise OutputError(f"{out}: lies inside the DICOM folder {dicom_dir}; choose an output folder outside it")
    with output_lock(out):  # one run at a time writes a folder (exit 5 for the second)
        convs = read_dicom_echoes(dicom_dir, series=series)
        info = convs[0].info
        stem_ = name or (f"series-{info.number}" if info.number is not None else "series")
        stems = [f"{stem_}_echo-{c.echo}" if c.echo else stem_ for c in convs]
        with staged_output(out, force=force) as stage:
            for c, st in zip(convs, stems, strict=True):
                write_nifti(stage / f"{st}_dsc.nii.gz", c.data, c.affine, tr=c.tr_s,
                            description=f"perfusion convert: DICOM series {info.number}"
                                        + (f" echo {c.echo}" if c.echo else ""))
                write_json(stage / f"{st}_dsc.json", c.sidecar)
    files = [(out / f"{st}_dsc.nii.gz", out / f"{st}_dsc.json") for st in stems]
    warns = [w for c in convs for w in c.warnings]
    paths = {"dsc": files[0][0], "sidecar": files[0][1], "warnings": warns, "echoes": files if len(files) > 1 else []}
    if not quiet:
        from perfusion.cli.console import console

        con = console()
        for c, (nii, side) in zip(convs, files, strict=True):
            con.print(f"{info.summary()}{f' echo {c.echo}' if c.echo else ''} converted to {nii} and {side.name} "
                      f"(TE {c.sidecar.get('EchoTime', 'unknown')} s, TR {c.tr_s} s from {c.tr_source})")
        if len(convs) > 1:
            con.print(f"{len(convs)} echoes: analyse them together with perfusion analyze "
                      + " ".join(nii.name for nii, _ in files))
        for w in warns:
            con.print(f"warning: {w}")
    return paths
