"""DICOM headers: a folder's series, frames and slices, read with pydicom and checked before conversion.

pydicom reads the headers only (``stop_before_pixels``) to sort the files into series, frames and
slices (:func:`inspect`); it is imported lazily, and without it a DICOM input is a UsageError saying
``pip install pydicom`` (the checks are not optional). Identifying header values (patient name and
its parts, ID, birth date, accession number, institution, physicians) are read only to scrub
dcm2niix's messages (:func:`scrub`); no public field of :class:`SeriesInfo` holds one.

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
  than :data:`INTERVAL_TR_TOLERANCE` (5 %) is a warning naming ``--tr``.

Multi-echo series (dual-echo DSC): the images of one series whose EchoNumbers (0018,0086), else
EchoTime, take several values are the echoes of one acquisition. Each echo is sorted and checked as a
series of its own (errors named "echo N: ..."), and all echoes must have the same frames, slices
and matrix.

Series selection (:func:`select_series`): the series with at least ``io.MIN_FRAMES`` frames (4-D) is
the DSC series; with several, a UsageError lists them (number, frames, slices, matrix: no
description, which can hold names) and asks for ``--series N``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from perfusion.errors import InputError, UsageError
from perfusion.io.files import MAX_FOLDER_FILE_BYTES, describe_skipped, folder_files, open_regular
from perfusion.io.series import MIN_FRAMES

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


def import_pydicom(folder: Path):
    """The pydicom module, imported on first use; UsageError (naming ``folder``) without it."""
    try:
        import pydicom
    except ImportError:
        raise UsageError(f"{folder}: reading DICOM headers needs pydicom; pip install pydicom "
                         "(make install does)") from None
    return pydicom


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
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
                # casts: ImagePositionPatient holds 3 values, PixelSpacing 2 (their DICOM VM; not checked here)
                path=path, frame_no=i,
                position=cast("tuple[float, float, float]", tuple(float(v) for v in plane.ImagePositionPatient)),
                orientation=tuple(float(v) for v in orient.ImageOrientationPatient),
                spacing=(cast("tuple[float, float]", tuple(float(v) for v in meas.PixelSpacing))
                         if meas is not None and "PixelSpacing" in meas else (1.0, 1.0)),
                rows=rows, columns=cols,
                temporal=_int(content.get("TemporalPositionIndex")) if content is not None else None,
                acq_s=_datetime_s(content.get("FrameAcquisitionDateTime")) if content is not None else None,
                trigger_s=None, instance=_int(ds.get("InstanceNumber")),
                slope=_float(pvt.get("RescaleSlope")) or 1.0 if pvt is not None else 1.0,
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
        path=path, frame_no=None, position=(float(ipp[0]), float(ipp[1]), float(ipp[2])),
        orientation=tuple(float(v) for v in iop),
        spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else (1.0, 1.0),
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
    pydicom = import_pydicom(folder)
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list] = {}
    numbers: dict[str, int | None] = {}
    timing: dict[str, list] = {}
    secrets: set[str] = set()
    files, skipped = _dicom_files(folder)
    with quiet_pydicom():
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
        subset = [im for im, k in zip(images, keys, strict=True) if k == key]
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
    echo_times = [e.echo_time_s for e in per if e.echo_time_s is not None]
    if len(echo_times) < len(per) or len({round(t * 1e5) for t in echo_times}) < len(echo_times):
        errors.append("the echoes' EchoTime is missing or repeats; re-export the series with its EchoTime per echo")
    warns = list(first.warnings) + [f"echo {k}: {w}" for k, e in enumerate(per[1:], 2) for w in e.warnings
                                    if w not in first.warnings]
    return dataclasses.replace(first, n_files=len({im.path for im in images}), errors=tuple(errors),
                               warnings=tuple(warns), images=tuple(x for e in per for x in e.images),
                               echoes=tuple(per), echo_number=None)


def _describe(images: list[_Image], number: int | None, timing: list, secrets: frozenset) -> SeriesInfo:
    """One series (or one echo of it) as its headers describe it, checked in turn: geometry, frames,
    rescaling, frame timing (module docstring). ``timing``: per file, (RepetitionTime ms, EchoTime ms,
    NumberOfTemporalPositions, mosaic image count or None)."""
    errors: list[str] = []
    warns: list[str] = []
    notes: list[str] = []
    trs = [t[0] for t in timing if t[0]]
    tes = [t[1] for t in timing if t[1]]
    ntp = {t[2] for t in timing if t[2]}
    mosaic_counts = {t[3] for t in timing if t[3] is not None}
    rows, cols, levels, slice_of = _geometry(images, errors)
    key, frame_of = _assign_frames(images, slice_of, len(levels))
    n_frames = int(frame_of.max()) + 1
    slices = _check_frames(key, frame_of, slice_of, levels, errors, mosaic=bool(mosaic_counts))
    if mosaic_counts:
        known = {c for c in mosaic_counts if c > 0}
        slices = known.pop() if len(known) == 1 else 0
        notes.append("Siemens mosaic: frame order not checked against the pixels")
    if len(ntp) == 1 and n_frames > 1 and next(iter(ntp)) != n_frames:
        errors.append(f"NumberOfTemporalPositions says {next(iter(ntp))} but {n_frames} frames are present; the export "
                      "is incomplete: re-export the whole series")
    rescale = _check_rescale(images, frame_of, errors)
    frame_times, source = _frame_times(images, frame_of, n_frames, key, errors, warns)
    return SeriesInfo(
        number=number, n_files=len({im.path for im in images}), frames=n_frames, slices=slices, rows=rows,
        columns=cols, mosaic=bool(mosaic_counts), ordering_key=key, timing_source=source, frame_times_s=frame_times,
        repetition_time_s=float(np.median(trs)) / 1000.0 if trs else None,
        echo_time_s=float(np.median(tes)) / 1000.0 if tes else None,
        rescale=rescale, errors=tuple(errors), warnings=tuple(warns), notes=tuple(notes),
        images=tuple((im, int(f), int(s)) for im, f, s in zip(images, frame_of, slice_of, strict=True)),
        secrets=secrets,
    )


def _geometry(images: list[_Image], errors: list[str]) -> tuple[int, int, np.ndarray, np.ndarray]:
    """The matrix (rows, columns; the most common), the slice positions along the slice normal (mm,
    sorted) and each image's slice index. Appends to ``errors`` when the orientation or matrix changes."""
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
    return rows, cols, levels, np.searchsorted(levels, np.round(along, 2))


def _check_frames(key: str, frame_of: np.ndarray, slice_of: np.ndarray, levels: np.ndarray, errors: list[str], *,
                  mosaic: bool) -> int:
    """Slices per frame (the most common count; 1 for a mosaic) of the images placed by frame and slice;
    appends to ``errors`` when no header field orders the frames, an image is doubled or one is missing."""
    n_frames = int(frame_of.max()) + 1
    grid = np.zeros((n_frames, len(levels)), int)
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
    return slices


def _check_rescale(images: list[_Image], frame_of: np.ndarray, errors: list[str]) -> tuple[tuple[float, float], ...]:
    """The distinct (RescaleSlope, RescaleIntercept) pairs; appends to ``errors`` when there are several
    (rescaling that changes between frames changes the signal as a bolus does)."""
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
    return rescale


def _frame_times(images: list[_Image], frame_of: np.ndarray, n_frames: int, key: str, errors: list[str],
                 warns: list[str]) -> tuple[tuple[float, ...], str | None]:
    """Each frame's start (s, relative to the first: its earliest image) from the first timing field
    that varies between frames, and that field's name; ((), None) without one (a warning). The
    intervals are checked (_check_intervals)."""
    for name, attr in (("AcquisitionTime", "acq_s"), ("TriggerTime", "trigger_s")):
        vals = [getattr(im, attr) for im in images]
        if n_frames > 1 and all(v is not None for v in vals) and len(set(vals)) > 1:
            t = np.full(n_frames, np.inf)
            np.minimum.at(t, frame_of, np.asarray(vals, dtype=np.float64))
            if len(set(t.tolist())) > 1:
                frame_times = tuple((t - t[0]).tolist())
                _check_intervals(frame_times, name, key, errors, warns)
                return frame_times, name
    if n_frames > 1:
        warns.append("no AcquisitionTime or TriggerTime varies between frames: the frame interval cannot be "
                     "checked against the TR")
    return (), None


def _check_intervals(frame_times: tuple[float, ...], source: str, key: str, errors: list[str],
                     warns: list[str]) -> None:
    """Frame intervals that do not increase, or depart from their median by more than INTERVAL_UNUSABLE,
    make the time axis unusable (``errors``); beyond INTERVAL_JITTER they are a warning."""
    d = _unwrap(np.diff(frame_times))
    med = float(np.median(d))
    if (d <= 0).any() or med <= 0:
        k = int(np.argmax(d <= 0))
        errors.append(f"frame {k + 2} starts no later than frame {k + 1} ({source}, ordered by {key}): the time "
                      "axis is unusable; re-export the series with its timing")
        return
    dev = np.abs(d / med - 1.0)
    if dev.max() > INTERVAL_UNUSABLE:
        k = int(np.argmax(dev))
        errors.append(f"irregular frame intervals ({source}): {d.min():.4g}-{d.max():.4g} s around a median of "
                      f"{med:.4g} s (frame {k + 1} to {k + 2}: {d[k]:.4g} s; a frame missing or doubled?): the "
                      "time axis is unusable; re-export the complete series")
    elif dev.max() > INTERVAL_JITTER:
        warns.append(f"frame intervals vary ({source}): {d.min():.4g}-{d.max():.4g} s around a median of "
                     f"{med:.4g} s (more than {100 * INTERVAL_JITTER:.0f} %)")


def _assign_frames(images: list[_Image], slice_of: np.ndarray, n_slices: int) -> tuple[str, np.ndarray]:
    """The header field that orders the frames and each image's frame index (0-based)."""
    per_slice = np.bincount(slice_of, minlength=n_slices)
    if per_slice.max() <= 1:
        return "single frame", np.zeros(len(images), int)
    temporal = [im.temporal for im in images if im.temporal is not None]
    if len(temporal) == len(images) and len(set(temporal)) > 1:
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
