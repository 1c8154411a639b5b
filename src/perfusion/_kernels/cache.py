"""Where numba keeps the compiled kernels (``@njit(cache=True)``), decided before any kernel is defined.

numba picks a cache folder per function when it is decorated, trying in order (numba/core/caching.py,
``_CacheImpl._locator_classes``): ``NUMBA_CACHE_DIR``; the ``__pycache__`` folder beside the source
file; the user-wide cache (``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba``; ``~/Library/Caches/numba``
on macOS). A folder counts when it can be created and a temporary file written in it. When none
does (a container running as another user: a read-only installation and an unwritable HOME), numba
raises "cannot cache function" for every kernel, and every analysis stopped with an internal error.

:func:`configure` checks the same folders in the same order, without importing numba. When none is
writable it points ``NUMBA_CACHE_DIR`` at a private folder under the temporary folder (kept for later
runs); when that cannot be written either it turns numba's on-disk cache off, and the kernels are
compiled in every run (about 19 s; README "Performance"). It returns a one-line note for the user in
both cases, None otherwise, and decides once per process.

While a command runs, :func:`on_first_compile` holds a callback of the command line that runs when numba
starts compiling one of the package's kernels, once (jit.py's listener of numba's compile event calls
:func:`compiling`): the command line says so; this module prints nothing. Whether the kernels are
compiled yet, without compiling them: jit.needs_compile.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_decided = False
_disk_cache_off = False  # configure turned numba's disk cache off: every run compiles
_first_compile: Callable[[], Any] | None = None  # on_first_compile's callback, until it has run


def _writable(folder: Path) -> bool:
    """numba's own test (``_CacheLocator.ensure_cache_path``): the folder can be made and written."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except (OSError, ValueError):  # ValueError: a path with a NUL character
        return False
    return True


def user_wide_folder() -> Path:
    """numba's user-wide cache folder (numba/misc/appdirs.py, ``user_cache_dir``)."""
    if sys.platform == "darwin":
        return Path(os.path.expanduser("~/Library/Caches")) / "numba"
    if sys.platform == "win32":  # numba asks the Windows shell: use its own rule
        from numba.misc.appdirs import AppDirs

        return Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)
    return Path(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "numba"


def numba_would_cache() -> bool:
    """True when one of numba's own cache folders is writable for this package's kernels."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env and _writable(Path(env)):
        return True
    return _writable(Path(__file__).parent / "__pycache__") or _writable(user_wide_folder())


def private_tmp_folder() -> Path | None:
    """``<tmp>/perfusion-numba-<uid>``, made mode 0700; None when it cannot be made or is not ours
    (another user's folder of that name could hold planted cache files: numba unpickles them)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    folder = Path(tempfile.gettempdir()) / f"perfusion-numba-{uid if uid is not None else 'user'}"
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or (uid is not None and (st.st_uid != uid or st.st_mode & 0o022)):
        return None
    return folder if _writable(folder) else None


def _disable_disk_cache() -> None:
    """Make ``@njit(cache=True)`` compile in memory only: numba's dispatcher keeps its NullCache."""
    from numba.core.dispatcher import Dispatcher

    global _disk_cache_off
    _disk_cache_off = True
    Dispatcher.enable_caching = lambda self: None  # type: ignore[method-assign]  # on purpose: numba's own switch


def configure() -> str | None:
    """Make sure numba can cache or compile the kernels (see the module docstring); a note for the
    user when the cache moved or is off, None otherwise. Only the first call of a process decides."""
    global _decided
    if _decided:
        return None
    _decided = True
    if numba_would_cache():
        return None
    tried = "the package's __pycache__ and " + str(user_wide_folder())
    folder = private_tmp_folder()
    if folder is not None:
        os.environ["NUMBA_CACHE_DIR"] = str(folder)
        config = sys.modules.get("numba.core.config")
        if config is not None:  # numba read the variable when it was imported
            setattr(config, "CACHE_DIR", str(folder))  # noqa: B010  (a module attribute mypy cannot see)
        return (f"numba cannot write its cache of compiled kernels ({tried} are not writable); it is kept in "
                f"{folder} instead; set NUMBA_CACHE_DIR to a writable folder to choose another")
    _disable_disk_cache()
    return (f"numba cannot write its cache of compiled kernels ({tried} and the temporary folder "
            f"{tempfile.gettempdir()} are not writable); the kernels are compiled in every run (about 20 s); set "
            "NUMBA_CACHE_DIR to a writable folder to keep them")


def keeps_compiled() -> bool:
    """False when configure turned numba's disk cache off (every run compiles the kernels it calls)."""
    return not _disk_cache_off


def on_first_compile(callback: Callable[[], Any] | None) -> None:
    """Run ``callback`` (no arguments) when numba next starts compiling one of the package's kernels in
    this process, and only that once; None forgets a callback that has not run. numba compiles a kernel
    on its first call when its cache holds no version for the argument types, so the callback runs at
    most once a command, at the start of the first compilation (a warm cache never runs it)."""
    global _first_compile
    _first_compile = callback


def compiling() -> None:
    """numba starts compiling a kernel (jit.py's listener): the callback of on_first_compile, once. A
    callback that fails (a closed stderr) is dropped: a notice never stops the compilation."""
    global _first_compile
    callback, _first_compile = _first_compile, None
    if callback is not None:
        try:
            callback()
        except Exception:  # noqa: BLE001 - the notice is lost, the analysis goes on
            pass
