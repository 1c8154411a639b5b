"""Arterial input: cluster selection, venous output function, partial-volume scaling, quality score
(the absolute-quantification checks of issue 16: tests/test_aif_honesty.py).

On the real phantom (perfusion.tools.phantom): 40 pure arterial voxels (masks["aif"]), each artery ringed by
partial-volume voxels (30 % AIF, 70 % tissue), veins = the AIF delayed 4 s and dispersed 3 s
(masks["vein"]). Delta R2* rows are built as the pipeline does: S0 from frames 2-11 (frames 0-1 are
not yet at steady state), curves from frame 2 on, so they line up with ``ph.aif[2:]``.

Tolerances, each with its reason:
- AIF_AREA_RTOL 0.03 (SNR 150): the cluster AIF is the mean of 5-8 pure arterial voxels; the area of
  one voxel's curve carries about 1 % noise at SNR 150 (delta R2* noise is largest at the peak, where
  S/S0 is 0.08), so the mean is within about 0.5 %, plus the selection (earliest cluster) favours
  voxels whose noise shifted them early; measured +1.3 %. 3 % leaves room for another seed.
- AIF_AREA_RTOL_LOW_SNR 0.10 (SNR 40): only 3 voxels survive (half the arteries are flagged saturated
  by curve_features at SNR 40, and the second round keeps a fifth); each carries about 4 % area noise;
  measured -1.7 % (seeds 0-2: -3.4 % to +0.1 %).
- ARTERIAL_FRACTION_LOW_SNR 0.8: the brief's requirement for SNR 40 (measured 1.0).
- VOF_FACTOR_RTOL 0.05: the partial-volume factor from the VOF's area. The method's own bias on the
  phantom is -0.7 % (the venous lag is underestimated); the cluster AIF's area error adds up to 1.3 %.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.cluster.vq import kmeans2
from scipy.integrate import trapezoid

from perfusion.quantify import aif
from perfusion.tools.phantom import PhantomSpec, make_phantom
from perfusion.quantify.signal import to_delta_r2s

AIF_AREA_RTOL = 0.03
AIF_AREA_RTOL_LOW_SNR = 0.10
ARTERIAL_FRACTION_LOW_SNR = 0.8
VOF_FACTOR_RTOL = 0.05

BASELINE = slice(0, 10)  # frames 2-11 of the series, counted from frame 2
PV_FACTOR = 0.6  # artificial partial volume applied to the AIF


def _rows(snr: float) -> dict:
    """Delta R2* rows of the phantom's brain voxels, their features and the truth per row."""
    ph = make_phantom(PhantomSpec(snr=snr))
    spec = ph.spec
    brain = ph.masks["brain"].ravel()
    sig = ph.signal.reshape(-1, spec.n_frames)[brain].astype(np.float64)
    d, s0 = to_delta_r2s(sig, te=spec.te, baseline=slice(2, 12))
    d = d[:, 2:]
    ratio = sig[:, 2:] / s0[:, None]
    feats = aif.curve_features(d, ratio.min(axis=1), ratio[:, BASELINE].std(axis=1, ddof=1),
                               baseline=BASELINE, tr=spec.tr)
    true = ph.aif[2:]
    mean_curve = d.mean(axis=0)
    return {"d": d, "f": feats, "tr": spec.tr, "true": true, "true_area": trapezoid(true, dx=spec.tr),
            "artery": ph.masks["aif"].ravel()[brain], "vein": ph.masks["vein"].ravel()[brain],
            "tissue_peak_frame": int(np.argmax(mean_curve)), "tissue_peak": float(mean_curve.max())}


@pytest.fixture(scope="module")
def snr150():
    return _rows(150.0)


@pytest.fixture(scope="module")
def snr40():
    return _rows(40.0)


def _area(rows, idx):
    return trapezoid(rows["d"][idx].mean(axis=0), dx=rows["tr"])


# -- cluster_aif ---------------------------------------------------------------------------------

def test_cluster_aif_takes_only_pure_arterial_voxels(snr150):
    idx, info = aif.cluster_aif(snr150["d"], snr150["f"], tr=snr150["tr"])
    assert idx.size >= 4, info  # enough voxels for a mean (measured: 5)
    assert snr150["artery"][idx].all(), f"non-arterial voxels chosen: {idx[~snr150['artery'][idx]]}"
    assert_allclose(_area(snr150, idx), snr150["true_area"], rtol=AIF_AREA_RTOL)
    assert [r["sizes"] for r in info["rounds"]] and len(info["rounds"]) == 2
    assert info["chosen"] == idx.size and info["first_moment_s"] > 0


def test_shape_clustering_alone_keeps_partial_volume_voxels(snr150):
    """Why cluster_aif has its area step: without it, the earliest cluster of unit-area curves holds
    every arterial voxel and the partial-volume ring around them too (30 % AIF already has the
    AIF's shape), and its mean curve is far too small."""
    idx, _ = aif.cluster_aif(snr150["d"], snr150["f"], tr=snr150["tr"], n_rounds=1, pure_fraction=None)
    assert snr150["artery"][idx].sum() == snr150["artery"].sum()
    assert (~snr150["artery"][idx]).sum() > 0
    assert _area(snr150, idx) < 0.7 * snr150["true_area"]


def test_cluster_aif_is_deterministic(snr150):
    a, info_a = aif.cluster_aif(snr150["d"], snr150["f"], tr=snr150["tr"])
    b, info_b = aif.cluster_aif(snr150["d"].copy(), snr150["f"], tr=snr150["tr"])
    assert_array_equal(a, b)
    assert info_a == info_b


def test_cluster_aif_at_snr_40_lands_on_arteries(snr40):
    idx, info = aif.cluster_aif(snr40["d"], snr40["f"], tr=snr40["tr"])
    assert idx.size >= 1, info
    assert snr40["artery"][idx].mean() >= ARTERIAL_FRACTION_LOW_SNR, info
    assert_allclose(_area(snr40, idx), snr40["true_area"], rtol=AIF_AREA_RTOL_LOW_SNR)


def test_cluster_aif_beats_select_aif_at_snr_40(snr40):
    """At SNR 40 select_aif's ranking (peak / FWHM among the earliest) takes ring voxels and its AIF
    area is 43 % short; the cluster AIF is within a few %."""
    idx, _ = aif.cluster_aif(snr40["d"], snr40["f"], tr=snr40["tr"])
    sel, _ = aif.select_aif(snr40["f"])
    err_cluster = abs(_area(snr40, idx) / snr40["true_area"] - 1)
    err_select = abs(_area(snr40, sel) / snr40["true_area"] - 1)
    assert err_cluster < err_select


def test_cluster_aif_rejects_bad_input(snr150):
    with pytest.raises(ValueError, match="n_vox"):
        aif.cluster_aif(snr150["d"][:10], snr150["f"], tr=snr150["tr"])
    with pytest.raises(ValueError, match="n_clusters"):
        aif.cluster_aif(snr150["d"], snr150["f"], tr=snr150["tr"], n_clusters=1)
    flat = aif.curve_features(np.zeros((20, 30)), np.ones(20), np.full(20, 0.01), baseline=BASELINE, tr=1.0)
    with pytest.raises(aif.AifError):
        aif.cluster_aif(np.zeros((20, 30)), flat, tr=1.0)


def test_kmeans_matches_scipy_from_the_same_start():
    """Our Lloyd iterations against scipy.cluster.vq.kmeans2 from the same centroids (minit="matrix",
    deterministic): same labels, centroids at 1e-12 (only the summation order differs)."""
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 5, (4, 6))
    x = np.concatenate([c + rng.normal(0, 1.5, (50, 6)) for c in centres])
    init = x[[0, 60, 120, 180]] + 0.5
    labels, cent = aif.kmeans(x, init)
    cent_ref, labels_ref = kmeans2(x, init.copy(), iter=100, minit="matrix")
    assert_array_equal(labels, labels_ref)
    assert_allclose(cent, cent_ref, rtol=1e-12, atol=1e-12)


# -- venous output function and partial-volume scaling --------------------------------------------

def test_auto_vof_takes_vein_voxels(snr150):
    idx = aif.auto_vof(snr150["d"], snr150["f"], tr=snr150["tr"])
    assert idx.size >= 10  # the phantom has 30 venous voxels, all pure (measured: all 30 chosen)
    assert snr150["vein"][idx].all(), f"non-venous voxels chosen: {idx[~snr150['vein'][idx]]}"
    _, info = aif.cluster_aif(snr150["d"], snr150["f"], tr=snr150["tr"])
    same = aif.auto_vof(snr150["d"], snr150["f"], tr=snr150["tr"], arterial_time_s=info["first_moment_s"])
    assert_array_equal(idx, same)


def test_auto_vof_at_snr_40_takes_vein_voxels(snr40):
    idx = aif.auto_vof(snr40["d"], snr40["f"], tr=snr40["tr"])
    assert idx.size >= 10 and snr40["vein"][idx].all()


def test_scale_to_vof_recovers_partial_volume(snr150):
    tr = snr150["tr"]
    art, _ = aif.cluster_aif(snr150["d"], snr150["f"], tr=tr)
    vof = snr150["d"][aif.auto_vof(snr150["d"], snr150["f"], tr=tr)].mean(axis=0)
    small = PV_FACTOR * snr150["d"][art].mean(axis=0)
    scaled, factor = aif.scale_to_vof(small, vof, tr=tr)
    assert_allclose(factor, 1 / PV_FACTOR, rtol=VOF_FACTOR_RTOL)
    assert_allclose(scaled, factor * small, rtol=1e-12)
    assert_allclose(trapezoid(scaled, dx=tr), snr150["true_area"], rtol=VOF_FACTOR_RTOL)


def test_scale_to_vof_of_the_same_curve_is_one(snr150):
    """No lag, same area: the factor is exactly 1 (the in-transit correction vanishes with the lag)."""
    _, factor = aif.scale_to_vof(snr150["true"], snr150["true"], tr=snr150["tr"])
    assert factor == pytest.approx(1.0, abs=1e-12)


def test_scale_to_vof_warns_and_raises():
    t = np.arange(60.0)
    a = np.where(t > 10, (t - 10) ** 3 * np.exp(-(t - 10) / 1.5), 0.0)
    with pytest.warns(UserWarning, match="smaller than the AIF"):
        _, factor = aif.scale_to_vof(a, 0.5 * a, tr=1.0)
    assert factor == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="positive"):
        aif.scale_to_vof(a, -a, tr=1.0)
    with pytest.raises(ValueError, match="same length"):
        aif.scale_to_vof(a, a[:-1], tr=1.0)


# -- quality ---------------------------------------------------------------------------------------

def _score(rows, curve):
    return aif.aif_quality_score(curve, tr=rows["tr"], baseline=BASELINE,
                                 tissue_peak_frame=rows["tissue_peak_frame"], tissue_peak=rows["tissue_peak"])


def test_quality_score_ranks_the_true_aif_first(snr150):
    rng = np.random.default_rng(0)
    true = _score(snr150, snr150["true"])
    tissue = _score(snr150, snr150["d"][~snr150["artery"] & ~snr150["vein"]].mean(axis=0))
    noisy = _score(snr150, snr150["true"] + rng.normal(0.0, 15.0, snr150["true"].size))  # CNR about 7
    vein = _score(snr150, snr150["d"][snr150["vein"]].mean(axis=0))
    for q in (true, tissue, noisy, vein):
        assert 0.0 <= q["score"] <= 1.0
        assert set(q["components"]) == {"cnr", "peak_ratio", "lead_s", "fwhm_s", "post_bolus"}
    assert true["score"] > 0.9 and not true["warnings"]
    assert tissue["score"] < true["score"] and tissue["warnings"]
    assert noisy["score"] < true["score"] and any("contrast-to-noise" in w for w in noisy["warnings"])
    assert vein["score"] < true["score"] and any("before the tissue" in w for w in vein["warnings"])


def test_quality_score_caps_a_scaled_partial_volume_aif(snr150):
    """Issue 16: a partial-volume AIF of this phantom (concentrations add, so it is the AIF scaled by the
    artery fraction, PV_FACTOR 0.6 here and 0.3 in the ring) has the true AIF's shape and the same
    components; only its area over the tissue's tells (aif.check_absolute, bounds in aif.py). With the
    brain's mean curve given, the 30 % curve is capped below the ok bar; the true AIF and the 60 % one
    (area ratio above the bound: a known miss, CBV 1.7x too high) are not."""
    tissue = snr150["d"].mean(axis=0)

    def score(curve):
        return aif.aif_quality_score(curve, tr=snr150["tr"], baseline=BASELINE,
                                     tissue_peak_frame=snr150["tissue_peak_frame"], tissue_curve=tissue)

    true, pv60, pv30 = (score(f * snr150["true"]) for f in (1.0, PV_FACTOR, 0.3))
    assert true["absolute"]["quantitative"] and true["score"] > 0.9
    assert pv30["components"]["post_bolus"] == true["components"]["post_bolus"]  # the shape is the same
    assert not pv30["absolute"]["quantitative"] and pv30["score"] < aif.QUALITY_OK
    assert pv30["absolute"]["measures"]["area_ratio"] < aif.ABSOLUTE_BOUNDS["area_ratio"]
    assert pv60["absolute"]["quantitative"]


def test_quality_score_without_tissue_peak_drops_that_component(snr150):
    q = aif.aif_quality_score(snr150["true"], tr=snr150["tr"], baseline=BASELINE,
                              tissue_peak_frame=snr150["tissue_peak_frame"])
    assert "peak_ratio" not in q["components"] and q["peak_to_tissue_ratio"] is None
    flat = aif.aif_quality_score(np.zeros(40), tr=1.0, baseline=BASELINE, tissue_peak_frame=20)
    assert flat["score"] == 0.0 and flat["warnings"]


def test_aif_quality_keeps_its_keys(snr150):
    """The pipeline and report read these keys: the new score must not change them."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = aif.aif_quality(snr150["true"], tr=snr150["tr"], baseline=BASELINE,
                            tissue_peak_frame=snr150["tissue_peak_frame"], t0=3.0)
    assert set(q) == {"peak_delta_r2s_per_s", "peak_time_s", "fwhm_s", "cnr", "warnings"}


def test_select_aif_unchanged_on_the_phantom(snr150):
    """select_aif now shares its eligibility rule with cluster_aif; its choice must not move."""
    sel, steps = aif.select_aif(snr150["f"])
    assert snr150["artery"][sel].all() and sel.size == aif.DEFAULT_N_VOXELS
    assert steps["eligible"] == int(aif._eligible(snr150["f"]).size)
