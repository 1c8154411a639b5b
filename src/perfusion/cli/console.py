"""Where the commands print: rich consoles, imported by each command only when it prints."""

from __future__ import annotations

#: Said once, on stderr, when numba starts compiling a kernel during a command (cache.on_first_compile),
#: or before batch's workers or bench's timed runs start while a kernel is not compiled yet. The time
#: is a default analysis's compilation on 2 idle cores (README "numba compilation").
COMPILE_NOTICE = ("perfusion: compiling the numerical kernels for this machine, once (numba keeps them for later "
                  "runs; about 15 s, longer on a busy machine)")


def console(*, quiet: bool = False):
    """stdout (nothing with ``quiet``). On a terminal, its width; elsewhere (a log, a pipe) 120
    columns, which rich would otherwise take as 80, unless COLUMNS says the width (as a terminal's
    shell or a test does). Text is not wrapped (soft wrap); tables fit the width (wrap_table)."""
    import os
    import sys

    from rich.console import Console

    given = os.environ.get("COLUMNS", "").isdigit()
    return Console(highlight=False, soft_wrap=True, quiet=quiet,
                   width=None if sys.stdout.isatty() or given else 120)


def console_err():
    """stderr (warnings and failed cases of a batch)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def compile_notice() -> None:
    """Print COMPILE_NOTICE on stderr (called from whichever thread numba compiles in)."""
    console_err().print(COMPILE_NOTICE, markup=False)


class _Stages:
    """The stages of one command on a progress bar: ``stage(name)`` completes the previous stage (its
    share of the bar, 1 for a stage not in ``shares``: counted steps) and shows ``name``. Without a bar
    (``progress`` None) it does nothing."""

    def __init__(self, progress, shares: dict[str, float], total: float | None = None):
        self._progress, self._shares = progress, shares
        total = sum(shares.values()) if total is None else total
        self._task = progress.add_task("", total=total) if progress is not None else None
        self._current: str | None = None

    def stage(self, name: str) -> None:
        if self._progress is None:
            return
        done = self._shares.get(self._current, 1.0) if self._current is not None else 0.0
        self._current = name
        self._progress.update(self._task, advance=done, description=name)


def stage_progress(stages=(), *, total: int | None = None, quiet: bool = False):
    """A progress bar on stderr for a command made of ``stages`` ((name, share of the time) pairs, the
    shares measured on a typical run) or of ``total`` steps of about equal length: the stage's name, the
    bar, the time elapsed and the time remaining (rich's estimate from the shares done so far). Only on a
    terminal and without ``quiet``: in a log or a pipe nothing is added to what the command prints. A
    context manager yielding ``_Stages``; the bar is removed when the command ends (transient)."""
    import contextlib
    import sys

    @contextlib.contextmanager
    def bar():
        if quiet or not sys.stderr.isatty():
            yield _Stages(None, {})
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(bar_width=20), TimeElapsedColumn(),
                   TextColumn("elapsed, about"), TimeRemainingColumn(), TextColumn("left"))
        # stdout is left alone (a log of it keeps its lines); what is written to stderr meanwhile (numba's
        # compile notice) is printed above the bar
        with Progress(*columns, console=console_err(), transient=True, redirect_stdout=False) as progress:
            yield _Stages(progress, dict(stages), total)

    return bar()


def table(title: str, *columns: str, numbers=()):
    """A rich Table that stays readable from 80 columns up: every column wraps at spaces and folds a word
    longer than the column rather than cutting it with an ellipsis (rich's no_wrap columns would keep
    their width and push the others to "…"), so that no name is cut to nothing. The ``numbers`` columns
    (figures: one word each, never folded unless narrower than the figure) are right-aligned; their
    headers wrap at spaces ("analysis" / "s")."""
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, overflow="fold", justify="right" if col in numbers else "left")
    return t
