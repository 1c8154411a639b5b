"""``perfusion validate``: the accuracy suite (phantom sweep, OSIPI DRO, Bezier DRO, leaky and realistic
phantoms) and its tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.errors import InputError, UsageError


def validate(
    data: Annotated[Optional[Path], typer.Option(
        help="Reference-data folder holding bezier-dsc-dro/ (default: shared/reference-data or "
             "../shared/reference-data if present).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: all).")] = None,
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", help="Write rows and summary as JSON here.")] = Path("validation.json"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller phantom (48 x 48) for a fast check.")] = False,
) -> None:
    """Run the accuracy suite (phantom sweep, OSIPI DRO, Bezier DRO) and print CBV/CBF/MTT errors per method."""
    run_validate(data=data, methods=methods.split(",") if methods else None, json_path=json_path, quick=quick)


def run_validate(*, data: Path | None = None, methods: list[str] | None = None, json_path: Path | None = None,
                 quick: bool = False, quiet: bool = False) -> dict:
    """Run the accuracy suite; print the table; write the JSON (rows and summary) atomically."""
    from perfusion.config import METHODS
    from perfusion.io import atomic_write, dumps_json

    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods {','.join(unknown)}: choose from {', '.join(METHODS)}")
    report = _measure(data, methods, quick=quick)
    if json_path is not None:
        json_path = Path(json_path)
        atomic_write(json_path, dumps_json(report, indent=1) + "\n", fix="choose another --json path")
    if not quiet:
        print_validation(report["summary"], report["skipped"], json_path, report["leakage"], report["realistic"])
    return report


def _measure(data: Path | None, methods: list[str], *, quick: bool) -> dict:
    """The suite's measurements as validation.json holds them: OSIPI, Bezier (when its data is found),
    the phantom sweep, their summary, the leaky and the realistic phantoms."""
    from perfusion import __version__
    from perfusion.tools import validate

    ref = validate.find_reference_data(data)
    if data is not None and not Path(data).is_dir():
        raise InputError(f"{data}: reference data folder not found; pass --data DIR or leave it out")
    rows = validate.validate_osipi(methods)
    skipped = []
    bezier = ref / "bezier-dsc-dro" if ref else None
    if bezier is not None and (bezier / "ground_truth.json").is_file():
        rows += validate.validate_bezier(bezier, methods)
    else:
        skipped.append("bezier (no bezier-dsc-dro folder; pass --data with the reference-data folder)")
    spec = validate.PhantomSpec(matrix=48) if quick else validate.PhantomSpec()
    rows += validate.validate_phantom(methods, spec=spec)
    summary = validate.summarize(rows)
    leak_rows = validate.validate_leakage(spec=validate.PhantomSpec(leaky_lesions=True))
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
    from rich.table import Table

    from perfusion.cli.console import console

    con = console()

    def cell(e):
        if e is None:
            return "-"
        return f"{100 * e['median_abs']:.1f} / {100 * e['p90_abs']:.1f} ({100 * e['bias']:+.1f})"

    for dataset in dict.fromkeys(e["dataset"] for e in summary):
        table = Table(title=f"{dataset}: |estimate / truth - 1| in %, median / 90th percentile (median bias)")
        for col in ("subset", "method", "n", "CBV", "CBF", "MTT"):
            table.add_column(col, no_wrap=True)
        for e in summary:
            if e["dataset"] == dataset:
                table.add_row(e["group"], e["method"], str(e["n"]), cell(e["cbv"]), cell(e["cbf"]), cell(e["mtt"]))
        con.print(table)
    if leak_rows:
        methods = [k for k in leak_rows[0] if isinstance(leak_rows[0][k], dict)]
        table = Table(title="leakage (leaky phantom, true AIF, NAWM reference): median rCBV (verdict); x wrong")
        for col in ("lesion", "Ktrans 1/min", "truth", *methods):
            table.add_column(col, no_wrap=True)
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
    from rich.table import Table

    from perfusion.quantify.roi import SENSITIVITY_METHODS

    snr, seed = min(r["snr"] for r in rows), min(r["seed"] for r in rows)
    table = Table(title=f"realistic phantom (SNR {snr:g}, seed {seed}; automatic AIF, NAWM reference): median rCBV "
                        "[95 % interval], verdict (x: not one a correct analysis may give); rCBV per leakage "
                        "correction")
    for col in ("protocol", "lesion", "truth", "rCBV [interval]", "verdict", *SENSITIVITY_METHODS):
        table.add_column(col, overflow="fold")  # cells fold rather than truncate in a 120-column log
    for r in rows:
        if r["snr"] != snr or r["seed"] != seed:
            continue
        lo, hi = r["rcbv_ci"]
        table.add_row(r["protocol"], r["lesion"], f"{r['truth_rcbv']:.2f}",
                      f"{r['rcbv_median']:.2f} [{lo:.2f}, {hi:.2f}]",
                      r["verdict"] + ("" if r["verdict_ok"] else " x"),
                      *[f"{r['rcbv_by_leakage'].get(k, float('nan')):.2f}" for k in SENSITIVITY_METHODS])
    con.print(table)
    plain = [r for r in rows if r["lesion"] != "mixed"]
    con.print(f"realistic phantom, {len({(r['protocol'], r['snr'], r['seed']) for r in rows})} runs "
              f"(protocols x SNR {sorted({r['snr'] for r in rows})} x seeds {sorted({r['seed'] for r in rows})}): "
              f"verdicts right {sum(r['verdict_ok'] for r in rows)}/{len(rows)}; largest |rCBV error| "
              f"{100 * max(abs(r['rel_error']) for r in plain):.1f} % (lesions other than the mixed one)")
