"""``perfusion bench``: analyze timed on standard phantom volumes (end to end, per stage, memory,
numba's compilation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.cli.options import check_options
from perfusion.errors import UsageError


def bench(
    volumes: Annotated[str, typer.Option(
        help="Comma-separated standard volumes: clinical (128x128x24x80), high (256x256x30x120).")] = "clinical,high",
    dtypes: Annotated[str, typer.Option(
        help="Comma-separated data types of the volumes: int16, float32.")] = "int16,float32",
    repeats: Annotated[int, typer.Option(help="Runs per measurement (>= 1); the median is reported.")] = 3,
    kernels: Annotated[bool, typer.Option(
        "--kernels/--no-kernels", help="Also one run per other deconvolution and leakage method (clinical "
                                       "volume).")] = True,
    compile_time: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="Measure numba's compilation: cold vs warm cache.")] = True,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Clinical int16 only, one run each, no extra kernels.")] = False,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Write the results as JSON (schema perfusion-bench/1).")] = None,
    cache: Annotated[Optional[Path], typer.Option(
        help="Folder for the generated volumes (default ~/.cache/perfusion/bench).")] = None,
) -> None:
    """Time analyze on standard phantom volumes: end to end, per stage (voxels/s), memory, numba compile."""
    check_options(dict(locals()))
    run_bench(volumes=volumes, dtypes=dtypes, repeats=repeats, kernels=kernels, compile_time=compile_time,
              quick=quick, json_out=json_out, cache=cache)


def run_bench(*, volumes: str, dtypes: str, repeats: int, kernels: bool, compile_time: bool, quick: bool,
              json_out: Path | None, cache: Path | None) -> dict:
    """``perfusion bench``: measure, print the tables, write the JSON atomically."""
    from perfusion.cli.console import compile_notice, console
    from perfusion.io import atomic_write, dumps_json
    from perfusion.tools import bench
    from perfusion.tools.warm import warm_if_needed

    vols = [v.strip() for v in volumes.split(",") if v.strip()]
    types = [d.strip() for d in dtypes.split(",") if d.strip()]
    if quick:
        vols, types, repeats, kernels = ["clinical"], ["int16"], 1, False
    bad = [v for v in vols if v not in bench.VOLUMES] + [d for d in types if d not in bench.DTYPES]
    if bad or not vols or not types or repeats < 1:
        raise UsageError(f"bench: unknown or empty choice {', '.join(bad) or '(none)'}; volumes are "
                         f"{', '.join(bench.VOLUMES)}, dtypes {', '.join(bench.DTYPES)}, --repeats >= 1")
    con = console()
    warm_if_needed(on_compile=compile_notice)  # the timed runs are warm-cache runs (compilation is measured apart)
    result = bench.run_bench(volumes=vols, dtypes=types, repeats=repeats, kernels=kernels, compile_time=compile_time,
                             cache=Path(cache) if cache else bench.default_cache(),
                             on_step=lambda msg: con.print(f"[dim]{msg}[/dim]"))
    print_tables(result, con)
    if json_out is not None:
        json_out = Path(json_out)
        atomic_write(json_out, dumps_json(result) + "\n", fix="choose another --json")
        con.print(f"JSON written to {json_out}")
    return result


def print_tables(result: dict, console) -> None:
    """The bench result as tables on ``console``: end to end, stages, the oSVD floor, numba's compile cost."""
    from rich.table import Table

    m = result["machine"]
    console.print(f"perfusion {m['perfusion']} on {m['cpus']} CPUs ({m['processor']}), Python {m['python']}, "
                  f"numpy {m['numpy']}, numba {m['numba']} ({m['numba_threads']} threads)")
    t = Table(title="perfusion analyze, end to end (fresh process, --no-html; median)")
    for col in ("volume", "dtype", "config", "wall s", "analysis s", "peak RSS MB", "x input (float32)"):
        t.add_column(col, no_wrap=True)
    for r in result["end_to_end"]:
        t.add_row(r["volume"], r["dtype"], r["config"], f"{r['wall_s_median']:.2f}", f"{r['analysis_s_median']:.2f}",
                  f"{r['peak_rss_mb']:.0f}", f"{r['peak_over_input']:.2f}")
    console.print(t)
    t = Table(title="stages (report.json timings_s; median)")
    for col in ("volume", "dtype", "config", "stage", "s", "Mvoxel/s"):
        t.add_column(col, no_wrap=True)
    for r in result["stages"]:
        vps = r["voxels_per_s"]
        t.add_row(r["volume"], r["dtype"], r["config"], r["stage"], f"{r['seconds_median']:.3f}",
                  f"{vps / 1e6:.2f}" if vps else "-")
    console.print(t)
    for r in result.get("osvd_floor", []):
        console.print(f"oSVD on {r['voxels']} voxels x {r['frames']} frames ({r['volume']}): {r['osvd_s']:.2f} s; one "
                      f"fixed-threshold matrix product {r['floor_s']:.2f} s; ratio {r['ratio']:.1f}")
    c = result.get("compile")
    if c:
        console.print(f"numba: cold start (empty cache) {c['cold_s']:.1f} s, warm cache {c['warm_s']:.1f} s: "
                      f"compiling costs {c['compile_s']:.1f} s once per machine ({c['case']})")
