"""Files in and out: the only module that touches nibabel (and, later, SimpleITK).

Units are fixed here and nowhere else: TE and TR leave this module in seconds whatever the
file said, and every map written carries a JSON sidecar with its ``Units``.
Arrays are ``(x, y, z, t)``, time last, as nibabel returns them.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Iterator

import numpy as np

from perfusion.errors import InputError, OutputError, UsageError
from perfusion.units import MAX_TE_S, MAX_TR_S, NIFTI_TIME_UNIT_TO_S

#: Fewest frames a DSC series may have: a baseline of a few frames, the bolus and its tail.
MIN_FRAMES = 15

#: Affines of masks and series must agree to this (mm), element-wise, after float32 storage.
AFFINE_ATOL_MM = 1e-3


@dataclass(frozen=True)
class Series:
    """A DSC series with its timing. ``data`` is signal (a.u.), float32, shape (x, y, z, t)."""

    data: np.ndarray
    affine: np.ndarray
    path: Path
    te: float  # s
    tr: float  # s
    te_source: str
    tr_source: str
    sidecar_path: Path | None = None
    sidecar: dict[str, Any] = field(default_factory=dict)
    # multi-echo (echoes.combine_echoes): the echoes by TE (echoes.Echo), how they were combined into
    # ``data`` (whose TE is then the effective TE), and notes; empty for a single echo
    echoes: tuple = ()
    echo_combination: str = ""
    echo_notes: tuple[str, ...] = ()

    @property
    def shape3d(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[:3])  # type: ignore[return-value]

    @property
    def n_frames(self) -> int:
        return int(self.data.shape[3])

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        """Voxel size (mm, x y z): the lengths of the affine's columns."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Voxel volume in mL (the affine's determinant is in mm^3)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def _nib():
    import nibabel

    return nibabel


def sidecar_path_for(path: Path) -> Path:
    """The BIDS JSON sidecar next to a .nii or .nii.gz file."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_suffix(".json")


def stem(path: Path) -> str:
    """File name without .nii / .nii.gz: the name of an ROI."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


#: curves.tsv column of a region's mean curve before leakage correction: "<region>" + this suffix.
UNCORRECTED_SUFFIX = "_uncorrected"
#: Longest ROI name (characters): its mask copy "mask-<name>.nii.gz" or "<prefix>_label-<name>_mask.nii.gz"
#: must stay within the 255-byte file-name limit of ext4, XFS and APFS with a BIDS prefix of 40 characters.
MAX_ROI_NAME = 200


def roi_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an ROI (a curves.tsv column, a report key, a file name), or None.
    Refused: empty; longer than MAX_ROI_NAME; control characters (tab and newline break curves.tsv's
    rows and columns; str.splitlines also breaks at \\x0b, \\x0c, \\x1c-\\x1e, \\x85, U+2028 and U+2029);
    path separators; bytes that are not UTF-8 (a file name decoded with surrogate escapes)."""
    import unicodedata

    if not name:
        return "is empty"
    if len(name) > MAX_ROI_NAME:
        return f"is longer than {MAX_ROI_NAME} characters"
    for ch in name:
        cat = unicodedata.category(ch)
        if cat == "Cs":
            return "holds bytes that are not UTF-8"
        if cat in ("Cc", "Zl", "Zp"):
            return f"holds the control character {ch!r}"
        if ch in "/\\":
            return f"holds the path separator {ch!r}"
    return None


def check_roi_names(named: list[tuple[str, Path]]) -> None:
    """Refuse (UsageError, before any work) ROI names that cannot be written (``roi_name_problem``), a
    name given twice, and a name that is another's plus "_uncorrected" (curves.tsv would give both
    the same column). ``named``: (name, mask path) per ROI."""
    seen: dict[str, Path] = {}
    for name, path in named:
        problem = roi_name_problem(name)
        if problem:
            raise UsageError(f"{str(path)!r}: the ROI name {name!r} (the file name) {problem}; rename the file with "
                             "letters, digits, '-', '_' or '.' (e.g. lesion-1.nii.gz)")
        if name in seen:
            raise UsageError(f"{path}: two ROIs are named {name!r} ({seen[name]} and {path}); rename one file")
        seen[name] = path
    for name, path in named:
        base = name.removesuffix(UNCORRECTED_SUFFIX)
        if base != name and base in seen:
            raise UsageError(f"{path}: the ROI names {base!r} ({seen[base]}) and {name!r} collide in curves.tsv, "
                             f"where {base!r}'s curve before leakage correction is {name!r}; rename one file "
                             f"(e.g. without '{UNCORRECTED_SUFFIX}')")


def _load_image(path: Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found; check the path")
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise InputError(f"{path}: {what} must be a NIfTI file (.nii or .nii.gz)")
    gz = path.name.endswith(".gz")
    with _quiet_nibabel():
        try:
            img = _read_gzip_image(path) if gz else _nib().load(str(path))
            proxy = img.dataobj
            # a header can promise far more data than the file holds; nibabel would allocate all of it first
            promised = _image_bytes(proxy.shape, proxy.offset, proxy.dtype.itemsize)
            held = len(proxy.file_like.getbuffer()) if gz else path.stat().st_size
            if promised > held:
                raise ValueError(f"the header promises {promised} bytes, the file holds {held}")
            data = np.asarray(proxy)
        except Exception as exc:  # nibabel raises many types for broken files
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(
                f"{path}: not a readable NIfTI file ({reason}); re-export the {what} as .nii or .nii.gz"
            ) from None
        if data.dtype.kind not in "iuf":  # complex or RGB: no single real value per voxel
            raise InputError(f"{path}: {what} holds {img.header.get_value_label('datatype')} values, not real "
                             "numbers; re-export it as integers or floats")
    return img, data


@contextlib.contextmanager
def _quiet_nibabel():
    """nibabel logs its header checks straight to stderr: fixes (unset pixdims, common in DROs and
    converted data) and, just before raising, errors ("data code 16384 not recognized"). A command's
    stderr holds one error line at most, ours, so all are silenced while reading."""
    import logging

    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _image_bytes(shape, offset: int, itemsize: int) -> int:
    """Bytes a NIfTI file must hold: ``offset`` plus the data of ``shape`` (Python ints: no overflow).
    ValueError for a shape without voxels (nibabel would read no data for it, whatever the file holds)."""
    if not shape or min(shape) <= 0:
        raise ValueError(f"the header's shape {tuple(shape)} has no voxels")
    return int(offset) + int(np.prod(shape, dtype=object)) * int(itemsize)


def _is_nifti2(raw: bytes) -> bool:
    """A NIfTI-2 header (sizeof_hdr 540, either byte order) at the start of ``raw``."""
    return raw[:4] in ((540).to_bytes(4, "little"), (540).to_bytes(4, "big"))


def _read_gzip_image(path: Path):
    """A .nii.gz read whole into memory with ISA-L's gzip decoder (python-isal; 1.8x faster than zlib
    on a 27 MB series here), or zlib where isal is not installed. Same image as nibabel.load."""
    nib = _nib()
    raw = _gunzip_nifti(Path(path).read_bytes())
    return (nib.Nifti2Image if _is_nifti2(raw) else nib.Nifti1Image).from_bytes(raw)


#: Output size of each decoding step past the image's end (bytes kept in memory at once).
_DRAIN_BYTES = 4 * 2**20


def _gunzip_nifti(blob: bytes) -> bytes:
    """The gzip stream ``blob`` kept only as far as its NIfTI header says the image reaches: a stream
    that inflates past it (a "gzip bomb": 1 MB of deflate can hold 1 GB of zeros) costs no more memory
    than the image (the rest is decoded and dropped, to check its CRC), and a header promising more than
    this machine's memory is refused before decoding. Several gzip members are read in turn.
    ValueError/EOFError/zlib error on a broken stream."""
    try:
        from isal.isal_zlib import decompressobj
    except ImportError:  # pragma: no cover - isal is a dependency; a source build may lack it
        from zlib import decompressobj
    head = decompressobj(31).decompress(blob, 540)  # the header (NIfTI-2's is the longer), first member
    limit = _promised_bytes(head) if len(head) >= 348 else 540
    pieces, n, data = [], 0, blob
    while data:
        inflate = decompressobj(31)  # gzip container; CRC and length checked at the member's end
        feed = data
        if n <= limit:
            pieces.append(inflate.decompress(feed, limit + 1 - n))
            n += len(pieces[-1])
            feed = inflate.unconsumed_tail
        # past the image: decoded in bounded pieces and dropped, only so the member's CRC is checked
        # (a corrupted stream can inflate to more bytes than it held)
        while not inflate.eof:
            dropped = inflate.decompress(feed, _DRAIN_BYTES)
            feed = inflate.unconsumed_tail
            if not dropped and not feed:
                break
        if not inflate.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        data = inflate.unused_data  # a next member
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _promised_bytes(head: bytes) -> int:
    """Bytes a NIfTI-1/2 file must hold by its header ``head``: the data offset plus the data."""
    import io as _io

    nib = _nib()
    hdr = (nib.Nifti2Header if _is_nifti2(head) else nib.Nifti1Header).from_fileobj(_io.BytesIO(head), check=False)
    promised = _image_bytes(hdr.get_data_shape(), max(int(hdr.get_data_offset()), hdr.sizeof_hdr),
                            hdr.get_data_dtype().itemsize)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if promised > memory:
        raise ValueError(f"the header promises {promised / 1e9:.3g} GB of data, more than this machine's "
                         f"{memory / 1e9:.3g} GB of memory")
    return promised


def voxel_major_float32(raw: np.ndarray) -> np.ndarray:
    """``raw`` (x, y, z, t; any memory order and dtype) as a C-ordered float32 array, so that each
    voxel's time course is contiguous and ``reshape(-1, t)`` is a view. NIfTI stores x fastest; the
    copy goes one z-slab at a time (3x faster here than one numpy copy of the whole 4-D transpose),
    the slabs on two threads (numpy's copy releases the GIL: 0.09 s instead of 0.15-0.3 s for
    128 x 128 x 24 x 80 here)."""
    if raw.ndim != 4:
        return np.array(raw, dtype=np.float32)
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty(raw.shape, np.float32)

    def slab(z: int) -> None:
        out[:, :, z, :] = raw[:, :, z, :]

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(slab, range(raw.shape[2])))
    return out


#: Largest |signal| analysed as it is. The pipeline's float32 sums of squares over a whole series (up
#: to 256 x 256 x 30 x 120 = 2.4e8 values) stay below float32's largest value, 3.4e38, while |signal|
#: <= 2**48 = 2.8e14 (2.4e8 * 2**96 = 1.9e37).
MAX_SIGNAL = 2.0 ** 48
#: A series above MAX_SIGNAL is multiplied by a power of two (exact in binary floating point: every
#: ratio S/S0, hence every map, is unchanged) so that its largest |value| lies in [2**15, 2**16), the
#: range of the 16-bit integers that scanners store.
SCALED_PEAK_EXPONENT = 16


def signal_float32(raw: np.ndarray, *, where: str, nonfinite: str) -> tuple[np.ndarray, str | None]:
    """``raw`` (x, y, z, t signal, any dtype) as voxel_major_float32, and a note when it was scaled.
    InputError "``where``: ``nonfinite``" for NaN or Inf, checked before the float32 cast (a float64
    value of 1e300 is finite but would become Inf). A series whose largest |value| exceeds MAX_SIGNAL
    is scaled by 2**-k before the cast (see SCALED_PEAK_EXPONENT)."""
    import math

    if raw.size == 0:
        return voxel_major_float32(raw), None
    lo, hi = raw.min(), raw.max()  # NaN and Inf propagate; no temporary the size of the series
    if raw.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"{where}: {nonfinite}")
    peak = max(abs(float(lo)), abs(float(hi)))
    if peak <= MAX_SIGNAL:
        return voxel_major_float32(raw), None
    k = math.frexp(peak)[1] - SCALED_PEAK_EXPONENT  # peak < 2**frexp
    dtype = np.float32 if raw.dtype == np.float32 else np.float64
    data = voxel_major_float32(np.multiply(raw, dtype(2.0 ** -k), dtype=dtype))
    note = (f"the DSC signal reaches {peak:.3g}, beyond {MAX_SIGNAL:.2g} where float32 arithmetic can overflow: "
            f"scaled by 2^-{k} before the analysis (the signal's unit is arbitrary; the maps do not change, "
            "baseline.nii.gz holds the scaled signal)")
    return data, note


def read_json_object(path: Path, *, what: str, fix: str) -> dict[str, Any]:
    """A JSON file holding an object; InputError naming the file and ``fix`` otherwise."""
    try:  # utf-8-sig: a byte-order mark (Windows editors) is read past
        obj = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except RecursionError:
        raise InputError(f"{path}: {what} is not valid JSON (nested too deeply); {fix}") from None
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError, 4300-digit integers
        reason = str(exc).splitlines()[0].split(";")[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: {what} is not valid JSON ({reason}); {fix}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: {what} must hold a JSON object; {fix}")
    return obj


def _read_sidecar(path: Path) -> dict[str, Any]:
    return read_json_object(path, what="sidecar", fix="fix or remove it")


def _check_time(value: Any, *, name: str, flag: str, limit: float, source: str, path: Path) -> float:
    # a number, not a bool (float(True) is 1) nor a string (float("1_5") is 15); JSON integers may be huge
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"{path}: {name} {value!r} from {source} is not a number; pass {flag} SECONDS")
    try:
        value = float(value)
    except OverflowError:
        raise InputError(f"{path}: {name} from {source} is too large for a time; pass {flag} SECONDS") from None
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{path}: {name} {value} from {source} must be positive; pass {flag} SECONDS")
    if value > limit:
        raise InputError(
            f"{path}: {name} {value} from {source} looks like milliseconds; "
            f"give seconds (e.g. {flag} {value / 1000:g})"
        )
    return value


def load_series(path: Path, *, te: float | None = None, tr: float | None = None) -> Series:
    """Load a 4-D DSC NIfTI and its timing in seconds.

    TE: ``te`` if given, else the sidecar's ``EchoTime`` (s). TR: ``tr`` if given, else the
    sidecar's ``RepetitionTime`` (s), else the header's 4th pixdim converted from its time unit.
    """
    path = Path(path)
    img, raw = _load_image(path, "DSC series")
    if raw.ndim == 5 and raw.shape[3] == 1:
        raw = raw[:, :, :, 0, :]
    if raw.ndim != 4:
        raise InputError(f"{path}: DSC series must be 4-D (x, y, z, time), got shape {raw.shape}; give the dynamic series")
    if raw.shape[3] < MIN_FRAMES:
        raise InputError(
            f"{path}: only {raw.shape[3]} frames; a DSC series needs at least {MIN_FRAMES} (baseline, bolus, tail)"
        )
    affine = _affine(img, path, "DSC series")
    # raw is nibabel's scaled array (scl_slope/inter applied); integers that stayed integers are finite
    data, scaled = signal_float32(raw, where=str(path), nonfinite="contains NaN or Inf values; re-export the series "
                                                                  "without them")
    if scaled:
        warnings.warn(scaled, stacklevel=2)

    sc_path = sidecar_path_for(path)
    sidecar = _read_sidecar(sc_path) if sc_path.is_file() else {}
    sc_name = f"sidecar {sc_path.name}"

    if te is not None:
        te_s = _check_time(te, name="TE", flag="--te", limit=MAX_TE_S, source="--te", path=path)
        te_source = "option --te"
    elif "EchoTime" in sidecar:
        te_s = _check_time(sidecar["EchoTime"], name="EchoTime", flag="--te", limit=MAX_TE_S, source=sc_name, path=path)
        te_source = f"{sc_name} EchoTime"
    else:
        where = f"no EchoTime in {sc_path}" if sidecar else f"no sidecar {sc_path.name}"
        raise InputError(f"{path}: echo time unknown ({where}); pass --te SECONDS (e.g. --te 0.03)")

    header_tr = _header_tr(img)
    if tr is not None:
        tr_s = _check_time(tr, name="TR", flag="--tr", limit=MAX_TR_S, source="--tr", path=path)
        tr_source = "option --tr"
    elif "RepetitionTime" in sidecar:
        tr_s = _check_time(sidecar["RepetitionTime"], name="RepetitionTime", flag="--tr", limit=MAX_TR_S, source=sc_name, path=path)
        tr_source = f"{sc_name} RepetitionTime"
    elif header_tr is not None:
        tr_s = _check_time(header_tr, name="TR", flag="--tr", limit=MAX_TR_S, source="NIfTI header", path=path)
        tr_source = "NIfTI header pixdim[4]"
    else:
        raise InputError(
            f"{path}: repetition time unknown (no RepetitionTime in a sidecar and no time unit in the header); "
            "pass --tr SECONDS"
        )
    if header_tr is not None and tr_source != "NIfTI header pixdim[4]" and abs(header_tr - tr_s) > 0.01 * tr_s:
        warnings.warn(
            f"{path}: header TR {header_tr:g} s differs from the TR used ({tr_s:g} s, {tr_source})",
            stacklevel=2,
        )
    return Series(
        data=data,
        affine=affine,
        path=path,
        te=te_s,
        tr=tr_s,
        te_source=te_source,
        tr_source=tr_source,
        sidecar_path=sc_path if sidecar else None,
        sidecar=sidecar,
    )


def _header_tr(img) -> float | None:
    """TR in s from the header, or None where pixdim[4] or its unit is not set."""
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not zooms[3] or zooms[3] <= 0:
        return None
    try:
        _, time_unit = img.header.get_xyzt_units()
    except KeyError:  # a time code that NIfTI does not define (nibabel has no label for it): no unit
        return None
    factor = NIFTI_TIME_UNIT_TO_S.get(time_unit)
    if factor is None:
        return None
    return float(zooms[3]) * factor


#: A mask with values strictly between 0 and 1 (a probability or partial-volume map, e.g. a mask
#: resampled with linear interpolation or a segmentation network's output) is read as "in" where the
#: value is at least this: the voxel is more likely in than out. Not tuned on data.
MASK_PROBABILITY_THRESHOLD = 0.5

#: What a mask's labels mean (``load_mask`` ``labels``): "refuse" an integer label map with more than
#: one label (an AIF, VOF or reference mask must be one region), or "merge" its labels into one region
#: (a brain mask may be a tissue segmentation: every tissue label is brain).
MASK_LABEL_MODES = ("refuse", "merge")


def _mask_values(path: Path, like: Series, what: str) -> np.ndarray:
    """A 3-D mask file's values on the grid of ``like`` (float64, x y z); InputError for another grid."""
    path = Path(path)
    img, raw = _load_image(path, what)
    data = np.asarray(raw)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != like.shape3d:
        raise InputError(
            f"{path}: {what} shape {data.shape} differs from the DSC series {like.path.name} {like.shape3d}; "
            "resample the mask onto the DSC grid"
        )
    if not np.allclose(img.affine, like.affine, rtol=1e-5, atol=AFFINE_ATOL_MM):
        raise InputError(
            f"{path}: {what} affine differs from the DSC series {like.path.name}; "
            "resample the mask onto the DSC grid"
        )
    return data


def mask_regions(path: Path, like: Series, *, what: str) -> dict[int | None, np.ndarray]:
    """The regions of a mask file on the grid of ``like``, each bool (x, y, z).

    One rule for every mask (brain, AIF, VOF, reference, ROI):

    - NaN, Inf or a negative value: InputError (not a mask; "non-zero is in" would take them in or out
      silently).
    - Integer values with one non-zero value (0/1, 0/255, a single label): one region, ``{None: mask}``.
    - Integer values with several non-zero values: a label map, one region per label, ``{N: mask}``.
    - Other values, all within [0, 1]: a probability map, thresholded at MASK_PROBABILITY_THRESHOLD
      (``{None: mask}``) with a warning naming the file (its name only: warnings reach report.json).
    - Other values above 1: InputError (neither a mask, a label map nor a probability map).

    InputError when no voxel is in."""
    path = Path(path)
    data = _mask_values(path, like, what)
    fix = "give a mask of 0 (out) and 1 (in), or integer labels"
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(f"{path}: {what} holds NaN or Inf in {int(bad.sum())} voxels; {fix}")
    low = float(data.min())
    if low < 0:
        raise InputError(f"{path}: {what} holds negative values (down to {low:g}); {fix}")
    nonzero = data != 0
    if not nonzero.any():
        raise InputError(f"{path}: {what} is empty (no non-zero voxel); give a mask with at least one voxel")
    values = np.unique(data[nonzero])
    if np.all(values == np.floor(values)):
        if values.size == 1:
            return {None: nonzero}
        return {int(v): data == v for v in values}
    if values.max() > 1:
        raise InputError(f"{path}: {what} holds non-integer values above 1 (up to {float(values.max()):g}): not a "
                         f"0/1 mask, a label map or a probability map; {fix}")
    mask = data >= MASK_PROBABILITY_THRESHOLD
    if not mask.any():
        raise InputError(f"{path}: {what} holds values between 0 and 1, none at or above "
                         f"{MASK_PROBABILITY_THRESHOLD:g}: nothing is in; {fix}")
    warnings.warn(f"{path.name}: the {what} holds values between 0 and 1 (a probability or partial-volume map): "
                  f"voxels at or above {MASK_PROBABILITY_THRESHOLD:g} are in ({int(mask.sum())} of "
                  f"{int(nonzero.sum())} non-zero voxels)", stacklevel=2)
    return {None: mask}


def load_mask(path: Path, like: Series, *, what: str, labels: str = "refuse") -> np.ndarray:
    """Load a 3-D mask that is one region on the grid of ``like`` (mask_regions' rule); returns bool
    (x, y, z). A label map with several labels is refused (``labels="refuse"``: InputError naming the
    labels) or merged into one region (``labels="merge"``)."""
    if labels not in MASK_LABEL_MODES:
        raise ValueError(f"labels={labels!r}: choose from {MASK_LABEL_MODES}")
    regions = mask_regions(path, like, what=what)
    if None in regions:
        return regions[None]
    if labels == "merge":
        return np.logical_or.reduce(list(regions.values()))
    listed = ", ".join(str(k) for k in list(regions)[:8]) + (", ..." if len(regions) > 8 else "")
    raise InputError(f"{path}: {what} is a label map with {len(regions)} labels ({listed}); it must be one region: "
                     "save the one label you mean as a 0/1 mask")


def load_volume(path: Path, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D image (float32, scaling applied; a 4-D file with one volume counts) and its affine."""
    path = Path(path)
    img, _ = _load_image(path, what)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: {what} has shape {tuple(img.shape)}, not one 3-D volume; "
                         "give a single 3-D image")
    data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    if not np.any(np.isfinite(data) & (data != 0)):  # zeros and Inf only: no image
        raise InputError(f"{path}: {what} holds no non-zero finite value; give the image itself")
    return data, _affine(img, path, what)


def _affine(img, path: Path, what: str) -> np.ndarray:
    """The image's voxel-to-world affine (float64); InputError when not finite or not invertible (the
    maps written on its grid could not be placed)."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or np.linalg.det(affine[:3, :3]) == 0:
        raise InputError(f"{path}: the header's affine (sform/qform) is not finite and invertible; "
                         f"fix the header or re-export the {what}")
    return affine


def load_array(path: Path, *, what: str = "image") -> np.ndarray:
    """The data of a NIfTI file as float64, scaling applied (for reference data and tests)."""
    img, _ = _load_image(Path(path), what)
    with _quiet_nibabel():
        return np.asarray(img.get_fdata(dtype=np.float64))


def load_array_affine(path: Path, *, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """The data of a NIfTI file as float64 (scaling applied) and its voxel-to-world affine (mm)."""
    img, _ = _load_image(Path(path), what)
    with _quiet_nibabel():
        return np.asarray(img.get_fdata(dtype=np.float64)), _affine(img, Path(path), what)


# ------------------------------------------------------------------------- display orientation

#: Display axes per acquisition plane (the world axis the third voxel axis, the slice axis, runs
#: along), as nibabel axis codes of the directions the display array's axes grow toward. Figures draw
#: a slice's first axis left to right and its second bottom to top (imshow origin="lower"), so these
#: are the radiological convention: axial and coronal with the patient's right on the image's left
#: (axis 0 grows to the patient's left), anterior (axial) or superior (coronal, sagittal) up;
#: sagittal with anterior on the image's left. Slices run inferior to superior, posterior to anterior,
#: right to left.
DISPLAY_AXCODES = {"sagittal": ("P", "S", "L"), "coronal": ("L", "S", "A"), "axial": ("L", "A", "S")}

_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


@dataclass(frozen=True)
class DisplayGrid:
    """How the 3-D maps of one grid are drawn: voxel axes flipped and permuted (never resampled) into
    DISPLAY_AXCODES of the acquisition plane, the slice axis kept third. ``positions_mm`` is each
    display slice's world coordinate (mm, scanner RAS) along the slice normal; ``marks`` the patient
    direction at each image edge ('left', 'right', 'top', 'bottom')."""

    plane: str  # 'axial', 'coronal' or 'sagittal'
    axcodes: tuple[str, str, str]
    ornt: np.ndarray  # nibabel orientation transform, stored voxel axes -> display axes
    shape: tuple[int, int, int]  # stored (x, y, z)
    positions_mm: np.ndarray  # per display slice, mm

    @property
    def marks(self) -> dict[str, str]:
        c0, c1 = self.axcodes[0], self.axcodes[1]
        return {"left": _OPPOSITE[c0], "right": c0, "top": c1, "bottom": _OPPOSITE[c1]}

    def apply(self, data: np.ndarray) -> np.ndarray:
        """A 3-D array on the stored grid (x, y, z) in display orientation (a view: flips and a transpose)."""
        data = np.asarray(data)
        if tuple(data.shape[:3]) != self.shape:
            raise ValueError(f"array of shape {data.shape} is not on the grid {self.shape}")
        return _nib().orientations.apply_orientation(data, self.ornt)

    def display_slice(self, k: int) -> int:
        """The display index of stored slice ``k`` (the slice axis may be reversed)."""
        return self.shape[2] - 1 - int(k) if self.ornt[2, 1] < 0 else int(k)

    def position_label(self, d: int) -> str:
        """Display slice ``d``'s position as a letter and mm, e.g. 'S 12.0 mm' or 'I 4.5 mm' (the side of
        the scanner's origin along the slice normal; 0.001 mm rounding first, so float32 affines agree)."""
        axis = int(_nib().orientations.axcodes2ornt(self.axcodes)[2, 0])
        pos = round(float(self.positions_mm[d]), 3)
        letter = ("R", "A", "S")[axis] if pos >= 0 else ("L", "P", "I")[axis]
        return f"{letter} {abs(pos):.1f} mm"


def display_grid(affine: np.ndarray, shape: tuple[int, ...]) -> DisplayGrid:
    """The DisplayGrid of 3-D maps of ``shape`` (x, y, z, ...) on ``affine`` (voxel to world, mm): the
    plane from the world axis nearest to the third voxel axis (nibabel io_orientation, so an oblique
    grid gets its nearest plane's letters)."""
    nib = _nib()
    affine = np.asarray(affine, dtype=np.float64)
    shape3 = tuple(int(n) for n in shape[:3])
    start = nib.orientations.io_orientation(affine)
    plane = ("sagittal", "coronal", "axial")[int(start[2, 0])]
    codes = DISPLAY_AXCODES[plane]
    ornt = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(codes))
    disp_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape3)
    disp_shape = tuple(shape3[int(i)] for i in np.argsort(ornt[:, 0]))
    world_axis = int(start[2, 0])
    normal = np.cross(disp_affine[:3, 0], disp_affine[:3, 1])
    normal = normal / np.linalg.norm(normal)
    if normal[world_axis] < 0:
        normal = -normal  # along +x, +y or +z (R, A, S): the sign of the position is the scanner's
    corners = disp_affine @ np.stack([np.zeros(disp_shape[2]), np.zeros(disp_shape[2]),
                                      np.arange(disp_shape[2], dtype=np.float64), np.ones(disp_shape[2])])
    positions = normal @ corners[:3]
    return DisplayGrid(plane=plane, axcodes=codes, ornt=ornt, shape=shape3, positions_mm=positions)


#: Largest file of an input folder that is read (a DICOM folder), bytes. A DICOM file's uncompressed
#: Pixel Data is one element with a 32-bit length (at most 0xFFFFFFFE bytes), so 5 GiB holds any
#: DICOM file a scanner or PACS writes with room for its header (an Enhanced MR file of a
#: 256 x 256 x 30 x 120 DSC series at 16 bit is 0.47 GB); a larger regular file is something else (a
#: disk image, a sparse file) and reading or hashing it would only cost time.
MAX_FOLDER_FILE_BYTES = 5 << 30


def folder_files(folder: Path, *, max_bytes: int = MAX_FOLDER_FILE_BYTES) -> tuple[list[Path], dict[str, int]]:
    """The regular, non-hidden files under ``folder`` (sub-folders too), sorted, and the count of the
    other entries skipped, by kind. Nothing is opened: a FIFO, a device (a link to /dev/zero), a socket
    would block or never end a read. Skipped: those, symlinks whose target lies outside ``folder``,
    broken or looping symlinks, symlinked folders (not followed), entries that cannot be examined
    and files larger than ``max_bytes``. OSError when ``folder`` itself cannot be listed."""
    import stat

    top = os.path.realpath(folder)
    files: list[Path] = []
    skipped: dict[str, int] = {}

    def skip(kind: str) -> None:
        skipped[kind] = skipped.get(kind, 0) + 1

    def fail(exc: OSError) -> None:
        if Path(exc.filename or "") == Path(folder):
            raise exc
        skip("folder that cannot be listed")

    for root, dirs, names in os.walk(folder, onerror=fail):
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            if os.path.islink(os.path.join(root, d)):
                skip("symlinked folder (not followed)")
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            try:
                if os.path.islink(path):
                    real = os.path.realpath(path)
                    if os.path.commonpath([top, real]) != top:
                        skip("symlink to outside the folder")
                        continue
                st = os.stat(path)
            except (OSError, ValueError):  # ELOOP, a broken link, no permission; ValueError: mixed drives
                skip("broken or looping symlink or unreadable entry")
                continue
            if stat.S_ISREG(st.st_mode):
                if st.st_size > max_bytes:
                    skip(f"file larger than {max_bytes / 2 ** 30:g} GiB")
                else:
                    files.append(Path(path))
            elif stat.S_ISFIFO(st.st_mode):
                skip("FIFO")
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                skip("device")
            elif stat.S_ISSOCK(st.st_mode):
                skip("socket")
            else:  # a symlink to a folder inside the tree, or another kind
                skip("other non-file entry")
    return files, skipped


def describe_skipped(skipped: dict[str, int]) -> str:
    """'3 entries skipped (2 FIFO, 1 device)' for the counts of ``folder_files``; '' when none."""
    n = sum(skipped.values())
    if not n:
        return ""
    parts = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{n} entr{'y' if n == 1 else 'ies'} skipped ({parts})"


def open_regular(path: Path, *, max_bytes: int = MAX_FOLDER_FILE_BYTES):
    """``path`` opened for binary reading only if it is a regular file of at most ``max_bytes``
    (checked on the open descriptor: a file swapped for a FIFO after it was listed cannot block).
    OSError otherwise."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise OSError(f"{path}: not a regular file of at most {max_bytes} bytes")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes. Of a folder (a DICOM input): SHA-256 over the sorted pairs
    (relative name, file SHA-256) of every file ``folder_files`` lists (the files a DICOM analysis
    reads: no FIFO, device or link to outside); no file name is revealed (DICOM file names can hold
    identifiers)."""
    if Path(path).is_dir():
        pairs = []
        for file in folder_files(Path(path))[0]:
            with contextlib.suppress(OSError):  # a file gone since it was listed is not hashed
                pairs.append((file.relative_to(path).as_posix(), _file_sha256(file, opener=open_regular)))
        h = hashlib.sha256()
        for name, digest in sorted(pairs):
            h.update(name.encode("utf-8", "surrogateescape") + b"\0" + digest.encode("ascii") + b"\n")
        return h.hexdigest()
    return _file_sha256(Path(path))


def _file_sha256(path: Path, *, opener=lambda p: open(p, "rb")) -> str:
    h = hashlib.sha256()
    with opener(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------- inputs named in outputs

#: How a DICOM folder input is named in the outputs (its own name is often the patient's).
DICOM_FOLDER_NAME = "DICOM folder"

#: What stands for an input's folder where a message quoted it.
INPUT_FOLDER_NAME = "(input folder)"


def public_name(path: Path) -> str:
    """How an input is named in the outputs: its file name only, never its folders (folders are often
    named after the patient or hold a record number); a DICOM folder is ``DICOM_FOLDER_NAME``."""
    path = Path(path)
    return DICOM_FOLDER_NAME if path.is_dir() else path.name


def _spellings(path: Path) -> set[str]:
    """The ways a path may be written in a message: as given, absolute, resolved (symlinks followed)."""
    path = Path(path)
    out = {str(path), str(path.absolute()), os.path.normpath(path.absolute())}
    with contextlib.suppress(OSError, RuntimeError):
        out.add(str(path.resolve()))
    return {s for s in out if s not in ("", ".", os.sep)}


class Redactor:
    """Rewrites strings bound for an output so that no input path nor input folder remains: every
    spelling of an input (as given, absolute, resolved) becomes its ``public_name``, every spelling of
    its folder (absolute, or relative with a separator: a bare word could be any word) becomes
    ``INPUT_FOLDER_NAME``. Longest first, so a file's path goes before its folder's; only where the
    spelling stands alone (not inside a longer name or path: an input folder '/s' leaves '1/s' be)."""

    def __init__(self, paths):
        table: dict[str, str] = {}
        for p in paths:
            if p is None or str(p) == "":
                continue
            p = Path(p)
            folders = {p.parent}  # a DICOM folder's own spellings get its public name below
            with contextlib.suppress(OSError, RuntimeError):
                folders.add(p.resolve().parent)  # a symlinked input: the folder it points into
            for folder in folders:
                for s in _spellings(folder):
                    if os.path.isabs(s) or os.sep in s:
                        table.setdefault(s, INPUT_FOLDER_NAME)
            for s in _spellings(p):
                table[s] = public_name(p)
        self._table = table
        spellings = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
        # not preceded by a name's or path's character, not followed by one (a sentence's full stop may)
        self._pattern = re.compile(rf"(?<![\w./-])(?:{spellings})(?![\w-]|\.\w)") if table else None

    def text(self, s: str) -> str:
        if self._pattern is None:
            return s
        return self._pattern.sub(lambda m: self._table[m.group(0)], s)

    def __call__(self, obj: Any) -> Any:
        """``obj`` with every string inside it (dict keys and values, lists, tuples, dataclass fields,
        paths) rewritten; arrays and numbers are returned as they are."""
        import dataclasses

        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Path):
            return type(obj)(self.text(str(obj)))
        if isinstance(obj, dict):
            return {self(k): self(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self(v) for v in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            changes = {}
            for f in dataclasses.fields(obj):
                if not f.init:
                    continue
                value = getattr(obj, f.name)
                if isinstance(value, (str, Path, dict, list, tuple)) or dataclasses.is_dataclass(value):
                    new = self(value)
                    if new is not value:
                        changes[f.name] = new
            return dataclasses.replace(obj, **changes) if changes else obj
        return obj


# --------------------------------------------------------------------------------------- writing


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, description: str = "", tr: float | None = None,
                dtype=np.float32) -> None:
    """Write a NIfTI-1 file; spatial unit mm, time unit s (``tr`` in s for 4-D data)."""
    nib = _nib()
    arr = np.asarray(data)
    img = nib.Nifti1Image(arr.astype(dtype, copy=False), affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None and arr.ndim == 4:
        zooms = list(img.header.get_zooms())
        zooms[3] = tr
        img.header.set_zooms(zooms)
    img.header["descrip"] = description[:79].encode("ascii", "replace")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path = Path(path)
    if path.name.endswith(".gz"):
        path.write_bytes(_gzip(img.to_bytes()))
    else:
        nib.save(img, str(path))


def _gzip(raw: bytes) -> bytes:
    """gzip with ISA-L at its level 2 (about 4x faster than zlib's level 1, nibabel's default, for
    a 7 % larger file on float32 maps here); zlib level 1 where isal is missing."""
    try:
        from isal.igzip import compress

        return compress(raw, compresslevel=2)
    except ImportError:  # pragma: no cover - isal is a dependency
        import gzip

        return gzip.compress(raw, compresslevel=1)


def atomic_write(target: Path, content: str | bytes | Callable[[Path], None], *,
                 fix: str = "check free space and permissions") -> Path:
    """Write ``target`` whole or not at all: into a temporary file beside it, then ``os.replace``.

    ``content`` is text (UTF-8), bytes, or a function that writes a given path. The temporary file is
    removed on any failure, so a crash or a full disk never leaves a half-written file under the
    target's name; the file gets the mode a plain ``open`` would give (0666 less the umask). An OSError
    becomes an OutputError naming the file and ``fix``. Returns ``target``."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        tmp = Path(name)
        try:
            if callable(content):
                os.close(fd)
                content(tmp)
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc}); {fix}") from None
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as strict JSON (RFC 8259): NaN and +-Infinity, which json.dumps would write as
    the bare words NaN / Infinity that strict parsers reject, become null. Every JSON output goes
    through here."""
    Path(path).write_text(dumps_json(obj, indent=indent) + "\n", encoding="utf-8")


def dumps_json(obj: Any, *, indent: int | None = 2) -> str:
    """``obj`` as strict JSON text: numpy scalars and arrays as numbers and lists, paths as strings,
    non-finite numbers as null."""
    return json.dumps(json_safe(obj), indent=indent, sort_keys=False, allow_nan=False)


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON can hold: non-finite floats -> None, numpy -> Python,
    tuples -> lists, paths -> strings; TypeError for anything else that JSON cannot hold."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {(k.item() if isinstance(k, np.generic) else str(k) if isinstance(k, Path) else k): json_safe(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_map(folder: Path, name: str, data: np.ndarray, affine: np.ndarray, *, units: str, description: str,
              parameters: dict[str, Any] | None = None, dtype=np.float32) -> Path:
    """Write ``name``.nii.gz (or ``name`` itself when it ends in .nii.gz) and its JSON sidecar
    (``Units``, ``Description``, the parameters)."""
    folder = Path(folder)
    file = name if name.endswith(".nii.gz") else f"{name}.nii.gz"
    out = folder / file
    write_nifti(out, data, affine, description=f"{stem(Path(file))} [{units}]", dtype=dtype)
    sidecar = {"Units": units, "Description": description}
    if parameters:
        sidecar["Parameters"] = parameters
    write_json(folder / sidecar_of(file), sidecar)
    return out


def write_tsv_sidecar(path: Path, columns: dict[str, tuple[str, str]]) -> None:
    """The BIDS JSON sidecar of a TSV table: per column name, its "Description" and "Units"
    (``columns``: name -> (units, description))."""
    write_json(path, {name: {"Description": desc, "Units": units} for name, (units, desc) in columns.items()})


def write_tsv(path: Path, columns: dict[str, np.ndarray]) -> None:
    names = list(columns)
    rows = zip(*(np.asarray(columns[n]) for n in names))
    lines = ["\t".join(names)] + ["\t".join(f"{v:.6g}" for v in row) for row in rows]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def check_output_folder(out: Path, *, force: bool) -> None:
    """Refuse a non-empty output folder without ``force``, a path that is not a folder, a symbolic link
    (``out`` or a folder above it) whose target is missing, and a place that cannot take new entries:
    all before the analysis, not after it."""
    out = Path(out)
    for p in (out, *out.absolute().parents):
        if p.is_symlink() and not p.exists():  # a dangling link or a loop: nothing could be written there
            where = "" if p == out else f"{p}, a folder above it, "
            raise OutputError(f"{out}: {where}is a symbolic link to a missing target; create the target or "
                              "choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"{out}: folder is not empty; pass --force to write into it or choose another --out")
    # fail before the analysis, not after it: the nearest existing folder must take new entries
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())  # "/" at the latest
    if not existing.is_dir():
        raise OutputError(f"{out}: {existing} is not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write into {existing} (permission denied or read-only); choose another --out")


def _entry(path: Path) -> Path:
    """The directory entry ``path`` names: its folder resolved, its own name kept (a link stays a link)."""
    a = Path(path).absolute()
    return a.parent.resolve() / a.name


def _entries(paths) -> set[Path]:
    """Each path's directory entry and, for a symbolic link, the file it points to."""
    out: set[Path] = set()
    for p in paths:
        out.add(_entry(p))
        with contextlib.suppress(OSError, RuntimeError):
            out.add(Path(p).resolve())
    return out


def inputs_replaced_in(out: Path, inputs, names) -> list[Path]:
    """The input files (``inputs``: paths as given) that writing files ``names`` into folder ``out``
    would replace: an input whose directory entry, or whose target if it is a link, is ``out``/name."""
    folder = Path(out).resolve()
    targets = {folder / n for n in names}
    return [Path(p) for p in inputs if _entries([p]) & targets]


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold output folder ``out`` for one run: an exclusive flock(2) on the hidden file
    ``.<name>.lock`` beside it (its parent folders are made; removed again if ``out`` never appears).
    A second run into the same folder fails at once (OutputError) instead of replacing the first's
    files one by one. The kernel drops the lock with its process, so a run killed with SIGKILL leaves
    at most an unlocked file that the next run takes over; the file is removed when the run ends."""
    import fcntl
    import socket

    target = Path(out).resolve()  # a symlinked --out and its target share one lock
    parent, lock = target.parent, target.parent / f".{target.name}.lock"
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                _remove_empty(created)
                raise OutputError(f"{out}: another perfusion run is writing {out}; wait for it or choose another "
                                  "--out") from None
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
                os.close(fd)
                with contextlib.suppress(OSError):
                    lock.unlink()
                _remove_empty(created)
                raise OutputError(f"{out}: cannot lock the folder for this run ({exc.strerror}); choose an --out "
                                  "on a filesystem with file locks (a local disk, NFS)") from None
            try:  # the run that held it may have removed the file between our open and our lock
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())  # who holds it, for a person looking
        # staging folders of this --out left by a killed run (it held the lock, so no run is using them):
        # they hold a case's maps, which must not linger half-written
        for where in {Path(out).absolute().parent, parent, Path(out)}:
            if where.is_dir():
                for old in where.glob(f".{glob.escape(Path(out).name)}.partial-*"):
                    if old.is_dir() and not old.is_symlink():
                        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"{out}: cannot write here ({exc.strerror}); choose another --out") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        if not target.exists():
            _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders of ``created`` (innermost first) while they are empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool, stale=None, keep=()) -> Iterator[Path]:
    """Yield a private staging folder; on success move its files into ``out``, on failure remove it.

    A run that fails leaves ``out`` as it was. Each file lands by an atomic rename. ``stale``: a
    predicate on file names; files of ``out`` it accepts that the new run did not write are removed
    after the move (an earlier run's outputs, e.g. its report.html, must not pass for this run's),
    except the files of ``keep`` (the run's inputs: paths as given, links followed too).
    """
    out = Path(out)
    check_output_folder(out, force=force)
    parent = out if out.is_dir() else out.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # removed again on failure
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(stage, 0o777 & ~mask)  # mkdtemp makes 0700; the results follow the user's umask
    except OSError as exc:
        raise OutputError(f"{out}: cannot write here ({exc.strerror}); choose another --out") from None
    try:
        yield stage
        if not out.exists():
            os.rename(stage, out)
        else:
            written = set()
            for item in stage.iterdir():
                target = out / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
                written.add(item.name)
            stage.rmdir()
            if stale is not None:
                kept = _entries(keep)
                for old in out.iterdir():
                    if old.name not in written and old.is_file() and stale(old.name) and not _entries([old]) & kept:
                        old.unlink()
    except OSError as exc:
        _discard(stage, created)
        raise OutputError(f"{out}: writing the results failed ({exc.strerror or exc}); check free space and permissions") from None
    except BaseException:
        _discard(stage, created)
        raise


def _discard(stage: Path, created: list[Path]) -> None:
    """Remove a staging folder and the (empty) parent folders made for it."""
    shutil.rmtree(stage, ignore_errors=True)
    _remove_empty(created)


# ------------------------------------------------------------------------------- output file names

#: Non-NIfTI outputs: key -> plain file name. Every other key is a NIfTI map "<key>.nii.gz" (+ "<key>.json").
PLAIN_FILES = {"aif": "aif.tsv", "aif_json": "aif.json", "curves": "curves.tsv", "curves_json": "curves.json",
               "report": "report.json", "report_html": "report.html", "anat_xfm": "anat_to_dsc.tfm",
               "motion": "motion.tsv", "motion_json": "motion.json"}

#: BIDS-derivative names (batch over a BIDS dataset): "<prefix>_" + this. Map suffixes follow the BIDS
#: ASL derivatives' lower-case parameter suffixes (cbf, ...); variants carry a desc- entity; the T1 on
#: the DSC grid is space-dsc; the transform follows BIDS's from-/to- xfm naming.
BIDS_FILES = {
    "cbv": "cbv.nii.gz", "cbf": "cbf.nii.gz", "mtt": "mtt.nii.gz", "ttp": "ttp.nii.gz", "tmax": "tmax.nii.gz",
    "rcbv": "rcbv.nii.gz", "srcbv": "desc-standardized_rcbv.nii.gz", "ftb": "ftb.nii.gz", "k2": "k2.nii.gz",
    "cbv_uncorrected": "desc-uncorrected_cbv.nii.gz",
    "gv_cbv": "desc-gammavariate_cbv.nii.gz", "gv_peak": "desc-gammavariate_peak.nii.gz",
    "gv_ttp": "desc-gammavariate_ttp.nii.gz", "gv_fwhm": "desc-gammavariate_fwhm.nii.gz",
    "gv_quality": "desc-gammavariate_quality.nii.gz",
    "brain_mask": "desc-brain_mask.nii.gz", "aif_mask": "desc-aif_mask.nii.gz",
    "reference_mask": "desc-reference_mask.nii.gz", "baseline": "desc-baseline_dsc.nii.gz",
    "anat": "space-dsc_T1w.nii.gz", "anat_xfm": "from-T1w_to-dsc_mode-image_xfm.tfm",
    "aif": "desc-aif_timeseries.tsv", "aif_json": "desc-aif_timeseries.json",
    "curves": "desc-curves_timeseries.tsv", "curves_json": "desc-curves_timeseries.json",
    "motion": "desc-motion_timeseries.tsv", "motion_json": "desc-motion_timeseries.json",
    "report": "report.json", "report_html": "report.html",
}


def output_file(key: str, prefix: str | None = None) -> str:
    """File name of output ``key`` in an analyze folder: plain ("cbv.nii.gz") or, with a BIDS ``prefix``
    ("sub-01_ses-1"), BIDS-derivative ("sub-01_ses-1_cbv.nii.gz")."""
    if prefix:
        return f"{prefix}_{BIDS_FILES[key]}"
    return PLAIN_FILES.get(key, f"{key}.nii.gz")


def is_analyze_output(name: str) -> bool:
    """True for a file name that ``perfusion analyze`` writes in plain naming (maps and their sidecars,
    tables, reports, mask copies)."""
    known = {output_file(k) for k in BIDS_FILES}
    known |= {sidecar_of(n) for n in known if n.endswith(".nii.gz")}
    return name in known or bool(re.fullmatch(r"mask-[A-Za-z0-9._-]+\.(nii\.gz|json)", name))


def analyze_output_names(roi_names=(), prefix: str | None = None) -> set[str]:
    """Every file name an analyze run with ROIs ``roi_names`` may write into its folder (which of them
    it writes depends on the options and the data: ftb only with ROIs, k2 only with leakage, ...)."""
    names = {output_file(k, prefix) for k in BIDS_FILES} | set(roi_mask_files(list(roi_names), prefix).values())
    return names | {sidecar_of(n) for n in names if n.endswith(".nii.gz")}


def sidecar_of(name: str) -> str:
    """JSON sidecar file name of a NIfTI output file name."""
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".json"
    return name + ".json"


def roi_mask_files(names, prefix: str | None = None) -> dict[str, str]:
    """ROI name -> file name of its mask's copy: plain ``mask-<name>.nii.gz`` with characters outside
    [A-Za-z0-9._-] replaced by '_'; BIDS ``<prefix>_label-<alphanumeric name>_mask.nii.gz``. Numbered
    where two names collide."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        if prefix:
            base = f"{prefix}_label-{re.sub(r'[^A-Za-z0-9]', '', name) or 'roi'}"
            end = "_mask.nii.gz"
        else:
            base = "mask-" + (re.sub(r"[^A-Za-z0-9._-]", "_", name) or "roi")
            end = ".nii.gz"
        stem_, k = base, 2
        while stem_ in used:
            stem_, k = f"{base}{k}" if prefix else f"{base}-{k}", k + 1
        used.add(stem_)
        out[name] = stem_ + end
    return out


def find_report(folder: Path) -> Path:
    """report.json of an analyze output folder, or its one BIDS-named ``*_report.json``; InputError otherwise."""
    folder = Path(folder)
    plain = folder / "report.json"
    if plain.is_file():
        return plain
    named = sorted(p for p in folder.glob("*_report.json") if p.is_file())
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise InputError(f"{folder}: holds {len(named)} *_report.json files; give the folder of one analysis")
    raise InputError(f"{plain}: not found; give a folder written by 'perfusion analyze'")


def output_path(folder: Path, report: dict, key: str) -> Path:
    """Path of output ``key`` in ``folder`` by report.json "files", or its plain name (older reports)."""
    files = report.get("files") if isinstance(report.get("files"), dict) else {}
    name = files.get(key) or output_file(key)
    return Path(folder) / Path(str(name)).name
