"""--anat: a post-contrast T1 on its own grid, registered rigidly to the DSC baseline (SimpleITK),
saved with its transform and used as the report's background.

The "T1" is made from the phantom's own baseline image: intensities inverted (T2*-weighted bright
becomes dark, so the images share structure, not contrast, as T1 and T2* do), on a 1 mm x 1 mm x 2 mm
grid with a larger field of view, moved by a known rigid transform. Tolerance: 0.5 mm mean / 1 mm
maximum displacement over brain voxels, a quarter of the DSC's 2 mm in-plane voxel; measured 0.11 / 0.25 mm.
"""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from conftest import blob_texture
from perfusion.cli.app import main
from perfusion.quantify.register import Rigid, Volume, resample, upsampled_affine

#: Known motion of the T1 relative to the DSC: degrees about x, y, z (RAS) and mm.
ANGLES_DEG = (2.0, -1.5, 4.0)
SHIFT_MM = (3.0, -2.0, 1.5)
MEAN_TOL_MM, MAX_TOL_MM = 0.5, 1.0

#: The phantom's 5 slices (20 mm) stacked this many times: a 20 mm slab leaves the tilt about x and y
#: poorly determined (1.1 mm mean error measured), a clinical DSC covers 60-120 mm.
TILES = 3


def _true_transform() -> np.ndarray:
    """DSC (fixed) points -> T1 (moving) points, RAS mm."""
    t = np.eye(4)
    t[:3, :3] = Rotation.from_euler("xyz", ANGLES_DEG, degrees=True).as_matrix()
    t[:3, 3] = SHIFT_MM
    return t


def _texture(shape) -> np.ndarray:
    """A time-constant, asymmetric intensity pattern (blobs and an off-centre dark "ventricle"): the
    phantom's baseline is a uniform disk, whose rotation about its axis no image can reveal."""
    x, y, _ = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    nx, ny, _ = shape
    t = blob_texture(shape)
    t -= 0.5 * (((x - 0.42 * nx) / (0.06 * nx)) ** 2 + ((y - 0.5 * ny) / (0.16 * ny)) ** 2 < 1)
    return t


def _textured_case(case, folder):
    """The phantom series times a time-constant texture: delta R2* = -ln(S / S0) / TE, and so every map,
    does not change when each voxel's signal is scaled by a constant."""
    import shutil

    img = nib.load(str(case["dsc"]))
    data = np.tile(np.asarray(img.dataobj, dtype=np.float32), (1, 1, TILES, 1))
    data *= _texture(data.shape[:3])[..., None].astype(np.float32)
    aff = img.affine.copy()
    aff[2, 3] -= aff[2, 2] * img.shape[2] * (TILES - 1) / 2  # keep the slab centred
    folder.mkdir()
    dsc = folder / case["dsc"].name
    nib.save(nib.Nifti1Image(data, aff, img.header), str(dsc))
    sidecar = case["dsc"].with_name(case["dsc"].name.replace(".nii.gz", ".json"))
    shutil.copy(sidecar, folder / sidecar.name)
    roi = nib.load(str(case["lesion_hyper"]))
    roi_path = folder / case["lesion_hyper"].name
    nib.save(nib.Nifti1Image(np.tile(np.asarray(roi.dataobj), (1, 1, TILES)), aff), str(roi_path))
    return dsc, roi_path


def _make_anat(dsc_path, out_path):
    """A "T1" of the textured case: inverted contrast, 1 x 1 x 2 mm grid, larger field of view, moved."""
    img = nib.load(str(dsc_path))
    base = np.asarray(img.dataobj, dtype=np.float64)[..., :10].mean(axis=3)
    brain = base > 0.05 * base.max()
    inverted = np.where(brain, base.max() ** 2 / np.maximum(base, 1e-3) / 10, 0.0)
    shape = (128, 128, 40)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[:3, 3] = [-64.0, -64.0, -40.0]
    moved = Rigid(np.linalg.inv(_true_transform()), (0, 0, 0), (0, 0, 0), 0.0)  # T1 points -> DSC points
    data = resample(Volume(inverted, img.affine), Volume(np.zeros(shape), aff), moved)
    nib.save(nib.Nifti1Image(data.astype(np.float32), aff), str(out_path))
    return base


@pytest.fixture(scope="module")
def anat_run(tmp_path_factory):
    from perfusion.cli.phantom import run_phantom

    base = tmp_path_factory.mktemp("anat")
    case = run_phantom(out=base / "case", quiet=True)
    dsc, roi = _textured_case(case, base / "textured")
    anat = base / "t1.nii.gz"
    baseline = _make_anat(dsc, anat)
    out = base / "out"
    code = main(["analyze", str(dsc), "--out", str(out), "--roi", str(roi),
                 "--anat", str(anat), "-q"])
    assert code == 0
    return {"out": out, "case": case, "dsc": dsc, "anat": anat, "baseline": baseline}


def test_registration_recovers_the_known_motion(anat_run):
    rep = json.loads((anat_run["out"] / "report.json").read_text())
    m = np.asarray(rep["anat"]["registration"]["matrix_ras_mm"])
    aff = nib.load(str(anat_run["out"] / "cbv.nii.gz")).affine
    idx = np.argwhere(anat_run["baseline"] > 0.05 * anat_run["baseline"].max())
    pts = np.c_[idx, np.ones(len(idx))] @ aff.T
    err = np.linalg.norm((pts @ m.T - pts @ _true_transform().T)[:, :3], axis=1)
    print(f"misregistration over {len(idx)} brain voxels: mean {err.mean():.3f} mm, max {err.max():.3f} mm")
    assert err.mean() < MEAN_TOL_MM and err.max() < MAX_TOL_MM


def test_transform_file_is_the_reported_one(anat_run):
    import SimpleITK as sitk

    tx = sitk.ReadTransform(str(anat_run["out"] / "anat_to_dsc.tfm"))
    rep = json.loads((anat_run["out"] / "report.json").read_text())
    m = np.asarray(rep["anat"]["registration"]["matrix_ras_mm"])
    p_ras = np.array([10.0, -20.0, 5.0])
    q_lps = np.asarray(tx.TransformPoint([-p_ras[0], -p_ras[1], p_ras[2]]))  # ITK works in LPS
    q_ras = np.array([-q_lps[0], -q_lps[1], q_lps[2]])
    np.testing.assert_allclose(q_ras, (m @ np.r_[p_ras, 1.0])[:3], atol=1e-6)


def test_background_is_on_the_dsc_slices_upsampled(anat_run):
    img = nib.load(str(anat_run["out"] / "anat.nii.gz"))
    cbv = nib.load(str(anat_run["out"] / "cbv.nii.gz"))
    side = json.loads((anat_run["out"] / "anat.json").read_text())
    zoom = side["Parameters"]["zoom_in_plane"]
    assert zoom == 2  # 2 mm DSC voxels over the T1's finest spacing, 1 mm
    assert img.shape == (cbv.shape[0] * zoom, cbv.shape[1] * zoom, cbv.shape[2])
    np.testing.assert_allclose(img.affine, upsampled_affine(cbv.affine, zoom), atol=1e-5)
    assert side["Units"] == "a.u."
    # the registered T1 lines up with the DSC: where the DSC baseline has brain, the T1 is not empty
    data = np.asarray(img.dataobj)
    brain = anat_run["baseline"] > 0.05 * anat_run["baseline"].max()
    up = np.repeat(np.repeat(brain, zoom, axis=0), zoom, axis=1)
    assert (data[up] > 0).mean() > 0.98


def test_report_uses_the_t1_background(anat_run):
    page = (anat_run["out"] / "report.html").read_text()
    assert "rCBV over the registered anatomical image (--anat)" in page
    assert "Anatomical image registration" in page


def test_anat_that_is_4d_fails_cleanly(anat_run, tmp_path, capsys):
    bad = tmp_path / "t1_4d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), str(bad))
    case = anat_run["case"]
    out = tmp_path / "out"
    code = main(["analyze", str(case["dsc"]), "--out", str(out), "--anat", str(bad), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1
    assert str(bad) in err[0] and "3-D" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_anat_without_structure_fails_cleanly(anat_run, tmp_path, capsys):
    bad = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32, 8), np.float32), np.diag([4.0, 4.0, 4.0, 1.0])), str(bad))
    out = tmp_path / "out"
    code = main(["analyze", str(anat_run["case"]["dsc"]), "--out", str(out), "--anat", str(bad), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and str(bad) in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_report_command_adds_the_t1_afterwards(anat_run, tmp_path):
    """`perfusion report DIR --anat T1` on a folder analysed without it gives the same registration."""
    out = tmp_path / "plain"
    assert main(["analyze", str(anat_run["dsc"]), "--out", str(out), "-q"]) == 0
    assert not (out / "anat.nii.gz").exists()
    assert main(["report", str(out), "--anat", str(anat_run["anat"]), "-q"]) == 0
    first = json.loads((anat_run["out"] / "report.json").read_text())["anat"]["registration"]["matrix_ras_mm"]
    again = json.loads((out / "report.json").read_text())["anat"]["registration"]["matrix_ras_mm"]
    np.testing.assert_allclose(again, first, atol=1e-6)  # same images, seeded sampling, one thread
    assert "rCBV over the registered anatomical image (--anat)" in (out / "report.html").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
