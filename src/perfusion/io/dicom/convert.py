"""DICOM conversion: the one selected series through dcm2niix, checked against its headers.

**dcm2niix** (the field's standard converter; its PyPI wheel ships the binary) converts the series in
a private temporary folder, from symbolic links with neutral names (``000001.dcm`` ...) so that
neither its output nor its messages carry the original file names:
``dcm2niix -b y -ba y -z y -f series%s -o TMP/out TMP/in``. Its NIfTI header (``descrip`` holds the
acquisition time) and its sidecar (it keeps ``InstitutionName`` even with ``-ba y``) are never
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
as their last line, with every identifier read from the headers replaced by ``[removed]``.

After conversion, dcm2niix's frame order is compared with ours on the pixels of one slice in every
frame and of every slice in the first frame (error on a mismatch). dcm2niix sorts the images by
InstanceNumber; numbers out of acquisition order (measured: random numbers scramble slices and
frames, with or without TemporalPositionIdentifier) are therefore replaced, in private copies made
with pydicom, by numbers in our order (frame by frame, slices along the slice normal). Numbers
already in order (frame- or slice-major) are used as they are, through symbolic links.

A multi-echo series: dcm2niix writes one NIfTI per echo (suffix ``_e1``, ``_e2``, ... since
v1.0.20190902; earlier the first echo had none); each is matched to its echo by the EchoTime of its
sidecar and checked on the pixels. :func:`read_dicom_echoes` returns one ``DicomSeries`` per echo;
:func:`load_dicom_echoes` loads them as ``io.Series`` (combined by the caller: case.load_inputs).

Orientation: the NIfTI keeps dcm2niix's grid (for axial slices usually LAS: it flips the row axis,
never reorients), so masks drawn on any dcm2niix conversion of the series (``perfusion convert``)
fit a DICOM-folder analysis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perfusion.errors import WRITE_REFUSED_ERRNOS, InputError, OutputError, PerfusionError, UsageError
from perfusion.io.dicom.headers import (
    INTERVAL_TR_TOLERANCE,
    SeriesInfo,
    check_series,
    import_pydicom,
    inspect,
    quiet_pydicom,
    scrub,
    select_series,
)
from perfusion.io.nifti import signal_float32
from perfusion.io.series import Series, check_time
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
    """dcm2niix's last message line, identifiers scrubbed, at most 200 characters."""
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
    ``info.echoes`` (matched by their sidecar's EchoTime). Errors by exit code (module docstring)."""
    binary = find_dcm2niix()
    src, out = work / "in", work / "out"
    src.mkdir()
    out.mkdir()
    _neutral_inputs(info, folder, src)
    try:
        proc = subprocess.run([binary, *DCM2NIIX_OPTIONS, "-o", str(out), str(src)], capture_output=True,
                              text=True, errors="replace", check=False)
    except OSError as exc:
        raise UsageError(f"{binary}: dcm2niix cannot run ({exc.strerror or exc}); reinstall: make install") from None
    last = _last_line(proc.stderr if proc.stderr.strip() else proc.stdout, info.secrets).replace(str(work), "<tmp>")
    _check_exit(proc.returncode, last, info, folder, work)
    written = sorted(out.glob("*.nii.gz")) + sorted(out.glob("*.nii"))
    where = f"{folder}: series {info.number}"
    if not written and not _tmp_has_room(out, _converted_bytes(info)):
        raise _tmp_full(work, "dcm2niix wrote no image")
    if not written:
        raise InputError(f"{where}: dcm2niix wrote no image ({last}); check the series with perfusion dicom-inspect")
    n_echoes = max(1, len(info.echoes))
    if len(written) != n_echoes:
        what = f"{n_echoes} echoes" if n_echoes > 1 else "one image"
        raise InputError(f"{where}: dcm2niix split the series into {len(written)} images, the headers hold {what} "
                         "(image types or orientations mixed?); export one image type per series")
    return written if n_echoes == 1 else _by_echo(written, info, where)


def _neutral_inputs(info: SeriesInfo, folder: Path, src: Path) -> None:
    """The files of ``info`` in ``src`` under neutral names (``000001.dcm`` ...: dcm2niix never sees the
    original ones): symbolic links (copies where links fail), or private copies renumbered in
    acquisition order when the InstanceNumbers are not (_instance_numbers)."""
    files = sorted({im.path for im, _, _ in info.images})
    numbers = _instance_numbers(info)
    if numbers is not None:
        pydicom = import_pydicom(folder)
    for i, path in enumerate(files, 1):
        link = src / f"{i:06d}.dcm"
        if numbers is not None:  # a private copy numbered in acquisition order
            with quiet_pydicom():
                ds = pydicom.dcmread(path)
                ds.InstanceNumber = numbers[path]
                ds.save_as(link)
            continue
        try:
            link.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, link)


def _check_exit(code: int, last: str, info: SeriesInfo, folder: Path, work: Path) -> None:
    """Raise the error of dcm2niix's exit ``code`` (module docstring's table; ``last``: its last message
    line, scrubbed); a temporary folder that cannot take the output is an OutputError whatever the code."""
    where = f"{folder}: series {info.number}"
    if code < 0 and -code == getattr(signal, "SIGXFSZ", -1):
        raise _tmp_full(work, "the file-size limit (ulimit -f) stopped dcm2niix's output")
    if code != 0 and code != 2 and not _tmp_has_room(work / "out", _converted_bytes(info)):
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


def _by_echo(written: list[Path], info: SeriesInfo, where: str) -> list[Path]:
    """dcm2niix's images of a multi-echo series in the order of ``info.echoes``, matched by the EchoTime
    of their sidecars (its file-name suffixes changed between versions); InputError when they do not match."""
    by_echo: list[Path | None] = [None] * len(info.echoes)
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
    for k, (echo, (data, affine, raw, extra)) in enumerate(zip(info.echoes, loaded, strict=True), 1):
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
    tr_used: float | None
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
    pydicom = import_pydicom(folder)
    if not abs(np.linalg.det(affine[:3, :3])) > 1e-6:
        raise InputError(f"{folder}: series {info.number}: dcm2niix could not place the slices (a degenerate "
                         "affine); check the series with perfusion dicom-inspect and re-export it")
    mid = info.slices // 2
    chosen = [(im, f, s) for im, f, s in info.images if s == mid or f == 0]
    inv = np.linalg.inv(affine)
    cache: dict[Path, Any] = {}
    with quiet_pydicom():
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
            v0, dr, dc = _pixel_steps(im, inv)
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


def _pixel_steps(im, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where pixel (row 0, column 0) of the DICOM image ``im`` lies in the converted image (voxel
    coordinates, through ``inv``, the inverse of its affine) and the voxel step of one pixel row and of
    one pixel column, from the image's own geometry (position and orientation: DICOM LPS, mm)."""
    row, col = np.array(im.orientation[:3]), np.array(im.orientation[3:])
    origin = np.asarray(im.position)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])

    def voxel(r: int, c: int) -> np.ndarray:
        world = (origin + row * im.spacing[1] * c + col * im.spacing[0] * r) * lps_to_ras
        return (inv @ np.append(world, 1.0))[:3]

    v0 = voxel(0, 0)
    return v0, voxel(1, 0) - v0, voxel(0, 1) - v0


def load_dicom_echoes(folder: Path, *, te: float | None = None, tr: float | None = None,
                      series: int | None = None) -> list[Series]:
    """A DICOM folder's DSC series as ``io.Series``, one per echo (TE order; one for a single-echo
    series): TE/TR in s from ``te`` / ``tr`` if given, else from the DICOM header (dcm2niix's sidecar,
    which converts ms to s). Check warnings are issued with ``warnings.warn``; ``Series.path`` is the
    folder (``FOLDER/echo-<k>`` for an echo, never the folder's name alone), ``sidecar`` the whitelisted
    keys only. ``te`` is refused for a multi-echo series (each echo has its own TE). Combining the
    echoes is the caller's (quantify.echoes.combine_echoes; case.load_inputs does it)."""
    folder = Path(folder)
    tr_given = (check_time(tr, name="TR", flag="--tr", limit=MAX_TR_S, source="--tr", path=folder)
                if tr is not None else None)
    convs = read_dicom_echoes(folder, series=series, tr_s=tr_given)
    if len(convs) > 1 and te is not None:
        tes = ", ".join(f"{e.echo_time_s:g}" for e in convs[0].info.echoes)  # each conv's info: the whole series
        raise UsageError(f"{folder}: series {convs[0].info.number} holds {len(convs)} echoes (TE {tes} s), each with "
                         "its own TE; leave --te out")
    for conv in convs:
        for w in conv.warnings:
            warnings.warn(w, stacklevel=2)
    return [_echo_series(conv, folder, te=te) for conv in convs]


def load_dicom_series(folder: Path, *, te: float | None = None, tr: float | None = None,
                      series: int | None = None) -> Series:
    """The single-echo DSC series of a DICOM folder (load_dicom_echoes); UsageError for a multi-echo
    series, whose echoes load_dicom_echoes returns for combining."""
    echoes = load_dicom_echoes(folder, te=te, tr=tr, series=series)
    if len(echoes) > 1:
        raise UsageError(f"{folder}: a multi-echo series ({len(echoes)} echoes): load it with load_dicom_echoes and "
                         "combine the echoes (perfusion.load_case does both)")
    return echoes[0]


def _echo_series(conv: DicomSeries, folder: Path, *, te: float | None) -> Series:
    """One converted echo (or single-echo series) as a Series: TE from ``te``, else dcm2niix's sidecar,
    else the header (ms -> s); TR from the conversion (checked, s)."""
    side = conv.sidecar
    if te is not None:
        te_s = check_time(te, name="TE", flag="--te", limit=MAX_TE_S, source="--te", path=folder)
        te_source = "option --te"
    elif "EchoTime" in side:
        te_s = check_time(side["EchoTime"], name="EchoTime", flag="--te", limit=MAX_TE_S,
                           source="the DICOM header", path=folder)
        te_source = "DICOM (dcm2niix sidecar EchoTime)"
    elif conv.info.echo_time_s is not None and not conv.echo:  # dcm2niix's sidecar unreadable: the header (ms -> s)
        te_s = check_time(conv.info.echo_time_s, name="EchoTime", flag="--te", limit=MAX_TE_S,
                           source="the DICOM header", path=folder)
        te_source = "DICOM header EchoTime (ms, converted)"
    elif conv.echo and conv.info.echoes[conv.echo - 1].echo_time_s is not None:
        te_s = check_time(conv.info.echoes[conv.echo - 1].echo_time_s, name="EchoTime", flag="--te",
                           limit=MAX_TE_S, source="the DICOM header", path=folder)
        te_source = "DICOM header EchoTime (ms, converted)"
    else:
        raise InputError(f"{folder}: echo time unknown (no EchoTime in the DICOM header); pass --te SECONDS "
                         "(e.g. --te 0.03)")
    if conv.tr_s is not None:
        tr_s = check_time(conv.tr_s, name="RepetitionTime", flag="--tr", limit=MAX_TR_S,
                           source="the DICOM header", path=folder)
        tr_source = conv.tr_source
    else:
        raise InputError(f"{folder}: repetition time unknown (no RepetitionTime in the DICOM header); "
                         "pass --tr SECONDS")
    path = folder / f"echo-{conv.echo}" if conv.echo else folder  # an echo's name: never the folder's
    return Series(data=conv.data, affine=conv.affine, path=path, te=te_s, tr=tr_s, te_source=te_source,
                  tr_source=tr_source, sidecar_path=None, sidecar=dict(side))
