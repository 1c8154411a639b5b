"""``perfusion batch``: every case of a dataset, resumable, in this process or on Dask; the progress bar
or log lines, and the closing count."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from perfusion.cli.options import (
    BatchAifSelection,
    BatchBevacizumab,
    BatchLeakage,
    BatchMethod,
    BatchQuiet,
    BatchSteroids,
    BatchTe,
    BatchTr,
    BatchVof,
    BatchWeeksSinceRadiation,
    GammaMaps,
    LeakageGate,
    MotionCorrect,
    RcbvHigh,
    RcbvLow,
    batch_params,
    check_options,
)
from perfusion.errors import UsageError


def batch(
    input_dir: Annotated[Path, typer.Argument(
        metavar="INPUT", help="A BIDS dataset (sub-*/[ses-*/]perf/*_dsc.nii.gz) or a folder of case folders.")],
    out: Annotated[Path, typer.Argument(
        metavar="OUT_DIR", help="Output folder: one folder per case, summary.tsv/.json and index.html at the top.")],
    layout: Annotated[str, typer.Option(help="auto, bids or plain.")] = "auto",
    derivatives: Annotated[Optional[Path], typer.Option(
        help="BIDS: folder searched for *_label-<name>_mask.nii.gz (default INPUT/derivatives).")] = None,
    roi_glob: Annotated[Optional[list[str]], typer.Option(
        help="Lesion masks by glob pattern, relative to INPUT (BIDS) or the case folder, with {sub} {ses} "
             "{case} placeholders; repeatable.")] = None,
    brain_glob: Annotated[Optional[str], typer.Option(help="Brain mask by glob pattern (as --roi-glob).")] = None,
    reference_glob: Annotated[Optional[str], typer.Option(
        help="Reference (normal-appearing white matter) mask by glob pattern.")] = None,
    aif_glob: Annotated[Optional[str], typer.Option(help="Arterial mask by glob pattern.")] = None,
    jobs: Annotated[int, typer.Option(
        help="Cases run at once (>= 1): 1 (default) runs in this process; N > 1 starts a local Dask cluster of "
             "N single-threaded worker processes.")] = 1,
    scheduler: Annotated[Optional[str], typer.Option(
        help="Use a running Dask scheduler, e.g. tcp://HOST:8786.")] = None,
    scheduler_file: Annotated[Optional[Path], typer.Option(
        help="Use the Dask scheduler described by this file (dask scheduler --scheduler-file).")] = None,
    method: BatchMethod = "model",
    leakage: BatchLeakage = "auto",
    leakage_gate: LeakageGate = "lesion",
    aif_selection: BatchAifSelection = "cluster",
    vof: BatchVof = "guarded",
    rcbv_low: RcbvLow = 1.0,
    rcbv_high: RcbvHigh = 1.75,
    te: BatchTe = None,
    tr: BatchTr = None,
    motion_correct: MotionCorrect = "auto",
    weeks_since_radiation: BatchWeeksSinceRadiation = None,
    bevacizumab: BatchBevacizumab = False,
    steroids: BatchSteroids = False,
    gamma_maps: GammaMaps = False,
    quiet: BatchQuiet = False,
) -> None:
    """Analyse every case of a dataset; resumable (done cases are skipped), on Dask for --jobs > 1.
    Exit code 3 when some cases failed (see summary.tsv)."""
    values = dict(locals())  # every option by name, as the signature orders them
    check_options(values)
    code = run_batch_command(input_dir=input_dir, out=out, layout=layout, derivatives=derivatives,
                             roi_globs=tuple(roi_glob or ()), brain_glob=brain_glob, reference_glob=reference_glob,
                             aif_glob=aif_glob, jobs=jobs, scheduler=scheduler, scheduler_file=scheduler_file,
                             quiet=quiet, params=batch_params(values))
    if code:
        raise typer.Exit(code=code)


def run_batch_command(*, input_dir: Path, out: Path, layout: str = "auto", derivatives: Path | None = None,
                      roi_globs: tuple[str, ...] = (), brain_glob: str | None = None,
                      reference_glob: str | None = None, aif_glob: str | None = None, jobs: int = 1,
                      scheduler: str | None = None, scheduler_file: Path | None = None, quiet: bool = False,
                      params: dict[str, Any] | None = None) -> int:
    """Discover the cases of ``input_dir``, run them all into ``out`` and write the summary; return the
    exit code (0 all ok, 3 some failed). ``params``: the analysis options every case gets
    (options.batch_params; engine.analysis_config), checked before any case."""
    from perfusion.batch.discovery import discover
    from perfusion.batch.engine import Names, analysis_config, write_summary
    from perfusion.cli.console import console, console_err
    from perfusion.errors import EXIT_OK, EXIT_PARTIAL
    from perfusion.io import output_lock

    params = dict(params or {})
    analysis_config(params)  # bad options fail before any case, as each case would
    if params.get("vof") not in (None, "none", "guarded", "auto"):
        raise UsageError("--vof: a batch takes none, guarded or auto (a VOF mask differs per case)")
    input_dir, out = Path(input_dir), Path(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout_used, cases = discover(input_dir, layout=layout, derivatives=derivatives, roi_globs=tuple(roi_globs),
                                      brain_glob=brain_glob, reference_glob=reference_glob, aif_glob=aif_glob)
    _check_batch_out(input_dir, out, layout_used)
    with output_lock(out):  # one run at a time writes OUT_DIR (a second batch fails at once, exit 5)
        names = Names.of(input_dir, out, derivatives)  # log lines name files relative to INPUT, as the outputs do
        if not quiet:
            for w in caught:
                console_err().print(f"perfusion: warning: {names.scrub(str(w.message))}")
        if jobs > 1 and not (scheduler or scheduler_file):  # local workers: compile once here, not in each of them
            _warm_workers(jobs, quiet=quiet)
        batch = _run_cases(cases, out, params, quiet=quiet, input_root=input_dir, derivatives=derivatives, jobs=jobs,
                           scheduler=scheduler, scheduler_file=scheduler_file)
        written = write_summary(out, batch, layout=layout_used, params=params)
        if not quiet:
            from perfusion import DISCLAIMER

            resumed = sum(1 for c in batch.cases if c.resumed)
            console().print(f"{len(batch.cases)} cases ({layout_used} layout): {len(batch.cases) - batch.n_failed} ok "
                            f"({resumed} already done), {batch.n_failed} failed. "
                            f"Summary: {', '.join(written)} in OUT_DIR")
            console().print(DISCLAIMER)
        return EXIT_PARTIAL if batch.n_failed else EXIT_OK


def _run_cases(cases, out: Path, params: dict[str, Any], *, quiet: bool, **engine):
    """batch.engine.run_batch with what the user sees meanwhile: a progress bar on a terminal, else one
    line per case (failed cases always, on stderr). ``engine``: run_batch's keywords."""
    import sys

    from perfusion.batch.engine import run_batch
    from perfusion.cli.console import console, console_err

    err = console_err()
    interactive = sys.stdout.isatty() and not quiet
    counts = {"ok": 0, "failed": 0}

    def log(r) -> None:
        counts["ok" if r.status == "ok" else "failed"] += 1
        if r.status != "ok":
            err.print(f"perfusion: case {r.case_id} failed: {r.error}")
        elif not quiet and not interactive:
            how = "already done, skipped" if r.resumed else f"{r.seconds:.1f} s"
            console().print(f"case {r.case_id}: ok ({how})")

    if not interactive:
        return run_batch(cases, out, params, on_done=log, **engine)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("done {task.fields[ok]}, failed {task.fields[failed]}, remaining {task.fields[left]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console()) as progress:
        task = progress.add_task("cases", total=len(cases), ok=0, failed=0, left=len(cases))

        def on_done(r) -> None:
            log(r)
            done = counts["ok"] + counts["failed"]
            progress.update(task, advance=1, ok=counts["ok"], failed=counts["failed"], left=len(cases) - done)

        return run_batch(cases, out, params, on_done=on_done, **engine)


def _warm_workers(jobs: int, *, quiet: bool) -> None:
    """Compile the kernels into the numba cache folder the local workers are given (engine.thread_env)
    when one is missing there, saying so (tools/warm.warm_if_needed)."""
    from perfusion.batch.engine import thread_env
    from perfusion.cli.console import compile_notice
    from perfusion.tools.warm import warm_if_needed

    warm_if_needed(thread_env(jobs).get("NUMBA_CACHE_DIR"), on_compile=None if quiet else compile_notice)


def _check_batch_out(input_dir: Path, out: Path, layout: str) -> None:
    """OUT_DIR may not be INPUT nor lie inside it, except under INPUT/derivatives/ for a BIDS dataset."""
    src, dst = input_dir.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        if layout == "bids" and (src / "derivatives") in (dst, *dst.parents) and dst != src / "derivatives":
            return
        where = "a folder under INPUT/derivatives/ or " if layout == "bids" else ""
        raise UsageError(f"{out}: lies inside the input {input_dir}; write to {where}a folder outside it")
