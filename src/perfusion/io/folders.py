"""Output folders: checked before the analysis, held by one run, written by a staging folder.

:func:`check_output_folder` refuses a folder that cannot take the results before any work;
:func:`output_lock` keeps a second run out of the same folder; :func:`staged_output` writes into a
private folder and moves the files in only when the whole run succeeded, so a failed run leaves the
folder as it was.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from perfusion.errors import OutputError


def check_output_folder(out: Path, *, force: bool) -> None:
    """Refuse a non-empty output folder without ``force``, a path that is not a folder, a symbolic link
    (``out`` or a folder above it) whose target is missing, and a place that cannot take new entries:
    all before the analysis, not after it."""
    out = Path(out)
    for p in (out, *out.absolute().parents):
        if p.is_symlink() and not p.exists():  # a dangling link or a loop: nothing could be written there
            where = "" if p == out else f"{p}, a folder above it, "
            raise OutputError(f"{out}: {where}is a symbolic link to a missing target; create the target or "
                              "choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"{out}: folder is not empty; pass --force to write into it or choose another --out")
    # fail before the analysis, not after it: the nearest existing folder must take new entries
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())  # "/" at the latest
    if not existing.is_dir():
        raise OutputError(f"{out}: {existing} is not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write into {existing} (permission denied or read-only); choose another --out")


def _entry(path: Path) -> Path:
    """The directory entry ``path`` names: its folder resolved, its own name kept (a link stays a link)."""
    a = Path(path).absolute()
    return a.parent.resolve() / a.name


def _entries(paths) -> set[Path]:
    """Each path's directory entry and, for a symbolic link, the file it points to."""
    out: set[Path] = set()
    for p in paths:
        out.add(_entry(p))
        with contextlib.suppress(OSError, RuntimeError):
            out.add(Path(p).resolve())
    return out


def inputs_replaced_in(out: Path, inputs, names) -> list[Path]:
    """The input files (``inputs``: paths as given) that writing files ``names`` into folder ``out``
    would replace: an input whose directory entry, or whose target if it is a link, is ``out``/name."""
    folder = Path(out).resolve()
    targets = {folder / n for n in names}
    return [Path(p) for p in inputs if _entries([p]) & targets]


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold output folder ``out`` for one run: an exclusive flock(2) on the hidden file
    ``.<name>.lock`` beside it (its parent folders are made; removed again if ``out`` never appears).
    A second run into the same folder fails at once (OutputError) instead of replacing the first's
    files one by one. The kernel drops the lock with its process, so a run killed with SIGKILL leaves
    at most an unlocked file that the next run takes over; the file is removed when the run ends."""
    import fcntl
    import socket

    target = Path(out).resolve()  # a symlinked --out and its target share one lock
    parent, lock = target.parent, target.parent / f".{target.name}.lock"
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                _remove_empty(created)
                raise OutputError(f"{out}: another perfusion run is writing {out}; wait for it or choose another "
                                  "--out") from None
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
                os.close(fd)
                with contextlib.suppress(OSError):
                    lock.unlink()
                _remove_empty(created)
                raise OutputError(f"{out}: cannot lock the folder for this run ({exc.strerror}); choose an --out "
                                  "on a filesystem with file locks (a local disk, NFS)") from None
            try:  # the run that held it may have removed the file between our open and our lock
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())  # who holds it, for a person looking
        # staging folders of this --out left by a killed run (it held the lock, so no run is using them):
        # they hold a case's maps, which must not linger half-written
        for where in {Path(out).absolute().parent, parent, Path(out)}:
            if where.is_dir():
                for old in where.glob(f".{glob.escape(Path(out).name)}.partial-*"):
                    if old.is_dir() and not old.is_symlink():
                        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"{out}: cannot write here ({exc.strerror}); choose another --out") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        if not target.exists():
            _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders of ``created`` (innermost first) while they are empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool, stale=None, keep=()) -> Iterator[Path]:
    """Yield a private staging folder; on success move its files into ``out``, on failure remove it.

    A run that fails leaves ``out`` as it was. Each file lands by an atomic rename. ``stale``: a
    predicate on file names; files of ``out`` it accepts that the new run did not write are removed
    after the move (an earlier run's outputs, e.g. its report.html, must not pass for this run's),
    except the files of ``keep`` (the run's inputs: paths as given, links followed too).
    """
    out = Path(out)
    check_output_folder(out, force=force)
    parent = out if out.is_dir() else out.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # removed again on failure
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(stage, 0o777 & ~mask)  # mkdtemp makes 0700; the results follow the user's umask
    except OSError as exc:
        raise OutputError(f"{out}: cannot write here ({exc.strerror}); choose another --out") from None
    try:
        yield stage
        if not out.exists():
            os.rename(stage, out)
        else:
            written = set()
            for item in stage.iterdir():
                target = out / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
                written.add(item.name)
            stage.rmdir()
            if stale is not None:
                kept = _entries(keep)
                for old in out.iterdir():
                    if old.name not in written and old.is_file() and stale(old.name) and not _entries([old]) & kept:
                        old.unlink()
    except OSError as exc:
        _discard(stage, created)
        raise OutputError(f"{out}: writing the results failed ({exc.strerror or exc}); check free space and "
                          "permissions") from None
    except BaseException:
        _discard(stage, created)
        raise


def replace_folder(stage: Path, final: Path, aside: Path) -> None:
    """Put the folder ``stage`` in place of ``final`` by renames: an existing ``final`` is renamed to
    ``aside`` (beside it, a name of the caller's that its clean-up recognises) first and removed after,
    so ``final`` is at every moment either the old folder or the new one."""
    moved = final.exists()
    if moved:
        os.rename(final, aside)
    os.rename(stage, final)
    if moved:
        shutil.rmtree(aside, ignore_errors=True)


def _discard(stage: Path, created: list[Path]) -> None:
    """Remove a staging folder and the (empty) parent folders made for it."""
    shutil.rmtree(stage, ignore_errors=True)
    _remove_empty(created)
