"""DICOM in: a folder straight from PACS becomes an ``io.Series``, with no patient identifier carried out.

Two tools, each for what it does best:

- **pydicom** reads the headers only (``stop_before_pixels``) to sort the files into series, frames
  and slices and to run the checks below (:func:`inspect`). pydicom is imported lazily; without it
  a DICOM input is a UsageError saying ``pip install pydicom`` (the checks are not optional).
- **dcm2niix** (the field's standard converter; its PyPI wheel ships the binary) converts the one
  selected series in a private temporary folder, from symbolic links with neutral names
  (``000001.dcm`` ...) so that neither its output nor its messages carry the original file names:
  ``dcm2niix -b y -ba y -z y -f series%s -o TMP/out TMP/in``. Its NIfTI header (``descrip`` holds
  the acquisition time) and its sidecar (it keeps ``InstitutionName`` even with ``-ba y``) are never
  copied: the data and affine are read with nibabel and only :data:`SIDECAR_WHITELIST` keys kept.
  ``PERFUSION_DCM2NIIX`` in the environment points at another dcm2niix binary.

dcm2niix exit codes (``console/nii_dicom_batch.h``) and ours:

====  =================================  =============================================
 0    success                            ok (then: exactly one 4-D NIfTI must appear)
 2    no valid DICOM files found         InputError "no DICOM files in DIR"
 4    corrupt file                       InputError with dcm2niix's last message line
 5    input folder invalid               InputError with its last line
 1    generic failure                    InputError with its last line
 8    some files converted, some not     InputError with its last line
 9    rename error                       InputError with its last line
 10   incomplete volumes                 InputError with its last line
 6/7  output folder invalid / read-only  OutputError (our temporary folder: TMPDIR)
 3/11/12, other                          PerfusionError (exit 1: our call is wrong)
 <0   killed by a signal                 InputError naming the signal
====  =================================  =============================================

A missing binary is a UsageError "reinstall: make install". dcm2niix's messages are passed on only
as their last line, with every identifier read from the headers (patient name and its parts, ID,
birth date, accession number, institution, physicians) replaced by ``[removed]``.

Checks (each series; :class:`SeriesInfo` ``errors`` stop an analysis, ``warnings`` go into
report.json):

- equal slice counts per frame, one image per slice and frame, one orientation and matrix (errors);
- ``NumberOfTemporalPositions`` equal to the frames found (error: an incomplete export);
- one RescaleSlope / RescaleIntercept for the whole series (error: rescaling that changes between
  frames changes the signal like a bolus does);
- the frame interval (from AcquisitionTime, else TriggerTime; the earliest image of each frame):
  unusable (error) when an interval is <= 0 or departs from the median interval by more than
  :data:`INTERVAL_UNUSABLE` (50 %: a frame missing or doubled, which shifts every later frame);
  irregular (warning) beyond :data:`INTERVAL_JITTER` (5 %); a median that differs from the TR by more
  than :data:`INTERVAL_TR_TOLERANCE` (5 %) is a warning naming ``--tr``;
- after conversion, dcm2niix's frame order is compared with ours on the pixels of one slice in
  every frame and of every slice in the first frame (error on a mismatch).

dcm2niix sorts the images by InstanceNumber; numbers out of acquisition order (measured: random
numbers scramble slices and frames, with or without TemporalPositionIdentifier) are therefore
replaced, in private copies made with pydicom, by numbers in our order (frame by frame, slices
along the slice normal). Numbers already in order (frame- or slice-major) are used as they are,
through symbolic links.

Multi-echo series (dual-echo DSC): the images of one series whose EchoNumbers (0018,0086), else
EchoTime, take several values are the echoes of one acquisition. Each echo is sorted and checked as a
series of its own (errors named "echo N: ..."), and all echoes must have the same frames, slices
and matrix. dcm2niix writes one NIfTI per echo (suffix ``_e1``, ``_e2``, ... since v1.0.20190902;
earlier the first echo had none); each is matched to its echo by the EchoTime of its sidecar and
checked on the pixels. :func:`read_dicom_echoes` returns one ``DicomSeries`` per echo;
:func:`load_dicom_series` combines them (``echoes.combine_echoes``) into one series.

Series selection: the series with at least ``io.MIN_FRAMES`` frames (4-D) is the DSC series; with
several, a UsageError lists them (number, frames, slices, matrix: no description, which can hold
names) and asks for ``--series N``.

Orientation: the NIfTI keeps dcm2niix's grid (for axial slices usually LAS: it flips the row axis,
never reorients), so masks drawn on any dcm2niix conversion of the series (``perfusion convert``)
fit a DICOM-folder analysis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from perfusion.errors import WRITE_REFUSED_ERRNOS, InputError, OutputError, PerfusionError, UsageError
from perfusion.io import (MAX_FOLDER_FILE_BYTES, MIN_FRAMES, Series, _check_time, describe_skipped, folder_files,
                 open_regular)
from perfusion.units import MAX_TE_S, MAX_TR_S

#: Environment variable naming the dcm2niix binary to use instead of the wheel's.
DCM2NIIX_ENV = "PERFUSION_DCM2NIIX"

#: dcm2niix options: BIDS sidecar (anonymised), gzip, a file name of the series number only.
DCM2NIIX_OPTIONS = ("-b", "y", "-ba", "y", "-z", "y", "-f", "series%s", "-w", "1")

#: Sidecar keys kept from dcm2niix's sidecar: acquisition physics and coded scanner fields, none
#: of them identifying. Left out on purpose: SeriesDescription, ProtocolName, SequenceName and
#: ImageComments (free text that some sites fill with names or IDs), Institution*, Station*,
#: DeviceSerialNumber and SoftwareVersions (they name the site), dates and times of day
#: (AcquisitionTime, ...), patient fields and UIDs. Times in s, as dcm2niix writes them.
SIDECAR_WHITELIST = (
    "Modality", "MagneticFieldStrength", "Manufacturer", "ManufacturersModelName", "MRAcquisitionType",
    "ScanningSequence", "SequenceVariant", "PulseSequenceType", "ImageType", "SeriesNumber",
    "EchoTime", "EchoNumber", "RepetitionTime", "RepetitionTimeExcitation", "FlipAngle", "SliceThickness",
    "SpacingBetweenSlices", "SliceTiming",
    "PhaseEncodingDirection", "PhaseEncodingAxis", "EffectiveEchoSpacing", "TotalReadoutTime",
    "ParallelReductionFactorInPlane", "PartialFourier", "ContrastBolusIngredient",
    "ConversionSoftware", "ConversionSoftwareVersion",
)

#: A whitelisted string must look like a coded value (letters, digits, a few signs, <= 64 chars).
_SAFE_TEXT = re.compile(r"^[A-Za-z0-9 ._+\-/]{0,64}$")

#: An interval departing from the median interval by more than this fraction makes the time axis
#: unusable (a missing or doubled frame shifts every later frame by a whole interval).
INTERVAL_UNUSABLE = 0.5
#: Intervals departing from the median by more than this fraction (but not unusable): a warning.
INTERVAL_JITTER = 0.05
#: Median interval vs RepetitionTime: a relative difference beyond this is a warning.
INTERVAL_TR_TOLERANCE = 0.05

#: Header fields read per file. The identifying ones are read only to scrub dcm2niix's messages.
_IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                "OtherPatientIDs", "PhysiciansOfRecord", "RequestingPhysician", "StationName")
_TAGS = ("SOPClassUID", "SeriesInstanceUID", "SeriesNumber", "Rows", "Columns", "ImagePositionPatient",
         "ImageOrientationPatient", "PixelSpacing", "AcquisitionTime", "AcquisitionDate",
         "AcquisitionDateTime", "TriggerTime", "TemporalPositionIdentifier", "NumberOfTemporalPositions",
         "InstanceNumber", "RescaleSlope", "RescaleIntercept", "EchoTime", "RepetitionTime", "ImageType",
         "NumberOfFrames", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
         "EchoNumbers") + _IDENTIFYING
#: Siemens private tag: number of images in a mosaic.
_MOSAIC_COUNT_TAG = (0x0019, 0x100A)


def _pydicom(folder: Path):
    try:
        import pydicom
    except ImportError:
        raise UsageError(f"{folder}: reading DICOM headers needs pydicom; pip install pydicom "
                         "(make install does)") from None
    return pydicom


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom's warnings and log records can quote header values (names): silence both."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------ header records


@dataclass(frozen=True)
class _Image:
    """One 2-D image: a single-frame file, or one frame of a multi-frame file (``frame_no``)."""

    path: Path
    frame_no: int | None
    position: tuple[float, float, float]  # ImagePositionPatient, mm (LPS)
    orientation: tuple[float, ...]  # ImageOrientationPatient (6)
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns (mm)
    rows: int
    columns: int
    temporal: int | None  # TemporalPositionIdentifier / TemporalPositionIndex
    acq_s: float | None  # acquisition time, s (days since 2000 x 86400 + time of day when the date is known)
    trigger_s: float | None  # TriggerTime, s
    instance: int | None
    slope: float
    intercept: float
    echo_number: int | None = None  # EchoNumbers (0018,0086)
    echo_ms: float | None = None  # EchoTime, ms (as in the header)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _time_s(date: Any, time: Any) -> float | None:
    """DICOM DA + TM (``YYYYMMDD``, ``HHMMSS.FFFFFF``; old ``HH:MM:SS`` too) in s."""
    t = str(time or "").strip().replace(":", "")
    if not t:
        return None
    try:
        hours = int(t[0:2])
        minutes = int(t[2:4]) if len(t) >= 4 else 0
        seconds = float(t[4:]) if len(t) > 4 else 0.0
    except ValueError:
        return None
    out = hours * 3600.0 + minutes * 60.0 + seconds
    d = str(date or "").strip()
    if len(d) >= 8 and d[:8].isdigit():
        with contextlib.suppress(ValueError):
            days = datetime.date(int(d[0:4]), int(d[4:6]), int(d[6:8])) - datetime.date(2000, 1, 1)
            out += days.days * 86400.0  # days since 2000: keeps microseconds in a float64
    return out


def _datetime_s(value: Any) -> float | None:
    """DICOM DT (``YYYYMMDDHHMMSS.FFFFFF&ZZXX``) in s."""
    v = re.split(r"[+-]", str(value or "").strip())[0]
    if len(v) < 10:
        return None
    return _time_s(v[:8], v[8:])


def _item(seq_owner, name: str):
    seq = getattr(seq_owner, name, None) if seq_owner is not None else None
    return seq[0] if seq else None


def _images_of(ds, path: Path) -> list[_Image]:
    """The 2-D images of one dataset; [] when it holds no image with a position."""
    rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if not rows or not cols:
        return []
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames > 1 and per_frame:  # enhanced multi-frame: the per-frame functional groups
        shared = _item(ds, "SharedFunctionalGroupsSequence")
        out = []
        for i, fg in enumerate(per_frame):

            def group(name, fg=fg):
                return _item(fg, name) or _item(shared, name)

            plane, orient = group("PlanePositionSequence"), group("PlaneOrientationSequence")
            meas = group("PixelMeasuresSequence")
            content, pvt = group("FrameContentSequence"), group("PixelValueTransformationSequence")
            if plane is None or orient is None:
                return []
            out.append(_Image(
                path=path, frame_no=i, position=tuple(float(v) for v in plane.ImagePositionPatient),
                orientation=tuple(float(v) for v in orient.ImageOrientationPatient),
                spacing=(tuple(float(v) for v in meas.PixelSpacing) if meas is not None and "PixelSpacing" in meas
                         else (1.0, 1.0)),
                rows=rows, columns=cols,
                temporal=_int(content.get("TemporalPositionIndex")) if content is not None else None,
                acq_s=_datetime_s(content.get("FrameAcquisitionDateTime")) if content is not None else None,
                trigger_s=None, instance=_int(ds.get("InstanceNumber")),
                slope=_float(pvt.get("RescaleSlope")) if pvt is not None and _float(pvt.get("RescaleSlope")) else 1.0,
                intercept=_float(pvt.get("RescaleIntercept")) or 0.0 if pvt is not None else 0.0,
            ))
        return out
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return []
    acq = _datetime_s(ds.get("AcquisitionDateTime")) if ds.get("AcquisitionDateTime") else None
    if acq is None:
        acq = _time_s(ds.get("AcquisitionDate"), ds.get("AcquisitionTime"))
    trigger = _float(ds.get("TriggerTime"))
    spacing = ds.get("PixelSpacing")
    return [_Image(
        path=path, frame_no=None, position=tuple(float(v) for v in ipp), orientation=tuple(float(v) for v in iop),
        spacing=tuple(float(v) for v in spacing) if spacing is not None and len(spacing) == 2 else (1.0, 1.0),
        rows=rows, columns=cols, temporal=_int(ds.get("TemporalPositionIdentifier")), acq_s=acq,
        trigger_s=trigger / 1000.0 if trigger is not None else None, instance=_int(ds.get("InstanceNumber")),
        slope=_float(ds.get("RescaleSlope")) or 1.0, intercept=_float(ds.get("RescaleIntercept")) or 0.0,
        echo_number=_int(_first(ds.get("EchoNumbers"))), echo_ms=_float(ds.get("EchoTime")),
    )]


def _first(value: Any) -> Any:
    """The first value of a multi-valued element (EchoNumbers may hold several)."""
    if value is not None and (isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"):
        return value[0] if len(value) else None
    return value


def _identifiers(ds) -> set[str]:
    """Identifying header values (and the parts of names) to scrub from messages."""
    out: set[str] = set()
    for key in _IDENTIFYING:
        value = ds.get(key)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for v in values:
            text = str(v).strip()
            if len(text) >= 3:
                out.add(text)
            out.update(p for p in re.split(r"[\^=\s,]+", text) if len(p) >= 3)
    return out


def scrub(text: str, secrets) -> str:
    """``text`` with every secret (whole word, any case) replaced by ``[removed]``."""
    for s in sorted(secrets, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", "[removed]", text, flags=re.IGNORECASE)
    return text


# ---------------------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a DICOM folder, as its headers describe it (times in s). Holds no identifier
    in any public field; ``as_dict`` is what ``perfusion dicom-inspect --json`` writes."""

    number: int | None  # SeriesNumber
    n_files: int
    frames: int  # temporal positions
    slices: int  # slices per frame (the most common count; a mosaic's image count)
    rows: int
    columns: int
    mosaic: bool  # Siemens mosaic (all slices of a frame in one image)
    ordering_key: str  # the header field that ordered the frames
    timing_source: str | None  # the header field the frame intervals come from
    frame_times_s: tuple[float, ...]  # start of each frame, relative to the first
    repetition_time_s: float | None
    echo_time_s: float | None
    rescale: tuple[tuple[float, float], ...]  # distinct (RescaleSlope, RescaleIntercept)
    errors: tuple[str, ...]
    warnings: tuple[str, ...]  # besides the interval-vs-TR comparison (tr_warning)
    notes: tuple[str, ...] = ()
    images: tuple = field(default=(), repr=False, compare=False)  # (_Image, frame, slice) per image
    secrets: frozenset = field(default=frozenset(), repr=False, compare=False)  # never output
    echoes: tuple = ()  # a multi-echo series: one SeriesInfo per echo, by echo (TE order); () for one echo
    echo_number: int | None = None  # an echo's EchoNumbers (in ``echoes``)

    @property
    def is_dsc(self) -> bool:
        return self.frames >= MIN_FRAMES

    @property
    def intervals_s(self) -> np.ndarray:
        return _unwrap(np.diff(np.asarray(self.frame_times_s, dtype=np.float64)))

    def interval_stats(self) -> tuple[float, float, float] | None:
        """Median, min, max frame interval (s), or None without timing."""
        d = self.intervals_s
        return (float(np.median(d)), float(d.min()), float(d.max())) if d.size else None

    def tr_warning(self, tr_s: float | None, *, label: str = "RepetitionTime") -> str | None:
        """A warning when the median frame interval differs from ``tr_s`` (s) by more than
        INTERVAL_TR_TOLERANCE; None otherwise."""
        stats = self.interval_stats()
        if stats is None or not tr_s:
            return None
        med = stats[0]
        if abs(med / tr_s - 1.0) <= INTERVAL_TR_TOLERANCE:
            return None
        return (f"median frame interval {med:.4g} s (from {self.timing_source}) differs from the {label} {tr_s:.4g} s "
                f"by {100 * abs(med / tr_s - 1):.0f} %; if the interval is the frame time, analyse with --tr {med:.4g}")

    @property
    def all_warnings(self) -> tuple[str, ...]:
        """The warnings, with the frame interval compared with the header's RepetitionTime."""
        w = self.tr_warning(self.repetition_time_s)
        return self.warnings + ((w,) if w else ())

    def summary(self) -> str:
        """One line without any free-text header field."""
        echoes = f", {len(self.echoes)} echoes" if self.echoes else ""
        return (f"series {self.number}: {self.frames} frame{'s' if self.frames != 1 else ''} x {self.slices} "
                f"slice{'s' if self.slices != 1 else ''}, matrix {self.rows} x {self.columns}{echoes}")

    def as_dict(self) -> dict:
        stats = self.interval_stats()
        return {
            "series_number": self.number, "n_files": self.n_files, "frames": self.frames,
            "slices_per_frame": self.slices, "matrix": [self.rows, self.columns], "mosaic": self.mosaic,
            "dsc_candidate": self.is_dsc, "ordering_key": self.ordering_key, "timing_source": self.timing_source,
            "repetition_time_s": self.repetition_time_s, "echo_time_s": self.echo_time_s,
            "interval_median_s": stats[0] if stats else None, "interval_min_s": stats[1] if stats else None,
            "interval_max_s": stats[2] if stats else None,
            "frame_times_s": [round(t, 6) for t in self.frame_times_s],
            "rescale": [{"slope": s, "intercept": i} for s, i in self.rescale],
            "errors": list(self.errors), "warnings": list(self.all_warnings), "notes": list(self.notes),
            "echoes": [{"echo": k, "echo_number": e.echo_number, "echo_time_s": e.echo_time_s, "n_files": e.n_files}
                       for k, e in enumerate(self.echoes, 1)],
        }


def _unwrap(d: np.ndarray) -> np.ndarray:
    """Frame intervals across midnight (times without a date)."""
    return np.where(d < -43200.0, d + 86400.0, d)


def _dicom_files(folder: Path) -> tuple[list[Path], dict[str, int]]:
    """The regular, non-hidden files under ``folder`` (sub-folders too) and the entries skipped, by
    kind (``io.folder_files``: FIFOs, devices, sockets, links to outside the folder or in a loop,
    symlinked folders, files beyond ``io.MAX_FOLDER_FILE_BYTES``; reading a FIFO or /dev/zero never
    ends). InputError when the folder cannot be listed."""
    try:
        return folder_files(folder)
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the DICOM folder ({exc.strerror or exc}); check its "
                         "permissions") from None


def inspect(folder: Path) -> list[SeriesInfo]:
    """The image series of a DICOM folder (sub-folders included), sorted by series number, each with
    its frames, slices, frame ordering, frame intervals and checks. Reads headers only.

    InputError when the folder is missing or holds no DICOM image; UsageError without pydicom.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: DICOM folder not found; give the folder holding the DICOM files")
    pydicom = _pydicom(folder)
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list] = {}
    numbers: dict[str, int | None] = {}
    timing: dict[str, list] = {}
    secrets: set[str] = set()
    files, skipped = _dicom_files(folder)
    with _quiet_pydicom():
        for path in files:
            ds = _read_header(pydicom, path, InvalidDicomError)
            if ds is None:
                continue
            try:
                images = _images_of(ds, path)
            except Exception:  # noqa: BLE001 - a malformed header is not an image of ours
                images = []
            if not images:
                continue
            secrets |= _identifiers(ds)
            uid = str(ds.get("SeriesInstanceUID") or f"number:{ds.get('SeriesNumber')}")
            groups.setdefault(uid, []).extend(images)
            numbers[uid] = _int(ds.get("SeriesNumber"))
            mosaic_n = None
            if "MOSAIC" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
                elem = ds.get(_MOSAIC_COUNT_TAG)
                mosaic_n = _mosaic_count(elem.value) if elem is not None else -1
            timing.setdefault(uid, []).append((_float(ds.get("RepetitionTime")), _float(ds.get("EchoTime")),
                                               _int(ds.get("NumberOfTemporalPositions")), mosaic_n))
    skip_note = describe_skipped(skipped)
    if not groups:
        if skip_note:
            raise InputError(f"{folder}: no DICOM files (no readable DICOM image; {skip_note}: only regular files "
                             "inside the folder are read); copy the DICOM files themselves into the folder")
        raise InputError(f"{folder}: no DICOM files (no readable DICOM image); give the folder holding the series")
    infos = [_describe_echoes(groups[uid], numbers[uid], timing[uid], frozenset(secrets)) for uid in groups]
    if skip_note:  # no file name: DICOM file names can hold identifiers
        note = (f"{skip_note} in the folder: only regular files inside it of at most "
                f"{MAX_FOLDER_FILE_BYTES / 2 ** 30:g} GiB are read; remove them, or copy linked files into it")
        infos = [dataclasses.replace(i, warnings=i.warnings + (note,)) for i in infos]
    return sorted(infos, key=lambda i: (i.number is None, i.number or 0))


def _read_header(pydicom, path: Path, invalid):
    """The header of one file, or None when it is no DICOM. Files without the 128-byte preamble and
    'DICM' (stored as received by some PACS) are read too: they count only if they hold an image."""
    tags = list(_TAGS) + [_MOSAIC_COUNT_TAG]
    try:  # opened here, checked on the descriptor: a file swapped for a FIFO since the listing cannot block
        fh = open_regular(path)
    except OSError:
        return None
    with fh:
        try:
            return pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=tags)
        except invalid:
            pass
        except Exception:  # noqa: BLE001 - pydicom raises many types for broken files
            return None
        try:
            fh.seek(0)
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=tags, force=True)
        except Exception:  # noqa: BLE001
            return None
    return ds if "SOPClassUID" in ds else None


def _mosaic_count(value: Any) -> int:
    if isinstance(value, (bytes, bytearray)):
        return int.from_bytes(bytes(value[:2]), "little") if len(value) >= 2 else -1
    return _int(value) or -1


def _echo_keys(images: list[_Image]) -> list[Any]:
    """Each image's echo, as dcm2niix splits them: by EchoNumbers when every image has one and they
    differ, else by EchoTime (to 0.01 ms) when that differs; all None for a single echo."""
    numbers = [im.echo_number for im in images]
    if all(n is not None for n in numbers) and len(set(numbers)) > 1:
        return numbers
    tes = [None if im.echo_ms is None else round(im.echo_ms, 2) for im in images]
    if all(t is not None for t in tes) and len(set(tes)) > 1:
        return tes
    return [None] * len(images)


def _describe_echoes(images: list[_Image], number: int | None, timing: list, secrets: frozenset) -> SeriesInfo:
    """A series, described echo by echo when its images hold several echoes (module docstring)."""
    keys = _echo_keys(images)
    if keys[0] is None:
        return _describe(images, number, timing, secrets)
    per = []
    for key in sorted(set(keys)):
        subset = [im for im, k in zip(images, keys) if k == key]
        tes = [im.echo_ms for im in subset if im.echo_ms]
        info = _describe(subset, number, [(t[0], None, t[2], t[3]) for t in timing], secrets)
        per.append(dataclasses.replace(info, echo_time_s=float(np.median(tes)) / 1000.0 if tes else None,
                                       echo_number=subset[0].echo_number))
    per.sort(key=lambda e: (e.echo_time_s is None, e.echo_time_s or 0.0))
    first = per[0]
    errors = [f"echo {k} (TE {e.echo_time_s:.4g} s): {x}" if e.echo_time_s else f"echo {k}: {x}"
              for k, e in enumerate(per, 1) for x in e.errors]
    for k, e in enumerate(per[1:], 2):
        if (e.frames, e.slices, e.rows, e.columns) != (first.frames, first.slices, first.rows, first.columns):
            errors.append(f"echo {k} has {e.frames} frames x {e.slices} slices of {e.rows} x {e.columns}, echo 1 "
                          f"{first.frames} x {first.slices} of {first.rows} x {first.columns}; the export is "
                          "incomplete: re-export the whole series (every echo)")
    tes = [e.echo_time_s for e in per]
    if any(t is None for t in tes) or len({round(t * 1e5) for t in tes}) < len(tes):
        errors.append("the echoes' EchoTime is missing or repeats; re-export the series with its EchoTime per echo")
    warns = list(first.warnings) + [f"echo {k}: {w}" for k, e in enumerate(per[1:], 2) for w in e.warnings
                                    if w not in first.warnings]
    return dataclasses.replace(first, n_files=len({im.path for im in images}), errors=tuple(errors),
                               warnings=tuple(warns), images=tuple(x for e in per for x in e.images),
                               echoes=tuple(per), echo_number=None)


def _describe(images: list[_Image], number: int | None, timing: list, secrets: frozenset) -> SeriesInfo:
    errors: list[str] = []
    warns: list[str] = []
    notes: list[str] = []
    n_files = len({im.path for im in images})
    trs = [t[0] for t in timing if t[0]]
    tes = [t[1] for t in timing if t[1]]
    ntp = {t[2] for t in timing if t[2]}
    mosaic_counts = {t[3] for t in timing if t[3] is not None}
    mosaic = bool(mosaic_counts)
    tr_s = float(np.median(trs)) / 1000.0 if trs else None
    te_s = float(np.median(tes)) / 1000.0 if tes else None

    # geometry: one orientation and matrix; slices by their position along the slice normal
    orient = np.array(images[0].orientation)
    if any(not np.allclose(im.orientation, orient, atol=1e-3) for im in images):
        errors.append("the slice orientation changes within the series; export one acquisition per series")
    shapes = Counter((im.rows, im.columns) for im in images)
    rows, cols = shapes.most_common(1)[0][0]
    if len(shapes) > 1:
        errors.append(f"images of different matrix sizes ({', '.join(f'{r} x {c}' for r, c in shapes)}) in one series")
    normal = np.cross(orient[:3], orient[3:])
    along = np.array([np.dot(im.position, normal) for im in images])
    levels = np.unique(np.round(along, 2))
    slice_of = np.searchsorted(levels, np.round(along, 2))
    n_slices = len(levels)

    key, frame_of = _assign_frames(images, slice_of, n_slices)
    n_frames = int(frame_of.max()) + 1
    grid = np.zeros((n_frames, n_slices), int)
    np.add.at(grid, (frame_of, slice_of), 1)
    if key == "file order":
        errors.append("no TemporalPositionIdentifier, AcquisitionTime, TriggerTime or InstanceNumber orders the "
                      "images in time; re-export the series with its full headers")
    counts = grid.sum(axis=1)
    slices = int(Counter(counts.tolist()).most_common(1)[0][0]) if not mosaic else 1
    if (grid > 1).any():
        f, s = np.argwhere(grid > 1)[0]
        errors.append(f"{int(grid.max())} images at slice {levels[s]:.2f} mm of frame {f + 1} (several echoes or "
                      "image types in one series?); export one echo and image type per series")
    if (grid == 0).any():
        missing = np.argwhere(grid == 0)
        per_slice = grid.sum(axis=0)
        if key in ("TemporalPositionIdentifier", "TemporalPositionIndex"):
            f, s = missing[0]
            errors.append(f"unequal slice counts per frame: frame {f + 1} of {n_frames} has {int(counts[f])} slices, "
                          f"the others {slices} (slice at {levels[s]:.2f} mm missing); the export is incomplete: "
                          "re-export the whole series")
        else:
            s = int(np.argmin(per_slice))
            errors.append(f"unequal slice counts per frame: the slice at {levels[s]:.2f} mm has {int(per_slice[s])} "
                          f"images, the others {int(per_slice.max())} (ordered by {key}); the export is incomplete: "
                          "re-export the whole series")
    if mosaic:
        known = {c for c in mosaic_counts if c > 0}
        slices = known.pop() if len(known) == 1 else 0
        notes.append("Siemens mosaic: frame order not checked against the pixels")
    if len(ntp) == 1 and n_frames > 1 and next(iter(ntp)) != n_frames:
        errors.append(f"NumberOfTemporalPositions says {next(iter(ntp))} but {n_frames} frames are present; the export "
                      "is incomplete: re-export the whole series")

    # rescaling: one slope and intercept for the whole series
    pairs = [(round(im.slope, 9), round(im.intercept, 9)) for im in images]
    rescale = tuple(sorted(set(pairs)))
    if len(rescale) > 1:
        common = Counter(pairs).most_common(1)[0][0]
        odd = sorted({int(frame_of[i]) + 1 for i, p in enumerate(pairs) if p != common})
        ex = next(p for p in pairs if p != common)
        frames = ", ".join(map(str, odd[:5])) + (" ..." if len(odd) > 5 else "")
        errors.append(f"per-frame intensity rescaling: RescaleSlope / RescaleIntercept {ex[0]:g} / {ex[1]:g} in "
                      f"frame{'s' if len(odd) > 1 else ''} {frames}"
                      f" against {common[0]:g} / {common[1]:g} elsewhere, a change of signal that mimics a bolus; "
                      "re-export the series without per-frame scaling (one RescaleSlope for all frames) or with the "
                      "vendor's unscaled values")

    # frame times: the earliest image of each frame, from the first timing field that varies
    frame_times: tuple[float, ...] = ()
    source = None
    for name, attr in (("AcquisitionTime", "acq_s"), ("TriggerTime", "trigger_s")):
        vals = [getattr(im, attr) for im in images]
        if n_frames > 1 and all(v is not None for v in vals) and len(set(vals)) > 1:
            t = np.full(n_frames, np.inf)
            np.minimum.at(t, frame_of, np.asarray(vals, dtype=np.float64))
            if len(set(t.tolist())) > 1:
                frame_times, source = tuple((t - t[0]).tolist()), name
                break
    if n_frames > 1 and source is None:
        warns.append("no AcquisitionTime or TriggerTime varies between frames: the frame interval cannot be "
                     "checked against the TR")
    if source is not None:
        d = _unwrap(np.diff(frame_times))
        med = float(np.median(d))
        if (d <= 0).any() or med <= 0:
            k = int(np.argmax(d <= 0))
            errors.append(f"frame {k + 2} starts no later than frame {k + 1} ({source}, ordered by {key}): the time "
                          "axis is unusable; re-export the series with its timing")
        else:
            dev = np.abs(d / med - 1.0)
            if dev.max() > INTERVAL_UNUSABLE:
                k = int(np.argmax(dev))
                errors.append(f"irregular frame intervals ({source}): {d.min():.4g}-{d.max():.4g} s around a median of "
                              f"{med:.4g} s (frame {k + 1} to {k + 2}: {d[k]:.4g} s; a frame missing or doubled?): the "
                              "time axis is unusable; re-export the complete series")
            elif dev.max() > INTERVAL_JITTER:
                warns.append(f"frame intervals vary ({source}): {d.min():.4g}-{d.max():.4g} s around a median of "
                             f"{med:.4g} s (more than {100 * INTERVAL_JITTER:.0f} %)")
    return SeriesInfo(
        number=number, n_files=n_files, frames=n_frames, slices=slices, rows=rows, columns=cols, mosaic=mosaic,
        ordering_key=key, timing_source=source, frame_times_s=frame_times, repetition_time_s=tr_s, echo_time_s=te_s,
        rescale=rescale, errors=tuple(errors), warnings=tuple(warns), notes=tuple(notes),
        images=tuple((im, int(f), int(s)) for im, f, s in zip(images, frame_of, slice_of)), secrets=secrets,
    )


def _assign_frames(images: list[_Image], slice_of: np.ndarray, n_slices: int) -> tuple[str, np.ndarray]:
    """The header field that orders the frames and each image's frame index (0-based)."""
    per_slice = np.bincount(slice_of, minlength=n_slices)
    if per_slice.max() <= 1:
        return "single frame", np.zeros(len(images), int)
    temporal = [im.temporal for im in images]
    if all(v is not None for v in temporal) and len(set(temporal)) > 1:
        levels = sorted(set(temporal))
        name = "TemporalPositionIndex" if images[0].frame_no is not None else "TemporalPositionIdentifier"
        return name, np.searchsorted(levels, temporal)
    for name, attr in (("AcquisitionTime", "acq_s"), ("TriggerTime", "trigger_s"), ("InstanceNumber", "instance")):
        vals = [getattr(im, attr) for im in images]
        if any(v is None for v in vals):
            continue
        if all(len({vals[i] for i in np.flatnonzero(slice_of == s)}) == per_slice[s] for s in range(n_slices)):
            return name, _rank_within(slice_of, np.asarray(vals, dtype=np.float64))
    return "file order", _rank_within(slice_of, np.arange(len(images), dtype=np.float64))


def _rank_within(slice_of: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values), int)
    for s in np.unique(slice_of):
        idx = np.flatnonzero(slice_of == s)
        out[idx[np.argsort(values[idx], kind="stable")]] = np.arange(idx.size)
    return out


def select_series(infos: list[SeriesInfo], folder: Path, number: int | None = None) -> SeriesInfo:
    """The DSC series of a folder: ``number`` if given, else the one series with >= MIN_FRAMES frames.
    UsageError when several qualify (listing them) or ``number`` is absent; InputError when none does."""
    listing = "; ".join(i.summary() for i in infos)
    if number is not None:
        hits = [i for i in infos if i.number == number]
        if not hits:
            raise UsageError(f"{folder}: no series {number} (found {listing}); pass --series with one of these numbers")
        if len(hits) > 1:
            raise UsageError(f"{folder}: {len(hits)} series are numbered {number}; put each in a folder of its own")
        return hits[0]
    dsc = [i for i in infos if i.is_dsc]
    if len(dsc) == 1:
        return dsc[0]
    if not dsc:
        raise InputError(f"{folder}: no DSC series (4-D, at least {MIN_FRAMES} frames) among {listing}; "
                         "give the folder of the perfusion series")
    raise UsageError(f"{folder}: {len(dsc)} DSC-like series ({'; '.join(i.summary() for i in dsc)}); "
                     "choose one with --series N")


def check_series(info: SeriesInfo, folder: Path) -> list[str]:
    """Raise InputError for the first check error or a series with too few frames; return the other
    warnings (the frame interval against the TR is judged after conversion: read_dicom_series)."""
    if info.errors:
        more = len(info.errors) - 1
        raise InputError(f"{folder}: series {info.number}: {info.errors[0]}"
                         + (f" ({more} more problem{'s' if more > 1 else ''}: perfusion dicom-inspect {folder})"
                            if more else ""))
    if not info.is_dsc:
        raise InputError(f"{folder}: series {info.number} has {info.frames} frame{'s' if info.frames != 1 else ''}; "
                         f"a DSC series needs at least {MIN_FRAMES} (baseline, bolus, tail): choose another --series")
    return [f"{folder}: series {info.number}: {x}" for x in info.warnings]


# ------------------------------------------------------------------------------------- conversion


def find_dcm2niix() -> str:
    """Path of the dcm2niix binary: $PERFUSION_DCM2NIIX, else the dcm2niix wheel's, else the one beside
    this Python, else on PATH. UsageError when there is none."""
    env = os.environ.get(DCM2NIIX_ENV)
    if env:
        if Path(env).is_file() and os.access(env, os.X_OK):
            return env
        raise UsageError(f"{env}: dcm2niix not found there ({DCM2NIIX_ENV}); unset {DCM2NIIX_ENV} or point it at "
                         "the dcm2niix binary (reinstall: make install)")
    try:
        import dcm2niix

        wheel = Path(dcm2niix.bin_path)
        if wheel.is_file() and os.access(wheel, os.X_OK):
            return str(wheel)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which("dcm2niix")
    if found:
        return found
    raise UsageError("dcm2niix not found (the dcm2niix package ships it); reinstall: make install")


def _instance_numbers(info: SeriesInfo) -> dict[Path, int] | None:
    """None when the InstanceNumbers already follow the acquisition (frame by frame, or slice by slice);
    else new numbers, frame-major in our order. dcm2niix sorts the images of a volume, and in part the
    volumes, by InstanceNumber: numbers out of acquisition order scramble its output. A multi-echo series
    is renumbered echo by echo (dcm2niix splits the echoes first)."""
    if info.echoes:
        if all(_instance_numbers(e) is None for e in info.echoes):
            return None
        out: dict[Path, int] = {}
        for k, e in enumerate(info.echoes):
            per = max(s for _, _, s in e.images) + 1
            out.update({im.path: k * e.frames * per + f * per + s + 1 for im, f, s in e.images})
        return out
    singles = [(im, f, s) for im, f, s in info.images if im.frame_no is None]
    if len(singles) != len(info.images) or info.mosaic or info.frames < 2:
        return None
    n = np.array([im.instance if im.instance is not None else -1 for im, _, _ in singles])
    for key in (lambda x: (x[1], x[2]), lambda x: (x[2], x[1])):  # frame-major, slice-major
        order = sorted(range(len(singles)), key=lambda i: key(singles[i]))
        if (n >= 0).all() and (np.diff(n[order]) > 0).all():
            return None
    slices = max(s for _, _, s in singles) + 1
    return {im.path: f * slices + s + 1 for im, f, s in singles}


def _last_line(text: str, secrets) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return scrub(lines[-1], secrets)[:200] if lines else "no message"


def _converted_bytes(info: SeriesInfo) -> int:
    """Bytes of dcm2niix's uncompressed image of ``info`` (16-bit voxels) plus 1 MiB for its header,
    sidecar and compression buffers: what the temporary folder must hold at most."""
    return info.rows * info.columns * max(info.slices, 1) * max(info.frames, 1) * 2 + (1 << 20)


def _tmp_has_room(folder: Path, n_bytes: int) -> bool:
    """Whether ``n_bytes`` can be written into ``folder`` now: a probe file is written and removed
    (free space alone misses quotas and file-size limits). Only after a conversion failed."""
    probe = folder / ".space-probe"
    block = bytes(1 << 20)
    try:
        with open(probe, "wb") as fh:
            left = n_bytes
            while left > 0:
                fh.write(block[:min(left, len(block))])
                left -= len(block)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc.errno not in WRITE_REFUSED_ERRNOS
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return True


def _tmp_full(work: Path, what: str) -> OutputError:
    """The one-line error of a temporary folder that cannot take the conversion (exit 5)."""
    return OutputError(f"{work.parent}: the temporary folder cannot hold the DICOM conversion ({what}; disk full, "
                       "over quota or beyond the file-size limit); free space there or set TMPDIR to a folder on "
                       "another disk")


def _run_dcm2niix(info: SeriesInfo, folder: Path, work: Path) -> list[Path]:
    """Convert the files of ``info`` in ``work``; return the NIfTI written, one per echo in the order of
    ``info.echoes`` (matched by their sidecar's EchoTime). Errors by exit code."""
    binary = find_dcm2niix()
    src, out = work / "in", work / "out"
    src.mkdir()
    out.mkdir()
    files = sorted({im.path for im, _, _ in info.images})
    numbers = _instance_numbers(info)
    if numbers is not None:
        pydicom = _pydicom(folder)
    for i, path in enumerate(files, 1):  # neutral names: dcm2niix never sees the original ones
        link = src / f"{i:06d}.dcm"
        if numbers is not None:  # a private copy numbered in acquisition order
            with _quiet_pydicom():
                ds = pydicom.dcmread(path)
                ds.InstanceNumber = numbers[path]
                ds.save_as(link)
            continue
        try:
            link.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, link)
    try:
        proc = subprocess.run([binary, *DCM2NIIX_OPTIONS, "-o", str(out), str(src)], capture_output=True,
                              text=True, errors="replace", check=False)
    except OSError as exc:
        raise UsageError(f"{binary}: dcm2niix cannot run ({exc.strerror or exc}); reinstall: make install") from None
    code = proc.returncode
    last = _last_line(proc.stderr if proc.stderr.strip() else proc.stdout, info.secrets).replace(str(work), "<tmp>")
    where = f"{folder}: series {info.number}"
    if code < 0 and -code == getattr(signal, "SIGXFSZ", -1):
        raise _tmp_full(work, "the file-size limit (ulimit -f) stopped dcm2niix's output")
    if code != 0 and code != 2 and not _tmp_has_room(out, _converted_bytes(info)):
        # dcm2niix exits 1 ("generic") on a full disk and removes its partial file: not the series' fault
        raise _tmp_full(work, f"dcm2niix could not write its output (exit {code})")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise InputError(f"{where}: dcm2niix was killed ({name}); check the files with perfusion dicom-inspect")
    if code == 2:
        raise InputError(f"{folder}: no DICOM files in {folder} (dcm2niix found none); "
                         "give the folder holding the series")
    if code in (6, 7):
        raise OutputError(f"{work}: dcm2niix cannot write its temporary output ({last}); check TMPDIR's free space "
                          "and permissions")
    if code in (1, 4, 5, 8, 9, 10):
        raise InputError(f"{where}: dcm2niix failed (exit {code}: {last}); re-export the series from PACS")
    if code != 0:
        raise PerfusionError(f"{where}: dcm2niix exited {code} ({last}); please report it with the dcm2niix version")
    written = sorted(out.glob("*.nii.gz")) + sorted(out.glob("*.nii"))
    if not written and not _tmp_has_room(out, _converted_bytes(info)):
        raise _tmp_full(work, "dcm2niix wrote no image")
    if not written:
        raise InputError(f"{where}: dcm2niix wrote no image ({last}); check the series with perfusion dicom-inspect")
    n_echoes = max(1, len(info.echoes))
    if len(written) != n_echoes:
        what = f"{n_echoes} echoes" if n_echoes > 1 else "one image"
        raise InputError(f"{where}: dcm2niix split the series into {len(written)} images, the headers hold {what} "
                         "(image types or orientations mixed?); export one image type per series")
    if n_echoes == 1:
        return written
    by_echo: list[Path | None] = [None] * n_echoes
    for path in written:
        te = _read_raw_sidecar(path.parent / (path.name.split(".nii")[0] + ".json")).get("EchoTime")
        hits = [k for k, e in enumerate(info.echoes) if isinstance(te, (int, float)) and e.echo_time_s is not None
                and abs(te - e.echo_time_s) < 5e-5]
        if len(hits) != 1 or by_echo[hits[0]] is not None:
            raise InputError(f"{where}: dcm2niix's echo images do not match the headers' echo times "
                             f"({', '.join(f'{e.echo_time_s:g}' for e in info.echoes)} s); check the series with "
                             "perfusion dicom-inspect")
        by_echo[hits[0]] = path
    return by_echo  # type: ignore[return-value]


@dataclass(frozen=True)
class DicomSeries:
    """A converted DICOM series: ``data`` signal (a.u., float32, x y z t, rescaling applied), its
    affine (dcm2niix's grid), the whitelisted sidecar (times in s) and the header description."""

    data: np.ndarray
    affine: np.ndarray
    sidecar: dict[str, Any]
    info: SeriesInfo
    tr_s: float | None = None  # the frame time: the user's --tr, else dcm2niix's RepetitionTime, else the header's
    tr_source: str = ""
    warnings: tuple[str, ...] = ()
    echo: int | None = None  # 1, 2, ... for the echoes of a multi-echo series (TE order); None for one echo
    n_echoes: int = 1


def whitelist_sidecar(raw: dict[str, Any], secrets=frozenset()) -> dict[str, Any]:
    """Only the SIDECAR_WHITELIST keys of a dcm2niix sidecar, with coded-looking values: numbers,
    short strings of safe characters, lists of those; anything holding an identifier is dropped."""
    out: dict[str, Any] = {}
    lowered = [s.lower() for s in secrets]

    def ok(v) -> bool:
        if isinstance(v, bool):
            return False
        if isinstance(v, (int, float)):
            return bool(np.isfinite(v))
        if isinstance(v, str):
            return bool(_SAFE_TEXT.match(v)) and not any(s in v.lower() for s in lowered)
        return False

    for key in SIDECAR_WHITELIST:
        if key not in raw:
            continue
        v = raw[key]
        if isinstance(v, list) and v and all(ok(x) for x in v):
            out[key] = v
        elif ok(v):
            out[key] = v
    return out


def read_dicom_series(folder: Path, *, series: int | None = None, tr_s: float | None = None) -> DicomSeries:
    """The single-echo DSC series of ``folder`` (read_dicom_echoes); InputError for a multi-echo series."""
    echoes = read_dicom_echoes(folder, series=series, tr_s=tr_s)
    if len(echoes) > 1:
        raise InputError(f"{folder}: series {echoes[0].info.number} holds {len(echoes)} echoes; read it with "
                         "read_dicom_echoes")
    return echoes[0]


def read_dicom_echoes(folder: Path, *, series: int | None = None, tr_s: float | None = None) -> list[DicomSeries]:
    """Inspect ``folder``, pick the DSC series (``series`` = its SeriesNumber when several), check it,
    convert it with dcm2niix and verify dcm2niix's frame order on the pixels; one DicomSeries per echo
    (TE order; one for a single-echo series). Warnings of the whole series are on the first echo.

    The frame time (``DicomSeries.tr_s``, s) is ``tr_s`` when the user gives it, else dcm2niix's
    RepetitionTime: the header's, except where dcm2niix found the acquisition times further apart
    (then its estimate; the header value is its RepetitionTimeExcitation). Warnings: the median frame
    interval against that TR, and a TR that is not the header's."""
    folder = Path(folder)
    infos = inspect(folder)
    info = select_series(infos, folder, series)
    warns = check_series(info, folder)
    nib = _nibabel()
    try:
        work = Path(tempfile.mkdtemp(prefix="perfusion-dicom-"))
    except OSError as exc:
        raise OutputError(f"{tempfile.gettempdir()}: cannot make a temporary folder for the DICOM conversion "
                          f"({exc.strerror or exc}); free space there or set TMPDIR to a writable folder") from None
    loaded = []
    try:
        for nifti in _run_dcm2niix(info, folder, work):
            raw_sidecar_path = nifti.parent / (nifti.name.split(".nii")[0] + ".json")
            raw = _read_raw_sidecar(raw_sidecar_path)
            try:
                img = nib.load(str(nifti))
                from perfusion.io import signal_float32

                pixels = np.asarray(img.dataobj)
                affine = np.asarray(img.affine, dtype=np.float64)
            except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a truncated file
                if isinstance(exc, MemoryError):
                    raise
                if not _tmp_has_room(work, _converted_bytes(info)):
                    raise _tmp_full(work, "dcm2niix's image is truncated") from None
                raise InputError(f"{folder}: series {info.number}: dcm2niix wrote an unreadable image "
                                 f"({type(exc).__name__}); check the series with perfusion dicom-inspect") from None
            data, scaled = signal_float32(pixels, where=f"{folder}: series {info.number}",
                                          nonfinite="the converted series holds NaN or Inf; re-export the series")
            loaded.append((data, affine, raw, [scaled] if scaled else []))
    except OSError as exc:  # the private copies, links or probes: a full or read-only temporary disk
        if exc.errno in WRITE_REFUSED_ERRNOS:
            raise _tmp_full(work, exc.strerror or "a write failed") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not info.echoes:
        data, affine, raw, extra = loaded[0]
        return [_checked_echo(info, folder, data, affine, raw, warns + extra, tr_s=tr_s)]
    out = []
    for k, (echo, (data, affine, raw, extra)) in enumerate(zip(info.echoes, loaded), 1):
        conv = _checked_echo(dataclasses.replace(echo, number=info.number), folder, data, affine, raw,
                             (warns if k == 1 else []) + extra, tr_s=tr_s, echo=k)
        out.append(dataclasses.replace(conv, info=info, echo=k, n_echoes=len(info.echoes)))
    return out


def _checked_echo(info: SeriesInfo, folder: Path, data: np.ndarray, affine: np.ndarray, raw: dict[str, Any],
                  warns: list[str], *, tr_s: float | None, echo: int | None = None) -> DicomSeries:
    """One converted image checked against the headers of ``info`` (an echo's, for a multi-echo series),
    with its frame time."""
    where = f"{folder}: series {info.number}" + (f" echo {echo}" if echo else "")
    if data.ndim != 4 or data.shape[3] != info.frames:
        raise InputError(f"{where}: dcm2niix made an image of shape {data.shape}, not the {info.frames} frames of the "
                         "headers; check the series with perfusion dicom-inspect")
    if not info.mosaic and data.shape[2] != info.slices:
        raise InputError(f"{where}: dcm2niix made {data.shape[2]} slices, the headers hold {info.slices}; "
                         "check the series with perfusion dicom-inspect")
    verify_note = None if info.mosaic else _verify_order(info, folder, data, affine)
    if verify_note:
        warns.append(f"{where}: {verify_note}")
    sidecar = whitelist_sidecar(raw, info.secrets)
    header = info.repetition_time_s
    side_tr = sidecar.get("RepetitionTime")
    side_tr = float(side_tr) if isinstance(side_tr, (int, float)) and side_tr > 0 else None
    if tr_s is not None:
        tr_used, tr_source = tr_s, "option --tr"
    elif side_tr is not None and header and abs(side_tr / header - 1) > INTERVAL_TR_TOLERANCE:
        tr_used = side_tr
        tr_source = f"DICOM acquisition times (dcm2niix sidecar RepetitionTime; header RepetitionTime {header:.4g} s)"
        warns.append(f"{where}: the frame time {side_tr:.4g} s is dcm2niix's estimate from the acquisition times, not "
                     f"the header's RepetitionTime {header:.4g} s ({100 * abs(side_tr / header - 1):.0f} % apart); "
                     f"if the header is right, analyse with --tr {header:.4g}")
    elif side_tr is not None:
        tr_used, tr_source = side_tr, "DICOM (dcm2niix sidecar RepetitionTime)"
    else:
        tr_used, tr_source = header, "DICOM header RepetitionTime (ms, converted)"
    w = info.tr_warning(tr_used, label="TR used")
    if w:
        warns.append(f"{where}: {w}")
    return DicomSeries(data=data, affine=affine, sidecar=sidecar, info=info, tr_s=tr_used, tr_source=tr_source,
                       warnings=tuple(warns))


def _read_raw_sidecar(path: Path) -> dict[str, Any]:
    """dcm2niix's sidecar; {} when absent or unreadable. Some dcm2niix versions leave a trailing comma
    in a list (``"FrameTimesStart": [0,]``): it is removed before parsing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    for candidate in (text, re.sub(r",(\s*[\]}])", r"\1", text)):
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        return obj if isinstance(obj, dict) else {}
    return {}


def _nibabel():
    import nibabel

    return nibabel


def _verify_order(info: SeriesInfo, folder: Path, data: np.ndarray, affine: np.ndarray) -> str | None:
    """Compare the converted data with the DICOM pixels of the middle slice in every frame and of every
    slice in the first frame, placed by their own geometry. InputError on a mismatch; a note (str) when
    the pixels cannot be decoded; None when all agree."""
    pydicom = _pydicom(folder)
    if not abs(np.linalg.det(affine[:3, :3])) > 1e-6:
        raise InputError(f"{folder}: series {info.number}: dcm2niix could not place the slices (a degenerate "
                         "affine); check the series with perfusion dicom-inspect and re-export it")
    mid = info.slices // 2
    chosen = [(im, f, s) for im, f, s in info.images if s == mid or f == 0]
    inv = np.linalg.inv(affine)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    cache: dict[Path, Any] = {}
    with _quiet_pydicom():
        for im, f, s in sorted(chosen, key=lambda x: (x[1], x[2])):
            try:
                if im.path not in cache:
                    cache.clear()
                    cache[im.path] = pydicom.dcmread(im.path).pixel_array
                pixels = cache[im.path]
            except Exception as exc:  # noqa: BLE001 - decoders raise many types (missing handler, corrupt data)
                reason = type(exc).__name__
                return (f"dcm2niix's frame order not verified against the DICOM pixels (pydicom cannot decode them: "
                        f"{reason}); check the time curves in report.html")
            if im.frame_no is not None:
                pixels = pixels[im.frame_no]
            if pixels.shape != (im.rows, im.columns):
                return "dcm2niix's frame order not verified (unexpected pixel array shape)"
            row, col = np.array(im.orientation[:3]), np.array(im.orientation[3:])
            origin = np.asarray(im.position)

            def voxel(r, c):
                world = (origin + row * im.spacing[1] * c + col * im.spacing[0] * r) * lps_to_ras
                return (inv @ np.append(world, 1.0))[:3]

            v0 = voxel(0, 0)
            dc, dr = voxel(0, 1) - v0, voxel(1, 0) - v0
            rr, cc = np.mgrid[0:im.rows, 0:im.columns]
            idx = v0 + rr[..., None] * dr + cc[..., None] * dc
            rounded = np.rint(idx).astype(int)
            inside = all((rounded[..., a] >= 0).all() and (rounded[..., a] < data.shape[a]).all() for a in range(3))
            if np.abs(idx - rounded).max() > 0.05 or not inside:
                raise InputError(f"{folder}: series {info.number}: dcm2niix's grid does not hold slice {s + 1} of "
                                 f"frame {f + 1} where its header places it; check the series with "
                                 "perfusion dicom-inspect")
            got = data[rounded[..., 0], rounded[..., 1], rounded[..., 2], f]
            want = pixels.astype(np.float64) * im.slope + im.intercept
            if not np.allclose(got, want, rtol=1e-4, atol=1e-3 * max(abs(im.slope), 1e-6) + 1e-3):
                raise InputError(f"{folder}: series {info.number}: dcm2niix put the images in another order than the "
                                 f"acquisition ({info.ordering_key}; first difference at frame {f + 1}, "
                                 f"slice {s + 1}); "
                                 "re-export the series with TemporalPositionIdentifier or with instance numbers in "
                                 "acquisition order")
    return None


def load_dicom_series(folder: Path, *, te: float | None = None, tr: float | None = None,
                      series: int | None = None) -> Series:
    """A DICOM folder as an ``io.Series``: TE/TR in s from ``te`` / ``tr`` if given, else from the DICOM
    header (dcm2niix's sidecar, which converts ms to s). Check warnings are issued with
    ``warnings.warn``; ``Series.path`` is the folder, ``sidecar`` the whitelisted keys only. A
    multi-echo series is combined (``echoes.combine_echoes``); each echo is named ``echo-<k>`` (never
    the folder's name) and ``te`` is refused for it (each echo has its own TE)."""
    folder = Path(folder)
    tr_given = (_check_time(tr, name="TR", flag="--tr", limit=MAX_TR_S, source="--tr", path=folder)
                if tr is not None else None)
    convs = read_dicom_echoes(folder, series=series, tr_s=tr_given)
    if len(convs) > 1 and te is not None:
        tes = ", ".join(f"{c.info.echoes[c.echo - 1].echo_time_s:g}" for c in convs)
        raise UsageError(f"{folder}: series {convs[0].info.number} holds {len(convs)} echoes (TE {tes} s), each with "
                         "its own TE; leave --te out")
    for conv in convs:
        for w in conv.warnings:
            warnings.warn(w, stacklevel=2)
    loaded = [_echo_series(conv, folder, te=te) for conv in convs]
    if len(loaded) == 1:
        return loaded[0]
    from perfusion.quantify.echoes import combine_echoes

    return dataclasses.replace(combine_echoes(loaded), path=folder)


def _echo_series(conv: DicomSeries, folder: Path, *, te: float | None) -> Series:
    side = conv.sidecar
    if te is not None:
        te_s = _check_time(te, name="TE", flag="--te", limit=MAX_TE_S, source="--te", path=folder)
        te_source = "option --te"
    elif "EchoTime" in side:
        te_s = _check_time(side["EchoTime"], name="EchoTime", flag="--te", limit=MAX_TE_S,
                           source="the DICOM header", path=folder)
        te_source = "DICOM (dcm2niix sidecar EchoTime)"
    elif conv.info.echo_time_s is not None and not conv.echo:  # dcm2niix's sidecar unreadable: the header (ms -> s)
        te_s = _check_time(conv.info.echo_time_s, name="EchoTime", flag="--te", limit=MAX_TE_S,
                           source="the DICOM header", path=folder)
        te_source = "DICOM header EchoTime (ms, converted)"
    elif conv.echo and conv.info.echoes[conv.echo - 1].echo_time_s is not None:
        te_s = _check_time(conv.info.echoes[conv.echo - 1].echo_time_s, name="EchoTime", flag="--te",
                           limit=MAX_TE_S, source="the DICOM header", path=folder)
        te_source = "DICOM header EchoTime (ms, converted)"
    else:
        raise InputError(f"{folder}: echo time unknown (no EchoTime in the DICOM header); pass --te SECONDS "
                         "(e.g. --te 0.03)")
    if conv.tr_s is not None:
        tr_s = _check_time(conv.tr_s, name="RepetitionTime", flag="--tr", limit=MAX_TR_S,
                           source="the DICOM header", path=folder)
        tr_source = conv.tr_source
    else:
        raise InputError(f"{folder}: repetition time unknown (no RepetitionTime in the DICOM header); "
                         "pass --tr SECONDS")
    path = folder / f"echo-{conv.echo}" if conv.echo else folder  # an echo's name: never the folder's
    return Series(data=conv.data, affine=conv.affine, path=path, te=te_s, tr=tr_s, te_source=te_source,
                  tr_source=tr_source, sidecar_path=None, sidecar=dict(side))
