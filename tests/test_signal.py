"""signal.py: signal -> delta R2* (on real OSIPI curves and by hand), baseline finding, brain mask."""

import numpy as np
import pytest
import scipy.io
from numpy.testing import assert_allclose, assert_array_equal

from conftest import shared_dir
from perfusion.quantify import signal
from perfusion.quantify.signal import MIN_SIGNAL_RATIO, BaselineError, auto_brain_mask, find_baseline, otsu_threshold, to_delta_r2s

# ----------------------------------------------------------------------------------- to_delta_r2s

#: The OSIPI README gives the curve peaks to 3-4 significant digits (e.g. 1.58, 9.28), so a
#: rounding of up to half a unit in the last digit (0.005 / 1.58 = 3.2e-3) must pass.
README_PEAK_RTOL = 5e-3
#: The tumour TE2 area is given as -375.3 (4 significant digits: rounding error <= 0.05 / 375 = 1.3e-4).
README_AREA_RTOL = 1e-3
#: Same formula written out by hand in float64; only operation order can differ.
FORMULA_RTOL = 1e-12

OSIPI_BASELINE = slice(0, 40)  # the upstream notebook's baseline: frames 0-39


@pytest.fixture(scope="module")
def osipi():
    d = scipy.io.loadmat(shared_dir("osipi-lcb-bni-dual-echo") / "data.mat")
    return {
        "tumor": d["tumor_SIt"],
        "nawm": d["NAWM_SIt"],
        "aif": d["AIF_SIt"],
        "te": (float(np.squeeze(d["TE1"])), float(np.squeeze(d["TE2"]))),
    }


def _dr2s(osipi, roi, echo):
    rows = osipi[roi][echo : echo + 1]  # (1, 121) uint16: one echo of one ROI
    r, s0 = to_delta_r2s(rows, te=osipi["te"][echo], baseline=OSIPI_BASELINE)
    assert r.shape == (1, 121) and s0.shape == (1,)
    return r[0]


def test_osipi_timing_is_as_documented(osipi):
    assert osipi["te"] == (0.002, 0.030)


@pytest.mark.parametrize(
    "roi, echo, peak",
    [
        ("tumor", 1, 1.58),  # tumour at TE2
        ("nawm", 1, 9.28),  # NAWM at TE2
        ("aif", 0, 24.81),  # AIF at TE1
        ("aif", 1, 28.96),  # AIF at TE2
    ],
)
def test_osipi_curve_peaks(osipi, roi, echo, peak):
    r = _dr2s(osipi, roi, echo)
    assert np.all(np.isfinite(r))
    assert_allclose(r.max(), peak, rtol=README_PEAK_RTOL)
    # README: "All peak near frames 47-50".
    assert 47 <= int(np.argmax(r)) <= 50


def test_osipi_tumour_te2_area_is_negative(osipi):
    # T1 leakage makes the post-bolus TE2 signal overshoot the baseline: negative area.
    r = _dr2s(osipi, "tumor", 1)
    assert_allclose(np.trapezoid(r), -375.3, rtol=README_AREA_RTOL)


def test_osipi_s0_is_baseline_mean(osipi):
    rows = osipi["nawm"]
    _, s0 = to_delta_r2s(rows, te=0.03, baseline=OSIPI_BASELINE)
    # uint16 input must be averaged in float, not in uint16 (no overflow or truncation).
    assert_allclose(s0, rows[:, :40].astype(np.float64).mean(axis=1), rtol=FORMULA_RTOL)


def test_formula_by_hand():
    s = np.array([[100.0, 102.0, 98.0, 50.0, 75.0, 101.0], [10.0, 10.0, 10.0, 5.0, 2.5, 20.0]])
    te = 0.025
    r, s0 = to_delta_r2s(s, te=te, baseline=slice(0, 3))
    s0_hand = np.array([(100.0 + 102.0 + 98.0) / 3, 10.0])
    expected = np.empty_like(s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            expected[i, j] = -np.log(s[i, j] / s0_hand[i]) / te
    assert_allclose(s0, s0_hand, rtol=FORMULA_RTOL)
    assert_allclose(r, expected, rtol=FORMULA_RTOL, atol=0)
    # Spot values: S = S0/2 gives ln 2 / TE; S = 2 S0 gives -ln 2 / TE.
    assert_allclose(r[1, 3], np.log(2.0) / te, rtol=FORMULA_RTOL)
    assert_allclose(r[1, 5], -np.log(2.0) / te, rtol=FORMULA_RTOL)


def test_non_positive_s0_rows_are_nan():
    s = np.array(
        [
            [100.0, 100.0, 100.0, 50.0],  # good row
            [0.0, 0.0, 0.0, 10.0],  # S0 = 0
            [-5.0, -5.0, -5.0, -1.0],  # S0 < 0
        ]
    )
    r, s0 = to_delta_r2s(s, te=0.03, baseline=slice(0, 3))
    assert_array_equal(s0, [100.0, 0.0, -5.0])
    assert np.all(np.isfinite(r[0]))
    assert np.all(np.isnan(r[1])) and np.all(np.isnan(r[2]))


def test_zero_signal_is_floored():
    te = 0.03
    s = np.array([[200.0, 200.0, 200.0, 0.0, -3.0]])
    r, _ = to_delta_r2s(s, te=te, baseline=slice(0, 3))
    assert np.all(np.isfinite(r))
    # The floor replaces S/S0 exactly, so the capped value is the formula at MIN_SIGNAL_RATIO.
    assert_allclose(r[0, 3:], -np.log(MIN_SIGNAL_RATIO) / te, rtol=FORMULA_RTOL)


# ---------------------------------------------------------------------------------- find_baseline

TR = 1.5
N_FRAMES = 60


def _mean_curve(onset, *, seed=0, lead=True, n=N_FRAMES):
    """Whole-brain mean signal: baseline 1000 (noise SD 1), bolus drop of 40 % from frame ``onset``
    (frame ``onset`` itself is still baseline, the drop is already 11 % of baseline one frame later),
    and optionally 2 leading steady-state frames raised by 20 % and 5 %."""
    rng = np.random.default_rng(seed)
    t = np.clip(np.arange(n, dtype=np.float64) - onset, 0.0, None) / 4.0
    shape = t**2 * np.exp(-2.0 * (t - 1.0))  # 0 before onset, peak 1 four frames after it
    g = 1000.0 * (1.0 - 0.4 * shape) + rng.normal(0.0, 1.0, n)
    if lead:
        g[0] *= 1.20
        g[1] *= 1.05
    return g


@pytest.mark.parametrize("onset", [12, 20, 30])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_baseline_skips_steady_state_frames(onset, seed):
    b = find_baseline(_mean_curve(onset, seed=seed), tr=TR)
    assert b.start == 2
    assert b.stop <= b.arrival - 1
    assert b.stop - b.start >= signal.MIN_BASELINE_FRAMES
    assert abs(b.arrival - onset) <= 1  # the first frame visibly below baseline is onset + 1
    assert b.peak == onset + 4
    assert b.frames == slice(b.start, b.stop)


@pytest.mark.parametrize("onset", [12, 20, 30])
def test_baseline_without_steady_state_frames_starts_at_0(onset):
    b = find_baseline(_mean_curve(onset, lead=False), tr=TR)
    assert b.start == 0
    assert b.stop <= b.arrival - 1
    assert abs(b.arrival - onset) <= 1


def test_baseline_margin_before_arrival():
    # ARRIVAL_MARGIN_S 3 s at TR 1.5 s: the baseline ends 2 frames before the arrival.
    b = find_baseline(_mean_curve(20), tr=TR)
    assert b.stop == b.arrival - 2


def test_flat_curve_raises():
    rng = np.random.default_rng(5)
    with pytest.raises(BaselineError):
        find_baseline(1000.0 + rng.normal(0.0, 1.0, N_FRAMES), tr=TR)


def test_too_small_drop_raises_no_bolus():
    g = np.full(N_FRAMES, 1000.0)
    g[30] = 995.0  # a 0.5 % dip: below MIN_BOLUS_DROP (1 %)
    with pytest.raises(BaselineError, match="no bolus"):
        find_baseline(g, tr=TR)


def test_minimum_at_frame_2_raises():
    g = np.full(N_FRAMES, 1000.0)
    g[2] = 500.0
    with pytest.raises(BaselineError, match="frame 2"):
        find_baseline(g, tr=TR)


# ------------------------------------------------------------------------ auto_brain_mask / otsu

SHAPE = (64, 64, 20)
#: The mask may disagree with the true ellipsoid in at most 1 % of its voxels (noise at the edge).
MASK_DISAGREEMENT = 0.01


def _grid():
    return np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")


def _ellipsoid():
    x, y, z = _grid()
    return ((x - 30) / 22) ** 2 + ((y - 30) / 18) ** 2 + ((z - 10) / 7) ** 2 <= 1.0


def _blob():
    x, y, z = _grid()
    return (x - 60) ** 2 + (y - 60) ** 2 + (z - 3) ** 2 <= 2.0**2  # far from the ellipsoid


def _image(seed=0):
    rng = np.random.default_rng(seed)
    img = np.abs(rng.normal(0.0, 1.0, SHAPE)) * 10.0  # Rician-like background
    brain = _ellipsoid()
    img[brain] = 1000.0 + rng.normal(0.0, 20.0, brain.sum())
    blob = _blob()
    img[blob] = 1000.0 + rng.normal(0.0, 20.0, blob.sum())
    return img


def _disagreement(mask, truth):
    return np.count_nonzero(mask != truth) / np.count_nonzero(truth)


#: Otsu returns the centre of the last class-0 bin (skimage's convention); with well separated
#: classes every cut in the gap scores the same, so it sits at the top of the lower class and
#: the half bin above that centre may hold a few lower-class values. Allow 0.1 % of them.
OTSU_MISCLASSIFIED = 1e-3


def test_otsu_threshold_separates_the_classes():
    img = _image()
    v = img[img > 0]
    thr = otsu_threshold(v)
    fg = _ellipsoid() | _blob()
    assert 0.0 < thr < 900.0  # below the brain (~1000 +- 20)
    assert np.count_nonzero((img > thr) != fg) / img.size <= OTSU_MISCLASSIFIED


def test_otsu_threshold_on_two_clusters():
    rng = np.random.default_rng(1)
    low, high = rng.normal(10, 1, 5000), rng.normal(100, 1, 2000)
    thr = otsu_threshold(np.concatenate([low, high, [np.nan, np.inf, -np.inf]]))  # non-finite ignored
    assert 10.0 < thr < 95.0  # above the lower mean, below every upper value
    assert np.count_nonzero(low > thr) / low.size <= OTSU_MISCLASSIFIED
    assert np.all(high > thr)


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_is_the_ellipsoid_without_the_blob(seed):
    mask = auto_brain_mask(_image(seed))
    assert mask.dtype == bool and mask.shape == SHAPE
    assert not mask[_blob()].any()  # only the largest component is kept
    assert _disagreement(mask, _ellipsoid()) <= MASK_DISAGREEMENT


def test_hole_inside_the_ellipsoid_is_filled():
    img = _image()
    x, y, z = _grid()
    hole = ((x - 30) ** 2 + (y - 30) ** 2 <= 5.0**2) & (z == 10)  # a dark disc on the middle slice
    assert _ellipsoid()[hole].all()
    img[hole] = 5.0
    mask = auto_brain_mask(img)
    assert mask[hole].all()
    assert not mask[_blob()].any()
    assert _disagreement(mask, _ellipsoid()) <= MASK_DISAGREEMENT


def test_mask_of_empty_image_is_empty():
    assert not auto_brain_mask(np.zeros((8, 8, 4))).any()


def test_otsu_takes_the_middle_of_a_plateau():
    """Two classes with empty bins between them: every threshold in the gap separates them equally;
    the middle of the gap is chosen, not its first bin (which sits on the edge of the lower class)."""
    from perfusion.quantify.signal import otsu_threshold

    rng = np.random.default_rng(0)
    values = np.r_[rng.uniform(0, 10, 500), rng.uniform(90, 100, 500)]
    t = otsu_threshold(values)
    assert 45 <= t <= 55
    # a sample without a gap keeps Otsu's usual answer: between the two modes
    values = np.r_[rng.normal(20, 5, 2000), rng.normal(60, 5, 2000)]
    assert 30 < otsu_threshold(values) < 50
