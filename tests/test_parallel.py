"""Chunked voxel loops on threads (perfusion._kernels.parallel): the maps do not depend on the thread count.

Every per-voxel kernel is a serial numba loop run on chunks of voxels by threads (after a BLAS product
on one thread, for the deconvolution and the model fit), so a voxel's result depends only on its own
curve, never on which thread ran it: 1 and 2 threads must give bit-identical arrays (not merely close
ones). Without the JIT (``make test-nojit``) the kernels are plain Python: the same cases run on fewer
voxels in smaller chunks.
"""

import dataclasses

import numba
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from naive import NOJIT
from perfusion._kernels import parallel as _parallel
from perfusion.quantify import aif as aif_mod
from perfusion.quantify import deconvolution, gammafit, leakage, modelfit, signal
from perfusion.tools import phantom

#: Voxels and voxels per chunk: three whole chunks and a ragged end.
N_VOX, CHUNK = (200, 64) if NOJIT else (3000, 1024)


@pytest.fixture(autouse=True)
def _chunk_size(monkeypatch):
    """Every chunked loop in chunks of CHUNK voxels (the package's own size under the JIT)."""
    monkeypatch.setattr(_parallel, "CHUNK", CHUNK)
    monkeypatch.setattr(deconvolution, "CHUNK", CHUNK)
    monkeypatch.setattr(modelfit, "CHUNK", CHUNK)


@pytest.fixture(scope="module")
def curves():
    """Noisy tissue curves of the phantom's sweep (delta R2*, 1/s) and its AIF: N_VOX voxels."""
    ph = phantom.make_phantom(phantom.PhantomSpec(seed=3))
    aif = ph.aif
    rng = np.random.default_rng(0)
    mtt = rng.uniform(2, 12, N_VOX)
    cbf = rng.uniform(0.002, 0.015, N_VOX)
    tau = rng.uniform(-1, 4, N_VOX)
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


def _arrays(x) -> list[np.ndarray]:
    """Every array in a result (dataclasses, tuples), in a fixed order."""
    if isinstance(x, np.ndarray):
        return [x]
    if dataclasses.is_dataclass(x):
        return [a for f in dataclasses.fields(x) for a in _arrays(getattr(x, f.name))]
    if isinstance(x, tuple):
        return [a for y in x for a in _arrays(y)]
    return []


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_curve_steps_are_identical_on_one_and_two_threads(curves):
    """The curve kernels (delta R2*, AIF features and k-means, the three leakage fits, gamma-variate
    windows and fit) run in chunks on threads as well."""
    aif, tr, c = curves
    base = slice(0, 8)
    sig = 800.0 * np.exp(-0.03 * c)
    x = np.abs(np.nan_to_num(c[:, :30]))
    x /= x.sum(axis=1, keepdims=True) + 1e-12
    ref = np.nanmean(c[::7], axis=0)

    def steps():
        d, s0, ratio_min, ratio_sd = signal.to_delta_r2s_with_ratio(sig, te=0.03, baseline=base)
        return (d, s0, ratio_min, ratio_sd, aif_mod.curve_features(d, ratio_min, ratio_sd, baseline=base, tr=tr),
                aif_mod.kmeans(x, x[:5]), leakage.bsw(c, ref, tr=tr, baseline=base),
                leakage.bidirectional(c, ref, tr=tr, baseline=base),
                leakage.residue_domain(c, aif, tr=tr, baseline=base), gammafit.fit_gamma_variate(c, tr=tr))

    one = _arrays(_with_threads(1, steps))
    two = _arrays(_with_threads(2, steps))
    assert len(one) == len(two) > 40
    for i, (a, b) in enumerate(zip(one, two)):
        assert_array_equal(a, b, err_msg=f"array {i}")


def test_run_chunks_covers_every_item_once_and_raises_a_chunk_error():
    seen = np.zeros(2500, int)

    def work(sl):
        seen[sl] += 1

    _parallel.run_chunks(work, 2500, 1024, threads=2)
    assert_array_equal(seen, 1)
    assert [(s.start, s.stop) for s in _parallel.chunks(2500, 1024)] == [(0, 1024), (1024, 2048), (2048, 2500)]
    assert _parallel.run_chunks(lambda sl: sl.stop - sl.start, 2500, 1024, threads=2) == [1024, 1024, 452]
    assert _parallel.run_chunks(lambda sl: sl.start, 2500, 1024, threads=1) == [0, 1024, 2048]
    assert _parallel.run_chunks(lambda sl: 1, 0) == []

    def bad(sl):
        if sl.start == 1024:
            raise ValueError("chunk 2 failed")

    with pytest.raises(ValueError, match="chunk 2 failed"):
        _parallel.run_chunks(bad, 2500, 1024, threads=2)
