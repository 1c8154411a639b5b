"""``perfusion dicom-inspect``: the series of a DICOM folder, their timing and the checks an analysis
runs, from the headers only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.cli.options import Quiet


def dicom_inspect(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder of DICOM files (sub-folders searched).")],
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the description as JSON here.")] = None,
    quiet: Quiet = False,
) -> None:
    """List the series of a DICOM folder: frames, slices, frame ordering, frame intervals (s) against the TR,
    and the checks an analysis runs (slice counts, per-frame rescaling, timing). Headers only."""
    run_dicom_inspect(folder=folder, json_path=json_path, quiet=quiet)


def run_dicom_inspect(*, folder: Path, json_path: Path | None = None, quiet: bool = False) -> dict:
    """Describe every series of a DICOM folder (frames, slices, ordering, frame intervals, checks); print
    a table and write the JSON atomically. Returns the JSON's content. Headers only; no identifier."""
    from perfusion.io import MIN_FRAMES, atomic_write, dumps_json
    from perfusion.io.dicom import inspect

    folder = Path(folder)
    infos = inspect(folder)
    dsc = [i.number for i in infos if i.is_dsc]
    # no "folder": a DICOM folder is often named after the patient (privacy, issue 17)
    data = {"dsc_series": dsc[0] if len(dsc) == 1 else None,
            "dsc_rule": f"a series with at least {MIN_FRAMES} frames; with several, choose one with --series N",
            "units": {"time": "s"}, "series": [i.as_dict() for i in infos]}
    if json_path is not None:
        json_path = Path(json_path)
        atomic_write(json_path, dumps_json(data, indent=1) + "\n", fix="choose another --json path")
    if not quiet:
        print_dicom_inspect(data, json_path, folder)
    return data


#: The table's columns; below WIDE_TABLE columns of terminal each series is one line instead.
INSPECT_COLUMNS = ("series", "files", "frames", "slices", "matrix", "TE", "TR", "frame order", "interval (range)",
                   "checks")
WIDE_TABLE = 110


def print_dicom_inspect(data: dict, json_path: Path | None, folder: Path) -> None:
    from perfusion.cli.console import console
    from perfusion.cli.console import table as new_table

    con = console()

    def num(x):
        return "-" if x is None else f"{x:.4g}"

    def count(n, what):
        return f"{n} {what}{'s' if n > 1 else ''}"

    def te(s):
        return ", ".join(num(e["echo_time_s"]) for e in s["echoes"]) if s.get("echoes") else num(s["echo_time_s"])

    rows = []
    for s in data["series"]:
        checks = (count(len(s["errors"]), "error") if s["errors"] else
                  count(len(s["warnings"]), "warning") if s["warnings"] else "ok")
        interval = ("-" if s["interval_median_s"] is None else
                    f"{num(s['interval_median_s'])} ({num(s['interval_min_s'])}-{num(s['interval_max_s'])})")
        rows.append((str(s["series_number"]), str(s["n_files"]), str(s["frames"]), str(s["slices_per_frame"]),
                     f"{s['matrix'][0]}x{s['matrix'][1]}", te(s), num(s["repetition_time_s"]),
                     s["ordering_key"], interval, checks))
    title = f"DICOM series in {folder} (times in s)"
    if con.width >= WIDE_TABLE:
        table = new_table(title, *INSPECT_COLUMNS, numbers=("series", "files", "frames", "slices", "TR"))
        for row in rows:
            table.add_row(*row)
        con.print(table)
    else:  # ten columns in 80 would fold every header and the frame order mid-word: one line per series
        con.print(title, markup=False, soft_wrap=False)
        for row in rows:
            con.print("  series " + row[0] + ": " + "; ".join(f"{k} {v}" for k, v in zip(INSPECT_COLUMNS[1:], row[1:],
                                                                                       strict=True)),
                      markup=False, soft_wrap=False)
    for s in data["series"]:
        if s.get("echoes"):
            con.print(f"series {s['series_number']}: {len(s['echoes'])} echoes, TE "
                      + ", ".join(f"{num(e['echo_time_s'])} s (echo {e['echo']}, {e['n_files']} files)"
                                  for e in s["echoes"])
                      + ": analyze combines them (multi-echo delta R2*), convert writes one file per echo")
        if s["timing_source"]:
            con.print(f"series {s['series_number']}: frame intervals from {s['timing_source']}")
        for kind in ("errors", "warnings", "notes"):
            for text in s[kind]:
                con.print(f"series {s['series_number']}: {kind[:-1]}: {text}")
    if data["dsc_series"] is not None:
        errs = next(s["errors"] for s in data["series"] if s["series_number"] == data["dsc_series"])
        con.print(f"DSC series: {data['dsc_series']} (picked by 'perfusion analyze' and 'perfusion convert')"
                  + ("; its errors stop an analysis" if errs else ""))
    else:
        n = sum(1 for s in data["series"] if s["dsc_candidate"])
        con.print("No DSC series (none has enough frames)" if n == 0 else
                  f"{n} DSC-like series: choose one with --series N")
    if json_path is not None:
        con.print(f"JSON written to {json_path}")
