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
two lesions (hyper- and hypoperfused) in normal-appearing white matter (NAWM). Every slice has
NAWM background, two arteries (2 x 2 pure arterial voxels, each ringed by partial-volume voxels)
and a vein (the AIF delayed and dispersed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.signal import fftconvolve

from .units import KH, RHO_BRAIN_G_PER_ML

#: Time step of the forward model, s (TR must be a multiple of it).
FINE_DT_S = 0.01


@dataclass(frozen=True)
class PhantomSpec:
    """Settings of the phantom. Times in s, CBF in mL/100 g/min, CBV in mL/100 g."""

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
    })
    partial_volume_fraction: float = 0.3
    vein_delay_s: float = 4.0
    vein_dispersion_s: float = 3.0
    steady_state_boost: tuple[float, ...] = (1.20, 1.05)

    def to_json(self) -> dict:
        return asdict(self)


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


@dataclass(frozen=True)
class Phantom:
    signal: np.ndarray  # (x, y, z, t) int16
    affine: np.ndarray
    masks: dict[str, np.ndarray]  # bool (x, y, z)
    truth: dict[str, np.ndarray]  # float32 (x, y, z): cbv, cbf, mtt, delay, dispersion
    blocks: list[dict]  # sweep blocks: slice, x/y ranges, cbf, mtt, cbv, delay, dispersion
    aif: np.ndarray  # noise-free AIF delta R2* sampled at TR, (t,)
    spec: PhantomSpec


def make_phantom(spec: PhantomSpec = PhantomSpec()) -> Phantom:
    """Build the phantom described in the module docstring."""
    if abs(spec.tr / FINE_DT_S - round(spec.tr / FINE_DT_S)) > 1e-9:
        raise ValueError(f"TR must be a multiple of {FINE_DT_S} s")
    rng = np.random.default_rng(spec.seed)
    m, nz = spec.matrix, len(spec.delays) + 2
    t_fine = np.arange(0.0, spec.n_frames * spec.tr + 40.0, FINE_DT_S)
    step = int(round(spec.tr / FINE_DT_S))
    sample = np.arange(spec.n_frames) * step
    aif_fine = aif_curve(t_fine, spec)

    shape = (m, m, nz)
    curves = np.zeros(shape + (spec.n_frames,))
    truth = {k: np.full(shape, np.nan, np.float32) for k in ("cbv", "cbf", "mtt", "delay", "dispersion")}
    masks = {k: np.zeros(shape, bool) for k in ("brain", "aif", "nawm", "vein", "sweep")}
    masks.update({name: np.zeros(shape, bool) for name in spec.lesions})

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
        else:
            for k, (name, les) in enumerate(spec.lesions.items()):
                cx = c + (-1 if k == 0 else 1) * 0.35 * m
                cond = (xx - cx) ** 2 + (yy - c) ** 2 <= (0.09 * m) ** 2
                put(z, cond, tissue_curve(aif_fine, t_fine, cbf=les["cbf"], mtt=les["mtt"]), cbf=les["cbf"], mtt=les["mtt"])
                masks[name][:, :, z] = cond
                masks["nawm"][:, :, z] &= ~_dilate2d(cond, 2)
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
            for k in truth:
                truth[k][core | ring, z] = np.nan
        vcore = np.zeros((m, m), bool)
        vcore[vein[0]: vein[0] + 3, vein[1]: vein[1] + 2] = True
        vof = _disperse(_shift(aif_fine, spec.vein_delay_s), spec.vein_dispersion_s, t_fine)
        curves[vcore, z] = vof[sample]
        masks["vein"][:, :, z] = vcore
        masks["nawm"][:, :, z] &= ~_dilate2d(vcore, 3)
        for k in truth:
            truth[k][vcore, z] = np.nan

    ideal = spec.s0 * np.exp(-spec.te * curves) * masks["brain"][..., None]
    for i, boost in enumerate(spec.steady_state_boost):
        ideal[..., i] *= boost
    sigma = spec.s0 / spec.snr
    noisy = np.hypot(ideal + sigma * rng.standard_normal(ideal.shape), sigma * rng.standard_normal(ideal.shape))
    signal = np.clip(np.round(noisy), 0, np.iinfo(np.int16).max).astype(np.int16)

    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = [-m, -m, -2.0 * nz]
    return Phantom(signal=signal, affine=affine, masks=masks, truth=truth, blocks=blocks,
                   aif=aif_fine[sample], spec=spec)


def _dilate2d(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dx in range(-r, r + 1):
        for dy in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dx, 0), dy, 1)
    return out


def write_phantom(ph: Phantom, out: Path, *, prefix: str = "sub-phantom") -> dict[str, Path]:
    """Write the phantom as a BIDS-like case folder: the series, its sidecar, masks, truth maps and
    ``truth.json``. Returns the written paths by role."""
    from . import __version__
    from .io import write_json, write_map, write_nifti

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    series = out / f"{prefix}_dsc.nii.gz"
    write_nifti(series, ph.signal, ph.affine, description="perfusion phantom DSC", tr=ph.spec.tr, dtype=np.int16)
    write_json(out / f"{prefix}_dsc.json", {
        "EchoTime": ph.spec.te, "RepetitionTime": ph.spec.tr, "FlipAngle": 60, "MagneticFieldStrength": 3,
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
    units = {"cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "delay": "s", "dispersion": "s"}
    truth_dir = out / "truth"
    truth_dir.mkdir(exist_ok=True)
    for key, arr in ph.truth.items():
        paths[f"truth_{key}"] = write_map(truth_dir, key, arr, ph.affine, units=units[key],
                                          description=f"phantom ground truth {key}")
    write_json(out / "truth.json", {
        "software": {"name": "perfusion", "version": __version__},
        "spec": ph.spec.to_json(),
        "units": {"time": "s", "cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "aif": "1/s"},
        "nawm": {"cbf": ph.spec.nawm_cbf, "mtt": ph.spec.nawm_mtt, "cbv": ph.spec.nawm_cbf * ph.spec.nawm_mtt / 60},
        "lesions": {k: {**v, "cbv": v["cbf"] * v["mtt"] / 60,
                        "rcbv": (v["cbf"] * v["mtt"]) / (ph.spec.nawm_cbf * ph.spec.nawm_mtt)}
                    for k, v in ph.spec.lesions.items()},
        "blocks": ph.blocks,
        "aif_delta_r2s": ph.aif.tolist(),
    })
    paths["truth_json"] = out / "truth.json"
    return paths
