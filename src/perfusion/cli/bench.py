"""``perfusion bench``: analyze timed on standard phantom volumes (end to end, per stage, memory,
numba's compilation), with the spread of the runs, the machine's state, and an optional comparison
against a saved baseline that fails (exit 3) on a regression."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.cli.options import Quiet, check_options
from perfusion.errors import EXIT_PARTIAL, UsageError

#: Exit status when a row is slower than --fail-above times its baseline (batch uses it for "some
#: cases failed": here, some rows did).
EXIT_REGRESSION = EXIT_PARTIAL


def bench(
    volumes: Annotated[str, typer.Option(
        help="Comma-separated standard volumes: clinical (128x128x24x80), high (256x256x30x120).")] = "clinical,high",
    dtypes: Annotated[str, typer.Option(
        help="Comma-separated data types of the volumes: int16, float32.")] = "int16,float32",
    repeats: Annotated[int, typer.Option(
        help="Runs per measurement (>= 1), the configurations taking turns; the median, minimum and maximum are "
             "reported.")] = 3,
    kernels: Annotated[bool, typer.Option(
        "--kernels/--no-kernels", help="Also time every other deconvolution and leakage method (clinical "
                                       "volume; stage rows).")] = True,
    compile_time: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="Measure numba's compilation: cold vs warm cache.")] = True,
    quick: Annotated[bool, typer.Option(
        "--quick", help="The clinical int16 volume and the default configuration only, --repeats analyses of it "
                        "(3 by default); no warm-up run, no oSVD floor, no other kernels, no compile "
                        "measurement.")] = False,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Write the results, every run's time included, as JSON (schema perfusion-bench/2).")] = None,
    cache: Annotated[Optional[Path], typer.Option(
        help="Folder for the generated volumes (default ~/.cache/perfusion/bench).")] = None,
    baseline: Annotated[Optional[Path], typer.Option(
        help="A saved --json result (schema perfusion-bench/2) to compare with: each stage and end-to-end row "
             "of the same volume, dtype and configuration, median against median.")] = None,
    fail_above: Annotated[Optional[float], typer.Option(
        help="With --baseline: exit 3 when a row's median is more than this ratio times its baseline's (>= 1, "
             "e.g. 1.5). Rows shorter than 20 ms on both sides, or slower by less than 20 ms, are not judged "
             "(at that scale a ratio is noise); rows on one side only are listed, not failed.")] = None,
    quiet: Quiet = False,
) -> None:
    """Time analyze on standard phantom volumes: end to end, per stage (voxels/s), memory, numba compile.

    Warns when the machine is busy (load average above 0.5 per CPU before the start, or CPU steal above
    5 % during the run). Exit 3 when a row regressed beyond --fail-above; 2 for a bad option or an unreadable
    --baseline.
    """
    check_options(dict(locals()))
    run_bench(volumes=volumes, dtypes=dtypes, repeats=repeats, kernels=kernels, compile_time=compile_time,
              quick=quick, json_out=json_out, cache=cache, baseline=baseline, fail_above=fail_above, quiet=quiet)


def plan_of(*, volumes: str, dtypes: str, repeats: int, kernels: bool, compile_time: bool, quick: bool):
    """The measurement plan of the options (UsageError for an unknown or empty choice)."""
    from perfusion.tools import bench

    vols = [v.strip() for v in volumes.split(",") if v.strip()]
    types = [d.strip() for d in dtypes.split(",") if d.strip()]
    if repeats < 1:
        raise UsageError(f"--repeats {repeats}: must be an integer >= 1")
    if quick:
        return bench.quick_plan(repeats)
    bad = [v for v in vols if v not in bench.VOLUMES] + [d for d in types if d not in bench.DTYPES]
    if bad or not vols or not types:
        raise UsageError(f"bench: unknown or empty choice {', '.join(bad) or '(none)'}; volumes are "
                         f"{', '.join(bench.VOLUMES)}, dtypes {', '.join(bench.DTYPES)}")
    return bench.Plan(volumes=vols, dtypes=types, repeats=repeats, kernels=kernels, compile_time=compile_time)


def read_baseline(baseline: Path | None, fail_above: float | None) -> dict | None:
    """The baseline result, checked before any work (UsageError, exit 2, naming the file)."""
    from perfusion.tools import bench

    if fail_above is not None and not (math.isfinite(fail_above) and fail_above >= 1):
        raise UsageError(f"--fail-above {fail_above:g}: must be a finite number >= 1 (a ratio now / baseline)")
    if baseline is None:
        if fail_above is not None:
            raise UsageError("--fail-above needs --baseline FILE (a saved perfusion bench --json result)")
        return None
    try:
        return bench.load_baseline(baseline)
    except ValueError as exc:
        raise UsageError(f"--baseline {baseline}: {exc}") from None


def run_bench(*, volumes: str, dtypes: str, repeats: int, kernels: bool, compile_time: bool, quick: bool,
              json_out: Path | None, cache: Path | None, baseline: Path | None = None,
              fail_above: float | None = None, quiet: bool = False) -> dict:
    """``perfusion bench``: measure, print the tables (and the comparison), write the JSON atomically;
    exit 3 (typer.Exit) after all that when a row regressed beyond ``fail_above``. ``quiet``: no steps,
    tables nor notes (the exit code and errors still say a regression)."""
    from perfusion.cli.console import compile_notice, console, console_err, stage_progress
    from perfusion.io import atomic_write, dumps_json
    from perfusion.tools import bench
    from perfusion.tools.warm import warm_if_needed

    plan = plan_of(volumes=volumes, dtypes=dtypes, repeats=repeats, kernels=kernels, compile_time=compile_time,
                   quick=quick)
    base = read_baseline(baseline, fail_above)
    con = console(quiet=quiet)
    warm_if_needed(on_compile=None if quiet else compile_notice)  # timed runs are warm-cache runs
    with stage_progress(total=bench.count_steps(plan), quiet=quiet) as progress:

        def step(msg: str) -> None:
            con.print(f"[dim]{msg}[/dim]")
            progress.stage(msg)

        result = bench.run_bench(plan, cache=Path(cache) if cache else bench.default_cache(), on_step=step)
    if base is not None:
        result["comparison"] = {"baseline": str(baseline), **bench.compare(result, base, fail_above=fail_above)}
    state = result["machine"]
    if state["busy"] and not quiet:
        console_err().print(f"[yellow]perfusion: warning: the machine was busy ({state['why']}): times are noisier "
                            "than usual; compare runs taken side by side[/yellow]")
    print_tables(result, con)
    if base is not None:
        print_comparison(result["comparison"], con, machine=result["machine"])
    if json_out is not None:
        json_out = Path(json_out)
        atomic_write(json_out, dumps_json(result) + "\n", fix="choose another --json")
        con.print(f"JSON written to {json_out}")
    if base is not None and result["comparison"]["failed"]:
        if quiet:
            console_err().print(f"perfusion: error: {len(result['comparison']['failed'])} row(s) slower than "
                                f"{fail_above:g} x the baseline", markup=False)
        raise typer.Exit(code=EXIT_REGRESSION)
    return result


def _spread_cells(median: float | None, lo: float | None, hi: float | None, digits: int) -> tuple[str, str, str]:
    """'median', 'min-max' and 'spread %' ((max - min) / median) of a timed row; '-' where unknown."""
    if median is None or lo is None or hi is None:
        return "-", "-", "-"
    pct = f"{100 * (hi - lo) / median:.0f}" if median > 0 else "-"
    return f"{median:.{digits}f}", f"{lo:.{digits}f}-{hi:.{digits}f}", pct


def print_tables(result: dict, console) -> None:
    """The bench result as tables on ``console``: end to end, stages, the oSVD floor, numba's compile
    cost; every timed row with its median, range and spread over the runs."""
    from perfusion.cli.console import table as new_table

    m = result["machine"]
    runs = result["settings"]["repeats"]
    console.print(f"perfusion {m['perfusion']} on {m['cpus']} CPUs ({m['processor']}), Python {m['python']}, "
                  f"numpy {m['numpy']}, numba {m['numba']} ({m['numba_threads']} threads); load average "
                  f"{_num(m.get('load_avg'))} before, CPU steal {_num(m.get('steal_pct'))} % during the run")
    # volume and dtype in one cell, the median and its range in one: 80 columns hold the table
    t = new_table(f"perfusion analyze, end to end (fresh process, --no-html; {runs} runs: median (min-max), "
                  "spread = (max - min) / median)", "volume", "config", "wall s (min-max)", "spread %",
                  "analysis s", "peak RSS MB", "x input (float32)",
                  numbers=("wall s (min-max)", "spread %", "analysis s", "peak RSS MB", "x input (float32)"))
    for r in result["end_to_end"]:
        median, span, spread = _spread_cells(r["wall_s_median"], r["wall_s_min"], r["wall_s_max"], 2)
        t.add_row(f"{r['volume']} {r['dtype']}", r["config"], f"{median} ({span.replace('-', ' - ')})", spread,
                  _num(r["analysis_s_median"]), f"{r['peak_rss_mb']:.0f}", f"{r['peak_over_input']:.2f}")
    console.print(t)
    t = new_table("stages (report.json timings_s): median (min-max), spread", "volume", "config", "stage",
                  "s (min-max)", "spread %", "Mvoxel/s", numbers=("s (min-max)", "spread %", "Mvoxel/s"))
    for r in result["stages"]:
        vps = r["voxels_per_s"]
        median, span, spread = _spread_cells(r["seconds_median"], r["seconds_min"], r["seconds_max"], 3)
        t.add_row(f"{r['volume']} {r['dtype']}", r["config"], r["stage"], f"{median} ({span.replace('-', ' - ')})",
                  spread, f"{vps / 1e6:.2f}" if vps else "-")
    console.print(t)
    for r in result.get("osvd_floor", []):
        console.print(f"oSVD on {r['voxels']} voxels x {r['frames']} frames ({r['volume']}): {r['osvd_s']:.2f} s "
                      f"({r['osvd_s_min']:.2f}-{r['osvd_s_max']:.2f}); one fixed-threshold matrix product "
                      f"{r['floor_s']:.2f} s ({r['floor_s_min']:.2f}-{r['floor_s_max']:.2f}); ratio {r['ratio']:.1f}")
    c = result.get("compile")
    if c:
        console.print(f"numba: cold start (empty cache) {c['cold_s']:.1f} s, warm cache {c['warm_s']:.1f} s (one run "
                      f"each): compiling costs {c['compile_s']:.1f} s once per machine ({c['case']})")


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_comparison(comparison: dict, console, *, machine: dict) -> None:
    """The rows against the baseline (medians, ratio now / baseline) and a closing line naming those slower
    than --fail-above; a note when the baseline was measured on another kind of machine."""
    from perfusion.cli.console import table as new_table

    fail_above = comparison["fail_above"]
    other = comparison["baseline_machine"]
    if any(other.get(k) != machine.get(k) for k in ("cpus", "processor")):
        console.print(f"[yellow]note: the baseline ran on {other.get('cpus')} CPUs ({other.get('processor')}), this "
                      f"run on {machine.get('cpus')} ({machine.get('processor')}): ratios mix machines[/yellow]")
    t = new_table(f"against the baseline {comparison['baseline']} (medians; ratio now / baseline, above 1 slower; "
                  f"under {comparison['floor_s'] * 1000:.0f} ms not judged)", "row", "baseline s", "now s", "ratio",
                  "status", numbers=("baseline s", "now s", "ratio"))
    for r in comparison["rows"]:
        status = f"[red]{r['status']}[/red]" if r["status"] == "slower" else r["status"]
        t.add_row(r["key"], _num(r["baseline_s"], 3), _num(r["now_s"], 3), _num(r["ratio"]), status)
    console.print(t)
    failed = comparison["failed"]
    if fail_above is None:
        return
    if failed:
        console.print(f"[red]{len(failed)} row(s) slower than {fail_above:g} x the baseline: {', '.join(failed)} "
                      f"(exit {EXIT_REGRESSION})[/red]")
    else:
        console.print(f"no row slower than {fail_above:g} x the baseline")
