"""Compile the numerical kernels for this machine ahead of the first analysis (``perfusion warmup``;
``make install`` runs it).

numba compiles a kernel on its first call, for the types of the arguments it is called with, and keeps
the result in its cache (_kernels/cache.py says where); a cold start of the sample phantom's analysis
spent about 13 s of its 16 s compiling. The types are the pipeline's own: rather than keep a list of
signatures beside the kernels, the warmer runs the analysis as ``perfusion analyze`` does (a small
phantom written as NIfTI and loaded back, a brain mask and two lesion ROIs, which add the ROI leakage
comparison), with the default options first, then with every other ``--method`` and ``--leakage``
(config.METHODS, config.LEAKAGE_METHODS). Each kernel compiled by one run is reused by the next.

One process, one analysis after the other: numba compiles under one global lock, so threads would not
compile at the same time, and two processes would both compile the kernels every analysis calls (delta
R2*, the curve features, k-means, the gamma-variate fits: about two thirds of the time) and write the
same cache entries at once (numba issue 4807).

Which kernels exist comes from the ``@kernel`` registry (jit.all_kernels); :func:`warm` returns those
still without a compiled version afterwards (jit.needs_compile): tests/test_cold_start.py fails when
one is left, and a kernel that only a new option reaches then needs that option added here.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from perfusion.config import LEAKAGE_METHODS, METHODS, Config
from perfusion.errors import PerfusionError
from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

if TYPE_CHECKING:
    from perfusion.config import LeakageMethod, Method

#: The warmer's phantom: the sample phantom's layout on a 24 x 24 matrix (5 slices, 80 frames), small
#: enough that each analysis takes a fraction of a second once its kernels are compiled.
SPEC = PhantomSpec(matrix=24)


@dataclass(frozen=True)
class Warmed:
    """What :func:`warm` did: wall seconds, kernel versions compiled and loaded from numba's cache,
    the kernels left without a compiled version (none when every kernel was reached), the analyses
    that stopped with an error (their options and the message; none expected), and the cache folder
    numba used in this process."""

    seconds: float
    compiled: int
    loaded: int
    missing: list[str]
    failed: list[str]
    cache_folder: str


def configurations() -> list[Config]:
    """The default options, then every other method (default leakage correction) and every other
    leakage correction (default method), each once."""
    from perfusion.case import make_config

    configs = [make_config()]
    configs += [make_config(method=cast("Method", m)) for m in METHODS if m != configs[0].method]
    configs += [make_config(leakage=cast("LeakageMethod", lk)) for lk in LEAKAGE_METHODS]
    unique: list[Config] = []
    for c in configs:
        if c not in unique:
            unique.append(c)
    return unique


def warm() -> Warmed:
    """Run the analyses of :func:`configurations` on the warmer's phantom (in a temporary folder, nothing
    else written), so that numba compiles, or loads from its cache, every kernel with the argument types
    the pipeline gives it."""
    from perfusion._kernels.jit import all_kernels, kernels_folder, needs_compile
    from perfusion.case import compute_case

    t0 = time.perf_counter()
    failed = []
    with tempfile.TemporaryDirectory(prefix="perfusion-warmup-") as tmp:
        paths = write_phantom(make_phantom(SPEC), Path(tmp))
        rois = [paths[name] for name in SPEC.lesions]
        for config in configurations():
            try:
                compute_case(config, dsc=paths["dsc"], mask=paths["brain"], rois=rois)
            except PerfusionError as exc:  # the other analyses still compile their kernels
                failed.append(f"--method {config.method} --leakage {config.leakage}: {exc}")
    stats = [d.stats for d in all_kernels().values()]
    return Warmed(seconds=time.perf_counter() - t0, compiled=sum(sum(s.cache_misses.values()) for s in stats),
                  loaded=sum(sum(s.cache_hits.values()) for s in stats), missing=needs_compile(), failed=failed,
                  cache_folder=kernels_folder() or "")


def warm_if_needed(cache_dir: str | None = None, *, on_compile: Callable[[], Any] | None = None) -> bool:
    """Before work that other processes do with numba's cache folder ``cache_dir`` (batch's workers;
    None: the folder this process uses, as bench's timed runs do): when a kernel has no compiled version
    there, call ``on_compile`` and run ``perfusion warmup`` in a process of its own with that folder
    (numba fixes a process's folder when the kernels are defined), so that the work starts warm and
    several workers do not compile the same kernels at once. True when it warmed. A warm-up that fails
    is not an error here: the workers then compile what they need, as without it."""
    import os
    import subprocess
    import sys

    from perfusion._kernels.jit import needs_compile

    if not needs_compile(cache_dir):
        return False
    if on_compile is not None:
        on_compile()
    env = {**os.environ, **({"NUMBA_CACHE_DIR": str(cache_dir)} if cache_dir else {})}
    subprocess.run([sys.executable, "-m", "perfusion", "warmup", "-q"], env=env, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return True
