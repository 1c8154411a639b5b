"""DICOM out (issue 22): the maps, ROIs and reference of a DICOM-folder analysis as Parametric Maps and a
Segmentation in the source study, written with highdicom and read back with pydicom, highdicom and dcm2niix.

The DICOM series come from tests/test_dicom.py's writer (planted identifiers, shuffled file names and
instance numbers). Tolerances: FLOAT32 (values stored as 32-bit floats, read back as such), the
affine of dcm2niix against the NIfTI maps' (AFFINE_MM: float32 header fields)."""

import tempfile

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from perfusion.errors import InputError  # noqa: E402
from perfusion.io.dicom import export, read_dicom_series  # noqa: E402
from test_dicom import INTERCEPT, SLOPE, small_series, write_dicom_series  # noqa: E402

#: Stored floats are float32: a value read back differs by at most its float32 rounding.
FLOAT32_RTOL = 1e-6
#: dcm2niix's affine against the maps' (both from float32 header fields): mm.
AFFINE_MM = 1e-3


@pytest.fixture(autouse=True)
def own_temp_root(tmp_path_factory, monkeypatch):
    """Each test converts in a temporary root of its own (see tests/test_dicom.py)."""
    root = tmp_path_factory.mktemp("temp-root")
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_to_source_grid_is_the_dicom_pixel_order(tmp_path):
    """The converted NIfTI's first frame, taken onto the source grid, equals every source image's pixels."""
    data, affine = small_series()
    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.5, te=0.03, series_number=5, seed=2)
    conv = read_dicom_series(folder)
    source = export.load_source(folder)
    assert (source.n_slices, source.rows, source.cols) == (3, 10, 12)
    assert "PixelData" not in source.datasets[0]
    frames = export.to_source_grid(conv.data[..., 0], conv.affine, source)
    assert frames.shape == (3, 10, 12)
    for s, ds in enumerate(source.datasets):
        pixels = pydicom.dcmread(ds.filename).pixel_array * SLOPE + INTERCEPT
        np.testing.assert_allclose(frames[s], pixels, rtol=FLOAT32_RTOL, atol=1e-3)
    back = export.from_source_grid(frames, conv.affine, conv.data.shape[:3], source)
    np.testing.assert_array_equal(back, conv.data[..., 0])
    # dcm2niix flips the rows (LAS): the permutation is not the identity
    assert not np.allclose(frames, np.moveaxis(conv.data[..., 0], (2, 1, 0), (0, 1, 2)))


def test_to_source_grid_refuses_another_grid(tmp_path):
    data, affine = small_series()
    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.5, te=0.03, series_number=5, seed=2)
    source = export.load_source(folder)
    conv_affine = affine.copy()
    with pytest.raises(InputError, match="do not lie on the grid of source series 5"):
        export.to_source_grid(np.zeros((12, 10, 4)), conv_affine, source)
    shifted = affine.copy()
    shifted[0, 3] += 1.5  # half a voxel
    with pytest.raises(InputError, match="0.50 voxel off"):
        export.to_source_grid(np.zeros((12, 10, 3)), shifted, source)
