"""numba kernels of the curve steps (perfusion._kernels.curves) against their numpy twins
(tests/naive_curves.py) at KERNEL_RTOL, on random curves with NaN rows, float32 and float64.

The twins are the numpy code the domain modules ran before the kernels, so these tests also pin
that the kernels changed no result beyond rounding. Where a value is a difference of nearly equal
terms (a K2 near 0, a delta R2* near 0), rounding is relative to the terms: the atol is KERNEL_RTOL
times the array's largest value.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from conftest import KERNEL_RTOL
import naive_curves as naive
from naive import NOJIT
from perfusion._kernels import curves as kc
from perfusion._kernels import parallel as _parallel
from perfusion.quantify import gammafit
from perfusion.quantify import leakage
from perfusion.quantify.deconvolution import aif_matrix
from perfusion.tools.phantom import gamma_variate
from perfusion.quantify.signal import MIN_SIGNAL_RATIO

TR = 1.5


def _close(actual, desired):
    desired = np.asarray(desired, dtype=np.float64)
    finite = desired[np.isfinite(desired)]
    atol = KERNEL_RTOL * (np.abs(finite).max() if finite.size else 0.0)
    assert_allclose(actual, desired, rtol=KERNEL_RTOL, atol=atol)


def _curves(seed, n=60, n_t=50, dtype=np.float64):
    """Bolus curves (gamma variates of random timing and height) with noise, a flat row, a negative
    row, and rows holding a NaN or an inf."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_t) * TR
    c = np.array([gamma_variate(t, t0=rng.uniform(5, 30), alpha=rng.uniform(1.5, 5), beta=rng.uniform(0.8, 2.5))
                  for _ in range(n)])
    c *= rng.uniform(0.5, 40, (n, 1)) / c.max(axis=1, keepdims=True)
    c += rng.uniform(0.005, 0.1, (n, 1)) * c.max(axis=1, keepdims=True) * rng.standard_normal(c.shape)
    c[1] = 0.0
    c[2] = -np.abs(c[2])
    c[3, 7] = np.nan
    c[4] = np.nan
    c[5, 20] = np.inf
    return c.astype(dtype)


# --- signal


@pytest.mark.filterwarnings("ignore:Degrees of freedom")  # the one-frame baseline: SD NaN
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_delta_r2s_matches_numpy(seed, dtype):
    rng = np.random.default_rng(seed)
    n, n_t = 50, 40
    sig = rng.uniform(500, 1500, (n, 1)) * (1 - 0.5 * np.exp(-((np.arange(n_t) - 20) / 4.0) ** 2))
    sig = sig * (1 + 0.01 * rng.standard_normal((n, n_t)))
    sig[1] = 0.0  # S0 = 0: NaN curve, inf / NaN ratios
    sig[2] = -sig[2]  # S0 < 0
    sig[3, 30] = 0.0  # below the floor: capped
    sig[4, 3] = np.nan  # a NaN in the baseline
    sig[5, 25] = np.nan  # a NaN after it
    sig = sig.astype(dtype)
    for base in (np.arange(2, 12), np.arange(0, 1), np.arange(0, 40, 3)):
        out = np.empty((n, n_t))
        s0, rmin, rsd = np.empty(n), np.empty(n), np.empty(n)
        with np.errstate(invalid="ignore", divide="ignore"):
            kc._delta_r2s(sig, base, 0.03, MIN_SIGNAL_RATIO, out, s0, rmin, rsd)
            ref = naive.delta_r2s(sig, base, 0.03, MIN_SIGNAL_RATIO)
        for a, b in zip((out, s0, rmin, rsd), ref):
            assert_array_equal(np.isnan(a), np.isnan(b))
            _close(a, b)
    out32 = np.empty((n, n_t), np.float32)
    kc._delta_r2s(sig, np.arange(2, 12), 0.03, MIN_SIGNAL_RATIO, out32, s0, rmin, rsd)
    assert_array_equal(out32, naive.delta_r2s(sig, np.arange(2, 12), 0.03, MIN_SIGNAL_RATIO)[0].astype(np.float32))


# --- aif


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curve_features_match_numpy(seed, dtype):
    c = _curves(seed, dtype=dtype)
    n = c.shape[0]
    out = [np.empty(n), np.empty(n, np.int64), np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n),
           np.empty(n, bool)]
    kc._curve_features(c, np.arange(2, 10), TR, *out)
    ref = naive.curve_features(c, np.arange(2, 10), TR)
    for a, b in zip(out, ref):
        if b.dtype.kind in "bi":
            assert_array_equal(a, b)
        else:
            assert_array_equal(np.isnan(a), np.isnan(b))
            _close(np.where(np.isinf(b), 0.0, a), np.where(np.isinf(b), 0.0, b))
            assert_array_equal(a[np.isinf(b)], b[np.isinf(b)])
    assert_array_equal(out[-1][:6], [True, True, True, False, False, False])


def test_sum_is_numpys_to_the_last_bit():
    """Pairwise summation as numpy's: block sizes below 8, up to 128, and the halving above."""
    rng = np.random.default_rng(5)
    for n in (1, 7, 8, 11, 78, 128, 129, 255, 300, 1000):
        x = rng.standard_normal((3, n)) * 1e3
        assert kc._sum(x[1].copy(), 0, n) == np.sum(x, axis=1)[1]
        assert kc._sum(np.concatenate([[5.0], x[1]]), 1, n) == np.sum(x[1])


# --- leakage


def _aif(n_t=60):
    t = np.arange(n_t) * TR
    return 40 * gamma_variate(t, t0=12.0, alpha=3.0, beta=1.5) + 2.0 * (t > 20)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_residue_fixed_kep_matches_numpy(seed, dtype):
    c = _curves(seed, n_t=60, dtype=dtype)
    u, s, _ = np.linalg.svd(aif_matrix(_aif(), tr=TR, method="ssvd"))
    k = int(np.sum(s >= 0.2 * s[0]))
    rng = np.random.default_rng(seed)
    g, q = rng.standard_normal(60), np.cumsum(rng.uniform(0, 1, 60))
    n = c.shape[0]
    out = [np.empty(n), np.empty(n), np.empty(n), np.empty(c.shape), np.empty(c.shape)]
    kc._residue_fixed_kep(c, np.concatenate([u[:, :k], g[:, None]], axis=1), np.ascontiguousarray(u[:, :k].T), q,
                          40.0, 0.3, *out)
    ref = naive.residue_fixed_kep(c, g, u[:, k:], q, 40.0, 0.3)
    for a, b in zip(out, ref):
        assert_array_equal(np.isnan(a), np.isnan(b))
        _close(a, b)
    assert np.all(np.isnan(out[0][3:6])) and np.all(np.isfinite(out[0][6:]))


@pytest.mark.parametrize("gate_k", [-1.0, 0.0, 3.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_regressor_shared_matches_numpy(gate_k, dtype):
    c = _curves(3, dtype=dtype)
    r = np.nanmean(np.asarray(c[10:20], dtype=np.float64), axis=0)  # not a row: an exact fit's SSE is rounding
    q = leakage.exp_integral(r, tr=TR)
    rr, qq, rq = r @ r, q @ q, r @ q
    n = c.shape[0]
    for solvable in (True, False):
        out = [np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(c.shape), np.empty(c.shape),
               np.empty(n, bool)]
        kc._two_regressor_shared(c, r, q, rr, qq, rq, solvable, 48.0, 0.01, gate_k, *out)
        ref = naive.two_regressor_shared(c, r, q, rr, qq, rq, solvable, 48.0, 0.01, gate_k)
        for a, b in zip(out, ref):
            if b.dtype == bool:
                assert_array_equal(a, b)
            else:
                assert_array_equal(np.isnan(a), np.isnan(b))
                _close(a, b)
        finite = np.all(np.isfinite(c), axis=1)
        if not solvable:
            assert not out[-1].any() and np.all(np.isnan(out[1]))
        elif gate_k < 0:
            assert_array_equal(out[-1], finite)


@pytest.mark.parametrize("baseline", [None, slice(0, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_bidirectional_profile_matches_numpy(seed, dtype, baseline, monkeypatch):
    """leakage.bidirectional's profile fit (the products per chunk, then _bidirectional_profile per row)
    against its numpy form, in chunks of 16 rows on the package's threads. The kernel computes the grid's
    gains with the numpy form's arithmetic, term by term; the products, per chunk here and over all rows in
    the twin, may round differently, and kep (a parabola's vertex on a flat profile) magnifies that
    (measured: up to 9e-11 relative). The rest differs by summation order only; SE(K2), whose SSE is a
    difference of nearly equal terms where the model fits well, by up to 2e-10 relative, within the atol
    of the largest SE (see the module docstring)."""
    monkeypatch.setattr(_parallel, "CHUNK", 16)
    c = _curves(seed).astype(np.float64)
    ref = np.nanmean(c[10:20], axis=0)  # not a row: an exact fit's SSE is rounding
    rng = np.random.default_rng(seed)
    n = c.shape[0] - 20  # rows 20 on: the model with back flux at kep inside the grid, and noise
    kep = rng.uniform(0.003, 0.045, n)
    c[20:] = (rng.uniform(0.5, 2, (n, 1)) * ref - rng.uniform(-0.03, 0.03, (n, 1))
              * leakage.exp_integral(np.broadcast_to(ref, (n, ref.size)), tr=TR, kep=kep))
    c[20:] += rng.uniform(0.005, 0.2, (n, 1)) * rng.standard_normal((n, ref.size))
    c = c.astype(dtype)
    fit = leakage.bidirectional(c, ref, tr=TR, baseline=baseline)
    want = naive.bidirectional_profile(c, ref, TR, leakage.KEP_MAX, leakage.KEP_GRID_SIZE, baseline)
    got = (fit.k1, fit.k2, fit.kep, fit.k2_se, fit.r2, fit.leakage, fit.corrected)
    for a, b in zip(got, want):
        assert_array_equal(np.isnan(a), np.isnan(b))
        _close(a, b)
    assert_array_equal(fit.valid, want[-1])
    assert_array_equal(fit.applied, fit.valid)
    assert not fit.valid[3:6].any() and fit.valid[6:].all() and fit.valid[:3].all()
    inner = (fit.kep > 0) & (fit.kep < leakage.KEP_MAX)
    assert inner.sum() > 10  # the parabolic step, not only the grid's ends


# --- gamma-variate windows


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gv_windows_match_numpy(seed, dtype):
    c = _curves(seed, dtype=dtype)
    c[6, :30:2] = np.nan  # NaN frames on the rise
    c[7, 31:] = c[7].max()  # never falls: the window runs to the end, start alpha 3
    c[8] = np.abs(np.random.default_rng(seed).standard_normal(c.shape[1]))  # noise only: no bolus
    c[9, :] = 1.0
    c[9, 25] = 2.0  # a flat plateau (all first differences 0) with a spike: no foot below 10 %
    t = 3.0 + TR * np.arange(c.shape[1])
    kw = dict(tr=TR, rise_fraction=0.1, tail_fraction=0.5, pre_frames=3, min_snr=5.0)
    for kw2 in ({}, {"rise_fraction": 0.6, "tail_fraction": 0.7}, {"min_snr": 0.0}, {"min_snr": 40.0},
                {"pre_frames": 0}):
        args = {**kw, **kw2}
        got = gammafit._windows(c, t, **args)
        ref = naive.gamma_windows(c, t, **args, m_min=gammafit.M_MIN_TR * TR, alpha_bounds=gammafit.ALPHA_BOUNDS,
                                  fwhm_per_sd=gammafit._FWHM_PER_SD)
        for a, b in zip(got, ref):
            if b.dtype.kind == "i":
                assert_array_equal(a, b)
            else:
                assert_allclose(a, b, rtol=KERNEL_RTOL)
    assert np.sum(got[1] > 0) > 20  # most rows have a window


def test_above_noise_decides_as_the_median():
    """The counting shortcut of _above_noise against the median, on both sides of and at the boundary."""
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 49, 77):
        d = np.abs(rng.standard_normal(n))
        sd = 1.4826 * np.median(d) / np.sqrt(2.0)
        for peak in (sd * 5.0, np.nextafter(sd * 5.0, 0), sd * 4.9, sd * 5.1, sd * (5 + 1e-12), 1e-300, 1e300):
            for min_snr in (5.0, 0.0, -1.0):
                assert kc._above_noise(d.copy(), n, peak, min_snr) == (peak >= min_snr * sd)


@pytest.mark.parametrize("d", [3, 8, 20, 131])
def test_kmeans_matches_numpy_twin_to_the_last_bit(d):
    """aif.kmeans (assignment kernel, bincount centroids) against its numpy form: the same labels and
    bit-identical centroids, also with a duplicated centroid (ties go to the lower index) and a
    cluster that empties."""
    from naive_curves import kmeans as kmeans_twin
    from perfusion.quantify.aif import kmeans

    rng = np.random.default_rng(d)
    x = np.abs(rng.standard_normal((300 if NOJIT else 3000, d)))
    x /= x.sum(axis=1, keepdims=True)
    init = x[:5].copy()
    init[3] = init[1]  # a tie between clusters 1 and 3
    init[4] = 10.0  # far away: empties at once and keeps its centroid
    labels, cent = kmeans(x, init)
    labels_ref, cent_ref = kmeans_twin(x, init)
    np.testing.assert_array_equal(labels, labels_ref)
    np.testing.assert_array_equal(cent, cent_ref)
    assert not np.any(labels == 4) and np.all(cent[4] == 10.0)
    assert np.all(np.bincount(labels, minlength=5)[[0, 1, 2]] > 0)
