"""The DICOM export's pictures and words (issue 22): the rCBV colour overlay as a Secondary Capture
series and the verdict table as a Comprehensive SR, both filed into the source study.

export.py writes the Parametric Maps and the Segmentation and calls these two with the source series
(export.SourceSeries: one pydicom dataset per slice of the first temporal position, in the NIfTI
maps' k order) and the maps already resampled onto the source images' pixel grid
(export.to_source_grid: ``(n_slices, rows, cols)``, row 0 at the top, column 0 at the left, as a
viewer shows the source slice).

- The overlay is a picture for the eye, not a measurement: one RGB Secondary Capture image per source
  slice, the slice magnified to at least OVERLAY_MIN_PX pixels with a colour bar, the outlines' legend
  and the disclaimer burned in (BurnedInAnnotation YES). A Secondary Capture has no Frame of Reference
  (its IOD has none): it references its source slice (ReferencedImageSequence) and carries the
  source's patient and study; the Parametric Map is the object to measure on.
- The report is a Comprehensive SR: one container per ROI with its name (Tracking Identifier), the
  median rCBV and its 95 % interval (UCUM {ratio}), the fractions of the lesion below, between and
  above the thresholds (FTB, UCUM %), the verdict and the next step in words, and the disclaimer; the
  source images are its evidence, so PACS files it beside them.

The colours and scales repeat report/html.py's (this module sits in the io layer, below the report):
tests/test_dicom_export_extras.py checks that they agree.

Identifiers: these objects carry the source's patient and study modules on purpose (PACS files them
into the patient's study by them); they are written only under ``OUT/dicom/``, only with
``--dicom-export``.
"""

from __future__ import annotations

import math
import textwrap
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from perfusion import DISCLAIMER, __version__
from perfusion.io.display import (  # the rCBV scale and outlines of report.html, defined once
    BACKGROUND_PERCENTILE,
    RCBV_ALPHA,
    RCBV_CMAP,
    RCBV_RANGE,
    REFERENCE_OUTLINE_COLOUR,
    ROI_OUTLINE_COLOURS,
)
from perfusion.io.outputs import atomic_write
from perfusion.verdicts import VERDICT_WORDS

if TYPE_CHECKING:
    from pydicom import Dataset


class SourceSeries(Protocol):
    """What these writers read of export.SourceSeries (export.load_source): the source's datasets, one per
    slice in the maps' k order, and its matrix. A protocol, so that this module does not import export.py,
    which imports it."""

    @property
    def datasets(self) -> list[Any]: ...
    @property
    def rows(self) -> int: ...
    @property
    def cols(self) -> int: ...

#: The verdict thresholds (ratio) marked on the colour bar when the caller does not pass the run's own
#: (quantify.roi.RCBV_LOW / RCBV_HIGH, the defaults of perfusion analyze).
DEFAULT_THRESHOLDS = (1.0, 1.75)

#: The image panel is the source slice magnified by a whole factor to at least this many pixels on its
#: long side (a 48 x 48 slice becomes 528 x 528), so the burned-in text is readable beside it.
OVERLAY_MIN_PX = 512
#: Pixels right of the panel (the colour bar and its labels) and per text line below it.
COLORBAR_PX = 120
LINE_PX = 17
FONT_PT = 8.5
DPI = 100

#: Series descriptions as a PACS list shows them (LO: at most 64 characters), and series numbers
#: (export.py numbers the maps below these).
OVERLAY_DESCRIPTION = "perfusion rCBV overlay (research, not for diagnosis)"
REPORT_DESCRIPTION = "perfusion verdict report (research, not for diagnosis)"
OVERLAY_SERIES_NUMBER = 9910
REPORT_SERIES_NUMBER = 9920
MANUFACTURER = "perfusion (open source)"

#: Concepts without a DICOM or LOINC code: a private coding scheme ("99" prefix, PS3.16 8.2); code values
#: of at most 16 characters (CodeValue is SH; longer ones would go to LongCodeValue).
PRIVATE_SCHEME = "99PERFUSION"
PRIVATE_CODES = {
    "ci_low": ("RCBV-CI-LOW", "Median rCBV, lower bound of the 95 % interval"),
    "ci_high": ("RCBV-CI-HIGH", "Median rCBV, upper bound of the 95 % interval"),
    "ftb_low": ("FTB-LOW", "Fraction of the lesion below the low rCBV threshold"),
    "ftb_mid": ("FTB-MID", "Fraction of the lesion between the rCBV thresholds"),
    "ftb_high": ("FTB-HIGH", "Fraction of the lesion above the high rCBV threshold"),
    "rcbv_low": ("RCBV-THR-LOW", "Low rCBV threshold"),
    "rcbv_high": ("RCBV-THR-HIGH", "High rCBV threshold"),
}


# ------------------------------------------------------------------------------------- the overlay


def orientation_letters(direction: np.ndarray) -> str:
    """The patient directions (DICOM LPS: L, P, H positive; R, A, F negative) a unit vector points to,
    strongest first, components below 0.25 left out: "L" for (1, 0, 0), "LP" for an oblique row."""
    pos, neg = "LPH", "RAF"
    order = np.argsort(-np.abs(direction))
    letters = [(pos if direction[i] > 0 else neg)[i] for i in order if abs(direction[i]) >= 0.25]
    return "".join(letters[:3]) or "L"


def _opposite(letters: str) -> str:
    return letters.translate(str.maketrans("LRPAHF", "RLAPFH"))


def _panel_scale(rows: int, cols: int) -> int:
    """The whole magnification that brings the slice's long side to at least OVERLAY_MIN_PX pixels."""
    return max(1, math.ceil(OVERLAY_MIN_PX / max(rows, cols)))


def _reference_region(ref2d: np.ndarray) -> np.ndarray:
    """The region a scattered reference mask covers (closed by 2 pixels, holes filled), to outline
    as a region as report.html does, not as specks."""
    from scipy import ndimage

    m = np.asarray(ref2d) != 0
    if not m.any():
        return m
    padded = np.pad(m, 3)
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3), bool), iterations=2)
    return ndimage.binary_fill_holes(closed | padded)[3:-3, 3:-3]


def _legend_lines(rois: list[str], has_reference: bool, thresholds: tuple[float, float], width_chars: int,
                  position: str) -> list[tuple[str, str]]:
    """The burned-in text below the panel as (text, colour) lines: scale, outlines, slice, disclaimer."""
    lo, hi = RCBV_RANGE
    lines = [(f"rCBV (ratio to reference tissue) {lo:g}-{hi:g} in colour over the baseline image (grey); "
              f"verdict thresholds {thresholds[0]:g} and {thresholds[1]:g}", "white")]
    for i, name in enumerate(rois):
        lines.append((f"solid outline: {name}", ROI_OUTLINE_COLOURS[i % len(ROI_OUTLINE_COLOURS)]))
    if has_reference:
        lines.append(("dashed outline: reference tissue", REFERENCE_OUTLINE_COLOUR))
    lines.append((position, "white"))
    lines += [(part, "#ffd54f") for part in textwrap.wrap(DISCLAIMER, width_chars)]
    return [(part, colour) for text, colour in lines for part in textwrap.wrap(text, width_chars)]


def _draw_outlines(ax, rois: dict[str, np.ndarray], reference: np.ndarray | None) -> None:
    """ROI outlines (light over black, named above the ROI) and the reference's region dashed, on a
    panel drawn with origin 'upper' (contour's x = column, y = row match imshow's)."""
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=2.2, foreground="black")]
    for i, (name, m) in enumerate(rois.items()):
        if not np.any(m):
            continue
        colour = ROI_OUTLINE_COLOURS[i % len(ROI_OUTLINE_COLOURS)]
        img = (np.asarray(m) != 0).astype(float)
        ax.contour(img, levels=[0.5], colors=["black"], linewidths=3.0)
        ax.contour(img, levels=[0.5], colors=[colour], linewidths=1.4)
        r, c = np.nonzero(img)
        ax.text(float(c.mean()), float(r.min()) - 1.0, name, ha="center", va="bottom", color=colour,
                fontsize=FONT_PT, fontweight="bold", path_effects=halo, clip_on=True)
    if reference is not None:
        region = _reference_region(reference)
        if region.any():
            ax.contour(region.astype(float), levels=[0.5], colors=["black"], linewidths=1.8)
            ax.contour(region.astype(float), levels=[0.5], colors=[REFERENCE_OUTLINE_COLOUR], linewidths=0.9,
                       linestyles=[(0, (3, 2))])


def _draw_marks(ax, letters: dict[str, str]) -> None:
    """The patient directions at the panel's four edges, white on a black outline."""
    from matplotlib import patheffects

    stroke = [patheffects.withStroke(linewidth=1.8, foreground="black")]
    for edge, (x, y, ha, va) in {"left": (0.01, 0.5, "left", "center"), "right": (0.99, 0.5, "right", "center"),
                                 "top": (0.5, 0.99, "center", "top"),
                                 "bottom": (0.5, 0.01, "center", "bottom")}.items():
        ax.text(x, y, letters[edge], transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=FONT_PT + 1,
                fontweight="bold", path_effects=stroke)


def render_overlay(rcbv: np.ndarray, background: np.ndarray, rois: dict[str, np.ndarray],
                   reference: np.ndarray | None, *, background_max: float, thresholds: tuple[float, float],
                   letters: dict[str, str], position: str) -> np.ndarray:
    """One slice's overlay picture as an RGB uint8 array (height, width, 3): ``background`` (rows,
    cols; a.u.) in grey from 0 to ``background_max``, ``rcbv`` (ratio, NaN transparent) in RCBV_CMAP
    over RCBV_RANGE at RCBV_ALPHA, the outlines, the patient directions ``letters`` (left/right/top/
    bottom), a colour bar with the thresholds marked, and the legend lines and disclaimer below. Row 0
    of the inputs is the picture's top, as in the source image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = rcbv.shape
    scale = _panel_scale(rows, cols)
    pw, ph = cols * scale, rows * scale
    width = pw + COLORBAR_PX
    lines = _legend_lines(list(rois), bool(reference is not None and np.any(reference)), thresholds,
                          max(40, int(width / (FONT_PT * DPI / 72 * 0.6))), position)
    height = ph + LINE_PX * (len(lines) + 1)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 1 - ph / height, pw / width, ph / height))
    ax.set_axis_off()
    ax.imshow(np.nan_to_num(background), cmap="gray", vmin=0.0, vmax=background_max, interpolation="nearest")
    im = ax.imshow(np.ma.masked_invalid(rcbv), cmap=RCBV_CMAP, vmin=RCBV_RANGE[0], vmax=RCBV_RANGE[1],
                   alpha=RCBV_ALPHA, interpolation="nearest")
    _draw_outlines(ax, rois, reference)
    _draw_marks(ax, letters)
    cax = fig.add_axes(((pw + 12) / width, 1 - (ph - 20) / height, 18 / width, (ph - 40) / height))
    bar = fig.colorbar(im, cax=cax)
    if bar.solids is not None:  # the bar's colours opaque: the scale as read, not as blended
        bar.solids.set_alpha(1.0)
    for t in thresholds:
        cax.axhline(t, color="black", linewidth=2.0)
        cax.axhline(t, color="white", linewidth=0.8)
    bar.set_label("rCBV (ratio)", color="white", fontsize=FONT_PT)
    cax.tick_params(colors="white", labelsize=FONT_PT)
    for i, (text, colour) in enumerate(lines):
        fig.text(6 / width, 1 - (ph + LINE_PX * (i + 1)) / height, text, color=colour, fontsize=FONT_PT,
                 va="center", ha="left")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _slice_letters(ds: Dataset) -> dict[str, str]:
    """The patient directions at the edges of a source image (ImageOrientationPatient: the row
    direction points to the right edge, the column direction to the bottom)."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    right, bottom = orientation_letters(iop[:3]), orientation_letters(iop[3:])
    return {"right": right, "left": _opposite(right), "bottom": bottom, "top": _opposite(bottom)}


def _position_text(ds: Dataset, k: int, n: int) -> str:
    ipp = ", ".join(f"{float(v):.1f}" for v in ds.ImagePositionPatient)
    return f"slice {k + 1} of {n}; source image position (x, y, z) = ({ipp}) mm"


def _source_reference(ds: Dataset) -> Any:
    """ReferencedImageSequence's item: the source slice, as the source image for this picture."""
    from highdicom.sr import CodedConcept
    from pydicom import Dataset as PydicomDataset
    from pydicom.sr.codedict import codes

    item = PydicomDataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)]
    return item


def write_overlay(out_dicom: Path, source: SourceSeries, rcbv_frames: np.ndarray, baseline_frames: np.ndarray,
                  roi_frames: dict[str, np.ndarray], reference_frames: np.ndarray | None, *,
                  thresholds: tuple[float, float] = DEFAULT_THRESHOLDS,
                  series_number: int = OVERLAY_SERIES_NUMBER) -> list[Path]:
    """The rCBV colour overlay as one RGB Secondary Capture image per source slice, written into
    ``out_dicom`` as overlay-NNN.dcm (NNN: the slice, 1 first); returns the paths in slice order.

    Every frame array is ``(n_slices, rows, cols)`` on the source images' pixel grid (export.
    to_source_grid): ``rcbv_frames`` (ratio), ``baseline_frames`` (a.u.), each ROI of ``roi_frames``
    and ``reference_frames`` (non-zero inside). ``thresholds`` (ratio): the run's rCBV thresholds
    (report.json "thresholds"), marked on the colour bar. The images share one new series in the
    source study, with the source's patient and study modules, each referencing its source slice."""
    from highdicom import UID
    from highdicom.sc import SCImage

    n = len(source.datasets)
    for name, a in [("rcbv", rcbv_frames), ("baseline", baseline_frames), *roi_frames.items()]:
        if np.shape(a) != (n, source.rows, source.cols):
            raise ValueError(f"{name} frames have shape {np.shape(a)}, "
                             f"not the source's {(n, source.rows, source.cols)}")
    finite = np.isfinite(baseline_frames)
    bg_max = float(np.percentile(baseline_frames[finite], BACKGROUND_PERCENTILE)) if finite.any() else 1.0
    series_uid = UID()
    out_dicom = Path(out_dicom)
    out_dicom.mkdir(parents=True, exist_ok=True)
    written = []
    for k, ds in enumerate(source.datasets):
        letters = _slice_letters(ds)
        pixels = render_overlay(rcbv_frames[k], baseline_frames[k], {r: m[k] for r, m in roi_frames.items()},
                                None if reference_frames is None else reference_frames[k],
                                background_max=bg_max if bg_max > 0 else 1.0, thresholds=thresholds,
                                letters=letters, position=_position_text(ds, k, n))
        image = SCImage.from_ref_dataset(
            ds, pixels, "RGB", 8, "PATIENT", series_uid, series_number, UID(), k + 1, MANUFACTURER,
            patient_orientation=(letters["right"], letters["bottom"]), transfer_syntax_uid="1.2.840.10008.1.2.1",
            series_description=OVERLAY_DESCRIPTION, software_versions=__version__)
        image.BurnedInAnnotation = "YES"
        # General Series' Laterality is required for a paired body part only: the brain is not one
        image.BodyPartExamined = ds.get("BodyPartExamined") or "BRAIN"
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.ImageComments = DISCLAIMER
        image.DerivationDescription = "rCBV map of perfusion analyze over its baseline image, ROI outlines"
        image.ReferencedImageSequence = [_source_reference(ds)]
        written.append(atomic_write(out_dicom / f"overlay-{k + 1:03d}.dcm",
                                    partial(image.save_as, enforce_file_format=True)))
    return written


# --------------------------------------------------------------------------------------- the report


def _private(key: str) -> Any:
    from highdicom.sr import CodedConcept

    value, meaning = PRIVATE_CODES[key]
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


def _private_scheme() -> Any:
    """The SOP Common module's CodingSchemeIdentificationSequence item that names PRIVATE_SCHEME."""
    from pydicom import Dataset as PydicomDataset

    item = PydicomDataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "perfusion's concepts without a DICOM or LOINC code"
    item.CodingSchemeResponsibleOrganization = "the perfusion project"
    return item


def _num(name: Any, value: Any, unit: Any) -> list[Any]:
    """A NUM content item, or nothing when ``value`` is missing or not finite (n/a in report.json)."""
    from highdicom.sr import NumContentItem, RelationshipTypeValues

    try:
        v = float(value)
    except (TypeError, ValueError):
        return []
    if not math.isfinite(v):
        return []
    return [NumContentItem(name=name, value=v, unit=unit, relationship_type=RelationshipTypeValues.CONTAINS)]


def _text(name: Any, value: str) -> Any:
    from highdicom.sr import RelationshipTypeValues, TextContentItem

    return TextContentItem(name=name, value=str(value)[:10240] or "n/a",
                           relationship_type=RelationshipTypeValues.CONTAINS)


def _roi_group(r: dict) -> Any:
    """One ROI's container: name, median rCBV (with its derivation: median) and 95 % interval, the
    fractions below / between / above the thresholds, the verdict and the next step."""
    from highdicom.sr import CodeContentItem, ContainerContentItem, ContentSequence, RelationshipTypeValues
    from pydicom.sr.codedict import codes

    ratio, percent = codes.UCUM.Ratio, codes.UCUM.Percent
    median = _num(codes.DCM.RelativeRegionalBloodVolume, r.get("rcbv_median"), ratio)
    if median:
        median[0].ContentSequence = [CodeContentItem(name=codes.DCM.Derivation, value=codes.SCT.Median,
                                                     relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD)]
    items = [_text(codes.DCM.TrackingIdentifier, r.get("name", "?")), *median,
             *_num(_private("ci_low"), r.get("rcbv_ci_low"), ratio),
             *_num(_private("ci_high"), r.get("rcbv_ci_high"), ratio)]
    for key in ("ftb_low", "ftb_mid", "ftb_high"):
        value = r.get(key)
        items += _num(_private(key), None if value is None else 100.0 * float(value), percent)
    verdict = str(r.get("verdict", "indeterminate"))
    items += [_text(codes.DCM.Finding, VERDICT_WORDS.get(verdict, verdict)),
              _text(codes.DCM.Recommendation, r.get("next_step") or "none given")]
    group = ContainerContentItem(name=codes.DCM.MeasurementGroup, relationship_type=RelationshipTypeValues.CONTAINS)
    group.ContentSequence = ContentSequence(items)
    return group


def report_content(report: dict) -> Any:
    """The SR's root container (LOINC Diagnostic Imaging Report) from report.json's content: the
    disclaimer, the thresholds (ratio), one Measurement Group per ROI, and a line when there is none."""
    from highdicom.sr import ContainerContentItem, ContentSequence
    from pydicom.sr.codedict import codes

    thr = report.get("thresholds") or {}
    items = [_text(codes.DCM.Comment, DISCLAIMER),
             *_num(_private("rcbv_low"), thr.get("rcbv_low"), codes.UCUM.Ratio),
             *_num(_private("rcbv_high"), thr.get("rcbv_high"), codes.UCUM.Ratio)]
    rois = report.get("rois") or []
    items += [_roi_group(r) for r in rois]
    if not rois:
        items.append(_text(codes.DCM.Comment, "No ROI was given to perfusion analyze: maps only, no verdict."))
    root = ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    root.ContentSequence = ContentSequence(items)
    return root


def write_verdict_report(out_dicom: Path, source: SourceSeries, report: dict, *,
                         series_number: int = REPORT_SERIES_NUMBER) -> list[Path]:
    """The verdict table of ``report`` (report.json's content) as a Comprehensive SR, written into
    ``out_dicom`` as report.dcm; returns its path in a list. The source images are its evidence (so its
    patient, study and the CurrentRequestedProcedureEvidenceSequence come from them: load_source gives
    their headers the type 2 patient and study attributes highdicom reads, empty where absent); completion
    COMPLETE, verification UNVERIFIED (a machine's result nobody has signed)."""
    from highdicom import UID
    from highdicom.sr import ComprehensiveSR

    sr = ComprehensiveSR(
        evidence=list(source.datasets), content=report_content(report), series_instance_uid=UID(),
        series_number=series_number, sop_instance_uid=UID(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False, series_description=REPORT_DESCRIPTION,
        software_versions=__version__)
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    out_dicom = Path(out_dicom)
    out_dicom.mkdir(parents=True, exist_ok=True)
    return [atomic_write(out_dicom / "report.dcm", partial(sr.save_as, enforce_file_format=True))]
