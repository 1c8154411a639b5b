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
"""

from __future__ import annotations

from numba import njit

from perfusion._kernels.cache import configure as _configure_cache

_configure_cache()  # before the first decoration: numba picks each kernel's cache folder when it decorates it

#: Decorate every kernel and every helper a kernel calls with this.
kernel = njit(cache=True, nogil=True, error_model="numpy")
