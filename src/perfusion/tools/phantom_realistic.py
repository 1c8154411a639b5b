"""A realistic DSC phantom: a head whose physics differs from every model the analysis assumes.

``phantom.py`` builds its curves from the same models the methods use (exponential residues, one
linear relaxivity, Tofts leakage driven by the AIF, tissue that barely darkens). Defaults, gates and
the verdict rule are chosen on this phantom instead (issue 15), whose forward model departs from
them on purpose:

Contrast agent and relaxation (concentrations in mM, rates in 1/s)
- Arterial whole-blood concentration C_b(t): a gamma-variate first pass (peak ``aif_peak_mm``), a
  broader recirculation pass and a slowly decaying plateau. Plasma C_p = C_b / (1 - Hct), Hct 0.45.
- Blood delta R2* is quadratic in concentration, tissue delta R2* linear with a larger slope per
  unit of intravascular agent (Kjolby et al. 2006, MRM 56:187; Calamante et al. 2009, MRM 61:486):
  blood R2*(C) = BLOOD_R2S_LINEAR C + BLOOD_R2S_QUADRATIC C^2, the 1.5 T coefficients as commonly
  cited (7.6 and 0.574) doubled for 3 T (susceptibility effects scale with the field). The analysis
  assumes one linear relaxation for both, so its AIF is distorted (a higher, narrower peak) and its
  absolute CBV and CBF are off; rCBV is not.
- Tissue delta R2* = TISSUE_R2S_PER_MM * C_t, C_t the intravascular agent per tissue volume.
  TISSUE_R2S_PER_MM is set so that grey matter (CBV 4.5 mL/100 g) darkens by about 30 % and white
  matter (CBV 2.2) by about 15 % at the bolus peak at TE 30 ms, the drops measured in patients
  (gradient echo, single dose, 1.5-3 T; the ranges of ../shared/DOMAIN.md); ``drops()`` reports them.
- Residues are not exponential and not gamma: the transit times follow a log-normal distribution
  (mean MTT, coefficient of variation per tissue), R(t) = 1 - its CDF. Each territory sees the
  arterial curve delayed and dispersed (a gamma-shaped vascular transport function, shape 2).
- Leakage: the agent crosses the capillary wall from the *capillary* plasma concentration (the
  tissue's own intravascular curve over its blood volume: delayed and dispersed, unlike the AIF the
  residue-domain correction assumes and unlike the brain-mean curve BSW assumes), with Ktrans and
  back-flux kep = Ktrans / ve: dC_e/dt = Ktrans C_cap - kep C_e.
- Signal S = M0 SPGR(R1(t)) exp(-TE (delta R2*_vascular + r2e C_e)) with
  SPGR(R1) = sin(a)(1 - E1)/(1 - cos(a) E1), E1 = exp(-TR R1), R1 = 1/T10 + r1 C_e. r1 = 4.97
  1/(mM s) (gadobutrol in plasma at 3 T, Szomolanyi 2019). r2e, the leaked agent's T2* relaxivity,
  is a tissue property (Semmineh et al. 2014): small in T1-dominant lesions, large in densely
  cellular T2*-dominant ones.
- Protocols (Boxerman et al. 2020 consensus, Neuro-Oncology 22:1262): flip 60 degrees with a full
  preload, flip 30 degrees without, and flip 60 without a preload (the worst case, common in
  practice). A preload leaves agent in plasma (PRELOAD_PLASMA_MM) and, at equilibrium, ve times that in
  the lesions' extravascular space before the bolus: their T1 is already short, so the bolus's T1
  effect is several times smaller.
- Rician noise of SD (white-matter S0) / ``snr``; stored as float32 (no rounding).
- Multi-echo (``echo_times``, two or more TEs): every echo is the same model at its own TE, so a
  voxel-frame's T1 (SPGR) factor is shared by all echoes and each echo carries exp(-TE R2*(t)), R2*(t)
  = blood (quadratic) or tissue (linear) intravascular delta R2* + r2e C_e, on top of the voxel's
  baseline R2* (BASELINE_R2S_PER_S: it makes the echoes differ in brightness, never in delta R2*). The
  S0 values above are those of an echo at ``te`` (0.03 s, as the single-echo series): an echo at TE
  has S0 exp(-(TE - te) R2*_0). The noise SD is the single-echo one, (white-matter S0 at ``te``) /
  ``snr``, the same for every echo (one receiver bandwidth) and drawn independently per echo: the SNR
  is defined as today, and an echo at ``te`` is today's series (equal to float32 precision without
  noise). Stored as one series per echo, ``echo_signals``; ``signal`` is the longest echo.

Head (matrix x matrix x N_SLICES, 2.4 x 2.4 x 5 mm, RAS affine: voxel x grows to the patient's right)
- Brain: an ellipse with a cortical grey-matter ribbon, white matter, two ventricles (CSF, no
  contrast); a skull gap (no signal) and an enhancing scalp around it; two orbits (bright, no
  perfusion) in front of the brain on the lowest slice.
- Vessels: a middle cerebral artery in each hemisphere (2 x 2 pure arterial voxels ringed by
  voxels holding ``partial_volume_fraction`` of artery, the signals added as magnetisation) and the
  sagittal sinus at the back of the midline (late, dispersed, partial-volume ring).
- Lesions, all in the patient's left hemisphere (low x), each ringed by a band of treated,
  low-CBV white matter (TREATED_RCBV of the NAWM, TREATED_BAND_VOXELS wide); ``LESIONS`` lists
  them: recurrence and treatment effect with T1- and T2*-dominant leakage, an indeterminate one, a
  mixed lesion whose voxels hold varying fractions of recurrence-like and treatment-like tissue (a
  smooth random field per seed), a recurrence around a necrotic core, a treatment-effect lesion with
  a vessel running through it.
- ``delayed_territory``: the left MCA territory of the upper slices arrives 4 s late and dispersed
  (mean transit of the transport function 3 s), as behind a stenosis; no lesion there.
- ``lesions=()`` gives a brain without leakage (the scalp still enhances, outside the brain).

Truth: cbv (mL/100 g), cbf (mL/100 g/min), mtt (s), rcbv (against the NAWM's CBV), ktrans (1/min),
delay (s) maps; masks brain, head, gm, wm, nawm (white matter outside the treated bands),
csf, aif (pure arterial voxels), vein, treated, and one per lesion; per lesion its truth (median
and FTB of the voxels' true rCBV, leakage type, the verdicts a correct analysis may give).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import fftconvolve
from scipy.special import erfc

from perfusion.tools.phantom import Phantom, spgr_signal

#: Fine time step of the forward model, s.
DT_S = 0.05
#: Haematocrit of large vessels (plasma fraction of arterial blood 1 - HCT).
HCT = 0.45
#: Blood delta R2* = a C + b C^2 (1/s, C whole-blood mM): Kjolby 2006's 1.5 T fit as commonly cited
#: (7.6, 0.574), doubled for 3 T.
BLOOD_R2S_LINEAR = 15.2
BLOOD_R2S_QUADRATIC = 1.148
#: Tissue delta R2* per mM of intravascular agent per tissue volume (1/(mM s)); see module docstring
#: (calibrated to a 30 % grey-matter drop at TE 30 ms; ``drops()``).
TISSUE_R2S_PER_MM = 66.0
#: T1 relaxivity of the leaked agent, 1/(mM s) (gadobutrol, plasma, 3 T: Szomolanyi 2019).
R1_PER_MM_S = 4.97
#: Plasma concentration left by a full-dose preload when the bolus is given (mM; 0.1 mmol/kg in about
#: 15 L of extracellular fluid some minutes before).
PRELOAD_PLASMA_MM = 0.45
#: Baseline (pre-contrast) R2* of the multi-echo series, 1/s: brain tissue, lesions, blood and scalp
#: 22 (T2* 45 ms), a round value of the order measured in cortical grey and white matter at 3 T (T2*
#: about 40-55 ms); CSF and the orbits' vitreous 5 (T2* 200 ms, long as fluids are). It sets how much
#: brighter a short echo is and cancels in S/S0 of each echo: no delta R2* depends on it.
BASELINE_R2S_PER_S = {"tissue": 22.0, "fluid": 5.0}
#: Echo times of ``perfusion phantom --realistic --echoes 2`` (s): TE2 30 ms, the single-echo default
#: and the second echo of the real dual-echo curves in shared/reference-data (OSIPI LCB-BNI: 2 and 30
#: ms, a spiral readout); TE1 8 ms, where the first echo of a dual-echo EPI readout can sit (an EPI echo
#: train needs several ms before its first echo, a spiral 2 ms). More echoes: evenly spaced between them.
DEFAULT_ECHO_TIMES = (0.008, 0.030)
#: Most echoes a phantom may have (memory: one float64 copy of the head per echo).
MAX_ECHOES = 8
#: Brain density g/mL (CBV mL/100 g -> volume fraction).
RHO = 1.04
#: Treated white matter around the lesions: CBV as a fraction of the NAWM's, and the band's width.
TREATED_RCBV = 0.6
TREATED_BAND_VOXELS = 3
#: Verdict thresholds of the truth (Hu 2012, Iv 2019), defined here so the truth does not depend on
#: the code it checks.
TRUTH_LOW, TRUTH_HIGH = 1.0, 1.75
#: A lesion counts as mixed in truth when this fraction of its voxels has a true rCBV above
#: TRUTH_HIGH (then "likely_treatment_effect" is a wrong verdict for it).
TRUTH_MIXED_FRACTION = 0.25

#: Protocols: flip angle (degrees) and preload.
PROTOCOLS = {
    "flip60_no_preload": {"flip_angle": 60.0, "preload": False},
    "flip60_preload": {"flip_angle": 60.0, "preload": True},
    "flip30_no_preload": {"flip_angle": 30.0, "preload": False},
}

#: Normal tissues: CBV mL/100 g, MTT s, transit-time coefficient of variation, baseline signal, T10 s.
TISSUES = {
    "wm": {"cbv": 2.2, "mtt": 5.5, "cv": 0.8, "s0": 1000.0, "t10": 1.1},
    "gm": {"cbv": 4.5, "mtt": 4.5, "cv": 0.6, "s0": 1150.0, "t10": 1.6},
    "treated": {"cbv": 2.2 * TREATED_RCBV, "mtt": 6.5, "cv": 0.9, "s0": 1100.0, "t10": 1.4},
    "scalp": {"cbv": 3.0, "mtt": 6.0, "cv": 1.0, "s0": 800.0, "t10": 1.0, "ktrans": 0.15, "ve": 0.2, "r2e": 20.0},
}

_REC = {"cbv": 7.0, "mtt": 5.0, "cv": 1.0, "ktrans": 0.12, "ve": 0.3, "r2e": 10.0}
_TRT = {"cbv": 1.5, "mtt": 7.0, "cv": 0.8, "ktrans": 0.06, "ve": 0.45, "r2e": 10.0}

#: The lesions, (slice, anterior or posterior) and kind: CBV mL/100 g, MTT s, transit-time CV,
#: Ktrans 1/min, ve, r2e 1/(mM s), T10 s, radius in voxels; mixed / necrotic / vessel add their parts.
#: Ktrans 0.02-0.15 /min and ve 0.2-0.5: enhancing glioblastoma and radiation necrosis (DCE,
#: Skinner 2016 AJNR 37:80 about 0.1 /min; ranges in ../shared/DOMAIN.md).
LESIONS: dict[str, dict[str, Any]] = {
    "recurrence_t1": {"slice": 1, "pos": "anterior", **_REC, "t10": 1.6, "radius": 6},
    "treatment_t1": {"slice": 1, "pos": "posterior", **_TRT, "t10": 1.7, "radius": 6},
    "treatment_t2s": {"slice": 2, "pos": "anterior", "cbv": 1.8, "mtt": 6.0, "cv": 0.8, "ktrans": 0.06, "ve": 0.2,
                      "r2e": 80.0, "t10": 1.5, "radius": 6},
    "mixed": {"slice": 2, "pos": "posterior", "kind": "mixed", "parts": (_REC, _TRT), "t10": 1.6, "radius": 7},
    "recurrence_necrotic": {"slice": 3, "pos": "anterior", "kind": "necrotic", **_REC, "t10": 1.6, "radius": 7,
                            "core": {"cbv": 0.6, "mtt": 8.0, "cv": 1.0, "ktrans": 0.02, "ve": 0.5, "r2e": 20.0,
                                     "radius": 3}},
    "treatment_vessel": {"slice": 3, "pos": "posterior", "kind": "vessel", **_TRT, "t10": 1.7, "radius": 6,
                         "vessel": {"cbv": 25.0, "mtt": 3.0, "cv": 0.5, "ktrans": 0.0, "ve": 0.3, "r2e": 20.0}},
    "indeterminate": {"slice": 4, "pos": "anterior", "cbv": 3.1, "mtt": 5.5, "cv": 0.9, "ktrans": 0.05, "ve": 0.3,
                      "r2e": 40.0, "t10": 1.6, "radius": 6},
}
N_SLICES = 6


@dataclass(frozen=True)
class RealisticSpec:
    """Settings of the realistic phantom; times in s, TE in s, concentrations in mM."""

    protocol: str = "flip60_no_preload"
    snr: float = 50.0  # white-matter baseline signal / noise SD
    seed: int = 0
    tr: float = 1.5
    te: float = 0.03
    n_frames: int = 60
    matrix: int = 96
    voxel_mm: tuple[float, float, float] = (2.4, 2.4, 5.0)
    aif_t0: float = 15.0
    aif_peak_mm: float = 5.0
    partial_volume_fraction: float = 0.3
    lesions: tuple[str, ...] = tuple(LESIONS)
    delayed_territory: bool = False
    steady_state_boost: tuple[float, ...] = (1.15, 1.03)
    echo_times: tuple[float, ...] = ()  # s, increasing; empty: one echo at ``te``

    @property
    def tes(self) -> tuple[float, ...]:
        """The echo times (s) of the series written: ``echo_times``, else (``te``,)."""
        return tuple(float(x) for x in self.echo_times) or (float(self.te),)

    def check(self) -> RealisticSpec:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if abs(self.tr / DT_S - round(self.tr / DT_S)) > 1e-9:
            raise ValueError(f"TR must be a multiple of {DT_S} s")
        unknown = set(self.lesions) - set(LESIONS)
        if unknown:
            raise ValueError(f"unknown lesions {sorted(unknown)}; choose from {', '.join(LESIONS)}")
        if self.matrix < 64:
            raise ValueError("the realistic head needs a matrix of at least 64")
        if self.echo_times:
            from perfusion.quantify.echoes import MIN_ECHO_GAP_S
            from perfusion.units import MAX_TE_S

            tes = [float(x) for x in self.echo_times]
            text = ",".join(f"{x:g}" for x in tes)
            if not 2 <= len(tes) <= MAX_ECHOES:
                raise ValueError(f"echo times {text}: give 2 to {MAX_ECHOES} echoes (one echo: set te)")
            if not all(np.isfinite(x) and 0 < x <= MAX_TE_S for x in tes):
                raise ValueError(f"echo times {text}: each must be in (0, {MAX_TE_S:g}] s")
            if any(b - a < MIN_ECHO_GAP_S for a, b in pairwise(tes)):
                raise ValueError(f"echo times {text}: must increase, each at least {MIN_ECHO_GAP_S * 1000:g} ms "
                                 "after the one before")
        return self


# ----------------------------------------------------------------------------------- curves


def _gamma(t, t0, alpha, beta):
    x = np.clip(t - t0, 0.0, None)
    return np.where(t > t0, x ** alpha * np.exp(-x / beta), 0.0)


def arterial_concentration(t: np.ndarray, spec: RealisticSpec) -> np.ndarray:
    """Arterial whole-blood concentration (mM) of the bolus at times t (s), preload excluded."""
    first = _gamma(t, spec.aif_t0, 3.0, 1.5)
    first *= spec.aif_peak_mm / first.max()
    recirc = _gamma(t, spec.aif_t0 + 9.0, 2.5, 3.5)
    recirc *= 0.15 * first.sum() / recirc.sum()
    x = np.clip(t - spec.aif_t0, 0.0, None)
    plateau = 0.07 * spec.aif_peak_mm * (1 - np.exp(-x / 8.0)) * np.exp(-x / 400.0)
    return first + recirc + np.where(t > spec.aif_t0, plateau, 0.0)


def blood_r2s(c_blood: np.ndarray, *, c_pre: float = 0.0) -> np.ndarray:
    """Blood delta R2* (1/s) of the bolus concentration (mM) on top of a preload concentration."""
    def g(c):
        return BLOOD_R2S_LINEAR * c + BLOOD_R2S_QUADRATIC * c ** 2
    return g(c_pre + np.asarray(c_blood)) - g(c_pre)


def lognormal_residue(t: np.ndarray, *, mtt: float, cv: float) -> np.ndarray:
    """R(t) = 1 - CDF of a log-normal transit-time distribution of mean ``mtt`` (s) and coefficient
    of variation ``cv``; R(0) = 1."""
    s2 = np.log1p(cv ** 2)
    mu = np.log(mtt) - s2 / 2
    with np.errstate(divide="ignore"):
        z = (np.log(np.where(t > 0, t, 1e-12)) - mu) / np.sqrt(2 * s2)
    return np.where(t > 0, 0.5 * erfc(z), 1.0)


def _transport(curve: np.ndarray, t: np.ndarray, *, delay: float, dispersion: float) -> np.ndarray:
    """The curve delayed by ``delay`` s and convolved with a unit-area gamma kernel (shape 2) of mean
    ``dispersion`` s (none at 0)."""
    n = int(round(delay / DT_S))
    out = np.zeros_like(curve)
    out[n:] = curve[: curve.size - n] if n else curve
    if dispersion > 0:
        k = t * np.exp(-2.0 * t / dispersion)
        out = fftconvolve(out, k / k.sum())[: curve.size]
    return out


def vascular_concentration(c_art: np.ndarray, t: np.ndarray, *, cbv: float, mtt: float, cv: float,
                           delay: float = 0.0, dispersion: float = 0.0) -> np.ndarray:
    """Intravascular agent per tissue volume (mM) of a tissue of CBV (mL/100 g), MTT (s): flow times
    the transported arterial curve convolved with the log-normal residue; its area is CBV_fraction
    times the arterial area."""
    local = _transport(c_art, t, delay=delay, dispersion=dispersion)
    r = lognormal_residue(t, mtt=mtt, cv=cv)
    r[0] *= 0.5
    flow = cbv * RHO / 100.0 / mtt  # 1/s
    return flow * fftconvolve(local, r)[: t.size] * DT_S


def extravascular_concentration(c_vasc: np.ndarray, t: np.ndarray, *, cbv: float, ktrans_per_min: float,
                                ve: float) -> np.ndarray:
    """Leaked agent per tissue volume (mM): dC_e/dt = Ktrans C_cap - kep C_e, C_cap the capillary
    plasma concentration (c_vasc / CBV fraction / (1 - Hct)), kep = Ktrans / ve."""
    if ktrans_per_min <= 0:
        return np.zeros_like(c_vasc)
    kt = ktrans_per_min / 60.0
    c_cap = c_vasc / (cbv * RHO / 100.0) / (1.0 - HCT)
    k = np.exp(-(kt / ve) * t)
    k[0] *= 0.5
    return kt * fftconvolve(c_cap, k)[: t.size] * DT_S


def _tissue_relaxation(params: dict, c_art, t, spec: RealisticSpec, *, delay=0.0, dispersion=0.0):
    """On the fine grid t: the tissue's intravascular delta R2* (1/s), the leaked agent's delta R2*
    (r2e C_e, 1/s) and its T1 factor SPGR(R1(t)) / SPGR(R1 before the bolus) (1 without leakage)."""
    proto = PROTOCOLS[spec.protocol]
    c_v = vascular_concentration(c_art, t, cbv=params["cbv"], mtt=params["mtt"], cv=params["cv"], delay=delay,
                                 dispersion=dispersion)
    r2s = TISSUE_R2S_PER_MM * c_v
    kt, ve = params.get("ktrans", 0.0), params.get("ve", 0.3)
    if kt <= 0:
        return r2s, np.zeros_like(r2s), np.ones_like(r2s)
    c_e = extravascular_concentration(c_v, t, cbv=params["cbv"], ktrans_per_min=kt, ve=ve)
    t10 = params.get("t10", 1.5)
    c_pre = ve * PRELOAD_PLASMA_MM if proto["preload"] else 0.0
    r1_base = 1.0 / t10 + R1_PER_MM_S * c_pre
    sp = spgr_signal(r1_base + R1_PER_MM_S * c_e, tr=spec.tr, flip_angle=proto["flip_angle"])
    sp0 = spgr_signal(np.array([r1_base]), tr=spec.tr, flip_angle=proto["flip_angle"])[0]
    return r2s, params.get("r2e", 20.0) * c_e, sp / sp0


def _tissue_signal_factor(params: dict, c_art, t, sample, spec: RealisticSpec, *, delay=0.0, dispersion=0.0,
                          tes=None):
    """S(t)/S0 of a tissue (sampled at TR) and its intravascular delta R2* (1/s). S/S0 is (n_frames,)
    at ``spec.te``, or (n_echoes, n_frames) at each TE of ``tes`` (s): T1 factor times
    exp(-TE (intravascular + extravascular delta R2*))."""
    r2s, r2s_leak, t1 = _tissue_relaxation(params, c_art, t, spec, delay=delay, dispersion=dispersion)
    te = np.atleast_1d(np.asarray(spec.te if tes is None else tes, dtype=np.float64))[:, None]
    factor = np.exp(-te * r2s)
    if params.get("ktrans", 0.0) > 0:
        factor = factor * t1 * np.exp(-te * r2s_leak)
    factor = factor[:, sample]
    return (factor[0] if tes is None else factor), r2s[sample]


def tissue_delta_r2s(params: dict, spec: RealisticSpec) -> tuple[np.ndarray, np.ndarray]:
    """The true curves of a tissue or lesion (``TISSUES`` / ``LESIONS`` entry) at the frames: its
    delta R2* (1/s; intravascular plus the leaked agent's T2* term, what a T1-free multi-echo
    measurement gives) and its T1 factor SPGR(R1(t)) / SPGR(R1_0), shared by every echo. The frames'
    times are ``arange(n_frames) * tr`` s."""
    spec.check()
    t, sample = _grid(spec)
    r2s, r2s_leak, t1 = _tissue_relaxation(params, arterial_concentration(t, spec), t, spec)
    return (r2s + r2s_leak)[sample], t1[sample]


def drops(spec: RealisticSpec = RealisticSpec()) -> dict[str, float]:
    """Noise-free signal drop at the bolus peak (fraction of S0) of grey and white matter and of a
    pure arterial voxel: the calibration of TISSUE_R2S_PER_MM."""
    t, sample = _grid(spec)
    c_art = arterial_concentration(t, spec)
    out = {k: float(1 - _tissue_signal_factor(TISSUES[k], c_art, t, sample, spec)[0].min()) for k in ("gm", "wm")}
    out["artery"] = float(1 - np.exp(-spec.te * blood_r2s(c_art)).min())
    return out


def _grid(spec: RealisticSpec):
    t = np.arange(0.0, spec.n_frames * spec.tr + 60.0, DT_S)
    step = int(round(spec.tr / DT_S))
    return t, np.arange(spec.n_frames) * step


def expected_verdicts(rcbv_values: np.ndarray) -> tuple[str, ...]:
    """Verdicts a correct analysis may give a lesion whose voxels have these true rCBVs: the band
    of their median; a mixed lesion (at least TRUTH_MIXED_FRACTION of its voxels above TRUTH_HIGH and
    as many below TRUTH_LOW) may be recurrence or indeterminate, never treatment effect."""
    r = np.asarray(rcbv_values, dtype=np.float64)
    med = float(np.median(r))
    if np.mean(r > TRUTH_HIGH) >= TRUTH_MIXED_FRACTION and np.mean(r < TRUTH_LOW) >= TRUTH_MIXED_FRACTION:
        return ("likely_recurrence", "indeterminate", "possible_recurrence_or_pseudoprogression")
    if med > TRUTH_HIGH:
        return ("likely_recurrence", "possible_recurrence_or_pseudoprogression")
    if med < TRUTH_LOW:
        return ("likely_treatment_effect",)
    return ("indeterminate",)


# ----------------------------------------------------------------------------------- the head


@dataclass(frozen=True)
class RealisticPhantom(Phantom[RealisticSpec]):
    """A ``phantom.Phantom`` with each lesion's truth: true median / mean rCBV, FTB high / low,
    voxels, kind, leakage type ('T1', 'T2*', 'none') and the verdicts a correct analysis may give;
    ``echo_signals`` one float32 (x, y, z, t) series per TE of ``spec.tes`` (``signal`` is the last)."""

    lesions: dict[str, dict[str, Any]]
    echo_signals: tuple[np.ndarray, ...] = ()


def make_realistic_phantom(spec: RealisticSpec = RealisticSpec()) -> RealisticPhantom:
    """Build the realistic head phantom (module docstring). Returns a ``phantom.Phantom``: signal
    float32 (x, y, z, t), RAS affine, masks, truth maps, ``blocks`` empty, ``aif`` the noise-free
    delta R2* (1/s) of a pure arterial voxel, ``spec`` this RealisticSpec; the lesions' truth in
    ``ph.lesions``.

    Long because it is one recipe read top to bottom (anatomy, vessels, lesions, curves, echoes, noise)
    over arrays every step writes into; each step is a commented block, and the physics lives in the
    small functions it calls."""
    from scipy import ndimage

    spec.check()
    rng = np.random.default_rng(spec.seed)
    m, nz = spec.matrix, N_SLICES
    t, sample = _grid(spec)
    c_art = arterial_concentration(t, spec)
    tes = np.asarray(spec.tes)
    n_echo = tes.size
    proto = PROTOCOLS[spec.protocol]
    c_pre_blood = PRELOAD_PLASMA_MM * (1 - HCT) if proto["preload"] else 0.0
    n_t = spec.n_frames

    xx, yy = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    cx, cy = (m - 1) / 2.0, (m - 1) / 2.0 + 0.02 * m  # y: anterior grows; brain a little anterior
    ax_, ay_ = 0.30 * m, 0.37 * m  # brain semi-axes (x: left-right, y: posterior-anterior)
    ell = ((xx - cx) / ax_) ** 2 + ((yy - cy) / ay_) ** 2
    brain2d = ell <= 1.0
    gm2d = brain2d & (ell > 0.80)
    skull2d = (ell > 1.0) & (((xx - cx) / (ax_ + 3)) ** 2 + ((yy - cy) / (ay_ + 3)) ** 2 <= 1.0)
    scalp2d = (~brain2d & ~skull2d) & (((xx - cx) / (ax_ + 6)) ** 2 + ((yy - cy) / (ay_ + 6)) ** 2 <= 1.0)
    vent = np.zeros((m, m), bool)
    for sx in (-1, 1):
        vent |= ((xx - (cx + sx * 0.06 * m)) / (0.03 * m)) ** 2 + ((yy - cy) / (0.12 * m)) ** 2 <= 1.0

    shape = (m, m, nz)
    factor = np.ones((n_echo,) + shape + (n_t,), np.float64)  # S(t)/S0 per echo and voxel
    s0 = np.zeros(shape)
    keys = ("cbv", "cbf", "mtt", "rcbv", "ktrans", "delay")
    truth = {k: np.full(shape, np.nan, np.float32) for k in keys}
    names = ("brain", "head", "gm", "wm", "nawm", "csf", "aif", "vein", "treated", "orbit")
    masks = {k: np.zeros(shape, bool) for k in names}
    masks.update({n: np.zeros(shape, bool) for n in spec.lesions})
    nawm_cbv = TISSUES["wm"]["cbv"]
    cache: dict = {}

    def curve(params: dict, delay=0.0, dispersion=0.0):
        key = (tuple(sorted((k, v) for k, v in params.items() if not isinstance(v, (dict, tuple)))), delay, dispersion)
        if key not in cache:
            cache[key] = _tissue_signal_factor(params, c_art, t, sample, spec, delay=delay, dispersion=dispersion,
                                               tes=tes)
        return cache[key]

    def put(z, cond, params, s0_value, *, delay=0.0, dispersion=0.0, weight=None):
        f, _ = curve(params, delay, dispersion)
        if weight is None:
            factor[:, cond, z] = f[:, None, :]
        else:  # a mixture: S/S0 of parts add by volume (linear in the magnetisation)
            factor[:, cond, z] += weight[cond][None, :, None] * (f[:, None, :] - 1.0)
        s0[cond, z] = s0_value

    def set_truth(z, cond, cbv, mtt, ktrans=0.0, delay=0.0):
        truth["cbv"][cond, z] = cbv
        truth["mtt"][cond, z] = mtt
        truth["cbf"][cond, z] = cbv / mtt * 60.0
        truth["rcbv"][cond, z] = cbv / nawm_cbv
        truth["ktrans"][cond, z] = ktrans
        truth["delay"][cond, z] = delay

    lesion_side = xx < cx  # the patient's left: low x (RAS: x grows to the patient's right)
    lesion_truth: dict[str, dict] = {}
    for z in range(nz):
        brain = brain2d & ~vent
        masks["brain"][:, :, z] = brain2d
        masks["head"][:, :, z] = brain2d | skull2d | scalp2d
        masks["csf"][:, :, z] = vent
        masks["gm"][:, :, z] = gm2d
        wm = brain & ~gm2d
        masks["wm"][:, :, z] = wm
        delayed = spec.delayed_territory and z >= 4
        territory = lesion_side & brain if delayed else np.zeros((m, m), bool)
        d, disp = (4.0, 3.0) if delayed else (0.0, 0.0)
        for cond, tissue in ((wm & ~territory, "wm"), (gm2d & ~territory, "gm")):
            put(z, cond, TISSUES[tissue], TISSUES[tissue]["s0"])
            set_truth(z, cond, TISSUES[tissue]["cbv"], TISSUES[tissue]["mtt"])
        if territory.any():
            for cond, tissue in ((wm & territory, "wm"), (gm2d & territory, "gm")):
                put(z, cond, TISSUES[tissue], TISSUES[tissue]["s0"], delay=d, dispersion=disp)
                set_truth(z, cond, TISSUES[tissue]["cbv"], TISSUES[tissue]["mtt"], delay=d)
        s0[vent, z] = 1800.0  # CSF: bright, no contrast
        put(z, scalp2d, TISSUES["scalp"], TISSUES["scalp"]["s0"], delay=0.5)
        if z == 0:  # orbits in front of the brain: bright vitreous, no perfusion
            for sx in (-1, 1):
                orb = ((xx - (cx + sx * 0.12 * m)) ** 2 + (yy - (cy + ay_ + 4)) ** 2 <= (0.05 * m) ** 2) & ~brain2d
                s0[orb, z] = 1600.0
                factor[:, orb, z] = 1.0
                masks["orbit"][:, :, z] |= orb
                masks["head"][:, :, z] |= orb
        # lesions on this slice, each with its treated band
        for name in spec.lesions:
            les = LESIONS[name]
            if les["slice"] != z:
                continue
            lx = cx - 0.15 * m
            ly = cy + (0.16 if les["pos"] == "anterior" else -0.16) * m
            r2 = (xx - lx) ** 2 + (yy - ly) ** 2
            cond = r2 <= les["radius"] ** 2
            band = (r2 <= (les["radius"] + TREATED_BAND_VOXELS) ** 2) & ~cond & brain & ~gm2d
            put(z, band, TISSUES["treated"], TISSUES["treated"]["s0"])
            set_truth(z, band, TISSUES["treated"]["cbv"], TISSUES["treated"]["mtt"])
            masks["treated"][:, :, z] |= band
            masks[name][:, :, z] = cond
            kind = les.get("kind", "plain")
            s0_les = 1200.0
            if kind == "mixed":
                rec, trt = les["parts"]
                frac = ndimage.gaussian_filter(rng.standard_normal((m, m)), 2.0)
                frac = frac[cond]
                frac = (frac - frac.mean()) / frac.std()
                w = np.zeros((m, m))
                # about 45 % of the voxels mostly recurrence (rCBV above 3), most others mostly treatment
                # effect, a few in between: a steep logistic of a smooth random field
                w[cond] = 1.0 / (1.0 + np.exp(-8.0 * (frac - 0.3)))
                s0[cond, z] = s0_les
                factor[:, cond, z] = 1.0
                for part, wt in ((rec, w), (trt, 1.0 - w)):
                    put(z, cond, {**part, "t10": les["t10"]}, s0_les, weight=wt)
                cbv_v = w * rec["cbv"] + (1 - w) * trt["cbv"]
                flow_v = w * rec["cbv"] / rec["mtt"] + (1 - w) * trt["cbv"] / trt["mtt"]
                truth["cbv"][cond, z] = cbv_v[cond]
                truth["cbf"][cond, z] = 60.0 * flow_v[cond]
                truth["mtt"][cond, z] = cbv_v[cond] / flow_v[cond]
                truth["rcbv"][cond, z] = cbv_v[cond] / nawm_cbv
                truth["ktrans"][cond, z] = (w * rec["ktrans"] + (1 - w) * trt["ktrans"])[cond]
                truth["delay"][cond, z] = 0.0
            else:
                put(z, cond, les, s0_les)
                set_truth(z, cond, les["cbv"], les["mtt"], les["ktrans"])
                if kind == "necrotic":
                    core = r2 <= les["core"]["radius"] ** 2
                    put(z, core, {**les["core"], "t10": 2.2}, 1400.0)
                    set_truth(z, core, les["core"]["cbv"], les["core"]["mtt"], les["core"]["ktrans"])
                elif kind == "vessel":  # a vein crossing the lesion, one voxel wide
                    line = cond & (np.abs((xx - lx) - 0.5 * (yy - ly)) < 0.5) & (yy > ly)
                    put(z, line, {**les["vessel"], "t10": 1.7}, s0_les)
                    set_truth(z, line, les["vessel"]["cbv"], les["vessel"]["mtt"], 0.0)
            r_true = truth["rcbv"][cond, z].astype(np.float64)
            lesion_truth[name] = {
                "rcbv_median": float(np.median(r_true)), "rcbv_mean": float(np.mean(r_true)),
                "ftb_high": float(np.mean(r_true > TRUTH_HIGH)), "ftb_low": float(np.mean(r_true < TRUTH_LOW)),
                "n_voxels": int(cond.sum()), "kind": kind, "expected_verdicts": list(expected_verdicts(r_true)),
                "leakage": _leakage_kind(les, spec),
            }
        # vessels: an MCA per hemisphere and the sagittal sinus
        c_b_art = blood_r2s(c_art, c_pre=c_pre_blood)
        art_factor = np.exp(-tes[:, None] * c_b_art)[:, sample]  # (echo, frame)
        for sx in (-1, 1):
            ax0, ay0 = int(round(cx + sx * 0.18 * m)), int(round(cy + 0.05 * m))
            core = np.zeros((m, m), bool)
            core[ax0: ax0 + 2, ay0: ay0 + 2] = True
            ring = ndimage.binary_dilation(core, np.ones((3, 3), bool)) & ~core
            pv = spec.partial_volume_fraction
            s_art = 1100.0
            # partial volume: magnetisations add (artery fraction pv of the voxel)
            mix = pv * s_art * art_factor[:, None, :] + (1 - pv) * s0[ring, z][None, :, None] * factor[:, ring, z]
            s0[ring, z] = pv * s_art + (1 - pv) * s0[ring, z]
            factor[:, ring, z] = mix / s0[ring, z][None, :, None]
            factor[:, core, z] = art_factor[:, None, :]
            s0[core, z] = s_art
            masks["aif"][:, :, z] |= core
            for key in truth:
                truth[key][core | ring, z] = np.nan
        vx, vy = int(round(cx)), int(round(cy - ay_ + 2))
        vcore = np.zeros((m, m), bool)
        vcore[vx - 1: vx + 1, vy: vy + 2] = True
        c_vein = _transport(c_art, t, delay=5.0, dispersion=3.0)
        factor[:, vcore, z] = np.exp(-tes[:, None] * blood_r2s(c_vein, c_pre=c_pre_blood))[:, sample][:, None, :]
        s0[vcore, z] = 1100.0
        masks["vein"][:, :, z] = vcore
        for key in truth:
            truth[key][vcore, z] = np.nan
    lesions_any = np.zeros(shape, bool)
    for n in spec.lesions:
        lesions_any |= masks[n]
    vessels = ndimage.binary_dilation(masks["aif"] | masks["vein"], np.ones((5, 5, 1), bool))
    masks["nawm"] = masks["wm"] & ~masks["treated"] & ~lesions_any & ~vessels & ~np.isnan(truth["delay"])
    if spec.delayed_territory:
        masks["nawm"] &= ~(truth["delay"] > 0)

    sigma = TISSUES["wm"]["s0"] / spec.snr
    r2s0 = np.where(masks["csf"] | masks["orbit"], BASELINE_R2S_PER_S["fluid"], BASELINE_R2S_PER_S["tissue"])
    signals = []
    for k, te_k in enumerate(tes):  # noise independent per echo, drawn echo by echo
        ideal = s0[..., None] * factor[k]
        if spec.echo_times:
            ideal *= np.exp(-(te_k - spec.te) * r2s0)[..., None]
        for i, boost in enumerate(spec.steady_state_boost):
            ideal[..., i] *= boost
        noisy = np.hypot(ideal + sigma * rng.standard_normal(ideal.shape), sigma * rng.standard_normal(ideal.shape))
        signals.append(noisy.astype(np.float32))
        del ideal, noisy
    vx_mm = spec.voxel_mm
    affine = np.diag([*vx_mm, 1.0])
    affine[:3, 3] = [-(m - 1) / 2 * vx_mm[0], -(m - 1) / 2 * vx_mm[1], -(nz - 1) / 2 * vx_mm[2]]
    aif = np.exp(-spec.te * blood_r2s(c_art, c_pre=c_pre_blood))[sample]
    return RealisticPhantom(signal=signals[-1], affine=affine, masks=masks, truth=truth, blocks=[],
                            aif=-np.log(aif) / spec.te, spec=spec, lesions=lesion_truth, echo_signals=tuple(signals))


def _leakage_kind(les: dict, spec: RealisticSpec) -> str:
    """'T1' or 'T2*' by the sign of the leaked agent's summed effect on ln S (as phantom.py), 'none'."""
    parts = les.get("parts") or (les,)
    if all(p.get("ktrans", 0) == 0 for p in parts):
        return "none"
    t, sample = _grid(spec)
    c_art = arterial_concentration(t, spec)
    total = 0.0
    for p in parts:
        p = {**p, "t10": les.get("t10", 1.5)}
        with_leak, _ = _tissue_signal_factor(p, c_art, t, sample, spec)
        without, _ = _tissue_signal_factor({**p, "ktrans": 0.0}, c_art, t, sample, spec)
        total += float(np.sum(np.log(with_leak) - np.log(without)))
    return "T1" if total > 0 else "T2*"


def write_realistic(ph: RealisticPhantom, out: Path, *, prefix: str = "sub-realistic") -> dict[str, Path]:
    """Write a realistic phantom as a case folder: series + sidecar, masks (mask-brain, mask-aif,
    mask-reference = the contralateral NAWM, roi-<lesion>), truth maps and truth.json. A multi-echo
    phantom writes one series and sidecar per echo, ``<prefix>_echo-<k>_dsc.nii.gz`` / ``.json`` (k = 1,
    2, ... by increasing TE, the BIDS echo entity; the sidecar's EchoTime in s), under the keys
    ``echo-<k>`` instead of ``dsc``.

    Long because it is a list of files written in turn, one statement each."""
    from perfusion import __version__
    from perfusion.io import write_json, write_map, write_nifti

    spec: RealisticSpec = ph.spec
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    multi = bool(spec.echo_times)
    signals = ph.echo_signals or (ph.signal,)
    for k, (te, sig) in enumerate(zip(spec.tes, signals, strict=True), start=1):  # one series per TE
        stem = f"{prefix}_echo-{k}_dsc" if multi else f"{prefix}_dsc"
        series = out / f"{stem}.nii.gz"
        write_nifti(series, sig, ph.affine, description="perfusion realistic phantom DSC", tr=spec.tr)
        sidecar = {"EchoTime": te, "RepetitionTime": spec.tr, "FlipAngle": PROTOCOLS[spec.protocol]["flip_angle"],
                   "MagneticFieldStrength": 3, "Manufacturer": "perfusion realistic phantom",
                   "ContrastBolusIngredient": "GADOLINIUM"}
        if multi:
            sidecar["EchoNumber"] = k
        write_json(out / f"{stem}.json", sidecar)
        paths[f"echo-{k}" if multi else "dsc"] = series
    contra = np.zeros(ph.signal.shape[:3], bool)  # the hemisphere without lesions (high x: the patient's right)
    contra[ph.signal.shape[0] // 2 + 1:] = True
    written = {"brain": ("mask-brain", ph.masks["brain"]), "aif": ("mask-aif", ph.masks["aif"]),
               "nawm": ("mask-reference", ph.masks["nawm"] & contra), "vein": ("mask-vein", ph.masks["vein"])}
    for n in spec.lesions:
        written[n] = (f"roi-{n}", ph.masks[n])
    for key, (name, mask) in written.items():
        p = out / f"{name}.nii.gz"
        write_nifti(p, mask.astype(np.uint8), ph.affine, description=name, dtype=np.uint8)
        paths[key] = p
    units = {"cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "rcbv": "ratio", "ktrans": "1/min", "delay": "s"}
    truth_dir = out / "truth"
    truth_dir.mkdir(exist_ok=True)
    for key, arr in ph.truth.items():
        paths[f"truth_{key}"] = write_map(truth_dir, key, arr, ph.affine, units=units[key],
                                          description=f"realistic phantom ground truth {key}")
    write_json(out / "truth.json", {
        "software": {"name": "perfusion", "version": __version__},
        "kind": "realistic", "spec": asdict(spec), "protocol": PROTOCOLS[spec.protocol],
        "units": {"time": "s", "cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "rcbv": "ratio",
                  "concentration": "mM"},
        "nawm": {k: TISSUES["wm"][k] for k in ("cbv", "mtt")},
        "signal_drop_at_peak": drops(spec),
        "lesions": ph.lesions,
        **({"echoes": [{"file": paths[f"echo-{k}"].name, "te_s": te} for k, te in enumerate(spec.tes, 1)],
            "noise": {"kind": "Rician", "sd": TISSUES["wm"]["s0"] / spec.snr,
                      "definition": f"white-matter baseline signal at TE {spec.te:g} s / snr, the same SD for every "
                                    "echo, drawn independently per echo"}} if multi else {}),
        "physics": {"blood_r2s": f"{BLOOD_R2S_LINEAR} C + {BLOOD_R2S_QUADRATIC} C^2 (1/s, mM)",
                    "tissue_r2s_per_mM": TISSUE_R2S_PER_MM, "r1_per_mM_s": R1_PER_MM_S, "hct": HCT,
                    "residue": "log-normal transit times", "leakage": "driven by the capillary plasma concentration",
                    "preload_plasma_mM": PRELOAD_PLASMA_MM if PROTOCOLS[spec.protocol]["preload"] else 0.0,
                    **({"baseline_r2s_per_s": BASELINE_R2S_PER_S,
                        "echoes": "one T1 (SPGR) factor per voxel-frame for all echoes, exp(-TE R2*(t)) per echo"}
                       if multi else {})},
    })
    paths["truth_json"] = out / "truth.json"
    return paths
