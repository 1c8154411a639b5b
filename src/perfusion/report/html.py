"""report.html: one self-contained page built from an ``analyze`` output folder.

The page reads only what ``analyze`` wrote (report.json, curves.tsv, the maps and masks, the ROI masks'
copies). Figures are PNGs from matplotlib (Agg backend) embedded as
base64 data URIs: no external links, scripts or fonts. Everything taken from a file (names, paths,
reasons, header strings) is HTML-escaped. No numerics beyond what a figure needs (slices, histograms).

Layout (issue 21): the first screen holds what a reader needs to act (the case's label and scan date,
the quality warnings of report/quality.py, and per lesion its rCBV slice, verdict, interval and next
step); the details, the figures and the quality tables follow. Printed on A4 the first screen is a page
of its own and figures are never cut (REPORT_CSS); tests/test_browser.py renders the page in Chromium
and Firefox and prints it.
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
    analysis_of,
    atomic_write,
    display_grid,
    load_array,
    load_array_affine,
    output_path,
    read_json_object,
    stem,
)
from perfusion.io.display import (
    BACKGROUND_PERCENTILE,
    RCBV_ALPHA,
    RCBV_CMAP,
    RCBV_RANGE,
    REFERENCE_OUTLINE_COLOUR,
    ROI_OUTLINE_COLOURS,
)
from perfusion.report.quality import (  # check_acquisition and num: also imported from here (tests, compare)
    all_warnings,
    analysis_rows,
    check_acquisition,
    fmt,
    num,
    pct,
)
from perfusion.units import MAP_UNITS
from perfusion.verdicts import VERDICT_HEADING

#: Fixed colour scales (value range, unit) so pages of different cases compare at a glance.
#: rCBV 0-5: the verdict thresholds (1.0, 1.75) sit in the lower half, hot lesions (3-5) stay visible.
#: CBV 0-10 mL/100 g: white matter about 2, grey matter about 4-6, vessels saturate.
#: CBF 0-100 mL/100 g/min: white matter about 20-25, grey matter about 50-60.
#: MTT 0-15 s and Tmax 0-6 s: normal tissue about 3-5 s and 0-2 s; the tops flag delayed tissue.
SCALES = {
    "rcbv": (*RCBV_RANGE, MAP_UNITS["rcbv"]),
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


#: ROI outlines: a light line over a black one of this width (points) so the outline reads on every
#: colour of the jet scale and on the grey background; the light colours are not in jet (white, magenta,
#: pale pink, pale green), and every outline carries its ROI's name on the image.
OUTLINE_HALO_PT = 3.0
OUTLINE_PT = 1.4
# ROI_OUTLINE_COLOURS and REFERENCE_OUTLINE_COLOUR: io.display (shared with the DICOM overlay)
REFERENCE_HALO_PT = 1.8
REFERENCE_PT = 0.9
#: The automatic reference is scattered voxels: closed (this many voxels in-plane) and filled, then
#: outlined, so it shows as a region, not as specks; parts smaller than REFERENCE_MIN_PART voxels after
#: closing are left out of the outline (they are inside the mask all the same).
REFERENCE_CLOSING = 4
REFERENCE_MIN_PART = 6
#: The ROI names on the image: font size (pt).
LABEL_FONTSIZE = 8


def reference_outline(ref2d: np.ndarray) -> np.ndarray:
    """The region a 2-D reference mask (x, y, or as_image's (y, x)) covers, to be outlined: closed by
    REFERENCE_CLOSING voxels, holes filled, parts below REFERENCE_MIN_PART voxels dropped (bool, same
    shape). Holds every voxel of the mask that lies in a kept part."""
    from scipy import ndimage

    m = np.asarray(ref2d) != 0
    if not m.any():
        return m
    pad = REFERENCE_CLOSING + 1  # closing near the edge would otherwise lose the border
    padded = np.pad(m, pad)
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3), bool), iterations=REFERENCE_CLOSING)
    closed = ndimage.binary_fill_holes(closed | padded)[pad:-pad, pad:-pad]
    labels, n = ndimage.label(closed)
    sizes = ndimage.sum(closed, labels, index=np.arange(1, n + 1))
    return np.isin(labels, 1 + np.flatnonzero(sizes >= REFERENCE_MIN_PART))


def largest_slice(mask: np.ndarray) -> int:
    """The stored slice index (last axis of an (x, y, z) mask) with the most voxels (the first of ties)."""
    m = np.asarray(mask) != 0
    return int(np.argmax(m.reshape(-1, m.shape[-1]).sum(axis=0)))


def roi_label_position(img: np.ndarray) -> tuple[float, float, str, str]:
    """Where an ROI's name goes on an image panel (``img``: the ROI as as_image shows it, rows = display
    y up): above the ROI, or below it when it touches the panel's top; centred on it, or aligned with its
    inner edge when it lies in the panel's outer third (the name then stays inside the panel).
    (x, y, horizontal alignment, vertical alignment)."""
    ys, xs = np.nonzero(img)
    width = img.shape[1]
    x, ha = float(xs.min() + xs.max()) / 2.0, "center"
    if x > 2 * width / 3:
        x, ha = float(xs.max()), "right"
    elif x < width / 3:
        x, ha = float(xs.min()), "left"
    if ys.max() + 2 + 0.12 * img.shape[0] < img.shape[0]:
        return x, float(ys.max()) + 1.5, ha, "bottom"
    return x, float(ys.min()) - 1.5, ha, "top"


def _draw_outlines(ax, rois: dict[str, np.ndarray], reference: np.ndarray | None, z: int, *,
                   labels: bool = True) -> None:
    """The ROIs of display slice ``z`` as double outlines (ROI_OUTLINE_COLOURS over black) named on the
    image, and the reference's region (reference_outline) dashed."""
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=2.2, foreground="black")]
    for i, (name, m) in enumerate(rois.items()):
        img = as_image(m[:, :, z].astype(float))
        if not img.any():
            continue
        colour = ROI_OUTLINE_COLOURS[i % len(ROI_OUTLINE_COLOURS)]
        ax.contour(img, levels=[0.5], colors=["black"], linewidths=OUTLINE_HALO_PT, origin="lower")
        ax.contour(img, levels=[0.5], colors=[colour], linewidths=OUTLINE_PT, origin="lower")
        if labels:
            x, y, ha, va = roi_label_position(img)
            ax.text(x, y, name, ha=ha, va=va, color=colour, fontsize=LABEL_FONTSIZE, fontweight="bold",
                    path_effects=halo, clip_on=True)
    if reference is not None and reference[:, :, z].any():
        region = as_image(reference_outline(reference[:, :, z]).astype(float))
        if region.any():
            ax.contour(region, levels=[0.5], colors=["black"], linewidths=REFERENCE_HALO_PT, origin="lower")
            ax.contour(region, levels=[0.5], colors=[REFERENCE_OUTLINE_COLOUR], linewidths=REFERENCE_PT,
                       linestyles=[(0, (3, 2))], origin="lower")


def _overlay_layers(rcbv, background, rois, reference, *, affine, background_affine):
    """The layers of an rCBV overlay in display orientation: (grid, rcbv, background, rois, reference,
    the background's display maximum)."""
    grid = display_grid(affine, rcbv.shape)
    bg_affine = affine if background_affine is None else background_affine
    background = display_grid(bg_affine, background.shape).apply(background)
    finite = np.isfinite(background)
    bg_hi = float(np.percentile(background[finite], BACKGROUND_PERCENTILE)) if finite.any() else 1.0
    return (grid, grid.apply(rcbv), background, {name: grid.apply(m) for name, m in rois.items()},
            grid.apply(reference) if reference is not None else None, bg_hi)


def _overlay_panel(ax, grid, rcbv, background, bg_hi, z):
    """One display slice ``z``: background in grey, rCBV (0-5) in jet at alpha 0.6; the rCBV image."""
    lo, hi, _ = SCALES["rcbv"]
    extent = (-0.5, rcbv.shape[0] - 0.5, -0.5, rcbv.shape[1] - 0.5)
    ax.imshow(as_image(background[:, :, z]), cmap="gray", vmin=0, vmax=bg_hi, origin="lower", extent=extent)
    im = ax.imshow(as_image(np.ma.masked_invalid(rcbv[:, :, z])), cmap=RCBV_CMAP, vmin=lo, vmax=hi, alpha=RCBV_ALPHA,
                   origin="lower", extent=extent)
    ax.set_title(grid.position_label(z), fontsize=9)
    draw_marks(ax, grid)
    return im


def _outline_legend(fig, rois, reference) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=ROI_OUTLINE_COLOURS[i % len(ROI_OUTLINE_COLOURS)], linewidth=OUTLINE_PT,
                      path_effects=_line_halo(), label=name) for i, name in enumerate(rois)]
    if reference is not None:
        handles.append(Line2D([], [], color=REFERENCE_OUTLINE_COLOUR, linestyle="dashed", path_effects=_line_halo(),
                              label="reference tissue"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, -0.02 - 0.03 * ((len(handles) - 1) // 4)))


def _line_halo():
    from matplotlib import patheffects

    return [patheffects.Stroke(linewidth=OUTLINE_HALO_PT, foreground="black"), patheffects.Normal()]


def fig_rcbv_overlay(rcbv: np.ndarray, background: np.ndarray, rois: dict[str, np.ndarray],
                     reference: np.ndarray | None, slices: list[int], *, affine: np.ndarray,
                     background_affine: np.ndarray | None = None) -> bytes:
    """rCBV (0-5, ratio) over ``background`` on ``slices`` (stored slice indices), with ROI outlines
    named on the image and the reference's outline, in radiological convention (io.display_grid of
    ``affine``, the maps' voxel-to-world affine) with orientation letters and each slice's position
    (mm) as its title. The background may have a finer in-plane grid over the same slices (a registered
    T1, ``anat.nii.gz``, on ``background_affine``): every layer is drawn in the rCBV map's display voxel
    coordinates."""
    grid, rcbv, background, rois, reference, bg_hi = _overlay_layers(
        rcbv, background, rois, reference, affine=affine, background_affine=background_affine)
    slices = display_slices(grid, slices)
    nr, nc = _grid(len(slices), max_cols=4)
    fig, axes = figure(nr, nc, figsize=(3.2 * nc + 1.0, 3.2 * nr), images=True)
    im = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), slices, strict=False):  # the grid may hold more axes
        im = _overlay_panel(ax, grid, rcbv, background, bg_hi, z)
        _draw_outlines(ax, rois, reference, z)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=f"rCBV ({SCALES['rcbv'][2]})")
    _outline_legend(fig, rois, reference)
    return png_bytes(fig)


def fig_lesion_slice(rcbv: np.ndarray, background: np.ndarray, name: str, mask: np.ndarray,
                     reference: np.ndarray | None, *, affine: np.ndarray,
                     background_affine: np.ndarray | None = None) -> bytes:
    """The first screen's picture of one lesion: rCBV (0-5, ratio) over ``background`` on the slice
    through the lesion's largest area (``largest_slice``), the lesion outlined and named on the image,
    the reference's outline where it crosses the slice, an rCBV colour bar; radiological convention and
    orientation letters as fig_rcbv_overlay."""
    z_stored = largest_slice(mask)
    grid, rcbv, background, rois, reference, bg_hi = _overlay_layers(
        rcbv, background, {name: mask}, reference, affine=affine, background_affine=background_affine)
    z = grid.display_slice(z_stored)
    fig, axes = figure(1, 1, figsize=(3.6, 3.1), images=True)
    ax = axes[0, 0]
    im = _overlay_panel(ax, grid, rcbv, background, bg_hi, z)
    _draw_outlines(ax, rois, reference, z)
    fig.colorbar(im, ax=ax, shrink=0.85, label=f"rCBV ({SCALES['rcbv'][2]})")
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
                cmap: Any = "viridis", ticks: dict[float, str] | None = None) -> bytes:
    """All slices of a 3-D map on a fixed scale [vmin, vmax] with a colourbar labelled ``label``, in
    radiological convention (io.display_grid of ``affine``, voxel to world), with orientation letters
    and each slice's position (mm) above it. ``cmap``: a matplotlib colour map or its name; ``ticks``:
    the colourbar's tick values and their labels (a discrete map's legend), else matplotlib's.

    The slices are tiled into one image (``montage_tiles``) drawn on one axes: a panel per slice cost
    an axes each, and laying out and drawing 24 axes took most of report.html's time."""
    grid = display_grid(affine, data.shape)
    data = grid.apply(data)
    w_px, h_px = data.shape[0], data.shape[1]
    band = int(round(MONTAGE_TITLE_BAND * h_px))
    tiles, origins = montage_tiles(data, _grid(data.shape[2])[1], band=band, gap=MONTAGE_GAP)
    scale = MONTAGE_PANEL_PX / DPI / max(w_px, h_px)  # inches per voxel
    img_w, img_h = tiles.shape[1] * scale, tiles.shape[0] * scale
    fig_w = img_w + (1.6 if ticks else 1.1)  # the colourbar, its ticks (named: wider) and its label on the right
    fig, _ = figure(figsize=(fig_w, img_h), axes=False)
    ax = fig.add_axes((0.0, 0.0, img_w / fig_w, 1.0), xticks=[], yticks=[], frame_on=False)
    im = ax.imshow(np.ma.masked_invalid(tiles), cmap=cmap, vmin=vmin, vmax=vmax, origin="upper",
                   interpolation="nearest")
    for z, (row0, col0) in enumerate(origins):
        ax.text(col0 + w_px / 2, row0 - band / 2, grid.position_label(z), ha="center", va="center", fontsize=7)
        draw_marks(ax, grid, fontsize=MARK_FONTSIZE - 1, box=(row0, col0, w_px, h_px))
    cax = fig.add_axes((img_w / fig_w + 0.15 / fig_w, 0.1, 0.18 / fig_w, 0.8))
    bar = fig.colorbar(im, cax=cax, label=label)
    if ticks:
        bar.set_ticks(list(ticks), labels=list(ticks.values()), fontsize=7)
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
.ok{color:#1b5e20;font-weight:bold}.warning{color:#b71c1c;font-weight:bold}
img{max-width:100%}.small{font-size:.85em;color:#555}
"""

#: report.html's own layout, after the CSS it shares with compare.html: the first screen (case line,
#: warnings, one card per lesion) and the figure grids. The print rules (A4) put the first screen on a
#: page of its own, lay the maps out two and the curves three abreast, and keep figures, cards and table
#: rows whole; colours print as shown.
REPORT_CSS = """
h1{margin:.2em 0 .1em 0;font-size:1.6em}h2{margin:.8em 0 .3em 0}
.case{font-size:1.15em;margin:.2em 0 .5em 0}.case b{font-size:1.1em}
.first .disclaimer{font-size:.95em;padding:.35em .8em}
.warnbox{border:3px solid #e65100;background:#fff8e1;padding:.3em 1em;margin:.6em 0}
.warnbox ul{margin:.2em 0;padding-left:1.3em}.warnbox li{margin:.15em 0}
.okbox{border:2px solid #1b5e20;background:#f1f8e9;padding:.3em 1em;margin:.6em 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:.8em}
.cards .verdict{display:flex;gap:.8em;align-items:flex-start;margin:0}
.cards .pic{flex:0 0 260px}.cards .pic img{width:260px}.cards .txt{flex:1 1 auto;min-width:0}
.cards p{margin:.3em 0}.cards ul{margin:.2em 0;padding-left:1.2em}.next{font-size:1.05em}
.gate{color:#455a64;font-weight:bold}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:.4em .8em}
.maps{display:grid;grid-template-columns:1fr;gap:.2em}
.fig h4{margin:.4em 0 .1em 0}
table.details td,table.details th{font-size:.9em;padding:.2em .45em}
@page{size:A4;margin:10mm}
@media print{
 *{-webkit-print-color-adjust:exact;print-color-adjust:exact}
 body{max-width:none;margin:0;padding:0;font-size:8.5pt}
 .first{break-after:page;page-break-after:always}
 .cards{grid-template-columns:1fr;gap:.5em}.cards .pic{flex-basis:62mm}.cards .pic img{width:62mm}
 .maps{grid-template-columns:1fr 1fr;gap:0 4mm}.figs{grid-template-columns:1fr 1fr 1fr 1fr;gap:0 2mm}
 h2,h3,h4{break-after:avoid;page-break-after:avoid}
 tr,img,.fig,.verdict,.warnbox{break-inside:avoid;page-break-inside:avoid}
 td,th{padding:.1em .35em}
 .overlay img{max-height:62mm}.tail{font-size:7.5pt;padding:.15em .6em;border-width:1px;margin:.2em 0}
 .about h2{font-size:10pt;margin:.3em 0 0 0}.quality table,.details{font-size:7.5pt}p.small{margin:.2em 0}
}
"""


def esc(x: Any) -> str:
    """``x`` as text safe inside HTML, attribute values included (everything taken from a file)."""
    return html.escape(str(x), quote=True)


_f = fmt  # a number or "n/a" (quality.fmt)
_pct = pct  # a fraction as a percentage or "n/a" (quality.pct)


def _ci(r: dict, key: str = "rcbv", pct: bool = False) -> str:
    """The interval of a figure as "[lo, hi]" ("n/a" without one)."""
    lo, hi = (r.get("rcbv_ci_low"), r.get("rcbv_ci_high")) if key == "rcbv" else tuple((r.get(key) or [None, None])[:2])
    if num(lo) is None or num(hi) is None:
        return "n/a"
    return f"[{_pct(lo)}, {_pct(hi)}]" if pct else f"[{_f(lo)}, {_f(hi)}]"


def _details_table(rois: list[dict], thresholds: dict, standardized: dict | None) -> str:
    """One line per ROI with every figure behind its verdict (the first screen holds the verdict, its
    interval and the next step): what a reader checks after the first screen."""
    low, high = _f(thresholds.get("rcbv_low"), "g"), _f(thresholds.get("rcbv_high"), "g")
    std = (standardized or {}).get("rois") or {}
    rows = "".join(
        f'<tr><td>{esc(r.get("name", "?"))}</td><td>{_f(r.get("rcbv_median"))} {_ci(r)}</td>'
        f'<td>{_f(r.get("rcbv_mean"))}</td><td>{_f(r.get("rcbv_p90"))} {_ci(r, "rcbv_p90_ci")}</td>'
        f'<td>{_pct(r.get("ftb_low"))} / {_pct(r.get("ftb_mid"))} / {_pct(r.get("ftb_high"))}<br>'
        f'<span class="small">high {_ci(r, "ftb_high_ci", True)}</span></td>'
        f'<td>{"yes" if r.get("mixed") else "no"}</td>'
        f'<td>{esc(r.get("n_valid", "?"))} / {esc(r.get("n_voxels", "?"))}, {_f(r.get("volume_ml"))} mL</td>'
        f'<td>{_f(r.get("psr_percent"), ".0f")} %</td><td>{_f(r.get("relative_peak_height"))}</td>'
        f'<td>{_pct(r.get("leakage_cbv_change"), signed=True)}</td>'
        f'<td>{_f(std.get(str(r.get("name"))), ".0f")}</td></tr>'
        for r in rois)
    return ('<table class="details"><tr><th>ROI</th><th>median rCBV [95 %]</th><th>mean</th>'
            "<th>90th percentile [95 %]</th>"
            f"<th>FTB &lt; {low} / between / &gt; {high}</th><th>mixed</th><th>valid voxels, volume</th>"
            "<th>PSR</th><th>relative peak height</th><th>leakage: CBV change</th>"
            "<th>standardised CBV</th></tr>" + rows + "</table>"
            '<p class="small">95 % intervals: bootstrap over lesion and reference voxels and the pooled leakage '
            "corrections. PSR: percentage of signal recovery. Standardised CBV: Bedekar 2010, no reference tissue "
            "(the brain's median CBV = 1000 units).</p>")


def _leakage_matrix(rois: list[dict]) -> str:
    """Median rCBV of each ROI under each leakage correction (columns), * where pooled into the interval."""
    methods: list[str] = []
    for r in rois:
        methods += [m for m in (r.get("rcbv_by_leakage") or {}) if m not in methods]
    if not methods:
        return ""
    head = "".join(f"<th>{esc(m)}</th>" for m in methods)
    body = ""
    for r in rois:
        by, pooled = r.get("rcbv_by_leakage") or {}, set(r.get("ci_methods") or [])
        cells = "".join(
            f'<td>{_f((by.get(m) or {}).get("rcbv_median"))}{" *" if m in pooled else ""}'
            f'<br><span class="small">{esc(VERDICT_WORDS.get(str((by.get(m) or {}).get("verdict")), ""))}</span></td>'
            for m in methods)
        body += f'<tr><td>{esc(r.get("name", "?"))}</td>{cells}</tr>'
    return ('<h3>Median rCBV under each leakage correction</h3><table class="details"><tr><th>ROI</th>'
            f"{head}</tr>{body}</table><p class=\"small\">* pooled into the 95 % interval; below each value the "
            "verdict band it falls in.</p>")


def _lesion_card(r: dict, thresholds: dict, picture: str) -> str:
    """The first screen's box of one lesion: its rCBV slice, verdict, interval, FTB, mixed flag, the
    failed gates (not assessable), the next step and the reasons."""
    v = r.get("verdict", "indeterminate")
    colour = VERDICT_COLOUR.get(v, "#555")
    gates = r.get("gates_failed") or []
    gate = (f'<p class="gate">Gates failed: {esc("; ".join(str(g) for g in gates))}</p>' if gates else "")
    reasons = "".join(f"<li>{esc(x)}</li>" for x in r.get("reasons", []))
    return (
        f'<div class="verdict" style="border-color:{colour}"><div class="pic">{picture}</div><div class="txt">'
        f'<h3>{esc(r.get("name", "?"))}: <span style="color:{colour}">{esc(VERDICT_WORDS.get(v, v))}</span></h3>'
        f"<p>Median rCBV <b>{_f(r.get('rcbv_median'))}</b>, 95 % interval <b>{_ci(r)}</b>; FTB above "
        f"{_f(thresholds.get('rcbv_high'), 'g')}: <b>{_pct(r.get('ftb_high'))}</b> {_ci(r, 'ftb_high_ci', True)}; "
        f"mixed lesion: <b>{'yes' if r.get('mixed') else 'no'}</b>; {_f(r.get('volume_ml'))} mL.</p>{gate}"
        f'<p class="next"><b>Next step:</b> {esc(r.get("next_step", ""))}</p>'
        f'<ul class="small">{reasons}</ul></div></div>')


def _load(folder: Path, rep: dict, name: str) -> np.ndarray | None:
    p = output_path(folder, rep, name)
    return load_array(p, what=name) if p.is_file() else None


def _load_with_affine(folder: Path, rep: dict, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A map and its voxel-to-world affine (mm), or (None, None) when the file is missing."""
    p = output_path(folder, rep, name)
    return load_array_affine(p, what=name) if p.is_file() else (None, None)


class _Case:
    """What the page's parts read from an ``analyze`` output folder, loaded once: report.json, the
    rCBV map and its affine, the brain, the drawable ROI masks, the background of the overlays and the
    reference mask; ``notes`` collects why something could not be shown."""

    def __init__(self, where: Path) -> None:
        # one analysis: its folder, or its report file in a folder of several (a BIDS perf/ folder); every
        # file is then read by the report's "files" (output_path), so the others are never touched
        self.folder, path = analysis_of(Path(where))
        self.rep = read_json_object(path, what="report", fix="re-run 'perfusion analyze'")
        self.notes: list[str] = []
        self.rcbv, self.affine = _load_with_affine(self.folder, self.rep, "rcbv")
        self.brain = _load(self.folder, self.rep, "brain_mask")
        self.masks = _roi_masks(self.folder, self.rep, self.rcbv, self.notes)
        reference = _load(self.folder, self.rep, "reference_mask")
        self.reference = reference != 0 if reference is not None else None
        self.background, self.bg_name, self.bg_affine = self._background()

    def _background(self):
        """The overlays' background: the registered T1 when it fits the maps' slices, else the baseline
        image (else the rCBV map itself); its name and affine."""
        if self.rcbv is None:
            return None, "", None
        anat, anat_affine = _load_with_affine(self.folder, self.rep, "anat")
        if anat is not None and anat.shape[2] == self.rcbv.shape[2] and anat.shape[0] % self.rcbv.shape[0] == 0:
            return anat, "the registered anatomical image (--anat)", anat_affine
        if anat is not None:
            self.notes.append(f"anat.nii.gz shape {anat.shape} does not fit the maps {self.rcbv.shape}; baseline used")
        baseline = _load(self.folder, self.rep, "baseline")
        return (baseline if baseline is not None else np.nan_to_num(self.rcbv)), "the baseline image", self.affine

    def unusable(self) -> float | None:
        """The fraction of brain voxels with a NaN in CBV, CBF or MTT, counted from the maps only for a
        report.json of an older version (without "fit" "unusable_fraction"); else None."""
        if "unusable_fraction" in (self.rep.get("fit") or {}) or self.brain is None:
            return None
        maps = [m for m in (_load(self.folder, self.rep, k) for k in ("cbv", "cbf", "mtt")) if m is not None]
        return unusable_fraction(self.brain, maps) if maps else None


def build_html(where: Path) -> str:
    """The report page of one analysis (its ``analyze`` output folder, or its report file) as one
    self-contained HTML string (_page)."""
    return _page(_Case(where))


def _page(case: _Case) -> str:
    """The page of ``case``. The first screen (a page of its own in print) holds what is needed to act:
    the case's label and scan date, the quality warnings, and per lesion its verdict, interval, next step
    and rCBV slice. Then the details, the figures, the quality tables and where the page came from."""
    rep = case.rep
    warns = all_warnings(rep, unusable=case.unusable())
    parts = ['<section class="first">', *_header(rep), *_warnings_box(warns), *_verdicts(case), "</section>",
             *_details(rep), "<h2>Figures</h2>", *_rcbv_figure(case), *_montages(case),
             *_curve_figures(case), *_quality(case), *_provenance(rep)]
    if case.notes:
        parts.append("<h3>Notes on this page</h3><ul>" + "".join(f"<li>{esc(n)}</li>" for n in case.notes) + "</ul>")
    parts.append(f'<div class="disclaimer tail">{esc(DISCLAIMER)}</div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>DSC perfusion report</title>"
            f"<style>{CSS}{REPORT_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _thresholds(rep: dict) -> tuple[float, float]:
    thr = rep.get("thresholds", {})
    return float(thr.get("rcbv_low", 1.0)), float(thr.get("rcbv_high", 1.75))


#: What the first screen says when report.json "case" has no label or no scan date (never a name taken
#: from the input's files: folders and files are often named after the patient).
NO_LABEL = "unlabelled case"
NO_SCAN_DATE = "scan date not given"


def _header(rep: dict) -> list[str]:
    """Title, the case's label and scan date (report.json "case", as the user gave them), the analysis
    date, the disclaimer."""
    case = rep.get("case") or {}
    label, scan_date = case.get("label"), case.get("scan_date")
    created = str(rep.get("created_utc") or "")[:10] or "not recorded"
    return ["<h1>DSC perfusion report</h1>",
            f'<div class="case"><b>{esc(label) if label else NO_LABEL}</b> &middot; '
            f"{'scan date ' + esc(scan_date) if scan_date else NO_SCAN_DATE} &middot; analysed {esc(created)}</div>",
            f'<div class="disclaimer">{esc(DISCLAIMER)}</div>']


def _warnings_box(warns: list[str]) -> list[str]:
    """The quality warnings (report.json "warnings" and the quality checks': quality.all_warnings), or
    a line saying there are none."""
    if not warns:
        return ['<div class="okbox">No quality warning: the acquisition and the analysis pass every check in '
                "the quality tables below.</div>"]
    return [f'<div class="warnbox"><b>Quality warnings ({len(warns)})</b><ul>'
            + "".join(f"<li>{esc(w)}</li>" for w in warns) + "</ul></div>"]


def _verdicts(case: _Case) -> list[str]:
    """One card per ROI (``_lesion_card``) with its rCBV slice (``fig_lesion_slice``)."""
    rep = case.rep
    thr = rep.get("thresholds", {})
    rois = rep.get("rois", [])
    parts = ["<h2>Verdict per ROI</h2>"]
    if not rois:
        return [*parts, "<p>No ROI was given to <code>perfusion analyze</code>: maps only, no verdict.</p>"]
    cards = []
    for r in rois:
        name = r.get("name", "?")
        picture = ""
        if case.rcbv is not None and case.affine is not None and name in case.masks and case.masks[name].any():
            picture = img_tag(fig_lesion_slice(case.rcbv, case.background, name, case.masks[name], case.reference,
                                               affine=case.affine, background_affine=case.bg_affine),
                              f"rCBV slice {name}")
        cards.append(_lesion_card(r, thr, picture))
    return [*parts, '<div class="cards">', *cards, "</div>",
            f'<p class="small">Each picture: rCBV (0-5, ratio to the reference median) over {case.bg_name or "-"} '
            "on the slice through the lesion's largest area, the lesion outlined and named, the reference tissue "
            "dashed; radiological convention (patient's right on the image's left). Thresholds: "
            f"{esc(thr.get('source', ''))}</p>"]


def _details(rep: dict) -> list[str]:
    """The figures behind each verdict, the leakage corrections, the rule."""
    rois = rep.get("rois", [])
    if not rois:
        return []
    rule = rois[0].get("rule", "")
    return ["<h2>Lesion details</h2>",
            _details_table(rois, rep.get("thresholds", {}), rep.get("reference", {}).get("standardized")),
            _leakage_matrix(rois), f'<p class="small">Rule: {esc(rule)}</p>']


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


def _rcbv_figure(case: _Case) -> list[str]:
    """rCBV over the registered anatomy (or the baseline image), slices holding an ROI, outlines drawn."""
    rcbv = case.rcbv
    if rcbv is None or case.affine is None:  # both None together
        case.notes.append("rcbv.nii.gz not found: no rCBV figure")
        return []
    union = np.zeros(rcbv.shape, bool)
    for m in case.masks.values():
        union |= m
    slices = slices_with_roi(union) or list(range(rcbv.shape[2]))
    what = "slices holding an ROI" if union.any() else "all slices (no ROI contour available)"
    return [f'<div class="fig overlay"><h3>rCBV over {case.bg_name} ({what})</h3>',
            img_tag(fig_rcbv_overlay(rcbv, case.background, case.masks, case.reference, slices, affine=case.affine,
                                     background_affine=case.bg_affine), "rCBV overlay"),
            '<p class="small">rCBV scale 0-5 (ratio to the reference median); outlined and named: the ROIs; '
            f"dashed: the reference tissue's region. {ORIENTATION_NOTE}</p></div>"]


#: The FTB map's classes (ftb.nii.gz: 0 outside the ROIs, 1/2/3 below / between / above the thresholds),
#: in a discrete colour map: light grey brain, blue, amber, red (distinct for the common colour
#: vision deficiencies by lightness as well as hue).
FTB_COLOURS = ("#d9d9d9", "#2166ac", "#f6b93b", "#b2182b")


def _ftb_montage(case: _Case) -> list[str]:
    """The FTB classes of the ROI voxels over the brain (light grey), all slices, with the legend."""
    ftb, affine = _load_with_affine(case.folder, case.rep, "ftb")
    if ftb is None or affine is None:  # both None together
        if case.rep.get("rois"):
            case.notes.append("ftb.nii.gz not found: no FTB montage")
        return []
    from matplotlib.colors import ListedColormap

    low, high = _thresholds(case.rep)
    shown = np.where(ftb > 0, ftb, np.where(case.brain != 0, 0, np.nan) if case.brain is not None else 0)
    ticks = {0.0: "brain", 1.0: f"< {low:g}", 2.0: f"{low:g}-{high:g}", 3.0: f"> {high:g}"}
    img = fig_montage(shown.astype(np.float64), affine=affine, label="FTB class (rCBV)", vmin=-0.5, vmax=3.5,
                      cmap=ListedColormap(list(FTB_COLOURS), name="ftb_classes"), ticks=ticks)
    return [f'<div class="fig"><h4>FTB (rCBV classes: blue &lt; {low:g}, amber {low:g}-{high:g}, red &gt; '
            f"{high:g}; grey: brain outside the ROIs)</h4>", img_tag(img, "FTB montage"), "</div>"]


#: TTP has no fixed physiological range (it counts from the series' first frame, so it moves with the
#: injection's timing): its scale is these percentiles of the brain's TTP (s), widened to whole seconds.
TTP_PERCENTILES = (2.0, 98.0)


def ttp_scale(ttp: np.ndarray, brain: np.ndarray | None) -> tuple[float, float]:
    """TTP's colour scale (s): TTP_PERCENTILES of the finite values in ``brain`` (all finite values
    without one), floor and ceiling to whole seconds; (0, 1) when nothing is finite."""
    v = ttp[np.isfinite(ttp) & (brain != 0 if brain is not None else True)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = np.percentile(v, TTP_PERCENTILES)
    lo, hi = float(np.floor(lo)), float(np.ceil(hi))
    return lo, hi if hi > lo else lo + 1.0


def _montages(case: _Case) -> list[str]:
    """CBV, CBF, MTT and Tmax on fixed scales, TTP on the brain's range, K2 on a symmetric one and the FTB
    classes, all slices."""
    parts = ['<h3>Maps, all slices</h3><div class="maps">']
    for name, title in (("cbv", "CBV"), ("cbf", "CBF"), ("mtt", "MTT"), ("ttp", "TTP"), ("tmax", "Tmax")):
        data, affine = _load_with_affine(case.folder, case.rep, name)
        if data is None or affine is None:  # both None together
            case.notes.append(f"{name}.nii.gz not found: no {title} montage")
            continue
        if name == "ttp":
            (lo, hi), unit, why = ttp_scale(data, case.brain), "s", "the brain's 2nd-98th percentile, from frame 0"
        else:
            (lo, hi, unit), why = SCALES[name], "fixed"
        parts.append(f'<div class="fig"><h4>{title} ({unit}, scale {lo:g}-{hi:g}, {why})</h4>'
                     + img_tag(fig_montage(data, affine=affine, label=f"{title} ({unit})", vmin=lo, vmax=hi),
                               f"{title} montage") + "</div>")
    k2, k2_affine = _load_with_affine(case.folder, case.rep, "k2")
    if k2 is not None and k2_affine is not None:  # both None together
        lim = k2_limit(k2, case.brain if case.brain is not None else np.isfinite(k2))
        parts.append(f'<div class="fig"><h4>K2 (1/s, symmetric scale +/-{lim:.2g}; &gt; 0 T1-dominant, &lt; 0 '
                     "T2*-dominant)</h4>"
                     + img_tag(fig_montage(k2, affine=k2_affine, label="K2 (1/s)", vmin=-lim, vmax=lim, cmap="RdBu_r"),
                               "K2 montage") + "</div>")
    parts += [*_ftb_montage(case), "</div>", f'<p class="small">{ORIENTATION_NOTE}</p>']
    return parts


def _curve_figures(case: _Case) -> list[str]:
    """The AIF, and per ROI its mean curves and its rCBV histogram, in one grid."""
    rep, rcbv = case.rep, case.rcbv
    low, high = _thresholds(rep)
    figs: list[str] = []
    curves = read_curves(output_path(case.folder, rep, "curves"))
    if "time_s" in curves and "aif" in curves:
        figs.append(img_tag(fig_aif(curves["time_s"], curves["aif"], rep.get("aif", {}).get("n_voxels", "?")), "AIF"))
    else:
        case.notes.append("curves.tsv not found or without an aif column: no AIF or ROI curves")
    clipped = []
    for r in rep.get("rois", []):
        name = r.get("name", "?")
        if "time_s" in curves and f"roi:{name}" in curves:
            figs.append(img_tag(fig_roi_curves(curves["time_s"], curves, name), f"curves {name}"))
        if rcbv is not None and name in case.masks:
            h = histogram_data(rcbv[case.masks[name]], low, high)
            figs.append(img_tag(fig_histogram(h, name), f"rCBV histogram {name}"))
            if h["n_clipped"]:
                clipped.append(f"{esc(name)}: {h['n_clipped']} voxels outside {HIST_RANGE[0]:g}-{HIST_RANGE[1]:g} "
                               "are counted in the end bins.")
    if not figs:
        return []
    return ["<h3>Arterial input function, ROI curves and rCBV histograms</h3>", '<div class="figs">',
            *(f'<div class="fig">{f}</div>' for f in figs), "</div>",
            *(f'<p class="small">{c}</p>' for c in clipped)]


def _quality(case: _Case) -> list[str]:
    """The acquisition against the consensus protocol and the analysis's quality table (quality.py: the
    rows whose status is "warning" are the first screen's warnings too)."""
    rep = case.rep
    parts = ['<section class="quality"><h2>Quality</h2>']
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
    qrows = analysis_rows(rep, unusable=case.unusable())
    parts.append("<h3>Analysis</h3><table><tr><th>item</th><th>value</th><th>expected</th><th>status</th><th>note</th></tr>"
                 + "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td><td class=\"{d}\">{d}</td>"
                           f"<td>{esc(e)}</td></tr>" for a, b, c, d, e in qrows) + "</table>"
                 '<p class="small">Every row marked warning is among the quality warnings on the first screen '
                 '(report.json "warnings", which the terminal prints too).</p></section>')
    return parts


def _provenance(rep: dict) -> list[str]:
    """Versions, dates and the input files (names only, no folder: report.json "inputs")."""
    version = rep.get("software", {}).get("version", "unknown")
    date = rep.get("created_utc")
    inputs = ", ".join(esc(input_file_name(k, v)) for k, v in rep.get("inputs", {}).items())
    return ['<div class="about"><h2>About this page</h2>',
            f'<p class="small">perfusion {esc(version)} (analysis); page written by perfusion {esc(__version__)} on '
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Analysis date: "
            f"{esc(date) if date else 'not recorded in report.json'}. Input files: {inputs or 'not recorded'}.</p>"
            "</div>"]


def write_html(where: Path) -> Path:
    """Write the report page of one analysis (its folder, or its report file) beside its report, under
    the name report.json "files" gives, whole or not at all (io.atomic_write); return its path."""
    case = _Case(where)
    return atomic_write(output_path(case.folder, case.rep, "report_html"), _page(case))
