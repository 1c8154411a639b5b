"""Writing files: NIfTI maps with their JSON sidecars (``Units``), strict JSON, TSV tables.

Every file is written whole or not at all (:func:`atomic_write`: a temporary file beside the target,
then a rename), so a crash or a full disk never leaves a half-written file under an output's name.
Maps are written into a staging folder that replaces the output folder as a whole
(:func:`perfusion.io.folders.staged_output`); there a failed write raises the OSError itself, which
the staging reports naming the output folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from perfusion.errors import OutputError
from perfusion.io.names import sidecar_of
from perfusion.io.nifti import stem


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, description: str = "", tr: float | None = None,
                dtype=np.float32) -> None:
    """Write a NIfTI-1 file (gzip-compressed for a name ending in .gz) whole or not at all; spatial unit
    mm, time unit s (``tr`` in s for 4-D data). An OSError propagates (see the module docstring)."""
    import nibabel

    arr = np.asarray(data)
    img = nibabel.Nifti1Image(arr.astype(dtype, copy=False), affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None and arr.ndim == 4:
        zooms = list(img.header.get_zooms())
        zooms[3] = tr
        img.header.set_zooms(zooms)
    img.header["descrip"] = description[:79].encode("ascii", "replace")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    raw = img.to_bytes()  # the single-file image nibabel.save writes for .nii
    atomic_write(path, _gzip(raw) if Path(path).name.endswith(".gz") else raw, fix=None)


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
                 fix: str | None = "check free space and permissions") -> Path:
    """Write ``target`` whole or not at all: into a temporary file beside it, then ``os.replace``.

    ``content`` is text (UTF-8), bytes, or a function that writes a given path. The temporary file is
    removed on any failure, so a crash or a full disk never leaves a half-written file under the
    target's name; the file gets the mode a plain ``open`` would give (0666 less the umask). An OSError
    becomes an OutputError naming the file and ``fix``; with ``fix=None`` the OSError itself
    propagates, for a caller that reports it with more context (staged_output names the output folder,
    not its staging folder). Returns ``target``."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        tmp = Path(name)
        try:
            if callable(content):
                content(tmp)
            else:
                tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        if fix is None:
            raise
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc}); {fix}") from None
    return target


def current_umask() -> int:
    """The process's file-mode creation mask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as strict JSON (RFC 8259), whole or not at all: NaN and +-Infinity, which
    json.dumps would write as the bare words NaN / Infinity that strict parsers reject, become null.
    Every JSON output goes through here. An OSError propagates (see the module docstring)."""
    atomic_write(path, dumps_json(obj, indent=indent) + "\n", fix=None)


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
              parameters: dict[str, Any] | None = None, dtype=np.float32, extra: dict[str, Any] | None = None) -> Path:
    """Write ``name``.nii.gz (or ``name`` itself when it ends in .nii.gz) and its JSON sidecar
    (``Units``, ``Description``, ``extra``'s fields such as BIDS ``Sources``, the parameters)."""
    folder = Path(folder)
    file = name if name.endswith(".nii.gz") else f"{name}.nii.gz"
    out = folder / file
    write_nifti(out, data, affine, description=f"{stem(Path(file))} [{units}]", dtype=dtype)
    sidecar: dict[str, Any] = {"Units": units, "Description": description, **(extra or {})}
    if parameters:
        sidecar["Parameters"] = parameters
    write_json(folder / sidecar_of(file), sidecar)
    return out


def write_tsv_sidecar(path: Path, columns: dict[str, tuple[str, str]], *, extra: dict[str, Any] | None = None) -> None:
    """The BIDS JSON sidecar of a TSV table: per column name, its "Description" and "Units"
    (``columns``: name -> (units, description)), after ``extra``'s fields (such as BIDS ``Sources``)."""
    write_json(path, {**(extra or {}),
                      **{name: {"Description": desc, "Units": units} for name, (units, desc) in columns.items()}})


def write_tsv(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Write a TSV table whole or not at all: a header row of the column names, then one row per
    sample, each value with 6 significant digits. An OSError propagates (see the module docstring)."""
    names = list(columns)
    rows = zip(*(np.asarray(columns[n]) for n in names), strict=False)
    lines = ["\t".join(names)] + ["\t".join(f"{v:.6g}" for v in row) for row in rows]
    atomic_write(path, "\n".join(lines) + "\n", fix=None)
