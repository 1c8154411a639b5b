"""Phantom round trip: the pipeline against the phantom's known truth.

Tolerances (issue 2), each with its reason:
- CBV_TOL 0.05: median over sweep blocks of |block median CBV / truth - 1|. The area ratio is exact
  in theory; what remains is finite-window truncation (about -2 %, largest at long MTT) and noise.
- RCBV_TOL 0.10: each lesion's median rCBV against truth with the NAWM reference.
- AUTO_AIF_CBV_TOL 0.05 / AUTO_AIF_CBF_TOL 0.10: median CBV / CBF with the automatic AIF against the
  true-AIF-mask result (issue 3; issue 2 asked 10 % on CBV).
"""

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

from perfusion.case import load_inputs
from perfusion.tools.phantom import FINE_DT_S, PhantomSpec, aif_curve, make_phantom, tissue_curve
from perfusion.config import Config
from perfusion.pipeline import analyze
from perfusion.units import KH, RHO_BRAIN_G_PER_ML

CBV_TOL = 0.05
RCBV_TOL = 0.10
AUTO_AIF_CBV_TOL = 0.05  # issue 3
AUTO_AIF_CBF_TOL = 0.10  # issue 3


def _inputs(case, *, aif="true", reference=True):
    return load_inputs(dsc=case["dsc"], mask=None, aif=str(case["aif"]) if aif == "true" else "auto",
                       reference=case["nawm"] if reference else None,
                       rois=[case["lesion_hyper"], case["lesion_hypo"]], te=None, tr=None)[0]


def _block_errors(result, truth, key):
    errs = []
    for b in truth["blocks"]:
        sl = (slice(*b["x"]), slice(*b["y"]), b["slice"])
        errs.append((b, np.median(result.maps[key][sl]) / b[key] - 1))
    return errs


@pytest.fixture(scope="module")
def truth(phantom_case):
    return json.loads(phantom_case["truth_json"].read_text())


@pytest.fixture(scope="module")
def true_aif_result(phantom_case):
    return analyze(_inputs(phantom_case), Config(method="osvd"))


def test_forward_model_area_ratio_is_cbv():
    """Noise-free check of the phantom itself: kH/rho * area(tissue)/area(AIF) * 100 = CBF MTT / 60
    on the fine grid, over a window long enough for the residue to decay (rtol 1e-3: the
    exponential tail beyond the window and the O(dt^2) trapezoid error)."""
    spec = PhantomSpec()
    t = np.arange(0, 400, FINE_DT_S)
    a = aif_curve(t, spec)
    a[t > 300] = 0.0  # let the plateau end so the tissue can wash out inside the window
    for cbf, mtt in [(10, 2), (60, 4), (30, 8)]:
        c = tissue_curve(a, t, cbf=cbf, mtt=mtt)
        ratio = KH / RHO_BRAIN_G_PER_ML * np.sum(c) / np.sum(a) * 100
        assert_allclose(ratio, cbf * mtt / 60, rtol=1e-3)


def test_phantom_is_deterministic_and_masks_consistent():
    a = make_phantom(PhantomSpec(seed=5, n_frames=40))
    b = make_phantom(PhantomSpec(seed=5, n_frames=40))
    np.testing.assert_array_equal(a.signal, b.signal)
    assert not (a.masks["aif"] & a.masks["nawm"]).any()
    assert not (a.masks["lesion_hyper"] & a.masks["nawm"]).any()
    assert a.masks["aif"].sum() == 2 * 4 * a.signal.shape[2]


def test_cbv_sweep_with_true_aif(true_aif_result, truth, capsys):
    errs = _block_errors(true_aif_result, truth, "cbv")
    med = float(np.median([abs(e) for _, e in errs]))
    undispersed = float(np.median([abs(e) for b, e in errs if b["dispersion"] == 0]))
    with capsys.disabled():
        print(f"\nphantom CBV median |rel err| over {len(errs)} blocks: {med:.4f} (undispersed {undispersed:.4f})")
    assert med <= CBV_TOL
    assert undispersed <= CBV_TOL


def test_lesion_rcbv_with_nawm_reference(true_aif_result, truth, capsys):
    scores = {s.name: s for s in true_aif_result.rois}
    for name, verdict in (("lesion_hyper", "likely_recurrence"), ("lesion_hypo", "likely_treatment_effect")):
        s = scores[f"roi-{name}"]
        expected = truth["lesions"][name]["rcbv"]
        with capsys.disabled():
            print(f"\n{name}: median rCBV {s.rcbv_median:.3f} truth {expected:.3f}")
        assert abs(s.rcbv_median / expected - 1) <= RCBV_TOL
        assert s.verdict == verdict


def test_circulant_tmax_tracks_delay(true_aif_result, truth):
    """Tmax rises with the tissue delay (0, 1, 2 s) on the oSVD residue: block medians per slice,
    differences within one frame (TR 1.5 s) of the true delay differences."""
    by_delay = {}
    for b in truth["blocks"]:
        if b["dispersion"] == 0:
            sl = (slice(*b["x"]), slice(*b["y"]), b["slice"])
            by_delay.setdefault(b["delay"], []).append(np.median(true_aif_result.maps["tmax"][sl]))
    med = {d: float(np.median(v)) for d, v in by_delay.items()}
    assert med[0.0] <= med[1.0] <= med[2.0]
    assert abs((med[2.0] - med[0.0]) - 2.0) <= 1.5


def test_auto_aif_close_to_true_aif(phantom_case, capsys):
    """Issue 3 target: the automatic (clustered) AIF gives CBV within 5 % and CBF within 10 % of the
    result with the true AIF mask, with the default method; the voxels it picks are pure arteries."""
    true = analyze(_inputs(phantom_case), Config())
    auto = analyze(_inputs(phantom_case, aif="auto"), Config())
    assert auto.aif_mask.any() and (auto.aif_mask & true.aif_mask).sum() == auto.aif_mask.sum()
    both = np.isfinite(auto.maps["cbf"]) & np.isfinite(true.maps["cbf"])
    cbv_ratio = np.median(auto.maps["cbv"][both] / true.maps["cbv"][both])
    cbf_ratio = np.median(auto.maps["cbf"][both] / true.maps["cbf"][both])
    with capsys.disabled():
        print(f"\nauto AIF / true AIF median ratio: CBV {cbv_ratio:.4f}, CBF {cbf_ratio:.4f}; "
              f"AIF quality score {auto.aif.quality_score:.2f}")
    assert abs(cbv_ratio - 1) <= AUTO_AIF_CBV_TOL
    assert abs(cbf_ratio - 1) <= AUTO_AIF_CBF_TOL
    assert auto.aif.quality_score >= 0.8


def test_vof_scaling_restores_partial_volume_aif(phantom_case, tmp_path):
    """An AIF taken from partial-volume voxels (the ring around the phantom's arteries, 30 % artery)
    has too small an area and inflates CBV; scaling it to the automatic VOF brings the median CBV back
    within 5 % of the true-AIF result (measured: see the printed ratio)."""
    import nibabel as nib
    from scipy import ndimage

    true_aif = np.asarray(nib.load(phantom_case["aif"]).dataobj) > 0
    st = np.zeros((3, 3, 3), bool)
    st[:, :, 1] = True
    ring = ndimage.binary_dilation(true_aif, structure=st) & ~true_aif
    img = nib.load(phantom_case["aif"])
    ring_path = tmp_path / "ring.nii.gz"
    nib.save(nib.Nifti1Image(ring.astype(np.uint8), img.affine), ring_path)
    inputs = load_inputs(dsc=phantom_case["dsc"], mask=None, aif=str(ring_path), reference=phantom_case["nawm"],
                         rois=[], te=None, tr=None)[0]
    true = analyze(_inputs(phantom_case), Config())
    unscaled = analyze(inputs, Config(vof="none"))
    scaled = analyze(inputs, Config(vof="auto"))
    guarded = analyze(inputs, Config())  # the default: the VOF shows this AIF is partial-volumed, so it applies
    assert guarded.aif.vof.applied is True
    np.testing.assert_array_equal(guarded.maps["cbv"], scaled.maps["cbv"])
    ok = np.isfinite(true.maps["cbv"]) & true.brain
    r_unscaled = np.median(unscaled.maps["cbv"][ok] / true.maps["cbv"][ok])
    r_scaled = np.median(scaled.maps["cbv"][ok] / true.maps["cbv"][ok])
    print(f"partial-volume AIF: CBV ratio {r_unscaled:.3f} unscaled, {r_scaled:.3f} with VOF scaling "
          f"(factor {scaled.aif.vof.scale_factor:.3f})")
    assert r_unscaled > 1.5  # the ring's AIF area is far too small
    assert abs(r_scaled - 1) <= 0.05
    assert scaled.aif.vof.source == "automatic" and scaled.aif.vof.n_voxels > 0


def test_auto_reference_and_verdicts(phantom_case, truth):
    """Everything automatic but the ROIs (as in `make demo`): the reference lies in NAWM and both
    verdicts are right, each rCBV within RCBV_TOL."""
    res = analyze(_inputs(phantom_case, aif="auto", reference=False), Config())
    import nibabel as nib

    nawm = np.asarray(nib.load(phantom_case["nawm"]).dataobj) > 0
    assert (res.reference_mask & nawm).sum() >= 0.7 * res.reference_mask.sum()
    scores = {s.name: s for s in res.rois}
    for name in ("lesion_hyper", "lesion_hypo"):
        assert abs(scores[f"roi-{name}"].rcbv_median / truth["lesions"][name]["rcbv"] - 1) <= RCBV_TOL
    assert scores["roi-lesion_hyper"].verdict == "likely_recurrence"
    assert scores["roi-lesion_hypo"].verdict == "likely_treatment_effect"
    # lesions on both sides of the phantom's midline: both hemispheres, away from each ROI, said so
    info = res.reference
    assert info.automatic is True and info.side == "both" and "both sides" in info.why_side
    assert info.hemispheres["midline_index"] == 31.5  # the disc's centre on the 64 grid


def test_auto_reference_contralateral_to_one_lesion(phantom_case, truth):
    """With only lesion_hyper (patient's left, low x on the phantom's RAS grid) as ROI, the automatic
    reference lies on the right of the midline, outside the 5 mm slab, and rCBV stays within RCBV_TOL."""
    inputs = load_inputs(dsc=phantom_case["dsc"], mask=None, aif="auto", reference=None,
                         rois=[phantom_case["lesion_hyper"]], te=None, tr=None)[0]
    res = analyze(inputs, Config())
    info = res.reference
    assert info.roi_sides == {"roi-lesion_hyper": "left"} and info.side == "right"
    assert info.fallback is None and not any("automatic reference" in w for w in res.warnings)
    assert np.nonzero(res.reference_mask)[0].min() > 31.5 + 2.5  # midline 31.5, 5 mm = 2.5 voxels
    score = res.rois[0]
    print(f"one lesion: reference {info.n_voxels} voxels on the {info.side}, rCBV {score.rcbv_median:.3f}")
    assert abs(score.rcbv_median / truth["lesions"]["lesion_hyper"]["rcbv"] - 1) <= RCBV_TOL
