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
    different_patients_ok: Annotated[bool, typer.Option(
        "--different-patients-ok", help="Compare even when the two analyses carry different BIDS subject labels "
                                        "(refused otherwise, exit 4); the outputs still warn.")] = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Compare two time points of one patient: per ROI the change of volume (mL), median rCBV (ratio), FTB and
    verdict, and the pattern (a growing lesion with falling rCBV is the pseudoprogression pattern). Registers
    the prior baseline to the current one (rigid) when their grids differ, and checks that both show one
    patient (BIDS subject labels, anatomy) and one kind of reference."""
    run_compare(prior=prior, current=current, out=out, force=force, quiet=quiet,
                different_patients_ok=different_patients_ok)


def run_compare(*, prior: Path, current: Path, out: Path, force: bool = False, quiet: bool = False,
                different_patients_ok: bool = False) -> dict:
    """Compare two analyze output folders (prior, current) and write compare.json, compare.html and, when
    registered, prior_to_current.tfm into ``out``; return the content of compare.json. Two analyses with
    different BIDS subject labels are refused (InputError) unless ``different_patients_ok``."""
    from perfusion.followup.compare import compare_folders
    from perfusion.followup.page import write_comparison
    from perfusion.io import check_output_folder, output_lock, staged_output

    out = Path(out)
    check_output_folder(out, force=force)
    for folder in (prior, current):
        if Path(folder).is_dir() and out.resolve() == Path(folder).resolve():
            raise OutputError(f"{out}: is an input folder; choose a separate --out")
    with output_lock(out):  # one run at a time writes a folder (exit 5 for the second)
        comparison = compare_folders(Path(prior), Path(current), different_patients_ok=different_patients_ok)
        with staged_output(out, force=force) as stage:
            write_comparison(comparison, stage)
    if not quiet:
        print_comparison(comparison.data, out)
    return comparison.data


#: Least width of the terminal table's ROI column (characters): a long name folds onto more lines, never
#: below this; the measures' columns fold too, so at 80 columns no cell is cut to nothing.
ROI_MIN_WIDTH = 12

#: The change words of compare.json's directions as the terminal prints them.
DIRECTION_WORDS = {"no_overlap": "no overlap", "unknown": "n/a"}


def _num(x, fmt=".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.0f} %"


def _change_cell(measure: dict, unit: str = "") -> str:
    """'prior -> current unit' and, on its own line, 'relative change  direction'."""
    word = DIRECTION_WORDS.get(measure["direction"], measure["direction"])
    return (f"{_num(measure['prior'])} -> {_num(measure['current'])}{unit}\n"
            f"{_pct(measure['relative_change'])} {word}")


def comparison_table(data: dict):
    """The per-ROI table (rich): every column folds or wraps within its least width, so at 80 columns a
    long ROI name takes more lines instead of being cut, and the change words stay whole."""
    from rich.table import Table

    from perfusion.verdicts import VERDICT_WORDS

    table = Table(title="Follow-up per ROI: prior -> current", show_lines=True)
    table.add_column("ROI", overflow="fold", min_width=ROI_MIN_WIDTH, ratio=3)
    table.add_column("volume (mL)", overflow="fold", min_width=14, ratio=2)
    table.add_column("median rCBV", overflow="fold", min_width=14, ratio=2)
    table.add_column("verdict", overflow="fold", min_width=14, ratio=3)
    for r in data["rois"]:
        ver = r["verdict"]
        words = [VERDICT_WORDS.get(str(ver[k]), str(ver[k])) for k in ("prior", "current")]
        table.add_row(r["name"], _change_cell(r["volume_ml"], " mL"), _change_cell(r["rcbv_median"]),
                      f"{words[0]} -> {words[1]}")
    return table


def print_checks(data: dict, con) -> None:
    """The patient and reference checks, first and loud: a red panel when the folders may hold two
    patients, a yellow one when the references differ."""
    from rich.panel import Panel
    from rich.text import Text

    from perfusion.followup.page import banner_text

    patient = data["patient_check"]
    panels = []
    if patient["warning"]:
        panels.append((banner_text(patient["warning"]), "WARNING: DIFFERENT PATIENTS?", "bold red"))
    refs = data["reference_check"]
    if not refs["match"]:
        panels.append(("\n".join(banner_text(p) for p in refs["problems"]), "WARNING: REFERENCES DIFFER",
                       "bold yellow"))
    for text, title, style in panels:  # wrapped inside the panel (the console soft-wraps plain lines)
        con.print(Panel(Text(text), title=title, style=style), soft_wrap=False)


def print_comparison(data: dict, out: Path) -> None:
    """The comparison on the terminal: the checks, registration, the per-ROI table, the patterns and
    the warnings. Honours COLUMNS (the table is laid out for it; tested at 80 and 120)."""
    import os

    from perfusion import DISCLAIMER
    from perfusion.cli.console import console
    from perfusion.followup.page import check_summary

    con = console()
    if os.environ.get("COLUMNS", "").isdigit():
        con.width = int(os.environ["COLUMNS"])
    print_checks(data, con)
    con.print(f"Checks: {check_summary(data)}")
    reg = data["registration"]
    if reg["performed"]:
        con.print(f"Registration: prior registered to current "
                  f"(rotation {', '.join(f'{v:.1f}' for v in reg['rotation_deg'])} "
                  f"deg, translation {', '.join(f'{v:.1f}' for v in reg['translation_mm'])} mm)")
    else:
        con.print("Registration: none (same grid)")
    con.print(comparison_table(data))
    for r in data["rois"]:
        con.print(f"{r['name']}: {r['pattern_sentence']}")
        con.print(f"  prior median rCBV inside the current ROI {_num(r['prior_rcbv_median_in_current_roi'])}; "
                  f"ROI overlap (Dice) {_num(r['roi_overlap_dice'])}")
    um = data["unmatched_rois"]
    if um["current_only"]:
        con.print(f"Only in the current analysis (a new lesion, or a ROI named differently; not compared): "
                  f"{', '.join(um['current_only'])}")
    if um["prior_only"]:
        con.print(f"Only in the prior analysis (gone, not outlined again, or named differently; not compared): "
                  f"{', '.join(um['prior_only'])}")
    for w in data["warnings"]:
        con.print(f"warning: {w}")
    con.print(f"compare.json and compare.html written to {out}")
    con.print(DISCLAIMER)
