"""DICOM out (issue 22): the maps, ROIs and reference of a DICOM-folder analysis as Parametric Maps and a
Segmentation in the source study, written with highdicom and read back with pydicom, highdicom and dcm2niix.

The DICOM series come from tests/test_dicom.py's writer (planted identifiers, shuffled file names and
instance numbers); the analysed case is its phantom (48 x 48 x 5 x 80) with two lesion ROIs drawn on
dcm2niix's grid and the automatic reference. Tolerances, each with its reason:

- the maps are float32 in the NIfTI and in the DICOM (FloatPixelData): read back, a value is equal
  (no tolerance) to the NIfTI's; after dcm2niix's conversion (float32 again) also equal;
- dcm2niix's affine of an exported map against the analysis' maps: AFFINE_MM, float32 header fields.
"""

import json
import shutil
import subprocess
import sys
import tempfile

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from perfusion import DISCLAIMER  # noqa: E402
from perfusion.errors import InputError  # noqa: E402
from perfusion.io.dicom import export, find_dcm2niix, read_dicom_series  # noqa: E402
from test_dicom import (  # noqa: E402
    INTERCEPT,
    PLANTED,
    SLOPE,
    planted_in,
    reorient_to,
    run,
    small_series,
    write_dicom_series,
    write_phantom_dicom,
)

#: dcm2niix's affine of an exported map against the maps' (both from float32 header fields): mm.
AFFINE_MM = 1e-3
#: The Parametric Maps and the Segmentation of OUT/dicom/; beside them export_extras.py's overlay (one
#: image per source slice) and verdict report (all_files).
CORE_FILES = {"rcbv.dcm", "cbv.dcm", "cbf.dcm", "mtt.dcm", "tmax.dcm", "rois_seg.dcm"}


def all_files(n_slices: int) -> set[str]:
    """Every file of OUT/dicom/ for a source of ``n_slices`` slices."""
    return CORE_FILES | {f"overlay-{k:03d}.dcm" for k in range(1, n_slices + 1)} | {"report.dcm"}
#: Quantity (DCM) and unit (UCUM) codes of each map, as PS3.16 and UCUM write them.
CODES = {"rcbv": ("126398", "{ratio}"), "cbv": ("113056", "mL/(100.g)"), "cbf": ("113055", "mL/(100.g.min)"),
         "mtt": ("113052", "s"), "tmax": ("113084", "s")}


@pytest.fixture(autouse=True)
def own_temp_root(tmp_path_factory, monkeypatch):
    """Each test converts in a temporary root of its own (see tests/test_dicom.py)."""
    root = tmp_path_factory.mktemp("temp-root")
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The phantom as a DICOM folder, analysed with --dicom-export (ROIs on dcm2niix's grid, automatic
    reference): the folders, the source series and the printed text."""
    root = tmp_path_factory.mktemp("export")
    temp_dir = root / "tmp"
    temp_dir.mkdir()
    saved, tempfile.tempdir = tempfile.tempdir, str(temp_dir)
    try:
        ph, paths, folder, _, _ = write_phantom_dicom(root)
        grid = read_dicom_series(folder).affine
        rois = root / "rois"
        rois.mkdir()
        for key in ("lesion_hyper", "lesion_hypo", "aif", "brain"):
            reorient_to(paths[key], grid, rois / paths[key].name)
        out = root / "out"
        code, printed, err = run(["analyze", folder, "--out", out, "--roi", rois / "roi-lesion_hyper.nii.gz",
                                  "--roi", rois / "roi-lesion_hypo.nii.gz", "--aif", rois / "mask-aif.nii.gz",
                                  "--mask", rois / "mask-brain.nii.gz", "--dicom-export", "--no-html"])
        assert code == 0, err
        return {"root": root, "folder": folder, "out": out, "paths": paths, "printed": printed + err,
                "source": export.load_source(folder), "report": json.loads((out / "report.json").read_text())}
    finally:
        tempfile.tempdir = saved


def source_slice(ds, source) -> int:
    """The source slice a frame (a per-frame functional group item) derives from, by its referenced image."""
    uid = ds.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    return [s.SOPInstanceUID for s in source.datasets].index(uid)


def frames_in_source_order(ds, source) -> np.ndarray:
    """A multi-frame object's pixels (frames, rows, cols) put in the order of ``source.datasets``."""
    order = [source_slice(fg, source) for fg in ds.PerFrameFunctionalGroupsSequence]
    assert sorted(order) == list(range(source.n_slices))
    out = np.empty((source.n_slices, source.rows, source.cols), dtype=ds.pixel_array.dtype)
    out[order] = ds.pixel_array
    return out


# ------------------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_to_source_grid_is_the_dicom_pixel_order(tmp_path, orientation):
    """The converted NIfTI's first frame, taken onto the source grid, equals every source image's pixels
    (axial slices, and sagittal ones: the axes permuted), and from_source_grid undoes it."""
    data, affine = small_series()
    if orientation == "sagittal":  # columns along anterior, rows along superior... slices along right
        affine = np.array([[0, 0, 5.0, -5], [3.0, 0, 0, -18], [0, 3.0, 0, -15], [0, 0, 0, 1]])
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
        np.testing.assert_allclose(frames[s], pixels, rtol=1e-6, atol=1e-3)
    back = export.from_source_grid(frames, conv.affine, conv.data.shape[:3], source)
    np.testing.assert_array_equal(back, conv.data[..., 0])
    idx = export.source_indices(conv.data.shape[:3], conv.affine, source)
    assert [set(idx[s, ..., 2].ravel()) for s in range(3)] == [{0}, {1}, {2}]  # slice s is dcm2niix's k = s


def test_to_source_grid_refuses_another_grid(tmp_path):
    data, affine = small_series()
    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.5, te=0.03, series_number=5, seed=2)
    source = export.load_source(folder)
    with pytest.raises(InputError, match="do not lie on the grid of source series 5 .3 x 10 x 12 source pixels"):
        export.to_source_grid(np.zeros((12, 10, 4)), affine, source)
    shifted = affine.copy()
    shifted[0, 3] += 1.5  # half a voxel
    with pytest.raises(InputError, match="0.50 voxel off its voxel centres"):
        export.to_source_grid(np.zeros((12, 10, 3)), shifted, source)
    mirrored = affine.copy()
    mirrored[0, 0] = -3.0  # x flipped about the first voxel: the pixels fall outside the map
    with pytest.raises(InputError, match="outside the map"):
        export.to_source_grid(np.zeros((12, 10, 3)), mirrored, source)
    transposed = affine[:, [1, 0, 2, 3]]  # the same grid described with x and y exchanged: accepted
    volume = np.arange(360.0).reshape(12, 10, 3)
    np.testing.assert_array_equal(export.to_source_grid(volume.transpose(1, 0, 2), transposed, source),
                                  export.to_source_grid(volume, affine, source))


# ------------------------------------------------------------------------------- the objects


def test_analyze_writes_the_dicom_folder(exported):
    """analyze --dicom-export writes the core objects into OUT/dicom/, no staging folder is left, the
    other outputs are analyze's usual ones and identifier-free; the objects carry the planted
    identifiers (the patient module is copied from the source)."""
    out = exported["out"]
    n_slices = len(export.load_source(exported["folder"]).datasets)
    assert {p.name for p in (out / "dicom").iterdir()} == all_files(n_slices)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    from perfusion.io import is_analyze_output

    others = [p for p in out.rglob("*") if p.is_file() and not p.is_relative_to(out / "dicom")]
    assert {p.name for p in others} >= {"report.json", "rcbv.nii.gz", "mask-roi-lesion_hyper.nii.gz"}
    assert [p.name for p in others if not is_analyze_output(p.name)] == []
    assert [(p.name, t) for p in others for t in planted_in(p)] == []
    for name in CORE_FILES:
        assert "Doe^Jane^Planted" in planted_in(out / "dicom" / name)
    assert f"written to {out / 'dicom'}" in exported["printed"]


@pytest.mark.parametrize("key", ["rcbv", "cbv", "cbf", "mtt", "tmax"])
def test_parametric_map(exported, key):
    """Each map: highdicom reads it back as a Parametric Map; study, frame of reference, series and
    source images are the source's; every frame has its source slice's position, orientation and
    spacing; the units and quantity are coded; the values equal the NIfTI map voxel for voxel (NaN
    stored as NO_VALUE, below the mapped range)."""
    source, report, out = exported["source"], exported["report"], exported["out"]
    ds = pydicom.dcmread(out / "dicom" / f"{key}.dcm")
    pm = hd.pm.ParametricMap.from_dataset(ds)
    first = source.datasets[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert (pm.StudyInstanceUID, pm.FrameOfReferenceUID) == (first.StudyInstanceUID, first.FrameOfReferenceUID)
    assert (pm.PatientName, pm.PatientID, pm.AccessionNumber) == (PLANTED["PatientName"], PLANTED["PatientID"],
                                                                   PLANTED["AccessionNumber"])
    ref = pm.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in source.datasets}
    assert pm.SeriesInstanceUID != first.SeriesInstanceUID and pm.SeriesNumber == 700 + 1 + export.EXPORT_MAPS.index(key)
    corrected = report["leakage"]["method"] != "none" and report["leakage"]["n_corrected"] > 0
    title = {"rcbv": "rCBV", "cbv": "CBV mL/100g", "cbf": "CBF mL/100g/min", "mtt": "MTT s", "tmax": "Tmax s"}[key]
    words = "leakage-corrected, research" if corrected and key in ("rcbv", "cbv") else "research"
    assert pm.SeriesDescription == f"perfusion {title} ({words})"
    assert (pm.ContentDescription, pm.ImageComments) == (export.SHORT_DISCLAIMER, DISCLAIMER)
    assert (pm.Manufacturer, pm.BodyPartExamined) == ("perfusion (open source)", "BRAIN")
    shared = pm.SharedFunctionalGroupsSequence[0]
    frames_fg = pm.PerFrameFunctionalGroupsSequence
    for fg in frames_fg:
        src = source.datasets[source_slice(fg, source)]
        orientation = (fg if "PlaneOrientationSequence" in fg else shared).PlaneOrientationSequence[0]
        measures = (fg if "PixelMeasuresSequence" in fg else shared).PixelMeasuresSequence[0]
        np.testing.assert_array_equal(np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float),
                                      np.array(src.ImagePositionPatient, float))
        np.testing.assert_array_equal(np.array(orientation.ImageOrientationPatient, float),
                                      np.array(src.ImageOrientationPatient, float))
        np.testing.assert_array_equal(np.array(measures.PixelSpacing, float), np.array(src.PixelSpacing, float))
    rwvm = (frames_fg[0] if "RealWorldValueMappingSequence" in frames_fg[0] else shared
            ).RealWorldValueMappingSequence[0]
    quantity, unit = CODES[key]
    assert (rwvm.MeasurementUnitsCodeSequence[0].CodeValue, rwvm.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator
            ) == (unit, "UCUM")
    concept = rwvm.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator) == (quantity, "DCM")
    assert (rwvm.RealWorldValueSlope, rwvm.RealWorldValueIntercept) == (1.0, 0.0)
    assert rwvm.LUTExplanation == f"{export.MAP_SPECS[key].explanation}; -9999: no value"
    img = nib.load(out / f"{key}.nii.gz")
    nifti = np.asarray(img.dataobj, dtype=np.float32)
    stored = export.from_source_grid(frames_in_source_order(ds, source), img.affine, nifti.shape, source)
    assert stored.dtype == np.float32
    finite = np.isfinite(nifti)
    assert 0 < finite.sum() < finite.size  # NaN outside the brain
    np.testing.assert_array_equal(stored[finite], nifti[finite])
    assert (stored[~finite] == export.NO_VALUE).all()
    first_value = rwvm.DoubleFloatRealWorldValueFirstValueMapped
    assert first_value == pytest.approx(float(nifti[finite].min())) and first_value > export.NO_VALUE
    assert rwvm.DoubleFloatRealWorldValueLastValueMapped == pytest.approx(float(nifti[finite].max()))


def test_dcm2niix_converts_the_maps_back(exported, tmp_path):
    """dcm2niix converts every exported Parametric Map into a NIfTI on the maps' grid (affine within
    AFFINE_MM) holding the same values (NaN as NO_VALUE)."""
    out = exported["out"]
    for key in export.EXPORT_MAPS:
        src, dst = tmp_path / key / "in", tmp_path / key / "out"
        src.mkdir(parents=True)
        dst.mkdir()
        shutil.copy(out / "dicom" / f"{key}.dcm", src / "map.dcm")
        proc = subprocess.run([find_dcm2niix(), "-b", "n", "-z", "y", "-f", "map", "-o", str(dst), str(src)],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        back, mine = nib.load(dst / "map.nii.gz"), nib.load(out / f"{key}.nii.gz")
        assert back.shape == mine.shape
        np.testing.assert_allclose(back.affine, mine.affine, atol=AFFINE_MM)
        got, want = np.asarray(back.dataobj, dtype=np.float32), np.asarray(mine.dataobj, dtype=np.float32)
        finite = np.isfinite(want)
        np.testing.assert_array_equal(got[finite], want[finite])
        assert (got[~finite] == export.NO_VALUE).all()


def test_segmentation(exported):
    """The ROIs and the reference: one binary Segmentation, a segment per ROI (its name, coded as a
    lesion) and one for the automatic reference (white matter), on the source images; each segment
    equals its NIfTI mask voxel for voxel."""
    source, report, out = exported["source"], exported["report"], exported["out"]
    seg = hd.seg.segread(out / "dicom" / export.SEG_FILE)
    first = source.datasets[0]
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (first.StudyInstanceUID, first.FrameOfReferenceUID)
    assert seg.SegmentationType == "BINARY" and seg.SeriesNumber == 706
    assert seg.SeriesDescription == "perfusion ROIs and reference (research)" and seg.ImageComments == DISCLAIMER
    names = [r["name"] for r in report["rois"]]
    assert names == ["roi-lesion_hyper", "roi-lesion_hypo"]
    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == [*names, "reference"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in segments] == ["52988006", "52988006",
                                                                                  "389080008"]
    assert [s.SegmentAlgorithmType for s in segments] == ["MANUAL", "MANUAL", "AUTOMATIC"]
    assert segments[2].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "perfusion"
    uids = [s.SOPInstanceUID for s in source.datasets]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3])
    files = [out / r["mask_file"] for r in report["rois"]] + [out / report["files"]["reference_mask"]]
    for k, path in enumerate(files):
        img = nib.load(path)
        mask = np.asarray(img.dataobj) > 0
        back = export.from_source_grid(pixels[..., k], img.affine, mask.shape, source) > 0
        assert mask.sum() > 10
        np.testing.assert_array_equal(back, mask)


# ------------------------------------------------------------------------------ command line


def test_export_dicom_command_rewrites_the_folder(exported, tmp_path):
    """export-dicom on a finished analysis (a copy of OUT without dicom/) writes the same objects:
    the same pixels, the same study; a second run replaces the folder."""
    out = tmp_path / "copy"
    shutil.copytree(exported["out"], out, ignore=shutil.ignore_patterns("dicom"))
    code, printed, err = run(["export-dicom", out, "--source", exported["folder"]])
    assert code == 0, err
    assert {p.name for p in (out / "dicom").iterdir()} == {p.name for p in (exported["out"] / "dicom").iterdir()}
    assert "dicom/rcbv.dcm" in printed and DISCLAIMER in printed
    for name in CORE_FILES:
        a, b = pydicom.dcmread(out / "dicom" / name), pydicom.dcmread(exported["out"] / "dicom" / name)
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
        assert a.StudyInstanceUID == b.StudyInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
    before = pydicom.dcmread(out / "dicom" / "rcbv.dcm").SOPInstanceUID
    assert run(["export-dicom", out, "--source", exported["folder"], "-q"])[0] == 0
    assert pydicom.dcmread(out / "dicom" / "rcbv.dcm").SOPInstanceUID != before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_export_dicom_refuses_another_folder(exported, tmp_path):
    """--source naming another DICOM folder: one line, exit 4, the earlier OUT/dicom/ untouched."""
    data, affine = small_series()
    other = tmp_path / "other"
    write_dicom_series(other, data, affine, tr=1.5, te=0.03, series_number=5, seed=2)
    out = exported["out"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "dicom").iterdir()}
    code, printed, err = run(["export-dicom", out, "--source", other])
    assert code == 4
    assert err.count("\n") == 1 and "is not the DICOM folder" in err and "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "dicom").iterdir()} == before


def test_export_dicom_refuses_a_nifti_analysis(exported, tmp_path):
    """An analysis of a NIfTI series (report.json names a file, not a 'DICOM folder'): usage error."""
    out = tmp_path / "nifti-analysis"
    shutil.copytree(exported["out"], out, ignore=shutil.ignore_patterns("dicom"))
    report = json.loads((out / "report.json").read_text())
    report["inputs"]["dsc"]["file"] = "sub-phantom_dsc.nii.gz"
    (out / "report.json").write_text(json.dumps(report))
    code, _, err = run(["export-dicom", out, "--source", exported["folder"]])
    assert code == 2 and "NIfTI series, which has no DICOM study" in err
    assert not (out / "dicom").exists()


def test_dicom_export_with_a_nifti_input_is_a_usage_error(exported, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(["analyze", exported["paths"]["dsc"], "--out", out, "--dicom-export"])
    assert code == 2
    assert "--dicom-export" in err and "is a NIfTI series, which has no DICOM study" in err
    assert not out.exists()


def test_force_without_export_removes_an_earlier_export(exported, tmp_path):
    """analyze --force into a folder with an earlier export, without --dicom-export: the export (whose
    objects describe the earlier maps and carry the identifiers) is removed, as --force removes the other
    files of an earlier run; a dicom/ folder holding anything else is the user's and is kept."""
    out = tmp_path / "again"
    shutil.copytree(exported["out"], out)
    assert (out / "dicom" / "rcbv.dcm").is_file()
    args = ["analyze", exported["folder"], "--out", out, "--force", "--no-html", "--method", "osvd", "-q"]
    code, _, err = run(args)
    assert code == 0, err
    assert not (out / "dicom").exists() and (out / "rcbv.nii.gz").is_file()
    (out / "dicom").mkdir()
    (out / "dicom" / "rcbv.dcm").write_bytes(b"not ours alone")
    (out / "dicom" / "notes.txt").write_text("a reader's notes")
    code, _, err = run(args)
    assert code == 0, err
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["notes.txt", "rcbv.dcm"]


# ------------------------------------------------------------------------------- the source


def test_load_source_takes_the_chosen_series(tmp_path):
    """Two DSC series in one folder: the series number chooses (as analyze's --series); without it, a
    usage error listing them."""
    from perfusion.errors import UsageError

    data, affine = small_series()
    write_dicom_series(tmp_path / "dcm" / "a", data, affine, tr=1.5, te=0.03, series_number=5, seed=2)
    write_dicom_series(tmp_path / "dcm" / "b", data[:, :, :2], affine, tr=1.5, te=0.03, series_number=6, seed=3)
    with pytest.raises(UsageError, match="choose one with --series N"):
        export.load_source(tmp_path / "dcm")
    six = export.load_source(tmp_path / "dcm", series=6)
    assert (six.number, six.n_slices) == (6, 2)
    uid = pydicom.dcmread(next((tmp_path / "dcm" / "b").iterdir())).SeriesInstanceUID
    assert {ds.SeriesInstanceUID for ds in six.datasets} == {uid}
    z = [float(ds.ImagePositionPatient[2]) for ds in six.datasets]
    assert z == sorted(z) and len(set(z)) == 2  # slice order along the normal (axial: +z)
    assert {ds.PatientSex for ds in six.datasets} == {""}  # a Type 2 attribute the writer leaves out, empty


def test_enhanced_source_is_refused(tmp_path):
    """An enhanced multi-frame series: one clear InputError (the export references classic images)."""
    from test_dicom import write_enhanced

    data, affine = small_series()
    write_enhanced(tmp_path / "dcm" / "enhanced.dcm", data, affine, tr=1.5, te=0.03, series_number=9)
    with pytest.raises(InputError, match="enhanced multi-frame or mosaic series cannot be exported yet"):
        export.load_source(tmp_path / "dcm")


def test_maps_off_the_source_grid_are_refused(exported, tmp_path):
    """A map of OUT moved by half a voxel: export-dicom fails with one line naming the fix, writes no
    dicom/ and leaves no staging folder."""
    out = tmp_path / "copy"
    shutil.copytree(exported["out"], out, ignore=shutil.ignore_patterns("dicom"))
    img = nib.load(out / "cbf.nii.gz")
    moved = img.affine.copy()
    moved[:3, 3] += 0.5 * moved[:3, 0]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved, img.header), out / "cbf.nii.gz")
    code, _, err = run(["export-dicom", out, "--source", exported["folder"]])
    assert code == 4 and err.count("\n") == 1
    assert "do not lie on the grid of source series 7 (0.50 voxel off" in err and "give the DICOM folder" in err
    assert not (out / "dicom").exists() and [p.name for p in out.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("command", ["analyze", "export-dicom"])
def test_a_source_inside_out_dicom_is_never_replaced(exported, tmp_path, command):
    """The DICOM folder given as OUT/dicom (the folder the export replaces): usage error, the folder kept."""
    out = tmp_path / "out"
    shutil.copytree(exported["out"], out, ignore=shutil.ignore_patterns("dicom"))
    shutil.copytree(exported["folder"], out / "dicom")
    n_files = len(list((out / "dicom").iterdir()))
    args = (["analyze", out / "dicom", "--out", out, "--force", "--dicom-export"] if command == "analyze"
            else ["export-dicom", out, "--source", out / "dicom"])
    code, _, err = run(args)
    assert code == 2 and "which the DICOM export replaces; move the DICOM folder out" in err
    assert len(list((out / "dicom").iterdir())) == n_files == 400


def test_dicom_export_without_highdicom_stops_before_the_analysis(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom now raises ImportError
    out = tmp_path / "out"
    code, _, err = run(["analyze", exported["folder"], "--out", out, "--dicom-export"])
    assert code == 2 and "the DICOM export needs highdicom; pip install highdicom" in err
    assert not out.exists()


def test_a_multi_echo_source_references_the_first_echo(tmp_path):
    """A multi-echo series (one folder, EchoNumbers 1 and 2): the first echo's images, one per slice."""
    from pydicom.uid import generate_uid

    from perfusion.io.dicom import read_dicom_echoes

    data, affine = small_series()
    uids = (generate_uid(), generate_uid(), generate_uid())
    for n, te in ((1, 0.02), (2, 0.04)):
        write_dicom_series(tmp_path / "dcm", data * (1 - 0.1 * n), affine, tr=1.5, te=te, series_number=7, seed=n,
                           echo_number=n, uids=uids)
    source = export.load_source(tmp_path / "dcm")
    assert source.n_slices == 3 and {int(ds.EchoNumbers) for ds in source.datasets} == {1}
    first = read_dicom_echoes(tmp_path / "dcm")[0]
    frames = export.to_source_grid(first.data[..., 0], first.affine, source)
    pixels = pydicom.dcmread(source.datasets[1].filename).pixel_array * SLOPE + INTERCEPT
    np.testing.assert_allclose(frames[1], pixels, rtol=1e-6, atol=1e-3)
