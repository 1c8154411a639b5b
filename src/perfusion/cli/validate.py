"""``perfusion validate``: the accuracy suite (phantom sweep, OSIPI DRO, Bezier DRO, leaky and realistic
phantoms) and its tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.cli.options import Quiet
from perfusion.errors import EXIT_TOLERANCE, InputError, UsageError


def validate(
    data: Annotated[Optional[Path], typer.Option(
        help="Reference-data folder holding bezier-dsc-dro/ (default: shared/reference-data or "
             "../shared/reference-data if present).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: all).")] = None,
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", help="Write rows, summary and the tolerance checks as JSON here (atomically).")
    ] = Path("validation.json"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="A smaller phantom (48 x 48) and one realistic seed, for a fast check: the phantom's "
                        "figures are not the README's table and are not judged; the OSIPI (and Bezier) rows "
                        "are.")] = False,
    tolerance_scale: Annotated[float, typer.Option(
        help="Multiply every stated tolerance by this (> 0; below 1 is stricter).")] = 1.0,
    quiet: Quiet = False,
) -> None:
    """Run the accuracy suite (phantom sweep, OSIPI DRO, Bezier DRO) and print CBV/CBF/MTT errors per method.

    Each method's median CBF and MTT error is judged against the README's Accuracy table plus a margin
    (3 points or a fifth of the figure, whichever is larger; tools/validate.py). Exit 3 when a method
    misses its tolerance (so CI can gate on it), 2 for a bad option, 4 for a missing --data folder.
    """
    if not (math.isfinite(tolerance_scale) and tolerance_scale > 0):
        raise UsageError(f"--tolerance-scale {tolerance_scale:g}: must be a finite number > 0")
    report = run_validate(data=data, methods=methods.split(",") if methods else None, json_path=json_path,
                          quick=quick, quiet=quiet, tolerance_scale=tolerance_scale)
    missed = [c for c in report["tolerances"]["checks"] if not c["ok"]]
    if missed:
        typer.echo(f"perfusion: error: validate: {len(missed)} figure(s) outside the stated tolerance: "
                   + "; ".join(_miss_text(c) for c in missed[:4]) + ("; ..." if len(missed) > 4 else "")
                   + f" (exit {EXIT_TOLERANCE})", err=True)
        raise typer.Exit(code=EXIT_TOLERANCE)


def _miss_text(check: dict) -> str:
    measured = check["median_abs_percent"]
    return (f"{check['method']} {check['dataset']} {check['group']} {check['quantity'].upper()} "
            f"{'not measured' if measured is None else f'{measured:.1f} %'} > {check['tolerance_percent']:.1f} %")


#: The stages of a run for the progress bar: (name, rough share of a run's time). Measured here with the
#: model alone: OSIPI 24 s (numba's first compilations in the process included), Bezier 86 s, the phantom
#: 1 s, the leaky phantom 5 s, the realistic phantom 9 s per seed; the other methods add mostly to Bezier.
#: Without Bezier data its stage is left out.
VALIDATE_STAGES = (("OSIPI DRO", 0.15), ("Bezier DRO", 0.6), ("phantom sweep", 0.03), ("leaky phantom", 0.05),
                   ("realistic phantom", 0.17))


def quick_note(summary: list[dict]) -> str:
    """What --quick prints: its phantom is not the README's, with the default method's CBF error on it
    beside the published one (the small phantom's blocks read far off: about 40 % here)."""
    from perfusion.tools.validate import PUBLISHED_PERCENT

    note = ("note: --quick runs a 48 x 48 phantom, not the README's accuracy table; its phantom rows are shown, "
            "not judged")
    row = next((e for e in summary if (e["dataset"], e["group"], e["method"]) == ("phantom", "undispersed", "model")
                and e["cbf"] is not None), None)
    if row is not None:
        note += (f": on it the default method (model) reads CBF {100 * row['cbf']['median_abs']:.0f} % off "
                 f"(the README's phantom: {PUBLISHED_PERCENT[('phantom', 'undispersed')]['model'][0]:g} %)")
    return note + ". Run without --quick (and with --data) for the published figures."


def run_validate(*, data: Path | None = None, methods: list[str] | None = None, json_path: Path | None = None,
                 quick: bool = False, quiet: bool = False, tolerance_scale: float = 1.0) -> dict:
    """Run the accuracy suite; judge it against the stated tolerances (report "tolerances"); print the
    tables; write the JSON (rows, summary, tolerances) atomically. Returns the report."""
    from perfusion.config import METHODS
    from perfusion.io import atomic_write, dumps_json
    from perfusion.tools import validate as tools

    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods {','.join(unknown)}: choose from {', '.join(METHODS)}")
    report = _measure(data, methods, quick=quick, quiet=quiet)
    judged = tools.QUICK_JUDGED if quick else None
    checks = tools.check_tolerances(report["summary"], datasets=judged, scale=tolerance_scale)
    report["tolerances"] = {
        "rule": f"median |error| <= (published + max({tools.TOLERANCE_MARGIN_POINTS:g} points, "
                f"{tools.TOLERANCE_MARGIN_FRACTION:g} x published)) x scale; published: README Accuracy table",
        "scale": tolerance_scale, "datasets_judged": list(judged) if judged else "all",
        "passed": all(c["ok"] for c in checks), "checks": checks}
    if json_path is not None:
        json_path = Path(json_path)
        atomic_write(json_path, dumps_json(report, indent=1) + "\n", fix="choose another --json path")
    if not quiet:
        print_validation(report["summary"], report["skipped"], json_path, report["leakage"], report["realistic"])
        _print_gate(checks, summary=report["summary"] if quick else None)
    return report


def _print_gate(checks: list[dict], *, summary: list[dict] | None) -> None:
    """The tolerance checks in one line; with --quick (``summary`` given) the note that its phantom is
    not the README's."""
    from perfusion.cli.console import console

    con = console()
    quick = summary is not None
    ok = sum(c["ok"] for c in checks)
    con.print(f"tolerances: {ok} of {len(checks)} figures within the stated tolerance (README Accuracy table + "
              "margin)" + (", OSIPI and Bezier rows only" if quick else ""))
    if summary is not None:
        con.print(quick_note(summary))


def _measure(data: Path | None, methods: list[str], *, quick: bool, quiet: bool = False) -> dict:
    """The suite's measurements as validation.json holds them: OSIPI, Bezier (when its data is found),
    the phantom sweep, their summary, the leaky and the realistic phantoms. A progress bar on a terminal."""
    from perfusion import __version__
    from perfusion.cli.console import stage_progress
    from perfusion.tools import validate

    ref = validate.find_reference_data(data)
    if data is not None and not Path(data).is_dir():
        raise InputError(f"{data}: reference data folder not found; pass --data DIR or leave it out")
    bezier = ref / "bezier-dsc-dro" if ref else None
    has_bezier = bezier is not None and (bezier / "ground_truth.json").is_file()
    stages = [s for s in VALIDATE_STAGES if has_bezier or s[0] != "Bezier DRO"]
    with stage_progress(stages, quiet=quiet) as progress:
        progress.stage("OSIPI DRO")
        rows = validate.validate_osipi(methods)
        skipped = []
        if bezier is not None and has_bezier:
            progress.stage("Bezier DRO")
            rows += validate.validate_bezier(bezier, methods)
        else:
            skipped.append("bezier (no bezier-dsc-dro folder; pass --data with the reference-data folder)")
        progress.stage("phantom sweep")
        spec = validate.PhantomSpec(matrix=48) if quick else validate.PhantomSpec()
        rows += validate.validate_phantom(methods, spec=spec)
        summary = validate.summarize(rows)
        progress.stage("leaky phantom")
        leak_rows = validate.validate_leakage(spec=validate.PhantomSpec(leaky_lesions=True))
        progress.stage("realistic phantom")
        realistic_rows = validate.validate_realistic(seeds=(0,) if quick else validate.REALISTIC_SEEDS)
    return {"software": {"name": "perfusion", "version": __version__}, "methods": methods,
            "reference_data": str(ref) if ref else None, "skipped": skipped,
            "error_definition": "estimate / truth - 1 against the nominal truth; median_abs and p90_abs of |error|, "
                                "bias the median signed error",
            "summary": summary,
            "leakage": leak_rows,
            "realistic": realistic_rows,
            "rows": [{"dataset": r.dataset, "group": r.group, "method": r.method, "item": r.item,
                      "truth": r.truth, "estimate": r.estimate} for r in rows]}


def print_validation(summary: list[dict], skipped: list[str], json_path: Path | None,
                     leak_rows: list[dict] | None = None, realistic_rows: list[dict] | None = None) -> None:
    from perfusion.cli.console import console
    from perfusion.cli.console import table as new_table

    con = console()

    def cell(e):
        if e is None:
            return "-"
        return f"{100 * e['median_abs']:.1f} / {100 * e['p90_abs']:.1f} ({100 * e['bias']:+.1f})"

    for dataset in dict.fromkeys(e["dataset"] for e in summary):
        table = new_table(f"{dataset}: |estimate / truth - 1| in %, median / 90th percentile (median bias)",
                          "subset", "method", "n", "CBV", "CBF", "MTT", numbers=("n",))
        for e in summary:
            if e["dataset"] == dataset:
                table.add_row(e["group"], e["method"], str(e["n"]), cell(e["cbv"]), cell(e["cbf"]), cell(e["mtt"]))
        con.print(table)
    if leak_rows:
        methods = [k for k in leak_rows[0] if isinstance(leak_rows[0][k], dict)]
        table = new_table("leakage (leaky phantom, true AIF, NAWM reference): median rCBV (verdict); x wrong",
                          "lesion", "Ktrans 1/min", "truth", *methods, numbers=("Ktrans 1/min", "truth", *methods))
        for r in leak_rows:
            cells = [f"{r[m]['rcbv_median']:.2f}" + ("" if r[m]["verdict"] == r["truth_verdict"] else " x")
                     for m in methods]
            table.add_row(r["lesion"], f"{r['ktrans_per_min']:g}", f"{r['truth_rcbv']:.2f}", *cells)
        con.print(table)
    if realistic_rows:
        print_realistic(con, realistic_rows)
    for s in skipped:
        con.print(f"skipped: {s}")
    if json_path is not None:
        con.print(f"JSON written to {json_path}")


def print_realistic(con, rows: list[dict]) -> None:
    """The realistic-phantom table: per protocol and lesion, at the lowest SNR and first seed, the truth,
    the analysis's rCBV with its interval and verdict, and the rCBV under each leakage correction; then
    the counts over every run."""
    from perfusion.cli.console import table as new_table
    from perfusion.quantify.roi import SENSITIVITY_METHODS

    snr, seed = min(r["snr"] for r in rows), min(r["seed"] for r in rows)
    shown = [r for r in rows if r["snr"] == snr and r["seed"] == seed]
    title = (f"realistic phantom (SNR {snr:g}, seed {seed}; automatic AIF, NAWM reference): median rCBV [95 % "
             "interval], verdict (x: not one a correct analysis may give)")
    wide = con.width >= 120  # below, the rCBV per leakage correction is a table of its own: 10 columns do not fit
    columns = ("protocol", "lesion", "truth", "rCBV [interval]", "verdict")
    table = new_table(title + ("; rCBV per leakage correction" if wide else ""), *columns,
                      *(SENSITIVITY_METHODS if wide else ()), numbers=("truth", *SENSITIVITY_METHODS))
    by_leakage = new_table(f"realistic phantom (SNR {snr:g}, seed {seed}): median rCBV per leakage correction",
                           "protocol", "lesion", *SENSITIVITY_METHODS, numbers=SENSITIVITY_METHODS)
    for r in shown:
        lo, hi = r["rcbv_ci"]
        per = [f"{r['rcbv_by_leakage'].get(k, float('nan')):.2f}" for k in SENSITIVITY_METHODS]
        table.add_row(r["protocol"], r["lesion"], f"{r['truth_rcbv']:.2f}",
                      f"{r['rcbv_median']:.2f} [{lo:.2f}, {hi:.2f}]",
                      r["verdict"] + ("" if r["verdict_ok"] else " x"), *(per if wide else ()))
        by_leakage.add_row(r["protocol"], r["lesion"], *per)
    con.print(table)
    if not wide:
        con.print(by_leakage)
    plain = [r for r in rows if r["lesion"] != "mixed"]
    con.print(f"realistic phantom, {len({(r['protocol'], r['snr'], r['seed']) for r in rows})} runs "
              f"(protocols x SNR {sorted({r['snr'] for r in rows})} x seeds {sorted({r['seed'] for r in rows})}): "
              f"verdicts right {sum(r['verdict_ok'] for r in rows)}/{len(rows)}; largest |rCBV error| "
              f"{100 * max(abs(r['rel_error']) for r in plain):.1f} % (lesions other than the mixed one)")
