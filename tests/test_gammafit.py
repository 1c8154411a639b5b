"""Gamma-variate first-pass fit: the LM kernel against its numpy twin, noise-free recovery, agreement
with scipy's curve_fit on noisy curves, recirculation left out, and bad voxels coming back invalid.

Tolerances, each with its reason:
- KERNEL_RTOL (1e-10): kernel vs twin; the same steps, only rounding differs. The random curves are
  well sampled (m = alpha beta >= 3 s at TR 1.5 s) with noise <= 3 % of the peak (60 seeds x 40
  curves agree to 1e-11, measured). Where a fit crawls for 50+ steps along a flat valley, rounding
  is amplified beyond that: on the noisy phantom 52 of 4527 brain voxels differ by more than 1e-10
  (21 of them valid, up to 1e-4), all after 50+ steps and the valid ones with alpha 0.8-1.6, where
  the SSE has a kink at each sample time that t0 crosses.
- NOISE_FREE_RTOL (1e-6): noise-free samples of the model itself, so the fit converges to the exact
  parameters; the stopping rule (steps < 1.5e-8 of each scale, quadratic convergence) and
  conditioning leave at most 4e-11 (measured); 1e-6 is far inside the 1 % the issue asks for.
- CURVE_FIT_AREA_RTOL (0.02, from the issue): both fits minimise the same SSE on the same window;
  they differ only by their stopping rules (measured: area 4e-7, t0 1.2e-6 at most).
- Recirculation tolerances sit beside their tests, with the measured values.
"""

import dataclasses

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.integrate import trapezoid
from scipy.optimize import curve_fit
from scipy.special import gamma as gamma_fn

from conftest import KERNEL_RTOL
from naive import gamma_fit, gamma_model
from perfusion._kernels import curves as _kernels_curves
from perfusion.quantify import gammafit
from perfusion.quantify.gammafit import GammaFit, fit_gamma_variate
from perfusion.tools.phantom import FINE_DT_S, PhantomSpec, aif_curve, gamma_variate, tissue_curve

TR = 1.5
NOISE_FREE_RTOL = 1e-6
CURVE_FIT_AREA_RTOL = 0.02
FIELDS = ("k", "t0", "alpha", "beta", "area", "peak", "ttp", "fwhm", "quality")


def _random_curves(seed, n=40, n_t=50, noise=0.03):
    """Gamma variates with alpha 1.5-6, m = alpha beta 3-10 s, t0 8-30 s off the grid, peak 1-50,
    plus Gaussian noise of 0-``noise`` of the peak."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_t) * TR
    alpha = rng.uniform(1.5, 6, n)
    m = rng.uniform(3, 10, n)
    c = np.array([gamma_variate(t, t0=rng.uniform(8, 30), alpha=a, beta=mm / a) for a, mm in zip(alpha, m)])
    c *= rng.uniform(1, 50, (n, 1)) / c.max(axis=1, keepdims=True)
    return c + rng.uniform(0, noise, (n, 1)) * c.max(axis=1, keepdims=True) * rng.standard_normal(c.shape)


def _setup(c, t_first=0.0):
    t = t_first + TR * np.arange(c.shape[1])
    lo, hi, p0, lower, upper, _ = gammafit._windows(np.asarray(c, np.float64), t, tr=TR, rise_fraction=0.1,
                                                    tail_fraction=0.5, pre_frames=3, min_snr=5.0)
    return t, lo, hi, p0, lower, upper


def _run_kernel(c, t, lo, hi, p0, lower, upper, max_iter=100):
    """The kernel fit_gamma_variate uses (_kernels_curves._gv_fit)."""
    n = c.shape[0]
    out = (np.empty((n, 4)), np.empty(n), np.empty(n, np.int64), np.empty(n, np.int64))
    _kernels_curves._gv_fit(c, t, lo, hi, p0, lower, upper, max_iter, *out)
    return out


def _assert_matches_twin(c, t, lo, hi, p0, lower, upper, max_iter=100):
    p, sse, n_iter, status = _run_kernel(c, t, lo, hi, p0, lower, upper, max_iter)
    p_ref, sse_ref, n_iter_ref, status_ref = gamma_fit(c, t, lo, hi, p0, lower, upper, max_iter)
    assert_array_equal(status, status_ref)
    assert_array_equal(n_iter, n_iter_ref)
    assert_allclose(p, p_ref, rtol=KERNEL_RTOL)
    # atol: the SSE of a noise-free fit is rounding (1e-28); relative agreement means nothing there
    assert_allclose(sse, sse_ref, rtol=KERNEL_RTOL, atol=1e-20)
    return p, status


# --- kernel vs twin ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_matches_twin_on_random_curves(seed):
    c = _random_curves(seed)
    _, status = _assert_matches_twin(c, *_setup(c))
    assert np.all(status == 1)  # these all converge (within 10 iterations, measured)


def test_kernel_matches_twin_on_noise_free_curves():
    c = _random_curves(3, n=10, noise=0.0)
    _assert_matches_twin(c, *_setup(c))


def test_kernel_matches_twin_on_edge_cases():
    """NaN frames inside the window, an all-zero voxel and an all-NaN voxel given a window anyway,
    a fit held on a bound (active set), too few finite samples, one iteration only."""
    c = _random_curves(4, n=6)
    t, lo, hi, p0, lower, upper = _setup(c)
    c[0, lo[0] + 1] = np.nan
    c[0, (lo[0] + hi[0]) // 2] = np.nan
    c[1] = 0.0
    c[2] = np.nan
    upper[3, 1] = p0[3, 1] - 2 * TR  # t0 capped well before the truth: ends on the bound
    upper[3, 2] = upper[3, 2] + 2 * TR
    p0[3, 1] = upper[3, 1]
    c[4, lo[4]:hi[4] - 3] = np.nan  # three finite samples left: not fitted
    p, status = _assert_matches_twin(c, t, lo, hi, p0, lower, upper)
    assert status[0] == 1
    assert status[1] == 1 and p[1, 0] < 1e-9 * p0[1, 0]  # the peak goes to 0
    assert status[2] == -1 and np.all(np.isnan(p[2]))
    assert p[3, 1] == upper[3, 1]
    assert status[4] == -1 and np.all(np.isnan(p[4]))
    _assert_matches_twin(c, t, lo, hi, p0, lower, upper, max_iter=1)


def test_kernel_matches_twin_on_single_voxel_and_float32():
    c = _random_curves(5, n=3)
    t, lo, hi, p0, lower, upper = _setup(c)
    _assert_matches_twin(c[1:2].copy(), t, lo[1:2], hi[1:2], p0[1:2], lower[1:2], upper[1:2])
    _assert_matches_twin(c.astype(np.float32), t, lo, hi, p0, lower, upper)


# --- noise-free recovery --------------------------------------------------------------------------

CASES = [  # (alpha, beta s, t0 s): t0 off the 1.5 s grid; alpha * beta from 1.2 s to 4.8 s
    (3.0, 1.5, 20.3),
    (1.5, 3.0, 17.7),
    (5.0, 0.8, 25.1),
    (2.2, 2.5, 12.9),
    (8.0, 0.5, 30.4),
    (1.2, 4.0, 19.2),
    (12.0, 0.3, 22.2),
]


@pytest.mark.parametrize("t_first", [0.0, 4.5])
def test_noise_free_parameters_are_recovered(t_first):
    t = t_first + np.arange(60) * TR
    k = 7.0
    c = np.array([k * gamma_variate(t, t0=t0, alpha=a, beta=b) for a, b, t0 in CASES])
    fit = fit_gamma_variate(c, tr=TR, t_first=t_first)
    alpha, beta, t0 = np.array(CASES).T
    assert fit.valid.all()
    assert_allclose(fit.k, k, rtol=NOISE_FREE_RTOL)
    assert_allclose(fit.alpha, alpha, rtol=NOISE_FREE_RTOL)
    assert_allclose(fit.beta, beta, rtol=NOISE_FREE_RTOL)
    assert_allclose(fit.t0, t0, rtol=NOISE_FREE_RTOL)
    area = k * beta ** (alpha + 1) * gamma_fn(alpha + 1)
    assert_allclose(fit.area, area, rtol=NOISE_FREE_RTOL)
    assert_allclose(fit.ttp, t0 + alpha * beta, rtol=NOISE_FREE_RTOL)
    assert_allclose(fit.peak, k * (alpha * beta) ** alpha * np.exp(-alpha), rtol=NOISE_FREE_RTOL)
    assert np.all(fit.quality < 1e-6)


def test_area_and_fwhm_formulas_match_numerical_integration():
    """Closed forms (Gamma function, Lambert W) against the model on a 1e-4 s grid."""
    dt = 1e-4
    t = np.arange(0, 120, dt)
    for a, b, t0 in CASES:
        y = gamma_variate(t, t0=t0, alpha=a, beta=b)
        peak, m = y.max(), a * b
        # 1e-6: the trapezoid on a 1e-4 s grid (error O(dt^2) on a smooth curve; the kink at t0
        # of alpha = 1.2 costs dt^2.2 relative)
        assert_allclose(gammafit.gamma_area(peak, m, a), trapezoid(y, dx=dt), rtol=1e-6)
        above = t[y >= 0.5 * peak]
        # 2 dt: the half-maximum crossings on the grid are each within one step
        assert_allclose(gammafit.gamma_fwhm(m, a), above[-1] - above[0], atol=2 * dt)


# --- noisy curves against scipy -------------------------------------------------------------------

def test_noisy_areas_agree_with_scipy_curve_fit():
    rng = np.random.default_rng(11)
    t = np.arange(60) * TR
    truth = [(3.0, 1.5, 20.3, 30.0), (2.0, 2.5, 15.8, 5.0), (4.5, 1.1, 25.6, 60.0), (2.6, 2.0, 18.4, 3.0)]
    clean = np.array([gamma_variate(t, t0=t0, alpha=a, beta=b) for a, b, t0, _ in truth])
    clean *= np.array([pk for *_, pk in truth])[:, None] / clean.max(axis=1, keepdims=True)
    c = clean + 0.27 * rng.standard_normal(clean.shape)  # the phantom's delta R2* noise SD (1/s)
    fit = fit_gamma_variate(c, tr=TR)
    assert fit.valid.all()
    _, lo, hi, p0, lower, upper = _setup(c)
    for v in range(c.shape[0]):
        sl = slice(lo[v], hi[v])
        popt, _ = curve_fit(lambda x, *p: gamma_model(x, p), t[sl], c[v, sl], p0=p0[v],
                            bounds=(lower[v], upper[v]), method="trf", xtol=1e-12, ftol=1e-12, gtol=1e-12)
        area_ref = gammafit.gamma_area(popt[0], popt[2], popt[3])
        assert_allclose(fit.area[v], area_ref, rtol=CURVE_FIT_AREA_RTOL)
        assert_allclose(fit.t0[v], popt[1], rtol=CURVE_FIT_AREA_RTOL)
    # quality is the RMS residual over the peak: about noise SD / peak for a good fit
    assert np.all(fit.quality < 3 * 0.27 / fit.peak)


# --- recirculation --------------------------------------------------------------------------------

def _fine_sampled(spec, *, tissue=None, n=80):
    t_fine = np.arange(0.0, n * TR + 40.0, FINE_DT_S)
    a = aif_curve(t_fine, spec)
    curve = a if tissue is None else tissue_curve(a, t_fine, **tissue)
    idx = np.arange(n) * int(round(TR / FINE_DT_S))
    return curve, curve[idx]


@pytest.mark.parametrize("tissue", [None, {"cbf": 40.0, "mtt": 2.0}, {"cbf": 40.0, "mtt": 4.0}])
def test_recirculating_pass_is_left_out(tissue):
    """AIF and tissue with the phantom's recirculation (a second pass holding 20 % of the first's
    area, 8 s later) but no plateau: the fitted area is close to the first pass alone.
    Measured: +0.02 % (AIF), +1.1 % (MTT 2 s), +3.0 % (MTT 4 s); 5 %: the 8 s-late pass already
    adds under the tail of the wider tissue curves before they fall to half their peak."""
    first_fine, _ = _fine_sampled(PhantomSpec(recirculation_fraction=0.0, plateau_fraction=0.0), tissue=tissue)
    _, sampled = _fine_sampled(PhantomSpec(plateau_fraction=0.0), tissue=tissue)
    fit = fit_gamma_variate(sampled[None, :], tr=TR)
    first_pass = trapezoid(first_fine, dx=FINE_DT_S)
    assert fit.valid[0]
    assert_allclose(fit.area[0], first_pass, rtol=0.05)
    assert fit.area[0] < 0.9 * trapezoid(sampled, dx=TR)  # the full curve holds 20 % more


def test_default_phantom_aif_area_is_first_pass():
    """The default AIF adds recirculation and a plateau that rises under the first pass (4 % of the
    peak at the peak): the fit cannot separate the plateau there. Measured: fitted area 1.097 x the
    first pass, trapezoid of all 80 frames 1.99 x; 12 % bounds the first, 0.6 x tests the second."""
    first_fine, _ = _fine_sampled(PhantomSpec(recirculation_fraction=0.0, plateau_fraction=0.0))
    _, sampled = _fine_sampled(PhantomSpec())
    fit = fit_gamma_variate(sampled[None, :], tr=TR)
    first_pass = trapezoid(first_fine, dx=FINE_DT_S)
    assert fit.valid[0]
    assert_allclose(fit.area[0], first_pass, rtol=0.12)
    assert fit.area[0] < 0.6 * trapezoid(sampled, dx=TR)


# --- invalid voxels and input ---------------------------------------------------------------------

def test_failures_are_invalid_nan_without_raising():
    rng = np.random.default_rng(7)
    t = np.arange(60) * TR
    good = 20 * gamma_variate(t, t0=20.3, alpha=3, beta=1.5)
    early = 20 * gamma_variate(t, t0=-1.0, alpha=3, beta=1.5)  # bolus before the first frame: no foot
    c = np.stack([good, 0.3 * rng.standard_normal(t.size), np.zeros(t.size), np.full(t.size, np.nan),
                  np.full(t.size, 5.0), early, -good])
    with np.errstate(all="raise"):
        fit = fit_gamma_variate(c, tr=TR)
    assert_array_equal(fit.valid, [True, False, False, False, False, False, False])
    for name in FIELDS:
        values = getattr(fit, name)
        assert values.shape == (c.shape[0],)
        assert np.all(np.isnan(values[1:])), name
        assert np.all(np.isfinite(values[:1])), name


def test_nan_frames_are_skipped():
    t = np.arange(60) * TR
    good = 20 * gamma_variate(t, t0=20.3, alpha=3, beta=1.5)
    holed = good.copy()
    holed[[5, 15, 16]] = np.nan  # in the baseline and on the rise
    fit = fit_gamma_variate(np.stack([good, holed]), tr=TR)
    assert fit.valid.all()
    assert_allclose(fit.area[1], fit.area[0], rtol=NOISE_FREE_RTOL)


def test_dtypes_single_voxel_and_layouts_agree():
    c = _random_curves(8, n=7)
    ref = fit_gamma_variate(c, tr=TR)
    one = fit_gamma_variate(c[2:3], tr=TR)
    for name in FIELDS:
        assert_array_equal(getattr(one, name), getattr(ref, name)[2:3])
    f32 = fit_gamma_variate(c.astype(np.float32), tr=TR)
    assert_array_equal(f32.valid, ref.valid)
    # 1e-6: the float32 rounding of the data (6e-8 relative) moves the minimum by about as much
    # (measured 1.3e-8)
    assert_allclose(f32.area, ref.area, rtol=1e-6)
    strided = fit_gamma_variate(np.asfortranarray(c), tr=TR)
    for name in FIELDS:
        assert_array_equal(getattr(strided, name), getattr(ref, name))


def test_result_is_frozen_with_units():
    fit = fit_gamma_variate(_random_curves(9, n=2), tr=TR)
    assert isinstance(fit, GammaFit)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.k = fit.k
    units = {f.name: f.metadata["unit"] for f in dataclasses.fields(GammaFit)}
    assert units["t0"] == units["beta"] == units["ttp"] == units["fwhm"] == "s"
    assert units["peak"] == "1/s"
    assert fit.valid.dtype == bool


@pytest.mark.parametrize("curves,kwargs", [
    (np.zeros(50), {"tr": TR}),  # 1-D
    (np.zeros((2, 4)), {"tr": TR}),  # fewer frames than needed
    (np.zeros((2, 50)), {"tr": 1500.0}),  # milliseconds
    (np.zeros((2, 50)), {"tr": 0.0}),
    (np.zeros((2, 50)), {"tr": TR, "tail_fraction": 0.05}),  # below the rise fraction
    (np.zeros((2, 50)), {"tr": TR, "max_iter": 0}),
])
def test_bad_input_raises(curves, kwargs):
    with pytest.raises(ValueError):
        fit_gamma_variate(curves, **kwargs)
