"""Chunked voxel loops on threads (perfusion._kernels.parallel): the maps do not depend on the thread count.

Each chunk runs its BLAS product on one thread and then a serial numba kernel, so a voxel's result
depends only on its own curve and the chunk boundaries, never on which thread ran it: 1 and 2 threads
must give bit-identical arrays (not merely close ones).
"""

import numba
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from perfusion._kernels import parallel as _parallel

from perfusion.quantify import deconvolution

from perfusion.quantify import modelfit

from perfusion.tools import phantom
@pytest.fixture(scope="module")
def curves():
    """Noisy tissue curves of the phantom's sweep (delta R2*, 1/s) and its AIF: 3000 voxels, three
    chunks of modelfit.CHUNK and a ragged end."""
    ph = phantom.make_phantom(phantom.PhantomSpec(seed=3))
    aif = ph.aif
    rng = np.random.default_rng(0)
    mtt = rng.uniform(2, 12, 3000)
    cbf = rng.uniform(0.002, 0.015, 3000)
    tau = rng.uniform(-1, 4, 3000)
    c = np.stack([f * modelfit.model_curves(aif, tr=ph.spec.tr, mtt=m, lam=2.0, tau=t) for f, m, t in zip(cbf, mtt, tau)])
    c += 0.01 * rng.standard_normal(c.shape)
    c[17, 5] = np.nan  # an invalid voxel inside a chunk
    return aif, ph.spec.tr, c


def _with_threads(n, fn):
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        assert _parallel.n_threads() == n
        return fn()
    finally:
        numba.set_num_threads(old)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_model_fit_is_identical_on_one_and_two_threads(curves):
    aif, tr, c = curves
    op = modelfit.prepare(aif, tr=tr)
    one = _with_threads(1, lambda: modelfit.fit(op, c))
    two = _with_threads(2, lambda: modelfit.fit(op, c))
    for name in ("flow", "mtt", "lam", "delay", "sse", "valid"):
        assert_array_equal(getattr(one, name), getattr(two, name), err_msg=name)
    assert not one.valid[17] and one.valid.mean() > 0.99


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
@pytest.mark.parametrize("method", ["osvd", "tikhonov", "csvd"])
def test_deconvolution_is_identical_on_one_and_two_threads(curves, method):
    aif, tr, c = curves
    op = deconvolution.prepare(aif, tr=tr, method=method)
    one = _with_threads(1, lambda: deconvolution.deconvolve(op, c))
    two = _with_threads(2, lambda: deconvolution.deconvolve(op, c))
    assert_array_equal(one.residue, two.residue)
    assert_array_equal(one.k, two.k)
    assert np.all(np.isnan(one.residue[17])) or method == "csvd"


def test_run_chunks_covers_every_item_once_and_raises_a_chunk_error():
    seen = np.zeros(2500, int)

    def work(sl):
        seen[sl] += 1

    _parallel.run_chunks(work, 2500, 1024, threads=2)
    assert_array_equal(seen, 1)
    assert [(s.start, s.stop) for s in _parallel.chunks(2500, 1024)] == [(0, 1024), (1024, 2048), (2048, 2500)]

    def bad(sl):
        if sl.start == 1024:
            raise ValueError("chunk 2 failed")

    with pytest.raises(ValueError, match="chunk 2 failed"):
        _parallel.run_chunks(bad, 2500, 1024, threads=2)
