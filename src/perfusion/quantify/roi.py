"""rCBV, per-ROI scores with their verdict rules and sources (the reference tissue: reference.py)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from perfusion.quantify.aif import QUALITY_OK
from perfusion.verdicts import VERDICTS  # noqa: F401 - the verdict codes and their words: verdicts.py

#: rCBV thresholds of the verdict and of the fractional tumour burden (FTB) classes: below LOW
#: treatment effect is likely, above HIGH recurrence is likely, in between indeterminate.
RCBV_LOW = 1.0
RCBV_HIGH = 1.75
THRESHOLD_SOURCE = (
    "rCBV thresholds 1.0 and 1.75 (normalised to normal-appearing white matter) as used for fractional "
    "tumour burden by Hu et al. 2012, Neuro-Oncology 14:919 (doi:10.1093/neuonc/nos112) and Iv et al. 2019, "
    "AJNR 40:1649; published cut-offs range from about 0.7 to 2.6 across protocols and software"
)


NEXT_STEP = {
    "likely_recurrence": ("High blood volume favours tumour recurrence: refer to neuro-oncology for review by the "
                          "multidisciplinary tumour board."),
    "possible_recurrence_or_pseudoprogression": (
        "High blood volume within 12 weeks of chemoradiation: recurrence or pseudoprogression. Confirm at short "
        "interval (follow-up MRI with perfusion in 4-8 weeks) before changing treatment; compare with all priors."),
    "likely_treatment_effect": (
        "Low blood volume favours treatment effect (pseudoprogression or radiation necrosis): continue therapy; "
        "short-interval follow-up MRI in 6-8 weeks."),
    "indeterminate": (
        "Equivocal blood volume: consider MR spectroscopy, amino-acid PET (FET/FDOPA) or FDG-PET, biopsy if the "
        "stakes are high; compare with prior scans."),
    "not_assessable": "The rCBV of this lesion cannot be read: see the reason's own next step.",
}

# --- the verdict rule: figures of the rCBV distribution inside the lesion, with a confidence interval

#: A lesion is "mixed" when at least this fraction of its valid voxels has rCBV > high (FTB-high).
#: Hu et al. 2012 (Neuro-Oncology 14:919) and Iv et al. 2019 (AJNR 40:1649) introduced the voxel-wise
#: fractions because recurrence and treatment effect coexist in one lesion (FTB-high tracked the
#: histologic tumour fraction and separated tumour from treatment effect, AUC 0.85 in Iv 2019), but no
#: single FTB-high decision fraction is established across studies and software (Herings et al. 2026,
#: Eur Radiol Exp, derive their own cut-off by Youden's J). 0.20 is our convention, chosen low on
#: purpose: a fifth of the lesion with high blood volume is enough to refuse "treatment effect"
#: (missing a recurrence costs more than one more work-up). Keyword option ``mixed_fraction``.
MIXED_FTB_HIGH = 0.20
MIXED_SOURCE = ("FTB-high >= 0.20 counts as mixed: a convention (no single published FTB-high cut-off; fractions "
                "after Hu et al. 2012, Neuro-Oncology 14:919 and Iv et al. 2019, AJNR 40:1649), set low on purpose")

#: The hotspot figure: this percentile of the lesion's valid rCBV values. Treatment effect needs it at
#: or below the high threshold (no more than a tenth of the voxels above it).
HOTSPOT_PERCENTILE = 90.0

#: Bootstrap of the median rCBV and the FTB fractions: resamples, seed (fixed: outputs are bit-identical
#: run to run) and the interval's percentiles (a 95 % percentile interval).
N_BOOTSTRAP = 400
BOOTSTRAP_SEED = 20240915
CI_PERCENTILES = (2.5, 97.5)

#: Leakage corrections whose bootstrap distributions are pooled into the interval, besides the one the
#: analysis used ("plausible" corrections of an enhancing lesion), and whose disagreement can make a
#: lesion not assessable: the bidirectional model (Leu 2016) and BSW as published (Boxerman 2006), both
#: without a gate inside the lesion. Measured on the realistic phantom (phantom_realistic.py: three
#: protocols, SNR 30 and 50, seeds 0-3, automatic AIF; validate.validate_realistic): their median rCBV
#: lay within 25 % (bidirectional) and 35 % (BSW) of the truth on every lesion. Left out: the
#: residue-domain method (Bjornerud 2011), which deconvolves by the AIF and so depends on it (with the
#: partial-volume AIF the automatic selection often returns on that phantom it read a T2*-dominant lesion
#: 32 % high and a T1-dominant one 47 % low, and moved normal tissue by up to 11 %); the gated
#: corrections, which leave weak leaks uncorrected by design; and no correction.
#: Config.leakage_plausible changes it.
PLAUSIBLE_LEAKAGE = ("bidirectional", "bsw")
#: Keys of the leakage sensitivity (rcbv_by_leakage) in report order.
SENSITIVITY_METHODS = ("none", "bsw", "bsw_gated", "residue", "bidirectional")

# --- gates: a lesion that fails one is ``not_assessable``

#: Fewest valid voxels for a verdict: a median over a handful of voxels is noise.
MIN_ROI_VOXELS = 10
#: More than this fraction of the ROI's voxels without a valid CBV: most of the lesion is unfittable.
MAX_UNFITTABLE_FRACTION = 0.5
#: More than this fraction of the ROI's voxels outside the brain mask, or on the arterial / venous
#: voxels (AIF and VOF masks: large vessels), and the lesion's CBV is not the lesion's.
MAX_OUTSIDE_BRAIN_FRACTION = 0.5
MAX_VESSEL_FRACTION = 0.5
#: AIF quality score (aif.aif_quality_score, 0-1) below which the AIF is unusable (a clearly low bar:
#: a component at 0 zeroes the score, e.g. an AIF peaking with the tissue or at the noise level), and
#: below which the report notes a poor AIF (confidence only).
AIF_UNUSABLE = 0.2
AIF_POOR = QUALITY_OK  # aif.QUALITY_OK, the report's "ok" bar; a curve failing aif.check_absolute is capped below it
#: R^2 of the leakage model fitted to the ROI's mean delta R2* curve below this: the model does not
#: describe the lesion's curves (less than half their variance explained), so its correction is not
#: trusted. The mean curve, not the median of the voxels' R^2: a voxel's R^2 mostly measures its noise
#: (voxel median R^2 0.04-0.60 at SNR 30 on the first, model-built leaky phantom). Measured on the
#: realistic phantom (bidirectional, three protocols, SNR 30, seeds 0-2): mean-curve R^2 0.97-0.999 on
#: every lesion, so the bar refuses only curves the model plainly does not fit.
MIN_FIT_R2 = 0.5
#: Largest plausible |median K2| per correction (1/s; the scales differ: BSW's and the bidirectional
#: model's K2 are relative to the reference curve, the residue method's Ka to the AIF). Measured on the
#: realistic phantom (Ktrans up to 0.12 /min, flip 60 degrees without preload, SNR 30, seeds 0-2): median
#: |K2| at most 0.068 1/s (bidirectional); Ktrans in enhancing glioblastoma reaches 0.15-0.3 /min (DCE,
#: e.g. Skinner 2016), so 0.3 1/s leaves a factor of about four. The residue method's bound is from the
#: first leaky phantom (Ka 5.1e-4 at Ktrans 0.24 /min there), ten times its strongest lesion. Beyond it the
#: fitted "leakage" is something else (a vessel, misregistration, a bolus-timing mismatch, noise).
K2_MAX_PER_S = {"bsw": 0.3, "bsw_gated": 0.3, "bidirectional": 0.3, "bidirectional_gated": 0.3, "residue": 0.005,
                "residue_gated": 0.005}

#: Gate code -> next step when that gate fails.
GATE_NEXT_STEP = {
    "negative_rcbv": ("Repeat perfusion (check the bolus, the AIF and the leakage; a preload dose reduces leakage, "
                      "Boxerman 2020) or use other imaging: MR spectroscopy, amino-acid PET (FET/FDOPA) or FDG-PET."),
    "poor_leakage_fit": ("Repeat perfusion with a preload dose or a lower flip angle to reduce leakage (Boxerman 2020 "
                         "consensus), or use other imaging: MR spectroscopy, amino-acid PET (FET/FDOPA) or FDG-PET."),
    "k2_out_of_range": ("Check the lesion's curves (a vessel, motion, a bolus-timing mismatch); repeat perfusion "
                        "with a preload dose, or use amino-acid PET (FET/FDOPA), MR spectroscopy or FDG-PET."),
    "leakage_disagreement": ("Repeat perfusion with a preload dose or a lower flip angle (Boxerman 2020), or use "
                             "other imaging: amino-acid PET (FET/FDOPA), MR spectroscopy or FDG-PET; biopsy if the "
                             "stakes are high."),
    "unfittable": ("Repeat perfusion (check the signal in the lesion: susceptibility artefact from blood, metal or "
                   "air, a dropout) or use amino-acid PET (FET/FDOPA), MR spectroscopy or FDG-PET."),
    "too_few_voxels": ("Too small for perfusion: follow-up MRI, or amino-acid PET (FET/FDOPA) / MR spectroscopy if a "
                       "decision is needed now."),
    "outside_brain": "Check that the ROI belongs to this series (grid, patient) and redraw it on the lesion.",
    "on_vessel": ("Redraw the ROI off the large vessel; if the lesion itself lies on the vessel use amino-acid PET "
                  "(FET/FDOPA), MR spectroscopy or FDG-PET."),
    "implausible_reference": ("Redraw --reference in normal-appearing white matter (e.g. the contralateral centrum "
                              "semiovale), away from the lesion, vessels and CSF, or leave it out for the automatic "
                              "reference."),
    "unusable_aif": ("Repeat perfusion (injection rate, bolus timing) or give arterial voxels with --aif; meanwhile "
                     "use other imaging: MR spectroscopy, amino-acid PET (FET/FDOPA) or FDG-PET."),
}

#: Weeks after chemoradiation during which pseudoprogression is most common: RANO 2.0 (Wen et al. 2023,
#: J Clin Oncol 41:5187) does not call progression on imaging alone within 12 weeks (Brandsma 2008,
#: Lancet Oncol 9:453, for the incidence).
PSEUDOPROGRESSION_WEEKS = 12
PSEUDOPROGRESSION_SOURCE = "RANO 2.0, Wen et al. 2023, J Clin Oncol 41:5187"

#: The leakage correction changing the ROI's median CBV by more than this fraction is reported as strong
#: leakage (information only: the size of a correction is no reason to refuse; a good correction
#: legitimately moves a lesion from a negative to its true rCBV). On the leaky phantom the correction
#: changes CBV by 45-70 %.
STRONG_LEAKAGE_CHANGE = 0.3


@dataclass(frozen=True)
class RcbvInterval:
    """Bootstrap intervals of one lesion's figures (CI_PERCENTILES of the pooled resamples).

    Each figure's interval is (low, high). ``median``: the median rCBV; ``p90``: the hotspot
    percentile; ``ftb_low`` / ``ftb_mid`` / ``ftb_high``: the FTB fractions. ``by_method``: the median
    rCBV's interval under each correction on its own (for the disagreement gate). ``methods``: the
    corrections pooled; ``n_resamples``: resamples per correction."""

    median: tuple[float, float]
    p90: tuple[float, float]
    ftb_low: tuple[float, float]
    ftb_mid: tuple[float, float]
    ftb_high: tuple[float, float]
    by_method: dict[str, tuple[float, float]]
    methods: tuple[str, ...]
    n_resamples: int


def resample_reference(ref_cbv: np.ndarray, *, n_resamples: int = N_BOOTSTRAP,
                       seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Medians (n_resamples,) of bootstrap resamples of the reference voxels' CBV (any unit; NaN left
    out). Deterministic for a seed. Shared by every lesion: the reference is one."""
    v = np.asarray(ref_cbv, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.full(n_resamples, np.nan)
    rng = np.random.default_rng([seed, 1])
    out = np.empty(n_resamples)
    block = max(1, 2_000_000 // v.size)  # bound the (block, n_ref) temporary to about 16 MB
    for lo in range(0, n_resamples, block):
        n = min(block, n_resamples - lo)
        out[lo: lo + n] = np.median(v[rng.integers(0, v.size, size=(n, v.size))], axis=1)
    return out


def reference_spread(cbv: np.ndarray, mask: np.ndarray, voxel_mm) -> float:
    """Regional spread of a reference tissue: its voxels split in two halves at their median position
    along the axis of its longest extent (mm), |m1 - m2| / (m1 + m2) of the two halves' median CBV
    (0 for a uniform tissue; NaN with fewer than 2 voxels a half). ``cbv`` and ``mask`` (x y z);
    ``voxel_mm`` the three voxel sizes."""
    pos = np.argwhere(mask)
    values = np.asarray(cbv, dtype=np.float64)[mask]
    ok = np.isfinite(values)
    pos, values = pos[ok], values[ok]
    if values.size < 4:
        return float("nan")
    mm = pos * np.asarray(voxel_mm, dtype=np.float64)[None, :]
    axis = int(np.argmax(mm.max(axis=0) - mm.min(axis=0)))
    cut = np.median(mm[:, axis])
    lo, hi = values[mm[:, axis] <= cut], values[mm[:, axis] > cut]
    if lo.size < 2 or hi.size < 2:
        return float("nan")
    m1, m2 = float(np.median(lo)), float(np.median(hi))
    return abs(m1 - m2) / (m1 + m2) if m1 + m2 > 0 else float("nan")


def widen_reference(ref_medians: np.ndarray, spread: float, *, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Bootstrap medians of an automatically chosen reference times factors drawn uniformly from
    [1 - spread, 1 + spread] (fixed seed): the reference could as well have been taken where white matter
    reads ``spread`` higher or lower (``reference_spread``), and the interval says so."""
    if not np.isfinite(spread) or spread <= 0:
        return ref_medians
    rng = np.random.default_rng([seed, 2])
    return ref_medians * rng.uniform(1.0 - spread, 1.0 + spread, size=ref_medians.shape)


def _resample_roi(roi_cbv: np.ndarray, ref_medians: np.ndarray, *, low: float, high: float, seed: int,
                  hotspot: float) -> np.ndarray:
    """(n_resamples, 5): median, hotspot percentile, FTB low, mid, high of rCBV for bootstrap resamples of
    the ROI's voxels (NaN = unfittable, kept in the resample and left out of each figure), each divided
    by one resample's reference median."""
    v = np.asarray(roi_cbv, dtype=np.float64).ravel()
    n_res = ref_medians.size
    out = np.full((n_res, 5), np.nan)
    if v.size == 0 or not np.isfinite(v).any():
        return out
    rng = np.random.default_rng([seed, 2])
    block = max(1, 2_000_000 // v.size)
    for lo in range(0, n_res, block):
        n = min(block, n_res - lo)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = v[rng.integers(0, v.size, size=(n, v.size))] / ref_medians[lo: lo + n, None]
        finite = np.isfinite(r)
        count = finite.sum(axis=1)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN resample: NaN figures
            out[lo: lo + n, 0] = np.nanmedian(r, axis=1)
            out[lo: lo + n, 1] = np.nanpercentile(r, hotspot, axis=1)
            out[lo: lo + n, 2] = (finite & (r < low)).sum(axis=1) / count
            out[lo: lo + n, 3] = (finite & (r >= low) & (r <= high)).sum(axis=1) / count
            out[lo: lo + n, 4] = (finite & (r > high)).sum(axis=1) / count
    return out


def rcbv_interval(roi_cbv: dict[str, np.ndarray], ref_medians: dict[str, np.ndarray], *, low: float = RCBV_LOW,
                  high: float = RCBV_HIGH, seed: int = BOOTSTRAP_SEED,
                  hotspot: float = HOTSPOT_PERCENTILE) -> RcbvInterval:
    """Bootstrap interval of a lesion's figures under every leakage correction in ``roi_cbv``.

    ``roi_cbv``: correction -> the ROI voxels' CBV under it (any unit, NaN unfittable); ``ref_medians``:
    correction -> resample_reference of the reference voxels' CBV under the same correction. Each
    resample draws the ROI's voxels and (through ``ref_medians``) the reference's with replacement, so
    the interval holds voxel noise, the reference's spread and, pooled over the corrections, the
    leakage correction's uncertainty. CI_PERCENTILES of the pooled resamples; deterministic."""
    methods = tuple(m for m in roi_cbv if m in ref_medians)
    if not methods:
        raise ValueError("rcbv_interval needs at least one correction present in both roi_cbv and ref_medians")
    per = {m: _resample_roi(roi_cbv[m], np.asarray(ref_medians[m], dtype=np.float64), low=low, high=high,
                            seed=seed, hotspot=hotspot) for m in methods}
    pooled = np.concatenate([per[m] for m in methods], axis=0)

    def ci(a: np.ndarray) -> tuple[float, float]:
        a = a[np.isfinite(a)]
        if a.size == 0:
            return (float("nan"), float("nan"))
        lo, hi = np.percentile(a, CI_PERCENTILES)
        return (float(lo), float(hi))

    return RcbvInterval(median=ci(pooled[:, 0]), p90=ci(pooled[:, 1]), ftb_low=ci(pooled[:, 2]),
                        ftb_mid=ci(pooled[:, 3]), ftb_high=ci(pooled[:, 4]),
                        by_method={m: ci(per[m][:, 0]) for m in methods}, methods=methods,
                        n_resamples=int(pooled.shape[0] // len(methods)))


@dataclass(frozen=True)
class RoiScore:
    """One lesion's figures, verdict and reasons. rCBV values are ratios, FTB values fractions of the
    valid voxels, intervals (low, high) at CI_PERCENTILES; NaN where not computable."""

    name: str
    n_voxels: int
    n_valid: int
    volume_ml: float
    rcbv_mean: float
    rcbv_median: float
    rcbv_p90: float
    ftb_low: float  # fraction of valid voxels with rCBV < low
    ftb_mid: float
    ftb_high: float  # fraction with rCBV > high
    verdict: str
    reasons: tuple[str, ...]
    next_step: str
    psr_percent: float = float("nan")  # percentage of signal recovery of the ROI's mean signal
    relative_peak_height: float = float("nan")  # median peak delta R2* / the reference's median
    k2_median_per_s: float = float("nan")  # leakage K2 (1/s), NaN without leakage correction
    leakage_cbv_change: float = float("nan")  # (corrected - uncorrected) / corrected median CBV
    rule: str = ""
    rcbv_ci_low: float = float("nan")  # interval of the median rCBV (ratio)
    rcbv_ci_high: float = float("nan")
    rcbv_p90_ci: tuple[float, float] = (float("nan"), float("nan"))
    ftb_low_ci: tuple[float, float] = (float("nan"), float("nan"))
    ftb_mid_ci: tuple[float, float] = (float("nan"), float("nan"))
    ftb_high_ci: tuple[float, float] = (float("nan"), float("nan"))
    ci_methods: tuple[str, ...] = ()  # leakage corrections pooled into the intervals
    mixed: bool = False  # FTB-high and the rest (FTB-low + FTB-mid) both >= the mixed fraction
    gates_failed: tuple[str, ...] = ()  # GATE_NEXT_STEP codes; non-empty iff not_assessable
    fit_r2_median: float = float("nan")  # median R^2 of the leakage fit over the ROI's voxels (information)
    fit_r2_curve: float = float("nan")  # R^2 of the leakage fit to the ROI's mean curve (the gate's figure)
    rcbv_by_leakage: dict = field(default_factory=dict)  # correction -> {rcbv_median, verdict}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        for k in ("rcbv_p90_ci", "ftb_low_ci", "ftb_mid_ci", "ftb_high_ci", "ci_methods", "gates_failed"):
            d[k] = list(d[k])
        return d


def verdict_for(median_rcbv: float, *, low: float = RCBV_LOW, high: float = RCBV_HIGH) -> str:
    """The verdict band of one rCBV value: > high likely_recurrence, < low likely_treatment_effect,
    else (and for a non-finite value) indeterminate. The lesion's verdict is ``decide``'s."""
    if not np.isfinite(median_rcbv):
        return "indeterminate"
    if median_rcbv > high:
        return "likely_recurrence"
    if median_rcbv < low:
        return "likely_treatment_effect"
    return "indeterminate"


@dataclass(frozen=True)
class Context:
    """What the verdict needs beyond the lesion's rCBV values. Fractions of the ROI's voxels; K2 in 1/s;
    ``leakage``: the sensitivity key of the correction the analysis used (SENSITIVITY_METHODS)."""

    leakage: str = "none"
    fit_r2_median: float = float("nan")  # voxels' median (information)
    fit_r2_curve: float = float("nan")  # the ROI's mean curve (gate)
    k2_median_per_s: float = float("nan")
    aif_quality: float | None = None
    outside_brain: int = 0  # ROI voxels outside the brain mask
    on_vessel: int = 0  # ROI voxels on arterial / venous voxels
    weeks_since_radiation: float | None = None
    bevacizumab: bool = False
    steroids: bool = False
    leakage_cbv_change: float = float("nan")
    reference_note: str = ""  # how the reference was chosen when automatic (a reason of every lesion)
    reference_problem: str = ""  # why the reference is not plausible white matter (reference.check_reference)


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _gates(valid: np.ndarray, n_voxels: int, med: float, ctx: Context, interval: RcbvInterval | None,
           by_leakage: dict, *, low: float, high: float) -> list[tuple[str, str]]:
    """(code, reason) of every gate the lesion fails."""
    out = []
    n_valid = valid.size
    if n_voxels and (n_voxels - n_valid) / n_voxels > MAX_UNFITTABLE_FRACTION:
        out.append(("unfittable", f"{n_voxels - n_valid} of {n_voxels} voxels ({(n_voxels - n_valid) / n_voxels:.0%}) "
                                  f"have no valid CBV: most of the lesion is unfittable "
                                  f"(more than {MAX_UNFITTABLE_FRACTION:.0%})"))
    if n_valid < MIN_ROI_VOXELS:
        out.append(("too_few_voxels",
                    f"only {n_valid} valid voxels (fewer than {MIN_ROI_VOXELS}): the median is noise"))
    if n_voxels and ctx.outside_brain / n_voxels > MAX_OUTSIDE_BRAIN_FRACTION:
        out.append(("outside_brain", f"{ctx.outside_brain} of {n_voxels} voxels ({ctx.outside_brain / n_voxels:.0%}) "
                                     "lie outside the brain mask: the ROI is mostly outside the brain"))
    if n_voxels and ctx.on_vessel / n_voxels > MAX_VESSEL_FRACTION:
        out.append(("on_vessel", f"{ctx.on_vessel} of {n_voxels} voxels ({ctx.on_vessel / n_voxels:.0%}) lie on "
                                 "arterial or venous voxels (AIF / VOF): the lesion is mostly on a large vessel"))
    if ctx.reference_problem:
        out.append(("implausible_reference", f"the reference tissue is not plausible white matter: "
                                             f"{ctx.reference_problem}; every rCBV is divided by it"))
    if ctx.aif_quality is not None and np.isfinite(ctx.aif_quality) and ctx.aif_quality < AIF_UNUSABLE:
        out.append(("unusable_aif", f"unusable arterial input function (quality {ctx.aif_quality:.2f}, below "
                                    f"{AIF_UNUSABLE:g}): CBV is not measurable"))
    if n_valid and not (np.isfinite(med) and med >= 0):
        out.append(("negative_rcbv", f"the leakage-corrected median rCBV is {med:.2f}: a negative blood volume is not "
                                     "physical (failed bolus, AIF or leakage correction)"))
    if ctx.leakage != "none":
        if np.isfinite(ctx.fit_r2_curve) and ctx.fit_r2_curve < MIN_FIT_R2:
            out.append(("poor_leakage_fit", f"the leakage model does not describe the lesion's curves (fit R^2 "
                                            f"{ctx.fit_r2_curve:.2f} on the ROI's mean curve, below {MIN_FIT_R2:g})"))
        k2_max = K2_MAX_PER_S.get(ctx.leakage)
        if k2_max is not None and np.isfinite(ctx.k2_median_per_s) and abs(ctx.k2_median_per_s) > k2_max:
            out.append(("k2_out_of_range", f"median K2 {ctx.k2_median_per_s:.3g} 1/s is outside the physiological "
                                           f"range (|K2| <= {k2_max:g} 1/s for {ctx.leakage})"))
    if interval is not None:
        bands = {m: verdict_for(by_leakage[m]["rcbv_median"], low=low, high=high)
                 for m in interval.by_method if m in by_leakage and np.isfinite(by_leakage[m]["rcbv_median"])}
        pairs = [(a, b) for i, a in enumerate(bands) for b in list(bands)[i + 1:]
                 if bands[a] != bands[b] and (interval.by_method[a][1] < interval.by_method[b][0]
                                              or interval.by_method[b][1] < interval.by_method[a][0])]
        if pairs:
            a, b = pairs[0]
            out.append(("leakage_disagreement",
                        f"leakage corrections disagree beyond their intervals: {a} rCBV "
                        f"{by_leakage[a]['rcbv_median']:.2f} {_fmt_ci(interval.by_method[a])} vs {b} "
                        f"{by_leakage[b]['rcbv_median']:.2f} {_fmt_ci(interval.by_method[b])} fall in different "
                        "verdict bands"))
    return out


def decide(name: str, rcbv_in_roi: np.ndarray, *, voxel_volume_ml: float, n_voxels: int,
           interval: RcbvInterval | None = None, by_leakage: dict | None = None, context: Context = Context(),
           low: float = RCBV_LOW, high: float = RCBV_HIGH, mixed_fraction: float = MIXED_FTB_HIGH) -> RoiScore:
    """Score one lesion from its rCBV values (ratio; NaN for voxels that could not be fitted).

    The rule (verdict_rule): a failed gate (GATE_NEXT_STEP) -> ``not_assessable``. Otherwise
    ``likely_recurrence`` when the median rCBV and its interval's lower bound are above ``high``;
    ``likely_treatment_effect`` when the median and its interval's upper bound are below ``low``, the
    FTB-high (and its interval's upper bound) below ``mixed_fraction`` and the 90th percentile not
    above ``high``; else ``indeterminate`` ("mixed" when FTB-high >= ``mixed_fraction``). Within the
    pseudoprogression window a recurrence becomes ``possible_recurrence_or_pseudoprogression``; under
    bevacizumab or steroids a treatment effect becomes ``indeterminate``. ``interval``: rcbv_interval's
    result (without it the interval is unknown and no verdict is ``likely_*``); ``by_leakage``:
    correction -> {"rcbv_median": ...} (the sensitivity)."""
    r = np.asarray(rcbv_in_roi, dtype=np.float64).ravel()
    valid = r[np.isfinite(r)]
    by_leakage = dict(by_leakage or {})
    nan = float("nan")
    reasons: list[str] = []
    rule = verdict_rule(low, high, mixed_fraction=mixed_fraction)
    med = float(np.median(valid)) if valid.size else nan
    p90 = float(np.percentile(valid, HOTSPOT_PERCENTILE)) if valid.size else nan
    ftb = _ftb(valid, low, high)
    # mixed: a substantial high-rCBV component and a substantial rest (a lesion all above high is not mixed)
    mixed = bool(valid.size and ftb[2] >= mixed_fraction and 1.0 - ftb[2] >= mixed_fraction)
    ci, ftb_high_ci = (interval.median, interval.ftb_high) if interval is not None else ((nan, nan), (nan, nan))

    gates = _gates(valid, n_voxels, med, context, interval, by_leakage, low=low, high=high)
    if valid.size == 0 and not any(code == "unfittable" for code, _ in gates):
        gates.insert(0, ("unfittable", f"no voxel of the ROI has a valid CBV (0 of {n_voxels})"))
    if gates:
        verdict = "not_assessable"
        reasons.extend(f"not assessable: {why}" for _, why in gates)
        steps = list(dict.fromkeys(GATE_NEXT_STEP[code] for code, _ in gates))
        next_step = " ".join(steps)
        if valid.size:
            reasons.append(f"for information only: median rCBV {med:.2f} {_fmt_ci(ci)}, FTB-high {ftb[2]:.0%}")
    else:
        verdict = _band(med, ci, p90, ftb[2], ftb_high_ci, mixed, reasons, low=low, high=high,
                        mixed_fraction=mixed_fraction)
        verdict = _in_context(verdict, context, reasons)
        next_step = NEXT_STEP[verdict]
    _notes(verdict, context, by_leakage, n_voxels, int(valid.size), reasons, low=low, high=high)

    return RoiScore(
        name=name, n_voxels=n_voxels, n_valid=int(valid.size), volume_ml=n_voxels * voxel_volume_ml,
        rcbv_mean=float(np.mean(valid)) if valid.size else nan, rcbv_median=med, rcbv_p90=p90,
        ftb_low=ftb[0], ftb_mid=ftb[1], ftb_high=ftb[2], verdict=verdict, reasons=tuple(reasons),
        next_step=next_step, k2_median_per_s=context.k2_median_per_s, leakage_cbv_change=context.leakage_cbv_change,
        rule=rule, rcbv_ci_low=ci[0], rcbv_ci_high=ci[1],
        rcbv_p90_ci=interval.p90 if interval is not None else (nan, nan),
        ftb_low_ci=interval.ftb_low if interval is not None else (nan, nan),
        ftb_mid_ci=interval.ftb_mid if interval is not None else (nan, nan),
        ftb_high_ci=ftb_high_ci, ci_methods=interval.methods if interval is not None else (),
        mixed=mixed, gates_failed=tuple(code for code, _ in gates), fit_r2_median=context.fit_r2_median,
        fit_r2_curve=context.fit_r2_curve,
        rcbv_by_leakage={m: {"rcbv_median": v["rcbv_median"],
                             "verdict": verdict_for(v["rcbv_median"], low=low, high=high)
                             if np.isfinite(v["rcbv_median"]) else "not_assessable"}
                         for m, v in by_leakage.items()},
    )


def _ftb(valid: np.ndarray, low: float, high: float) -> tuple[float, float, float]:
    """Fractional tumour burden: the fractions of valid rCBV values below ``low``, between, above ``high``."""
    if not valid.size:
        return (float("nan"),) * 3
    return float(np.mean(valid < low)), float(np.mean((valid >= low) & (valid <= high))), float(np.mean(valid > high))


def _band(med: float, ci: tuple[float, float], p90: float, ftb_high: float, ftb_high_ci: tuple[float, float],
          mixed: bool, reasons: list[str], *, low: float, high: float, mixed_fraction: float) -> str:
    """The verdict from the rCBV statistics alone (decide's rule), its reasons appended to ``reasons``."""
    if med > high and ci[0] > high:
        verdict = "likely_recurrence"
        reasons.append(f"median rCBV {med:.2f} (95 % interval {_fmt_ci(ci)}) is above {high:g}")
    elif (med < low and ci[1] < low and ftb_high < mixed_fraction and np.isfinite(ftb_high_ci[1])
          and ftb_high_ci[1] < mixed_fraction and p90 <= high):
        verdict = "likely_treatment_effect"
        reasons.append(f"median rCBV {med:.2f} (95 % interval {_fmt_ci(ci)}) is below {low:g}, "
                       f"{ftb_high:.0%} of the voxels above {high:g} and the {HOTSPOT_PERCENTILE:.0f}th percentile "
                       f"{p90:.2f} not above it")
    else:
        verdict = "indeterminate"
        reasons.append(f"median rCBV {med:.2f} (95 % interval {_fmt_ci(ci)}); thresholds {low:g} and {high:g}")
        if not np.isfinite(ci[0]):
            reasons.append("no confidence interval was computed: at most indeterminate")
        elif (med > high and ci[0] <= high) or (med < low and ci[1] >= low):
            crossed = high if med > high else low
            reasons.append(f"the 95 % interval {_fmt_ci(ci)} of the median crosses {crossed:g}: at most "
                           "indeterminate")
        if med < low and not mixed and (p90 > high or not ftb_high_ci[1] < mixed_fraction):
            reasons.append(f"a high-rCBV hotspot: {HOTSPOT_PERCENTILE:.0f}th percentile {p90:.2f}, FTB-high "
                           f"{ftb_high:.0%} (interval up to {ftb_high_ci[1]:.0%}): not called treatment effect")
    if mixed:
        reasons.append(f"mixed lesion: {ftb_high:.0%} of the voxels (95 % interval {ftb_high_ci[0]:.0%}-"
                       f"{ftb_high_ci[1]:.0%}) have rCBV above {high:g} (>= {mixed_fraction:.0%}) and "
                       f"{1 - ftb_high:.0%} do not: a recurrent component is likely whatever the median; never "
                       "called treatment effect")
    return verdict


def _in_context(verdict: str, context: Context, reasons: list[str]) -> str:
    """The verdict within the pseudoprogression window and under bevacizumab or steroids."""
    if verdict == "likely_recurrence" and context.weeks_since_radiation is not None \
            and context.weeks_since_radiation < PSEUDOPROGRESSION_WEEKS:
        verdict = "possible_recurrence_or_pseudoprogression"
        reasons.append(f"{context.weeks_since_radiation:g} weeks since radiation, within the "
                       f"{PSEUDOPROGRESSION_WEEKS}-week pseudoprogression window ({PSEUDOPROGRESSION_SOURCE}): "
                       "possible recurrence or pseudoprogression, confirm at short interval")
    drugs = [d for d, on in (("bevacizumab", context.bevacizumab), ("steroids", context.steroids)) if on]
    if drugs:
        if verdict == "likely_treatment_effect":
            verdict = "indeterminate"
            reasons.append(f"under {' and '.join(drugs)}: {'both lower' if len(drugs) > 1 else 'it lowers'} rCBV "
                           "(bevacizumab normalises leaky vessels, steroids reduce blood volume and leakage), so a "
                           "low rCBV does not rule out recurrence: at most indeterminate")
        else:
            reasons.append(f"under {' and '.join(drugs)}, which lower rCBV: a high value is reached despite it, "
                           "a low one would not rule out recurrence")
    return verdict


def _notes(verdict: str, context: Context, by_leakage: dict, n_voxels: int, n_valid: int, reasons: list[str], *,
           low: float, high: float) -> None:
    """Context that does not change the verdict, appended to ``reasons``."""
    nan = float("nan")
    if verdict != "not_assessable":
        if context.weeks_since_radiation is None:
            reasons.append(f"time since radiation unknown (--weeks-since-radiation): within {PSEUDOPROGRESSION_WEEKS} "
                           "weeks of chemoradiation a high rCBV can be pseudoprogression")
        elif context.weeks_since_radiation < PSEUDOPROGRESSION_WEEKS \
                and verdict != "possible_recurrence_or_pseudoprogression":
            reasons.append(f"{context.weeks_since_radiation:g} weeks since radiation: pseudoprogression is most common "
                           f"within {PSEUDOPROGRESSION_WEEKS} weeks; compare with prior scans")
    bands = {m: verdict_for(v["rcbv_median"], low=low, high=high) for m, v in by_leakage.items()
             if np.isfinite(v.get("rcbv_median", nan))}
    if len(set(bands.values())) > 1:
        reasons.append("the verdict band depends on the leakage correction: "
                       + ", ".join(f"{m} {by_leakage[m]['rcbv_median']:.2f}" for m in bands))
    if 0 < n_voxels - n_valid and n_valid and (n_voxels - n_valid) / n_voxels <= MAX_UNFITTABLE_FRACTION:
        reasons.append(f"{n_voxels - n_valid} of {n_voxels} voxels have no valid CBV and were left out")
    if context.aif_quality is not None and AIF_UNUSABLE <= context.aif_quality < AIF_POOR:
        reasons.append(f"poor arterial input function (quality {context.aif_quality:.2f}): absolute values are "
                       "unreliable")
    if context.outside_brain and context.outside_brain / max(n_voxels, 1) <= MAX_OUTSIDE_BRAIN_FRACTION:
        reasons.append(f"{context.outside_brain} voxels ({context.outside_brain / max(n_voxels, 1):.0%}) lie outside "
                       "the brain mask")
    if np.isfinite(context.leakage_cbv_change) and abs(context.leakage_cbv_change) > STRONG_LEAKAGE_CHANGE:
        reasons.append(f"strong contrast leakage: the correction changed the median CBV by "
                       f"{context.leakage_cbv_change:+.0%} (information: the size of a correction is no reason to "
                       "refuse; see the leakage sensitivity)")
    if context.reference_note:
        reasons.append(context.reference_note)


def score_roi(name: str, rcbv_in_roi: np.ndarray, *, voxel_volume_ml: float, n_voxels: int,
              low: float = RCBV_LOW, high: float = RCBV_HIGH, mixed_fraction: float = MIXED_FTB_HIGH,
              ref_cbv: np.ndarray | None = None, seed: int = BOOTSTRAP_SEED, context: Context = Context()) -> RoiScore:
    """``decide`` for rCBV values of one correction, with the bootstrap interval computed here when
    ``ref_cbv`` (the reference voxels' CBV, whose median normalised ``rcbv_in_roi``) is given: a
    convenience for scoring outside the pipeline, which pools the leakage corrections itself."""
    interval = None
    if ref_cbv is not None:
        ref = np.asarray(ref_cbv, dtype=np.float64)
        ref_med = float(np.nanmedian(ref))
        roi_cbv = np.asarray(rcbv_in_roi, dtype=np.float64) * ref_med
        interval = rcbv_interval({context.leakage: roi_cbv}, {context.leakage: resample_reference(ref, seed=seed)},
                                 low=low, high=high, seed=seed)
    return decide(name, rcbv_in_roi, voxel_volume_ml=voxel_volume_ml, n_voxels=n_voxels, interval=interval,
                  context=context, low=low, high=high, mixed_fraction=mixed_fraction)


def verdict_rule(low: float, high: float, *, mixed_fraction: float = MIXED_FTB_HIGH) -> str:
    return (f"not_assessable when a gate fails (too few or mostly unfittable voxels, ROI mostly outside the brain "
            f"or on a vessel, reference tissue not plausible white matter, unusable AIF, negative median rCBV, "
            f"leakage fit R^2 < {MIN_FIT_R2:g} on the ROI's mean curve "
            f"or K2 out of range, "
            f"leakage corrections disagreeing beyond their intervals); likely_recurrence: median rCBV and its 95 % "
            f"interval's lower bound > {high:g}; likely_treatment_effect: median and the interval's upper bound < "
            f"{low:g}, FTB-high (and its upper bound) < {mixed_fraction:g} and {HOTSPOT_PERCENTILE:.0f}th percentile "
            f"<= {high:g}; otherwise indeterminate (mixed when FTB-high and the rest are both >= {mixed_fraction:g}). "
            f"Within "
            f"{PSEUDOPROGRESSION_WEEKS} weeks of radiation a recurrence is possible_recurrence_or_pseudoprogression; "
            f"under bevacizumab or steroids a treatment effect is indeterminate "
            f"({THRESHOLD_SOURCE.split(';')[0]}; {MIXED_SOURCE}; {PSEUDOPROGRESSION_SOURCE})")


def percentage_signal_recovery(mean_signal: np.ndarray, *, baseline: slice, post_frames: int = 10) -> float:
    """PSR = (S_post - S_min) / (S_0 - S_min) * 100 of a mean signal curve (Barajas et al. 2009,
    Radiology 253:486): S_0 the baseline mean, S_min the minimum, S_post the mean of the last
    ``post_frames`` frames. Percent; NaN when there is no drop."""
    sig = np.asarray(mean_signal, dtype=np.float64)
    s0 = float(np.mean(sig[baseline]))
    smin = float(np.min(sig))
    spost = float(np.mean(sig[-post_frames:]))
    if not s0 > smin:
        return float("nan")
    return 100.0 * (spost - smin) / (s0 - smin)


