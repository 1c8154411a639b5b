"""The ``perfusion`` command line: the typer app, its commands (one module each, registered here in the
order ``perfusion --help`` lists them) and the error guard, the one place errors become exit codes.

Exit codes: 0 ok, 1 internal error (a bug: please report it), 2 usage, 3 partial (batch), a bench regression or
a validate tolerance missed, 4 bad input, 5 output or disk.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup

from perfusion.cli import analyze, batch, bench, bids, compare, convert, dicom_inspect, phantom, report, validate
from perfusion.cli import export_dicom as export_dicom_cli
from perfusion.cli.options import Quiet
from perfusion.errors import EXIT_INTERNAL, EXIT_OUTPUT, WRITE_REFUSED_ERRNOS, PerfusionError

#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 internal error (a bug: please report it), 2 usage, 3 partial (batch), a bench "
    "regression (--fail-above) or a validate figure outside its tolerance, "
    "4 bad input, 5 output or disk, 130 interrupted (Ctrl-C)."
)


class Command(TyperCommand):
    """A command whose help and usage say values as a user types them, not as Python annotates them
    (typer 0.29 prints ``dsc... <list[Path]>`` and ``--roi <list[Path]>``): every option's value gets a
    metavar from its type (PATH, TEXT, INTEGER, FLOAT, SECONDS for a time option, WEEKS, or the choices
    of a Literal), a repeatable option says "(repeatable)", and the usage line names the arguments in
    capitals (``perfusion analyze [OPTIONS] DSC...``). Done once here, for every command, so that the
    option definitions (options.py and each command's module) need no metavar of their own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            plain_param(param)

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                label = argument_label(param)
                pieces.append(label if param.required else f"[{label}]")
        return pieces

    def format_options(self, ctx, formatter) -> None:
        """The Arguments and Options sections: typer's records, an argument named by its label alone."""
        sections: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                sections["Arguments"].append((argument_label(param), record[1]))
            else:
                sections["Options"].append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


class Group(TyperGroup):
    """The ``perfusion`` group: usage errors (an unknown option or command, a missing argument, a value
    of the wrong type) are one line in the tool's format, ``perfusion: error: <message> (see 'perfusion
    <command> --help')``, exit 2, as the commands' own errors (guard), whether run as a script, through
    :func:`main` or by typer's CliRunner."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) and not isinstance(result, bool) else 0
        except typer.Abort:
            typer.echo("perfusion: aborted", err=True)
            code = EXIT_INTERNAL
        except Exception as exc:
            if not is_usage_error(exc):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # `perfusion` alone: the help, as click shows it
                exc.show()
                code = exc.exit_code
                return _exit(code, standalone_mode)
            given = list(sys.argv[1:] if args is None else args)
            command = next((a for a in given if a in self.commands), None)  # for errors without a context
            typer.echo(usage_error_line(exc, fallback=f"perfusion {command}" if command else "perfusion"), err=True)
            code = exc.exit_code
        return _exit(code, standalone_mode)


def _exit(code: int, standalone_mode: bool) -> int:
    """End the process with ``code`` (a script, CliRunner) or return it (:func:`main`)."""
    if standalone_mode:
        sys.exit(code)
    return code


app = typer.Typer(
    cls=Group,
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


def is_usage_error(exc: BaseException) -> bool:
    """A command-line parsing error of typer's click (a ClickException: it formats its own message and
    carries its exit code), told apart without importing click, whose place inside typer changes."""
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


def usage_error_line(exc, *, fallback: str = "perfusion") -> str:
    """``perfusion: error: <message> (see '<command> --help')``: click's message on one line (its
    "Choose from" lists span several), without its closing full stop. The command is the error's
    context's, else ``fallback`` (an option's missing value is raised by the parser without one)."""
    message = " ".join(str(exc.format_message()).split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else ""
    where = path if path and path != "perfusion" else fallback
    return f"perfusion: error: {message} (see '{where} --help')"


def argument_label(param) -> str:
    """An argument as the usage line and help name it: its metavar (or name) in capitals, "..." when it
    takes several values."""
    return (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")


#: Metavars of the value types (the Python annotation under typer >= 0.20, click's type before).
_TYPE_METAVARS = {"Path": "PATH", "str": "TEXT", "int": "INTEGER", "float": "FLOAT",
                  "path": "PATH", "text": "TEXT", "integer": "INTEGER"}

#: Metavars of options with a unit (options._RANGES): the unit, not the type.
_UNIT_METAVARS = {" s": "SECONDS", " weeks": "WEEKS"}


def value_metavar(param) -> str | None:
    """The metavar of an option's value: the choices of a Literal or Enum as [a|b], the unit of a timed
    option (SECONDS), else its type (PATH, TEXT, INTEGER, FLOAT); None for a flag."""
    import typing

    from perfusion.cli.options import _RANGES

    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    unit = next((_RANGES[o][4] for o in param.opts if o in _RANGES), None)
    if unit in _UNIT_METAVARS:
        return _UNIT_METAVARS[unit]
    desc = getattr(param, "type_descriptor", None)
    if desc is None:  # typer before its own parameter types: click's
        kind = getattr(param.type, "name", "")
        return _TYPE_METAVARS.get(kind, kind.upper() or None)
    if desc.choices:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices) + "]"
    annotation = desc.annotation
    while typing.get_args(annotation) and typing.get_origin(annotation) is not typing.Literal:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))  # list[X], Optional[X]
    return _TYPE_METAVARS.get(getattr(annotation, "__name__", ""), "VALUE")


def plain_param(param) -> None:
    """Give an argument its capitalised name as metavar ("Missing argument 'DSC'"), an option the
    metavar of its value, and a repeatable option's help "(repeatable)"."""
    if param.param_type_name == "argument":
        param.metavar = param.metavar or param.name.upper()
        return
    if param.metavar is None:
        param.metavar = value_metavar(param)
    if getattr(param, "multiple", False) and "repeatable" not in (param.help or ""):
        param.help = f"{param.help} (repeatable)" if param.help else "Repeatable."


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
            ("convert", convert.convert), ("dicom-inspect", dicom_inspect.dicom_inspect),
            ("export-dicom", export_dicom_cli.export_dicom), ("bench", bench.bench),
            ("warmup", warmup))
for _name, _command in COMMANDS:
    app.command(_name, cls=Command)(guard(_command))


@app.command(cls=Command)
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
