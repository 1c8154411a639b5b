"""Where the commands print: rich consoles, imported by each command only when it prints."""

from __future__ import annotations


def console():
    """stdout, unwrapped in logs: rich wraps at 80 columns when stdout is not a terminal."""
    import sys

    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def console_err():
    """stderr (warnings and failed cases of a batch)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)
