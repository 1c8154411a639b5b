"""``perfusion batch``: every case of a dataset, resumable, in this process or on Dask; the progress bar
or log lines, and the closing count."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from perfusion.cli.options import (
    AifGlob,
    AifSelection,
    AifVoxels,
    AnatGlob,
    Bevacizumab,
    BrainGlob,
    Derivatives,
    GammaMaps,
    Html,
    Jobs,
    Layout,
    Leakage,
    LeakageGate,
    Method,
    MotionCorrect,
    OiTarget,
    Quiet,
    RcbvHigh,
    RcbvLow,
    Recirculation,
    ReferenceGlob,
    RoiGlob,
    Scheduler,
    SchedulerFile,
    Steroids,
    Te,
    Threshold,
    Tr,
    Vof,
    WeeksSinceRadiation,
    batch_params,
    check_options,
)
from perfusion.errors import UsageError


def batch(
    input_dir: Annotated[Path, typer.Argument(
        metavar="INPUT", help="A BIDS dataset (sub-*/[ses-*/]perf/*_dsc.nii.gz) or a folder of case folders.")],
    out: Annotated[Path, typer.Argument(
        metavar="OUT_DIR", help="Output folder: one folder per case, summary.tsv/.json and index.html at the top.")],
    layout: Layout = "auto",
    derivatives: Derivatives = None,
    roi_glob: RoiGlob = None,
    brain_glob: BrainGlob = None,
    reference_glob: ReferenceGlob = None,
    aif_glob: AifGlob = None,
    anat_glob: AnatGlob = None,
    jobs: Jobs = 1,
    scheduler: Scheduler = None,
    scheduler_file: SchedulerFile = None,
    method: Method = "model",
    threshold: Threshold = None,
    oi_target: OiTarget = None,
    leakage: Leakage = "auto",
    leakage_gate: LeakageGate = "lesion",
    te: Te = None,
    tr: Tr = None,
    rcbv_low: RcbvLow = 1.0,
    rcbv_high: RcbvHigh = 1.75,
    aif_voxels: AifVoxels = 10,
    aif_selection: AifSelection = "cluster",
    vof: Vof = "guarded",
    recirculation: Recirculation = "keep",
    gamma_maps: GammaMaps = False,
    weeks_since_radiation: WeeksSinceRadiation = None,
    bevacizumab: Bevacizumab = False,
    steroids: Steroids = False,
    motion_correct: MotionCorrect = "auto",
    quiet: Quiet = False,
    html: Html = True,
) -> None:
    """Analyse every case of a dataset; resumable (done cases are skipped), on Dask for --jobs > 1.
    Exit code 3 when some cases failed (see summary.tsv)."""
    values = dict(locals())  # every option by name, as the signature orders them
    check_options(values)
    code = run_batch_command(input_dir=input_dir, out=out, layout=layout, derivatives=derivatives,
                             roi_globs=tuple(roi_glob or ()), brain_glob=brain_glob, reference_glob=reference_glob,
                             aif_glob=aif_glob, anat_glob=anat_glob, jobs=jobs, scheduler=scheduler,
                             scheduler_file=scheduler_file, quiet=quiet, params=batch_params(values))
    if code:
        raise typer.Exit(code=code)


def run_batch_command(*, input_dir: Path, out: Path, layout: str = "auto", derivatives: Path | None = None,
                      roi_globs: tuple[str, ...] = (), brain_glob: str | None = None,
                      reference_glob: str | None = None, aif_glob: str | None = None, anat_glob: str | None = None,
                      jobs: int = 1, scheduler: str | None = None, scheduler_file: Path | None = None,
                      quiet: bool = False, params: dict[str, Any] | None = None,
                      select: Callable[[list], list] | None = None) -> int:
    """Discover the cases of ``input_dir`` (``select``: keep only some, e.g. bids' participant labels),
    run them into ``out`` and write the summary; return the exit code (0 all ok, 3 some failed).
    ``params``: the analysis options every case gets (options.batch_params; engine.analysis_config),
    checked before any case. Each case is locked while it is written (engine.case_lock), not the whole
    OUT_DIR: processes on disjoint cases (an array job) share one OUT_DIR."""
    from perfusion.batch.discovery import discover
    from perfusion.batch.engine import Names, analysis_config
    from perfusion.cli.console import console_err

    params = dict(params or {})
    analysis_config(params)  # bad options fail before any case, as each case would
    if params.get("vof") not in (None, "none", "guarded", "auto"):
        raise UsageError("--vof: a batch takes none, guarded or auto (a VOF mask differs per case)")
    input_dir, out = Path(input_dir), Path(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout_used, cases = discover(input_dir, layout=layout, derivatives=derivatives, roi_globs=tuple(roi_globs),
                                      brain_glob=brain_glob, reference_glob=reference_glob, aif_glob=aif_glob,
                                      anat_glob=anat_glob)
    if select is not None:
        cases = select(cases)
    _check_batch_out(input_dir, out, layout_used)
    names = Names.of(input_dir, out, derivatives)  # log lines name files relative to INPUT, as the outputs do
    if not quiet:
        for w in caught:
            console_err().print(f"perfusion: warning: {names.scrub(str(w.message))}")
    if jobs > 1 and not (scheduler or scheduler_file):  # local workers: compile once here, not in each of them
        _warm_workers(jobs, quiet=quiet)
    batch = _run_cases(cases, out, params, quiet=quiet, input_root=input_dir, derivatives=derivatives, jobs=jobs,
                       scheduler=scheduler, scheduler_file=scheduler_file)
    return _finish(out, batch, layout=layout_used, params=params, input_root=input_dir, quiet=quiet)


def _finish(out: Path, batch, *, layout: str, params: dict[str, Any], input_root: Path, quiet: bool) -> int:
    """Write the summary files (every finished case in OUT_DIR) and say what happened; the exit code."""
    from perfusion.batch.engine import write_summary
    from perfusion.cli.console import console
    from perfusion.errors import EXIT_OK, EXIT_PARTIAL

    written = write_summary(out, batch, layout=layout, params=params, input_root=input_root)
    if not quiet:
        from perfusion import DISCLAIMER

        resumed = sum(1 for c in batch.cases if c.resumed)
        console().print(f"{len(batch.cases)} cases ({layout} layout): {len(batch.cases) - batch.n_failed} ok "
                        f"({resumed} already done), {batch.n_failed} failed. "
                        f"Summary: {', '.join(n for n in written if not n.startswith('.'))} in OUT_DIR")
        console().print(DISCLAIMER)
    return EXIT_PARTIAL if batch.n_failed else EXIT_OK


def _run_cases(cases, out: Path, params: dict[str, Any], *, quiet: bool, **engine):
    """batch.engine.run_batch with what the user sees meanwhile: a progress bar with an ETA on a terminal,
    else one line per case with the count and the time left (failed cases always, on stderr).
    ``engine``: run_batch's keywords."""
    import sys
    import time

    from perfusion.batch.engine import run_batch
    from perfusion.cli.console import console, console_err

    err = console_err()
    interactive = sys.stdout.isatty() and not quiet
    counts = {"ok": 0, "failed": 0}
    t0 = time.monotonic()

    def log(r) -> None:
        counts["ok" if r.status == "ok" else "failed"] += 1
        if r.status != "ok":
            err.print(f"perfusion: case {r.case_id} failed: {r.error}")
        elif not quiet and not interactive:
            how = "already done, skipped" if r.resumed else f"{r.seconds:.1f} s"
            done = counts["ok"] + counts["failed"]
            console().print(f"case {r.case_id}: ok ({how}) [{done}/{len(cases)}, "
                            f"{eta_text(time.monotonic() - t0, done, len(cases))}]")

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


def eta_text(elapsed_s: float, done: int, total: int) -> str:
    """The time left of a batch, from the mean time per case so far (s): "ETA 1 min 20 s", "done"."""
    if done >= total:
        return "done"
    if done <= 0:
        return "ETA unknown"
    left = round(elapsed_s / done * (total - done))
    return f"ETA {left // 60} min {left % 60} s" if left >= 60 else f"ETA {left} s"


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
