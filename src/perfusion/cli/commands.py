"""Plain functions behind the CLI commands: they take typed values, raise PerfusionError and print
only through ``rich`` when not quiet. Tests call them directly or through the CLI."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from perfusion.errors import InputError, OutputError, UsageError


def _console():
    import sys

    from rich.console import Console

    # rich wraps at 80 columns when stdout is not a terminal; logs read better unwrapped
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


# the case layer (case.py) is re-exported here for the commands and their tests
from perfusion.case import check_echo_options, compute_case, dsc_list, load_inputs, make_config, own_warnings  # noqa: E402,F401


def run_analyze(*, dsc: Path, out: Path, mask: Path | None = None, aif: str = "auto", reference: Path | None = None,
                rois: list[Path] = (), method: str = "model", threshold: float | None = None,
                oi_target: float | None = None, leakage: str = "auto", leakage_gate: str = "lesion",
                te: float | None = None,
                tr: float | None = None, rcbv_low: float = 1.0, rcbv_high: float = 1.75, aif_voxels: int = 10,
                aif_selection: str = "cluster", vof: str = "guarded", recirculation: str = "keep",
                weeks_since_radiation: float | None = None, anat: Path | None = None, force: bool = False,
                quiet: bool = False, dicom_series: int | None = None, motion_correct: str = "auto", html: bool = True,
                bevacizumab: bool = False, steroids: bool = False):
    """Analyse one case and write its outputs into ``out``; return the pipeline Result. ``dsc`` may be a
    DICOM folder (``dicom_series``: its SeriesNumber when it holds several DSC series)."""
    from perfusion.io import check_output_folder, is_analyze_output, output_lock, staged_output

    # the output checks and the lock come first, before the pipeline is imported (1.3 s here): a second
    # run into the same folder is turned away in the time the interpreter takes to start
    out = Path(out)
    check_output_folder(out, force=force)
    given = _input_files(dsc=dsc, mask=mask, aif=aif, reference=reference, rois=rois, vof=vof, anat=anat)
    _check_out_spares_inputs(out, dsc=dsc, given=given, rois=rois)
    with output_lock(out):  # held until the outputs are in place: a second run into ``out`` fails at once
        check_output_folder(out, force=force)  # a run that held the lock before us may have filled it
        from perfusion.report.outputs import write_result

        config = make_config(method=method, threshold=threshold, oi_target=oi_target, leakage=leakage,
                             leakage_gate=leakage_gate, rcbv_low=rcbv_low, rcbv_high=rcbv_high, aif_voxels=aif_voxels,
                             aif_selection=aif_selection, vof=vof, recirculation=recirculation,
                             weeks_since_radiation=weeks_since_radiation, motion_correct=motion_correct,
                             bevacizumab=bevacizumab, steroids=steroids)
        result, inputs = compute_case(config, dsc=dsc, mask=mask, aif=aif, reference=reference, rois=list(rois),
                                      te=te, tr=tr, vof=vof, anat=anat, dicom_series=dicom_series)
        with staged_output(out, force=force, stale=is_analyze_output, keep=given) as stage:
            write_result(result, inputs, stage)
            if html:
                from perfusion.report.html import write_html

                write_html(stage)
    if not quiet:
        print_summary(result, out, html=html)
    return result


def _input_files(*, dsc: Path, mask: Path | None, aif: str, reference: Path | None, rois, vof: str,
                 anat: Path | None) -> list[Path]:
    """Every file an analyze run reads, as given (the series' BIDS sidecar included; a DICOM folder
    is itself)."""
    from perfusion.io import sidecar_path_for

    files = []
    for p in dsc_list(dsc):
        files.append(p)
        if not p.is_dir():
            files.append(sidecar_path_for(p))
    files += [Path(p) for p in (mask, reference, anat, *rois) if p is not None]
    files += [Path(p) for p in (aif, vof) if p not in ("auto", "none", "guarded")]
    return files


def _check_out_spares_inputs(out: Path, *, dsc: Path, given: list[Path], rois) -> None:
    """Before any work: ``out`` may not be the series' folder nor lie inside a DICOM input folder, and no
    input may sit in ``out`` under a name an output takes (it would be replaced; inputs there under
    other names are kept, never removed as an earlier run's outputs)."""
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


def print_summary(result, out: Path, *, html: bool = True) -> None:
    from rich.table import Table

    from perfusion import DISCLAIMER
    from perfusion.report.build import VERDICT_LABEL

    con = _console()
    ref, aif = result.reference, result.aif
    con.print(f"AIF: {aif.n_voxels} voxels ({aif.source}), "
              f"peak {aif.peak_delta_r2s_per_s:.1f} 1/s at {aif.peak_time_s:.1f} s, "
              f"quality {aif.quality_score:.2f}")
    if aif.absolute_quantification is False:
        from perfusion.quantify.aif import NOT_QUANTITATIVE, RELATIVE_VALID

        con.print(f"AIF: {NOT_QUANTITATIVE} ({RELATIVE_VALID}):")
        for reason in aif.absolute_quantification_reasons:
            con.print(f"  - {reason}")
    side = {"both": "both hemispheres", "left": "patient's left", "right": "patient's right"}.get(ref.side, "")
    con.print(f"Reference: {ref.n_voxels} voxels{', ' + side if side else ''}, median CBV {ref.cbv_median:.2f} "
              f"mL/100 g ({ref.source})")
    if result.rois:
        table = Table(title="Lesion ROIs (rCBV = CBV / reference median)")
        for col in ("ROI", "voxels", "volume mL", "median rCBV [95 % CI]", "FTB low / mid / high", "verdict"):
            table.add_column(col, no_wrap=True)
        for r in result.rois:
            table.add_row(r.name, str(r.n_voxels), f"{r.volume_ml:.2f}",
                          f"{r.rcbv_median:.2f} [{r.rcbv_ci_low:.2f}, {r.rcbv_ci_high:.2f}]",
                          f"{r.ftb_low:.0%} / {r.ftb_mid:.0%} / {r.ftb_high:.0%}" + (" mixed" if r.mixed else ""),
                          VERDICT_LABEL[r.verdict])
        con.print(table)
        for r in result.rois:
            con.print(f"{r.name}: {VERDICT_LABEL[r.verdict]} (median rCBV {r.rcbv_median:.2f}, 95 % interval "
                      f"{r.rcbv_ci_low:.2f}-{r.rcbv_ci_high:.2f}, PSR {r.psr_percent:.0f} %). {r.next_step}")
            std = ref.standardized.rois.get(r.name) if ref.standardized is not None else None
            if std is not None:
                con.print(f"  standardised CBV (Bedekar 2010; brain median = 1000): {std:.0f}")
            if r.rcbv_by_leakage:
                con.print("  rCBV by leakage correction: " + ", ".join(
                    f"{m} {v['rcbv_median']:.2f}" for m, v in r.rcbv_by_leakage.items()))
            con.print(f"  rCBV mean {r.rcbv_mean:.2f}, p90 {r.rcbv_p90:.2f}; relative peak height {r.relative_peak_height:.2f}"
                      + (f"; K2 median {r.k2_median_per_s:.2g} 1/s, leakage correction changed CBV by {r.leakage_cbv_change:+.0%}"
                         if r.leakage_cbv_change == r.leakage_cbv_change else ""))
            for reason in r.reasons[0 if r.verdict == "not_assessable" else 1:]:
                con.print(f"  - {reason}")
        con.print(_rule_line(result))
    else:
        con.print("No --roi given: maps only, no verdict.")
    for w in result.warnings:
        con.print(f"warning: {w}")
    con.print(f"Maps, report.json{' and report.html' if html else ''} written to {out}")
    con.print(DISCLAIMER)


def echo_times_from_options(*, echoes: int | None, te_list: str | None, te: float | None,
                            realistic: bool) -> tuple[float, ...]:
    """The echo times (s, increasing) of ``phantom --echoes N`` / ``--te-list a,b,...``; () for one
    echo. UsageError (exit 2) naming the option: not --realistic, --te given too, a list that is not
    numbers, fewer than 2 or more than 8 echoes, a TE outside (0, 0.2] s (milliseconds named), TEs
    repeated, or --echoes that does not count the list."""
    import math

    from perfusion.quantify.echoes import MIN_ECHO_GAP_S
    from perfusion.tools.phantom_realistic import DEFAULT_ECHO_TIMES, MAX_ECHOES
    from perfusion.units import MAX_TE_S

    if te_list is None and (echoes is None or echoes == 1):
        return ()
    flag = "--te-list" if te_list is not None else "--echoes"
    if not realistic:
        raise UsageError(f"phantom: {flag} belongs to the --realistic head; add --realistic")
    if te is not None:
        raise UsageError(f"phantom: --te and {flag} do not fit together; give every echo time with --te-list")
    if te_list is None:
        lo, hi = DEFAULT_ECHO_TIMES
        return tuple(round(lo + (hi - lo) * i / (echoes - 1), 6) for i in range(echoes))
    try:
        tes = [float(x) for x in te_list.split(",")]
    except ValueError:
        raise UsageError(f"--te-list {te_list!r}: give echo times in s separated by commas, e.g. --te-list 0.008,0.030") from None
    if not 2 <= len(tes) <= MAX_ECHOES:
        raise UsageError(f"--te-list {te_list}: give 2 to {MAX_ECHOES} echo times (one echo: use --te)")
    for x in tes:
        if not (math.isfinite(x) and 0 < x <= MAX_TE_S):
            hint = (f"; this looks like milliseconds: give seconds (e.g. {x / 1000:g})"
                    if math.isfinite(x) and 0 < x / 1000 <= MAX_TE_S else "")
            raise UsageError(f"--te-list {te_list}: each echo time must be a finite number in (0, {MAX_TE_S:g}] s{hint}")
    tes = sorted(tes)
    if any(b - a < MIN_ECHO_GAP_S for a, b in zip(tes, tes[1:])):
        raise UsageError(f"--te-list {te_list}: echo times must differ by at least {MIN_ECHO_GAP_S * 1000:g} ms; give "
                         "each echo once")
    if echoes is not None and echoes != len(tes):
        raise UsageError(f"--echoes {echoes} and --te-list {te_list} ({len(tes)} echo times) do not fit together; "
                         "give one of them")
    return tuple(tes)


def run_phantom(*, out: Path, snr: float | None = None, seed: int = 0, tr: float = 1.5, te: float | None = None,
                frames: int | None = None, leaky_lesions: bool = False, force: bool = False, quiet: bool = False,
                realistic: bool = False, protocol: str = "flip60_no_preload",
                echo_times: tuple[float, ...] = ()) -> dict:
    """Write a phantom case: phantom.py's (defaults SNR 150, TE 0.025 s, 80 frames) or, ``realistic``,
    phantom_realistic.py's head (SNR 50, TE 0.03 s, 60 frames, ``protocol``; ``echo_times`` (s): one
    series per echo, keys ``echo-1``, ``echo-2``, ... instead of ``dsc``)."""
    from perfusion.io import staged_output

    snr = snr if snr is not None else (50.0 if realistic else 150.0)
    te = te if te is not None else (0.03 if realistic else 0.025)
    frames = frames if frames is not None else (60 if realistic else 80)
    if snr <= 0 or frames < 30 or tr <= 0 or te <= 0:
        raise UsageError("phantom: need --snr > 0, --frames >= 30, --tr > 0 and --te > 0")
    if realistic and leaky_lesions:
        raise UsageError("phantom: --leaky-lesions belongs to the first phantom; the --realistic head has its own lesions")
    try:
        if realistic:
            from perfusion.tools.phantom_realistic import RealisticSpec, make_realistic_phantom, write_realistic

            ph = make_realistic_phantom(RealisticSpec(protocol=protocol, snr=snr, seed=seed, tr=tr, te=te,
                                                      n_frames=frames, echo_times=tuple(echo_times)))
            writer = write_realistic
        else:
            from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

            ph = make_phantom(PhantomSpec(snr=snr, seed=seed, tr=tr, te=te, n_frames=frames,
                                          leaky_lesions=leaky_lesions))
            writer = write_phantom
    except ValueError as exc:
        raise UsageError(f"phantom: {exc}") from None
    with staged_output(Path(out), force=force) as stage:
        paths = writer(ph, stage)
    if not quiet:
        series = paths["dsc"].name if "dsc" in paths else ", ".join(v.name for k, v in paths.items() if k.startswith("echo-"))
        _console().print(f"Phantom written to {out} (series {series}, truth.json, masks, truth/)")
    return {k: Path(out) / v.relative_to(stage) for k, v in paths.items()}


def run_validate(*, data: Path | None = None, methods: list[str] | None = None, json_path: Path | None = None,
                 quick: bool = False, quiet: bool = False) -> dict:
    """Run the accuracy suite; print the table; write the JSON (rows and summary) atomically."""
    import os
    import tempfile

    from perfusion import __version__
    from perfusion.tools import validate
    from perfusion.io import dumps_json
    from perfusion.config import METHODS

    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods {','.join(unknown)}: choose from {', '.join(METHODS)}")
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
    report = {"software": {"name": "perfusion", "version": __version__}, "methods": methods,
              "reference_data": str(ref) if ref else None, "skipped": skipped,
              "error_definition": "estimate / truth - 1 against the nominal truth; median_abs and p90_abs of |error|, "
                                  "bias the median signed error",
              "summary": summary,
              "leakage": leak_rows,
              "realistic": realistic_rows,
              "rows": [{"dataset": r.dataset, "group": r.group, "method": r.method, "item": r.item,
                        "truth": r.truth, "estimate": r.estimate} for r in rows]}
    if json_path is not None:
        json_path = Path(json_path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{json_path.name}.", dir=json_path.parent if str(json_path.parent) else ".")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(dumps_json(report, indent=1) + "\n")
            os.replace(tmp, json_path)
        except OSError as exc:
            raise OutputError(f"{json_path}: cannot write ({exc.strerror}); choose another --json path") from None
    if not quiet:
        print_validation(summary, skipped, json_path, leak_rows, realistic_rows)
    return report


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
        _console().print(f"Report written to {path}")
    return path


def add_anat(folder: Path, anat: Path, report: dict) -> None:
    """Register ``anat`` to ``folder``/baseline.nii.gz and add anat.nii.gz (+ sidecar), anat_to_dsc.tfm
    and report.json "anat" to the folder. Files are written under temporary names and renamed, so a
    failure leaves the folder as it was."""
    import os
    import shutil
    import tempfile

    from perfusion.io import find_report, load_volume, output_path, sha256, sidecar_of, write_json
    from perfusion.report.outputs import write_anat
    from perfusion.report.build import anat_entry
    from perfusion.quantify.register import anat_background

    report_name = find_report(folder).name
    prefix = report_name[: -len("_report.json")] if report_name.endswith("_report.json") else None
    base_path = output_path(folder, report, "baseline")
    if not base_path.is_file():
        raise InputError(f"{base_path}: not found; re-run 'perfusion analyze' (it writes the baseline image)")
    baseline, affine = load_volume(base_path, what="baseline image")
    image = load_volume(anat, what="anatomical image (--anat)")
    bg = anat_background(baseline, affine, *image, path=anat)
    report = dict(report)
    report["anat"] = {**anat_entry(bg, anat, prefix=prefix), "sha256": sha256(anat)}
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".anat.", dir=folder))
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write ({exc.strerror or exc}); check free space and permissions") from None
    try:
        files = write_anat(tmp, bg, anat, prefix=prefix)
        report["files"] = {**report.get("files", {}), **files}
        write_json(tmp / report_name, report)
        for name in (files["anat"], sidecar_of(files["anat"]), files["anat_xfm"], report_name):  # report last
            os.replace(tmp / name, folder / name)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write ({exc.strerror or exc}); check free space and permissions") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_validation(summary: list[dict], skipped: list[str], json_path: Path | None,
                     leak_rows: list[dict] | None = None, realistic_rows: list[dict] | None = None) -> None:
    from rich.table import Table

    con = _console()

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
            cells = [f"{r[m]['rcbv_median']:.2f}" + ("" if r[m]["verdict"] == r["truth_verdict"] else " x") for m in methods]
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
                        "[95 % interval], verdict (x: not one a correct analysis may give); rCBV per leakage correction")
    for col in ("protocol", "lesion", "truth", "rCBV [interval]", "verdict", *SENSITIVITY_METHODS):
        table.add_column(col, overflow="fold")  # cells fold rather than truncate in a 120-column log
    for r in rows:
        if r["snr"] != snr or r["seed"] != seed:
            continue
        lo, hi = r["rcbv_ci"]
        table.add_row(r["protocol"], r["lesion"], f"{r['truth_rcbv']:.2f}", f"{r['rcbv_median']:.2f} [{lo:.2f}, {hi:.2f}]",
                      r["verdict"] + ("" if r["verdict_ok"] else " x"),
                      *[f"{r['rcbv_by_leakage'].get(k, float('nan')):.2f}" for k in SENSITIVITY_METHODS])
    con.print(table)
    plain = [r for r in rows if r["lesion"] != "mixed"]
    con.print(f"realistic phantom, {len({(r['protocol'], r['snr'], r['seed']) for r in rows})} runs "
              f"(protocols x SNR {sorted({r['snr'] for r in rows})} x seeds {sorted({r['seed'] for r in rows})}): "
              f"verdicts right {sum(r['verdict_ok'] for r in rows)}/{len(rows)}; largest |rCBV error| "
              f"{100 * max(abs(r['rel_error']) for r in plain):.1f} % (lesions other than the mixed one)")


def run_compare(*, prior: Path, current: Path, out: Path, force: bool = False, quiet: bool = False) -> dict:
    """Compare two analyze output folders (prior, current) and write compare.json, compare.html and, when
    registered, prior_to_current.tfm into ``out``; return the content of compare.json."""
    from perfusion.followup import compare_folders, write_comparison
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
    from perfusion.report.build import VERDICT_LABEL

    con = _console()

    def num(x, fmt=".2f", signed=False):
        return "n/a" if x is None else format(x, ("+" if signed else "") + fmt)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:+.0f} %"

    reg = data["registration"]
    if reg["performed"]:
        con.print(f"Registration: prior registered to current (rotation {', '.join(f'{v:.1f}' for v in reg['rotation_deg'])} "
                  f"deg, translation {', '.join(f'{v:.1f}' for v in reg['translation_mm'])} mm)")
    else:
        con.print("Registration: none (same grid)")
    table = Table(title="Follow-up per ROI: prior -> current (relative change)")
    table.add_column("ROI", overflow="fold")
    for col in ("volume mL", "median rCBV", "verdict"):
        table.add_column(col, no_wrap=True)
    for r in data["rois"]:
        v, m, ver = r["volume_ml"], r["rcbv_median"], r["verdict"]
        table.add_row(r["name"], f"{num(v['prior'])} -> {num(v['current'])} ({pct(v['relative_change'])}) {v['direction']}",
                      f"{num(m['prior'])} -> {num(m['current'])} ({pct(m['relative_change'])}) {m['direction']}",
                      f"{VERDICT_LABEL.get(ver['prior'], ver['prior'])} -> {VERDICT_LABEL.get(ver['current'], ver['current'])}")
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


def run_batch_command(*, input_dir: Path, out: Path, layout: str = "auto", derivatives: Path | None = None,
                      roi_globs: tuple[str, ...] = (), brain_glob: str | None = None,
                      reference_glob: str | None = None, aif_glob: str | None = None, jobs: int = 1,
                      scheduler: str | None = None, scheduler_file: Path | None = None, quiet: bool = False,
                      params: dict | None = None) -> int:
    """Discover the cases of ``input_dir``, run them all into ``out`` and write the summary; return the
    exit code (0 all ok, 3 some failed)."""
    import sys

    from perfusion.batch.engine import Names, run_batch, write_summary
    from perfusion.batch.discovery import discover
    from perfusion.errors import EXIT_OK, EXIT_PARTIAL

    params = dict(params or {})
    make_config(**{k: v for k, v in params.items() if k not in ("te", "tr")})  # bad options fail before any case
    if params.get("vof") not in (None, "none", "guarded", "auto"):
        raise UsageError("--vof: a batch takes none, guarded or auto (a VOF mask differs per case)")
    input_dir, out = Path(input_dir), Path(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout_used, cases = discover(input_dir, layout=layout, derivatives=derivatives, roi_globs=tuple(roi_globs),
                                      brain_glob=brain_glob, reference_glob=reference_glob, aif_glob=aif_glob)
    _check_batch_out(input_dir, out, layout_used)
    from perfusion.io import output_lock

    with output_lock(out):  # one run at a time writes OUT_DIR (a second batch fails at once, exit 5)
        err = _console_err()
        names = Names.of(input_dir, out, derivatives)  # log lines name files relative to INPUT, as the outputs do
        if not quiet:
            for w in caught:
                err.print(f"perfusion: warning: {names.scrub(str(w.message))}")
        interactive = sys.stdout.isatty() and not quiet
        counts = {"ok": 0, "failed": 0}

        def log(r) -> None:
            counts["ok" if r.status == "ok" else "failed"] += 1
            if r.status != "ok":
                err.print(f"perfusion: case {r.case_id} failed: {r.error}")
            elif not quiet and not interactive:
                how = "already done, skipped" if r.resumed else f"{r.seconds:.1f} s"
                _console().print(f"case {r.case_id}: ok ({how})")

        if interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("done {task.fields[ok]}, failed {task.fields[failed]}, remaining {task.fields[left]}"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            with Progress(*columns, console=_console()) as progress:
                task = progress.add_task("cases", total=len(cases), ok=0, failed=0, left=len(cases))

                def on_done(r) -> None:
                    log(r)
                    done = counts["ok"] + counts["failed"]
                    progress.update(task, advance=1, ok=counts["ok"], failed=counts["failed"], left=len(cases) - done)

                batch = run_batch(cases, out, params, input_root=input_dir, derivatives=derivatives, jobs=jobs,
                                  scheduler=scheduler, scheduler_file=scheduler_file, on_done=on_done)
        else:
            batch = run_batch(cases, out, params, input_root=input_dir, derivatives=derivatives, jobs=jobs,
                              scheduler=scheduler, scheduler_file=scheduler_file, on_done=log)
        written = write_summary(out, batch, layout=layout_used, params=params)
        if not quiet:
            from perfusion import DISCLAIMER
            resumed = sum(1 for c in batch.cases if c.resumed)
            _console().print(f"{len(batch.cases)} cases ({layout_used} layout): {len(batch.cases) - batch.n_failed} ok "
                             f"({resumed} already done), {batch.n_failed} failed. Summary: {', '.join(written)} in OUT_DIR")
            _console().print(DISCLAIMER)
        return EXIT_PARTIAL if batch.n_failed else EXIT_OK


def _console_err():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _check_batch_out(input_dir: Path, out: Path, layout: str) -> None:
    """OUT_DIR may not be INPUT nor lie inside it, except under INPUT/derivatives/ for a BIDS dataset."""
    src, dst = input_dir.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        if layout == "bids" and (src / "derivatives") in (dst, *dst.parents) and dst != src / "derivatives":
            return
        where = "a folder under INPUT/derivatives/ or " if layout == "bids" else ""
        raise UsageError(f"{out}: lies inside the input {input_dir}; write to {where}a folder outside it")


# ----------------------------------------------------------------------------------------- DICOM

#: A file-name stem for ``convert --name``: BIDS-like entities, nothing that needs quoting.
_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"


def run_convert(*, dicom_dir: Path, out: Path, series: int | None = None, name: str | None = None,
                force: bool = False, quiet: bool = False) -> dict:
    """Convert the DSC series of a DICOM folder into ``out``/<name>_dsc.nii.gz (float32 signal, a.u.,
    dcm2niix's grid, TR in the header in s) and <name>_dsc.json (the whitelisted sidecar, times in s),
    atomically; a multi-echo series as <name>_echo-<k>_dsc.nii.gz and .json per echo (TE order, BIDS
    names). Returns {"dsc": path, "sidecar": path, "warnings": [...], "echoes": [(nifti, sidecar), ...]}
    ("dsc" and "sidecar" of the first echo; "echoes" empty for one echo)."""
    import re

    from perfusion.io.dicom import read_dicom_echoes
    from perfusion.io import check_output_folder, output_lock, staged_output, write_json, write_nifti

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
            for c, st in zip(convs, stems):
                write_nifti(stage / f"{st}_dsc.nii.gz", c.data, c.affine, tr=c.tr_s,
                            description=f"perfusion convert: DICOM series {info.number}"
                                        + (f" echo {c.echo}" if c.echo else ""))
                write_json(stage / f"{st}_dsc.json", c.sidecar)
    files = [(out / f"{st}_dsc.nii.gz", out / f"{st}_dsc.json") for st in stems]
    warns = [w for c in convs for w in c.warnings]
    paths = {"dsc": files[0][0], "sidecar": files[0][1], "warnings": warns, "echoes": files if len(files) > 1 else []}
    if not quiet:
        con = _console()
        for c, (nii, side) in zip(convs, files):
            con.print(f"{info.summary()}{f' echo {c.echo}' if c.echo else ''} converted to {nii} and {side.name} "
                      f"(TE {c.sidecar.get('EchoTime', 'unknown')} s, TR {c.tr_s} s from {c.tr_source})")
        if len(convs) > 1:
            con.print(f"{len(convs)} echoes: analyse them together with perfusion analyze "
                      + " ".join(nii.name for nii, _ in files))
        for w in warns:
            con.print(f"warning: {w}")
    return paths


def run_dicom_inspect(*, folder: Path, json_path: Path | None = None, quiet: bool = False) -> dict:
    """Describe every series of a DICOM folder (frames, slices, ordering, frame intervals, checks); print
    a table and write the JSON atomically. Returns the JSON's content. Headers only; no identifier."""
    import os
    import tempfile

    from perfusion.io.dicom import inspect
    from perfusion.io import MIN_FRAMES, dumps_json

    folder = Path(folder)
    infos = inspect(folder)
    dsc = [i.number for i in infos if i.is_dsc]
    # no "folder": a DICOM folder is often named after the patient (privacy, issue 17)
    data = {"dsc_series": dsc[0] if len(dsc) == 1 else None,
            "dsc_rule": f"a series with at least {MIN_FRAMES} frames; with several, choose one with --series N",
            "units": {"time": "s"}, "series": [i.as_dict() for i in infos]}
    if json_path is not None:
        json_path = Path(json_path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{json_path.name}.", dir=json_path.parent if str(json_path.parent) else ".")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(dumps_json(data, indent=1) + "\n")
            os.replace(tmp, json_path)
        except OSError as exc:
            raise OutputError(f"{json_path}: cannot write ({exc.strerror}); choose another --json path") from None
    if not quiet:
        print_dicom_inspect(data, json_path, folder)
    return data


def print_dicom_inspect(data: dict, json_path: Path | None, folder: Path) -> None:
    from rich.table import Table

    con = _console()

    def num(x):
        return "-" if x is None else f"{x:.4g}"

    table = Table(title=f"DICOM series in {folder} (times in s)")
    for col in ("series", "files", "frames", "slices", "matrix", "TE", "TR", "frame order",
                "interval (range)", "checks"):
        table.add_column(col, no_wrap=True)

    def count(n, what):
        return f"{n} {what}{'s' if n > 1 else ''}"

    def te(s):
        return ", ".join(num(e["echo_time_s"]) for e in s["echoes"]) if s.get("echoes") else num(s["echo_time_s"])

    for s in data["series"]:
        checks = (count(len(s["errors"]), "error") if s["errors"] else
                  count(len(s["warnings"]), "warning") if s["warnings"] else "ok")
        interval = ("-" if s["interval_median_s"] is None else
                    f"{num(s['interval_median_s'])} ({num(s['interval_min_s'])}-{num(s['interval_max_s'])})")
        table.add_row(str(s["series_number"]), str(s["n_files"]), str(s["frames"]), str(s["slices_per_frame"]),
                      f"{s['matrix'][0]}x{s['matrix'][1]}", te(s), num(s["repetition_time_s"]),
                      s["ordering_key"], interval, checks)
    con.print(table)
    for s in data["series"]:
        if s.get("echoes"):
            con.print(f"series {s['series_number']}: {len(s['echoes'])} echoes, TE "
                      + ", ".join(f"{num(e['echo_time_s'])} s (echo {e['echo']}, {e['n_files']} files)" for e in s["echoes"])
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


def run_bench(*, volumes: str, dtypes: str, repeats: int, kernels: bool, compile_time: bool, quick: bool,
              json_out: Path | None, cache: Path | None) -> dict:
    """``perfusion bench``: measure, print the tables, write the JSON atomically."""
    from perfusion.tools import bench
    from perfusion.io import write_json

    vols = [v.strip() for v in volumes.split(",") if v.strip()]
    types = [d.strip() for d in dtypes.split(",") if d.strip()]
    if quick:
        vols, types, repeats, kernels = ["clinical"], ["int16"], 1, False
    bad = [v for v in vols if v not in bench.VOLUMES] + [d for d in types if d not in bench.DTYPES]
    if bad or not vols or not types or repeats < 1:
        raise UsageError(f"bench: unknown or empty choice {', '.join(bad) or '(none)'}; volumes are "
                         f"{', '.join(bench.VOLUMES)}, dtypes {', '.join(bench.DTYPES)}, --repeats >= 1")
    con = _console()
    result = bench.run_bench(volumes=vols, dtypes=types, repeats=repeats, kernels=kernels, compile_time=compile_time,
                             cache=Path(cache) if cache else bench.default_cache(),
                             on_step=lambda msg: con.print(f"[dim]{msg}[/dim]"))
    bench.print_tables(result, con)
    if json_out is not None:
        json_out = Path(json_out)
        tmp = json_out.with_name(f".{json_out.name}.partial")
        try:
            write_json(tmp, result)
            os.replace(tmp, json_out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"{json_out}: cannot write the results ({exc.strerror}); choose another --json") from None
        con.print(f"JSON written to {json_out}")
    return result
