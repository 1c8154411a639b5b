"""Perfusion maps from residues and curves: small pure functions on (n_vox, n_t) arrays.

Units: CBV mL/100 g, CBF mL/100 g/min, MTT s, TTP s, Tmax s. kH and rho default to units.KH and
units.RHO_BRAIN_G_PER_ML; pass 1.0 for both to switch the corrections off (as for OSIPI's data).
"""

from __future__ import annotations

from typing import cast

import numpy as np

from perfusion.units import KH, RHO_BRAIN_G_PER_ML, SECONDS_PER_MINUTE, cbf_scale, cbv_scale


def trapezoid(y: np.ndarray, *, dx: float, axis: int = -1) -> np.ndarray | np.float64:
    """Trapezoid-rule integral of samples ``y`` spaced ``dx`` apart along ``axis`` (numpy only: no
    scipy.integrate import on the start-up path): an array of ``y``'s shape without ``axis``, or a
    numpy float64 when ``y`` is 1-D."""
    y = np.asarray(y, dtype=np.float64)
    n = y.shape[axis]
    if n < 2:
        return np.zeros(np.delete(y.shape, axis % y.ndim)) if y.ndim > 1 else np.float64(0.0)
    first = np.take(y, 0, axis=axis)
    last = np.take(y, n - 1, axis=axis)
    return dx * (np.sum(y, axis=axis) - 0.5 * (first + last))


def cbv(curves: np.ndarray, aif: np.ndarray, *, tr: float, kh: float = KH,
        rho: float = RHO_BRAIN_G_PER_ML) -> np.ndarray:
    """CBV = kH / rho * int c dt / int a dt * 100 (mL/100 g), trapezoid over all frames; (n_vox,)."""
    area_aif = trapezoid(np.asarray(aif, dtype=np.float64), dx=tr)
    if not area_aif > 0:
        raise ValueError("the AIF area must be positive")
    # (n_vox, n_t) curves integrate to an (n_vox,) array, which mypy cannot tell from a 1-D curve's scalar
    area_curves = cast(np.ndarray, trapezoid(np.asarray(curves, dtype=np.float64), dx=tr, axis=-1))
    return cbv_scale(kh, rho) * area_curves / area_aif


def cbf(residue: np.ndarray, *, kh: float = KH, rho: float = RHO_BRAIN_G_PER_ML) -> np.ndarray:
    """CBF = kH / rho * max_t F R(t) * 6000 (mL/100 g/min) from residues in 1/s; (n_vox,)."""
    with np.errstate(invalid="ignore"):
        return cbf_scale(kh, rho) * np.max(residue, axis=-1)


def tmax(residue: np.ndarray, *, tr: float, n_t: int) -> np.ndarray:
    """Time of the residue maximum, s; (n_vox,). On a circulant residue of length L = 2 N an index
    past N is a negative delay (tissue ahead of the AIF) and maps to (index - L) TR."""
    r = np.asarray(residue)
    length = r.shape[-1]
    idx = np.argmax(np.where(np.isfinite(r), r, -np.inf), axis=-1)
    if length > n_t:
        idx = np.where(idx >= n_t, idx - length, idx)
    out = idx * float(tr)
    return np.where(np.all(np.isfinite(r), axis=-1), out, np.nan)


def mtt(cbv_ml100g: np.ndarray, cbf_ml100gmin: np.ndarray) -> np.ndarray:
    """MTT = CBV / CBF (central volume theorem), s; NaN where CBF is not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = SECONDS_PER_MINUTE * np.asarray(cbv_ml100g) / np.asarray(cbf_ml100gmin)
    return np.where(np.asarray(cbf_ml100gmin) > 0, out, np.nan)


def ttp(curves: np.ndarray, *, tr: float) -> np.ndarray:
    """Time to peak of the delta R2* curve, s from the first frame; (n_vox,)."""
    c = np.asarray(curves)
    idx = np.argmax(np.where(np.isfinite(c), c, -np.inf), axis=-1)
    return np.where(np.all(np.isfinite(c), axis=-1), idx * float(tr), np.nan)
