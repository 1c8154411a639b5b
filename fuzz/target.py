"""The fuzz target of the NIfTI and sidecar loader (issue 9): mutated headers, data, gzip streams and
JSON sidecars go through ``perfusion.io.load_series`` (then ``load_mask`` and ``load_volume``), and
every input must end in a result that keeps the loader's promises or in a clean ``InputError``.

Importable without atheris: ``one_input(data)`` reads its choices from ``data`` with the small
``Draw`` below, so ``tests/test_fuzz.py`` replays the committed corpus and regressions with pytest
alone, and ``fuzz/run.py`` hands it to atheris. Choices read as 0 once the bytes run out, and every
first choice is the benign one: the empty input is the valid case and must load.

The oracle (``AssertionError`` when broken; any other exception propagates and is a crash):
- a result: ``Series.data`` float32, 4-D, C-ordered, non-empty, finite, at least MIN_FRAMES frames;
  TE and TR finite floats in (0, MAX_TE_S] and (0, MAX_TR_S]; a finite, invertible affine. A mask
  is bool on the series grid with a voxel in it; a volume float32 3-D with a non-zero finite value.
- an ``InputError``: one line, naming the file at fault (the image, or the series' sidecar).
- either way, the process's peak memory grew by less than MAX_RSS_GROWTH_MB: the test files are a
  few kB, so a loader that allocates what a header claims instead of what the file holds fails here
  (the growth of a peak: blind to an allocation below an earlier peak, never a false alarm).
Warnings are ignored (the CLI records or hides them) except numpy's ComplexWarning, an error here:
casting complex data to real silently drops the imaginary part, so it must be refused, not warned.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import resource
import sys
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

import perfusion.io as pio
from perfusion.errors import InputError
from perfusion.units import MAX_TE_S, MAX_TR_S

# ---------------------------------------------------------------------------------- reading choices


class Draw:
    """Choices read from the fuzz bytes, front to back; 0 once they run out."""

    def __init__(self, data: bytes):
        self._data = bytes(data)
        self._pos = 0

    def byte(self) -> int:
        if self._pos >= len(self._data):
            return 0
        self._pos += 1
        return self._data[self._pos - 1]

    def below(self, n: int) -> int:
        """An int in [0, n): one byte for n <= 256, four bytes above."""
        if n <= 1:
            return 0
        if n <= 256:
            return self.byte() % n
        return int.from_bytes(self.raw(4).ljust(4, b"\0"), "little") % n

    def one_in(self, k: int) -> bool:
        """True with probability about 1/k (never for exhausted input when k > 1)."""
        return self.below(k) == k - 1

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def raw(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer when the input runs out)."""
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def float64(self) -> float:
        return float(np.frombuffer(self.raw(8).ljust(8, b"\0"), "<f8")[0])


# ------------------------------------------------------------------------------------ the valid case

SHAPE = (4, 4, 2)
N_T = 20
AFFINE = np.array([[2.0, 0.0, 0.0, -4.0], [0.0, 2.0, 0.0, -4.0], [0.0, 0.0, 3.0, -3.0], [0.0, 0.0, 0.0, 1.0]])
TR_S = 1.5
SIDECAR = {"EchoTime": 0.03, "RepetitionTime": TR_S}


def _signal() -> np.ndarray:
    """Baseline 1000 a.u. with a little noise, a bolus dip over frames 6-11; (x, y, z, t)."""
    rng = np.random.default_rng(9)
    t = np.arange(N_T)
    dip = 1.0 - 0.4 * np.exp(-0.5 * ((t - 8.0) / 1.5) ** 2)
    return 1000.0 * dip + rng.normal(0.0, 5.0, SHAPE + (N_T,))


def _mask() -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[1:3, 1:3, :] = 1
    return m


class Base:
    """A valid NIfTI file split into its parts: header, the 4 extension-flag bytes, data."""

    def __init__(self, img, order: str):
        img.header.set_xyzt_units("mm", "sec")
        if len(img.shape) == 4:
            img.header.set_zooms(img.header.get_zooms()[:3] + (TR_S,))
        img.set_sform(AFFINE, code=1)
        img.set_qform(AFFINE, code=1)
        if order == ">":
            img = img.__class__(img.dataobj, img.affine, img.header.as_byteswapped(">"))
        raw = img.to_bytes()
        self.klass = type(img)
        self.order = order
        self.hsize = img.header.sizeof_hdr
        offset = int(img.header["vox_offset"])
        self.header = raw[: self.hsize]
        self.gap = raw[self.hsize : offset]  # the extension flag (4 bytes, zero)
        self.data = raw[offset:]
        dt = img.header.structarr.dtype
        #: (name, offset, element dtype, count) of every header field
        self.fields = [(name, off, sub.base, int(np.prod(sub.shape)) if sub.shape else 1)
                       for name, (sub, off) in dt.fields.items()]


def _bases():
    signal = _signal()
    return {
        "series": [
            Base(nib.Nifti1Image(signal.astype(np.int16), AFFINE), "<"),
            Base(nib.Nifti1Image(signal.astype(np.float32), AFFINE), "<"),
            Base(nib.Nifti1Image(signal.astype(np.int16), AFFINE), ">"),
            Base(nib.Nifti2Image(signal.astype(np.float64), AFFINE), "<"),
            Base(nib.Nifti1Image(signal.astype(np.int32), AFFINE), "<"),
        ],
        "mask": [
            Base(nib.Nifti1Image(_mask(), AFFINE), "<"),
            Base(nib.Nifti1Image(_mask()[..., None].astype(np.float32), AFFINE), "<"),
            Base(nib.Nifti2Image(_mask().astype(np.int16), AFFINE), ">"),
        ],
    }


BASES = _bases()

# --------------------------------------------------------------------------------- interesting values

INT_VALUES = [0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 20, 127, 128, 255, 256, 348, 352, 540, 544, 32767, -32768,
              65535, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63)]
FLOAT_VALUES = [0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 2.0, 1000.0, 1e-30, 1e-45, 1e30, 3.4e38, 1e300, -1e30,
                math.nan, math.inf, -math.inf]
#: Values that mean something in particular header fields (NIfTI-1 and -2 share the names).
FIELD_VALUES = {
    "sizeof_hdr": [348, 540, 0, int.from_bytes((348).to_bytes(4, "little"), "big"),
                   int.from_bytes((540).to_bytes(4, "little"), "big")],
    "dim": [0, 1, 2, 3, 4, 5, 6, 7, 8, -1, 15, 20, 21, 1000, 27307, 32767, -32768, 2**31 - 1],
    "datatype": [0, 1, 2, 4, 8, 16, 32, 64, 128, 255, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304,
                 32767],
    "bitpix": [0, 1, 8, 16, 24, 32, 64, 128, 7],
    "vox_offset": [0, 16, 348, 352, 353, 540, 544, 560, 1 << 20, 2**31, -16, math.nan, math.inf, 352.5],
    "scl_slope": [0.0, 1.0, -1.0, 2.0, 1e38, 1e-38, math.nan, math.inf, -math.inf],
    "scl_inter": [0.0, 1.0, -1000.0, 1e38, math.nan, math.inf],
    "xyzt_units": [0, 2, 8, 10, 16, 18, 24, 26, 32, 40, 48, 56, 64, 255],
    "qform_code": [0, 1, 2, 3, 4, 5, -1, 6, 32767],
    "sform_code": [0, 1, 2, 3, 4, 5, -1, 6, 32767],
    "intent_code": [0, 2, 1001, 1002, 1007, 1011, 2001, 2005, 3000, 3001, 32767],
    "glmin": [0, 1, 160, 163842, 2**20, 2**31 - 1, -1],
    "pixdim": [0.0, 1.0, -1.0, 1.5, 1500.0, 0.0015, 1e-30, 1e30, math.nan, math.inf],
    "magic": [b"n+1\0", b"ni1\0", b"n+2\0\r\n\x1a\n", b"ni2\0\r\n\x1a\n", b"\0\0\0\0", b"n+1", b"N+1\0"],
}


def _encode(value, base: np.dtype, order: str, size: int) -> bytes:
    """``value`` as the bytes of one element of ``base`` (wrapping integers, float32 overflow to inf)."""
    if base.kind in "iu":
        if isinstance(value, float):
            value = int(value) if math.isfinite(value) else 0
        return (int(value) & ((1 << (8 * size)) - 1)).to_bytes(size, "little" if order == "<" else "big")
    if base.kind == "f":
        if isinstance(value, bytes):
            return value.ljust(size, b"\0")[:size]
        with np.errstate(over="ignore", invalid="ignore"):
            return np.array(float(value), np.float64).astype(base.newbyteorder(order)).tobytes()
    if isinstance(value, (int, float)):
        value = str(value).encode()
    return bytes(value).ljust(size, b"\0")[:size]


def _mutate_header(d: Draw, base: Base, header: bytearray) -> None:
    kind = d.below(4)
    if kind <= 1:  # a field to an interesting value
        name, off, elem, count = d.pick(base.fields)
        i = d.below(count)
        size = elem.itemsize
        at = off + i * size
        source = d.below(4)
        if source == 0 and name in FIELD_VALUES:
            value = d.pick(FIELD_VALUES[name])
        elif source <= 1:
            value = d.pick(FLOAT_VALUES if elem.kind == "f" else INT_VALUES if elem.kind in "iu" else
                           [b"", b"\xff" * size, b"n+1\0", b"x" * size])
        elif source == 2:  # the same value byte-swapped
            header[at : at + size] = bytes(reversed(header[at : at + size]))
            return
        else:
            value = d.raw(size).ljust(size, b"\0")
            header[at : at + size] = value
            return
        header[at : at + size] = _encode(value, elem, base.order, size)
    elif kind == 2:  # flip one bit
        at = d.below(len(header))
        header[at] ^= 1 << d.below(8)
    else:  # overwrite a run of bytes
        at = d.below(len(header))
        chunk = d.raw(1 + d.below(8))
        header[at : at + len(chunk)] = chunk
        del header[len(base.header):]  # keep the length


def _extension(d: Draw, order: str) -> bytes:
    """One NIfTI header extension: esize, ecode, content; sizes sometimes wrong."""
    code = d.pick([6, 0, 2, 4, 14, 16, 32, 40, 44, 1, 99, -2])
    content = d.pick([b"comment", b"", b"<xml/>", bytes(range(32)), b"\x02\x00\x10\x00" * 4]) + d.raw(d.below(24))
    size = 8 + len(content)
    size += -size % 16
    esize = d.pick([size, size, 0, 8, 15, 16, 17, size + 16, -16, 2**31 - 1, 1 << 20])
    end = "little" if order == "<" else "big"
    return (esize & 0xFFFFFFFF).to_bytes(4, end) + (code & 0xFFFFFFFF).to_bytes(4, end) + content.ljust(size - 8, b"\0")


def _mutate_data(d: Draw, data: bytearray) -> bytearray:
    kind = d.below(5)
    if kind == 0:  # truncate
        cut = d.pick([0, 1, 2, len(data) // 2, len(data) - 1, d.below(len(data) + 1)])
        return data[:cut]
    if kind == 1:  # extend
        return data + d.pick([b"\0", b"\0" * 16, b"\xff" * 7, b"\0" * len(data)]) + d.raw(d.below(16))
    if kind == 2:  # NaN / Inf / huge patterns, float32 or float64, either byte order
        width = d.pick([4, 8])
        pattern = d.pick([math.nan, math.inf, -math.inf, 3.4e38, -1e300, 1e-45])
        with np.errstate(over="ignore"):
            word = np.array(pattern, np.float64).astype(d.pick(["<", ">"]) + f"f{width}").tobytes()
        for _ in range(1 + d.below(4)):
            if len(data) >= width:
                at = d.below(len(data) // width) * width
                data[at : at + width] = word
        return data
    if kind == 3:  # random bytes
        at = d.below(len(data) + 1)
        chunk = d.raw(1 + d.below(32))
        data[at : at + len(chunk)] = chunk
        return data
    data[:] = bytes(len(data))  # all zero
    return data


def _nifti_bytes(d: Draw, bases: list[Base]) -> tuple[bytes, str]:
    """A mutated NIfTI file (bytes) and its suffix, .nii or .nii.gz."""
    base = bases[d.below(len(bases))] if d.below(4) == 3 else bases[0]
    header = bytearray(base.header)
    gap = bytearray(base.gap)
    data = bytearray(base.data)
    if d.one_in(6):  # header extensions, vox_offset following them
        gap = bytearray(b"\1\0\0\0")
        for _ in range(1 + d.below(3)):
            gap += _extension(d, base.order)
        name, off, elem, _ = next(f for f in base.fields if f[0] == "vox_offset")
        header[off : off + elem.itemsize] = _encode(base.hsize + len(gap), elem, base.order, elem.itemsize)
    for _ in range(d.below(6)):
        _mutate_header(d, base, header)
    if d.one_in(3):
        data = _mutate_data(d, data)
    if d.one_in(8):
        gap = bytearray(d.raw(d.below(8)))  # a damaged extension flag
    raw = bytes(header + gap + data)
    if d.below(2) == 0:
        return raw, ".nii"
    packed = bytearray(gzip.compress(raw, compresslevel=1, mtime=0))
    damage = d.below(8)
    if damage == 1:
        packed = packed[: d.below(len(packed))]
    elif damage == 2:
        at = 10 + d.below(len(packed) - 10)
        packed[at] ^= 1 << d.below(8)
    elif damage == 3:
        packed[-8:] = d.raw(8).ljust(8, b"\0")  # CRC and length
    elif damage == 4:
        packed = packed + packed  # two members: the data twice
    elif damage == 5:
        packed += d.raw(1 + d.below(8)) or b"\0"  # trailing garbage
    return bytes(packed), ".nii.gz"


# ------------------------------------------------------------------------------------------ sidecars

#: JSON texts of values a sidecar's EchoTime or RepetitionTime might hold.
JSON_VALUES = ['0.03', '1.5', '0', '-0.03', '-1', '30', '1500', '0.2', '0.2000001', '10', '10.5', '1e-300',
               '5e-324', '1e400', '-1e400', 'NaN', 'Infinity', '-Infinity', '1' + '0' * 400, '1' + '0' * 5000,
               '"0.03"', '"1.5"', '"abc"', '""', '" 1.5 "', '"1_5"', '"nan"', '"inf"', '"\\ud800"', '[0.03]',
               '[]', '{}', '{"value": 0.03}', 'null', 'true', 'false', '1', '0.03e0', '3e-2']


def _sidecar(d: Draw) -> bytes | None:
    """The sidecar's bytes, or None for no sidecar (b'/' makes a folder of that name)."""
    kind = d.below(16)
    if kind <= 3:
        return json.dumps(SIDECAR).encode()
    if kind == 4:
        return None
    if kind <= 9:  # keys missing, values of every kind, extra keys
        items = {"EchoTime": "0.03", "RepetitionTime": "1.5"}
        for _ in range(1 + d.below(3)):
            key = d.pick(["EchoTime", "RepetitionTime", "EchoTime", "RepetitionTime", "Other", "echotime",
                          "EchoTime ", "\u00e9"])
            if d.one_in(4):
                items.pop(key, None)
            else:
                items[key] = d.pick(JSON_VALUES)
        text = "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items.items()) + "}"
        if d.one_in(8):
            text = text[:-1] + ', "EchoTime": ' + d.pick(JSON_VALUES) + "}"  # a duplicate key
        return text.encode()
    if kind == 10:  # invalid JSON
        text = json.dumps(SIDECAR).encode()
        return d.pick([text[: d.below(len(text))], b"", b"{", b"{'EchoTime': 0.03}", b"\0" * 4, text + b"}",
                       b"{\"EchoTime\": 0.03,}"]) + d.raw(d.below(4))
    if kind == 11:  # not UTF-8, or another encoding
        text = json.dumps(SIDECAR)
        return d.pick([b'{"EchoTime": 0.03, "RepetitionTime": 1.5, "x": "\xff\xfe"}', b"\xef\xbb\xbf" + text.encode(),
                       text.encode("utf-16"), text.encode("utf-32"), b"\x80" + d.raw(8)])
    if kind == 12:  # not an object
        return d.pick([b"[0.03, 1.5]", b"0.03", b'"sidecar"', b"null", b"true", b"[]", b'[{"EchoTime": 0.03}]'])
    if kind == 13:  # deep nesting, at the top or inside a value
        depth = d.pick([10, 500, 5000, 100_000])
        opener, closer = d.pick([("[", "]"), ('{"a": ', "}")])
        nested = opener * depth + "0" + closer * depth
        return (nested if d.below(2) else '{"EchoTime": 0.03, "RepetitionTime": 1.5, "x": ' + nested + "}").encode()
    if kind == 14:
        return b"/"
    return d.raw(d.below(64))  # raw bytes


# ------------------------------------------------------------------------------------------ the oracle


def _check_error(exc: InputError, *paths: Path) -> None:
    msg = str(exc)
    if not msg or msg.splitlines() != [msg]:
        raise AssertionError(f"InputError message is not one line: {msg!r}")
    if not any(str(p) in msg for p in paths):
        raise AssertionError(f"InputError message names none of {[str(p) for p in paths]}: {msg!r}")


def _check_affine(affine, what: str) -> None:
    a = np.asarray(affine)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or np.linalg.det(a[:3, :3]) == 0:
        raise AssertionError(f"{what}: affine not a finite invertible 4x4: {a!r}")


def _check_series(s) -> None:
    d = s.data
    if not (isinstance(d, np.ndarray) and d.dtype == np.float32 and d.ndim == 4 and d.flags["C_CONTIGUOUS"]):
        raise AssertionError(f"series data not a C-ordered float32 4-D array: {type(d)} {getattr(d, 'dtype', None)}")
    if d.size == 0 or d.shape[3] < pio.MIN_FRAMES:
        raise AssertionError(f"series of shape {d.shape} accepted")
    if not np.all(np.isfinite(d)):
        raise AssertionError("series with NaN or Inf accepted")
    for name, value, limit in (("te", s.te, MAX_TE_S), ("tr", s.tr, MAX_TR_S)):
        if not (isinstance(value, float) and math.isfinite(value) and 0 < value <= limit):
            raise AssertionError(f"{name} {value!r} accepted")
    _check_affine(s.affine, "series")


def _check_mask(m, s) -> None:
    if not (isinstance(m, np.ndarray) and m.dtype == bool and m.shape == s.shape3d and m.any()):
        raise AssertionError(f"mask not a non-empty bool array of shape {s.shape3d}: "
                             f"{getattr(m, 'dtype', None)} {getattr(m, 'shape', None)}")


def _check_volume(data, affine) -> None:
    if not (isinstance(data, np.ndarray) and data.dtype == np.float32 and data.ndim == 3):
        raise AssertionError(f"volume not a float32 3-D array: {getattr(data, 'dtype', None)} {getattr(data, 'shape', None)}")
    if not np.any(np.isfinite(data) & (data != 0)):
        raise AssertionError("volume without a non-zero finite value accepted")
    _check_affine(affine, "volume")


#: Most the peak resident memory may grow while one input runs, in MB (the inputs are a few kB).
MAX_RSS_GROWTH_MB = 256


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


TIMES = [0.03, 1.5, 0.0, -1.0, 30.0, 1500.0, 0.2, 10.0, 10.000001, 1e-300, math.nan, math.inf, -math.inf, 5e-324]


class _LogRecorder(logging.Handler):
    """Keeps what reaches nibabel's logger's handlers: in a command that would be printed on stderr
    beside the one error line, so the loader must keep it from getting there."""

    def __init__(self):
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _quiet():
    """Ignore warnings except ComplexWarning (an error). nibabel's log: its own stderr handler is set
    aside for the input (no noise in the fuzz log) and a recorder takes its place; a record means the
    loader let nibabel print (AssertionError)."""
    logger = logging.getLogger("nibabel.global")
    handlers = logger.handlers[:]
    recorder = _LogRecorder()
    logger.handlers = [recorder]
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", np.exceptions.ComplexWarning)
            yield
    finally:
        logger.handlers = handlers
    if recorder.records:
        raise AssertionError(f"nibabel printed to stderr: {recorder.records[0].getMessage()}")


def run_input(data: bytes) -> str:
    """Run one input; return its outcome ("ok ..." or the InputError with the folder left out), raise
    AssertionError when the oracle fails, let any other exception through."""
    d = Draw(data)
    series_bytes, suffix = _nifti_bytes(d, BASES["series"])
    sidecar = _sidecar(d)
    te = d.pick(TIMES) if d.one_in(5) else None
    tr = d.pick(TIMES) if d.one_in(5) else None
    mask_step = d.below(4)  # 1: load_mask, 2: load_mask and load_volume, 3: load_volume
    if mask_step:
        mask_bytes, mask_suffix = _nifti_bytes(d, BASES["mask"])
    outcome = []
    with tempfile.TemporaryDirectory(prefix="perfusion-fuzz-") as tmp, _quiet():
        folder = Path(tmp)
        path = folder / f"dsc{suffix}"
        path.write_bytes(series_bytes)
        sc_path = folder / "dsc.json"
        if sidecar == b"/":
            sc_path.mkdir()
        elif sidecar is not None:
            sc_path.write_bytes(sidecar)
        try:
            s = pio.load_series(path, te=te, tr=tr)
        except InputError as exc:
            _check_error(exc, path, sc_path)
            return str(exc).replace(tmp, "")
        _check_series(s)
        outcome.append("ok series")
        if mask_step:
            mpath = folder / f"mask{mask_suffix}"
            mpath.write_bytes(mask_bytes)
            if mask_step in (1, 2):
                try:
                    _check_mask(pio.load_mask(mpath, s, what="brain mask", labels="merge"), s)  # as analyze --mask
                    outcome.append("ok mask")
                except InputError as exc:
                    _check_error(exc, mpath)
                    outcome.append(str(exc).replace(tmp, ""))
            if mask_step in (2, 3):
                try:
                    _check_volume(*pio.load_volume(mpath, what="anatomical image"))
                    outcome.append("ok volume")
                except InputError as exc:
                    _check_error(exc, mpath)
                    outcome.append(str(exc).replace(tmp, ""))
    return "; ".join(outcome)


def one_input(data: bytes) -> None:
    """The fuzz target: one input, checked by the oracle."""
    before = _peak_rss_mb()
    run_input(data)
    grown = _peak_rss_mb() - before
    if grown > MAX_RSS_GROWTH_MB:
        raise AssertionError(f"peak memory grew by {grown:.0f} MB while loading a few kB")


if __name__ == "__main__":  # replay files: python fuzz/target.py FILE...
    for name in sys.argv[1:]:
        print(f"{name}: {run_input(Path(name).read_bytes())}")
