"""Multi-echo DSC: several gradient echoes of one acquisition combined into one series whose delta R2*
is free of T1 effects.

For two echoes (Vonken et al. 1999, MRM 41:343; Schmainda et al. 2004, AJNR 25:1524 for clinical use):
    delta R2*(t) = ln[(S1(t) / S1,0) / (S2(t) / S2,0)] / (TE2 - TE1),
which cancels the T1-dependent factor that both echoes share (leaking contrast shortens T1 and raises
S0 of both echoes alike). For three or more echoes R2*(t) is the least-squares slope of ln S over TE,
frame by frame (the same estimator for two echoes reduces to the formula above).

Where the last echo's signal sits at the noise floor (an artery at the bolus peak: at TE 30 ms its
signal can fall to a few percent of baseline, where Rician noise holds it up and the echo ratio
underestimates delta R2*), R2* comes from the first echo alone, on top of its baseline R2*; how many
voxel-frames that concerned is recorded.

The combination is returned as an ordinary single-echo ``io.Series``: its signal is
    S(t) = M exp(-(R2*(t) - R2*_ref) TE_eff),  TE_eff = TE_last - TE_first,
with M the first echo's mean signal of the voxel and R2*_ref the voxel's median R2*: so the pipeline's
-ln(S / S0) / TE_eff is exactly the multi-echo delta R2*, and images and masks keep the first echo's
contrast. ``Series.echoes`` lists the echoes and ``Series.echo_combination`` says how they were combined.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np

from perfusion.errors import InputError

#: Echo times closer than this (s) are one echo given twice (scanners round TE to 0.1 ms).
MIN_ECHO_GAP_S = 0.5e-3

#: A voxel-frame of the last echo is at the noise floor when its signal is below this many noise SDs
#: (the voxel's SD over the baseline frames of that echo): Rician noise of SD sigma holds a magnitude
#: of zero true signal at about 1.25 sigma, and within 3 sigma the log of the signal is mostly noise.
NOISE_FLOOR_SD = 3.0

#: A voxel has a signal (and its noise floor is looked for) when its last echo's mean over the first
#: frames exceeds this many noise SDs: pure noise (air, the skull's signal void) has a Rician mean of about
#: 1.25 SD. Measured on the dual-echo realistic head: without it 39 % of all voxel-frames were "at the
#: floor", 88 % of them outside the head.
SIGNAL_SD = 10.0

#: Frames at the start of the series used for each voxel's noise SD when no baseline is known: the
#: first third of the frames before the whole-head minimum, at least 3.
MIN_NOISE_FRAMES = 3

DUAL = "dual-echo ratio: ln[(S1/S1,0)/(S2/S2,0)] / (TE2 - TE1) (Vonken 1999)"
FIT = "log-linear fit of S over TE, frame by frame ({n} echoes)"


@dataclass(frozen=True)
class Echo:
    """One echo of a multi-echo series: its TE (s), where TE came from, and the file (or folder)."""

    te: float
    te_source: str
    path: Path

    def as_dict(self) -> dict:
        return {"te_s": self.te, "te_source": self.te_source, "file": Path(self.path).name}


def check_echoes(echoes: list) -> list:
    """The echoes (io.Series) of one acquisition ordered by TE; InputError naming the file that does
    not match the first (grid, affine, frames, timing) or whose TE repeats another's."""
    from perfusion.io import AFFINE_ATOL_MM

    first = echoes[0]
    for e in echoes[1:]:
        what = f"{Path(e.path).name} and {Path(first.path).name} are not echoes of one acquisition"
        if e.shape3d != first.shape3d:
            raise InputError(f"{e.path}: grid {e.shape3d} differs from {first.shape3d} ({what}); give the echoes of "
                             "one DSC run")
        if not np.allclose(e.affine, first.affine, atol=AFFINE_ATOL_MM):
            raise InputError(f"{e.path}: position or orientation differs from {Path(first.path).name}'s ({what}); give "
                             "the echoes of one DSC run")
        if e.n_frames != first.n_frames:
            raise InputError(f"{e.path}: {e.n_frames} frames, {Path(first.path).name} has {first.n_frames} ({what}); "
                             "give the echoes of one DSC run")
        if abs(e.tr - first.tr) > 1e-3 * first.tr:
            raise InputError(f"{e.path}: frame time {e.tr:g} s, {Path(first.path).name} has {first.tr:g} s ({what}); "
                             "give the echoes of one DSC run, or fix the RepetitionTime in the sidecars")
    ordered = sorted(echoes, key=lambda e: e.te)
    for a, b in pairwise(ordered):
        if b.te - a.te < MIN_ECHO_GAP_S:
            raise InputError(f"{b.path}: EchoTime {b.te:g} s equals {Path(a.path).name}'s ({a.te:g} s); each file must "
                             "be another echo (check the sidecars' EchoTime), or analyse one of them alone")
    return ordered


def r2star(logs: np.ndarray, tes: np.ndarray) -> np.ndarray:
    """R2* (1/s) per voxel and frame: minus the least-squares slope of ln S over TE. ``logs`` (E, ...)
    holds ln S per echo, ``tes`` (E,) s. For two echoes this is (ln S1 - ln S2) / (TE2 - TE1)."""
    tes = np.asarray(tes, dtype=np.float64)
    dt = tes - tes.mean()
    slope = np.tensordot(dt, logs - logs.mean(axis=0), axes=(0, 0)) / np.sum(dt * dt)
    return -slope


def _noise_sd(sig: np.ndarray) -> np.ndarray:
    """Each voxel's noise SD (x y z) from its first frames, before the whole-volume minimum."""
    mean_curve = sig.reshape(-1, sig.shape[-1]).mean(axis=0)
    n = max(MIN_NOISE_FRAMES, int(np.argmin(mean_curve)) // 3)
    return sig[..., :n].std(axis=-1, ddof=1)


def combine_echoes(echoes: list):
    """One io.Series from the echoes (io.Series, any order) of one acquisition (module docstring); a
    single echo is returned as it is."""
    if len(echoes) == 1:
        return echoes[0]
    ordered = check_echoes(list(echoes))
    tes = np.array([e.te for e in ordered])
    first, last = ordered[0], ordered[-1]
    s_first = first.data.astype(np.float64)
    tiny = 1e-6 * max(float(np.nanmax(s_first)), 1e-30)
    logs = np.stack([np.log(np.maximum(e.data.astype(np.float64), tiny)) for e in ordered])
    r2s = r2star(logs, tes)
    # the last echo at its noise floor: R2* from the first echo alone, over its baseline R2*
    s_last = last.data.astype(np.float64)
    n0 = max(MIN_NOISE_FRAMES, int(np.argmin(s_first.reshape(-1, s_first.shape[-1]).mean(axis=0))) // 3)
    # only voxels with a signal: outside the head (and in the skull's signal void) every frame is noise
    sd_last = _noise_sd(s_last)
    has_signal = s_last[..., :n0].mean(axis=-1) > SIGNAL_SD * sd_last
    floor = (s_last < NOISE_FLOOR_SD * sd_last[..., None]) & has_signal[..., None]
    n_floor = int(floor.sum())
    if n_floor:
        base_r2s = r2s[..., :n0].mean(axis=-1, keepdims=True)
        s1_0 = s_first[..., :n0].mean(axis=-1, keepdims=True)
        single = base_r2s - np.log(np.maximum(s_first, tiny) / np.maximum(s1_0, tiny)) / first.te
        r2s = np.where(floor, single, r2s)
    te_eff = float(tes[-1] - tes[0])
    ref = np.median(r2s, axis=-1, keepdims=True)
    magnitude = s_first.mean(axis=-1, keepdims=True)
    data = (magnitude * np.exp(-(r2s - ref) * te_eff)).astype(np.float32)
    method = DUAL if len(ordered) == 2 else FIT.format(n=len(ordered))
    notes = []
    if n_floor:
        notes.append(f"the last echo (TE {last.te * 1000:.3g} ms) sat at its noise floor in {n_floor} voxel-frames "
                     f"of voxels with a signal "
                     f"({100 * n_floor / max(int(has_signal.sum()) * floor.shape[-1], 1):.2g} %; "
                     "arteries at the bolus peak): R2* from the first echo alone there")
    return replace(first, data=data, te=te_eff,
                   te_source=f"multi-echo: TE {', '.join(f'{t * 1000:.4g}' for t in tes)} ms; delta R2* by {method}; "
                             f"effective TE = TE{len(tes)} - TE1 = {te_eff:g} s",
                   echoes=tuple(Echo(te=e.te, te_source=e.te_source, path=Path(e.path)) for e in ordered),
                   echo_combination=method, echo_notes=tuple(notes))
