"""Reading NIfTI files safely: the one place nibabel opens an input image.

A file is refused (InputError, one line) before nibabel allocates what a broken or hostile header
promises: a .nii.gz is decompressed only as far as its header says the image reaches
(:func:`read_image`). Signal arrays leave here float32, C-ordered with time last
(:func:`signal_float32`), scaled by a power of two where float32 sums could overflow.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from perfusion.errors import InputError


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


def read_image(path: Path, what: str):
    """A NIfTI file (``what`` names it in errors) as nibabel's image and its data (scaling applied, the
    file's dtype). InputError, one line, for a missing or non-NIfTI file, a header promising more data
    than the file holds (checked before nibabel allocates it), a broken file, or values that are not
    real numbers (complex, RGB). nibabel's log lines are silenced (:func:`_quiet_nibabel`)."""
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
    decompressobj: Callable[..., Any]  # isal's and zlib's: the same call, typed apart in their stubs
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


def load_volume(path: Path, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D image (float32, scaling applied; a 4-D file with one volume counts) and its affine."""
    path = Path(path)
    img, _ = read_image(path, what)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: {what} has shape {tuple(img.shape)}, not one 3-D volume; "
                         "give a single 3-D image")
    data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    if not np.any(np.isfinite(data) & (data != 0)):  # zeros and Inf only: no image
        raise InputError(f"{path}: {what} holds no non-zero finite value; give the image itself")
    return data, image_affine(img, path, what)


def image_affine(img, path: Path, what: str) -> np.ndarray:
    """The image's voxel-to-world affine (float64); InputError when not finite or not invertible (the
    maps written on its grid could not be placed)."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or np.linalg.det(affine[:3, :3]) == 0:
        raise InputError(f"{path}: the header's affine (sform/qform) is not finite and invertible; "
                         f"fix the header or re-export the {what}")
    return affine


def load_array(path: Path, *, what: str = "image") -> np.ndarray:
    """The data of a NIfTI file as float64, scaling applied (for reference data and tests)."""
    img, _ = read_image(Path(path), what)
    with _quiet_nibabel():
        return np.asarray(img.get_fdata(dtype=np.float64))


def load_array_affine(path: Path, *, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """The data of a NIfTI file as float64 (scaling applied) and its voxel-to-world affine (mm)."""
    img, _ = read_image(Path(path), what)
    with _quiet_nibabel():
        return np.asarray(img.get_fdata(dtype=np.float64)), image_affine(img, Path(path), what)
