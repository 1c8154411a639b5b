"""Errors that the command line turns into exit codes.

Exit codes (documented in the README and ``perfusion --help``):
0 ok, 1 internal error (a bug), 2 usage, 3 partial (batch), a regression (bench --fail-above) or a
method outside its stated tolerance (validate), 4 bad input, 5 output or disk. Usage errors of the
command line's parser (an unknown option, a missing argument, a value of the wrong type) are exit 2
too, in the same one-line format (cli/app.py).
Library code raises these; only ``cli.py`` exits.
"""

import errno


class PerfusionError(Exception):
    """Base class: a problem the user can fix. The message is one line naming the file and the fix."""

    exit_code = 1


class UsageError(PerfusionError):
    """Options that do not fit together."""

    exit_code = 2


class InputError(PerfusionError):
    """An input file that cannot be used as it is."""

    exit_code = 4


class OutputError(PerfusionError):
    """The output folder cannot be written."""

    exit_code = 5


EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
#: ``perfusion validate``: a method's median error beyond its stated tolerance (tools/validate.py), as
#: batch's "some cases failed" and bench's regression: the run completed, part of it did not pass.
EXIT_TOLERANCE = EXIT_PARTIAL
EXIT_INPUT = 4
EXIT_OUTPUT = 5

#: errno values of a write the disk refused: full (ENOSPC), over quota (EDQUOT), beyond the file-size
#: limit (EFBIG), read-only (EROFS). Wherever they happen (staging, a temporary conversion, a cache)
#: they are exit 5, not a bug.
WRITE_REFUSED_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS") if hasattr(errno, n))
