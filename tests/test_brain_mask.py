"""The automatic brain mask on heads (issue 16): brain only, without scalp, skull, orbits and CSF.

The realistic head (phantom_realistic.py) carries what a real gradient-echo EPI shows around the
brain: an enhancing scalp outside a skull gap without signal, two bright orbits without perfusion
on slice 0, ventricles (bright CSF, no contrast). The truth is its masks: "brain" (the brain's
outline, ventricles included), "csf", "orbit", "head".
"""

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from perfusion.quantify import signal
from perfusion.io import Series
from perfusion.tools.phantom import make_phantom
from perfusion.tools.phantom_realistic import RealisticSpec, make_realistic_phantom
from perfusion.config import Config
from perfusion.pipeline import AUTO_BRAIN_SOURCE, Inputs, analyze

#: The mask holds at least this share of the true brain without its ventricles (the brief's target;
#: measured 99.4-100 %: the voxels missed are bright lesion voxels that do not drop, e.g. a necrotic
#: core, which the lesion ROIs bring back into the analysis).
MIN_BRAIN_COVERED = 0.97
#: At most this share of the mask lies outside the true brain (scalp, skull, orbits; measured 0.00 %
#: on the head as built, 0.5 % with tissue bridges across the skull gap: their stubs).
MAX_OUTSIDE = 0.02
#: On the old phantom (a brain disc, no head) the mask is the disc within this share of its voxels.
MAX_DISC_DISAGREEMENT = 0.02
#: At most this share of the mask's voxels has a negative CBV through the whole pipeline (the brief's
#: target). At SNR 30 with lesions, white matter alone (CBV's coefficient of variation about 40 % at
#: that noise) gives 0.46-0.53 % negative voxels within the TRUE brain without ventricles; there the
#: automatic mask must add at most NEGATIVE_CBV_EXCESS to what the true mask gives.
MAX_NEGATIVE_CBV = 0.005
NEGATIVE_CBV_EXCESS = 0.0005
#: Share of the ventricles the mask may keep with the bolus drop (measured <= 2 %: voxels whose noise
#: makes them drop) and must keep without it (only the drop tells CSF from tissue).
MAX_CSF_KEPT = 0.05


@cache
def _head(seed: int = 0, snr: float = 30.0, lesions: bool = True):
    spec = RealisticSpec(seed=seed, snr=snr) if lesions else RealisticSpec(seed=seed, snr=snr, lesions=())
    return make_realistic_phantom(spec)


def _voxel_mm(ph):
    return tuple(np.linalg.norm(ph.affine[:3, :3], axis=0))


def _scores(mask, masks):
    """Share of the true brain without ventricles covered, share of the mask outside the brain."""
    tissue = masks["brain"] & ~masks["csf"]
    covered = np.count_nonzero(mask & tissue) / np.count_nonzero(tissue)
    outside = np.count_nonzero(mask & ~masks["brain"]) / max(np.count_nonzero(mask), 1)
    return covered, outside


def _dsc_mask(data, ph):
    return signal.auto_brain_mask_dsc(data, tr=ph.spec.tr, voxel_mm=_voxel_mm(ph))


@pytest.mark.parametrize("lesions", [True, False])
@pytest.mark.parametrize("snr", [30.0, 50.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_realistic_head_brain_only(seed, snr, lesions):
    ph = _head(seed, snr, lesions)
    mask = _dsc_mask(ph.signal, ph)
    covered, outside = _scores(mask, ph.masks)
    assert covered >= MIN_BRAIN_COVERED
    assert outside < MAX_OUTSIDE
    assert not (mask & ph.masks["orbit"]).any()
    assert np.count_nonzero(mask & ph.masks["csf"]) <= MAX_CSF_KEPT * np.count_nonzero(ph.masks["csf"])


@pytest.mark.parametrize("slab", [(0, 1), (0, 2), (0, 3), (2, 3), (3, 5), (3, 6)])
def test_thin_slab(slab):
    """1, 2 or 3 slices (the orbits' slice among them or not) work like the whole head: the erosion
    is in-plane, and the bolus peak comes from the slab's own coarse brain."""
    ph = _head(0, 30.0, True)
    lo, hi = slab
    masks = {k: v[:, :, lo:hi] for k, v in ph.masks.items()}
    mask = _dsc_mask(np.ascontiguousarray(ph.signal[:, :, lo:hi]), ph)
    covered, outside = _scores(mask, masks)
    assert covered >= MIN_BRAIN_COVERED
    assert outside < MAX_OUTSIDE
    assert not (mask & masks["orbit"]).any()


def test_old_phantom_is_its_disc():
    ph = make_phantom()
    mask = signal.auto_brain_mask_dsc(ph.signal, tr=ph.spec.tr, voxel_mm=_voxel_mm(ph))
    truth = ph.masks["brain"]
    assert np.count_nonzero(mask != truth) / np.count_nonzero(truth) <= MAX_DISC_DISAGREEMENT


def _bridged_head(width: float = 1.5):
    """The realistic head (seed 0, SNR 30, no lesions) with tissue bridges across the skull gap: a band
    ``2 width`` voxels wide from the brain to the scalp to the left, right and back on every slice, and
    an "optic nerve" of the same width from each orbit to the brain on slice 0, all filled with a
    white-matter voxel's signal (perfused, tissue-bright). Returns (signal, masks)."""
    ph = _head(0, 30.0, False)
    sig = ph.signal.copy()
    masks = ph.masks
    brain, head, orbit = masks["brain"][:, :, 0], masks["head"][:, :, 0], masks["orbit"][:, :, 0]
    xx, yy = np.meshgrid(*(np.arange(n, dtype=float) for n in brain.shape), indexing="ij")
    cx, cy = xx[brain].mean(), yy[brain].mean()
    outside = head & ~brain & ~orbit
    bridges = outside & ((np.abs(yy - cy) < width) | ((np.abs(xx - cx) < width) & (yy < cy)))
    labels, n = ndimage.label(orbit)
    nerves = np.zeros(brain.shape, bool)
    for k in range(1, n + 1):
        ox, oy = xx[labels == k].mean(), yy[labels == k].mean()
        nerves |= ~brain & ~orbit & (np.abs(xx - ox) < width) & (yy > cy) & (yy < oy)
    wm = np.argwhere(masks["nawm"][:, :, 0])[0]
    for z in range(sig.shape[2]):
        sig[bridges, z] = sig[wm[0], wm[1], z]
        if z == 0:
            sig[nerves, z] = sig[wm[0], wm[1], z]
    return sig, masks, ph


def test_bridges_across_the_skull_gap_are_cut():
    """The erosion (BRIDGE_RADIUS_MM) cuts perfused bridges 3 voxels (7.2 mm) wide: the scalp and the
    orbits stay out although the threshold joins them to the brain."""
    sig, masks, ph = _bridged_head()
    joined = signal.auto_head_mask(sig.mean(axis=3))  # the old mask: the whole head
    assert _scores(joined, masks)[1] > 0.2
    for mask in (_dsc_mask(sig, ph), signal.auto_brain_mask(sig.mean(axis=3), voxel_mm=_voxel_mm(ph))):
        covered, outside = _scores(mask, masks)
        assert covered >= MIN_BRAIN_COVERED
        assert outside < MAX_OUTSIDE
        assert not (mask & masks["orbit"]).any()


def test_csf_goes_only_with_the_drop():
    """Without the bolus drop the ventricles (bright, inside the brain) stay; with it they go, and the
    bolus drop is about 0 in CSF and the orbits, 15 % in white matter, 30 % in grey matter."""
    ph = _head(0, 50.0, False)
    mean_only = signal.auto_brain_mask(ph.signal.mean(axis=3), voxel_mm=_voxel_mm(ph))
    assert mean_only[ph.masks["csf"]].all()
    base = signal.find_baseline(signal.mean_curve(ph.signal, mean_only), tr=ph.spec.tr)
    s0, drop = signal.bolus_drop(ph.signal, baseline=base.frames, peak=base.peak, tr=ph.spec.tr)
    assert abs(np.median(drop[ph.masks["csf"]])) < 0.03
    assert abs(np.median(drop[ph.masks["orbit"]])) < 0.03
    assert 0.10 < np.median(drop[ph.masks["nawm"]]) < 0.25
    assert np.median(drop[ph.masks["gm"]]) > 0.2
    with_drop = signal.auto_brain_mask(s0, drop=drop, voxel_mm=_voxel_mm(ph))
    assert np.count_nonzero(with_drop & ph.masks["csf"]) <= MAX_CSF_KEPT * np.count_nonzero(ph.masks["csf"])


def test_dark_voxels_without_drop_stay():
    """Only bright voxels that do not drop are taken for CSF: a dark spot without a bolus inside the
    brain (a haemorrhage, a necrotic core that is dark) stays in the mask."""
    ph = _head(0, 50.0, False)
    sig = ph.signal.copy()
    xx, yy = np.meshgrid(*(np.arange(n) for n in sig.shape[:2]), indexing="ij")
    depth = ndimage.distance_transform_edt(ph.masks["nawm"][:, :, 3])
    x0, y0 = np.unravel_index(int(np.argmax(depth)), depth.shape)  # deepest in white matter
    spot = (xx - x0) ** 2 + (yy - y0) ** 2 <= 3 ** 2
    assert ph.masks["nawm"][:, :, 3][spot].all()
    sig[spot, 3] = 300.0  # constant: no bolus, a third of white matter's signal
    mask = _dsc_mask(sig, ph)
    assert mask[:, :, 3][spot].all()


def test_shape_mismatch_and_empty():
    assert not signal.auto_brain_mask(np.zeros((8, 8, 2))).any()
    assert not signal.auto_brain_mask_dsc(np.zeros((8, 8, 2, 20)), tr=1.0).any()
    with pytest.raises(ValueError, match="shape"):
        signal.auto_brain_mask(np.ones((8, 8, 2)), drop=np.ones((8, 8, 3)))


# ------------------------------------------------------------------------------ whole pipeline


def _analyze(ph, brain=None):
    spec = ph.spec
    series = Series(data=ph.signal, affine=ph.affine, path=Path("<realistic phantom>"), te=spec.te, tr=spec.tr,
                    te_source="phantom", tr_source="phantom")
    return analyze(Inputs(series=series, rois={}, brain=brain), Config(motion_correct="off"))


@pytest.mark.parametrize(("seed", "snr", "lesions"), [(0, 50.0, True), (1, 50.0, False), (1, 30.0, False)])
def test_pipeline_negative_cbv_below_target(seed, snr, lesions):
    ph = _head(seed, snr, lesions)
    res = _analyze(ph)
    assert res.brain_source == AUTO_BRAIN_SOURCE
    covered, outside = _scores(res.brain, ph.masks)
    assert covered >= MIN_BRAIN_COVERED and outside < MAX_OUTSIDE
    assert np.mean(res.maps["cbv"][res.brain] < 0) < MAX_NEGATIVE_CBV


def test_pipeline_negative_cbv_no_more_than_the_true_brain():
    """SNR 30 with lesions: white matter's noise alone puts about 0.5 % of the true brain's CBV below
    0; the automatic mask adds no negative voxel of its own (the old Otsu mask: 5.6 %)."""
    ph = _head(0, 30.0, True)
    auto = _analyze(ph)
    tissue = ph.masks["brain"] & ~ph.masks["csf"]
    true = _analyze(ph, brain=tissue)
    neg_auto = np.mean(auto.maps["cbv"][auto.brain] < 0)
    neg_true = np.mean(true.maps["cbv"][tissue] < 0)
    assert neg_auto <= neg_true + NEGATIVE_CBV_EXCESS
    assert neg_auto < 2 * MAX_NEGATIVE_CBV


def test_pipeline_keeps_the_lesion_rois_in_the_brain():
    """A lesion's bright voxels that do not drop (necrotic core, T1-dominant leakage) would be taken
    for CSF; given as ROIs they stay in the brain mask, so no lesion counts voxels outside the brain."""
    ph = _head(0, 30.0, True)
    alone = signal.auto_brain_mask_dsc(ph.signal, tr=ph.spec.tr, voxel_mm=_voxel_mm(ph))
    assert any(not alone[ph.masks[n]].all() for n in ph.lesions)  # without the ROIs some voxels go
    series = Series(data=ph.signal, affine=ph.affine, path=Path("<realistic phantom>"), te=ph.spec.te,
                    tr=ph.spec.tr, te_source="phantom", tr_source="phantom")
    res = analyze(Inputs(series=series, rois={n: ph.masks[n] for n in ph.lesions}), Config(motion_correct="off"))
    for n in ph.lesions:
        assert res.brain[ph.masks[n]].all(), n
    assert not any("outside the brain" in " ".join(r.reasons) for r in res.rois)
