"""The DSC series and its timing: units are fixed here and nowhere else.

TE and TR leave this module in seconds whatever the file said (sidecar, header time unit, option),
checked against :data:`perfusion.units.MAX_TE_S` / ``MAX_TR_S`` so that milliseconds are refused with
the value in seconds to give instead. Arrays are ``(x, y, z, t)``, time last, as nibabel returns them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perfusion.errors import InputError
from perfusion.io.nifti import image_affine, read_image, read_json_object, sidecar_path_for, signal_float32
from perfusion.units import MAX_TE_S, MAX_TR_S, NIFTI_TIME_UNIT_TO_S

#: Fewest frames a DSC series may have: a baseline of a few frames, the bolus and its tail.
MIN_FRAMES = 15


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
    # True once pipeline.repair_series has checked (and repaired) the frames: the check reads every
    # voxel of every frame, and case.analyze_case runs it before head motion, so analyze need not again
    frames_checked: bool = False

    @property
    def shape3d(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[:3])

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


def _read_sidecar(path: Path) -> dict[str, Any]:
    """The series' JSON sidecar (an object); InputError naming it when it is not valid JSON."""
    return read_json_object(path, what="sidecar", fix="fix or remove it")


def _merged_sidecar(chain: list[Path]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The sidecars of ``chain`` (most general first) merged, a later file's keys overriding, and the file
    each key came from."""
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for file in chain:
        for key, value in _read_sidecar(file).items():
            merged[key], origin[key] = value, file
    return merged, origin


def inherited_sidecars(path: Path) -> list[Path]:
    """The JSON sidecars that apply to the series ``path`` by the BIDS inheritance principle, most general
    first: inside a BIDS dataset (a ``dataset_description.json`` at most three folders above the file:
    ``sub-*/[ses-*/]perf/``), every ``[<entities>_]<suffix>.json`` of the dataset's top folder and of each
    folder down to the file's whose entities the file also carries (``dsc.json`` at the top applies to
    every ``*_dsc.nii.gz``; ``sub-01/sub-01_dsc.json`` to sub-01's), then by fewer entities first; the
    file's own twin is the most specific. Outside a BIDS dataset: the twin alone, when present. Only
    folder listings are read here."""
    path = Path(path)
    twin = sidecar_path_for(path)
    name = twin.name[: -len(".json")]
    parts = name.split("_")
    suffix, own = parts[-1], set(parts[:-1])
    folders = [path.parent, *list(path.parent.parents)[:3]]
    root = next((f for f in folders if (f / "dataset_description.json").is_file()), None)
    if root is None:
        return [twin] if twin.is_file() else []
    chain: list[Path] = []
    for folder in reversed(folders[: folders.index(root) + 1]):
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
        except OSError:
            continue
        level = []
        for n in names:
            ents = n[: -len(".json")].split("_")
            if ents[-1] == suffix and set(ents[:-1]) <= own and (folder / n).is_file():
                level.append((len(ents), folder / n))
        chain += [p for _, p in sorted(level)]
    return chain


def check_time(value: Any, *, name: str, flag: str, limit: float, source: str, path: Path) -> float:
    """``value`` (TE or TR from ``source``) as a positive float in s; InputError naming ``flag`` for
    anything else, and for a value above ``limit`` (s), which is taken for milliseconds."""
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
    img, raw = read_image(path, "DSC series")
    if raw.ndim == 5 and raw.shape[3] == 1:
        raw = raw[:, :, :, 0, :]
    if raw.ndim != 4:
        raise InputError(f"{path}: DSC series must be 4-D (x, y, z, time), got shape {raw.shape}; give the "
                         "dynamic series")
    if raw.shape[3] < MIN_FRAMES:
        raise InputError(
            f"{path}: only {raw.shape[3]} frames; a DSC series needs at least {MIN_FRAMES} (baseline, bolus, tail)"
        )
    affine = image_affine(img, path, "DSC series")
    # raw is nibabel's scaled array (scl_slope/inter applied); integers that stayed integers are finite
    data, scaled = signal_float32(raw, where=str(path), nonfinite="contains NaN or Inf values; re-export the series "
                                                                  "without them")
    if scaled:
        warnings.warn(scaled, stacklevel=2)

    sc_path = sidecar_path_for(path)
    chain = inherited_sidecars(path)  # [the twin] outside a BIDS dataset
    sidecar, origin = _merged_sidecar(chain)
    te_s, te_source = _echo_time(te, sidecar, origin.get("EchoTime", sc_path), path)
    header_tr = _header_tr(img)
    tr_s, tr_source = _repetition_time(tr, sidecar, origin.get("RepetitionTime", sc_path), header_tr, path)
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
        sidecar_path=chain[-1] if sidecar else None,
        sidecar=sidecar,
    )


def _echo_time(te: float | None, sidecar: dict[str, Any], sc_path: Path, path: Path) -> tuple[float, str]:
    """TE (s) of the series ``path`` and where it came from: ``te`` if given, else the sidecar's EchoTime."""
    sc_name = f"sidecar {sc_path.name}"
    if te is not None:
        return check_time(te, name="TE", flag="--te", limit=MAX_TE_S, source="--te", path=path), "option --te"
    if "EchoTime" in sidecar:
        return (check_time(sidecar["EchoTime"], name="EchoTime", flag="--te", limit=MAX_TE_S, source=sc_name,
                           path=path), f"{sc_name} EchoTime")
    where = f"no EchoTime in {sc_path}" if sidecar else f"no sidecar {sc_path.name}"
    raise InputError(f"{path}: echo time unknown ({where}); pass --te SECONDS (e.g. --te 0.03)")


def _repetition_time(tr: float | None, sidecar: dict[str, Any], sc_path: Path, header_tr: float | None,
                     path: Path) -> tuple[float, str]:
    """TR (s) of the series ``path`` and where it came from: ``tr`` if given, else the sidecar's
    RepetitionTime, else the header's (``header_tr``, s)."""
    sc_name = f"sidecar {sc_path.name}"
    if tr is not None:
        return check_time(tr, name="TR", flag="--tr", limit=MAX_TR_S, source="--tr", path=path), "option --tr"
    if "RepetitionTime" in sidecar:
        return (check_time(sidecar["RepetitionTime"], name="RepetitionTime", flag="--tr", limit=MAX_TR_S,
                           source=sc_name, path=path), f"{sc_name} RepetitionTime")
    if header_tr is not None:
        return (check_time(header_tr, name="TR", flag="--tr", limit=MAX_TR_S, source="NIfTI header", path=path),
                "NIfTI header pixdim[4]")
    raise InputError(f"{path}: repetition time unknown (no RepetitionTime in a sidecar and no time unit in the "
                     "header); pass --tr SECONDS")


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
