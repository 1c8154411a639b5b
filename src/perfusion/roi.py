"""rCBV, per-ROI scores with their verdict rules and sources (the reference tissue: reference.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: rCBV thresholds of the verdict and of the fractional tumour burden (FTB) classes: below LOW
#: treatment effect is likely, above HIGH recurrence is likely, in between indeterminate.
RCBV_LOW = 1.0
RCBV_HIGH = 1.75
THRESHOLD_SOURCE = (
    "rCBV thresholds 1.0 and 1.75 (normalised to normal-appearing white matter) as used for fractional "
    "tumour burden by Hu et al. 2012, Neuro-Oncology 14:919 (doi:10.1093/neuonc/nos112) and Iv et al. 2019, "
    "AJNR 40:1649; published cut-offs range from about 0.7 to 2.6 across protocols and software"
)

VERDICTS = ("likely_recurrence", "likely_treatment_effect", "indeterminate")

NEXT_STEP = {
    "likely_recurrence": "High blood volume favours tumour recurrence: refer to neuro-oncology for multidisciplinary review.",
    "likely_treatment_effect": (
        "Low blood volume favours treatment effect (pseudoprogression or radiation necrosis): "
        "short-interval follow-up MRI in 6-8 weeks."
    ),
    "indeterminate": (
        "Equivocal blood volume: consider MR spectroscopy or FDG-PET, biopsy if the stakes are high; "
        "compare with prior scans."
    ),
}

#: The leakage correction changing the ROI's median CBV by more than this fraction counts as strong
#: leakage in the reasons (method-independent, unlike K2, whose scale differs between BSW and the
#: residue-domain method). On the leaky phantom the correction changes CBV by 45-70 %.
STRONG_LEAKAGE_CHANGE = 0.3

#: ROIs with fewer valid voxels than this get a warning: a median over a handful of voxels is noise.
MIN_ROI_VOXELS = 10


@dataclass(frozen=True)
class RoiScore:
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

    def as_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def verdict_for(median_rcbv: float, *, low: float = RCBV_LOW, high: float = RCBV_HIGH) -> str:
    """Verdict from the median rCBV: > high recurrence, < low treatment effect, else indeterminate."""
    if not np.isfinite(median_rcbv):
        return "indeterminate"
    if median_rcbv > high:
        return "likely_recurrence"
    if median_rcbv < low:
        return "likely_treatment_effect"
    return "indeterminate"


def score_roi(name: str, rcbv_in_roi: np.ndarray, *, voxel_volume_ml: float, n_voxels: int,
              low: float = RCBV_LOW, high: float = RCBV_HIGH) -> RoiScore:
    """Score one ROI from its rCBV values (ratio; NaN for voxels that could not be fitted)."""
    r = np.asarray(rcbv_in_roi, dtype=np.float64)
    valid = r[np.isfinite(r)]
    reasons: list[str] = []
    if valid.size == 0:
        reasons.append("no voxel of the ROI has a valid CBV (outside the analysed brain or unfittable)")
        nan = float("nan")
        return RoiScore(name, n_voxels, 0, n_voxels * voxel_volume_ml, nan, nan, nan, nan, nan, nan,
                        "indeterminate", tuple(reasons), NEXT_STEP["indeterminate"], rule=verdict_rule(low, high))
    med = float(np.median(valid))
    verdict = verdict_for(med, low=low, high=high)
    if verdict == "likely_recurrence":
        reasons.append(f"median rCBV {med:.2f} is above {high:g}")
    elif verdict == "likely_treatment_effect":
        reasons.append(f"median rCBV {med:.2f} is below {low:g}")
    else:
        reasons.append(f"median rCBV {med:.2f} lies between {low:g} and {high:g}")
    if valid.size < n_voxels:
        reasons.append(f"{n_voxels - valid.size} of {n_voxels} voxels have no valid CBV and were left out")
    if valid.size < MIN_ROI_VOXELS:
        reasons.append(f"only {valid.size} valid voxels: the median is unreliable")
    return RoiScore(
        name=name,
        n_voxels=n_voxels,
        n_valid=int(valid.size),
        volume_ml=n_voxels * voxel_volume_ml,
        rcbv_mean=float(np.mean(valid)),
        rcbv_median=med,
        rcbv_p90=float(np.percentile(valid, 90)),
        ftb_low=float(np.mean(valid < low)),
        ftb_mid=float(np.mean((valid >= low) & (valid <= high))),
        ftb_high=float(np.mean(valid > high)),
        verdict=verdict,
        reasons=tuple(reasons),
        next_step=NEXT_STEP[verdict],
        rule=verdict_rule(low, high),
    )


def verdict_rule(low: float, high: float) -> str:
    return (f"median leakage-corrected rCBV > {high:g}: likely_recurrence; < {low:g}: likely_treatment_effect; "
            f"otherwise indeterminate ({THRESHOLD_SOURCE.split(';')[0]})")


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


#: Weeks after chemoradiation during which pseudoprogression is most common (Brandsma 2008, Lancet
#: Oncol 9:453; guidance this tool serves: within 12 weeks).
PSEUDOPROGRESSION_WEEKS = 12


def context_reasons(score: RoiScore, *, weeks_since_radiation: float | None, aif_quality: float | None,
                    outside_brain: int, strong_leakage: bool = False) -> tuple[str, ...]:
    """Reasons that change the confidence of a verdict, in words for the report."""
    out = []
    if weeks_since_radiation is not None and weeks_since_radiation < PSEUDOPROGRESSION_WEEKS:
        out.append(f"{weeks_since_radiation:g} weeks since radiation: pseudoprogression is most common within "
                   f"{PSEUDOPROGRESSION_WEEKS} weeks of chemoradiation; compare with prior scans")
    if aif_quality is not None and aif_quality < 0.5:
        out.append(f"poor arterial input function (quality {aif_quality:.2f}): absolute values are unreliable")
    if outside_brain:
        share = outside_brain / max(score.n_voxels, 1)
        out.append(f"{outside_brain} voxels ({share:.0%}) lie outside the brain mask"
                   + ("; most of the ROI is outside: lower confidence" if share > 0.5 else ""))
    if strong_leakage:
        out.append(f"strong contrast leakage: the correction changed the median CBV by {score.leakage_cbv_change:+.0%}; "
                   "the verdict depends on the leakage model")
    return tuple(out)
