"""Where the commands print: rich consoles, imported by each command only when it prints."""

from __future__ import annotations

#: Said once, on stderr, when numba starts compiling a kernel during a command (cache.on_first_compile),
#: or before batch's workers or bench's timed runs start while a kernel is not compiled yet. The time
#: is a default analysis's compilation on 2 idle cores (README "numba compilation").
COMPILE_NOTICE = ("perfusion: compiling the numerical kernels for this machine, once (numba keeps them for later "
                  "runs; about 15 s, longer on a busy machine)")


def console():
    """stdout, unwrapped in logs: rich wraps at 80 columns when stdout is not a terminal."""
    import sys

    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def console_err():
    """stderr (warnings and failed cases of a batch)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def compile_notice() -> None:
    """Print COMPILE_NOTICE on stderr (called from whichever thread numba compiles in)."""
    console_err().print(COMPILE_NOTICE, markup=False)
