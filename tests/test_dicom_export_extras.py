"""DICOM out (issue 22), the pictures and words: the rCBV colour overlay (RGB Secondary Capture, one
image per source slice) and the verdict report (Comprehensive SR), written into real files from a real
DICOM series (tests/test_dicom.py's writer: planted identifiers, shuffled files), read back with pydicom
and highdicom, validated with dciodvfy (Debian's dicom3tools; `make browser` installs it), and the
privacy rule of the export: identifiers under OUT/dicom/ only.

Tolerances: OVERLAY_RGB_ATOL, an overlay pixel against the colour computed from the colour map: the
Agg renderer blends in 8 bits (one step per layer) and the colour map has 256 entries (a step of
0.02 in rCBV moves jet's channels by up to 5 of 255).
"""

import inspect
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from perfusion import DISCLAIMER  # noqa: E402
from perfusion.io.dicom import export, export_extras  # noqa: E402
from perfusion.io.dicom.export_extras import write_overlay, write_verdict_report  # noqa: E402
from perfusion.verdicts import VERDICT_WORDS  # noqa: E402
from test_dicom import PLANTED, planted_in, planted_in_text, small_series, write_dicom_series  # noqa: E402

#: One overlay pixel against the blend computed from the colour map (see the module's docstring).
OVERLAY_RGB_ATOL = 6

#: A report.json's verdict table, as perfusion analyze writes it (key names as report/build.py).
REPORT = {
    "thresholds": {"rcbv_low": 1.0, "rcbv_high": 1.75},
    "rois": [
        {"name": "lesion_hyper", "rcbv_median": 3.0011, "rcbv_ci_low": 2.8125, "rcbv_ci_high": 3.1987,
         "ftb_low": 0.02, "ftb_mid": 0.08, "ftb_high": 0.9, "verdict": "likely_recurrence",
         "next_step": "discuss at the tumour board"},
        {"name": "lesion_gated", "rcbv_median": None, "rcbv_ci_low": None, "rcbv_ci_high": None,
         "ftb_low": None, "ftb_mid": None, "ftb_high": None, "verdict": "not_assessable",
         "next_step": "repeat the perfusion scan"},
    ],
}


@pytest.fixture(autouse=True)
def own_temp_root(tmp_path_factory, monkeypatch):
    """Each test converts in a temporary root of its own (see tests/test_dicom.py)."""
    root = tmp_path_factory.mktemp("temp-root")
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def source_case(tmp_path):
    """A small DICOM series with planted identifiers, its SourceSeries (export.load_source), and
    frames on its pixel grid (the volumes on the NIfTI grid under "volumes"): rCBV 4.5 in a hot block of voxels (x 2-5, y 2-4) and 0.5 elsewhere, NaN
    in column x = 11, the series' first frame as the baseline, an ROI around the hot block, a
    reference block."""
    data, affine = small_series()
    folder = tmp_path / "dcm"
    write_dicom_series(folder, data, affine, tr=1.5, te=0.03, series_number=5, seed=2)
    source = export.load_source(folder)
    rcbv = np.full(data.shape[:3], 0.5)
    rcbv[2:6, 2:5, :] = 4.5
    rcbv[11, :, :] = np.nan
    roi = np.zeros(data.shape[:3], bool)
    roi[1:7, 1:6, :] = True
    ref = np.zeros(data.shape[:3], bool)
    ref[7:10, 6:9, :] = True
    grid = {name: export.to_source_grid(v, affine, source)
            for name, v in {"rcbv": rcbv, "baseline": data[..., 0], "roi": roi, "ref": ref}.items()}
    return {"folder": folder, "source": source, "affine": affine, "data": data, "volumes": {"rcbv": rcbv, "roi": roi,
                                                                                        "ref": ref}, **grid}


def expected_rgb(rcbv: float, baseline: float, baseline_max: float) -> np.ndarray:
    """The colour of an overlay pixel (0-255): jet(rCBV / 5) at opacity 0.6 over the grey baseline
    (0 to baseline_max), the grey alone where rCBV is NaN."""
    from matplotlib import colormaps

    grey = np.clip(baseline / baseline_max, 0, 1) * 255 * np.ones(3)
    if np.isnan(rcbv):
        return grey
    return 0.6 * np.asarray(colormaps["jet"](np.clip(rcbv / 5.0, 0, 1))[:3]) * 255 + 0.4 * grey


def _overlay(source_case, out):
    c = source_case
    return write_overlay(out, c["source"], c["rcbv"], c["baseline"], {"lesion_hyper": c["roi"]}, c["ref"])


def dciodvfy_findings(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's error and warning lines for one file (skips without dciodvfy)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed: run `make browser`")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


#: dciodvfy's warnings that are expected (dicom3tools 1.00~20220618): the test writer's series has no
#: StudyID or StudyTime (type 2, copied empty as they are), the report's own concepts use a private
#: coding scheme ("99" prefix, declared in CodingSchemeIdentificationSequence), and highdicom writes the
#: Parametric Map's derived pixel contrast QUANTITY, a term this dicom3tools release does not list
#: (Defined Terms may be extended).
EXPECTED_WARNINGS = (
    "Missing attribute or value that would be needed to build DICOMDIR - Study ID",
    "Missing attribute or value that would be needed to build DICOMDIR - Study Time",
    f"Unrecognized defined term <{export_extras.PRIVATE_SCHEME}> for value 1 of attribute <Coding Scheme Designator>",
    "Unrecognized defined term <QUANTITY> for value 4 of attribute <Image Type>",
    "Unrecognized defined term <QUANTITY> for value 4 of attribute <Frame Type>",
)


# ------------------------------------------------------------------------------------- the overlay


def test_colours_and_scales_are_report_htmls():
    """The overlay and report.html draw rCBV with one definition (io.display): the scale, colour map,
    opacity, background percentile and outline colours are the same objects in both; the default
    thresholds are the verdict's."""
    from perfusion.io import display
    from perfusion.quantify import roi
    from perfusion.report import html

    for name in ("RCBV_RANGE", "RCBV_CMAP", "RCBV_ALPHA", "BACKGROUND_PERCENTILE", "ROI_OUTLINE_COLOURS",
                 "REFERENCE_OUTLINE_COLOUR"):
        assert getattr(export_extras, name) is getattr(display, name) is getattr(html, name), name
    assert html.SCALES["rcbv"][:2] == display.RCBV_RANGE == (0.0, 5.0)
    assert export_extras.DEFAULT_THRESHOLDS == (roi.RCBV_LOW, roi.RCBV_HIGH)
    panel = inspect.getsource(html._overlay_panel)
    assert "cmap=RCBV_CMAP" in panel and "alpha=RCBV_ALPHA" in panel


def test_overlay_pixels_lie_on_their_source_pixels(source_case, tmp_path):
    """Each overlay image shows its source slice in the source's pixel order: the centre of a source
    pixel's block in the picture has the blend of jet(rCBV / 5) at 0.6 over the grey baseline, hot
    where the NIfTI voxel behind that pixel is hot; NaN shows the grey baseline alone."""
    c = source_case
    paths = _overlay(c, tmp_path / "dicom")
    assert [p.name for p in paths] == ["overlay-001.dcm", "overlay-002.dcm", "overlay-003.dcm"]
    scale = export_extras._panel_scale(c["source"].rows, c["source"].cols)
    assert scale == 43  # 12 columns -> 516 pixels
    base = c["baseline"]
    bg_max = np.percentile(base, 99.5)
    checked = {"hot": 0, "cold": 0, "nan": 0}
    for s, path in enumerate(paths):
        pixels = pydicom.dcmread(path).pixel_array.astype(float)
        for r, col in [(0, 0), (3, 3), (3, 4), (0, 11), (9, 0), (5, 10), (2, 2)]:
            value = c["rcbv"][s, r, col]
            want = expected_rgb(value, base[s, r, col], bg_max)
            got = pixels[r * scale + scale // 2, col * scale + scale // 2]
            np.testing.assert_allclose(got, want, atol=OVERLAY_RGB_ATOL, err_msg=f"slice {s} pixel {(r, col)}")
            checked["nan" if np.isnan(value) else "hot" if value > 4 else "cold"] += 1
    assert min(checked.values()) > 0  # every kind of pixel was looked at


def test_overlay_objects_reference_the_source(source_case, tmp_path):
    """One RGB Secondary Capture per source slice, in the source's study with its patient, one new
    series, each referencing its source slice, burned-in annotation declared, disclaimer as comment."""
    c = source_case
    paths = _overlay(c, tmp_path / "dicom")
    src = c["source"].datasets
    series = set()
    for s, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert ds.StudyInstanceUID == src[s].StudyInstanceUID and ds.SeriesInstanceUID != src[s].SeriesInstanceUID
        assert str(ds.PatientName) == PLANTED["PatientName"] and ds.PatientID == PLANTED["PatientID"]
        assert ds.AccessionNumber == PLANTED["AccessionNumber"]
        ref = ds.ReferencedImageSequence[0]
        assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (src[s].SOPInstanceUID, src[s].SOPClassUID)
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"  # source image for image processing operation
        assert ds.BurnedInAnnotation == "YES" and ds.ImageComments == DISCLAIMER
        assert ds.SeriesDescription == "perfusion rCBV overlay (research, not for diagnosis)"
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated) == (3, "RGB", 8)
        assert list(ds.PatientOrientation) == ["R", "A"]  # the writer's rows run R -> L, columns A -> P
        assert ds.InstanceNumber == s + 1 and ds.Columns == 516 + export_extras.COLORBAR_PX
        series.add(ds.SeriesInstanceUID)
    assert len(series) == 1


def test_overlay_refuses_frames_off_the_source_grid(source_case, tmp_path):
    c = source_case
    with pytest.raises(ValueError, match=r"rcbv frames have shape \(3, 12, 10\), not the source's \(3, 10, 12\)"):
        write_overlay(tmp_path, c["source"], np.zeros((3, 12, 10)), c["baseline"], {}, None)


def test_orientation_letters():
    letters = export_extras.orientation_letters
    assert letters(np.array([1.0, 0, 0])) == "L" and letters(np.array([0, -1.0, 0])) == "A"
    assert letters(np.array([0.0, 0.6, -0.8])) == "FP"  # oblique: strongest first
    assert export_extras._opposite("FP") == "HA"


# --------------------------------------------------------------------------------------- the report


def _content(ds) -> list:
    return list(ds.ContentSequence)


def _named(items, meaning):
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def test_verdict_report_holds_the_table(source_case, tmp_path):
    """The SR read back with highdicom: the disclaimer, the thresholds, per ROI its name, median rCBV
    (UCUM {ratio}, derivation median) with its interval, FTB in %, verdict words and next step; a ROI
    without figures (not assessable) keeps its words and leaves its numbers out."""
    c = source_case
    (path,) = write_verdict_report(tmp_path / "dicom", c["source"], REPORT)
    assert path.name == "report.dcm"
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    items = _content(sr)
    assert _named(items, "Comment")[0].TextValue == DISCLAIMER
    groups = _named(items, "Measurement Group")
    assert len(groups) == 2
    hyper = _content(groups[0])
    assert _named(hyper, "Tracking Identifier")[0].TextValue == "lesion_hyper"
    median = _named(hyper, "Relative Regional Blood Volume")[0]
    value = median.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(3.0011)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "{ratio}"
    assert median.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning == "Median"
    nums = {i.ConceptNameCodeSequence[0].CodeValue: (float(i.MeasuredValueSequence[0].NumericValue),
                                                      i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
            for i in hyper if i.ValueType == "NUM"}
    assert nums["RCBV-CI-LOW"] == (pytest.approx(2.8125), "{ratio}")
    assert nums["RCBV-CI-HIGH"] == (pytest.approx(3.1987), "{ratio}")
    assert [nums[k] for k in ("FTB-LOW", "FTB-MID", "FTB-HIGH")] == [
        (pytest.approx(2.0), "%"), (pytest.approx(8.0), "%"), (pytest.approx(90.0), "%")]
    assert _named(hyper, "Finding")[0].TextValue == VERDICT_WORDS["likely_recurrence"] == "likely recurrence"
    assert _named(hyper, "Recommendation")[0].TextValue == "discuss at the tumour board"
    gated = _content(groups[1])
    assert [i.ValueType for i in gated] == ["TEXT", "TEXT", "TEXT"]
    assert _named(gated, "Finding")[0].TextValue == "not assessable"
    thresholds = {i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
                  for i in items if i.ValueType == "NUM"}
    assert thresholds == {"RCBV-THR-LOW": 1.0, "RCBV-THR-HIGH": 1.75}


def test_verdict_report_references_the_source(source_case, tmp_path):
    """The SR is filed into the source study with its patient; its evidence is every source slice."""
    c = source_case
    (path,) = write_verdict_report(tmp_path / "dicom", c["source"], REPORT)
    ds = pydicom.dcmread(path)
    src = c["source"].datasets
    assert ds.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and ds.Modality == "SR"
    assert ds.StudyInstanceUID == src[0].StudyInstanceUID
    assert str(ds.PatientName) == PLANTED["PatientName"] and ds.PatientID == PLANTED["PatientID"]
    assert ds.SeriesDescription == "perfusion verdict report (research, not for diagnosis)"
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence} == {d.SOPInstanceUID for d in src}


def test_report_without_rois_says_so(source_case, tmp_path):
    (path,) = write_verdict_report(tmp_path, source_case["source"], {"rois": []})
    texts = [i.TextValue for i in _content(pydicom.dcmread(path)) if i.ValueType == "TEXT"]
    assert texts == [DISCLAIMER, "No ROI was given to perfusion analyze: maps only, no verdict."]


# ------------------------------------------------------------------------------------ validation


def _core_objects(c, folder: Path) -> list[Path]:
    """export.py's objects on the same source: the five Parametric Maps (from the rCBV pattern, scaled)
    and the Segmentation of the ROI and the reference, saved as export_dicom saves them."""
    report = {"leakage": {"method": "bsw", "n_corrected": 10}}
    paths = []
    for i, key in enumerate(export.EXPORT_MAPS):
        ds = export.parametric_map(key, c["volumes"]["rcbv"] * (i + 1), c["affine"], c["source"], report)
        paths.append(folder / f"{key}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    seg = export.segmentation([("lesion_hyper", c["volumes"]["roi"])], c["volumes"]["ref"], c["affine"], c["source"],
                              reference_automatic=True)
    paths.append(folder / export.SEG_FILE)
    seg.save_as(paths[-1], enforce_file_format=True)
    return paths


def test_objects_pass_dciodvfy(source_case, tmp_path):
    """Every object of the export passes dciodvfy without an error (the overlay and the report, and
    export.py's Parametric Maps and Segmentation built on the same source); the warnings are the
    expected ones (EXPECTED_WARNINGS), listed in the assertion message otherwise."""
    c = source_case
    paths = _overlay(c, tmp_path / "dicom") + write_verdict_report(tmp_path / "dicom", c["source"], REPORT)
    paths += _core_objects(c, tmp_path / "dicom")
    assert len(paths) == 3 + 1 + 5 + 1
    for path in paths:
        errors, warnings = dciodvfy_findings(path)
        assert errors == [], (path.name, errors)
        assert [w for w in warnings if not w.endswith(EXPECTED_WARNINGS)] == [], (path.name, warnings)


def test_dciodvfy_finds_an_error():
    """Positive control: dciodvfy reports an error as "Error - ..." lines (an SC image without its
    patient's module)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed: run `make browser`")
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.SecondaryCaptureImageStorage, pydicom.uid.generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy_findings(path)
    assert any("Patient" in e or "Study" in e for e in errors), errors


# -------------------------------------------------------------------------------------- privacy


def test_identifiers_only_under_dicom(source_case, tmp_path):
    """The overlay and the report carry the source's identifiers (PACS files them by them) and nothing
    else this module writes does: they are the files under the folder given, and nothing more."""
    c = source_case
    out = tmp_path / "OUT"
    written = _overlay(c, out / "dicom") + write_verdict_report(out / "dicom", c["source"], REPORT)
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(written)
    for path in written:
        assert {"Doe^Jane^Planted", "PID-PLANTED-4711", "ACC-PLANTED-0815"} <= set(planted_in(path)), path.name


# ------------------------------------------------------------------------------ the whole command


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The phantom (PhantomSpec(matrix=48)) as a DICOM series with planted identifiers, analysed with
    `perfusion analyze DICOM_DIR --out OUT --dicom-export` (both lesions and the NAWM reference drawn
    on dcm2niix's grid, as tests/test_dicom.py does); the printed text kept."""
    from perfusion.io.dicom import read_dicom_series
    from test_dicom import reorient_to, run, write_phantom_dicom

    root = tmp_path_factory.mktemp("export")
    saved, tempfile.tempdir = tempfile.tempdir, str(root / "tmp")
    (root / "tmp").mkdir()
    try:
        ph, paths, folder, _, _ = write_phantom_dicom(root)
        grid = read_dicom_series(folder).affine
        rois = root / "rois"
        rois.mkdir()
        for key in ("lesion_hyper", "lesion_hypo", "nawm"):
            reorient_to(paths[key], grid, rois / paths[key].name)
        out = root / "OUT"
        code, stdout, stderr = run(["analyze", folder, "--out", out, "--roi", rois / "roi-lesion_hyper.nii.gz",
                                    "--roi", rois / "roi-lesion_hypo.nii.gz", "--reference",
                                    rois / "mask-reference.nii.gz", "--dicom-export"])
        assert code == 0, stderr
        return {"folder": folder, "out": out, "texts": [stdout, stderr],
                "source": export.load_source(folder)}
    finally:
        tempfile.tempdir = saved


def test_export_puts_identifiers_only_under_dicom(exported):
    """The privacy rule of --dicom-export: every file of OUT outside OUT/dicom/ (report.json, the maps'
    sidecars, report.html, the TSVs, the NIfTI headers) and everything printed is free of the planted
    identifiers; every object under OUT/dicom/ carries the source's PatientName, PatientID and
    StudyInstanceUID, so that PACS files it into the patient's study."""
    out, src = exported["out"], exported["source"].datasets[0]
    files = [p for p in out.rglob("*") if p.is_file()]
    dicom_files = [p for p in files if p.is_relative_to(out / "dicom")]
    others = [p for p in files if p not in dicom_files]
    assert len(others) > 30 and {"report.json", "report.html", "rcbv.json", "rcbv.nii.gz"} <= {p.name for p in others}
    assert [(p.name, t) for p in others for t in planted_in(p)] == []
    assert [t for text in exported["texts"] for t in planted_in_text(text)] == []
    assert {"rcbv.dcm", "cbv.dcm", "cbf.dcm", "mtt.dcm", "tmax.dcm", export.SEG_FILE} <= {p.name for p in dicom_files}
    for path in dicom_files:
        ds = pydicom.dcmread(path)
        assert (str(ds.PatientName), ds.PatientID) == (PLANTED["PatientName"], PLANTED["PatientID"]), path.name
        assert ds.StudyInstanceUID == src.StudyInstanceUID, path.name
        assert {"Doe^Jane^Planted", "PID-PLANTED-4711"} <= set(planted_in(path)), path.name


def test_export_objects_pass_dciodvfy(exported):
    """Every object of a real export (maps, segmentation, and, once wired, the overlay and the report)
    passes dciodvfy without an error and reads back with highdicom."""
    paths = sorted((exported["out"] / "dicom").iterdir())
    for path in paths:
        errors, warnings = dciodvfy_findings(path)
        assert errors == [], (path.name, errors)
        assert [w for w in warnings if not w.endswith(EXPECTED_WARNINGS)] == [], (path.name, warnings)
        read = hd.sr.srread(path) if path.name == "report.dcm" else hd.imread(path)
        assert read.SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID


def test_export_report_and_overlay_match_the_analysis(exported):
    """The SR of a real run holds report.json's figures and words per ROI; the overlay has one image
    per source slice, each referencing its slice in order, the hot lesion red where it is drawn."""
    out = exported["out"]
    names = {p.name for p in (out / "dicom").iterdir()}
    assert {"overlay-001.dcm", "overlay-005.dcm", "report.dcm"} <= names and "overlay-006.dcm" not in names
    report = json.loads((out / "report.json").read_text())
    groups = _named(_content(pydicom.dcmread(out / "dicom" / "report.dcm")), "Measurement Group")
    assert len(groups) == len(report["rois"]) == 2
    for group, roi in zip(groups, report["rois"], strict=True):
        items = _content(group)
        assert _named(items, "Tracking Identifier")[0].TextValue == roi["name"]
        median = _named(items, "Relative Regional Blood Volume")[0].MeasuredValueSequence[0].NumericValue
        assert float(median) == pytest.approx(roi["rcbv_median"], rel=1e-9)
        assert _named(items, "Finding")[0].TextValue == VERDICT_WORDS[roi["verdict"]]
        assert _named(items, "Recommendation")[0].TextValue == roi["next_step"]
    source = exported["source"]
    overlays = sorted((out / "dicom").glob("overlay-*.dcm"))
    assert len(overlays) == source.n_slices == 5
    for ds_src, path in zip(source.datasets, overlays, strict=True):
        ref = pydicom.dcmread(path).ReferencedImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == ds_src.SOPInstanceUID
    # the lesion's hottest interior pixel, found on the source grid, has its colour in the overlay
    from scipy import ndimage

    from perfusion.io.nifti import load_array_affine

    rcbv, affine = load_array_affine(out / "rcbv.nii.gz", what="rcbv")
    frames = {name: export.to_source_grid(load_array_affine(out / f"{name}.nii.gz", what=name)[0], affine, source)
              for name in ("rcbv", "baseline", "mask-roi-lesion_hyper")}
    inside = ndimage.binary_erosion(frames["mask-roi-lesion_hyper"] > 0, np.ones((1, 5, 5), bool))
    s, r, col = np.unravel_index(np.nanargmax(np.where(inside, frames["rcbv"], -np.inf)), inside.shape)
    assert frames["rcbv"][s, r, col] > 3.0  # a hot pixel: red in jet
    base = frames["baseline"]
    scale = export_extras._panel_scale(source.rows, source.cols)
    pixels = pydicom.dcmread(overlays[s]).pixel_array.astype(float)
    want = expected_rgb(frames["rcbv"][s, r, col], base[s, r, col], np.percentile(base[np.isfinite(base)], 99.5))
    np.testing.assert_allclose(pixels[r * scale + scale // 2, col * scale + scale // 2], want, atol=OVERLAY_RGB_ATOL)
