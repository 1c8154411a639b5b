"""compare.html: the follow-up comparison (perfusion.followup.compare) as one self-contained page, and
write_comparison (compare.json, compare.html, the prior-to-current transform).

Figures are PNGs from matplotlib (Agg) embedded as base64 data URIs, drawn on the current time
point's grid in the radiological convention (io.display_grid); everything taken from a file is
HTML-escaped. The page shares its style, scales and helpers with report.html (report.html); the
numbers all come from :class:`perfusion.followup.compare.Comparison`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perfusion import DISCLAIMER, __version__
from perfusion.followup.compare import PATIENT_PREFIX, REFERENCE_PREFIX, TRANSFORM_FILE, Comparison
from perfusion.io import atomic_write, display_grid, write_json
from perfusion.quantify.register import write_transform
from perfusion.report.html import (
    CSS,
    ORIENTATION_NOTE,
    SCALES,
    VERDICT_COLOUR,
    VERDICT_WORDS,
    as_image,
    display_slices,
    draw_marks,
    esc,
    figure,
    img_tag,
    num,
    png_bytes,
    slices_with_roi,
)

#: At most this many slices in the side-by-side figure (evenly spaced among the slices holding a
#: current ROI): 12 rows keep the page a few MB.
MAX_FIGURE_SLICES = 12

#: Box colour per pattern code on the page (verdict colours of report.html).
PATTERN_COLOUR = {
    "progression_pattern": VERDICT_COLOUR["likely_recurrence"],
    "rcbv_rising": VERDICT_COLOUR["likely_recurrence"],
    "pseudoprogression_pattern": VERDICT_COLOUR["likely_treatment_effect"],
    "response_pattern": VERDICT_COLOUR["likely_treatment_effect"],
    "rcbv_falling": VERDICT_COLOUR["likely_treatment_effect"],
}


# --------------------------------------------------------------------------------------- figures


def figure_slices(masks: dict[str, np.ndarray], n_slices: int, *, limit: int = MAX_FIGURE_SLICES) -> list[int]:
    """Slices holding a current ROI (all slices if none), at most ``limit`` evenly spaced ones."""
    union = np.zeros(next(iter(masks.values())).shape, bool) if masks else None
    for m in masks.values():
        union |= m
    slices = slices_with_roi(union) if union is not None else []
    slices = slices or list(range(n_slices))
    if len(slices) > limit:
        slices = [slices[int(i)] for i in np.linspace(0, len(slices) - 1, limit).round()]
    return slices


def fig_side_by_side(prior_rcbv: np.ndarray, current_rcbv: np.ndarray, background: np.ndarray,
                     current_masks: dict[str, np.ndarray], prior_masks: dict[str, np.ndarray],
                     slices: list[int], *, affine: np.ndarray) -> bytes:
    """Rows = slices (stored indices of the current grid, drawn in display order); left the prior rCBV on
    the current grid, right the current rCBV, both over the current baseline on the fixed 0-5 scale;
    solid contours the current ROIs, dashed the prior ROIs. Radiological convention from ``affine`` (the
    current grid's, voxel to world; io.display_grid), orientation letters, slice positions (mm)."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    grid = display_grid(affine, current_rcbv.shape)
    prior_rcbv, current_rcbv, background = (grid.apply(a) for a in (prior_rcbv, current_rcbv, background))
    current_masks = {n: grid.apply(m) for n, m in current_masks.items()}
    prior_masks = {n: grid.apply(m) for n, m in prior_masks.items()}
    slices = display_slices(grid, slices)

    lo, hi, unit = SCALES["rcbv"]
    colours = colormaps["tab10"]
    names = list(dict.fromkeys([*current_masks, *prior_masks]))
    fig, axes = figure(len(slices), 2, figsize=(2 * 3.2 + 1.2, 3.2 * len(slices) + 0.4), images=True)
    finite = background[np.isfinite(background)]
    bg_hi = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    im = None
    for row, z in zip(axes, slices, strict=True):
        for ax, data, title in ((row[0], prior_rcbv, "prior (on current grid)"), (row[1], current_rcbv, "current")):
            ax.axis("off")
            ax.imshow(as_image(background[:, :, z]), cmap="gray", vmin=0, vmax=bg_hi or 1.0, origin="lower")
            im = ax.imshow(as_image(np.ma.masked_invalid(data[:, :, z])), cmap="jet", vmin=lo, vmax=hi, alpha=0.6,
                           origin="lower")
            for i, name in enumerate(names):
                for masks, style in ((current_masks, "solid"), (prior_masks, "dashed")):
                    m = masks.get(name)
                    if m is not None and m[:, :, z].any():
                        ax.contour(as_image(m[:, :, z].astype(float)), levels=[0.5], colors=[colours(i % 10)],
                                   linewidths=1.2, linestyles=style, origin="lower")
            ax.set_title(f"{title}, {grid.position_label(z)}", fontsize=9)
            draw_marks(ax, grid)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=f"rCBV ({unit})")
    handles = [Line2D([], [], color=colours(i % 10), label=name) for i, name in enumerate(names)]
    handles += [Line2D([], [], color="black", label="current ROI"),
                Line2D([], [], color="black", linestyle="dashed", label="prior ROI (registered)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.03 * ((len(handles) - 1) // 4)))
    return png_bytes(fig)


def fig_rcbv_change(rows: list[dict], low: float, high: float) -> bytes:
    """Median rCBV (ratio) per ROI at the prior and current time point, with the verdict thresholds."""
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    fig, axes = figure(figsize=(5.5, 3.4))
    ax = axes[0, 0]
    top = SCALES["rcbv"][1]
    for i, r in enumerate(rows):
        p, c = r["rcbv_median"]["prior"], r["rcbv_median"]["current"]
        ys = [np.nan if p is None else p, np.nan if c is None else c]
        top = max([top] + [y * 1.1 for y in ys if np.isfinite(y)])
        ax.plot([0, 1], ys, marker="o", color=colours(i % 10), label=r["name"])
    ax.axhline(low, color="tab:green", linestyle="--", linewidth=1, label=f"threshold {low:g}")
    ax.axhline(high, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {high:g}")
    ax.set_xticks([0, 1], ["prior", "current"])
    ax.set_xlim(-0.3, 1.3)
    ax.set_ylim(0, top)
    ax.set_ylabel("median rCBV (ratio)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return png_bytes(fig)


# ------------------------------------------------------------------------------------------ page


def _fmt(x: Any, fmt: str = ".2f", *, pct: bool = False, signed: bool = False) -> str:
    v = num(x)
    if v is None:
        return "n/a"
    if pct:
        return f"{100 * v:+.0f} %" if signed else f"{100 * v:.0f} %"
    return format(v, ("+" if signed else "") + fmt)


def _points(x: Any) -> str:
    """A change of a fraction in percentage points, or n/a."""
    v = num(x)
    return "n/a" if v is None else f"{100 * v:+.0f} percentage points"


def _direction(code: str) -> str:
    """A direction of compare.json in words ('no_overlap' -> 'no overlap')."""
    return code.replace("_", " ")


def _roi_box(r: dict) -> str:
    """One ROI's box: the pattern sentence in its colour and the table of prior, current and change."""
    colour = PATTERN_COLOUR.get(r["pattern"], VERDICT_COLOUR["indeterminate"])
    vol, med, ver = r["volume_ml"], r["rcbv_median"], r["verdict"]
    ftb_rows = "".join(
        f"<tr><td>FTB {k} (fraction of voxels)</td><td>{_fmt(f['prior'], pct=True)}</td>"
        f"<td>{_fmt(f['current'], pct=True)}</td><td>{_points(f['change'])}</td><td></td></tr>"
        for k, f in r["ftb"].items())
    words = {k: VERDICT_WORDS.get(str(ver[k]), str(ver[k])) for k in ("prior", "current")}
    return (
        f'<div class="verdict" style="border-color:{colour}">'
        f'<h3>{esc(r["name"])}: <span style="color:{colour}">{esc(r["pattern_sentence"])}</span></h3>'
        "<table><tr><th>measure</th><th>prior</th><th>current</th><th>change</th><th>direction</th></tr>"
        f"<tr><td>Volume (mL)</td><td>{_fmt(vol['prior'])}</td><td>{_fmt(vol['current'])}</td>"
        f"<td>{_fmt(vol['change'], signed=True)} mL ({_fmt(vol['relative_change'], pct=True, signed=True)})</td>"
        f"<td>{esc(_direction(vol['direction']))}</td></tr>"
        f"<tr><td>Median rCBV (ratio)</td><td>{_fmt(med['prior'])}</td><td>{_fmt(med['current'])}</td>"
        f"<td>{_fmt(med['change'], signed=True)} ({_fmt(med['relative_change'], pct=True, signed=True)})</td>"
        f"<td>{esc(_direction(med['direction']))}</td></tr>"
        f"{ftb_rows}"
        f"<tr><td>Verdict</td><td>{esc(words['prior'])}</td><td>{esc(words['current'])}</td>"
        f"<td>{'changed' if ver['changed'] else 'unchanged'}</td><td></td></tr></table>"
        f"<p>Median rCBV of the prior map inside the current ROI: <b>{_fmt(r['prior_rcbv_median_in_current_roi'])}</b> "
        f"(useful when the ROI was redrawn); overlap of the prior and current ROI (Dice, on the current grid): "
        f"{_fmt(r['roi_overlap_dice'])}.</p>"
        f'<p class="small">Pattern code: {esc(r["pattern"])}. Each time point\'s values come from its own '
        "report.json.</p>"
        "</div>")


#: The banners at the top of compare.html: red when the folders may hold two patients, amber when the
#: two analyses' references differ (inline styles: the page shares report.html's CSS).
BANNER_STYLE = {"patient": "border:3px solid #b00020;background:#fde7ea;color:#7a0016;padding:0.6em 1em;"
                           "margin:0.6em 0;font-size:1.15em",
                "reference": "border:3px solid #b26a00;background:#fff4e0;color:#5c3700;padding:0.6em 1em;"
                             "margin:0.6em 0"}


def banner_text(text: str) -> str:
    """A warning without the words its banner's or panel's title says (compare.PATIENT_PREFIX,
    compare.REFERENCE_PREFIX), capitalised."""
    for prefix in (PATIENT_PREFIX, REFERENCE_PREFIX):
        text = text.removeprefix(prefix)
    return text[:1].upper() + text[1:]


def check_summary(d: dict) -> str:
    """One sentence of what the patient and reference checks found (shown whether they pass or not)."""
    patient, refs = d["patient_check"], d["reference_check"]
    sub = patient["subject"]
    if sub["match"] is None:
        subject = "BIDS subject not checked (" + ("no label at either time point" if sub["prior"] == sub["current"]
                                                  else "a label at one time point only") + ")"
    elif sub["match"]:
        subject = f"BIDS subject sub-{sub['current']} at both time points"
    else:
        subject = f"BIDS subjects differ: sub-{sub['prior']} (prior), sub-{sub['current']} (current)"
    anat = patient["anatomy"]
    anatomy = (f"baseline correlation {anat['correlation']:.2f} (one head: {anat['threshold']:g} or more)"
               if anat["correlation"] is not None else "anatomy not checked (too little contrast)")
    kinds = refs["prior"]["kind"], refs["current"]["kind"]
    reference = (f"reference {kinds[0]} at both" if kinds[0] == kinds[1]
                 else f"reference {kinds[0]} (prior), {kinds[1]} (current)")
    return f"{subject}; {anatomy}; {reference}."


def check_banners(d: dict) -> list[str]:
    """The first screen's warnings of compare.json: patient_check's (two patients?) and reference_check's
    (references differ), each a banner; none when both checks pass."""
    out = []
    patient = d["patient_check"]
    if patient["warning"]:
        out.append(f'<div class="banner" id="patient-warning" style="{BANNER_STYLE["patient"]}"><b>Warning: different '
                   f"patients?</b> {esc(banner_text(patient['warning']))}.</div>")
    refs = d["reference_check"]
    if not refs["match"]:
        out.append(f'<div class="banner" id="reference-warning" style="{BANNER_STYLE["reference"]}"><b>Warning: the '
                   "references differ.</b> " + " ".join(esc(banner_text(p) + ".") for p in refs["problems"])
                   + "</div>")
    return out


def build_html(comp: Comparison) -> str:
    """compare.html: one self-contained page (figures as base64 PNG, no scripts or links)."""
    d = comp.data
    parts: list[str] = ["<h1>DSC perfusion follow-up comparison</h1>", *check_banners(d),
                        f'<div class="disclaimer">{esc(DISCLAIMER)}</div>']
    ins = d["inputs"]
    parts.append(
        f"<p>perfusion {esc(__version__)}, {esc(d['created_utc'])}.</p><table>"
        "<tr><th>time point</th><th>report SHA-256</th><th>analysed (UTC)</th><th>perfusion version</th></tr>"
        + "".join(f"<tr><td>{label}</td><td>{esc(str(ins[label]['report_sha256'])[:16])}</td>"
                  f"<td>{esc(ins[label]['analysis_created_utc'])}"
                  f"</td><td>{esc(ins[label]['software_version'])}</td></tr>" for label in ("prior", "current"))
        + "</table>")
    parts.append(f"<p><b>Checks:</b> {esc(check_summary(d))}</p>")
    reg = d["registration"]
    if reg["performed"]:
        rot = ", ".join(f"{v:.2f}" for v in reg["rotation_deg"])
        tra = ", ".join(f"{v:.2f}" for v in reg["translation_mm"])
        parts.append(f"<p><b>Registration:</b> {esc(reg['reason'])}; rigid, Mattes mutual information. Rotation "
                     f"{rot} deg, translation {tra} mm (saved as {esc(TRANSFORM_FILE)}).")
    else:
        parts.append(f"<p><b>Registration:</b> none; {esc(reg['reason'])}.")
    if reg.get("brain_mask_dice") is not None:
        parts.append(f" Brain-mask overlap on the current grid (Dice): {reg['brain_mask_dice']:.3f}.")
    parts.append("</p>")

    parts.append("<h2>Change per ROI</h2>")
    parts.extend(_roi_box(r) for r in d["rois"])
    um = d["unmatched_rois"]
    if um["prior_only"] or um["current_only"]:
        parts.append("<h3>ROIs without a partner (not compared)</h3><ul>"
                     + "".join(f"<li>only in the current analysis: {esc(n)} (a new lesion, or a ROI named "
                               "differently)</li>" for n in um["current_only"])
                     + "".join(f"<li>only in the prior analysis: {esc(n)} (gone, not outlined again, or named "
                               "differently)</li>" for n in um["prior_only"])
                     + "</ul><p class=\"small\">ROIs are matched by name: name the lesion masks the same in both "
                       "analyses.</p>")
    t = d["thresholds"]
    parts.append(
        "<p class=\"small\">Thresholds (relative change = current / prior - 1): volume grows from "
        f"{100 * t['volume_growth_relative']:+.0f} %, shrinks from {100 * t['volume_shrink_relative']:+.0f} %; median "
        f"rCBV rises from {100 * t['rcbv_rise_relative']:+.0f} % (doubling), falls from "
        f"{100 * t['rcbv_fall_relative']:+.0f} % (halving). Sources: {esc(t['source'])}.</p>")

    parts.append("<h2>Figures</h2>")
    slices = figure_slices(comp.current_masks, comp.background.shape[2])
    parts.append("<h3>rCBV, prior (left, on the current grid) and current (right), over the current baseline</h3>")
    parts.append(img_tag(fig_side_by_side(comp.prior_rcbv, comp.current_rcbv, comp.background, comp.current_masks,
                                           comp.prior_masks, slices, affine=comp.affine), "rCBV prior and current"))
    parts.append('<p class="small">rCBV scale 0-5 (ratio to the reference median); solid lines: current ROIs; dashed: '
                 f"prior ROIs (registered). {ORIENTATION_NOTE} Both columns are drawn on the current grid.</p>")
    parts.append("<h3>Median rCBV per ROI</h3>")
    parts.append(img_tag(fig_rcbv_change(d["rois"], *comp.thresholds), "median rCBV prior and current"))
    if d["warnings"]:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in d["warnings"]) + "</ul>")
    parts.append(f'<div class="disclaimer">{esc(DISCLAIMER)}</div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>DSC perfusion follow-up comparison</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_comparison(comp: Comparison, folder: Path) -> dict[str, Path]:
    """Write compare.json, compare.html (build_html) and (when registered) prior_to_current.tfm
    into ``folder``, a staging folder of io.staged_output. Returns the paths by role."""
    folder = Path(folder)
    paths = {"json": folder / "compare.json", "html": folder / "compare.html"}
    if comp.transform is not None:
        paths["transform"] = write_transform(folder / TRANSFORM_FILE, comp.transform)
    page = build_html(comp)
    write_json(paths["json"], comp.data)
    atomic_write(paths["html"], page, fix=None)
    return paths
