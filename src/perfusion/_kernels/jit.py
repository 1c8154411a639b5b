"""``@kernel``: the one numba decorator of the kernels, its options chosen here once.

- ``cache=True``: compiled kernels are kept on disk. Where is decided by :func:`cache.configure`,
  which must run before the first decoration (numba picks a kernel's cache folder when it decorates
  it): importing this module runs it, and the kernel modules import ``kernel`` from here.
- ``nogil=True``: a kernel releases the GIL while it runs, so :func:`parallel.run_chunks` runs chunks
  of voxels on threads at the same time. Every voxel loop is serial inside its kernel; the threads are
  the only parallelism (no ``parallel=True``/``prange``: parallel.py says why).
- ``error_model="numpy"``: a division by 0 gives inf or NaN, as in numpy and in the kernels' numpy
  twins, instead of raising ZeroDivisionError in a worker thread. A helper kernel otherwise takes the
  error model of the first kernel that calls it (numba's ConfigStack inheritance), so one model for all
  also makes each helper compile the same way whichever kernel is compiled first.
- no ``fastmath``: sums stay in the order written, so each kernel matches its numpy twin to rounding
  and the maps do not change from run to run or machine to machine.
- one version per argument type, not per constant: numba types a constant argument of a call between
  kernels as a literal (``_sum(x, 0, n)`` passes ``Literal[int](0)``) and compiles the callee, and
  everything it calls, once more for it. Six helpers of curves.py had such a second version; without
  them a cold analysis of the sample phantom compiles 45 versions instead of 51, in about 10 % less
  time (14.8 against 16.3 CPU-s, medians of 3 alternating runs). The maps are identical (the arguments
  are the same integers). No kernel asks for a literal (``numba.literally``).
- every kernel is listed in :data:`KERNELS`: :func:`needs_compile` reads numba's cache index for each
  of them, without compiling, and ``tools/warm.py`` checks that it compiled them all. numba's "compile"
  event of any of them calls :func:`cache.compiling`, which tells the command line, once
  (``cache.on_first_compile``; cache.py imports no numba, so the command line sets it cheaply).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from typing import Any

from numba import njit
from numba.core import event, types
from numba.core.dispatcher import Dispatcher

from perfusion._kernels import cache as _cache

_cache.configure()  # before the first decoration: numba picks each kernel's cache folder when it decorates it

_njit = njit(cache=True, nogil=True, error_model="numpy")

#: Every kernel and helper made by ``@kernel`` so far, in the order they were defined (all_kernels
#: imports every kernel module first). Empty under NUMBA_DISABLE_JIT=1, where they are plain functions.
KERNELS: list[Dispatcher] = []
_KERNEL_IDS: set[int] = set()


def kernel(fn):
    """Decorate every kernel and every helper a kernel calls with this (the options above)."""
    disp = _njit(fn)
    if isinstance(disp, Dispatcher):  # under NUMBA_DISABLE_JIT=1 njit gives ``fn`` back
        _one_version_per_type(disp)
        KERNELS.append(disp)
        _KERNEL_IDS.add(id(disp))
    return disp


def _one_version_per_type(disp: Dispatcher) -> None:
    """Type calls of ``disp`` from other kernels on plain types (module docstring). numba resolves such
    a call through the callee's ``get_call_template``, which compiles the version for the types given."""
    resolve = disp.get_call_template

    def get_call_template(args, kws):
        return resolve(tuple(types.unliteral(a) for a in args), {k: types.unliteral(v) for k, v in kws.items()})

    disp.get_call_template = get_call_template  # type: ignore[method-assign]  # this kernel only


def all_kernels() -> dict[str, Dispatcher]:
    """Every kernel of the package by ``module.name`` (e.g. ``curves._gv_fit``), each kernel module
    imported first (pkgutil over perfusion._kernels): nothing is named by hand here."""
    import perfusion._kernels as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return {f"{d.py_func.__module__.rsplit('.', 1)[-1]}.{d.py_func.__qualname__}": d for d in KERNELS}


def needs_compile(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The package's kernels (``module.name``) that numba's cache holds no compiled version of for this
    machine, this numba and the kernel's current source; [] when every kernel has one. ``cache_dir``:
    look in that NUMBA_CACHE_DIR (the folder other processes are given, e.g. batch's workers) instead of
    the folder numba uses in this process. Reads the index files only: compiles nothing, loads no
    machine code (imports the kernel modules). [] when cache.configure turned the disk cache off:
    every run compiles, and its note says so. A kernel counts as compiled with any version (argument
    types): tools/warm.py compiles those the analyses call."""
    if not _cache.keeps_compiled():
        return []
    return [name for name, disp in all_kernels().items() if not _has_compiled_version(disp, cache_dir)]


def kernels_folder() -> str | None:
    """The folder numba keeps this process's compiled kernels in (None when nothing is kept: the disk
    cache is off, or NUMBA_DISABLE_JIT=1). Imports the kernel modules."""
    if not _cache.keeps_compiled():
        return None
    disp: Any = next(iter(all_kernels().values()), None)  # numba's Dispatcher; _cache is not in its stubs
    return None if disp is None else str(disp._cache.cache_path)


def _has_compiled_version(disp, cache_dir: str | os.PathLike | None) -> bool:
    """numba's own reading of a kernel's index (numba/core/caching.py: IndexDataCacheFile, stale when the
    numba version or the source file's time stamp and size differ); a version counts when its key names
    this machine (codegen's magic tuple) and the kernel's bytecode, and its data file exists."""
    from numba.core.caching import IndexDataCacheFile, UserProvidedCacheLocator

    impl = disp._cache._impl
    if cache_dir is None:
        folder, index = disp._cache.cache_path, disp._cache._cache_file
    else:
        sub = UserProvidedCacheLocator.get_suitable_cache_subpath(inspect.getfile(disp.py_func))
        folder = os.path.join(os.fspath(cache_dir), sub)
        index = IndexDataCacheFile(folder, impl.filename_base, impl.locator.get_source_stamp())
    try:
        versions = index._load_index()
    except Exception:  # noqa: BLE001 - a damaged index: numba compiles and rewrites it
        return False
    here = disp._cache._index_key((), disp.targetctx.codegen())[1:]
    return any(key[1:] == here and os.path.isfile(os.path.join(folder, data)) for key, data in versions.items())


class _CompileListener(event.Listener):
    """numba's "numba:compile" event starts only when a version is compiled, never when it is loaded
    from the cache: the first one of a kernel of ours calls cache.compiling()."""

    def on_start(self, ev) -> None:
        if id((ev.data or {}).get("dispatcher")) in _KERNEL_IDS:
            _cache.compiling()

    def on_end(self, ev) -> None:
        pass


event.register("numba:compile", _CompileListener())
