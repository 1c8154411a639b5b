"""Synthetic DSC series with known truth (the ground truth every map is checked against).

Forward model, computed on a fine time grid (``FINE_DT_S``) and only then sampled at TR, so the
solver's discretisation is not built into the data:

- AIF delta R2*(t) (1/s): a gamma-variate first pass (t0, alpha, beta), a recirculation pass
  (a second, broader gamma variate 8 s later holding ``recirculation_fraction`` of the first pass's
  area) and a slowly decaying plateau.
- Tissue delta R2*(t) = (rho / kH) * CBF / 6000 * int AIF'(u) R(t - u) du with an exponential
  residue R(t) = exp(-t / MTT), where AIF' is the AIF delayed by the block's delay and, in the
  dispersion slice, convolved with an exponential kernel of mean ``dispersion_s``. Then
  CBV = CBF * MTT / 60 in mL/100 g.
- Signal S = S0 exp(-TE delta R2*), the first two frames raised (steady state not yet reached),
  then Rician noise of SD S0 / SNR, stored as int16.

Layout (x, y per slice; one slice per condition): slices 0-2 hold a CBF x MTT sweep of 4 x 4 blocks
with tissue delays 0, 1 and 2 s; slice 3 the same sweep with delay 0 and AIF dispersion; slice 4
two lesions (hyper- and hypoperfused; discs of radius ``LESION_RADIUS_FRACTION`` * matrix unless a
lesion sets its own ``radius``) in normal-appearing white matter (NAWM). Every slice has
NAWM background, two arteries (2 x 2 pure arterial voxels, each ringed by partial-volume voxels)
and a vein (the AIF delayed and dispersed).

Leaky lesions (``PhantomSpec(leaky_lesions=True)``; off by default, and then the phantom is bit for
bit the one described above). One more slice is appended (the last, z = 5) with the same NAWM
background and vessels and four lesion discs (radius ``LEAKY_RADIUS_FRACTION`` * matrix, one per
quadrant), parameterised by ``PhantomSpec.leaky_lesion_params``: CBF, MTT (their vascular delta R2*
is the ``tissue_curve`` above), Ktrans (1/min), ve, r2e (1/(mM s)) and T10 (s). Slices 0-4 keep
their signal, noise included (the extra slice draws its noise after them), and the geometry is the plain
phantom's: the same affine (voxel to world), so slices 0-4 lie at the same positions, with the same
brain, NAWM reference, vessel and lesion masks; the plain grid is the leaky grid's first five slices, so
the two compare voxel by voxel (index for index). The contrast agent leaks
by tracer kinetics, not by the model of any correction:

- Plasma concentration Cp(t) = AIF(t) / ``R2S_BLOOD_PER_MM_S`` / (1 - Hct_large), in mM: the AIF is
  blood delta R2*, the agent lives in plasma.
- Extravascular extracellular concentration (per tissue volume, mM) from the standard Tofts model,
  C_e(t) = Ktrans int_0^t Cp(u) exp(-kep (t - u)) du with kep = Ktrans / ve, by convolution on the
  fine grid (trapezoid weight at lag 0, like the residue); Ktrans in 1/s inside the code.
- Signal S(t) = M0 SPGR(R1(t)) exp(-TE (delta R2*_vascular(t) + r2e C_e(t))), with
  SPGR(R1) = sin(a) (1 - E1) / (1 - cos(a) E1), E1 = exp(-TR R1), R1(t) = 1/T10 + r1 C_e(t),
  a = ``PhantomSpec.flip_angle`` (60 degrees, no preload: the Boxerman 2020 consensus pairs 60 degrees
  with a full preload and 30 degrees with none, so this is the leakier, off-consensus case), and
  M0 = S0 / SPGR(1/T10) so that the baseline equals ``s0`` as everywhere else. r1 is
  ``R1_PER_MM_S`` (gadobutrol in plasma at 3 T).
- The intravascular agent's T1 effect is neglected: water exchange across the capillary wall is not
  fast against the intravascular relaxation rates, so mainly blood water (a few % of the voxel) sees
  it, and leakage models since Boxerman 2006 give the T1 effect to the leaked agent only. It also
  makes a lesion with Ktrans = 0 exactly the vascular-only model of the other slices, so any CBV
  error on the leaky slice comes from the leaked agent.
- r2e, the T2* relaxivity of the leaked agent, is a property of the tissue (cell size and density
  set the susceptibility gradients: Semmineh 2014, PLoS One 9:e84764), not a constant: T1-dominant
  lesions have a small r2e, the T2*-dominant one a large r2e. At TE 25 ms, TR 1.5 s, 60 degrees and
  T10 1.5 s the two effects on ln S balance at r2e of about 106 1/(mM s) (r1 d ln SPGR / d R1 =
  TE r2e at small C_e). Each lesion's truth records which one wins ('T1' or 'T2*') by the sign of
  the leaked agent's summed effect on ln S over the series, i.e. the sign of the CBV error it causes.
- The default Ktrans values (0.0012-0.004 1/min) are far below enhancing glioma's (about 0.1 1/min,
  Skinner 2016, AJNR 37:80), on purpose: the phantom's tissue delta R2* per mM is the blood's (one
  linear relaxivity for AIF and tissue), so its first-pass drops are small (NAWM 4 %, 20-30 % in
  vivo) and a clinical Ktrans swamps them. In the CBV-6 lesion 0.01 1/min gives a +2.5 % late
  overshoot and an uncorrected CBV of about zero; 0.1 1/min gives +6.5 % and -1.5 times the truth.
  With the defaults the late signal of the T1-dominant lesions rises 0.2-0.6 % above baseline
  (without leakage their vascular tail would hold it 0.2-1 % below), and every uncorrected rCBV
  lands in the wrong verdict band (whole-series area ratio to the NAWM, noise-free: 1.62, 0.16,
  0.81 and 1.18 against true 3.0, 0.6, 1.35 and 0.7). Raise Ktrans for stronger leakage.

Truth for the leaky lesions: the vascular cbv, cbf, mtt maps as for the other lesions, ``ktrans``
(1/min) and ``ve`` maps (NaN elsewhere), ``roi-<name>`` masks, and ``truth.json`` entries with the
expected verdict of each lesion's true rCBV (thresholds ``TRUTH_RCBV_LOW`` / ``TRUTH_RCBV_HIGH``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Generic, TypeVar, overload

import numpy as np
from scipy.signal import fftconvolve

from perfusion.units import HCT_LARGE_VESSEL, KH, RHO_BRAIN_G_PER_ML

#: Time step of the forward model, s (TR must be a multiple of it).
FINE_DT_S = 0.01

# --- leaky lesions (used only when PhantomSpec.leaky_lesions is True) ---------------------------

#: Linear T2* relaxivity of whole blood, 1/(mM s), used to turn the AIF (blood delta R2*, 1/s) into
#: a concentration. Calibrated so that the AIF's peak, 100 1/s, is the first-pass peak of the
#: population-averaged blood AIF of Parker et al. 2006 (MRM 56:993; A1 0.809 mM min, sigma1 0.0563
#: min, T1 0.17046 min, plus its second pass and tail: 6.07 mM at 0.17 min): 100 / 6.07 = 16.5.
#: Blood delta R2* is in truth quadratic in concentration (Kjolby 2006); the phantom is linear
#: throughout, as its tissue curves are.
R2S_BLOOD_PER_MM_S = 16.5

#: T1 relaxivity of the leaked agent, 1/(mM s): gadobutrol in human plasma at 3 T, 37 C, 4.97
#: (Szomolanyi et al. 2019, Invest Radiol 54:559; 4.78 at 1.5 T). The phantom's sidecar says 3 T.
R1_PER_MM_S = 4.97

#: rCBV thresholds of the expected verdict in truth.json (> HIGH likely_recurrence, < LOW
#: likely_treatment_effect, else indeterminate): Hu et al. 2012, Neuro-Oncology 14:919 and Iv et al.
#: 2019, AJNR 40:1649. Defined here, not imported from roi.py, so the truth does not depend on the
#: code it checks.
TRUTH_RCBV_LOW = 1.0
TRUTH_RCBV_HIGH = 1.75

#: Leaky lesion discs: radius and the offset of their centres from the slice centre along x and y,
#: as fractions of the matrix. At 64: 108 voxels each, centres 14.1 voxels from the slice centre;
#: voxel centres at least 7.6 voxels from the nearest vessel voxel (ring included) and 17 from the
#: nearest voxel of another lesion.
LEAKY_RADIUS_FRACTION = 0.09
LEAKY_OFFSET_FRACTION = 0.22

#: Radius of the lesion discs of the lesion slice, as a fraction of the matrix (5.8 voxels at 64); a
#: lesion of ``PhantomSpec.lesions`` may set its own with the optional key ``radius`` (same unit), e.g.
#: to build a follow-up time point in which a lesion has grown. Centres stay at +/- 0.35 * matrix
#: along x, so a radius above 0.11 would leave the brain disc (0.46 * matrix); make_phantom raises then.
LESION_RADIUS_FRACTION = 0.09

#: Least gap, in voxels, between a leaky lesion and a vessel (core and partial-volume ring) or
#: another lesion; make_phantom raises if a matrix size breaks it.
LEAKY_MIN_GAP_VOXELS = 3

#: Keys every entry of PhantomSpec.leaky_lesion_params must have.
LEAKY_KEYS = ("cbf", "mtt", "ktrans", "ve", "r2e", "t10")


@dataclass(frozen=True)
class PhantomSpec:
    """Settings of the phantom. Times in s, CBF in mL/100 g/min, CBV in mL/100 g; the leaky lesions'
    Ktrans in 1/min (the DCE convention, converted to 1/s inside ``tofts_ees``'s caller)."""

    tr: float = 1.5
    te: float = 0.025
    n_frames: int = 80
    snr: float = 150.0  # S0 / noise SD at baseline
    s0: float = 1000.0
    seed: int = 0
    matrix: int = 64
    block: int = 4
    cbf_values: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80)
    mtt_values: tuple[float, ...] = (2, 3, 4, 5, 6, 8)
    delays: tuple[float, ...] = (0.0, 1.0, 2.0)
    dispersion_s: float = 2.0
    # AIF
    aif_t0: float = 20.0
    aif_alpha: float = 3.0
    aif_beta: float = 1.5
    aif_peak: float = 100.0  # 1/s
    recirculation_fraction: float = 0.2
    plateau_fraction: float = 0.08
    # tissues
    nawm_cbf: float = 20.0
    nawm_mtt: float = 6.0
    lesions: dict = field(default_factory=lambda: {
        "lesion_hyper": {"cbf": 60.0, "mtt": 6.0},  # CBV 6.0, rCBV 3.0
        "lesion_hypo": {"cbf": 12.0, "mtt": 6.0},  # CBV 1.2, rCBV 0.6
    })  # optional per lesion: "radius", a fraction of the matrix (default LESION_RADIUS_FRACTION)
    partial_volume_fraction: float = 0.3
    vein_delay_s: float = 4.0
    vein_dispersion_s: float = 3.0
    steady_state_boost: tuple[float, ...] = (1.20, 1.05)
    # leaky lesions: one extra slice (module docstring); off by default
    leaky_lesions: bool = False
    flip_angle: float = 60.0  # degrees, no preload (Boxerman 2020 pairs 60 with a preload, 30 without)
    # Per leaky lesion: cbf mL/100 g/min, mtt s (each its own, unlike the NAWM's 6 s), ktrans 1/min
    # (low on purpose: module docstring), ve mL/mL (0.2-0.35, around the 0.29 that Skinner 2016,
    # AJNR 37:80, reports in glioma), r2e 1/(mM s) (the leaked agent's T2* relaxivity, a tissue property:
    # 30 leaves T1 dominant, 150 makes T2* dominant; the balance is near 106 at the default timing),
    # t10 s (pre-contrast T1, assumed 1.5 s: tumour and oedema are longer than 3-T grey matter,
    # 1.33 s in Wansapura 1999, JMRI 9:531). rCBV is against the NAWM's CBV of 2.0 mL/100 g.
    leaky_lesion_params: dict = field(default_factory=lambda: {
        # CBV 6.0, rCBV 3.0; T1-dominant leakage
        "leaky_recurrence_t1": {"cbf": 72.0, "mtt": 5.0, "ktrans": 0.004, "ve": 0.3, "r2e": 30.0, "t10": 1.5},
        # CBV 1.2, rCBV 0.6; T1-dominant leakage
        "leaky_treatment_t1": {"cbf": 18.0, "mtt": 4.0, "ktrans": 0.0012, "ve": 0.25, "r2e": 30.0, "t10": 1.5},
        # CBV 2.7, rCBV 1.35; mild T1-dominant leakage (about the least Ktrans that lifts the late
        # signal clearly, +0.2 %, above baseline against this lesion's own vascular tail)
        "leaky_indeterminate": {"cbf": 36.0, "mtt": 4.5, "ktrans": 0.0015, "ve": 0.35, "r2e": 30.0, "t10": 1.5},
        # CBV 1.4, rCBV 0.7; T2*-dominant leakage (densely cellular: large r2e, small ve)
        "leaky_treatment_t2s": {"cbf": 14.0, "mtt": 6.0, "ktrans": 0.002, "ve": 0.2, "r2e": 150.0, "t10": 1.5},
    })

    def to_json(self) -> dict:
        """The spec as a JSON-able dict. The leaky-lesion fields are left out when the leaky slice is
        off, so the default phantom's truth.json stays as it was before they existed."""
        out = asdict(self)
        if not self.leaky_lesions:
            for key in ("leaky_lesions", "flip_angle", "leaky_lesion_params"):
                del out[key]
        return out


def gamma_variate(t: np.ndarray, *, t0: float, alpha: float, beta: float) -> np.ndarray:
    """(t - t0)^alpha exp(-(t - t0) / beta) for t > t0, else 0; unnormalised."""
    x = np.clip(t - t0, 0.0, None)
    return np.where(t > t0, x ** alpha * np.exp(-x / beta), 0.0)


def aif_curve(t: np.ndarray, spec: PhantomSpec) -> np.ndarray:
    """The phantom's AIF delta R2* (1/s) at times t (s)."""
    first = gamma_variate(t, t0=spec.aif_t0, alpha=spec.aif_alpha, beta=spec.aif_beta)
    first *= spec.aif_peak / first.max()
    recirc = gamma_variate(t, t0=spec.aif_t0 + 8.0, alpha=spec.aif_alpha, beta=2.0 * spec.aif_beta)
    recirc *= spec.recirculation_fraction * first.sum() / recirc.sum()
    x = np.clip(t - spec.aif_t0, 0.0, None)
    plateau = spec.plateau_fraction * spec.aif_peak * (1 - np.exp(-x / 6.0)) * np.exp(-x / 150.0)
    return first + recirc + np.where(t > spec.aif_t0, plateau, 0.0)


def _shift(curve: np.ndarray, seconds: float) -> np.ndarray:
    n = int(round(seconds / FINE_DT_S))
    if n == 0:
        return curve.copy()
    out = np.zeros_like(curve)
    out[n:] = curve[:-n]
    return out


def _disperse(curve: np.ndarray, mean_s: float, t: np.ndarray) -> np.ndarray:
    kernel = np.exp(-t / mean_s)
    kernel /= kernel.sum()
    return fftconvolve(curve, kernel)[: curve.size]


def tissue_curve(aif_fine: np.ndarray, t: np.ndarray, *, cbf: float, mtt: float, delay: float = 0.0,
                 dispersion: float = 0.0) -> np.ndarray:
    """Tissue delta R2* (1/s) on the fine grid for CBF (mL/100 g/min), MTT (s), delay (s)."""
    a = _shift(aif_fine, delay)
    if dispersion > 0:
        a = _disperse(a, dispersion, t)
    residue = np.exp(-t / mtt)
    residue[0] *= 0.5  # trapezoid weight: the fine-grid convolution is then exact to O(dt^2)
    conv = fftconvolve(a, residue)[: t.size] * FINE_DT_S
    return (RHO_BRAIN_G_PER_ML / KH) * cbf / 6000.0 * conv


def plasma_concentration(aif_delta_r2s: np.ndarray) -> np.ndarray:
    """Arterial plasma concentration (mM) from the AIF's blood delta R2* (1/s), any shape:
    blood concentration by the linear ``R2S_BLOOD_PER_MM_S``, divided by (1 - Hct_large)."""
    return np.asarray(aif_delta_r2s, dtype=np.float64) / R2S_BLOOD_PER_MM_S / (1.0 - HCT_LARGE_VESSEL)


def tofts_ees(cp: np.ndarray, t: np.ndarray, *, ktrans_per_s: float, ve: float) -> np.ndarray:
    """Extravascular extracellular concentration per tissue volume (mM), shape of ``cp``, from the
    standard Tofts model: Ktrans int_0^t Cp(u) exp(-kep (t - u)) du, kep = Ktrans / ve.

    ``cp`` is the plasma concentration (mM) on the uniform fine grid ``t`` (s, step ``FINE_DT_S``,
    starting at 0); Ktrans in 1/s; ve the EES volume fraction (0, 1]. The convolution gives lag 0
    the trapezoid weight 1/2, as ``tissue_curve`` does.
    """
    if ktrans_per_s < 0 or not 0 < ve <= 1:
        raise ValueError(f"Tofts model needs Ktrans >= 0 and 0 < ve <= 1 (got {ktrans_per_s} 1/s, {ve})")
    if ktrans_per_s == 0:
        return np.zeros_like(np.asarray(cp, dtype=np.float64))
    kernel = np.exp(-(ktrans_per_s / ve) * t)
    kernel[0] *= 0.5
    return ktrans_per_s * fftconvolve(cp, kernel)[: t.size] * FINE_DT_S


@overload
def spgr_signal(r1: float, *, tr: float, flip_angle: float) -> np.float64: ...
@overload
def spgr_signal(r1: np.ndarray, *, tr: float, flip_angle: float) -> np.ndarray: ...


def spgr_signal(r1: np.ndarray | float, *, tr: float, flip_angle: float) -> np.ndarray | np.float64:
    """Spoiled gradient-echo steady state per unit M0 (T2* decay left out): sin(a) (1 - E1) /
    (1 - cos(a) E1), E1 = exp(-TR R1); R1 in 1/s, TR in s, flip angle in degrees. The shape of ``r1``:
    a float64 for a single R1."""
    a = np.deg2rad(flip_angle)
    e1 = np.exp(-tr * np.asarray(r1, dtype=np.float64))
    return np.sin(a) * (1.0 - e1) / (1.0 - np.cos(a) * e1)


def leakage_factor(c_ees: np.ndarray, *, t10: float, r2e: float, tr: float, te: float,
                   flip_angle: float) -> np.ndarray:
    """Signal of a leaky voxel divided by its vascular-only signal S0 exp(-TE delta R2*_vascular):
    SPGR(1/T10 + r1 C_e) / SPGR(1/T10) * exp(-TE r2e C_e). C_e in mM (tissue), T10/TR/TE in s,
    r2e in 1/(mM s), flip angle in degrees; same shape as ``c_ees``. Equal to 1 where C_e = 0."""
    r10 = 1.0 / t10
    t1_part = spgr_signal(r10 + R1_PER_MM_S * np.asarray(c_ees), tr=tr, flip_angle=flip_angle)
    t1_part = t1_part / spgr_signal(r10, tr=tr, flip_angle=flip_angle)
    return t1_part * np.exp(-te * r2e * np.asarray(c_ees))


def expected_verdict(rcbv: float) -> str:
    """The verdict a correct analysis should reach from a lesion's true rCBV (against NAWM)."""
    if rcbv > TRUTH_RCBV_HIGH:
        return "likely_recurrence"
    if rcbv < TRUTH_RCBV_LOW:
        return "likely_treatment_effect"
    return "indeterminate"


def _check_leaky_spec(spec: PhantomSpec) -> None:
    if not 0 < spec.flip_angle < 180:
        raise ValueError(f"flip_angle must lie in (0, 180) degrees, got {spec.flip_angle}")
    if not spec.leaky_lesion_params:
        raise ValueError("leaky_lesions is on but leaky_lesion_params is empty")
    if len(spec.leaky_lesion_params) > 4:
        raise ValueError("the leaky slice holds at most 4 lesions (one per quadrant)")
    clash = set(spec.leaky_lesion_params) & (set(spec.lesions) | {"brain", "aif", "nawm", "vein", "sweep"})
    if clash:
        raise ValueError(f"leaky lesion names clash with other masks: {sorted(clash)}")
    for name, p in spec.leaky_lesion_params.items():
        missing = [k for k in LEAKY_KEYS if k not in p]
        if missing:
            raise ValueError(f"leaky lesion {name!r} lacks {missing}")
        if not (p["cbf"] > 0 and p["mtt"] > 0 and p["ktrans"] >= 0 and 0 < p["ve"] <= 1 and p["r2e"] >= 0
                and p["t10"] > 0):
            raise ValueError(f"leaky lesion {name!r}: need cbf > 0, mtt > 0, ktrans >= 0, 0 < ve <= 1, "
                             f"r2e >= 0, t10 > 0 (got {p})")


def _leaky_curves(spec: PhantomSpec, aif_fine: np.ndarray, t_fine: np.ndarray,
                  sample: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per leaky lesion, sampled at TR: vascular delta R2* (1/s), C_e (mM) and the leakage factor."""
    cp = plasma_concentration(aif_fine)
    out = {}
    for name, p in spec.leaky_lesion_params.items():
        vascular = tissue_curve(aif_fine, t_fine, cbf=p["cbf"], mtt=p["mtt"])[sample]
        c_ees = tofts_ees(cp, t_fine, ktrans_per_s=p["ktrans"] / 60.0, ve=p["ve"])[sample]
        factor = leakage_factor(c_ees, t10=p["t10"], r2e=p["r2e"], tr=spec.tr, te=spec.te,
                                flip_angle=spec.flip_angle)
        out[name] = (vascular, c_ees, factor)
    return out


def _leakage_type(factor: np.ndarray, ktrans: float) -> str:
    """'T1' when the leaked agent raises ln S summed over the series (CBV underestimated), 'T2*'
    when it lowers it (CBV overestimated), 'none' without leakage."""
    if ktrans == 0:
        return "none"
    return "T1" if float(np.sum(np.log(factor))) > 0 else "T2*"


def describe_leaky_lesions(spec: PhantomSpec) -> dict[str, dict]:
    """Truth of each leaky lesion: cbv (mL/100 g), cbf (mL/100 g/min), mtt (s), rcbv (against the
    NAWM), ktrans (1/min), ve, r2e (1/(mM s)), t10 (s), leakage ('T1', 'T2*' or 'none') and
    expected_verdict. Empty when ``spec.leaky_lesions`` is off."""
    if not spec.leaky_lesions:
        return {}
    _check_leaky_spec(spec)
    t_fine, sample = _time_grid(spec)
    aif_fine = aif_curve(t_fine, spec)
    curves = _leaky_curves(spec, aif_fine, t_fine, sample)
    nawm_cbv = spec.nawm_cbf * spec.nawm_mtt / 60.0
    out = {}
    for name, p in spec.leaky_lesion_params.items():
        cbv = p["cbf"] * p["mtt"] / 60.0
        rcbv = cbv / nawm_cbv
        out[name] = {"cbf": p["cbf"], "mtt": p["mtt"], "cbv": cbv, "rcbv": rcbv, "ktrans": p["ktrans"],
                     "ve": p["ve"], "r2e": p["r2e"], "t10": p["t10"],
                     "leakage": _leakage_type(curves[name][2], p["ktrans"]),
                     "expected_verdict": expected_verdict(rcbv)}
    return out


def _time_grid(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """The fine time grid (s) and the indices on it of the sampled frames."""
    t_fine = np.arange(0.0, spec.n_frames * spec.tr + 40.0, FINE_DT_S)
    step = int(round(spec.tr / FINE_DT_S))
    return t_fine, np.arange(spec.n_frames) * step


#: The settings a phantom was built from: PhantomSpec here, phantom_realistic's RealisticSpec there.
SpecT = TypeVar("SpecT")


@dataclass(frozen=True)
class Phantom(Generic[SpecT]):
    """A phantom's series, truth and masks; ``spec`` the settings it was built from (generic so
    ``phantom_realistic.RealisticPhantom`` carries a RealisticSpec without claiming a PhantomSpec)."""

    signal: np.ndarray  # (x, y, z, t) int16
    affine: np.ndarray
    masks: dict[str, np.ndarray]  # bool (x, y, z)
    truth: dict[str, np.ndarray]  # float32 (x, y, z): cbv, cbf, mtt, delay, dispersion (+ ktrans, ve if leaky)
    blocks: list[dict]  # sweep blocks: slice, x/y ranges, cbf, mtt, cbv, delay, dispersion
    aif: np.ndarray  # noise-free AIF delta R2* sampled at TR, (t,)
    spec: SpecT


def make_phantom(spec: PhantomSpec = PhantomSpec()) -> Phantom[PhantomSpec]:
    """Build the phantom described in the module docstring.

    Long because it is one recipe read top to bottom (the sweep, lesion and leaky slices, vessels,
    noise) over the arrays every step writes into; each step is a commented block."""
    if abs(spec.tr / FINE_DT_S - round(spec.tr / FINE_DT_S)) > 1e-9:
        raise ValueError(f"TR must be a multiple of {FINE_DT_S} s")
    leaky = spec.leaky_lesions
    if leaky:
        _check_leaky_spec(spec)
    rng = np.random.default_rng(spec.seed)
    m, nz = spec.matrix, len(spec.delays) + 2 + int(leaky)
    t_fine, sample = _time_grid(spec)
    aif_fine = aif_curve(t_fine, spec)

    shape = (m, m, nz)
    curves = np.zeros(shape + (spec.n_frames,))
    truth_keys = ("cbv", "cbf", "mtt", "delay", "dispersion") + (("ktrans", "ve") if leaky else ())
    truth = {k: np.full(shape, np.nan, np.float32) for k in truth_keys}
    masks = {k: np.zeros(shape, bool) for k in ("brain", "aif", "nawm", "vein", "sweep")}
    masks.update({name: np.zeros(shape, bool) for name in spec.lesions})
    if leaky:
        masks.update({name: np.zeros(shape, bool) for name in spec.leaky_lesion_params})
        leak = np.ones(shape + (spec.n_frames,))  # leaky voxels' signal / vascular-only signal
        leaky_curves = _leaky_curves(spec, aif_fine, t_fine, sample)

    xx, yy = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    c = (m - 1) / 2.0
    radius = 0.46 * m
    disc = (xx - c) ** 2 + (yy - c) ** 2 <= radius ** 2

    def put(sl, cond, curve_fine, *, cbf, mtt, delay=0.0, dispersion=0.0):
        curves[cond, sl] = curve_fine[sample]
        truth["cbf"][cond, sl] = cbf
        truth["mtt"][cond, sl] = mtt
        truth["cbv"][cond, sl] = cbf * mtt / 60.0
        truth["delay"][cond, sl] = delay
        truth["dispersion"][cond, sl] = dispersion

    nawm_curve = tissue_curve(aif_fine, t_fine, cbf=spec.nawm_cbf, mtt=spec.nawm_mtt)
    blocks: list[dict] = []
    nb_x, nb_y = len(spec.cbf_values), len(spec.mtt_values)
    pitch = spec.block + 1
    x0 = int(round(c - (nb_x * pitch - 1) / 2.0))
    y0 = int(round(c - (nb_y * pitch - 1) / 2.0))
    arteries = [(int(c), y0 - 6), (int(c), y0 + nb_y * pitch + 4)]
    vein = (int(c) - 1, int(c + radius) - 3)
    conditions = [(d, 0.0) for d in spec.delays] + [(0.0, spec.dispersion_s)]
    lesion_slice = len(conditions)

    for z in range(nz):
        masks["brain"][:, :, z] = disc
        put(z, disc, nawm_curve, cbf=spec.nawm_cbf, mtt=spec.nawm_mtt)
        masks["nawm"][:, :, z] = disc
        if z < len(conditions):
            delay, disp = conditions[z]
            for i, cbf in enumerate(spec.cbf_values):
                for j, mtt in enumerate(spec.mtt_values):
                    xs, ys = x0 + i * pitch, y0 + j * pitch
                    cond = np.zeros((m, m), bool)
                    cond[xs: xs + spec.block, ys: ys + spec.block] = True
                    put(z, cond, tissue_curve(aif_fine, t_fine, cbf=cbf, mtt=mtt, delay=delay, dispersion=disp),
                        cbf=cbf, mtt=mtt, delay=delay, dispersion=disp)
                    masks["sweep"][:, :, z] |= cond
                    masks["nawm"][:, :, z] &= ~_dilate2d(cond, 1)
                    blocks.append({"slice": z, "x": [xs, xs + spec.block], "y": [ys, ys + spec.block], "cbf": cbf,
                                   "mtt": mtt, "cbv": cbf * mtt / 60.0, "delay": delay, "dispersion": disp})
        elif z == lesion_slice:
            for k, (name, les) in enumerate(spec.lesions.items()):
                cx = c + (-1 if k == 0 else 1) * 0.35 * m
                radius_les = les.get("radius", LESION_RADIUS_FRACTION) * m
                cond = (xx - cx) ** 2 + (yy - c) ** 2 <= radius_les ** 2
                if not cond.any() or (cond & ~disc).any():
                    raise ValueError(f"lesion {name!r}: radius {radius_les / m:g} of the matrix leaves it empty or "
                                     "outside the brain; choose a radius in (0, 0.11]")
                put(z, cond, tissue_curve(aif_fine, t_fine, cbf=les["cbf"], mtt=les["mtt"]),
                    cbf=les["cbf"], mtt=les["mtt"])
                masks[name][:, :, z] = cond
                masks["nawm"][:, :, z] &= ~_dilate2d(cond, 2)
        else:  # the leaky slice
            off = LEAKY_OFFSET_FRACTION * m
            centres = [(c - off, c - off), (c - off, c + off), (c + off, c - off), (c + off, c + off)]
            # one to four leaky lesions (_check_leaky_spec), one per quadrant: fewer lesions than centres
            for (cx, cy), (name, p) in zip(centres, spec.leaky_lesion_params.items(), strict=False):
                cond = (xx - cx) ** 2 + (yy - cy) ** 2 <= (LEAKY_RADIUS_FRACTION * m) ** 2
                vascular, _, factor = leaky_curves[name]
                curves[cond, z] = vascular
                leak[cond, z] = factor
                truth["cbf"][cond, z] = p["cbf"]
                truth["mtt"][cond, z] = p["mtt"]
                truth["cbv"][cond, z] = p["cbf"] * p["mtt"] / 60.0
                truth["delay"][cond, z] = 0.0
                truth["dispersion"][cond, z] = 0.0
                truth["ktrans"][cond, z] = p["ktrans"]
                truth["ve"][cond, z] = p["ve"]
                masks[name][:, :, z] = cond
                masks["nawm"][:, :, z] &= ~_dilate2d(cond, 2)
            _check_leaky_layout(spec, masks, arteries, vein, z)
        # vessels: pure arterial 2 x 2 voxels ringed by partial-volume voxels; a vein of 3 x 2
        for ax, ay in arteries:
            core = np.zeros((m, m), bool)
            core[ax: ax + 2, ay: ay + 2] = True
            ring = _dilate2d(core, 1) & ~core
            curves[ring, z] = (spec.partial_volume_fraction * aif_fine[sample]
                               + (1 - spec.partial_volume_fraction) * curves[ring, z])
            curves[core, z] = aif_fine[sample]
            masks["aif"][:, :, z] |= core
            masks["nawm"][:, :, z] &= ~_dilate2d(core, 3)
            for key in truth:
                truth[key][core | ring, z] = np.nan
        vcore = np.zeros((m, m), bool)
        vcore[vein[0]: vein[0] + 3, vein[1]: vein[1] + 2] = True
        vof = _disperse(_shift(aif_fine, spec.vein_delay_s), spec.vein_dispersion_s, t_fine)
        curves[vcore, z] = vof[sample]
        masks["vein"][:, :, z] = vcore
        masks["nawm"][:, :, z] &= ~_dilate2d(vcore, 3)
        for key in truth:
            truth[key][vcore, z] = np.nan

    ideal = spec.s0 * np.exp(-spec.te * curves) * masks["brain"][..., None]
    if leaky:
        ideal *= leak
    for i, boost in enumerate(spec.steady_state_boost):
        ideal[..., i] *= boost
    sigma = spec.s0 / spec.snr
    if not leaky:
        noisy = np.hypot(ideal + sigma * rng.standard_normal(ideal.shape), sigma * rng.standard_normal(ideal.shape))
    else:
        # the first slices draw the same noise as without the leaky slice, which draws after them
        base = (m, m, nz - 1, spec.n_frames)
        extra = (m, m, 1, spec.n_frames)
        re_base, im_base = rng.standard_normal(base), rng.standard_normal(base)
        re_extra, im_extra = rng.standard_normal(extra), rng.standard_normal(extra)
        noisy = np.hypot(ideal + sigma * np.concatenate([re_base, re_extra], axis=2),
                         sigma * np.concatenate([im_base, im_extra], axis=2))
    signal = np.clip(np.round(noisy), 0, np.iinfo(np.int16).max).astype(np.int16)

    # the plain phantom's affine whatever the leaky slice: slices 0-4 lie at the same world positions in
    # both phantoms, the leaky slice one slice above (issue 21: the two can be compared voxel by voxel)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = [-m, -m, -2.0 * (nz - int(leaky))]
    return Phantom(signal=signal, affine=affine, masks=masks, truth=truth, blocks=blocks,
                   aif=aif_fine[sample], spec=spec)


def _check_leaky_layout(spec: PhantomSpec, masks: dict, arteries: list, vein: tuple, z: int) -> None:
    """Raise if a leaky lesion leaves the brain or comes within LEAKY_MIN_GAP_VOXELS of a vessel
    (core or partial-volume ring) or of another leaky lesion (a matrix too small for the layout)."""
    m = spec.matrix
    vessels = np.zeros((m, m), bool)
    for ax, ay in arteries:
        vessels[ax: ax + 2, ay: ay + 2] = True
    vessels = _dilate2d(vessels, 1)  # the partial-volume ring
    vessels[vein[0]: vein[0] + 3, vein[1]: vein[1] + 2] = True
    names = list(spec.leaky_lesion_params)
    for i, name in enumerate(names):
        cond = masks[name][:, :, z]
        near = _dilate2d(cond, LEAKY_MIN_GAP_VOXELS)
        others = [masks[o][:, :, z] for o in names[i + 1:]]
        if (not cond.any() or (cond & ~masks["brain"][:, :, z]).any() or (near & vessels).any()
                or any((near & o).any() for o in others)):
            raise ValueError(f"matrix {m} is too small for the leaky slice: lesion {name!r} is empty, leaves the "
                             f"brain or lies within {LEAKY_MIN_GAP_VOXELS} voxels of a vessel or another lesion")


def _dilate2d(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dx in range(-r, r + 1):
        for dy in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dx, 0), dy, 1)
    return out


def _json_number(x: float) -> int | float:
    """An integral float as an int (the sidecar has always said "FlipAngle": 60)."""
    return int(x) if float(x).is_integer() else float(x)


def write_phantom(ph: Phantom, out: Path, *, prefix: str = "sub-phantom") -> dict[str, Path]:
    """Write the phantom as a BIDS-like case folder: the series, its sidecar, masks, truth maps and
    ``truth.json``. Returns the written paths by role.

    Long because it is a list of files written in turn, one statement each."""
    from perfusion import __version__
    from perfusion.io import write_json, write_map, write_nifti

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    series = out / f"{prefix}_dsc.nii.gz"
    write_nifti(series, ph.signal, ph.affine, description="perfusion phantom DSC", tr=ph.spec.tr, dtype=np.int16)
    write_json(out / f"{prefix}_dsc.json", {
        "EchoTime": ph.spec.te, "RepetitionTime": ph.spec.tr, "FlipAngle": _json_number(ph.spec.flip_angle),
        "MagneticFieldStrength": 3,
        "Manufacturer": "perfusion phantom", "ContrastBolusIngredient": "GADOLINIUM",
    })
    paths["dsc"] = series
    names = {"brain": "mask-brain", "aif": "mask-aif", "nawm": "mask-reference", "vein": "mask-vein"}
    for key, mask in ph.masks.items():
        if key == "sweep":
            continue
        name = names.get(key, f"roi-{key}")
        p = out / f"{name}.nii.gz"
        write_nifti(p, mask.astype(np.uint8), ph.affine, description=name, dtype=np.uint8)
        paths[key] = p
    units = {"cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "delay": "s", "dispersion": "s",
             "ktrans": "1/min", "ve": "mL/mL"}
    truth_dir = out / "truth"
    truth_dir.mkdir(exist_ok=True)
    for key, arr in ph.truth.items():
        paths[f"truth_{key}"] = write_map(truth_dir, key, arr, ph.affine, units=units[key],
                                          description=f"phantom ground truth {key}")
    truth_json = {
        "software": {"name": "perfusion", "version": __version__},
        "spec": ph.spec.to_json(),
        "units": {"time": "s", "cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "aif": "1/s"},
        "nawm": {"cbf": ph.spec.nawm_cbf, "mtt": ph.spec.nawm_mtt, "cbv": ph.spec.nawm_cbf * ph.spec.nawm_mtt / 60},
        "lesions": {k: {**v, "cbv": v["cbf"] * v["mtt"] / 60,
                        "rcbv": (v["cbf"] * v["mtt"]) / (ph.spec.nawm_cbf * ph.spec.nawm_mtt)}
                    for k, v in ph.spec.lesions.items()},
        "blocks": ph.blocks,
        "aif_delta_r2s": ph.aif.tolist(),
    }
    if ph.spec.leaky_lesions:
        truth_json["units"].update({"ktrans": "1/min", "ve": "mL/mL", "r2e": "1/(mM s)", "t10": "s"})
        truth_json["leaky_lesions"] = describe_leaky_lesions(ph.spec)
        truth_json["leakage_model"] = {
            "slice": int(ph.signal.shape[2]) - 1,
            "kinetics": "standard Tofts: C_e = Ktrans int Cp(u) exp(-kep (t - u)) du, kep = Ktrans / ve",
            "signal": ("S = M0 SPGR(1/T10 + r1 C_e) exp(-TE (dR2*_vascular + r2e C_e)), "
                       "M0 so that the baseline is s0"),
            "intravascular_t1_effect": "neglected",
            "r1_per_mM_s": R1_PER_MM_S,
            "r2s_blood_per_mM_s": R2S_BLOOD_PER_MM_S,
            "hct_large_vessel": HCT_LARGE_VESSEL,
            "flip_angle_deg": ph.spec.flip_angle,
            "verdict_thresholds": {"low": TRUTH_RCBV_LOW, "high": TRUTH_RCBV_HIGH},
        }
    write_json(out / "truth.json", truth_json)
    paths["truth_json"] = out / "truth.json"
    return paths
