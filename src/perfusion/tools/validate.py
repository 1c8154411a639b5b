"""``perfusion validate``: the accuracy suite users can re-run.

Three sources, each scored against its own ground truth, per deconvolution method:

- ``phantom``: our synthetic sweep (phantom.py; true AIF mask; blocks split into undispersed and
  dispersed), through the whole pipeline.
- ``osipi``: the OSIPI CodeCollection DSC curves (package data, Apache-2.0), curve level,
  kH = rho = 1 as that DRO has no haematocrit or density factor.
- ``bezier``: the Chakwizira Bezier DRO (GPL-3.0 data, read from a folder, never shipped): signal ->
  concentration with the published relaxivities (kappa_a for the AIF, kappa_s per residue shape),
  per voxel, medians per file and region; conditions: residue shape, delay, dispersion.

Errors are relative to the nominal truth (est / truth - 1). Known offsets of the DROs (their
left-Riemann convolution adds CBF TR / 120 to the area-ratio CBV) are part of the error, not removed.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from perfusion.config import METHODS, Config
from perfusion.io import Series, load_array
from perfusion.pipeline import Inputs, analyze, prepare_operator, quantify
from perfusion.quantify import signal
from perfusion.tools.phantom import PhantomSpec, make_phantom

QUANTITIES = ("cbv", "cbf", "mtt")


@dataclass(frozen=True)
class Row:
    """One estimate against its truth. ``group`` names the subset the summary pools."""

    dataset: str
    group: str
    method: str
    item: str
    truth: dict
    estimate: dict

    def errors(self) -> dict:
        return {q: (self.estimate[q] / self.truth[q] - 1) if self.truth.get(q) else float("nan") for q in QUANTITIES}


def _medians(values: dict) -> dict:
    return {q: float(np.nanmedian(values[q])) if np.any(np.isfinite(values[q])) else float("nan") for q in QUANTITIES}


# ------------------------------------------------------------------------------------------ phantom


def validate_phantom(methods=METHODS, *, spec: PhantomSpec = PhantomSpec()) -> list[Row]:
    ph = make_phantom(spec)
    series = Series(data=ph.signal.astype(np.float32), affine=ph.affine, path=Path("<phantom>"), te=spec.te,
                    tr=spec.tr, te_source="phantom", tr_source="phantom")
    inputs = Inputs(series=series, aif=ph.masks["aif"], reference=ph.masks["nawm"], brain=ph.masks["brain"])
    rows = []
    for method in methods:
        res = analyze(inputs, Config(method=method))
        for b in ph.blocks:
            sl = (slice(*b["x"]), slice(*b["y"]), b["slice"])
            group = "dispersed" if b["dispersion"] > 0 else "undispersed"
            est = _medians({q: res.maps[q][sl] for q in QUANTITIES})
            label = f"z{b['slice']} cbf {b['cbf']:g} mtt {b['mtt']:g} delay {b['delay']:g}"
            rows.append(Row("phantom", group, method, label,
                            {q: float(b[q]) for q in QUANTITIES}, est))
    return rows


# ------------------------------------------------------------------------------------------ leakage

#: --leakage choices compared on the leaky phantom.
LEAKAGE_COMPARED = ("none", "bsw", "bidirectional", "residue")


def validate_leakage(*, spec: PhantomSpec | None = None, methods=LEAKAGE_COMPARED) -> list[dict]:
    """Per leaky lesion of the leaky phantom: true rCBV and the median rCBV with each leakage
    correction (true AIF mask and NAWM reference, so only the correction differs), with verdicts."""
    from perfusion.quantify.roi import verdict_for

    spec = spec or PhantomSpec(leaky_lesions=True)
    ph = make_phantom(spec)
    series = Series(data=ph.signal.astype(np.float32), affine=ph.affine, path=Path("<leaky phantom>"), te=spec.te,
                    tr=spec.tr, te_source="phantom", tr_source="phantom")
    names = list(spec.leaky_lesion_params)
    inputs = Inputs(series=series, aif=ph.masks["aif"], reference=ph.masks["nawm"], brain=ph.masks["brain"],
                    rois={n: ph.masks[n] for n in names})
    results = {m: {r.name: r for r in analyze(inputs, Config(leakage=m)).rois} for m in methods}
    nawm = spec.nawm_cbf * spec.nawm_mtt
    rows = []
    for n in names:
        p = spec.leaky_lesion_params[n]
        truth = p["cbf"] * p["mtt"] / nawm
        row = {"lesion": n, "ktrans_per_min": p["ktrans"], "truth_rcbv": truth, "truth_verdict": verdict_for(truth)}
        for m in methods:
            r = results[m][n]
            # the band of the median (verdict_for): this table validates each correction's rCBV, not the gates
            row[m] = {"rcbv_median": r.rcbv_median, "verdict": verdict_for(r.rcbv_median),
                      "rel_error": r.rcbv_median / truth - 1}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- realistic

#: Protocols and seeds of the realistic table (phantom_realistic.PROTOCOLS; SNR 50 and 30, clinical).
REALISTIC_PROTOCOLS = ("flip60_no_preload", "flip60_preload", "flip30_no_preload")
REALISTIC_SEEDS = (0, 1)
REALISTIC_SNRS = (50.0, 30.0)


def realistic_inputs(ph, *, reference: str = "mask", echoes: str = "all") -> Inputs:
    """pipeline.Inputs of a realistic phantom as a user gives them: the series and the lesion ROIs, a
    brain mask, and (``reference="mask"``) the NAWM of the hemisphere without lesions as the reference
    (``"auto"``: none, the pipeline finds it); the AIF is always the automatic one. A multi-echo
    phantom gives its echoes combined (echoes.combine_echoes; ``echoes="all"``) or its longest echo
    alone (``"last"``)."""
    from perfusion.quantify.echoes import combine_echoes

    spec = ph.spec
    signals = getattr(ph, "echo_signals", ()) or (ph.signal,)
    each = [Series(data=sig, affine=ph.affine, path=Path(f"<realistic phantom echo {k}>"), te=te, tr=spec.tr,
                   te_source="phantom", tr_source="phantom")
            for k, (te, sig) in enumerate(zip(spec.tes, signals, strict=True), start=1)]
    if len(each) == 1:
        series = replace(each[0], path=Path("<realistic phantom>"))
    else:
        series = combine_echoes(each) if echoes == "all" else each[-1]
    contra = np.zeros(ph.signal.shape[:3], bool)
    contra[ph.signal.shape[0] // 2 + 1:] = True  # high x, the patient's right (RAS): the lesions lie on the left
    ref = ph.masks["nawm"] & contra if reference == "mask" else None
    return Inputs(series=series, brain=ph.masks["brain"], reference=ref, rois={n: ph.masks[n] for n in ph.lesions})


def validate_realistic(*, protocols=REALISTIC_PROTOCOLS, seeds=REALISTIC_SEEDS, snrs=REALISTIC_SNRS,
                       config: Config | None = None, reference: str = "mask", echo_times: tuple = (),
                       echoes: str = "all", matrix: int = 96) -> list[dict]:
    """Per protocol, SNR, seed and lesion of the realistic phantom (phantom_realistic.py): true median
    rCBV and the verdicts a correct analysis may give; the analysis's median rCBV, interval and
    verdict; the median rCBV under every leakage correction (rcbv_by_leakage); the CBV change the
    leakage correction made in grey and white matter (the maps). Whole pipeline, automatic AIF.
    ``echo_times`` (s): a multi-echo head, analysed combined (``echoes="all"``) or by its longest echo
    alone (``"last"``)."""
    from perfusion.tools.phantom_realistic import RealisticSpec, make_realistic_phantom

    config = config or Config(motion_correct="off")
    rows = []
    for protocol in protocols:
        for snr in snrs:
            for seed in seeds:
                ph = make_realistic_phantom(RealisticSpec(protocol=protocol, snr=float(snr), seed=int(seed),
                                                          echo_times=tuple(echo_times), matrix=matrix))
                res = analyze(realistic_inputs(ph, reference=reference, echoes=echoes), config)
                normal = {}
                if "cbv_uncorrected" in res.maps:
                    for tissue in ("gm", "nawm"):
                        m = ph.masks[tissue]
                        normal[tissue] = float(np.nanmedian(res.maps["cbv"][m])
                                               / np.nanmedian(res.maps["cbv_uncorrected"][m]) - 1)
                for r in res.rois:
                    t = ph.lesions[r.name]
                    rows.append({
                        "protocol": protocol, "snr": float(snr), "seed": int(seed), "lesion": r.name,
                        "truth_rcbv": t["rcbv_median"], "truth_ftb_high": t["ftb_high"],
                        "expected_verdicts": t["expected_verdicts"], "leakage_type": t["leakage"],
                        "rcbv_median": r.rcbv_median, "rel_error": r.rcbv_median / t["rcbv_median"] - 1,
                        "rcbv_ci": [r.rcbv_ci_low, r.rcbv_ci_high], "ftb_high": r.ftb_high, "mixed": r.mixed,
                        "verdict": r.verdict, "verdict_ok": r.verdict in t["expected_verdicts"],
                        "gates_failed": list(r.gates_failed), "fit_r2_curve": r.fit_r2_curve,
                        "k2_median_per_s": r.k2_median_per_s,
                        "rcbv_by_leakage": {k: v.get("rcbv_median") for k, v in r.rcbv_by_leakage.items()},
                        "normal_tissue_cbv_change": normal,
                    })
    return rows


# -------------------------------------------------------------------------------------------- OSIPI


def osipi_csv() -> Path:
    return Path(str(resources.files("perfusion") / "data" / "osipi_dsc_data.csv"))


def validate_osipi(methods=METHODS) -> list[Row]:
    rows = []
    with open(osipi_csv(), newline="") as fh:
        cases = list(csv.DictReader(fh))
    for method in methods:
        cfg = Config(method=method, kh=1.0, rho=1.0)
        for case in cases:
            c_tis = np.array(case["C_tis"].split(), float)
            c_aif = np.array(case["C_aif"].split(), float)
            tr = float(case["tr"])
            q = quantify(prepare_operator(c_aif, tr=tr, config=cfg), c_tis[None], c_aif, tr=tr, config=cfg)
            truth = {"cbv": float(case["cbv"]), "cbf": float(case["cbf"])}
            truth["mtt"] = 60 * truth["cbv"] / truth["cbf"]
            rows.append(Row("osipi", "all", method, case["label"], truth, {k: float(q[k][0]) for k in QUANTITIES}))
    return rows


# ------------------------------------------------------------------------------------------- Bezier


def _bezier_condition(name: str, meta: dict) -> str:
    if name.startswith("varying_residue_function"):
        return f"residue lambda {meta['lambda']}"
    if name.startswith("varying_cbf"):
        return "boxcar residue" if meta["lambda"] == 100 else "gamma residue (lambda 5)"
    delay, disp = meta["aif_delay_s"], meta["aif_dispersion_exp_kernel_mean_s"]
    if delay and disp:
        return f"delay {delay:g} s + dispersion {disp:g} s"
    if delay:
        return f"delay {delay:g} s"
    if disp:
        return f"dispersion {disp:g} s"
    return "no delay, no dispersion"


def _region_mask(label: str, nx: int, ny: int) -> np.ndarray:
    x = np.arange(nx)[:, None] * np.ones((1, ny))
    if label.startswith("GM"):
        return x < nx / 2
    if label.startswith("WM"):
        return x >= nx / 2
    return np.ones((nx, ny), bool)


def validate_bezier(folder: Path, methods=METHODS) -> list[Row]:
    folder = Path(folder)
    truth = json.loads((folder / "ground_truth.json").read_text())
    tr, te = float(truth["tr_s"]), float(truth["te_s"])
    kappa_a = float(truth["kappa_a"])
    baseline = slice(0, 16)  # frames 0-15, as the data's README says (bolus at 20 s)
    rows = []
    aifs = {}
    for name, meta in truth["files"].items():
        path = folder / name
        if not path.is_file():
            continue
        aif_path = path.parent / "aif.nii"
        if aif_path not in aifs:
            a = load_array(aif_path, what="AIF").reshape(-1, int(truth["n_timepoints"]))
            aifs[aif_path] = signal.to_delta_r2s(a, te=te, baseline=baseline)[0].mean(axis=0) / kappa_a
        c_aif = aifs[aif_path]
        data = load_array(path, what="DRO series")
        nx, ny = data.shape[:2]
        conc = (signal.to_delta_r2s(data.reshape(-1, data.shape[-1]), te=te, baseline=baseline)[0]
                / float(meta["kappa_s"]))
        group = _bezier_condition(name, meta)
        for method in methods:
            cfg = Config(method=method, kh=1.0, rho=1.0)
            q = quantify(prepare_operator(c_aif, tr=tr, config=cfg), conc, c_aif, tr=tr, config=cfg)
            for label, reg in meta["regions"].items():
                m = _region_mask(label, nx, ny).reshape(-1)
                est = _medians({k: q[k][m] for k in QUANTITIES})
                short = re.sub(r"^St_|\.nii$", "", Path(name).name)
                rows.append(Row("bezier", group, method, f"{short} {label.split()[0]}",
                                {k: float(reg[k]) for k in QUANTITIES}, est))
    return rows


# ------------------------------------------------------------------------------------------ summary


def summarize(rows: list[Row]) -> list[dict]:
    """Per (dataset, group, method): n and, for CBV/CBF/MTT, median and 90th percentile of |rel err| and
    the median signed error (bias)."""
    keys = []
    for r in rows:
        k = (r.dataset, r.group, r.method)
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        errs = [r.errors() for r in rows if (r.dataset, r.group, r.method) == k]
        entry = {"dataset": k[0], "group": k[1], "method": k[2], "n": len(errs)}
        for q in QUANTITIES:
            e = np.array([x[q] for x in errs], float)
            e = e[np.isfinite(e)]
            entry[q] = ({"median_abs": float(np.median(np.abs(e))), "p90_abs": float(np.percentile(np.abs(e), 90)),
                         "bias": float(np.median(e)), "n_valid": int(e.size)} if e.size else None)
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------- tolerances

#: The README's Accuracy table (median |estimate / truth - 1| of CBF and MTT, in %, per data set, subset and
#: method, measured by ``perfusion validate`` on the full data): (dataset, group) -> method -> (CBF, MTT);
#: None where the table gives no figure. The bezier residue rows give CBF only.
PUBLISHED_PERCENT: dict[tuple[str, str], dict[str, tuple[float | None, float | None]]] = {
    ("phantom", "undispersed"): {"model": (4.9, 6.4), "osvd": (33.6, 48.8), "csvd": (37.2, 58.1),
                                 "ssvd": (47.5, 84.7), "tikhonov": (47.1, 88.3)},
    ("phantom", "dispersed"): {"model": (35.4, 56.5), "osvd": (45.1, 81.3), "csvd": (46.1, 82.8),
                               "ssvd": (53.9, 113.5), "tikhonov": (56.0, 124.4)},
    ("osipi", "all"): {"model": (14.8, 4.6), "osvd": (11.5, 23.6), "csvd": (21.2, 34.5), "ssvd": (11.2, 23.0),
                       "tikhonov": (16.6, 35.9)},
    ("bezier", "no delay, no dispersion"): {"model": (11.7, 19.2), "osvd": (26.3, 29.3), "csvd": (21.4, 24.1),
                                            "ssvd": (20.7, 23.5), "tikhonov": (38.2, 50.9)},
    ("bezier", "delay 6 s"): {"model": (7.8, 13.8), "osvd": (23.6, 23.6), "csvd": (20.0, 23.1),
                              "ssvd": (24.6, 28.4), "tikhonov": (38.1, 54.5)},
    ("bezier", "dispersion 3 s"): {"model": (49.8, 87.0), "osvd": (45.9, 67.1), "csvd": (35.6, 40.4),
                                   "ssvd": (44.1, 60.8), "tikhonov": (54.7, 102.7)},
    ("bezier", "residue lambda 1"): {"model": (2.9, None), "osvd": (7.9, None), "csvd": (50.2, None),
                                     "ssvd": (1.4, None), "tikhonov": (26.5, None)},
    ("bezier", "residue lambda 5"): {"model": (0.5, None), "osvd": (13.7, None), "csvd": (83.1, None),
                                     "ssvd": (20.2, None), "tikhonov": (6.9, None)},
    ("bezier", "residue lambda 100"): {"model": (2.8, None), "osvd": (24.4, None), "csvd": (100.1, None),
                                       "ssvd": (31.7, None), "tikhonov": (3.5, None)},
    ("bezier", "gamma residue (lambda 5)"): {"model": (6.7, 5.8), "osvd": (15.4, 18.9), "csvd": (41.3, 30.6),
                                             "ssvd": (9.6, 13.5), "tikhonov": (27.2, 35.4)},
    ("bezier", "boxcar residue"): {"model": (16.7, 8.1), "osvd": (18.2, 19.6), "csvd": (56.7, 34.3),
                                   "ssvd": (15.8, 13.5), "tikhonov": (18.0, 21.3)},
}

#: A method misses its stated tolerance when its median |error| exceeds the published figure by more than
#: TOLERANCE_MARGIN_POINTS percentage points or TOLERANCE_MARGIN_FRACTION of the figure, whichever is
#: larger. Why this margin: every data set here is fixed (the phantom's noise is seeded, the DROs are
#: files), so a run on the same code reproduces the table up to floating-point summation order (threads,
#: BLAS), far below a point; what the gate is for is a code change that moves a median by several points.
#: 3 points is the smallest change the README's issue-16 note calls a worsening worth reporting (the gamma
#: rows' +1.7 [0.0, 3.6] points) rounded up past its bootstrap interval; a fifth of the figure keeps the
#: large errors (the SVD family's 40-100 %) from failing on a relative wobble no user would notice.
TOLERANCE_MARGIN_POINTS = 3.0
TOLERANCE_MARGIN_FRACTION = 0.2

#: Data sets whose figures ``--quick`` reproduces as published: the OSIPI curves and the Bezier DRO are the
#: same data; the quick phantom (48 x 48) is another phantom and is not judged.
QUICK_JUDGED = ("osipi", "bezier")


def tolerance_percent(published: float) -> float:
    """The largest median |error| (%) a published figure (%) tolerates: the figure plus its margin
    (TOLERANCE_MARGIN_POINTS or TOLERANCE_MARGIN_FRACTION of it, whichever is larger)."""
    return published + max(TOLERANCE_MARGIN_POINTS, TOLERANCE_MARGIN_FRACTION * published)


def check_tolerances(summary: list[dict], *, datasets=None, scale: float = 1.0) -> list[dict]:
    """Each summary entry (``summarize``) with a published figure, judged: dataset, group, method,
    quantity (cbf, mtt), the measured and published median |error| and the tolerance (%), and ``ok``.
    ``datasets``: only these (None: every one); ``scale`` multiplies every tolerance (1: as stated)."""
    checks = []
    for e in summary:
        if datasets is not None and e["dataset"] not in datasets:
            continue
        published = PUBLISHED_PERCENT.get((e["dataset"], e["group"]), {}).get(e["method"])
        for q, figure in zip(("cbf", "mtt"), published or (), strict=False):
            if figure is None:
                continue
            measured = None if e[q] is None else 100 * e[q]["median_abs"]
            limit = scale * tolerance_percent(figure)
            checks.append({"dataset": e["dataset"], "group": e["group"], "method": e["method"], "quantity": q,
                           "median_abs_percent": measured, "published_percent": figure,
                           "tolerance_percent": round(limit, 2),
                           "ok": measured is not None and bool(np.isfinite(measured)) and measured <= limit})
    return checks


def find_reference_data(explicit: Path | None = None) -> Path | None:
    """The peer data folder: ``explicit``, else shared/reference-data or ../shared/reference-data
    from the current folder."""
    if explicit is not None:
        return Path(explicit)
    for cand in (Path("shared/reference-data"), Path("../shared/reference-data")):
        if cand.is_dir():
            return cand
    return None
