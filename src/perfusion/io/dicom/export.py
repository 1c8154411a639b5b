"""DICOM out (issue 22): the maps, ROIs and verdict of a DICOM-folder analysis, back into the source study.

The source: :func:`load_source` reads the headers (no pixels) of the DSC series the analysis used
(the same series selection as :func:`~perfusion.io.dicom.convert.read_dicom_series`), one dataset per
slice of its first temporal position. The grid: :func:`to_source_grid` takes a map on the NIfTI grid
(dcm2niix's: x, y, z, RAS affine, mm) onto the source images' pixel order (slice, row, column) by an
exact index permutation / flip computed from the geometry (the affine against ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, DICOM LPS), never by resampling; a grid that does not match
is an InputError.

The objects (:func:`export_dicom`, into ``OUT/dicom/``, written in a staging folder renamed in place):

- ``rcbv.dcm``, ``cbv.dcm``, ``cbf.dcm``, ``mtt.dcm``, ``tmax.dcm``: one DICOM Parametric Map each
  (highdicom.pm.ParametricMap): 32-bit float pixels that are the map's values (Real World Value Mapping:
  slope 1, intercept 0, its unit a UCUM code and its quantity a DCM code, :data:`MAP_SPECS`). A voxel
  without a value (NaN: outside the brain, or not fitted) is stored as :data:`NO_VALUE`, below the
  mapping's value range (the range of the valid values), so it has no real-world value (the mapping's
  LUT Explanation says so: "...; -9999: no value").
- ``rois_seg.dcm``: the lesion ROIs and the reference as one binary DICOM Segmentation, a segment per
  ROI (label = the ROI's name; a morphologically abnormal structure / lesion, drawn by the user) and
  one for the reference (tissue / white matter when automatic).

Every object takes the patient and study modules, Study Instance UID and Frame of Reference from the
source images it references (highdicom copies them): ``OUT/dicom/`` is the one output that holds
identifiers, written only on request (``--dicom-export``, ``perfusion export-dicom``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perfusion.errors import InputError, OutputError, UsageError
from perfusion.io.dicom.headers import import_pydicom, inspect, quiet_pydicom, select_series

#: Largest distance (in voxels) between a source pixel's centre and the nearest NIfTI voxel centre for
#: the two grids to count as one: the headers round positions to 0.1 um and orientations to 1e-6, and
#: dcm2niix's affine is float32 (about 1e-5 mm at 200 mm); 0.05 voxel is far above both and far below
#: any real mismatch (half a voxel).
GRID_TOLERANCE_VOXELS = 0.05

#: LPS (DICOM) <-> RAS (NIfTI): the sign of each world axis.
LPS_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SourceSeries:
    """The source DSC series of an analysis, as the export needs it: one header-only pydicom dataset per
    slice of its first temporal position, in slice order along the slice normal (``datasets``; the
    order of dcm2niix's k index for a classic series), each image ``rows`` x ``cols`` pixels.

    Geometry (DICOM patient coordinates, LPS, mm): ``positions`` (n_slices, 3) ImagePositionPatient per
    slice; ``orientation`` (6,) ImageOrientationPatient (row direction, then column direction);
    ``spacing`` PixelSpacing (between rows, between columns). ``number``: the SeriesNumber;
    ``secrets``: identifying header values (to scrub from messages; never written)."""

    datasets: list[Any]
    rows: int
    cols: int
    positions: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    number: int | None = None
    secrets: frozenset = field(default=frozenset(), repr=False)

    @property
    def n_slices(self) -> int:
        return len(self.datasets)


#: Type 2 attributes of the patient and study modules that highdicom copies from the source images and
#: that a source may lack (as tests/test_dicom.py's writer does): added empty, which DICOM allows for
#: Type 2, to the in-memory headers only.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "AccessionNumber")


def _complete_type2(ds) -> Any:
    for key in _TYPE2_COPIED:
        if key not in ds:
            setattr(ds, key, "")
    return ds


def load_source(dicom_dir: Path, *, series: int | None = None) -> SourceSeries:
    """The DSC series of ``dicom_dir`` (``series``: its SeriesNumber, when the folder holds several) as a
    SourceSeries: headers of the first temporal position (of the first echo for a multi-echo series),
    one per slice, sorted along the slice normal. InputError for a series the export cannot reference
    (an enhanced multi-frame or mosaic series, a slice without a file), UsageError as select_series."""
    dicom_dir = Path(dicom_dir)
    info = select_series(inspect(dicom_dir), dicom_dir, series)
    where = f"{dicom_dir}: series {info.number}"
    first = info.echoes[0] if info.echoes else info
    if info.mosaic or any(im.frame_no is not None for im, _, _ in first.images):
        raise InputError(f"{where}: an enhanced multi-frame or mosaic series cannot be exported yet (the export "
                         "references one classic image per slice); export the maps as NIfTI, or re-export the "
                         "series from the scanner as classic single-frame images")
    chosen = sorted(((s, im) for im, f, s in first.images if f == 0), key=lambda x: x[0])
    if [s for s, _ in chosen] != list(range(first.slices)):
        raise InputError(f"{where}: the first frame lacks a slice or holds one twice; check the series with "
                         "perfusion dicom-inspect")
    pydicom = import_pydicom(dicom_dir)
    datasets = []
    with quiet_pydicom():
        for _, im in chosen:
            try:
                datasets.append(_complete_type2(pydicom.dcmread(im.path, stop_before_pixels=True)))
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged file
                raise InputError(f"{where}: a header cannot be read again ({type(exc).__name__}); the folder "
                                 "changed since it was inspected? run the export again") from None
    im0 = chosen[0][1]
    return SourceSeries(datasets=datasets, rows=im0.rows, cols=im0.columns,
                        positions=np.array([im.position for _, im in chosen], dtype=np.float64),
                        orientation=np.array(im0.orientation, dtype=np.float64), spacing=im0.spacing,
                        number=info.number, secrets=info.secrets)


def source_indices(shape: tuple[int, ...], affine: np.ndarray, source: SourceSeries) -> np.ndarray:
    """The NIfTI voxel (i, j, k) of every source pixel: int array (n_slices, rows, cols, 3), from the
    geometry alone (pixel (r, c) of slice s lies at positions[s] + c * spacing[1] * row direction
    + r * spacing[0] * column direction, LPS mm; ``affine`` maps voxels to RAS mm). InputError unless
    the two grids are one grid up to a permutation / flip of axes (GRID_TOLERANCE_VOXELS)."""
    if len(shape) != 3:
        raise InputError(f"a map to export must be 3-D (x, y, z), not of shape {tuple(shape)}")
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    row_dir, col_dir = source.orientation[:3], source.orientation[3:]
    steps_lps = np.stack([col_dir * source.spacing[0], row_dir * source.spacing[1]])  # per row, per column
    origin = (inv[:3, :3] @ (source.positions * LPS_RAS).T).T + inv[:3, 3]  # (n_slices, 3) voxel of pixel (0, 0)
    d_row, d_col = (inv[:3, :3] @ (steps_lps * LPS_RAS).T).T
    rr, cc = np.mgrid[0:source.rows, 0:source.cols]
    idx = origin[:, None, None, :] + rr[None, ..., None] * d_row + cc[None, ..., None] * d_col
    rounded = np.rint(idx).astype(np.int64)
    off = float(np.abs(idx - rounded).max()) if idx.size else 0.0
    inside = all((rounded[..., a] >= 0).all() and (rounded[..., a] < shape[a]).all() for a in range(3))
    same_size = int(np.prod(shape)) == rounded.size // 3
    one_to_one = same_size and inside and np.unique(
        np.ravel_multi_index(tuple(rounded.reshape(-1, 3).T), tuple(shape))).size == rounded.size // 3
    if off > GRID_TOLERANCE_VOXELS or not one_to_one:
        where = "outside the map" if not inside else f"{off:.2f} voxel off its voxel centres"
        if not same_size:
            where = (f"{source.n_slices} x {source.rows} x {source.cols} source pixels against a map of "
                     f"{' x '.join(str(n) for n in shape[:3])} voxels")
        elif off <= GRID_TOLERANCE_VOXELS and inside:
            where = "pixels fall on the same voxel: the axes are not the map's"
        raise InputError(f"the maps do not lie on the grid of source series {source.number} ({where}); give the "
                         "DICOM folder (and --series) the analysis was run on")
    return rounded


def to_source_grid(volume: np.ndarray, affine: np.ndarray, source: SourceSeries) -> np.ndarray:
    """A map (x, y, z) on the NIfTI grid with its RAS ``affine`` (mm) as an array (n_slices, rows, cols)
    in the pixel order of ``source``'s images (slice s as source.datasets[s]; row along the column
    direction of ImageOrientationPatient, column along its row direction): an exact index permutation
    and flip, no resampling; dtype kept. InputError when the grids differ (:func:`source_indices`)."""
    volume = np.asarray(volume)
    idx = source_indices(volume.shape, affine, source)
    return volume[idx[..., 0], idx[..., 1], idx[..., 2]]


def from_source_grid(frames: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
                     source: SourceSeries) -> np.ndarray:
    """The inverse of :func:`to_source_grid`: frames (n_slices, rows, cols) back onto the NIfTI grid
    ``shape`` (x, y, z) of ``affine``."""
    idx = source_indices(shape, affine, source)
    out = np.zeros(shape, dtype=np.asarray(frames).dtype)
    out[idx[..., 0], idx[..., 1], idx[..., 2]] = frames
    return out


# ------------------------------------------------------------------------------------- the objects

#: Stored for a voxel without a value (NaN in the NIfTI map): below every map's valid range (the Real
#: World Value Mapping covers the valid values only), far from any CBV, CBF, time or ratio.
NO_VALUE = -9999.0

#: Short form of perfusion.DISCLAIMER for ContentDescription (a DICOM LO: at most 64 characters).
SHORT_DISCLAIMER = "Research/decision support only; not a medical device/diagnosis"

#: The maps exported, in this order, and their series numbers: 100 x the source's + this offset.
EXPORT_MAPS = ("rcbv", "cbv", "cbf", "mtt", "tmax")
#: Series number offsets of every exported object (the overlay and the report: export_extras.py).
SERIES_OFFSETS = {"rcbv": 1, "cbv": 2, "cbf": 3, "mtt": 4, "tmax": 5, "seg": 6, "overlay": 7, "report": 8}
#: File names in OUT/dicom/ (none carries an identifier).
SEG_FILE = "rois_seg.dcm"
#: Every name an export writes in OUT/dicom/: the maps, the segmentation, the overlay's images
#: (export_extras: overlay-NNN.dcm) and the verdict report (report.dcm).
EXPORT_FILE = re.compile(r"(?:(?:" + "|".join(EXPORT_MAPS) + r")|rois_seg|report|overlay-\d{3})\.dcm")


def is_export_folder(folder: Path) -> bool:
    """True for a folder holding only files an export writes (and at least one): an earlier
    ``--dicom-export`` of the analysis in its parent, which no longer matches new maps."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    entries = list(folder.iterdir())
    return bool(entries) and all(p.is_file() and not p.is_symlink() and EXPORT_FILE.fullmatch(p.name)
                                 for p in entries)


@dataclass(frozen=True)
class MapSpec:
    """How one map is described in DICOM: ``label`` (LUT label, <= 16 characters), ``explanation``,
    ``quantity`` (DCM code: value, meaning), ``unit`` (UCUM code: value, meaning), ``title`` (the series
    description's words) and whether leakage correction applies to it."""

    label: str
    explanation: str
    quantity: tuple[str, str]
    unit: tuple[str, str]
    title: str
    leakage: bool = False


#: The quantity codes are DICOM's (PS3.16, DCM): 126398 Relative Regional Blood Volume, 113056 Regional
#: Cerebral Blood Volume, 113055 Regional Cerebral Blood Flow, 113052 Mean Transit Time, 113084 Tmax.
#: The units are UCUM: mL/(100.g) for mL/100 g, mL/(100.g.min) for mL/100 g/min, s, {ratio}.
MAP_SPECS = {
    "rcbv": MapSpec("rCBV", "CBV relative to the reference tissue's median",
                    ("126398", "Relative Regional Blood Volume"), ("{ratio}", "ratio"), "rCBV", leakage=True),
    "cbv": MapSpec("CBV", "cerebral blood volume, mL/100 g", ("113056", "Regional Cerebral Blood Volume"),
                   ("mL/(100.g)", "mL/100 g"), "CBV mL/100g", leakage=True),
    "cbf": MapSpec("CBF", "cerebral blood flow, mL/100 g/min", ("113055", "Regional Cerebral Blood Flow"),
                   ("mL/(100.g.min)", "mL/100 g/min"), "CBF mL/100g/min"),
    "mtt": MapSpec("MTT", "mean transit time, s", ("113052", "Mean Transit Time"), ("s", "second"), "MTT s"),
    "tmax": MapSpec("Tmax", "time to the residue function's maximum, s", ("113084", "Tmax"), ("s", "second"),
                    "Tmax s"),
}


def import_highdicom():
    """highdicom, imported on first use; UsageError without it."""
    try:
        import highdicom
    except ImportError:
        raise UsageError("the DICOM export needs highdicom; pip install highdicom (make install does)") from None
    return highdicom


def series_number(source: SourceSeries, key: str) -> int:
    """The series number of exported object ``key`` (SERIES_OFFSETS): 100 x the source's + its offset,
    so that PACS lists the exports after their source (series 7 -> 701 rCBV, ..., 706 ROIs)."""
    return 100 * (source.number or 0) + SERIES_OFFSETS[key]


def equipment() -> dict[str, str]:
    """highdicom's equipment arguments for every exported object: the software, never the site's."""
    from perfusion import __version__

    return {"manufacturer": "perfusion (open source)", "manufacturer_model_name": "perfusion",
            "software_versions": str(__version__), "device_serial_number": "none"}


def series_description(key: str, report: dict) -> str:
    """The SeriesDescription a reader understands in a PACS list (<= 64 characters)."""
    spec = MAP_SPECS[key]
    leak = report.get("leakage")
    leak = leak if isinstance(leak, dict) else {}
    corrected = leak.get("method") not in (None, "none") and bool(leak.get("n_corrected"))
    words = "leakage-corrected, research" if spec.leakage and corrected else "research"
    return f"perfusion {spec.title} ({words})"


def parametric_map(key: str, volume: np.ndarray, affine: np.ndarray, source: SourceSeries, report: dict):
    """One map (x, y, z on the NIfTI grid of ``affine``; its MAP_SPECS unit) as a highdicom
    ParametricMap on ``source``'s images: float32 pixels equal to the map's values, NaN stored as
    NO_VALUE outside the real-world value range, a display window over the 1st-99th percentile."""
    hd = import_highdicom()
    from highdicom.sr.coding import CodedConcept

    spec = MAP_SPECS[key]
    frames = to_source_grid(np.asarray(volume, dtype=np.float32), affine, source)
    valid = frames[np.isfinite(frames)]
    if valid.size == 0:
        raise InputError(f"the {key} map holds no value; run the analysis again")
    lo, hi = float(valid.min()), float(valid.max())
    fill = NO_VALUE if lo > NO_VALUE else float(np.floor(lo) - 1.0)
    pixels = np.where(np.isfinite(frames), frames, np.float32(fill)).astype(np.float32)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=spec.label, lut_explanation=f"{spec.explanation}; {fill:g}: no value"[:64],
        unit=CodedConcept(spec.unit[0], "UCUM", spec.unit[1]),
        value_range=(lo, hi), slope=1.0, intercept=0.0,
        quantity_definition=CodedConcept(spec.quantity[0], "DCM", spec.quantity[1]))
    w_lo, w_hi = (float(v) for v in np.percentile(valid, [1.0, 99.0]))
    window = hd.VOILUTTransformation(window_center=(w_lo + w_hi) / 2, window_width=max(w_hi - w_lo, 1e-3))
    return finish_object(hd.pm.ParametricMap(
        source.datasets, pixels, hd.UID(), series_number(source, key), hd.UID(), 1,
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[window], content_label=spec.label.upper(), content_description=SHORT_DISCLAIMER,
        series_description=series_description(key, report), **equipment()))


def segmentation(rois: list[tuple[str, np.ndarray]], reference: np.ndarray | None, affine: np.ndarray,
                 source: SourceSeries, *, reference_automatic: bool):
    """The lesion ROIs (name, bool mask x, y, z) and the reference mask (None: none) as one binary
    highdicom Segmentation on ``source``'s images: segment k = ROI k (a morphologically abnormal
    structure / lesion, drawn by the user), the last one the reference (tissue / white matter when
    perfusion chose it, tissue when the user gave it)."""
    hd = import_highdicom()
    from pydicom.sr.codedict import codes

    from perfusion import __version__

    # the automatic reference: thresholds on the CBV histogram, distance and symmetry rules, not a trained model
    algorithm = hd.AlgorithmIdentificationSequence(name="perfusion", version=str(__version__),
                                                   family=codes.cid7162.HistogramAnalysis)
    masks, descriptions = [], []
    for k, (name, mask) in enumerate(rois, 1):
        masks.append(mask)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=name[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
    if reference is not None:
        masks.append(reference)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=len(masks), segment_label="reference", segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.WhiteMatter if reference_automatic else codes.SCT.Tissue,
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if reference_automatic
                            else hd.seg.SegmentAlgorithmTypeValues.MANUAL),
            algorithm_identification=algorithm if reference_automatic else None))
    pixels = np.stack([to_source_grid(np.asarray(m, dtype=bool), affine, source) for m in masks], axis=-1)
    seg = hd.seg.Segmentation(
        source.datasets, pixels.astype(np.uint8), hd.seg.SegmentationTypeValues.BINARY, descriptions, hd.UID(),
        series_number(source, "seg"), hd.UID(), 1, content_label="ROIS", content_description=SHORT_DISCLAIMER,
        series_description="perfusion ROIs and reference (research)", omit_empty_frames=False, **equipment())
    return finish_object(seg)


def finish_object(ds) -> Any:
    """Two attributes highdicom leaves to the caller, set on every exported object: ImageComments (the
    General Image module, in the Parametric Map and Segmentation IODs) holds the full disclaimer
    (perfusion.DISCLAIMER: longer than ContentDescription's 64 characters), and BodyPartExamined is
    BRAIN (dciodvfy asks for Laterality unless the body part is known to be unpaired)."""
    from perfusion import DISCLAIMER

    ds.ImageComments = DISCLAIMER
    ds.BodyPartExamined = "BRAIN"
    return ds


# ------------------------------------------------------------------------------------ the analysis


def read_analysis(out: Path, source_dir: Path) -> dict:
    """report.json of the analysis in ``out``, checked against ``source_dir``: UsageError when it was
    not analysed from a DICOM folder, InputError when ``source_dir`` is not the folder it was analysed
    from (report.json "inputs" "dsc" SHA-256 against the folder's, io.sha256)."""
    from perfusion.io.files import sha256
    from perfusion.io.names import find_report
    from perfusion.io.nifti import read_json_object

    path = find_report(out)
    report = read_json_object(path, what="report.json", fix="run perfusion analyze again")
    dsc = (report.get("inputs") or {}).get("dsc")
    if not isinstance(dsc, dict) or dsc.get("file") != "DICOM folder":
        raise UsageError(f"{path}: the analysis was run on a NIfTI series, which has no DICOM study to attach "
                         "the maps to; analyse the DICOM folder itself to export DICOM")
    if dsc.get("sha256") != sha256(Path(source_dir)):
        raise InputError(f"{source_dir}: is not the DICOM folder {out} was analysed from (its SHA-256 differs "
                         "from report.json's); give the folder the analysis read, unchanged, as --source")
    return report


def _load_on_grid(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    from perfusion.io.nifti import load_array_affine

    if not path.is_file():
        raise InputError(f"{path}: {what} is missing from the analysis folder; run perfusion analyze again")
    return load_array_affine(path, what=what)


def analysis_masks(out: Path, report: dict) -> tuple[list[tuple[str, np.ndarray]], np.ndarray | None]:
    """The lesion ROIs (name, bool x, y, z; report.json rois[].mask_file) and the reference mask (or None)."""
    from perfusion.io.names import output_path

    rois = []
    for roi in report.get("rois") or []:
        data, _ = _load_on_grid(Path(out) / Path(str(roi["mask_file"])).name, f"ROI mask {roi['name']}")
        rois.append((str(roi["name"]), data > 0))
    ref_path = output_path(out, report, "reference_mask")
    reference = _load_on_grid(ref_path, "the reference mask")[0] > 0 if ref_path.is_file() else None
    return rois, reference


def build_objects(out: Path, report: dict, source: SourceSeries) -> dict[str, Any]:
    """Every core object of ``out``'s analysis on ``source``: file name -> highdicom dataset (the
    Parametric Maps of the EXPORT_MAPS the analysis wrote, the Segmentation when it has ROIs or a
    reference)."""
    from perfusion.io.names import output_path

    objects: dict[str, Any] = {}
    affine = None
    for key in EXPORT_MAPS:
        path = output_path(out, report, key)
        if not path.is_file():
            continue
        volume, affine = _load_on_grid(path, f"the {key} map")
        objects[f"{key}.dcm"] = parametric_map(key, volume, affine, source, report)
    if affine is None:
        raise InputError(f"{out}: holds none of the maps {', '.join(EXPORT_MAPS)}; run perfusion analyze again")
    rois, reference = analysis_masks(out, report)
    if rois or reference is not None:
        automatic = bool((report.get("reference") or {}).get("automatic"))
        objects[SEG_FILE] = segmentation(rois, reference, affine, source, reference_automatic=automatic)
    return objects


def check_source_outside(out: Path, source_dir: Path) -> None:
    """UsageError when the DICOM folder ``source_dir`` is ``out/dicom`` or lies inside it: the export
    replaces that folder and would delete the source with it."""
    target, source = (Path(out) / "dicom").resolve(), Path(source_dir).resolve()
    if source == target or target in source.parents:
        raise UsageError(f"{source_dir}: the DICOM folder lies in {Path(out) / 'dicom'}, which the DICOM export "
                         "replaces; move the DICOM folder out of the output folder first")


def export_dicom(out: Path, source_dir: Path, *, series: int | None = None) -> list[Path]:
    """Write ``out``'s maps, ROIs and reference as DICOM objects into ``out/dicom/`` (module docstring),
    in the study of ``source_dir``'s DSC series (``series``: its SeriesNumber when the folder holds
    several); return the files written. The folder is built in a staging folder beside it and renamed in
    place: a failed export leaves an earlier ``dicom/`` as it was. Errors: read_analysis, load_source,
    to_source_grid; OutputError when ``out`` cannot be written."""
    out, source_dir = Path(out), Path(source_dir)
    check_source_outside(out, source_dir)
    report = read_analysis(out, source_dir)
    source = load_source(source_dir, series=series)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's notes quote no identifier but are no user's business
        objects = build_objects(out, report, source)
    with _staged_folder(out / "dicom") as stage:
        for name, ds in objects.items():
            ds.save_as(stage / name, enforce_file_format=True)
        # --- the colour overlay (Secondary Capture) and the verdict report (SR): io/dicom/export_extras.py
        _write_extras(out, report, source, stage)
        names = sorted(p.name for p in stage.iterdir())
    return [out / "dicom" / n for n in names]


def _write_extras(out: Path, report: dict, source: SourceSeries, stage: Path) -> None:
    """The colour overlay (Secondary Capture, one image per source slice) and the verdict report
    (Comprehensive SR) of io/dicom/export_extras.py, written into ``stage``."""
    from perfusion.io.dicom.export_extras import write_overlay, write_verdict_report
    from perfusion.io.names import output_path

    rcbv, affine = _load_on_grid(output_path(out, report, "rcbv"), "the rcbv map")
    baseline, _ = _load_on_grid(output_path(out, report, "baseline"), "the baseline image")
    rois, reference = analysis_masks(out, report)

    def grid(volume: np.ndarray) -> np.ndarray:
        return to_source_grid(np.asarray(volume), affine, source)

    thr = report.get("thresholds") or {}
    write_overlay(stage, source, grid(rcbv), grid(baseline), {name: grid(m) for name, m in rois},
                  None if reference is None else grid(reference),
                  thresholds=(float(thr.get("rcbv_low", 1.0)), float(thr.get("rcbv_high", 1.75))),
                  series_number=series_number(source, "overlay"))
    write_verdict_report(stage, source, report, series_number=series_number(source, "report"))


@contextlib.contextmanager
def _staged_folder(target: Path):
    """A private folder beside ``target``; on success it replaces ``target`` (a rename; an earlier
    folder is moved aside first and removed after), on failure it is removed."""
    from perfusion.io.folders import replace_folder
    from perfusion.io.outputs import current_umask

    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        os.chmod(stage, 0o777 & ~current_umask())
    except OSError as exc:
        raise OutputError(f"{target.parent}: cannot write the DICOM export here ({exc.strerror or exc}); "
                          "check the folder's permissions and free space") from None
    try:
        yield stage
        replace_folder(stage, target, target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputError(f"{target}: writing the DICOM export failed ({exc.strerror or exc}); check free space "
                          "and permissions") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
