"""The ``perfusion`` command line: the typer app, its commands (one module each, registered here in the
order ``perfusion --help`` lists them) and the error guard, the one place errors become exit codes.

Exit codes: 0 ok, 1 internal error (a bug: please report it), 2 usage, 3 partial (batch) or a bench regression,
4 bad input, 5 output or disk.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer

from perfusion.cli import analyze, batch, bench, bids, compare, convert, dicom_inspect, phantom, report, validate
from perfusion.cli.options import Quiet
from perfusion.errors import EXIT_INTERNAL, EXIT_OUTPUT, WRITE_REFUSED_ERRNOS, PerfusionError

#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 internal error (a bug: please report it), 2 usage, 3 partial (batch) or a bench "
    "regression (--fail-above), "
    "4 bad input, 5 output or disk, 130 interrupted (Ctrl-C)."
)

app = typer.Typer(
    name="perfusion",
    help="DSC-MRI perfusion maps and lesion scoring. For research and decision support only; "
         "not a medical device and not a diagnosis.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


def guard(fn):
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
                return _with_kernel_notes(fn, args, kwargs)
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


def _with_kernel_notes(fn, args, kwargs):
    """Run a command after deciding where numba keeps the compiled kernels (cache.configure: a note when
    it is not the usual place), saying once, on stderr, when numba starts compiling a kernel (a cold
    cache: cache.on_first_compile). Neither is said with --quiet, nor the second when nothing is kept."""
    from perfusion._kernels import cache

    note = cache.configure()  # before any kernel module is imported (numba-free, a few file checks)
    quiet = bool(kwargs.get("quiet"))
    if note and not quiet:
        typer.echo(f"perfusion: warning: {note}", err=True)
    if not quiet and cache.keeps_compiled():
        from perfusion.cli.console import compile_notice

        cache.on_first_compile(compile_notice)
    try:
        return fn(*args, **kwargs)
    finally:
        cache.on_first_compile(None)


def _internal(exc: Exception):
    typer.echo(f"perfusion: internal error ({type(exc).__name__}: {exc}); "
               "please report it with the command you ran", err=True)
    raise typer.Exit(code=EXIT_INTERNAL) from None


def warmup(quiet: Quiet = False) -> None:
    """Compile the numerical kernels for this machine now, so that no analysis waits for them (make
    install runs this; kernels already compiled are loaded, not compiled again)."""
    from perfusion.tools.warm import warm

    done = warm()
    for what in done.failed:  # neither is expected (tests/test_cold_start.py): said, never fatal to an install
        typer.echo(f"perfusion: warning: warm-up analysis {what}", err=True)
    for name in done.missing:
        typer.echo(f"perfusion: warning: kernel {name} was not compiled ahead; the first analysis that needs it "
                   "compiles it", err=True)
    if not quiet:
        what = (f"compiled in {done.seconds:.1f} s" if done.compiled else
                f"were already compiled (loaded in {done.seconds:.1f} s)")
        typer.echo(f"The numerical kernels {what}; numba keeps them in {done.cache_folder}")


#: The commands in the order of ``perfusion --help``: (name, function); each runs inside guard.
COMMANDS = (("analyze", analyze.analyze), ("phantom", phantom.phantom), ("validate", validate.validate),
            ("report", report.report), ("compare", compare.compare), ("batch", batch.batch), ("bids", bids.bids),
            ("convert", convert.convert), ("dicom-inspect", dicom_inspect.dicom_inspect), ("bench", bench.bench),
            ("warmup", warmup))
for _name, _command in COMMANDS:
    app.command(_name)(guard(_command))


@app.command()
def version() -> None:
    """Print the version."""
    from perfusion import __version__
    typer.echo(f"perfusion {__version__}")


def _version_flag(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                            callback=_version_flag)) -> None:
    """The top command's own option (--version); its help text is the app's (``app``'s help)."""


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
