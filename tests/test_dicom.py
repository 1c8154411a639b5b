"""DICOM in (issue 7): real DICOM files written with pydicom, converted by the real dcm2niix.

The DSC series is the phantom (PhantomSpec(matrix=48): 48 x 48 x 5 x 80; 32 is too small for its
block sweep) written as single-frame MR Image Storage files: typical axial geometry (rows along +P,
columns along +L, ImageOrientationPatient 1 0 0 0 1 0) placing every voxel at the world point the
phantom's NIfTI affine gives it, TemporalPositionIdentifier, AcquisitionTime per slice (frame start
+ slice x TR / slices), TE/TR in ms, uint16 pixels with one RescaleSlope / RescaleIntercept
(SLOPE, INTERCEPT) for every frame, planted identifiers, files shuffled under random names with
random InstanceNumbers.

dcm2niix writes its own grid (LAS for these slices: it flips the row axis), never the phantom's
RAS; as_closest_canonical brings it back to the phantom's grid for comparisons, and the phantom's
ROIs are reoriented with nibabel onto dcm2niix's grid, as a user draws masks on the converted NIfTI.

Tolerances:
- QUANT_ATOL: the uint16 storage rounds (signal - INTERCEPT) / SLOPE, so a stored signal differs
  from the phantom's by at most SLOPE / 2 (0.15 a.u.), plus float32 rounding of values near 1300.
- The maps of a DICOM-folder analysis against the NIfTI analysis: the quantisation is the only
  difference in the data (0.15 a.u. in a baseline of 1000, against a noise SD of 6.7); measured and
  guarded in test_analyze_dicom_folder_equals_nifti.
"""

import contextlib
import gzip
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from perfusion.io import dicom  # noqa: E402
from perfusion.io.dicom import convert  # noqa: E402
from perfusion.cli.app import main  # noqa: E402
from perfusion.errors import InputError, UsageError  # noqa: E402
from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom  # noqa: E402

SLOPE, INTERCEPT = 0.3, -5.0
QUANT_ATOL = SLOPE / 2 + 1e-3

PLANTED = {
    "PatientName": "Doe^Jane^Planted",
    "PatientID": "PID-PLANTED-4711",
    "PatientBirthDate": "19010101",
    "AccessionNumber": "ACC-PLANTED-0815",
    "InstitutionName": "Planted General Hospital",
    "ReferringPhysicianName": "Planted^Referrer",
}
#: Searched everywhere (whole files, decompressed): long enough never to occur by chance.
LONG_TOKENS = [*PLANTED.values(), "Planted", "19010101"]
#: Short tokens: searched with alphanumeric boundaries (so "0.04711" in a TSV does not count), and in
#: NIfTI files only in the header and extensions (the voxel data are binary floats).
SHORT_TOKENS = ["4711", "0815"]


# ------------------------------------------------------------------------------------------ writer


def write_dicom_series(folder: Path, data: np.ndarray, affine: np.ndarray, *, tr: float, te: float,
                       series_number: int, seed: int, slope: float = SLOPE, intercept: float = INTERCEPT,
                       temporal: bool = True, description: str = "ep2d_perf Planted", mutate=None,
                       echo_number: int | None = None, uids: tuple[str, str, str] | None = None) -> int:
    """Write ``data`` (x, y, z, t; signal, a.u.) as single-frame MR images into ``folder``; ``affine``
    (NIfTI, RAS, mm) places voxel (i, j, k): columns run along i, rows along j. TE/TR in s (written
    in ms). ``mutate(ds, t, k)`` may change a dataset or return None to leave it out. Returns the
    number of files written.

    One echo of a multi-echo series: ``echo_number`` (EchoNumbers, 0018,0086) and the study, series and
    frame-of-reference UIDs shared by the echoes (``uids``); call once per echo with its TE, into one
    folder. As a scanner does, the echoes of a slice and frame share their AcquisitionTime; dcm2niix
    splits them by EchoNumbers / EchoTime into one NIfTI per echo."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz, nt = data.shape
    lps = np.array([-1.0, -1.0, 1.0])
    col_step, row_step = affine[:3, 0], affine[:3, 1]  # world step per column (i), per row (j)
    iop = [*(col_step * lps / np.linalg.norm(col_step)), *(row_step * lps / np.linalg.norm(row_step))]
    study, series, frame_of_ref = uids or (generate_uid(), generate_uid(), generate_uid())
    start = 10 * 3600 + 15 * 60.0
    datasets = []
    for t in range(nt):
        for k in range(nz):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.Modality = "MR"
            for key, value in PLANTED.items():
                setattr(ds, key, value)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240102"
            ds.SeriesNumber = series_number
            ds.SeriesDescription = ds.ProtocolName = description
            ds.Manufacturer, ds.ManufacturerModelName = "SIEMENS", "Prisma"
            ds.MagneticFieldStrength = 3
            ds.EchoTime, ds.RepetitionTime = te * 1000.0, tr * 1000.0
            if echo_number is not None:
                ds.EchoNumbers = echo_number
            ds.FlipAngle = 60
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "EP", "SK", "2D"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "PERFUSION", "NONE"]
            when = start + t * tr + k * tr / nz
            ds.AcquisitionTime = f"{int(when // 3600):02d}{int(when % 3600 // 60):02d}{when % 60:09.6f}"
            if temporal:
                ds.TemporalPositionIdentifier = t + 1
                ds.NumberOfTemporalPositions = nt
            ds.ImageOrientationPatient = [round(float(v), 6) for v in iop]
            ds.ImagePositionPatient = [round(float(v), 4) for v in (affine @ [0, 0, k, 1])[:3] * lps]
            ds.PixelSpacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
            ds.SliceThickness = ds.SpacingBetweenSlices = float(np.linalg.norm(affine[:3, 2]))
            ds.Rows, ds.Columns = ny, nx
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
            stored = np.round((data[:, :, k, t].T - intercept) / slope)
            assert stored.min() >= 0 and stored.max() <= 65535
            ds.PixelData = stored.astype(np.uint16).tobytes()
            if mutate is not None:
                ds = mutate(ds, t, k)
            if ds is not None:
                datasets.append(ds)
    order = rng.permutation(len(datasets))
    numbers = rng.permutation(len(datasets)) + 1
    for n, i in enumerate(order):
        ds = datasets[i]
        ds.InstanceNumber = int(numbers[n])
        ds.save_as(folder / f"{rng.integers(1 << 62):016x}", enforce_file_format=True)
    return len(datasets)


def write_enhanced(path: Path, data: np.ndarray, affine: np.ndarray, *, tr: float, te: float, series_number: int,
                   slope: float = SLOPE, intercept: float = INTERCEPT, frame_slope=None) -> None:
    """``data`` (x, y, z, t) as one Enhanced MR Image Storage file: geometry in the functional groups,
    TemporalPositionIndex and FrameAcquisitionDateTime per frame; one shared RescaleSlope, or per
    frame ``frame_slope(t)`` (the pixels always stored with ``slope``)."""
    nx, ny, nz, nt = data.shape
    lps = np.array([-1.0, -1.0, 1.0])
    col_step, row_step = affine[:3, 0], affine[:3, 1]
    iop = [*(col_step * lps / np.linalg.norm(col_step)), *(row_step * lps / np.linalg.norm(row_step))]

    def item(**values) -> Sequence:
        ds = Dataset()
        for key, value in values.items():
            setattr(ds, key, value)
        return Sequence([ds])

    def rescale(s: float) -> Sequence:
        return item(RescaleSlope=s, RescaleIntercept=intercept, RescaleType="US")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    for key, value in PLANTED.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = series_number, 1
    ds.Manufacturer, ds.MagneticFieldStrength = "Philips", 3
    ds.EchoTime, ds.RepetitionTime = te * 1000, tr * 1000
    ds.Rows, ds.Columns, ds.NumberOfFrames = ny, nx, nz * nt
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    shared.PlaneOrientationSequence = item(ImageOrientationPatient=[round(float(v), 6) for v in iop])
    shared.PixelMeasuresSequence = item(PixelSpacing=[float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))],
                                        SliceThickness=float(np.linalg.norm(affine[:3, 2])))
    if frame_slope is None:
        shared.PixelValueTransformationSequence = rescale(slope)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, pixels = [], []
    for t in range(nt):
        for k in range(nz):
            when = 10 * 3600 + t * tr + k * tr / nz
            fg = Dataset()
            fg.PlanePositionSequence = item(
                ImagePositionPatient=[round(float(v), 4) for v in (affine @ [0, 0, k, 1])[:3] * lps])
            fg.FrameContentSequence = item(
                TemporalPositionIndex=t + 1, StackID="1", InStackPositionNumber=k + 1,
                DimensionIndexValues=[1, k + 1, t + 1],
                FrameAcquisitionDateTime=f"20240102{int(when // 3600):02d}{int(when % 3600 // 60):02d}{when % 60:09.6f}")
            if frame_slope is not None:
                fg.PixelValueTransformationSequence = rescale(frame_slope(t))
            frames.append(fg)
            pixels.append(np.round((data[:, :, k, t].T - intercept) / slope).astype(np.uint16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(pixels).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def small_series(shape=(12, 10, 3, 20), seed=1) -> tuple[np.ndarray, np.ndarray]:
    """A small 4-D signal (a.u.) with a dip, and an oblique-free affine of 3 x 3 x 5 mm."""
    rng = np.random.default_rng(seed)
    t = np.arange(shape[3])
    dip = 1 - 0.3 * np.exp(-0.5 * ((t - 8) / 2.0) ** 2)
    data = 800 + 200 * rng.random(shape[:3])[..., None] * dip
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    affine[:3, 3] = [-18.0, -15.0, 0.0]
    return data, affine


def run(args: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def reorient_to(mask_path: Path, target_affine: np.ndarray, out: Path) -> None:
    """Save ``mask_path`` on the grid of ``target_affine`` (same voxels, axes flipped / permuted)."""
    img = nib.load(mask_path)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                           nib.orientations.io_orientation(target_affine))
    data = nib.orientations.apply_orientation(np.asarray(img.dataobj), ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    np.testing.assert_allclose(affine, target_affine, atol=1e-4)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), target_affine), out)


# ----------------------------------------------------------------------------------------- fixtures

#: The shared temporary folder, as tempfile saw it when this module was imported (before a test set a
#: temporary root of its own): other processes make and remove perfusion-dicom-* folders there.
SYSTEM_TEMP = Path(tempfile.gettempdir())


@pytest.fixture(autouse=True)
def own_temp_root(tmp_path_factory, monkeypatch):
    """Each test converts in a temporary root of its own (tempfile.tempdir, which read_dicom_series's
    mkdtemp takes, as TMPDIR does for a new process), so a test that looks for leftover perfusion-dicom-*
    folders sees its own only, whatever other processes do in the shared temporary folder at the same
    time (issue 21). The module's ``case`` fixture, made once for all, sets its own the same way."""
    root = tmp_path_factory.mktemp("temp-root")
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root



@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The phantom as NIfTI, the same series as DICOM (with a one-frame 'T1' series in the same
    folder), and the outputs of convert, dicom-inspect and analyze on both, with their captured text."""
    root = tmp_path_factory.mktemp("dicom")
    # a temporary folder of this fixture's own for the conversions (tempfile.tempdir, which
    # dicom.read_dicom_series's mkdtemp takes): test workers running other DICOM tests at the same time
    # make and remove their own perfusion-dicom-* folders in the shared one
    temp_dir = root / "tmp"
    temp_dir.mkdir()
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(temp_dir)
    try:
        return _make_case(root, temp_dir)
    finally:
        tempfile.tempdir = saved_tempdir


def write_phantom_dicom(root: Path, matrix: int = 48):
    """The default phantom (``matrix`` x ``matrix``) as NIfTI under ``root/nifti`` and as the DSC series 7
    of a DICOM folder ``root/PACS export`` with the planted identifiers, in LPS voxel order (so that its
    orientation is the usual axial 1 0 0 0 1 0). Returns (phantom, NIfTI paths, folder, LPS data, LPS
    affine)."""
    ph = make_phantom(PhantomSpec(matrix=matrix))
    paths = write_phantom(ph, root / "nifti")
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(ph.affine),
                                           nib.orientations.axcodes2ornt(("L", "P", "S")))
    lps_data = nib.orientations.apply_orientation(ph.signal.astype(np.float64), ornt)
    lps_affine = ph.affine @ nib.orientations.inv_ornt_aff(ornt, ph.signal.shape[:3])
    folder = root / "PACS export"
    write_dicom_series(folder, lps_data, lps_affine, tr=ph.spec.tr, te=ph.spec.te, series_number=7, seed=3)
    return ph, paths, folder, lps_data, lps_affine


def _make_case(root, temp_dir):
    ph, paths, folder, lps_data, lps_affine = write_phantom_dicom(root)
    t1 = lps_data[..., 10:20].mean(axis=3, keepdims=True)
    write_dicom_series(folder / "T1", t1, lps_affine, tr=0.5, te=0.01, series_number=3, seed=4, temporal=False,
                       description="t1_se Planted")
    texts = []
    conv = root / "converted"
    code, out, err = run(["convert", folder, conv, "--name", "sub-01"])
    assert code == 0, err
    texts += [out, err]
    converted = nib.load(conv / "sub-01_dsc.nii.gz")
    rois = root / "rois-on-dicom-grid"
    rois.mkdir()
    for key in ("lesion_hyper", "lesion_hypo", "aif", "nawm", "brain"):
        reorient_to(paths[key], converted.affine, rois / paths[key].name)
    nifti_out, dicom_out = root / "analyze-nifti", root / "analyze-dicom"
    # the true brain, AIF and NAWM masks on both: on this 48-matrix phantom the automatic AIF (38 vs 3
    # voxels) and brain mask (79 background voxels) flip with the quantisation alone (see the report)
    code, out, err = run(["analyze", paths["dsc"], "--out", nifti_out, "--roi", paths["lesion_hyper"],
                          "--roi", paths["lesion_hypo"], "--aif", paths["aif"], "--reference", paths["nawm"],
                          "--mask", paths["brain"], "-q"])
    assert code == 0, err
    code, out, err = run(["analyze", folder, "--out", dicom_out, "--roi", rois / "roi-lesion_hyper.nii.gz",
                          "--roi", rois / "roi-lesion_hypo.nii.gz", "--aif", rois / "mask-aif.nii.gz",
                          "--reference", rois / "mask-reference.nii.gz", "--mask", rois / "mask-brain.nii.gz"])
    assert code == 0, err
    texts += [out, err]
    code, out, err = run(["dicom-inspect", folder, "--json", root / "inspect.json"])
    assert code == 0, err
    texts += [out, err]
    return {"phantom": ph, "paths": paths, "folder": folder, "converted": conv, "nifti_out": nifti_out,
            "dicom_out": dicom_out, "inspect_json": root / "inspect.json", "texts": texts, "root": root,
            "temp_dir": temp_dir}


# -------------------------------------------------------------------------------------------- tests


def test_convert_equals_phantom(case):
    ph = case["phantom"]
    img = nib.load(case["converted"] / "sub-01_dsc.nii.gz")
    assert img.shape == ph.signal.shape
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")  # dcm2niix's grid, kept as it is
    canonical = nib.as_closest_canonical(img)  # the phantom's grid is RAS already
    np.testing.assert_allclose(canonical.affine, ph.affine, atol=1e-4)  # float32 storage of the affine
    data = np.asarray(canonical.get_fdata())
    err = np.abs(data - ph.signal)
    assert err.max() <= QUANT_ATOL
    assert err.max() > 0.05  # the quantisation is there: the comparison is not trivially exact
    side = json.loads((case["converted"] / "sub-01_dsc.json").read_text())
    assert side["EchoTime"] == pytest.approx(ph.spec.te) and side["RepetitionTime"] == pytest.approx(ph.spec.tr)
    assert side["FlipAngle"] == 60 and side["MagneticFieldStrength"] == 3 and side["SeriesNumber"] == 7
    assert set(side) <= set(dicom.SIDECAR_WHITELIST)
    assert img.header.get_zooms()[3] == pytest.approx(ph.spec.tr)
    # the converted file analyses like the folder: TE/TR from its sidecar
    assert dicom.SIDECAR_WHITELIST and "SeriesDescription" not in side and "InstitutionName" not in side


def test_analyze_dicom_folder_equals_nifti(case):
    """The DICOM-folder analysis (the DSC series picked among two, masks reoriented onto dcm2niix's
    grid) reproduces the NIfTI analysis. The data differ only by the uint16 quantisation (<= 0.15 a.u.
    against a noise SD of 6.7 a.u.); what it moves, measured (48 x 48 x 5 x 80, seed 0, true brain,
    AIF and NAWM masks), as |DICOM - NIfTI| over the 7640 brain voxels:

    - CBV, rCBV: relative, median 0.09 % / 0.11 %, 99th percentile 0.73 % / 0.76 %, max 15 % (a CBV
      of 0.17 mL/100 g); ROI median rCBV 3.0011 vs 3.0038 and 0.6428 vs 0.6443; verdicts equal.
    - CBF, MTT (model fit): relative, median 0.14 % / 0.15 %, 90th percentile 0.58 % / 0.64 %; the
      99th percentile is 27 % / 28 %: a few noisy voxels whose fit lands elsewhere.
    - TTP identical in 99.86 % of voxels; Tmax absolute, median 0.003 s, 90th percentile 0.016 s.
    """
    nif = json.loads((case["nifti_out"] / "report.json").read_text())
    dcm = json.loads((case["dicom_out"] / "report.json").read_text())
    acq = dcm["acquisition"]
    assert acq["te"] == pytest.approx(0.025) and acq["tr"] == pytest.approx(1.5)
    assert acq["te_source"] == "DICOM (dcm2niix sidecar EchoTime)"
    assert acq["tr_source"] == "DICOM (dcm2niix sidecar RepetitionTime)"
    assert acq["flip_angle_deg"] == 60 and acq["field_strength_t"] == 3
    # the folder is hashed as one entry (no DICOM file name in the report), named without its path
    assert dcm["inputs"]["dsc"]["file"] == "DICOM folder"
    assert re.fullmatch(r"[0-9a-f]{64}", dcm["inputs"]["dsc"]["sha256"])
    assert str(case["folder"]) not in (case["dicom_out"] / "report.json").read_text()
    assert dcm["aif"]["n_voxels"] == nif["aif"]["n_voxels"] == 40 and dcm["brain"]["n_voxels"] == 7640
    for a, b in zip(sorted(nif["rois"], key=lambda r: r["name"]), sorted(dcm["rois"], key=lambda r: r["name"])):
        assert a["name"] == b["name"] and a["verdict"] == b["verdict"] and a["n_voxels"] == b["n_voxels"]
        assert b["rcbv_median"] == pytest.approx(a["rcbv_median"], rel=ROI_RCBV_RTOL)
    for name, (kind, quantile, limit) in MAP_TOLERANCE.items():
        ref_img = nib.load(case["nifti_out"] / f"{name}.nii.gz")
        got_img = nib.as_closest_canonical(nib.load(case["dicom_out"] / f"{name}.nii.gz"))
        np.testing.assert_allclose(got_img.affine, ref_img.affine, atol=1e-4)
        ref, got = np.asarray(ref_img.dataobj), np.asarray(got_img.dataobj)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
        both = np.isfinite(ref)
        diff = np.abs(got[both] - ref[both])
        if kind == "rel":
            diff = diff / np.maximum(np.abs(ref[both]), 1e-6)
        assert np.quantile(diff, quantile) <= limit, (name, np.quantile(diff, [0.5, 0.9, 0.99, 1.0]))


#: Per map: (relative or absolute |DICOM - NIfTI|, the quantile of brain voxels, its limit), about
#: 2-3 x the values measured in test_analyze_dicom_folder_equals_nifti's docstring.
MAP_TOLERANCE = {"cbv": ("rel", 0.99, 0.02), "rcbv": ("rel", 0.99, 0.02), "cbf": ("rel", 0.9, 0.02),
                 "mtt": ("rel", 0.9, 0.02), "ttp": ("abs", 0.99, 0.0), "tmax": ("abs", 0.9, 0.05)}
#: ROI median rCBV, DICOM vs NIfTI (measured 0.09 % and 0.24 %).
ROI_RCBV_RTOL = 5e-3


def test_figures_from_dicom_equal_nifti(case, monkeypatch):
    """report.html and compare.html of the DICOM-folder analysis (dcm2niix's LAS grid) draw the same
    figures as those of the NIfTI analysis (RAS): the same panels, titles (slice positions in mm) and
    orientation letters, identical ROI and reference contours, and images equal up to what the uint16
    quantisation moves (MAP_TOLERANCE's rCBV limit for the rCBV layers, QUANT_ATOL for the baseline
    layers; the same NaN pattern). Drawn in voxel order, the DICOM page would be mirrored left-right."""
    from figrecord import assert_same_figures, record

    from perfusion.followup import compare
    from perfusion.followup import page as followup_html
    from perfusion.report import html as report_html

    def pages(folder):
        with monkeypatch.context() as m:
            calls = record(m)
            report_html.build_html(folder)
            followup_html.build_html(compare.compare_folders(folder, folder))
        return calls

    def close(a, b, kind):
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
        both = np.isfinite(a)
        diff = np.abs(a[both] - b[both])
        if kind == "imshow gray":  # the baseline image under the rCBV (a.u.)
            assert diff.max() <= QUANT_ATOL, diff.max()
        else:  # a map layer: against the layer's largest value, a proxy for its colour scale
            q = np.quantile(diff, [0.5, 0.99]) / np.nanmax(np.abs(a))
            tol = FIGURE_TOL["rcbv" if kind == "imshow jet" else "maps"]
            assert q[0] <= tol[0] and q[1] <= tol[1], (kind, q)

    nifti, dcm = pages(case["nifti_out"]), pages(case["dicom_out"])
    assert_same_figures(nifti, dcm, image_check=close)
    # slice positions: the overlay's panel titles and the montages' labels above their tiled panels
    labels = [x for k, x in nifti if k == "title"] + [x.split(" ", 2)[2] for k, x in nifti if k == "text"]
    assert "I 6.0 mm" in labels and "S 2.0 mm" in labels  # the phantom's slices at z = -6, -2, 2 ... mm
    assert [x.split()[-1] for k, x in nifti if k == "text"][:4] == ["R", "L", "A", "P"]


#: A map layer of a figure, DICOM against NIfTI: (median, 99th percentile) of |difference| over its
#: finite pixels, as fractions of the layer's largest value. Measured worst: the rCBV layers (the
#: overlay and the compare page, jet) 0.0001 / 0.0003; the montages: CBV 0.0001 / 0.0002, CBF
#: 0.0000 / 0.0027, MTT 0.0002 / 0.032, Tmax 0.0009 / 0.070 (a few noisy voxels whose fit lands
#: elsewhere, as test_analyze_dicom_folder_equals_nifti measured), K2 0.0001 / 0.0004. Limits about
#: 2-3 x these.
FIGURE_TOL = {"rcbv": (0.0003, 0.001), "maps": (0.003, 0.15)}


def test_inspect_describes_both_series(case):
    data = json.loads(case["inspect_json"].read_text())
    assert data["dsc_series"] == 7
    by_number = {s["series_number"]: s for s in data["series"]}
    dsc, t1 = by_number[7], by_number[3]
    assert (dsc["frames"], dsc["slices_per_frame"], dsc["matrix"], dsc["n_files"]) == (80, 5, [48, 48], 400)
    assert dsc["ordering_key"] == "TemporalPositionIdentifier" and dsc["timing_source"] == "AcquisitionTime"
    assert dsc["interval_median_s"] == pytest.approx(1.5) and dsc["interval_min_s"] == pytest.approx(1.5)
    assert dsc["interval_max_s"] == pytest.approx(1.5) and dsc["repetition_time_s"] == pytest.approx(1.5)
    assert dsc["errors"] == [] and dsc["warnings"] == []
    assert dsc["rescale"] == [{"slope": SLOPE, "intercept": INTERCEPT}]
    assert (t1["frames"], t1["slices_per_frame"], t1["dsc_candidate"]) == (1, 5, False)


def test_analyze_outputs_name_no_input_folder(case):
    """The DICOM folder's name ('PACS export'; in practice often the patient's) and the folders of the
    series and masks appear in no file of the DICOM analysis (decompressed, the report's figures left
    out): the series is 'DICOM folder' with the hash of its files."""
    needles = [case["folder"].name, str(case["root"]), case["root"].name]
    hits = []
    for p in sorted(case["dicom_out"].rglob("*")):
        raw = p.read_bytes()
        text = (gzip.decompress(raw) if p.name.endswith(".gz") else raw).decode("latin-1")
        text = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", text)
        hits += [(p.name, n) for n in needles if n in text]
    assert hits == []
    rep = json.loads((case["dicom_out"] / "report.json").read_text())
    assert rep["inputs"]["roi:roi-lesion_hyper"]["file"] == "roi-lesion_hyper.nii.gz"
    inspect_json = (case["root"] / "inspect.json").read_text()  # dicom-inspect --json names no folder either
    assert [n for n in needles if n in inspect_json] == []


def planted_in(path: Path) -> list[str]:
    """The planted identifiers found in a file (decompressed .gz; NIfTI voxel data and the report's
    embedded PNG figures searched for the long tokens only)."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("latin-1")
    short_scope = text
    if ".nii" in path.name:
        short_scope = text[: int(nib.load(path).header["vox_offset"])]  # header and extensions
    if path.suffix == ".html":
        short_scope = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", text)
    return planted_in_text(text, short_scope)


def planted_in_text(text: str, short_scope: str | None = None) -> list[str]:
    short_scope = text if short_scope is None else short_scope
    # a short token is a whole word, not digits of a number: a timing of 0.0815 s in report.json is not the
    # planted ID 0815 (the fraction's digits follow a '.')
    return ([t for t in LONG_TOKENS if t.lower() in text.lower()]
            + [t for t in SHORT_TOKENS if re.search(rf"(?<![0-9A-Za-z.]){t}(?![0-9A-Za-z])", short_scope)])


def test_no_identifier_leaves(case, tmp_path):
    """Every file written by convert, analyze (report.html included) and dicom-inspect --json, and
    everything printed, is free of the planted identifiers; dcm2niix's own output is not (the
    scanner finds them there), and its temporary folders are gone."""
    files = [p for p in case["root"].rglob("*") if p.is_file()
             and not p.is_relative_to(case["folder"]) and not p.is_relative_to(case["root"] / "nifti")]
    assert len(files) > 30 and {"report.html", "report.json", "inspect.json", "sub-01_dsc.json"} <= {p.name for p in files}
    hits = [(p.name, t) for p in files for t in planted_in(p)]
    hits += [(f"printed text {i}", t) for i, text in enumerate(case["texts"]) for t in planted_in_text(text)]
    assert hits == []
    img = nib.load(case["converted"] / "sub-01_dsc.nii.gz")
    assert img.header["descrip"].tobytes().startswith(b"perfusion convert")
    # positive control: dcm2niix alone (anonymised BIDS, -ba y) keeps the institution in its sidecar
    subprocess.run([dicom.find_dcm2niix(), *dicom.DCM2NIIX_OPTIONS, "-o", str(tmp_path), str(case["folder"])],
                   capture_output=True, check=True)
    raw = [t for p in tmp_path.glob("*.json") for t in planted_in(p)]
    assert "Planted General Hospital" in raw
    assert list(case["temp_dir"].iterdir()) == []  # the conversions' temporary folders are gone


def test_a_decoy_in_the_shared_temp_folder_changes_nothing(tmp_path, own_temp_root):
    """Another process's conversion folder in the shared temporary folder (a perfusion-dicom-* folder
    holding a planted identifier) while this test converts: the conversion uses this test's own root,
    leaves it empty and writes no identifier, and leaves the other folder alone. The decoy is what made
    a check of the shared folder fail before (issue 21): it is there for such a check to see."""
    decoy = Path(tempfile.mkdtemp(prefix="perfusion-dicom-", dir=SYSTEM_TEMP))
    try:
        (decoy / "out").mkdir()
        (decoy / "out" / "x_dsc.json").write_text(json.dumps({"InstitutionName": PLANTED["InstitutionName"]}))
        assert decoy in SYSTEM_TEMP.glob("perfusion-dicom-*")  # a scan of the shared folder would find it
        assert Path(tempfile.gettempdir()) == own_temp_root != SYSTEM_TEMP
        data, affine = small_series()
        write_dicom_series(tmp_path / "dcm", data, affine, tr=1.2, te=0.03, series_number=5, seed=5)
        code, out, err = run(["convert", tmp_path / "dcm", tmp_path / "out", "--name", "sub-01"])
        assert code == 0, err
        assert list(own_temp_root.iterdir()) == []  # this test's conversion folder is gone
        written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
        assert written and [t for p in written for t in planted_in(p)] == []
        assert planted_in_text(out + err) == []
        assert planted_in(decoy / "out" / "x_dsc.json") == ["Planted General Hospital", "Planted"]  # untouched
    finally:
        shutil.rmtree(decoy, ignore_errors=True)


def test_two_dsc_series_need_series_option(tmp_path):
    data, affine = small_series()
    write_dicom_series(tmp_path / "dcm" / "a", data, affine, tr=1.2, te=0.03, series_number=5, seed=5)
    write_dicom_series(tmp_path / "dcm" / "b", data[..., :16], affine, tr=1.2, te=0.03, series_number=6, seed=6)
    code, out, err = run(["convert", tmp_path / "dcm", tmp_path / "out"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "series 5: 20 frames x 3 slices, matrix 10 x 12" in err and "series 6: 16 frames" in err
    assert "--series N" in err and "Planted" not in err and not (tmp_path / "out").exists()
    code, out, err = run(["convert", tmp_path / "dcm", tmp_path / "out", "--series", "6"])
    assert code == 0, err
    img = nib.load(tmp_path / "out" / "series-6_dsc.nii.gz")
    assert img.shape == (12, 10, 3, 16)
    np.testing.assert_allclose(np.asarray(nib.as_closest_canonical(img).get_fdata()), data[..., :16], atol=QUANT_ATOL)
    code, out, err = run(["convert", tmp_path / "dcm", tmp_path / "out2", "--series", "9"])
    assert code == 2 and "no series 9" in err
    code, out, err = run(["analyze", tmp_path / "out" / "series-6_dsc.nii.gz", "--out", tmp_path / "o3", "--series", "6"])
    assert code == 2 and "applies to a DICOM folder" in err


def test_rescale_slope_change_is_an_error(tmp_path):
    data, affine = small_series()

    def mutate(ds, t, k):
        if t == 9:
            ds.RescaleSlope = 2 * SLOPE  # stored values unchanged: the frame's signal doubles
        return ds

    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.2, te=0.03, series_number=5, seed=7, mutate=mutate)
    code, out, err = run(["convert", folder, tmp_path / "out"])
    assert code == 4 and len(err.strip().splitlines()) == 1
    assert str(folder) in err and "RescaleSlope" in err and "frame 10" in err
    assert "re-export the series without per-frame scaling" in err
    info = dicom.inspect(folder)[0]
    assert len(info.rescale) == 2 and info.errors


@pytest.mark.parametrize("temporal", [True, False], ids=["TemporalPositionIdentifier", "AcquisitionTime"])
def test_missing_slice_is_an_error(tmp_path, temporal):
    data, affine = small_series()
    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.2, te=0.03, series_number=5, seed=8, temporal=temporal,
                       mutate=lambda ds, t, k: None if (t, k) == (12, 1) else ds)
    out_dir = tmp_path / "out"
    code, out, err = run(["analyze", folder, "--out", out_dir])
    assert code == 4 and len(err.strip().splitlines()) == 1
    assert str(folder) in err and "unequal slice counts per frame" in err and "re-export" in err
    assert ("frame 13 of 20 has 2 slices" in err) if temporal else ("has 19 images, the others 20" in err)
    assert not out_dir.exists()


def test_frame_interval_twice_tr_is_a_warning(tmp_path):
    """AcquisitionTime 2.4 s apart, RepetitionTime 1.2 s: dicom-inspect warns against the header TR;
    dcm2niix takes the measured 2.4 s as the frame time (its RepetitionTime; the header's becomes
    RepetitionTimeExcitation), and the analysis says so in a warning naming --tr."""
    data, affine = small_series()
    # temporal noise: a noise-free series repeats its flat tail bit for bit after the DICOM quantisation,
    # and the analysis rightly refuses frames identical to the one before (duplicated, issue 17)
    data = data + np.random.default_rng(3).normal(0.0, 3.0, data.shape)

    def mutate(ds, t, k):
        when = 10 * 3600 + 15 * 60.0 + t * 2.4 + k * 0.4
        ds.AcquisitionTime = f"{int(when // 3600):02d}{int(when % 3600 // 60):02d}{when % 60:09.6f}"
        return ds

    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.2, te=0.03, series_number=5, seed=9, mutate=mutate)
    code, out, err = run(["dicom-inspect", folder, "--json", tmp_path / "i.json"])
    assert code == 0
    s = json.loads((tmp_path / "i.json").read_text())["series"][0]
    assert s["interval_median_s"] == pytest.approx(2.4) and s["errors"] == []
    assert len(s["warnings"]) == 1 and "differs from the RepetitionTime 1.2 s by 100 %" in s["warnings"][0]
    assert "--tr 2.4" in s["warnings"][0] and "--tr 2.4" in out
    with pytest.warns(UserWarning, match="not the header's RepetitionTime 1.2 s .*--tr 1.2") as caught:
        series = dicom.load_dicom_series(folder)
    assert len(caught) == 1 and str(folder) in str(caught[0].message)
    assert series.tr == pytest.approx(2.4) and "acquisition times" in series.tr_source and series.n_frames == 20
    with pytest.warns(UserWarning, match="differs from the TR used 1.2 s by 100 %"):
        assert dicom.load_dicom_series(folder, tr=1.2).tr_source == "option --tr"
    # and in an analysis, the warning lands in report.json (masks drawn on the converted grid)
    code, out, err = run(["convert", folder, tmp_path / "conv"])
    assert code == 0 and "analyse with --tr 1.2" in out
    grid = nib.load(tmp_path / "conv" / "series-5_dsc.nii.gz")
    for name, box in (("aif", np.s_[2:4, 2:4, :]), ("ref", np.s_[5:10, 5:9, :])):
        m = np.zeros(grid.shape[:3], np.uint8)
        m[box] = 1
        nib.save(nib.Nifti1Image(m, grid.affine), tmp_path / f"{name}.nii.gz")
    code, out, err = run(["analyze", folder, "--out", tmp_path / "o", "--aif", tmp_path / "aif.nii.gz",
                          "--reference", tmp_path / "ref.nii.gz", "-q"])
    assert code == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["acquisition"]["tr"] == pytest.approx(2.4) and "acquisition times" in rep["acquisition"]["tr_source"]
    assert any("not the header's RepetitionTime 1.2 s" in w for w in rep["warnings"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dicom.load_dicom_series(folder, tr=2.4).tr == 2.4


def test_unusable_time_axis_is_an_error(tmp_path):
    data, affine = small_series()

    def mutate(ds, t, k):  # a pause of three frames after frame 10: a lost frame's worth of time
        when = 10 * 3600 + t * 1.2 + (3.6 if t >= 10 else 0.0)
        ds.AcquisitionTime = f"{int(when // 3600):02d}{int(when % 3600 // 60):02d}{when % 60:09.6f}"
        return ds

    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.2, te=0.03, series_number=5, seed=10, mutate=mutate)
    info = dicom.inspect(folder)[0]
    assert any("time axis is unusable" in e for e in info.errors)
    code, out, err = run(["convert", folder, tmp_path / "out"])
    assert code == 4 and "irregular frame intervals" in err and str(folder) in err


def test_instance_numbers_out_of_order(tmp_path):
    """No TemporalPositionIdentifier and random InstanceNumbers: dcm2niix alone sorts by InstanceNumber
    and scrambles slices and frames; the files reach it renumbered in acquisition order (here by
    AcquisitionTime), and its output is verified on the pixels."""
    data, affine = small_series()
    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.2, te=0.03, series_number=5, seed=11, temporal=False)
    info = dicom.inspect(folder)[0]
    assert info.ordering_key == "AcquisitionTime" and info.errors == ()
    code, out, err = run(["convert", folder, tmp_path / "out"])
    assert code == 0, err
    img = nib.load(tmp_path / "out" / "series-5_dsc.nii.gz")
    np.testing.assert_allclose(np.asarray(nib.as_closest_canonical(img).get_fdata()), data, atol=QUANT_ATOL)
    # the verification itself: a conversion with two frames swapped is refused
    conv = dicom.read_dicom_series(folder)
    swapped = conv.data.copy()
    swapped[..., [3, 4]] = swapped[..., [4, 3]]
    with pytest.raises(InputError, match="another order than the acquisition .* frame 4"):
        convert._verify_order(conv.info, folder, swapped, conv.affine)


def test_folder_without_dicom(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here\n")
    code, out, err = run(["analyze", folder, "--out", tmp_path / "out"])
    assert code == 4 and len(err.strip().splitlines()) == 1
    assert "no DICOM files" in err and str(folder) in err and "Traceback" not in err
    code, out, err = run(["dicom-inspect", folder])
    assert code == 4 and "no DICOM files" in err


def test_missing_dcm2niix_binary(tmp_path, monkeypatch):
    data, affine = small_series()
    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.2, te=0.03, series_number=5, seed=12)
    monkeypatch.setenv(dicom.DCM2NIIX_ENV, str(tmp_path / "no-such-dcm2niix"))
    code, out, err = run(["convert", folder, tmp_path / "out"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "dcm2niix not found" in err and "make install" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("dcm2niix_code", "ours", "words"), [
    (2, 4, "no DICOM files"), (4, 4, "dcm2niix failed (exit 4"), (8, 4, "dcm2niix failed (exit 8"),
    (7, 5, "TMPDIR"), (12, 1, "please report"), (0, 4, "wrote no image")])
def test_dcm2niix_exit_codes(tmp_path, monkeypatch, dcm2niix_code, ours, words):
    """dcm2niix's exit codes mapped to ours, through a stand-in binary (a shell script given by
    PERFUSION_DCM2NIIX) whose message quotes identifiers: they are replaced by [removed]."""
    data, affine = small_series()
    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.2, te=0.03, series_number=5, seed=13)
    fake = tmp_path / "dcm2niix"
    fake.write_text("#!/bin/sh\necho 'Chris Rordens dcm2niiX stand-in'\n"
                    "echo 'Error: cannot read file of Doe^Jane^Planted (PID-PLANTED-4711, 19010101)' >&2\n"
                    f"exit {dcm2niix_code}\n")
    fake.chmod(0o755)
    monkeypatch.setenv(dicom.DCM2NIIX_ENV, str(fake))
    code, out, err = run(["convert", folder, tmp_path / "out"])
    assert code == ours and words in err and len(err.strip().splitlines()) == 1
    assert planted_in_text(err) == []
    if dcm2niix_code in (4, 8):
        assert "[removed]" in err


def test_pydicom_missing_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(UsageError, match="pip install pydicom"):
        dicom.inspect(tmp_path)


def test_dicom_inspect_subprocess_prints_no_identifier(case):
    """The console script, with fd-level output: the table and the checks, no identifier."""
    proc = subprocess.run([sys.executable, "-m", "perfusion", "dicom-inspect", str(case["folder"])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "TemporalPositionIdentifier" in proc.stdout and "DSC series: 7" in proc.stdout
    assert planted_in_text(proc.stdout + proc.stderr) == []


def test_folder_hash_covers_content(tmp_path):
    from perfusion.io import sha256

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1")
    (tmp_path / "y").write_bytes(b"2")
    first = sha256(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}", first) and sha256(tmp_path) == first
    (tmp_path / "y").write_bytes(b"3")
    assert sha256(tmp_path) != first
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert sha256(tmp_path / "b") == sha256(tmp_path / "a")


def test_enhanced_multiframe(tmp_path):
    """One Enhanced MR file: frames and slices from the per-frame functional groups, converted and
    verified like single-frame files; a per-frame RescaleSlope there is refused too."""
    data, affine = small_series()
    write_enhanced(tmp_path / "a" / "IM1", data, affine, tr=1.2, te=0.03, series_number=9)
    info = dicom.inspect(tmp_path / "a")[0]
    assert (info.n_files, info.frames, info.slices, info.ordering_key) == (1, 20, 3, "TemporalPositionIndex")
    assert info.interval_stats() == pytest.approx((1.2, 1.2, 1.2)) and info.errors == ()
    conv = dicom.read_dicom_series(tmp_path / "a")
    got = nib.as_closest_canonical(nib.Nifti1Image(conv.data, conv.affine))
    np.testing.assert_allclose(np.asarray(got.dataobj), data, atol=QUANT_ATOL)
    assert conv.tr_s == pytest.approx(1.2) and conv.warnings == ()
    write_enhanced(tmp_path / "b" / "IM1", data, affine, tr=1.2, te=0.03, series_number=9,
                   frame_slope=lambda t: 2 * SLOPE if t == 5 else SLOPE)
    code, out, err = run(["convert", tmp_path / "b", tmp_path / "out"])
    assert code == 4 and "per-frame intensity rescaling" in err and "frame 6" in err


def test_batch_takes_a_dicom_case_folder(case, tmp_path):
    """perfusion batch: a plain case folder whose series is a dicom/ sub-folder (masks on the converted
    grid) runs like the NIfTI case beside it; the summary matches analyze on the folder."""
    import shutil

    root = tmp_path / "in"
    dcm_case = root / "case-dicom"
    shutil.copytree(case["folder"], dcm_case / "dicom")
    rois = case["root"] / "rois-on-dicom-grid"
    for name, target in (("roi-lesion_hyper", "roi-lesion_hyper"), ("mask-aif", "mask-aif"),
                         ("mask-reference", "mask-reference"), ("mask-brain", "mask-brain")):
        shutil.copy(rois / f"{name}.nii.gz", dcm_case / f"{target}.nii.gz")
    out = tmp_path / "out"
    code, stdout, err = run(["batch", root, out, "-q"])
    assert code == 0, err
    rows = [dict(zip(*(ln.split("\t") for ln in ((out / "summary.tsv").read_text().splitlines()[0], line))))
            for line in (out / "summary.tsv").read_text().splitlines()[1:]]
    assert [(r["case"], r["roi"], r["status"]) for r in rows] == [("case-dicom", "roi-lesion_hyper", "ok")]
    ref = json.loads((case["dicom_out"] / "report.json").read_text())
    want = next(r["rcbv_median"] for r in ref["rois"] if r["name"] == "roi-lesion_hyper")
    assert float(rows[0]["rcbv_median"]) == pytest.approx(want, rel=1e-5)
    marker = json.loads((out / "case-dicom" / ".perfusion-done.json").read_text())
    assert "case-dicom/dicom" in marker["fingerprint"]["inputs"]  # the folder, hashed as one entry, by relative name
    assert not planted_in_text(stdout + err) and not planted_in(out / "summary.json")
