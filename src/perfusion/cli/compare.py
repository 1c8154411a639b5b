"""``perfusion compare``: two time points of one patient, per ROI the change of volume, rCBV and verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from perfusion.cli.options import Force, Quiet
from perfusion.errors import OutputError


def compare(
    prior: Annotated[Path, typer.Argument(
        help="Output folder of 'perfusion analyze' at the earlier time point (holds report.json).")],
    current: Annotated[Path, typer.Argument(
        help="Output folder of 'perfusion analyze' at the later time point; ROIs are matched by name.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output folder for compare.json, compare.html and prior_to_current.tfm (created; must "
                            "be empty unless --force).")],
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Compare two time points of one patient: per ROI the change of volume (mL), median rCBV (ratio), FTB and
    verdict, and the pattern (a growing lesion with falling rCBV is the pseudoprogression pattern). Registers
    the prior baseline to the current one (rigid) when their grids differ."""
    run_compare(prior=prior, current=current, out=out, force=force, quiet=quiet)


def run_compare(*, prior: Path, current: Path, out: Path, force: bool = False, quiet: bool = False) -> dict:
    """Compare two analyze output folders (prior, current) and write compare.json, compare.html and, when
    registered, prior_to_current.tfm into ``out``; return the content of compare.json."""
    from perfusion.followup.compare import compare_folders
    from perfusion.followup.page import write_comparison
    from perfusion.io import check_output_folder, output_lock, staged_output

    out = Path(out)
    check_output_folder(out, force=force)
    for folder in (prior, current):
        if Path(folder).is_dir() and out.resolve() == Path(folder).resolve():
            raise OutputError(f"{out}: is an input folder; choose a separate --out")
    with output_lock(out):  # one run at a time writes a folder (exit 5 for the second)
        comparison = compare_folders(Path(prior), Path(current))
        with staged_output(out, force=force) as stage:
            write_comparison(comparison, stage)
    if not quiet:
        print_comparison(comparison.data, out)
    return comparison.data


def print_comparison(data: dict, out: Path) -> None:
    from rich.table import Table

    from perfusion import DISCLAIMER
    from perfusion.cli.console import console
    from perfusion.verdicts import VERDICT_LABEL

    con = console()

    def num(x, fmt=".2f", signed=False):
        return "n/a" if x is None else format(x, ("+" if signed else "") + fmt)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:+.0f} %"

    reg = data["registration"]
    if reg["performed"]:
        con.print(f"Registration: prior registered to current "
                  f"(rotation {', '.join(f'{v:.1f}' for v in reg['rotation_deg'])} "
                  f"deg, translation {', '.join(f'{v:.1f}' for v in reg['translation_mm'])} mm)")
    else:
        con.print("Registration: none (same grid)")
    table = Table(title="Follow-up per ROI: prior -> current (relative change)")
    table.add_column("ROI", overflow="fold")
    for col in ("volume mL", "median rCBV", "verdict"):
        table.add_column(col, no_wrap=True)
    for r in data["rois"]:
        v, m, ver = r["volume_ml"], r["rcbv_median"], r["verdict"]
        table.add_row(r["name"],
                      f"{num(v['prior'])} -> {num(v['current'])} ({pct(v['relative_change'])}) {v['direction']}",
                      f"{num(m['prior'])} -> {num(m['current'])} ({pct(m['relative_change'])}) {m['direction']}",
                      f"{VERDICT_LABEL.get(ver['prior'], ver['prior'])} -> "
                      f"{VERDICT_LABEL.get(ver['current'], ver['current'])}")
    con.print(table)
    for r in data["rois"]:
        con.print(f"{r['name']}: {r['pattern_sentence']}")
        con.print(f"  prior median rCBV inside the current ROI {num(r['prior_rcbv_median_in_current_roi'])}; "
                  f"ROI overlap (Dice) {num(r['roi_overlap_dice'])}")
    um = data["unmatched_rois"]
    for label, names in (("prior", um["prior_only"]), ("current", um["current_only"])):
        if names:
            con.print(f"Only in the {label} analysis (not compared): {', '.join(names)}")
    for w in data["warnings"]:
        con.print(f"warning: {w}")
    con.print(f"compare.json and compare.html written to {out}")
    con.print(DISCLAIMER)
