"""The quality checks of one analysis, read from report.json's content: one source of truth for the
quality panel of report.html, report.json's "warnings" (build.build_report adds the checks' warnings to
the analysis's own) and the terminal (which prints report.json "warnings").

Two tables: the acquisition against the Boxerman 2020 consensus protocol (``check_acquisition``) and
the analysis itself (``analysis_rows``: AIF, fits, registration, head motion, leakage). Every row whose
status is "warning" is a warning (``quality_warnings``), unless the analysis already said the same
thing in its own words (``COVERED_BY``). No numerics beyond comparisons; no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from perfusion.quantify.aif import NOT_QUANTITATIVE, QUALITY_OK, RELATIVE_VALID

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

#: A quality row whose warning the analysis already gave in its own words (report.json "warnings"
#: holding one of these texts) adds no second warning: the analysis's says more (which frames, why).
COVERED_BY = {
    "Baseline frames": ("the baseline has only",),
    "AIF quality score (0-1)": ("AIF quality score",),
    "AIF absolute quantification": (NOT_QUANTITATIVE,),
    "Head motion": ("head motion",),
}

QualityRow = tuple[str, str, str, str, str]  # item, value, expected, status ("ok"/"warning"), note


def num(v) -> float | None:
    """``v`` as a finite float, or None (missing, not a number, NaN or infinite: shown as n/a)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def fmt(x: Any, spec: str = ".2f") -> str:
    """``x`` formatted with ``spec``, or "n/a" when it is not a finite number."""
    v = num(x)
    return "n/a" if v is None else format(v, spec)


def pct(x: Any, *, signed: bool = False) -> str:
    """A fraction as a whole percentage ("n/a" when not a finite number)."""
    v = num(x)
    return "n/a" if v is None else (f"{100 * v:+.0f} %" if signed else f"{100 * v:.0f} %")


# ---------------------------------------------------------------------------------- acquisition


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
        f"tens of frames (at least {MIN_BASELINE_FRAMES})", arrival is not None and arrival >= MIN_BASELINE_FRAMES,
        "" if arrival is None or arrival >= MIN_BASELINE_FRAMES else
        "a short baseline makes S0 and every map noisier; acquire more pre-bolus frames")
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


# ------------------------------------------------------------------------------------- analysis


def analysis_rows(report: dict, *, unusable: float | None = None) -> list[QualityRow]:
    """The analysis's quality table: AIF, unusable fits, registration, head motion, leakage.
    ``unusable``: the fraction of brain voxels with unusable fits, counted from the maps by the caller,
    for a report.json of an older version without "fit" "unusable_fraction" (no row when neither)."""
    return [*_aif_rows(report), *_fit_rows(report, unusable), *_registration_rows(report), *_motion_rows(report),
            _leakage_row(report)]


def _aif_rows(rep: dict) -> list[QualityRow]:
    aif = rep.get("aif", {})
    score = num(aif.get("quality_score"))
    status = "warning" if score is None or score < AIF_SCORE_OK or aif.get("absolute_quantification") is False else "ok"
    rows: list[QualityRow] = [("AIF quality score (0-1)", fmt(score), f">= {AIF_SCORE_OK:g}", status,
                               f"{aif.get('n_voxels', '?')} voxels, {aif.get('source', '?')}")]
    if "absolute_quantification" in aif:
        ok_abs = bool(aif["absolute_quantification"])
        m = (aif.get("absolute_checks") or {}).get("measures", {})
        b = (aif.get("absolute_checks") or {}).get("bounds", {})
        rows.append(("AIF absolute quantification", "yes" if ok_abs else "no",
                     f"tail <= {fmt(b.get('tail_fraction'), 'g')}, area ratio >= {fmt(b.get('area_ratio'), 'g')}, "
                     f"FWHM <= {fmt(b.get('fwhm_s'), 'g')} s", "ok" if ok_abs else "warning",
                     f"tail {fmt(m.get('tail_fraction'))}, area / tissue {fmt(m.get('area_ratio'), '.1f')}, FWHM "
                     f"{fmt(m.get('fwhm_s'), '.1f')} s" + ("" if ok_abs else f"; {RELATIVE_VALID}")))
    return rows


def _fit_rows(rep: dict, unusable: float | None) -> list[QualityRow]:
    fit = rep.get("fit")
    if isinstance(fit, dict) and "unusable_fraction" in fit:  # counted by the pipeline
        frac = num(fit["unusable_fraction"])
        what = "NaN in CBV, CBF or MTT"
        if "fallback_osvd" in fit:
            what += (f", or the model fit at a bound ({fit.get('model_at_bound', 0)} voxels), its residual far above "
                     f"oSVD's ({fit.get('model_residual_high', 0)}) or failed ({fit.get('model_failed', 0)}): these "
                     "show oSVD's values")
    elif unusable is not None:  # reports of older versions: NaN only, counted from the maps
        frac, what = num(unusable), "NaN in CBV, CBF or MTT"
    else:
        return []
    shown = "n/a" if frac is None else f"{100 * frac:.1f} %"
    return [("Brain voxels with unusable fits", shown, "small",
             "ok" if frac is not None and frac < UNUSABLE_WARN else "warning",
             f"{what}; warning from {UNUSABLE_WARN:.0%}")]


def _registration_rows(rep: dict) -> list[QualityRow]:
    reg = rep.get("anat", {}).get("registration")
    if not reg:
        return []
    rot = max(abs(float(a)) for a in reg.get("rotation_deg", [0.0]))
    return [("Anatomical image registration", f"MI {fmt(reg.get('mattes_mi'), '.3f')}",
             "rigid, to the DSC baseline", "ok",
             f"largest rotation {rot:.1f} deg, translation {np.linalg.norm(reg.get('translation_mm', [0]*3)):.1f} mm; "
             f"transform {rep['anat'].get('transform_file', '')}; check the contours sit on the anatomy")]


def _motion_rows(rep: dict) -> list[QualityRow]:
    mot = rep.get("motion")
    if not isinstance(mot, dict):  # reports of older versions have none
        return []
    from perfusion.quantify.motion import FD_THRESHOLD_MM

    fd_thr = fmt(mot.get("fd_threshold_mm", FD_THRESHOLD_MM), "g")
    if not mot.get("assessed"):
        return [("Head motion", "not assessed", f"framewise displacement <= {fd_thr} mm", "warning",
                 str(mot.get("reason") or "--motion-correct off: no frame was registered"))]
    n_above = num(mot.get("n_frames_above_threshold")) or 0
    done = (f"{mot.get('n_frames_corrected', '?')} frame(s) realigned" if mot.get("applied")
            else "no frame realigned")
    return [("Head motion", f"max FD {fmt(mot.get('fd_max_mm'))} mm, mean {fmt(mot.get('fd_mean_mm'), '.3f')} mm",
             f"framewise displacement <= {fd_thr} mm", "warning" if n_above else "ok",
             f"{n_above:g} frame(s) above {fd_thr} mm ({mot.get('fd_threshold_source', '')}); {done} "
             f"(--motion-correct {mot.get('correction', '?')}); per frame in "
             f"{(rep.get('files') or {}).get('motion', 'motion.tsv')}")]


def _leakage_row(rep: dict) -> QualityRow:
    leak = rep.get("leakage", {})
    return ("Leakage correction", str(leak.get("method", "none")), "residue, bsw or bidirectional",
            "warning" if leak.get("method", "none") == "none" else "ok",
            f"fraction corrected {pct(leak.get('fraction_corrected'))}; "
            f"fit R^2 median {fmt(leak.get('fit_r2_median'))}")


# ------------------------------------------------------------------------------------- warnings


def quality_warnings(report: dict, *, unusable: float | None = None) -> list[str]:
    """One sentence per quality row whose status is "warning" (acquisition first, then the analysis),
    "<item>: <value>; expected <expected>; <note>", leaving out a row whose warning report.json
    "warnings" already gives (``COVERED_BY``)."""
    said = [str(w) for w in report.get("warnings", [])]
    rows = [(c["name"], c["value"], c["expected"], c["status"], c["note"]) for c in check_acquisition(report)]
    rows += analysis_rows(report, unusable=unusable)
    out = []
    for item, value, expected, status, note in rows:
        if status != "warning" or any(m in w for m in COVERED_BY.get(item, ()) for w in said):
            continue
        out.append(f"{item}: {value}; expected {expected}" + (f"; {note}" if note else ""))
    return out


def all_warnings(report: dict, *, unusable: float | None = None) -> list[str]:
    """report.json "warnings" followed by the quality checks' warnings it does not hold yet: the same
    list as report.json's for a report written by this version, the complete one for an older one."""
    said = [str(w) for w in report.get("warnings", [])]
    return said + [w for w in quality_warnings(report, unusable=unusable) if w not in said]
