"""The ``perfusion`` command line: thin typer commands; the one place errors become exit codes.

Exit codes: 0 ok, 1 internal error (a bug: please report it), 2 usage, 3 partial (batch),
4 bad input, 5 output or disk.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.errors import EXIT_INTERNAL, EXIT_OUTPUT, WRITE_REFUSED_ERRNOS, PerfusionError
from perfusion.units import MAX_TE_S, MAX_TR_S

#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 internal error (a bug: please report it), 2 usage, 3 partial (batch), "
    "4 bad input, 5 output or disk, 130 interrupted (Ctrl-C)."
)

#: --motion-correct help (analyze and batch).
LEAKAGE_GATE_HELP = ("Where the leakage correction applies: lesion (default: every voxel of the --roi lesions, elsewhere only "
                     "where the leak is significant, |K2| > 3 SE), voxel (only where significant, lesions included) or "
                     "none (everywhere, as published).")
MOTION_HELP = ("Head motion: auto (default: register every frame to the baseline and realign frames displaced "
               "by more than 0.5 mm), on (realign every frame displaced by more than 0.25 mm) or off (no estimate). "
               "Writes motion.tsv (deg, mm).")

#: Ranges of the numeric options (flag -> low, high, low included, high included, unit); each is
#: checked before any work and stated in the option's help. TE/TR upper bounds: units.MAX_TE_S and
#: MAX_TR_S (larger values are milliseconds by mistake).
_RANGES = {
    "--threshold": (0.0, 1.0, False, False, ""),
    "--oi-target": (0.0, 1.0, False, False, ""),
    "--te": (0.0, MAX_TE_S, False, True, " s"),
    "--tr": (0.0, MAX_TR_S, False, True, " s"),
    "--rcbv-low": (0.0, None, False, False, ""),
    "--rcbv-high": (0.0, None, False, False, ""),
    "--aif-voxels": (1, None, True, False, ""),
    "--weeks-since-radiation": (0.0, None, True, False, " weeks"),
    "--snr": (0.0, None, False, False, ""),
    "--seed": (0, None, True, False, ""),
    # a clinical DSC series has 40-120 frames; fewer than 30 leave no tail after the bolus
    "--frames": (30, 1000, True, True, ""),
    # phantom_realistic.MAX_ECHOES: one float64 copy of the head per echo
    "--echoes": (1, 8, True, True, ""),
    "--jobs": (1, None, True, False, ""),
    "--repeats": (1, None, True, False, ""),
}


def _range_text(flag: str) -> str:
    lo, hi, lo_in, hi_in, unit = _RANGES[flag]
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo:g}{unit}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}{unit}"


def check_options(**values) -> None:
    """Refuse (UsageError, exit 2) a numeric option outside its range in _RANGES, NaN and Inf included,
    before any work. Keys are the flags' Python names (``oi_target`` for --oi-target); None is unset."""
    import math

    from perfusion.errors import UsageError

    for key, value in values.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        lo, hi, lo_in, hi_in, unit = _RANGES[flag]
        finite = isinstance(value, int) or math.isfinite(value)
        ok = (finite and (value > lo or (lo_in and value == lo))
              and (hi is None or value < hi or (hi_in and value == hi)))
        if not ok:
            hint = ""
            if unit == " s" and finite and value > hi and 0 < value / 1000 <= hi:
                hint = f"; this looks like milliseconds: give seconds (e.g. {flag} {value / 1000:g})"
            kind = "an integer" if isinstance(lo, int) else "a finite number"
            raise UsageError(f"{flag} {value:g}: must be {kind} {_range_text(flag)}{hint}")


app = typer.Typer(
    name="perfusion",
    help="DSC-MRI perfusion maps and lesion scoring. For research and decision support only; "
         "not a medical device and not a diagnosis.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


def _guard(fn):
    """Turn every failure of a command into one line on stderr and an exit code, never a traceback
    (tracebacks can carry patient data in local variables)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        try:
            with warnings.catch_warnings():
                # numpy's arithmetic warnings (an empty mean, a division by zero) are never printed raw:
                # what a user must know reaches report.json "warnings" and the summary as sentences
                warnings.simplefilter("ignore", RuntimeWarning)
                from perfusion._kernels.cache import configure

                note = configure()  # before any kernel module is imported (numba-free, a few file checks)
                if note and not kwargs.get("quiet"):
                    typer.echo(f"perfusion: warning: {note}", err=True)
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except PerfusionError as exc:
            typer.echo(f"perfusion: error: {exc}", err=True)
            raise typer.Exit(code=exc.exit_code) from None
        except OSError as exc:
            if exc.errno not in WRITE_REFUSED_ERRNOS:
                _internal(exc)
            # a write the disk refused where no command caught it (numba's cache, a temporary file): exit 5
            import os
            import tempfile

            where = f" in {Path(exc.filename).parent}" if exc.filename else ""
            cache = os.environ.get("NUMBA_CACHE_DIR") or Path(__file__).parent / "__pycache__"
            typer.echo(f"perfusion: error: writing failed ({exc.strerror or exc}{where}: disk full, over quota, beyond "
                       "the file-size limit or read-only); free space or choose another disk for --out, for the "
                       f"temporary folder {tempfile.gettempdir()} (TMPDIR) or for numba's cache {cache} "
                       "(NUMBA_CACHE_DIR)", err=True)
            raise typer.Exit(code=EXIT_OUTPUT) from None
        except KeyboardInterrupt:
            typer.echo("perfusion: interrupted; the output folder was left as it was", err=True)
            raise typer.Exit(code=EXIT_INTERRUPTED) from None
        except Exception as exc:  # a bug
            _internal(exc)

    return wrapper


def _internal(exc: Exception):
    typer.echo(f"perfusion: internal error ({type(exc).__name__}: {exc}); "
               "please report it with the command you ran", err=True)
    raise typer.Exit(code=EXIT_INTERNAL) from None


@app.command()
@_guard
def analyze(
    dsc: Annotated[list[Path], typer.Argument(help="4-D DSC series (.nii or .nii.gz; TE/TR from its BIDS sidecar) or a folder of DICOM files; for a multi-echo run, one series per echo (any order; each with its sidecar's EchoTime).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created; must be empty unless --force).")],
    mask: Annotated[Optional[Path], typer.Option(help="Brain mask on the DSC grid (default: automatic).")] = None,
    aif: Annotated[str, typer.Option(help="'auto' or a mask of arterial voxels on the DSC grid.")] = "auto",
    reference: Annotated[Optional[Path], typer.Option(help="Reference tissue mask (normal-appearing white matter) for rCBV (default: automatic).")] = None,
    roi: Annotated[Optional[list[Path]], typer.Option(help="Lesion mask; repeat for several. Its name is the file name.")] = None,
    method: Annotated[str, typer.Option(help="Deconvolution: model (default: gamma-residue fit with delay), osvd, csvd, ssvd or tikhonov.")] = "model",
    threshold: Annotated[Optional[float], typer.Option(help="Fixed SVD threshold P as a fraction of the largest singular value, in (0, 1) (ssvd 0.2, csvd 0.1 by default).")] = None,
    oi_target: Annotated[Optional[float], typer.Option(help="oSVD oscillation-index target (dimensionless), in (0, 1) (default 0.095).")] = None,
    leakage: Annotated[str, typer.Option(help="Leakage correction: auto (default: bidirectional, Leu 2016, for one echo; bsw, Boxerman 2006, for multi-echo), bidirectional, bsw, residue (Bjornerud 2011) or none.")] = "auto",
    leakage_gate: Annotated[str, typer.Option(help=LEAKAGE_GATE_HELP)] = "lesion",
    te: Annotated[Optional[float], typer.Option(help="Echo time in s, in (0, 0.2] (overrides the sidecar).")] = None,
    tr: Annotated[Optional[float], typer.Option(help="Repetition time in s, in (0, 10] (overrides sidecar and header).")] = None,
    rcbv_low: Annotated[float, typer.Option(help="rCBV below this: likely treatment effect (ratio, > 0).")] = 1.0,
    rcbv_high: Annotated[float, typer.Option(help="rCBV above this: likely recurrence (ratio, > --rcbv-low).")] = 1.75,
    aif_voxels: Annotated[int, typer.Option(help="Number of arterial voxels averaged by --aif-selection rank (>= 1).")] = 10,
    aif_selection: Annotated[str, typer.Option(help="Automatic AIF: cluster (k-means, Mouridsen 2006) or rank (peak / width).")] = "cluster",
    vof: Annotated[str, typer.Option(help="Partial-volume scaling of the AIF by a venous output function: guarded (default: the automatic VOF, applied only when it shows the AIF is partial-volumed), auto (always), none, or a mask.")] = "guarded",
    recirculation: Annotated[str, typer.Option(help="keep (default) or remove: deconvolve gamma-variate first passes of AIF and tissue.")] = "keep",
    weeks_since_radiation: Annotated[Optional[float], typer.Option(help="Weeks since the end of chemoradiation (weeks, >= 0); below 12 (RANO 2.0) a high rCBV is 'possible recurrence or pseudoprogression'.")] = None,
    bevacizumab: Annotated[bool, typer.Option("--bevacizumab", help="The patient is on bevacizumab (lowers rCBV): a low rCBV is at most indeterminate.")] = False,
    steroids: Annotated[bool, typer.Option("--steroids", help="The patient is on corticosteroids (lower rCBV): a low rCBV is at most indeterminate.")] = False,
    anat: Annotated[Optional[Path], typer.Option(help="Post-contrast T1 (NIfTI, any grid): registered rigidly to the DSC baseline and used as the figures' background.")] = None,
    motion_correct: Annotated[str, typer.Option(help=MOTION_HELP)] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    dicom_series: Annotated[Optional[int], typer.Option("--series", help="DICOM folder input: SeriesNumber of the DSC series when the folder holds several.")] = None,
    html: Annotated[bool, typer.Option("--html/--no-html", help="Write report.html (about 1 s of figures); `perfusion report DIR` can write it later.")] = True,
) -> None:
    """Turn a DSC series into CBV, CBF, MTT, TTP, Tmax and rCBV maps and score each lesion ROI."""
    check_options(threshold=threshold, oi_target=oi_target, te=te, tr=tr, rcbv_low=rcbv_low, rcbv_high=rcbv_high,
                  aif_voxels=aif_voxels, weeks_since_radiation=weeks_since_radiation)
    from perfusion.cli.commands import run_analyze

    run_analyze(dsc=dsc[0] if len(dsc) == 1 else list(dsc), out=out, mask=mask, aif=aif, reference=reference, rois=roi or [], method=method,
                threshold=threshold, oi_target=oi_target, leakage=leakage, leakage_gate=leakage_gate, te=te, tr=tr,
                rcbv_low=rcbv_low,
                rcbv_high=rcbv_high, aif_voxels=aif_voxels, aif_selection=aif_selection, vof=vof,
                recirculation=recirculation, weeks_since_radiation=weeks_since_radiation, anat=anat, force=force,
                quiet=quiet, dicom_series=dicom_series, motion_correct=motion_correct, html=html,
                bevacizumab=bevacizumab, steroids=steroids)


@app.command()
@_guard
def phantom(
    out: Annotated[Path, typer.Argument(help="Output folder for the phantom case.")],
    snr: Annotated[Optional[float], typer.Option(help="Baseline signal-to-noise ratio (S0 / noise SD, > 0; default 150, --realistic 50).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the noise (>= 0).")] = 0,
    tr: Annotated[float, typer.Option(help="Repetition time in s, in (0, 10] (a multiple of 0.01; --realistic: of 0.05).")] = 1.5,
    te: Annotated[Optional[float], typer.Option(help="Echo time in s, in (0, 0.2] (default 0.025, --realistic 0.03).")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Number of frames, 30 to 1000 (default 80, --realistic 60).")] = None,
    leaky_lesions: Annotated[bool, typer.Option("--leaky-lesions", help="Add a slice of four lesions with Tofts-model contrast leakage (T1- and T2*-dominant).")] = False,
    realistic: Annotated[bool, typer.Option("--realistic", help="The realistic head instead (physics unlike the methods' models: quadratic blood relaxation, log-normal residues, strong leakage, mixed lesions, scalp and orbits); --snr defaults to 50, --te to 0.03, --frames to 60.")] = False,
    protocol: Annotated[str, typer.Option(help="--realistic: flip60_no_preload (default), flip60_preload or flip30_no_preload.")] = "flip60_no_preload",
    echoes: Annotated[Optional[int], typer.Option(help="--realistic: number of echoes in [1, 8], one series per echo (<prefix>_echo-<k>_dsc.nii.gz with its EchoTime); 2: TE 0.008 and 0.030 s, more: evenly spaced between them.")] = None,
    te_list: Annotated[Optional[str], typer.Option("--te-list", help="--realistic: the echo times in s, comma-separated and increasing, each in (0, 0.2] (e.g. 0.008,0.030); one series per echo.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty output folder.")] = False,
) -> None:
    """Write a synthetic DSC case with known CBV/CBF/MTT, masks and truth maps."""
    check_options(snr=snr, seed=seed, tr=tr, te=te, frames=frames, echoes=echoes)
    from perfusion.cli.commands import echo_times_from_options, run_phantom

    echo_times = echo_times_from_options(echoes=echoes, te_list=te_list, te=te, realistic=realistic)
    run_phantom(out=out, snr=snr, seed=seed, tr=tr, te=te, frames=frames, leaky_lesions=leaky_lesions, force=force,
                realistic=realistic, protocol=protocol, echo_times=echo_times)


@app.command()
@_guard
def validate(
    data: Annotated[Optional[Path], typer.Option(help="Reference-data folder holding bezier-dsc-dro/ (default: shared/reference-data or ../shared/reference-data if present).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: all).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write rows and summary as JSON here.")] = Path("validation.json"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller phantom (48 x 48) for a fast check.")] = False,
) -> None:
    """Run the accuracy suite (phantom sweep, OSIPI DRO, Bezier DRO) and print CBV/CBF/MTT errors per method."""
    from perfusion.cli.commands import run_validate

    run_validate(data=data, methods=methods.split(",") if methods else None, json_path=json_path, quick=quick)


@app.command()
@_guard
def report(
    folder: Annotated[Path, typer.Argument(help="Output folder of 'perfusion analyze' (holds report.json).")],
    anat: Annotated[Optional[Path], typer.Option(help="Post-contrast T1 (NIfTI, any grid): registered rigidly to the folder's baseline.nii.gz and used as the figures' background (writes anat.nii.gz and anat_to_dsc.tfm).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
) -> None:
    """Write report.html (verdicts, maps, curves, quality checks; one self-contained file) into FOLDER."""
    from perfusion.cli.commands import run_report

    run_report(folder=folder, anat=anat, quiet=quiet)


@app.command()
@_guard
def compare(
    prior: Annotated[Path, typer.Argument(help="Output folder of 'perfusion analyze' at the earlier time point (holds report.json).")],
    current: Annotated[Path, typer.Argument(help="Output folder of 'perfusion analyze' at the later time point; ROIs are matched by name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for compare.json, compare.html and prior_to_current.tfm (created; must be empty unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
) -> None:
    """Compare two time points of one patient: per ROI the change of volume (mL), median rCBV (ratio), FTB and
    verdict, and the pattern (a growing lesion with falling rCBV is the pseudoprogression pattern). Registers
    the prior baseline to the current one (rigid) when their grids differ."""
    from perfusion.cli.commands import run_compare

    run_compare(prior=prior, current=current, out=out, force=force, quiet=quiet)


@app.command()
@_guard
def batch(
    input_dir: Annotated[Path, typer.Argument(metavar="INPUT", help="A BIDS dataset (sub-*/[ses-*/]perf/*_dsc.nii.gz) or a folder of case folders.")],
    out: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Output folder: one folder per case, summary.tsv/.json and index.html at the top.")],
    layout: Annotated[str, typer.Option(help="auto, bids or plain.")] = "auto",
    derivatives: Annotated[Optional[Path], typer.Option(help="BIDS: folder searched for *_label-<name>_mask.nii.gz (default INPUT/derivatives).")] = None,
    roi_glob: Annotated[Optional[list[str]], typer.Option(help="Lesion masks by glob pattern, relative to INPUT (BIDS) or the case folder, with {sub} {ses} {case} placeholders; repeatable.")] = None,
    brain_glob: Annotated[Optional[str], typer.Option(help="Brain mask by glob pattern (as --roi-glob).")] = None,
    reference_glob: Annotated[Optional[str], typer.Option(help="Reference (normal-appearing white matter) mask by glob pattern.")] = None,
    aif_glob: Annotated[Optional[str], typer.Option(help="Arterial mask by glob pattern.")] = None,
    jobs: Annotated[int, typer.Option(help="Cases run at once (>= 1): 1 (default) runs in this process; N > 1 starts a local Dask cluster of N single-threaded worker processes.")] = 1,
    scheduler: Annotated[Optional[str], typer.Option(help="Use a running Dask scheduler, e.g. tcp://HOST:8786.")] = None,
    scheduler_file: Annotated[Optional[Path], typer.Option(help="Use the Dask scheduler described by this file (dask scheduler --scheduler-file).")] = None,
    method: Annotated[str, typer.Option(help="Deconvolution: model (default), osvd, csvd, ssvd or tikhonov.")] = "model",
    leakage: Annotated[str, typer.Option(help="Leakage correction: auto (default: bidirectional for one echo, bsw for multi-echo), bidirectional, bsw, residue or none.")] = "auto",
    leakage_gate: Annotated[str, typer.Option(help=LEAKAGE_GATE_HELP)] = "lesion",
    aif_selection: Annotated[str, typer.Option(help="Automatic AIF: cluster or rank.")] = "cluster",
    vof: Annotated[str, typer.Option(help="Partial-volume scaling of the AIF: guarded (default), auto or none.")] = "guarded",
    rcbv_low: Annotated[float, typer.Option(help="rCBV below this: likely treatment effect (ratio, > 0).")] = 1.0,
    rcbv_high: Annotated[float, typer.Option(help="rCBV above this: likely recurrence (ratio, > --rcbv-low).")] = 1.75,
    te: Annotated[Optional[float], typer.Option(help="Echo time in s for every case, in (0, 0.2] (overrides sidecars).")] = None,
    tr: Annotated[Optional[float], typer.Option(help="Repetition time in s for every case, in (0, 10] (overrides sidecars and headers).")] = None,
    motion_correct: Annotated[str, typer.Option(help=MOTION_HELP)] = "auto",
    weeks_since_radiation: Annotated[Optional[float], typer.Option(help="Weeks since the end of chemoradiation for every case (weeks, >= 0); below 12 a high rCBV is 'possible recurrence or pseudoprogression'.")] = None,
    bevacizumab: Annotated[bool, typer.Option("--bevacizumab", help="Every case is on bevacizumab (lowers rCBV): a low rCBV is at most indeterminate.")] = False,
    steroids: Annotated[bool, typer.Option("--steroids", help="Every case is on corticosteroids (lower rCBV): a low rCBV is at most indeterminate.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar: print only failed cases.")] = False,
) -> None:
    """Analyse every case of a dataset; resumable (done cases are skipped), on Dask for --jobs > 1.
    Exit code 3 when some cases failed (see summary.tsv)."""
    check_options(jobs=jobs, rcbv_low=rcbv_low, rcbv_high=rcbv_high, te=te, tr=tr,
                  weeks_since_radiation=weeks_since_radiation)
    from perfusion.cli.commands import run_batch_command

    params = {"method": method, "leakage": leakage, "leakage_gate": leakage_gate, "aif_selection": aif_selection,
              "vof": vof,
              "rcbv_low": rcbv_low, "rcbv_high": rcbv_high, "te": te, "tr": tr, "motion_correct": motion_correct,
              "weeks_since_radiation": weeks_since_radiation, "bevacizumab": bevacizumab, "steroids": steroids}
    code = run_batch_command(input_dir=input_dir, out=out, layout=layout, derivatives=derivatives,
                             roi_globs=tuple(roi_glob or ()), brain_glob=brain_glob, reference_glob=reference_glob,
                             aif_glob=aif_glob, jobs=jobs, scheduler=scheduler, scheduler_file=scheduler_file,
                             quiet=quiet, params=params)
    if code:
        raise typer.Exit(code=code)


@app.command()
@_guard
def convert(
    dicom_dir: Annotated[Path, typer.Argument(metavar="DICOM_DIR", help="Folder of DICOM files from PACS or the scanner (sub-folders searched).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder for <name>_dsc.nii.gz and <name>_dsc.json (created; must be empty unless --force).")],
    series: Annotated[Optional[int], typer.Option(help="SeriesNumber of the DSC series when the folder holds several (see dicom-inspect).")] = None,
    name: Annotated[Optional[str], typer.Option(help="File-name stem, e.g. sub-01 (default series-<N>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
) -> None:
    """Convert the DSC series of a DICOM folder (through dcm2niix) into a 4-D NIfTI and its BIDS sidecar
    (TE/TR in s; only non-identifying keys). Draw masks for a DICOM analysis on this NIfTI."""
    from perfusion.cli.commands import run_convert

    run_convert(dicom_dir=dicom_dir, out=out, series=series, name=name, force=force, quiet=quiet)


@app.command("dicom-inspect")
@_guard
def dicom_inspect(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder of DICOM files (sub-folders searched).")],
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the description as JSON here.")] = None,
) -> None:
    """List the series of a DICOM folder: frames, slices, frame ordering, frame intervals (s) against the TR,
    and the checks an analysis runs (slice counts, per-frame rescaling, timing). Headers only."""
    from perfusion.cli.commands import run_dicom_inspect

    run_dicom_inspect(folder=folder, json_path=json_path)


@app.command()
@_guard
def bench(
    volumes: Annotated[str, typer.Option(help="Comma-separated standard volumes: clinical (128x128x24x80), high (256x256x30x120).")] = "clinical,high",
    dtypes: Annotated[str, typer.Option(help="Comma-separated data types of the volumes: int16, float32.")] = "int16,float32",
    repeats: Annotated[int, typer.Option(help="Runs per measurement (>= 1); the median is reported.")] = 3,
    kernels: Annotated[bool, typer.Option("--kernels/--no-kernels", help="Also one run per other deconvolution and leakage method (clinical volume).")] = True,
    compile_time: Annotated[bool, typer.Option("--compile/--no-compile", help="Measure numba's compilation: cold vs warm cache.")] = True,
    quick: Annotated[bool, typer.Option("--quick", help="Clinical int16 only, one run each, no extra kernels.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON (schema perfusion-bench/1).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Folder for the generated volumes (default ~/.cache/perfusion/bench).")] = None,
) -> None:
    """Time analyze on standard phantom volumes: end to end, per stage (voxels/s), memory, numba compile."""
    check_options(repeats=repeats)
    from perfusion.cli.commands import run_bench

    run_bench(volumes=volumes, dtypes=dtypes, repeats=repeats, kernels=kernels, compile_time=compile_time,
              quick=quick, json_out=json_out, cache=cache)


@app.command()
def version() -> None:
    """Print the version."""
    from perfusion import __version__
    typer.echo(f"perfusion {__version__}")


def main(args: list[str] | None = None) -> int:
    """Run the command line with ``args`` (default: sys.argv[1:]) and return the exit code."""
    try:
        app(args=args, prog_name="perfusion")
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def entry() -> None:
    sys.exit(main())
