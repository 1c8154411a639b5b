"""report.html: one self-contained page built from an ``analyze`` output folder.

The page reads only what ``analyze`` wrote (report.json, curves.tsv, the maps and masks, the ROI masks'
copies). Figures are PNGs from matplotlib (Agg backend) embedded as
base64 data URIs: no external links, scripts or fonts. Everything taken from a file (names, paths,
reasons, header strings) is HTML-escaped. No numerics beyond what a figure needs (slices, histograms).
"""

from __future__ import annotations

import base64
import html
import io as _bytes_io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from perfusion import DISCLAIMER, __version__
from perfusion.errors import InputError
from perfusion.io import (
    DisplayGrid,
    atomic_write,
    display_grid,
    find_report,
    load_array,
    load_array_affine,
    output_path,
    read_json_object,
    stem,
)
from perfusion.quantify.aif import NOT_QUANTITATIVE, QUALITY_OK, RELATIVE_VALID
from perfusion.units import MAP_UNITS
from perfusion.verdicts import VERDICT_HEADING

#: Fixed colour scales (value range, unit) so pages of different cases compare at a glance.
#: rCBV 0-5: the verdict thresholds (1.0, 1.75) sit in the lower half, hot lesions (3-5) stay visible.
#: CBV 0-10 mL/100 g: white matter about 2, grey matter about 4-6, vessels saturate.
#: CBF 0-100 mL/100 g/min: white matter about 20-25, grey matter about 50-60.
#: MTT 0-15 s and Tmax 0-6 s: normal tissue about 3-5 s and 0-2 s; the tops flag delayed tissue.
SCALES = {
    "rcbv": (0.0, 5.0, MAP_UNITS["rcbv"]),
    "cbv": (0.0, 10.0, MAP_UNITS["cbv"]),
    "cbf": (0.0, 100.0, MAP_UNITS["cbf"]),
    "mtt": (0.0, 15.0, MAP_UNITS["mtt"]),
    "tmax": (0.0, 6.0, MAP_UNITS["tmax"]),
}

#: K2's symmetric scale is +/- this percentile of |K2| in the brain eroded by one voxel in-plane: K2
#: has no fixed physiological range (its scale differs between leakage methods); the 99th percentile
#: keeps outliers from washing out the rest, and the erosion drops the brain edge, where partial-volume
#: fits give |K2| 30x the interior's on the phantom (99th percentile 0.011 vs 0.0004 1/s).
K2_PERCENTILE = 99.0

#: Histogram range of rCBV (ratio) and number of bins: the colour scale's range; 50 bins of 0.1 resolve
#: the 1.0 / 1.75 thresholds to a bin.
HIST_RANGE = (0.0, 5.0)
HIST_BINS = 50

#: AIF quality score (0-1, report.json aif.quality_score) at or above this is ok (aif.QUALITY_OK, the bar
#: of the verdict's reasons too); a curve whose absolute values cannot be trusted is capped below it.
AIF_SCORE_OK = QUALITY_OK

#: A field strength counts as 1.5 T or 3 T within this (T): headers write 1.494 or 2.89 for these systems.
FIELD_TOL_T = 0.2

#: A flip angle counts as the consensus's 60 or 30 degrees within this (deg): vendors round protocols
#: to a few degrees; further away the T1 / T2* weighting changes noticeably.
FLIP_TOL_DEG = 5.0

#: Pre-bolus frames at or above this count as "a baseline of tens of frames" (Boxerman 2020).
MIN_BASELINE_FRAMES = 20

#: Brain voxels with unusable fits (NaN in CBV, CBF or MTT; with the model also fits at a bound, with a
#: residual far above oSVD's or failed: report.json "fit") above this fraction get a warning: a few
#: per cent fail at the brain edge and in CSF on good data (0.6 % on sample_data/sub-demo).
UNUSABLE_WARN = 0.05

#: Figure resolution (dots per inch): sharp on screen, a page of a few MB for 6 slices.
DPI = 90
#: zlib level of the figures' PNGs. A map montage is mostly noise, which does not compress: on the
#: clinical bench volume's CBF montage level 1 gave 802 kB in 0.30 s where the default level 6 gave
#: 790 kB in 0.72 s (the encoder was 45 % of the montage's time).
PNG_COMPRESS_LEVEL = 1

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: The figures' orientation, said under each group of image panels.
ORIENTATION_NOTE = (
    "Radiological convention, from the images' affine (not the voxel order): the patient's right on the "
    "image's left; axial slices anterior up, coronal and sagittal superior up (sagittal: anterior on the "
    "left); letters at the edges mark the patient's sides (R/L, A/P, S/I). Each panel's title is the "
    "slice's position along its normal in scanner coordinates (mm; S/I superior/inferior, A/P, R/L of the "
    "scanner's origin).")


# ----------------------------------------------------------------------------------------- data


def load_report(folder: Path) -> dict:
    """report.json of an analyze output folder; InputError naming the file if missing or broken."""
    path = find_report(Path(folder))
    return read_json_object(path, what="report", fix="re-run 'perfusion analyze'")


def read_curves(path: Path) -> dict[str, np.ndarray]:
    """Columns of curves.tsv (time_s in s, the others delta R2* in 1/s); {} if the file is missing."""
    path = Path(path)
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) < 2:
        return {}
    names = lines[0].split("\t")
    try:
        values = np.array([[float(v) for v in ln.split("\t")] for ln in lines[1:]], dtype=np.float64)
    except ValueError:
        raise InputError(f"{path}: has a value that is not a number; re-run 'perfusion analyze'") from None
    if values.ndim != 2 or values.shape[1] != len(names):
        raise InputError(f"{path}: rows and header differ in length; re-run 'perfusion analyze'")
    return {n: values[:, i] for i, n in enumerate(names)}


def roi_mask_paths(report: dict, folder: Path | None = None) -> dict[str, Path | None]:
    """Each ROI name of report.json -> its mask: the copy in ``folder`` (report.json ``mask_file``), else
    (a report written before inputs were recorded by file name only) the input path whose stem is that
    name, or None if neither is found."""
    inputs = [Path(p) for p, v in report.get("inputs", {}).items() if isinstance(v, str)]
    out: dict[str, Path | None] = {}
    for r in report.get("rois", []):
        copy = Path(folder) / Path(str(r["mask_file"])).name if folder is not None and r.get("mask_file") else None
        if copy is not None and copy.is_file():
            out[r["name"]] = copy
            continue
        match = [p for p in inputs if stem(p) == r["name"]]
        out[r["name"]] = match[0] if match and match[0].is_file() else None
    return out


def input_file_name(key: str, entry: Any) -> str:
    """The file name of one report.json "inputs" entry: {"file": name, "sha256": ...} by role, or (older
    reports) the input's path as the key and its hash as the value, shown by its last component."""
    if isinstance(entry, dict):
        return str(entry.get("file", ""))
    return Path(key).name


def slices_with_roi(mask: np.ndarray) -> list[int]:
    """Indices of the slices (last axis of an (x, y, z) mask) that hold at least one voxel."""
    m = np.asarray(mask) != 0
    return [int(z) for z in np.flatnonzero(m.reshape(-1, m.shape[-1]).any(axis=0))]


def histogram_data(rcbv_values: np.ndarray, low: float, high: float, *, bins: int = HIST_BINS,
                   value_range: tuple[float, float] = HIST_RANGE) -> dict[str, Any]:
    """What the rCBV histogram plots: counts and bin edges of the finite values (ratio) in
    ``value_range`` (values beyond are clipped into the end bins and counted in ``n_clipped``),
    the threshold lines at ``low`` and ``high`` and the median."""
    v = np.asarray(rcbv_values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    lo, hi = value_range
    clipped = int(np.count_nonzero((v < lo) | (v > hi)))
    counts, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=value_range)
    return {"counts": counts, "edges": edges, "lines": [float(low), float(high)], "n": int(v.size),
            "n_clipped": clipped, "median": float(np.median(v)) if v.size else float("nan")}


def unusable_fraction(brain: np.ndarray, maps: list[np.ndarray]) -> float:
    """Fraction of brain voxels that are NaN in any of ``maps`` (the fit failed there)."""
    b = np.asarray(brain) != 0
    if not b.any():
        return float("nan")
    bad = np.zeros_like(b)
    for m in maps:
        bad |= ~np.isfinite(m)
    return float(np.count_nonzero(bad & b) / np.count_nonzero(b))


def check_acquisition(report: dict) -> list[dict[str, str]]:
    """Acquisition parameters against the Boxerman 2020 consensus (Neuro-Oncology 22:1262) for DSC of
    high-grade glioma. Rows: name, value, expected, status ('ok' or 'warning'), note."""
    acq = report.get("acquisition", {})
    base = report.get("baseline", {})
    rows: list[dict[str, str]] = []

    def row(name, value, expected, ok, note=""):
        rows.append({"name": name, "value": value, "expected": expected,
                     "status": "ok" if ok else "warning", "note": note})

    field = num(acq.get("field_strength_t"))
    is15 = field is not None and abs(field - 1.5) <= FIELD_TOL_T
    is3 = field is not None and abs(field - 3.0) <= FIELD_TOL_T
    row("Field strength", "not recorded" if field is None else f"{field:g} T", "1.5 T or 3 T", is15 or is3,
        "" if (is15 or is3) else "the consensus TE is defined for 1.5 T and 3 T only")

    rows.extend(_echo_rows(acq, is15=is15, is3=is3))

    tr = num(acq.get("tr"))
    row("TR (temporal resolution)", "not recorded" if tr is None else f"{tr:g} s", "about 1-1.5 s",
        tr is not None and 1.0 - 1e-6 <= tr <= 1.5 + 1e-6)

    flip = num(acq.get("flip_angle_deg"))
    near60 = flip is not None and abs(flip - 60.0) <= FLIP_TOL_DEG
    near30 = flip is not None and abs(flip - 30.0) <= FLIP_TOL_DEG
    row("Flip angle", "not recorded" if flip is None else f"{flip:g} deg",
        "60 deg with preload, 30 deg without", near60 or near30,
        "60 deg assumes a preload dose, 30 deg none; the preload is not recorded" if (near60 or near30) else "")

    n = num(acq.get("n_frames"))
    dur = n * tr if (n is not None and tr is not None) else None
    row("Frames", "not recorded" if n is None else f"{n:.0f}" + (f" ({dur:.0f} s)" if dur is not None else ""),
        "baseline, first pass and recirculation", n is not None and base.get("bolus_arrival_frame") is not None
        and n - base["bolus_arrival_frame"] >= MIN_BASELINE_FRAMES,
        "at least as many frames after the bolus arrival as the baseline minimum, for the tail and leakage fit")

    arrival = base.get("bolus_arrival_frame")
    used = (base["stop_frame"] - base["start_frame"]) if {"start_frame", "stop_frame"} <= base.keys() else None
    row("Baseline frames", "not recorded" if arrival is None else
        f"{arrival} before the bolus" + (f" ({used} used)" if used is not None else ""),
        f"tens of frames (at least {MIN_BASELINE_FRAMES})", arrival is not None and arrival >= MIN_BASELINE_FRAMES)
    return rows


def _echo_rows(acq: dict, *, is15: bool, is3: bool) -> list[dict[str, str]]:
    """check_acquisition's rows for the echoes and TE (a multi-echo run: the consensus TE is the long echo's)."""
    rows: list[dict[str, str]] = []

    def row(name, value, expected, ok, note=""):
        rows.append({"name": name, "value": value, "expected": expected,
                     "status": "ok" if ok else "warning", "note": note})

    te = num(acq.get("te"))
    echoes = acq.get("echoes") or []
    if echoes:  # multi-echo: te is the effective TE
        tes = [num(e.get("te_s")) for e in echoes]
        kind = "dual echo" if len(echoes) == 2 else f"{len(echoes)} echoes"
        row("Echoes", f"{kind} (TE {', '.join('?' if t is None else f'{t * 1000:.3g}' for t in tes)} ms)",
            "single or multi echo", True, "delta R2* from the echoes is free of T1 leakage effects "
            "(Vonken 1999); the leakage correction still runs for T2* effects")
        te = tes[-1]
    if te is None:
        row("TE", "not recorded", "40-50 ms (1.5 T), 20-35 ms (3 T)", False)
        return rows
    te_ms = te * 1000.0
    if is15:
        row("TE", f"{te_ms:.0f} ms", "40-50 ms at 1.5 T", 40.0 - 1e-6 <= te_ms <= 50.0 + 1e-6)
    elif is3:
        row("TE", f"{te_ms:.0f} ms", "20-35 ms at 3 T", 20.0 - 1e-6 <= te_ms <= 35.0 + 1e-6)
    else:
        row("TE", f"{te_ms:.0f} ms", "40-50 ms (1.5 T), 20-35 ms (3 T)", False, "field strength unknown")
    return rows


def num(v) -> float | None:
    """``v`` as a finite float, or None (missing, not a number, NaN or infinite: shown as n/a)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


# -------------------------------------------------------------------------------------- figures


def figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], images: bool = False,
           axes: bool = True):
    """A matplotlib Figure on the Agg canvas and its axes (2-D array; None with ``axes=False``, for a
    figure that places its own). pyplot is not used, so the user's backend and pyplot's global figure
    list are left alone. ``images``: axes without ticks or frame, for image panels (hidden ticks were
    still laid out: 45 % of a montage's drawing time)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    if not axes:
        return fig, None
    kw = {"xticks": [], "yticks": [], "frame_on": False} if images else {}
    return fig, fig.subplots(nrows, ncols, squeeze=False, subplot_kw=kw)


def png_bytes(fig, *, tight: bool = True) -> bytes:
    """A matplotlib figure as PNG bytes; ``tight``: cropped to what is drawn (which draws the figure
    twice: a figure that lays itself out exactly passes False). zlib level PNG_COMPRESS_LEVEL."""
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight" if tight else None, facecolor="white",
                pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    """An <img> holding ``png`` as a base64 data URI (pages are self-contained), ``alt`` escaped."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def as_image(a2d: np.ndarray) -> np.ndarray:
    """An (x, y) slice of a display-oriented array (DisplayGrid.apply) as an image: x across, y up
    (displayed with origin='lower'), so the radiological convention of io.DISPLAY_AXCODES."""
    return np.asarray(a2d).T


#: Orientation letters: font size (pt) and where on the panel (axes fraction from the edge).
MARK_FONTSIZE = 7
MARK_INSET = 0.015


def draw_marks(ax, grid: DisplayGrid, *, fontsize: float = MARK_FONTSIZE,
               box: tuple[float, float, float, float] | None = None) -> None:
    """The patient directions at the four edges of an image panel (R / L / A / P for an axial slice),
    white with a black outline so they read on any background. The panel is the whole axes, or
    ``box`` = (top row, left column, width, height) in the data coordinates of an image drawn from the
    top (a montage's panel)."""
    from matplotlib import patheffects

    stroke = [patheffects.withStroke(linewidth=1.8, foreground="black")]
    m = grid.marks
    for text, fx, fy, ha, va in ((m["left"], MARK_INSET, 0.5, "left", "center"),
                                 (m["right"], 1 - MARK_INSET, 0.5, "right", "center"),
                                 (m["top"], 0.5, 1 - MARK_INSET, "center", "top"),
                                 (m["bottom"], 0.5, MARK_INSET, "center", "bottom")):
        if box is None:
            ax.text(fx, fy, text, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=fontsize,
                    fontweight="bold", path_effects=stroke)
        else:
            row0, col0, w, h = box
            ax.text(col0 - 0.5 + fx * w, row0 - 0.5 + (1 - fy) * h, text, ha=ha, va=va, color="white",
                    fontsize=fontsize, fontweight="bold", path_effects=stroke)


def display_slices(grid: DisplayGrid, slices: list[int]) -> list[int]:
    """Stored slice indices as display indices, in display order (inferior to superior when axial)."""
    return sorted(grid.display_slice(z) for z in slices)


def _grid(n: int, *, max_cols: int = 6) -> tuple[int, int]:
    cols = min(n, max_cols)
    return int(np.ceil(n / cols)), cols


def fig_rcbv_overlay(rcbv: np.ndarray, background: np.ndarray, rois: dict[str, np.ndarray],
                     reference: np.ndarray | None, slices: list[int], *, affine: np.ndarray,
                     background_affine: np.ndarray | None = None) -> bytes:
    """rCBV (0-5, ratio) over ``background`` on ``slices`` (stored slice indices), with ROI and reference
    contours, in radiological convention (io.display_grid of ``affine``, the maps' voxel-to-world
    affine) with orientation letters and each slice's position (mm) as its title. The background may
    have a finer in-plane grid over the same slices (a registered T1, ``anat.nii.gz``, on
    ``background_affine``): every layer is drawn in the rCBV map's display voxel coordinates."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    grid = display_grid(affine, rcbv.shape)
    bg_affine = affine if background_affine is None else background_affine
    background = display_grid(bg_affine, background.shape).apply(background)
    rcbv = grid.apply(rcbv)
    rois = {name: grid.apply(m) for name, m in rois.items()}
    reference = grid.apply(reference) if reference is not None else None
    slices = display_slices(grid, slices)
    lo, hi, unit = SCALES["rcbv"]
    nr, nc = _grid(len(slices), max_cols=4)
    fig, axes = figure(nr, nc, figsize=(3.2 * nc + 1.0, 3.2 * nr), images=True)
    colours = colormaps["tab10"]
    im = None
    bg_hi = float(np.percentile(background[np.isfinite(background)], 99.5)) if np.isfinite(background).any() else 1.0
    for ax in axes.ravel():
        ax.axis("off")
    extent = (-0.5, rcbv.shape[0] - 0.5, -0.5, rcbv.shape[1] - 0.5)
    for ax, z in zip(axes.ravel(), slices, strict=False):  # the grid may hold more axes
        ax.imshow(as_image(background[:, :, z]), cmap="gray", vmin=0, vmax=bg_hi, origin="lower", extent=extent)
        im = ax.imshow(as_image(np.ma.masked_invalid(rcbv[:, :, z])), cmap="jet", vmin=lo, vmax=hi, alpha=0.6,
                       origin="lower", extent=extent)
        for i, m in enumerate(rois.values()):
            if m[:, :, z].any():
                ax.contour(as_image(m[:, :, z].astype(float)), levels=[0.5], colors=[colours(i % 10)], linewidths=1.2,
                           origin="lower")
        if reference is not None and reference[:, :, z].any():
            ax.contour(as_image(reference[:, :, z].astype(float)), levels=[0.5], colors=["white"], linewidths=0.6,
                       linestyles="dashed", origin="lower")
        ax.set_title(grid.position_label(z), fontsize=9)
        draw_marks(ax, grid)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=f"rCBV ({unit})")
    handles = [Line2D([], [], color=colours(i % 10), label=name) for i, name in enumerate(rois)]
    if reference is not None:
        handles.append(Line2D([], [], color="gray", linestyle="dashed", label="reference"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, -0.02 - 0.03 * ((len(handles) - 1) // 4)))
    return png_bytes(fig)


def k2_limit(k2: np.ndarray, brain: np.ndarray) -> float:
    """Half-width of K2's symmetric colour scale (1/s): the K2_PERCENTILE of |K2| in the brain eroded
    by one voxel in-plane (the whole brain if erosion leaves nothing)."""
    from scipy import ndimage

    b = np.asarray(brain) != 0
    st = np.zeros((3, 3, 3), bool)
    st[:, :, 1] = True
    inner = ndimage.binary_erosion(b, structure=st) if b.ndim == 3 else b
    brain = inner if (inner & np.isfinite(k2)).any() else b
    v = np.abs(k2[(np.asarray(brain) != 0) & np.isfinite(k2)])
    lim = float(np.percentile(v, K2_PERCENTILE)) if v.size else 0.0
    return lim if lim > 0 else 1e-6  # a flat map still needs a scale of non-zero width


#: A montage's slice panel: its longer side in pixels (at DPI: a 128-matrix slice one pixel per voxel,
#: the size the page shows it at), the band above it for the slice position (a fraction of the panel's
#: height) and the gap between panels (voxels).
MONTAGE_PANEL_PX = 128
MONTAGE_TITLE_BAND = 0.14
MONTAGE_GAP = 2


def fig_montage(data: np.ndarray, *, affine: np.ndarray, label: str, vmin: float, vmax: float,
                cmap: str = "viridis") -> bytes:
    """All slices of a 3-D map on a fixed scale [vmin, vmax] with a colourbar labelled ``label``, in
    radiological convention (io.display_grid of ``affine``, voxel to world), with orientation letters
    and each slice's position (mm) above it.

    The slices are tiled into one image (``montage_tiles``) drawn on one axes: a panel per slice cost
    an axes each, and laying out and drawing 24 axes took most of report.html's time."""
    grid = display_grid(affine, data.shape)
    data = grid.apply(data)
    w_px, h_px = data.shape[0], data.shape[1]
    band = int(round(MONTAGE_TITLE_BAND * h_px))
    tiles, origins = montage_tiles(data, _grid(data.shape[2])[1], band=band, gap=MONTAGE_GAP)
    scale = MONTAGE_PANEL_PX / DPI / max(w_px, h_px)  # inches per voxel
    img_w, img_h = tiles.shape[1] * scale, tiles.shape[0] * scale
    fig_w = img_w + 1.1  # the colourbar, its ticks and its label on the right
    fig, _ = figure(figsize=(fig_w, img_h), axes=False)
    ax = fig.add_axes((0.0, 0.0, img_w / fig_w, 1.0), xticks=[], yticks=[], frame_on=False)
    im = ax.imshow(np.ma.masked_invalid(tiles), cmap=cmap, vmin=vmin, vmax=vmax, origin="upper",
                   interpolation="nearest")
    for z, (row0, col0) in enumerate(origins):
        ax.text(col0 + w_px / 2, row0 - band / 2, grid.position_label(z), ha="center", va="center", fontsize=7)
        draw_marks(ax, grid, fontsize=MARK_FONTSIZE - 1, box=(row0, col0, w_px, h_px))
    cax = fig.add_axes((img_w / fig_w + 0.15 / fig_w, 0.1, 0.18 / fig_w, 0.8))
    fig.colorbar(im, cax=cax, label=label)
    return png_bytes(fig, tight=False)


def montage_tiles(data: np.ndarray, n_cols: int, *, band: int, gap: int) -> tuple[np.ndarray, list]:
    """The slices of a display-oriented 3-D array (x, y, z) as one image, ``n_cols`` panels per row in
    slice order, each as ``as_image`` shows it with y up (so flipped for an image drawn from the top),
    NaN between panels (``gap`` pixels) and in a band of ``band`` pixels above each row (for the slice
    positions). Returns the image (float64) and each panel's top-left corner (row, column) in it."""
    w, h, nz = data.shape
    nr = -(-nz // n_cols)
    cell_w, cell_h = w + gap, band + h + gap
    out = np.full((nr * cell_h - gap, n_cols * cell_w - gap), np.nan)
    origins = []
    for z in range(nz):
        r, c = divmod(z, n_cols)
        row0, col0 = r * cell_h + band, c * cell_w
        out[row0:row0 + h, col0:col0 + w] = as_image(data[:, :, z])[::-1]
        origins.append((row0, col0))
    return out, origins


def fig_aif(time_s: np.ndarray, aif: np.ndarray, n_voxels: Any) -> bytes:
    fig, axes = figure(figsize=(6, 3))
    ax = axes[0, 0]
    ax.plot(time_s, aif, color="crimson", label=f"AIF ({n_voxels} voxels)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("delta R2* (1/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return png_bytes(fig)


def fig_roi_curves(time_s: np.ndarray, curves: dict[str, np.ndarray], name: str) -> bytes:
    """Mean delta R2* (1/s) of one ROI, uncorrected and corrected, with the reference's."""
    fig, axes = figure(figsize=(6, 3))
    ax = axes[0, 0]
    key = f"roi:{name}"
    if key + "_uncorrected" in curves:
        ax.plot(time_s, curves[key + "_uncorrected"], color="tab:orange", linestyle="--", label="ROI uncorrected")
    if key in curves:
        ax.plot(time_s, curves[key], color="tab:red", label="ROI leakage-corrected")
    if "reference" in curves:
        ax.plot(time_s, curves["reference"], color="tab:blue", label="reference")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mean delta R2* (1/s)")
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return png_bytes(fig)


def fig_histogram(hist: dict[str, Any], name: str = "") -> bytes:
    fig, axes = figure(figsize=(6, 3))
    ax = axes[0, 0]
    edges = hist["edges"]
    ax.stairs(hist["counts"], edges, fill=True, color="tab:gray")  # one artist, not one bar per bin
    for x, colour in zip(hist["lines"], ("tab:green", "tab:red"), strict=True):
        ax.axvline(x, color=colour, linestyle="--", label=f"threshold {x:g}")
    if np.isfinite(hist["median"]):
        ax.axvline(min(max(hist["median"], edges[0]), edges[-1]), color="black", label=f"median {hist['median']:.2f}")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("rCBV (ratio)")
    ax.set_ylabel("voxels")
    ax.set_title(f"{name}: rCBV of {hist['n']} valid voxels", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")  # a fixed place: loc="best" searched every artist
    return png_bytes(fig)


# ----------------------------------------------------------------------------------------- page

#: The verdict headings (capitalised labels, verdicts.py); compare.html uses them too.
VERDICT_WORDS = VERDICT_HEADING
VERDICT_COLOUR = {"likely_recurrence": "#b71c1c", "possible_recurrence_or_pseudoprogression": "#c43e00",
                  "likely_treatment_effect": "#1b5e20", "indeterminate": "#8d6e00", "not_assessable": "#455a64"}

CSS = """
body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
.disclaimer{border:3px solid #b71c1c;background:#fff3f3;padding:.7em 1em;font-weight:bold;font-size:1.1em}
.verdict{border:2px solid #888;border-radius:6px;padding:.6em 1em;margin:.8em 0}
.verdict h3{margin:.1em 0 .4em 0}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.absolute{border:3px solid #e65100;background:#fff8e1;padding:.5em 1em;font-weight:bold;font-size:1.1em}
.ok{color:#1b5e20;font-weight:bold}.warning{color:#b71c1c;font-weight:bold}
img{max-width:100%}.small{font-size:.85em;color:#555}
"""


def esc(x: Any) -> str:
    """``x`` as text safe inside HTML, attribute values included (everything taken from a file)."""
    return html.escape(str(x), quote=True)


def _f(x: Any, fmt: str = ".2f") -> str:
    v = num(x)
    return "n/a" if v is None else format(v, fmt)


def _pct(x: Any, *, signed: bool = False) -> str:
    v = num(x)
    return "n/a" if v is None else (f"{100 * v:+.0f} %" if signed else f"{100 * v:.0f} %")


def _n_warnings(r: dict) -> int:
    """Reasons beyond the rCBV rule's own statement (leakage, timing, AIF, voxels left out)."""
    return sum(1 for x in r.get("reasons", []) if not str(x).startswith("median rCBV"))


def _ci(r: dict, key: str = "rcbv", pct: bool = False) -> str:
    """The interval of a figure as "[lo, hi]" ("n/a" without one)."""
    lo, hi = (r.get("rcbv_ci_low"), r.get("rcbv_ci_high")) if key == "rcbv" else tuple((r.get(key) or [None, None])[:2])
    if num(lo) is None or num(hi) is None:
        return "n/a"
    return f"[{_pct(lo)}, {_pct(hi)}]" if pct else f"[{_f(lo)}, {_f(hi)}]"


def _leakage_table(r: dict) -> str:
    """rCBV (median) and its verdict band under each leakage correction."""
    by = r.get("rcbv_by_leakage") or {}
    if not by:
        return ""
    pooled = set(r.get("ci_methods") or [])
    rows = "".join(f'<tr><td>{esc(m)}{" *" if m in pooled else ""}</td><td>{_f(v.get("rcbv_median"))}</td>'
                   f'<td>{esc(VERDICT_WORDS.get(v.get("verdict"), v.get("verdict", "?")))}</td></tr>'
                   for m, v in by.items())
    return ('<table class="small"><tr><th>leakage correction</th><th>median rCBV</th><th>band</th></tr>' + rows
            + "</table><p class=\"small\">* pooled into the 95 % interval</p>")


def _summary_table(rois: list[dict]) -> str:
    """One line per ROI above the detailed boxes: what a reader needs at a glance."""
    rows = "".join(
        f'<tr><td>{esc(r.get("name", "?"))}</td>'
        f'<td style="color:{VERDICT_COLOUR.get(r.get("verdict", ""), "#555")}"><b>'
        f'{esc(VERDICT_WORDS.get(r.get("verdict", ""), r.get("verdict", "?")))}</b></td>'
        f'<td>{_f(r.get("rcbv_median"))}</td><td>{_ci(r)}</td>'
        f'<td>{_pct(r.get("ftb_low"))} / {_pct(r.get("ftb_mid"))} / '
        f'{_pct(r.get("ftb_high"))}</td><td>{"yes" if r.get("mixed") else "no"}</td><td>{_f(r.get("volume_ml"))}</td>'
        f'<td>{_n_warnings(r)}</td></tr>'
        for r in rois)
    return ('<table class="summary"><tr><th>ROI</th><th>verdict</th><th>median rCBV</th><th>95 % interval</th>'
            "<th>FTB low / mid / high</th><th>mixed</th><th>volume (mL)</th><th>warnings</th></tr>" + rows + "</table>")


def _standardized(r: dict, standardized: dict | None) -> str:
    """The lesion's median standardised CBV (Bedekar 2010) with its landmarks, or nothing."""
    value = ((standardized or {}).get("rois") or {}).get(r.get("name"))
    if value is None:
        return ""
    return (f"Standardised CBV (Bedekar 2010, no reference tissue; the brain's median CBV = 1000 standardised "
            f"units): median <b>{_f(value, '.0f')}</b>.<br>")


def _verdict_box(r: dict, thresholds: dict, standardized: dict | None = None) -> str:
    v = r.get("verdict", "indeterminate")
    colour = VERDICT_COLOUR.get(v, "#555")
    reasons = "".join(f"<li>{esc(x)}</li>" for x in r.get("reasons", []))
    return (
        f'<div class="verdict" style="border-color:{colour}">'
        f'<h3>{esc(r.get("name", "?"))}: <span style="color:{colour}">{esc(VERDICT_WORDS.get(v, v))}</span></h3>'
        f"<p>Median rCBV <b>{_f(r.get('rcbv_median'))}</b>, 95 % interval <b>{_ci(r)}</b> (bootstrap over lesion and "
        f"reference voxels and the leakage corrections {esc(', '.join(r.get('ci_methods') or []) or 'n/a')}); mean "
        f"{_f(r.get('rcbv_mean'))}, 90th percentile {_f(r.get('rcbv_p90'))} {_ci(r, 'rcbv_p90_ci')}; "
        f"{esc(r.get('n_valid', '?'))} of {esc(r.get('n_voxels', '?'))} voxels valid, {_f(r.get('volume_ml'))} mL.<br>"
        f"Fractional tumour burden: {_pct(r.get('ftb_low'))} {_ci(r, 'ftb_low_ci', True)} below "
        f"{_f(thresholds.get('rcbv_low'), 'g')}, {_pct(r.get('ftb_mid'))} {_ci(r, 'ftb_mid_ci', True)} between, "
        f"{_pct(r.get('ftb_high'))} {_ci(r, 'ftb_high_ci', True)} above {_f(thresholds.get('rcbv_high'), 'g')}"
        f"{'; <b>mixed lesion</b>' if r.get('mixed') else ''}.<br>{_standardized(r, standardized)}"
        f"Percentage of signal recovery (PSR) {_f(r.get('psr_percent'), '.0f')} %; relative peak height "
        f"{_f(r.get('relative_peak_height'))}; leakage correction changed CBV by "
        f"{_pct(r.get('leakage_cbv_change'), signed=True)}.</p>"
        f"<p>Reasons and warnings:</p><ul>{reasons}</ul>{_leakage_table(r)}"
        f"<p><b>Next step:</b> {esc(r.get('next_step', ''))}</p>"
        f'<p class="small">Rule: {esc(r.get("rule", ""))}</p></div>'
    )


def _load(folder: Path, rep: dict, name: str) -> np.ndarray | None:
    p = output_path(folder, rep, name)
    return load_array(p, what=name) if p.is_file() else None


def _load_with_affine(folder: Path, rep: dict, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A map and its voxel-to-world affine (mm), or (None, None) when the file is missing."""
    p = output_path(folder, rep, name)
    return load_array_affine(p, what=name) if p.is_file() else (None, None)


def build_html(folder: Path) -> str:
    """The report page of an ``analyze`` output folder as one self-contained HTML string: the header,
    the verdicts, the figures and the quality tables, in that order."""
    folder = Path(folder)
    rep = load_report(folder)
    notes: list[str] = []
    rcbv, rcbv_affine = _load_with_affine(folder, rep, "rcbv")
    brain = _load(folder, rep, "brain_mask")
    masks = _roi_masks(folder, rep, rcbv, notes)
    parts = [*_header(rep), *_verdicts(rep), "<h2>Figures</h2>",
             *_rcbv_figure(folder, rep, rcbv, rcbv_affine, masks, notes),
             *_montages(folder, rep, brain, notes), *_curve_figures(folder, rep, rcbv, masks, notes),
             *_quality(folder, rep, brain)]
    if notes:
        parts.append("<h3>Notes on this page</h3><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append(f'<div class="disclaimer">{esc(DISCLAIMER)}</div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>DSC perfusion report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _thresholds(rep: dict) -> tuple[float, float]:
    thr = rep.get("thresholds", {})
    return float(thr.get("rcbv_low", 1.0)), float(thr.get("rcbv_high", 1.75))


def _header(rep: dict) -> list[str]:
    """Title, disclaimer, the not-quantitative notice of a partial-volume AIF, versions, dates, inputs."""
    version = rep.get("software", {}).get("version", "unknown")
    date = rep.get("created_utc")
    inputs = "".join(f"<li>{esc(input_file_name(k, v))}</li>" for k, v in rep.get("inputs", {}).items())
    parts = ["<h1>DSC perfusion report</h1>", f'<div class="disclaimer">{esc(DISCLAIMER)}</div>']
    aif_rep = rep.get("aif", {})
    if aif_rep.get("absolute_quantification") is False:
        reasons = "".join(f"<li>{esc(r)}</li>" for r in aif_rep.get("absolute_quantification_reasons", []))
        parts.append(f'<div class="absolute"><p>AIF: {esc(NOT_QUANTITATIVE)}.</p><p class="small">'
                     f"{esc(RELATIVE_VALID)}. Absolute CBV (mL/100 g), CBF (mL/100 g/min) and MTT (s) in the maps "
                     f"are not.</p><ul class=\"small\">{reasons}</ul></div>")
    parts.append(
        f"<p>perfusion {esc(version)} (analysis); page written by perfusion {esc(__version__)} on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Analysis date: "
        f"{esc(date) if date else 'not recorded in report.json'}.</p>"
        f"<p>Input files:</p><ul>{inputs}</ul>"
    )
    return parts


def _verdicts(rep: dict) -> list[str]:
    """The verdict table and one box per ROI."""
    thr = rep.get("thresholds", {})
    rois = rep.get("rois", [])
    parts = ["<h2>Verdict per ROI</h2>"]
    if rois:
        parts.append(_summary_table(rois))
        parts.extend(_verdict_box(r, thr, rep.get("reference", {}).get("standardized")) for r in rois)
        parts.append(f'<p class="small">Thresholds: {esc(thr.get("source", ""))}</p>')
    else:
        parts.append("<p>No ROI was given to <code>perfusion analyze</code>: maps only, no verdict.</p>")
    return parts


def _roi_masks(folder: Path, rep: dict, rcbv: np.ndarray | None, notes: list[str]) -> dict[str, np.ndarray]:
    """The ROI masks that can be drawn on the maps (bool x y z); why the others cannot, in ``notes``."""
    masks: dict[str, np.ndarray] = {}
    for name, p in roi_mask_paths(rep, folder).items():
        if p is None:
            notes.append(f"ROI {name}: mask file not found (from report.json inputs); no contour drawn")
            continue
        try:
            m = load_array(p, what="ROI") != 0
        except InputError as exc:
            notes.append(f"ROI {name}: {exc}; no contour drawn")
            continue
        if rcbv is not None and m.shape != rcbv.shape:
            notes.append(f"ROI {name}: mask shape {m.shape} differs from the maps; no contour drawn")
            continue
        masks[name] = m
    return masks


def _rcbv_figure(folder: Path, rep: dict, rcbv: np.ndarray | None, rcbv_affine, masks: dict[str, np.ndarray],
                 notes: list[str]) -> list[str]:
    """rCBV over the registered anatomy (or the baseline image), slices holding an ROI, contours drawn."""
    if rcbv is None:
        notes.append("rcbv.nii.gz not found: no rCBV figure")
        return []
    anat, anat_affine = _load_with_affine(folder, rep, "anat")
    background = _load(folder, rep, "baseline")
    reference = _load(folder, rep, "reference_mask")
    bg_name, bg_affine = "the baseline image", rcbv_affine
    if anat is not None and anat.shape[2] == rcbv.shape[2] and anat.shape[0] % rcbv.shape[0] == 0:
        bg, bg_name, bg_affine = anat, "the registered anatomical image (--anat)", anat_affine
    else:
        if anat is not None:
            notes.append(f"anat.nii.gz shape {anat.shape} does not fit the maps {rcbv.shape}; baseline used")
        bg = background if background is not None else np.nan_to_num(rcbv)
    ref = reference != 0 if reference is not None else None
    union = np.zeros(rcbv.shape, bool)
    for m in masks.values():
        union |= m
    slices = slices_with_roi(union) or list(range(rcbv.shape[2]))
    what = "slices holding an ROI" if union.any() else "all slices (no ROI contour available)"
    return [f"<h3>rCBV over {bg_name} ({what})</h3>",
            img_tag(fig_rcbv_overlay(rcbv, bg, masks, ref, slices, affine=rcbv_affine, background_affine=bg_affine),
                    "rCBV overlay"),
            '<p class="small">rCBV scale 0-5 (ratio to the reference median); coloured lines: ROIs; '
            f"dashed white: reference tissue. {ORIENTATION_NOTE}</p>"]


def _montages(folder: Path, rep: dict, brain: np.ndarray | None, notes: list[str]) -> list[str]:
    """CBV, CBF, MTT and Tmax on fixed scales and K2 on a symmetric one, all slices."""
    parts = ["<h3>Maps, all slices</h3>"]
    for name, title in (("cbv", "CBV"), ("cbf", "CBF"), ("mtt", "MTT"), ("tmax", "Tmax")):
        data, affine = _load_with_affine(folder, rep, name)
        if data is None or affine is None:  # both None together
            notes.append(f"{name}.nii.gz not found: no {title} montage")
            continue
        lo, hi, unit = SCALES[name]
        parts.append(f"<h4>{title} ({unit}, scale {lo:g}-{hi:g})</h4>")
        parts.append(img_tag(fig_montage(data, affine=affine, label=f"{title} ({unit})", vmin=lo, vmax=hi),
                             f"{title} montage"))
    k2, k2_affine = _load_with_affine(folder, rep, "k2")
    if k2 is not None and k2_affine is not None:  # both None together
        lim = k2_limit(k2, brain if brain is not None else np.isfinite(k2))
        parts.append(f"<h4>K2 (1/s, symmetric scale +/-{lim:.2g}; &gt; 0 T1-dominant, &lt; 0 T2*-dominant)</h4>")
        parts.append(img_tag(fig_montage(k2, affine=k2_affine, label="K2 (1/s)", vmin=-lim, vmax=lim, cmap="RdBu_r"),
                             "K2 montage"))
    parts.append(f'<p class="small">{ORIENTATION_NOTE}</p>')
    return parts


def _curve_figures(folder: Path, rep: dict, rcbv: np.ndarray | None, masks: dict[str, np.ndarray],
                   notes: list[str]) -> list[str]:
    """The AIF, and per ROI its mean curves and its rCBV histogram."""
    low, high = _thresholds(rep)
    parts: list[str] = []
    curves = read_curves(output_path(folder, rep, "curves"))
    if "time_s" in curves and "aif" in curves:
        parts.append("<h3>Arterial input function</h3>")
        parts.append(img_tag(fig_aif(curves["time_s"], curves["aif"], rep.get("aif", {}).get("n_voxels", "?")), "AIF"))
    else:
        notes.append("curves.tsv not found or without an aif column: no AIF or ROI curves")
    for r in rep.get("rois", []):
        name = r.get("name", "?")
        parts.append(f"<h3>ROI {esc(name)}</h3>")
        if "time_s" in curves and f"roi:{name}" in curves:
            parts.append(img_tag(fig_roi_curves(curves["time_s"], curves, name), f"curves {name}"))
        if rcbv is not None and name in masks:
            h = histogram_data(rcbv[masks[name]], low, high)
            parts.append(img_tag(fig_histogram(h, name), f"rCBV histogram {name}"))
            if h["n_clipped"]:
                parts.append(f'<p class="small">{h["n_clipped"]} voxels outside {HIST_RANGE[0]:g}-{HIST_RANGE[1]:g} '
                             "are counted in the end bins.</p>")
    return parts


def _quality(folder: Path, rep: dict, brain: np.ndarray | None) -> list[str]:
    """The acquisition against the consensus protocol, the analysis's quality table, its warnings."""
    parts = ["<h2>Quality</h2>"]
    rows = "".join(
        f"<tr><td>{esc(c['name'])}</td><td>{esc(c['value'])}</td><td>{esc(c['expected'])}</td>"
        f"<td class=\"{c['status']}\">{c['status']}</td><td>{esc(c['note'])}</td></tr>"
        for c in check_acquisition(rep))
    parts.append("<h3>Acquisition against the consensus protocol (Boxerman et al. 2020, Neuro-Oncology 22:1262)</h3>"
                 "<table><tr><th>parameter</th><th>value</th><th>consensus</th><th>status</th><th>note</th></tr>"
                 f"{rows}</table>")
    acq = rep.get("acquisition", {})
    parts.append(f'<p class="small">TE from {esc(acq.get("te_source", "?"))}; '
                 f'TR from {esc(acq.get("tr_source", "?"))}.</p>')
    qrows = [*_aif_rows(rep), *_fit_rows(folder, rep, brain), *_registration_rows(rep), *_motion_rows(rep),
             _leakage_row(rep)]
    parts.append("<h3>Analysis</h3><table><tr><th>item</th><th>value</th><th>expected</th><th>status</th><th>note</th></tr>"
                 + "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td><td class=\"{d}\">{d}</td>"
                           f"<td>{esc(e)}</td></tr>" for a, b, c, d, e in qrows) + "</table>")
    warns = rep.get("warnings", [])
    if warns:
        parts.append("<h3>Warnings of the analysis</h3><ul>" + "".join(f"<li>{esc(w)}</li>" for w in warns) + "</ul>")
    return parts


QualityRow = tuple[str, str, str, str, str]  # item, value, expected, status ("ok"/"warning"), note


def _aif_rows(rep: dict) -> list[QualityRow]:
    aif = rep.get("aif", {})
    score = num(aif.get("quality_score"))
    status = "warning" if score is None or score < AIF_SCORE_OK or aif.get("absolute_quantification") is False else "ok"
    rows: list[QualityRow] = [("AIF quality score (0-1)", _f(score), f">= {AIF_SCORE_OK:g}", status,
                               f"{aif.get('n_voxels', '?')} voxels, {aif.get('source', '?')}")]
    if "absolute_quantification" in aif:
        ok_abs = bool(aif["absolute_quantification"])
        m = (aif.get("absolute_checks") or {}).get("measures", {})
        b = (aif.get("absolute_checks") or {}).get("bounds", {})
        rows.append(("AIF absolute quantification", "yes" if ok_abs else "no",
                     f"tail <= {_f(b.get('tail_fraction'), 'g')}, area ratio >= {_f(b.get('area_ratio'), 'g')}, "
                     f"FWHM <= {_f(b.get('fwhm_s'), 'g')} s", "ok" if ok_abs else "warning",
                     f"tail {_f(m.get('tail_fraction'))}, area / tissue {_f(m.get('area_ratio'), '.1f')}, FWHM "
                     f"{_f(m.get('fwhm_s'), '.1f')} s" + ("" if ok_abs else f"; {RELATIVE_VALID}")))
    return rows


def _fit_rows(folder: Path, rep: dict, brain: np.ndarray | None) -> list[QualityRow]:
    fit = rep.get("fit")
    # counted by the pipeline (reports of older versions: NaN only)
    if isinstance(fit, dict) and "unusable_fraction" in fit:
        frac = float(fit["unusable_fraction"])
        what = "NaN in CBV, CBF or MTT"
        if "fallback_osvd" in fit:
            what += (f", or the model fit at a bound ({fit.get('model_at_bound', 0)} voxels), its residual far above "
                     f"oSVD's ({fit.get('model_residual_high', 0)}) or failed ({fit.get('model_failed', 0)}): these "
                     "show oSVD's values")
        return [("Brain voxels with unusable fits", f"{100 * frac:.1f} %", "small",
                 "ok" if frac < UNUSABLE_WARN else "warning", f"{what}; warning from {UNUSABLE_WARN:.0%}")]
    maps_for_fit = [m for m in (_load(folder, rep, "cbv"), _load(folder, rep, "cbf"), _load(folder, rep, "mtt"))
                    if m is not None]
    if brain is not None and maps_for_fit:
        frac = unusable_fraction(brain, maps_for_fit)
        return [("Brain voxels with unusable fits", f"{100 * frac:.1f} %", "small",
                 "ok" if frac < UNUSABLE_WARN else "warning",
                 f"NaN in CBV, CBF or MTT; warning from {UNUSABLE_WARN:.0%}")]
    return []


def _registration_rows(rep: dict) -> list[QualityRow]:
    reg = rep.get("anat", {}).get("registration")
    if not reg:
        return []
    rot = max(abs(float(a)) for a in reg.get("rotation_deg", [0.0]))
    return [("Anatomical image registration", f"MI {_f(reg.get('mattes_mi'), '.3f')}",
             "rigid, to the DSC baseline", "ok",
             f"largest rotation {rot:.1f} deg, translation {np.linalg.norm(reg.get('translation_mm', [0]*3)):.1f} mm; "
             f"transform {rep['anat'].get('transform_file', '')}; check the contours sit on the anatomy")]


def _motion_rows(rep: dict) -> list[QualityRow]:
    mot = rep.get("motion")
    if not isinstance(mot, dict):  # reports of older versions have none
        return []
    from perfusion.quantify.motion import FD_THRESHOLD_MM

    fd_thr = _f(mot.get("fd_threshold_mm", FD_THRESHOLD_MM), "g")
    if not mot.get("assessed"):
        return [("Head motion", "not assessed", f"framewise displacement <= {fd_thr} mm", "warning",
                 str(mot.get("reason") or "--motion-correct off: no frame was registered"))]
    n_above = num(mot.get("n_frames_above_threshold")) or 0
    done = (f"{mot.get('n_frames_corrected', '?')} frame(s) realigned" if mot.get("applied")
            else "no frame realigned")
    return [("Head motion", f"max FD {_f(mot.get('fd_max_mm'))} mm, mean {_f(mot.get('fd_mean_mm'), '.3f')} mm",
             f"framewise displacement <= {fd_thr} mm", "warning" if n_above else "ok",
             f"{n_above:g} frame(s) above {fd_thr} mm ({mot.get('fd_threshold_source', '')}); {done} "
             f"(--motion-correct {mot.get('correction', '?')}); per frame in "
             f"{(rep.get('files') or {}).get('motion', 'motion.tsv')}")]


def _leakage_row(rep: dict) -> QualityRow:
    leak = rep.get("leakage", {})
    return ("Leakage correction", str(leak.get("method", "none")), "residue, bsw or bidirectional",
            "warning" if leak.get("method", "none") == "none" else "ok",
            f"fraction corrected {_pct(leak.get('fraction_corrected'))}; "
            f"fit R^2 median {_f(leak.get('fit_r2_median'))}")


def write_html(folder: Path) -> Path:
    """Write ``folder``/report.html whole or not at all (io.atomic_write); return its path."""
    folder = Path(folder)
    page = build_html(folder)
    return atomic_write(output_path(folder, load_report(folder), "report_html"), page)
