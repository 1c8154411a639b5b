"""Issue 17: no silent wrong verdict from a bad reference mask or a mask that is not 0/1.

Through the command line on the phantom case (SNR 150, truth rCBV 3.0 and 0.6), with real NIfTI masks
written to tmp folders:

- a --reference that cannot be used (in the air, one voxel, mostly outside the brain) is exit 4, one
  line naming the mask, nothing written;
- a --reference that is not plausible white matter (a high-CBV block, the arterial or venous voxels,
  CSF) makes every lesion not_assessable with its reason; a good one still gives the right verdicts;
- masks that are not 0/1: an ROI label map is one ROI per label, a probability mask is thresholded at
  0.5 with a warning, NaN / Inf / negative values are refused, an AIF or reference label map is refused.

The analyses run with --method osvd and no motion correction (about 2 s each): the checks do not depend
on the deconvolution.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import folder_digest
from perfusion.cli.app import main

FAST = ["--method", "osvd", "--motion-correct", "off", "--no-html", "-q"]


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj) > 0


def _save(arr: np.ndarray, like: Path, path: Path) -> Path:
    nib.save(nib.Nifti1Image(arr, nib.load(like).affine), str(path))
    return path


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _run(case, tmp: Path, extra: list[str], rois=("lesion_hyper", "lesion_hypo"), dsc=None):
    out = tmp / "out"
    args = ["analyze", str(dsc or case["dsc"]), "--out", str(out), *FAST, *extra]
    for r in rois:
        args += ["--roi", str(case[r])]
    return main(args), out


def _refused(case, tmp: Path, capsys, extra: list[str], named: Path, says: str, rois=("lesion_hyper", "lesion_hypo")):
    """exit 4, one stderr line naming ``named`` and saying ``says``, no traceback, nothing written,
    the masks folder unchanged."""
    before = folder_digest(named.parent)
    code, out = _run(case, tmp, extra, rois=rois)
    err = capsys.readouterr().err
    line = _one_line(err)
    assert code == 4, err
    assert str(named) in line and says in line, line
    assert "Traceback" not in err and not out.exists()
    assert folder_digest(named.parent) == before


def _truth_cbv(case) -> np.ndarray:
    return np.asarray(nib.load(case["dsc"].parent / "truth" / "cbv.nii.gz").dataobj)


# ------------------------------------------------------------------ class 1: the reference mask is checked


def test_reference_in_the_air_is_refused(phantom_case, tmp_path, capsys):
    brain = _mask(phantom_case["brain"])
    air = ~brain & (np.indices(brain.shape)[0] < 4)  # the corner outside the head, every slice
    (tmp_path / "in").mkdir()
    named = _save(air.astype(np.uint8), phantom_case["brain"], tmp_path / "in" / "ref.nii.gz")
    _refused(phantom_case, tmp_path, capsys, ["--reference", str(named)], named, "outside the brain")


def test_reference_mostly_outside_the_brain_is_refused(phantom_case, tmp_path, capsys):
    """The sibling: 12 voxels of NAWM and 40 of air (a mask of another grid or a slip): over half out."""
    (tmp_path / "in").mkdir()
    brain, nawm = _mask(phantom_case["brain"]), _mask(phantom_case["nawm"])
    m = np.zeros(brain.shape, bool)
    m[tuple(np.argwhere(nawm)[:12].T)] = True
    air = np.argwhere(~brain)[:40]
    m[tuple(air.T)] = True
    named = _save(m.astype(np.uint8), phantom_case["brain"], tmp_path / "in" / "ref.nii.gz")
    _refused(phantom_case, tmp_path, capsys, ["--reference", str(named)], named, "40 of the reference mask's 52")


def test_one_voxel_reference_in_a_high_cbv_block_is_refused(phantom_case, tmp_path, capsys):
    """Before: exit 0 and rCBV 3.0 read as 0.70, "likely treatment effect"."""
    (tmp_path / "in").mkdir()
    cbv = _truth_cbv(phantom_case)
    one = np.zeros(cbv.shape, np.uint8)
    one[np.unravel_index(np.nanargmax(cbv), cbv.shape)] = 1
    named = _save(one, phantom_case["brain"], tmp_path / "in" / "ref.nii.gz")
    _refused(phantom_case, tmp_path, capsys, ["--reference", str(named)], named, "fewer than 10")


def _not_assessable(out: Path, gate="implausible_reference", says=""):
    rep = json.loads((out / "report.json").read_text())
    assert rep["reference"]["plausibility"]["problem"], rep["reference"]["plausibility"]
    for r in rep["rois"]:
        assert r["verdict"] == "not_assessable", (r["name"], r["verdict"], r["rcbv_median"])
        assert gate in r["gates_failed"]
        assert any("not plausible white matter" in x and says in x for x in r["reasons"]), r["reasons"]
        assert r["next_step"].startswith("Redraw --reference")
    return rep


def test_reference_in_a_high_cbv_block_makes_every_lesion_not_assessable(phantom_case, tmp_path):
    """The sweep's highest block (CBV 10.7 mL/100 g, 5.3 x NAWM): before, exit 0 and rCBV 3.0 -> 0.91."""
    cbv = _truth_cbv(phantom_case)
    block = np.isclose(cbv, np.nanmax(cbv))
    ref = _save(block.astype(np.uint8), phantom_case["brain"], tmp_path / "ref.nii.gz")
    code, out = _run(phantom_case, tmp_path, ["--reference", str(ref)])
    assert code == 0
    rep = _not_assessable(out, says="x the brain's median, above the 1.5 x")
    assert rep["reference"]["plausibility"]["cbv_ratio_to_brain_median"] > 3


@pytest.mark.parametrize("vessel", ["aif", "vein"])
def test_reference_on_a_vessel_makes_every_lesion_not_assessable(vessel, phantom_case, tmp_path):
    mask = phantom_case[vessel]
    code, out = _run(phantom_case, tmp_path, ["--reference", str(mask)])
    assert code == 0
    rep = _not_assessable(out, says="lie on vessels")
    assert rep["reference"]["plausibility"]["vessel_fraction"] > 0.5


def test_reference_in_csf_makes_every_lesion_not_assessable(case_copy, tmp_path):
    """A CSF pool (no perfusion: its delta R2* is a tenth of the tissue's, partial volume) inside the
    brain mask, in NAWM away from the lesions: before, rCBV 3.0 read as about 30."""
    img = nib.load(case_copy["dsc"])
    data = np.asarray(img.dataobj).astype(np.float32)
    nawm = _mask(case_copy["nawm"])
    csf = np.zeros(nawm.shape, bool)
    csf[14:22, 8:16, 1:3] = True  # 128 voxels of NAWM on slices 1-2
    assert (csf & nawm).sum() == csf.sum()
    s0 = data[csf][:, 3:12].mean(axis=1, keepdims=True)
    data[csf] = s0 * (data[csf] / s0) ** 0.1
    dsc = case_copy["dsc"].parent / "sub-csf_dsc.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(dsc))
    (case_copy["dsc"].parent / "sub-csf_dsc.json").write_text(
        (case_copy["dsc"].parent / "sub-phantom_dsc.json").read_text())
    ref = _save(csf.astype(np.uint8), case_copy["brain"], tmp_path / "ref.nii.gz")
    code, out = _run(case_copy, tmp_path, ["--reference", str(ref), "--mask", str(case_copy["brain"])], dsc=dsc)
    assert code == 0
    rep = _not_assessable(out, says="below the 0.3 x")
    assert rep["reference"]["plausibility"]["cbv_ratio_to_brain_median"] < 0.3


def test_a_good_reference_passes_with_the_right_verdicts(phantom_case, tmp_path, capsys):
    """The NAWM mask, and the same with a few voxels of air at its edge (dropped, with a warning)."""
    nawm, brain = _mask(phantom_case["nawm"]), _mask(phantom_case["brain"])
    m = nawm.copy()
    m[tuple(np.argwhere(~brain)[:5].T)] = True
    ref = _save(m.astype(np.uint8), phantom_case["brain"], tmp_path / "ref.nii.gz")
    code, out = _run(phantom_case, tmp_path, ["--reference", str(ref)])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["reference"]["plausibility"]["problem"] is None
    assert 0.8 < rep["reference"]["plausibility"]["cbv_ratio_to_brain_median"] < 1.2
    assert rep["reference"]["n_voxels"] == int(nawm.sum())
    assert any("5 of the reference mask" in w for w in rep["warnings"])
    verdicts = {r["name"]: (r["verdict"], r["rcbv_median"]) for r in rep["rois"]}
    assert verdicts["roi-lesion_hyper"][0] == "likely_recurrence" and abs(verdicts["roi-lesion_hyper"][1] - 3.0) < 0.15
    assert verdicts["roi-lesion_hypo"][0] == "likely_treatment_effect" and abs(verdicts["roi-lesion_hypo"][1] - 0.6) < 0.05


# ------------------------------------------------------------------ class 2: masks that are not 0/1


def test_roi_label_map_is_one_roi_per_label(phantom_case, tmp_path):
    """Labels 1 (the rCBV-3.0 lesion) and 2 (the 0.6 one) in one file: before, one merged verdict."""
    labels = _mask(phantom_case["lesion_hyper"]).astype(np.uint8) + 2 * _mask(phantom_case["lesion_hypo"])
    lesions = _save(labels.astype(np.uint8), phantom_case["brain"], tmp_path / "lesions.nii.gz")
    code, out = main(["analyze", str(phantom_case["dsc"]), "--out", str(tmp_path / "out"), *FAST,
                      "--reference", str(phantom_case["nawm"]), "--roi", str(lesions)]), tmp_path / "out"
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    got = {r["name"]: r for r in rep["rois"]}
    assert sorted(got) == ["lesions-label1", "lesions-label2"]
    assert got["lesions-label1"]["verdict"] == "likely_recurrence"
    assert got["lesions-label2"]["verdict"] == "likely_treatment_effect"
    assert got["lesions-label1"]["n_voxels"] == int(_mask(phantom_case["lesion_hyper"]).sum())
    for name, r in got.items():  # each label's mask copy is written and holds that label only
        copy = _mask(out / r["mask_file"])
        assert copy.sum() == r["n_voxels"]
    assert any("label map with 2 labels" in w for w in rep["warnings"])
    assert str(tmp_path) not in json.dumps(rep["warnings"])  # the warning names the file, not its folder


def test_label_roi_name_colliding_with_another_roi_is_refused(phantom_case, tmp_path, capsys):
    """A label map ``lesions`` (labels 1, 2) and a file ``lesions-label1.nii.gz``: two ROIs of one name."""
    labels = _mask(phantom_case["lesion_hyper"]).astype(np.uint8) + 2 * _mask(phantom_case["lesion_hypo"])
    a = _save(labels.astype(np.uint8), phantom_case["brain"], tmp_path / "lesions.nii.gz")
    b = _save(_mask(phantom_case["lesion_hyper"]).astype(np.uint8), phantom_case["brain"],
              tmp_path / "lesions-label1.nii.gz")
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(tmp_path / "out"), *FAST,
                 "--roi", str(b), "--roi", str(a)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "lesions-label1" in line and "rename one file" in line
    assert not (tmp_path / "out").exists()


def test_probability_roi_is_thresholded_at_one_half_with_a_warning(phantom_case, tmp_path):
    """The rCBV-3.0 lesion at 0.7 and a ring of NAWM around it at 0.3: before, the ring was scored with
    the lesion (its median fell); now the ring is out and the warning names the mask."""
    from scipy import ndimage

    lesion = _mask(phantom_case["lesion_hyper"])
    ring = ndimage.binary_dilation(lesion, structure=np.ones((7, 7, 1), bool)) & ~lesion
    ring &= ~_mask(phantom_case["lesion_hypo"])
    prob = np.where(lesion, 0.7, np.where(ring, 0.3, 0.0)).astype(np.float32)
    roi = _save(prob, phantom_case["brain"], tmp_path / "soft.nii.gz")
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(tmp_path / "out"), *FAST,
                 "--reference", str(phantom_case["nawm"]), "--roi", str(roi)])
    assert code == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    (r,) = rep["rois"]
    assert r["name"] == "soft" and r["n_voxels"] == int(lesion.sum())
    assert r["verdict"] == "likely_recurrence" and abs(r["rcbv_median"] - 3.0) < 0.15
    assert any(w.startswith("soft.nii.gz:") and "at or above 0.5" in w for w in rep["warnings"])


def _bad_mask(kind: str, case, tmp: Path) -> np.ndarray:
    lesion = _mask(case["lesion_hyper"]).astype(np.float32)
    if kind == "nan":
        lesion[0, 0, 0] = np.nan
    elif kind == "inf":
        lesion[0, 0, 0] = np.inf
    elif kind == "negative":
        lesion[0, 0, 0] = -1
    elif kind == "above_one":  # neither 0/1, labels nor probabilities
        lesion *= 2.5
    elif kind == "all_below_half":
        lesion *= 0.3
    return lesion


BAD_MASKS = {"nan": "NaN or Inf", "inf": "NaN or Inf", "negative": "negative values",
             "above_one": "non-integer values above 1", "all_below_half": "none at or above 0.5"}


@pytest.mark.parametrize("option", ["--roi", "--reference", "--aif"])
@pytest.mark.parametrize("kind", sorted(BAD_MASKS))
def test_mask_values_that_are_not_a_mask_are_refused(kind, option, phantom_case, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    arr = _bad_mask(kind, phantom_case, tmp_path)
    if option != "--roi":  # the same values on a region that would otherwise be accepted
        src = _mask(phantom_case["nawm"] if option == "--reference" else phantom_case["aif"])
        arr = np.where(src, arr.max() if kind not in ("nan", "inf", "negative") else 1, 0).astype(np.float32)
        arr[0, 0, 0] = _bad_mask(kind, phantom_case, tmp_path)[0, 0, 0] if kind in ("nan", "inf", "negative") else 0
    named = _save(arr, phantom_case["brain"], tmp_path / "in" / "m.nii.gz")
    rois = ("lesion_hyper",) if option != "--roi" else ()
    _refused(phantom_case, tmp_path, capsys, [option, str(named)], named, BAD_MASKS[kind], rois=rois)


@pytest.mark.parametrize("option", ["--reference", "--aif", "--vof"])
def test_label_map_as_reference_aif_or_vof_is_refused(option, phantom_case, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    src = _mask(phantom_case[{"--reference": "nawm", "--aif": "aif", "--vof": "vein"}[option]])
    half = np.indices(src.shape)[0] < src.shape[0] // 2
    labels = np.where(src, np.where(half, 1, 2), 0).astype(np.uint8)
    named = _save(labels, phantom_case["brain"], tmp_path / "in" / "m.nii.gz")
    _refused(phantom_case, tmp_path, capsys, [option, str(named)], named, "label map with 2 labels (1, 2)",
             rois=("lesion_hyper",))


def test_brain_mask_labels_are_merged_and_255_is_one_region(phantom_case, tmp_path):
    """A tissue segmentation as --mask (labels 1-3) is the brain; a 0/255 ROI is one region, not a label."""
    brain = _mask(phantom_case["brain"])
    seg = np.where(brain, 1 + np.indices(brain.shape)[0] % 3, 0).astype(np.uint8)
    mask = _save(seg, phantom_case["brain"], tmp_path / "seg.nii.gz")
    roi = _save((_mask(phantom_case["lesion_hyper"]) * 255).astype(np.uint8), phantom_case["brain"],
                tmp_path / "lesion.nii.gz")
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(tmp_path / "out"), *FAST, "--mask", str(mask),
                 "--reference", str(phantom_case["nawm"]), "--roi", str(roi)])
    assert code == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["brain"]["n_voxels"] == int(brain.sum())
    assert [r["name"] for r in rep["rois"]] == ["lesion"] and rep["rois"][0]["verdict"] == "likely_recurrence"
