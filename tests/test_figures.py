"""The figures' orientation (issue 16): radiological convention from the affine, never the voxel order.

- io.display_grid: the display axes per acquisition plane, the edge letters, the slice positions (mm).
- A patient-left blob is drawn on the image's right; the letters sit at the right edges.
- One case stored two ways draws the same figures, exactly (PNG bytes and the arrays handed to
  matplotlib): an analyze output folder rewritten with every NIfTI's x axis flipped (RAS -> LAS, the
  affine adjusted, the same world data), and the phantom's series and masks stored LAS and analysed
  again. Both for report.html and for compare.html. (The same phantom through DICOM and dcm2niix is
  tests/test_dicom.py::test_figures_from_dicom_equal_nifti.)

Phantom: perfusion.tools.phantom at matrix 48 (one analyze takes a few seconds), analysed with its true
brain, AIF and NAWM masks, so nothing automatic could choose differently between the two storages.
"""

import base64
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from figrecord import assert_same_figures, record
from perfusion.followup import compare
from perfusion.followup import page as followup_html
from perfusion.report import html as report_html
from perfusion.cli.app import main
from perfusion.io import display_grid
from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _affine(columns, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(columns, dtype=np.float64).T  # row i of ``columns``: world step of voxel axis i
    a[:3, 3] = origin
    return a


RAS = _affine([[2, 0, 0], [0, 2, 0], [0, 0, 4]], [-10.0, -8.0, -6.0])


def _flip_x(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same world data stored with voxel axis 0 reversed (RAS -> LAS)."""
    n = img.shape[0]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, n - 1.0
    data = np.asarray(img.get_fdata(), dtype=np.float32)[::-1]  # int16 / uint8 / float32 values: exact
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    out = nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip, header)
    out.set_sform(img.affine @ flip, code=1)
    out.set_qform(img.affine @ flip, code=1)
    return out


# ------------------------------------------------------------------------------------- the grid


def test_axial_grid():
    g = display_grid(RAS, (10, 8, 3))
    assert g.plane == "axial" and g.axcodes == ("L", "A", "S")
    assert g.marks == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    np.testing.assert_allclose(g.positions_mm, [-6.0, -2.0, 2.0])
    assert [g.position_label(d) for d in range(3)] == ["I 6.0 mm", "I 2.0 mm", "S 2.0 mm"]
    data = np.random.default_rng(0).random((10, 8, 3))
    np.testing.assert_array_equal(g.apply(data), data[::-1])  # RAS: only x reversed
    assert g.display_slice(0) == 0


def test_las_and_slices_stored_downwards_give_the_same_display():
    data = np.random.default_rng(1).random((10, 8, 3))
    g = display_grid(RAS, data.shape)
    # LAS with slices stored superior to inferior: the same world data
    other = RAS @ np.array([[-1, 0, 0, 9], [0, 1, 0, 0], [0, 0, -1, 2], [0, 0, 0, 1.0]])
    g2 = display_grid(other, data.shape)
    np.testing.assert_array_equal(g2.apply(data[::-1, :, ::-1]), g.apply(data))
    np.testing.assert_allclose(g2.positions_mm, g.positions_mm)
    assert g2.display_slice(0) == 2 and g2.marks == g.marks


def test_coronal_sagittal_and_transposed_grids():
    # coronal: voxel axis 1 along S, slices along A
    cor = display_grid(_affine([[2, 0, 0], [0, 0, 2], [0, 4, 0]], [0, 0, 0]), (10, 8, 3))
    assert cor.plane == "coronal" and cor.marks == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert cor.position_label(1) == "A 4.0 mm"
    # sagittal: columns along P, rows along I (as DICOM stores it), slices along L
    sag = display_grid(_affine([[0, 2, 0], [0, 0, -2], [-4, 0, 0]], [0, 0, 0]), (10, 8, 3))
    assert sag.plane == "sagittal" and sag.marks == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    assert [sag.position_label(d) for d in range(3)] == ["R 0.0 mm", "L 4.0 mm", "L 8.0 mm"]  # right to left
    assert sag.apply(np.zeros((10, 8, 3))).shape == (10, 8, 3)
    # axial stored with rows first (voxel axis 0 along A): transposed in-plane, never resampled
    tr = display_grid(_affine([[0, 2, 0], [2, 0, 0], [0, 0, 4]], [0, 0, 0]), (10, 8, 3))
    data = np.random.default_rng(2).random((10, 8, 3))
    np.testing.assert_array_equal(tr.apply(data), data.transpose(1, 0, 2)[::-1])


def test_oblique_grid_gets_the_nearest_plane_and_its_normal_position():
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # 15 degrees about x
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([2.0, 2.0, 4.0])
    g = display_grid(aff, (10, 8, 3))
    assert g.plane == "axial" and g.marks["top"] == "A"
    np.testing.assert_allclose(g.positions_mm, [0.0, 4.0, 8.0])  # along the slice normal, not world z


def test_patient_left_is_drawn_on_the_right(monkeypatch):
    data = np.zeros((10, 8, 2))
    data[1:3, 3:5, :] = 5.0  # low x: the patient's left on a RAS grid
    calls = record(monkeypatch)
    report_html.fig_montage(data, affine=RAS, label="CBV", vmin=0, vmax=5)
    images = [x for k, x in calls if k.startswith("imshow")]
    assert len(images) == 1  # the slices tiled into one image, side by side
    img = images[0]
    inside = np.isfinite(img).any(axis=0)  # the panels' columns; NaN between them
    edges = np.flatnonzero(np.diff(np.r_[0, inside.astype(int), 0]))
    panels = list(zip(edges[::2], edges[1::2]))
    assert len(panels) == 2
    for lo, hi in panels:  # columns = display x within each panel
        assert hi - lo == data.shape[0]
        cols = lo + np.flatnonzero(np.nan_to_num(img[:, lo:hi]).max(axis=0) > 0)
        assert cols.min() >= lo + data.shape[0] // 2  # the blob is in the panel's right half
    texts = [x.split(" ", 2)[-1] for k, x in calls if k == "text"]
    # per panel: its position (mm) above it, then the letters at its left, right, top and bottom edges
    assert texts == ["I 6.0 mm", "R", "L", "A", "P", "I 2.0 mm", "R", "L", "A", "P"]


# --------------------------------------------------------------------- one case, two storages


def _analyze(paths: dict, out, *, dsc=None):
    code = main(["analyze", str(dsc or paths["dsc"]), "--out", str(out), "--roi", str(paths["lesion_hyper"]),
                 "--roi", str(paths["lesion_hypo"]), "--aif", str(paths["aif"]), "--reference", str(paths["nawm"]),
                 "--mask", str(paths["brain"]), "-q"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The phantom analysed as RAS, the output folder rewritten LAS, and the phantom's inputs stored
    LAS analysed again."""
    root = tmp_path_factory.mktemp("figures")
    ph = make_phantom(PhantomSpec(matrix=48))
    paths = write_phantom(ph, root / "ras")
    ras = _analyze(paths, root / "out-ras")
    flipped = root / "out-flipped"
    shutil.copytree(ras, flipped)
    for f in flipped.glob("*.nii.gz"):
        nib.save(_flip_x(nib.load(f)), f)
    las_in = root / "las"
    las_in.mkdir()
    las_paths = {}
    for key in ("dsc", "lesion_hyper", "lesion_hypo", "aif", "nawm", "brain"):
        las_paths[key] = las_in / paths[key].name
        nib.save(_flip_x(nib.load(paths[key])), las_paths[key])
    shutil.copy(paths["dsc"].with_name(paths["dsc"].name.replace(".nii.gz", ".json")), las_in)  # TE, TR
    las = _analyze(las_paths, root / "out-las")
    assert nib.aff2axcodes(nib.load(las / "rcbv.nii.gz").affine) == ("L", "A", "S")
    return {"ras": ras, "flipped": flipped, "las": las, "phantom": ph}


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(d) for d in IMG_RE.findall(page)]


def _report(folder, monkeypatch):
    with monkeypatch.context() as m:
        calls = record(m)
        page = report_html.build_html(folder)
    return page, calls


def _compare(folder, monkeypatch):
    with monkeypatch.context() as m:
        calls = record(m)
        page = followup_html.build_html(compare.compare_folders(folder, folder))
    return page, calls


@pytest.mark.parametrize("build", [_report, _compare], ids=["report", "compare"])
@pytest.mark.parametrize("other", ["flipped", "las"])
def test_ras_and_las_draw_the_same_figures(cases, monkeypatch, build, other):
    page_a, calls_a = build(cases["ras"], monkeypatch)
    page_b, calls_b = build(cases[other], monkeypatch)
    assert_same_figures(calls_a, calls_b, image_check=lambda a, b, kind: np.testing.assert_array_equal(a, b))
    assert _pngs(page_a) == _pngs(page_b)
    assert any(k.startswith("imshow") for k, _ in calls_a) and "Radiological convention" in page_a
    titles = [x for k, x in calls_a if k == "title"]
    assert any(t.endswith(" mm") for t in titles)


def test_phantom_lesion_side_on_the_page(cases, monkeypatch):
    """Each lesion's contours in the rCBV overlay are its mask in display orientation, on the image side
    opposite to the patient side its world x gives (RAS: x < 0 is the patient's left, drawn right)."""
    ph = cases["phantom"]
    _, calls = _report(cases["ras"], monkeypatch)
    contours = [x for k, x in calls if k == "contour"]
    for key in ("lesion_hyper", "lesion_hypo"):
        m = ph.masks[key]
        x_world = (ph.affine @ [*np.argwhere(m).mean(axis=0), 1.0])[0]
        shown = display_grid(ph.affine, m.shape).apply(m)
        panels = [shown[:, :, d].T.astype(float) for d in range(m.shape[2]) if shown[:, :, d].any()]
        assert panels and all(any(np.array_equal(p, c) for c in contours) for p in panels), key
        col = np.argwhere(panels[0] > 0.5)[:, 1].mean()
        assert abs(x_world) > 5 and (col > m.shape[0] / 2) == (x_world < 0), (key, x_world, col)
