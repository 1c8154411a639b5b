"""Model-based deconvolution: a per-voxel fit of flow, mean transit time and delay.

Model: c(t) = F int a(u - tau) R(t - u) du with an exponential residue R(t) = exp(-t / MTT)
(the one-compartment model of Ostergaard 1996 and Mouridsen 2006, MRM 56:1220), F in 1/s, MTT in s,
tau the tissue delay in s. The AIF is taken as piecewise linear between its samples, so the
convolution with the exponential is exact on that interpolant (no frame-grid discretisation, unlike
c = dt A b): y_{k+1} = E y_k + a_k I0 + m_k I1 with E = exp(-dt/MTT), I0 = MTT (1 - E),
I1 = dt I0 - MTT^2 (1 - E (1 + dt/MTT)), m_k the AIF slope on [t_k, t_{k+1}].

F enters linearly, so it is projected out (variable projection): for a given (MTT, tau),
F = max(<y, c> / <y, y>, 0). The search over (log MTT, tau) starts from the best point of a coarse
grid, scored for all voxels at once by one matrix product, and is refined per voxel by alternating
parabolic steps (numba kernel ``_kernels._expfit_refine``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _kernels

#: Bounds of the fit. MTT in s: below 1 s the residue decays within a frame at clinical TR and,
#: with noise, the fit trades a spike of flow for a short MTT (measured on the phantom: CBF of
#: MTT-2-s blocks overestimated up to 4x with a 0.3 s bound); above 40 s beyond any tissue. Delay in s relative to the AIF: tissue can lead a downstream AIF slightly.
MTT_BOUNDS_S = (1.0, 40.0)
DELAY_BOUNDS_S = (-3.0, 12.0)

#: Coarse grid: MTT values (geometric) and the delay step as a fraction of TR.
N_GRID_MTT = 24
DELAY_STEP_TR = 0.5

#: Refinement rounds (each halves the step) of the per-voxel parabolic search.
N_REFINE_ROUNDS = 8


def delayed(aif: np.ndarray, *, tr: float, tau: float) -> np.ndarray:
    """AIF samples delayed by ``tau`` s: a(t_k - tau), linear interpolation, 0 before the first sample
    and the last value after the end. Shape (N,)."""
    n = aif.size
    t = np.arange(n) * tr
    return np.interp(t - tau, t, aif, left=0.0, right=aif[-1])


def exp_convolution(a: np.ndarray, *, tr: float, mtt) -> np.ndarray:
    """int_0^t a(u) exp(-(t - u)/MTT) du at the sample times for a piecewise-linear ``a``; ``mtt`` may
    be an array (the result then has shape mtt.shape + (N,))."""
    mtt = np.asarray(mtt, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    e = np.exp(-tr / mtt)
    i0 = mtt * (1 - e)
    i1 = tr * i0 - mtt ** 2 * (1 - e * (1 + tr / mtt))
    lead = np.broadcast_shapes(mtt.shape, a.shape[:-1])
    out = np.zeros(lead + a.shape[-1:])
    y = np.zeros(lead)
    for k in range(a.shape[-1] - 1):
        slope = (a[..., k + 1] - a[..., k]) / tr
        y = e * y + a[..., k] * i0 + slope * i1
        out[..., k + 1] = y
    return out


@dataclass(frozen=True)
class ExpFitOperator:
    """What does not depend on the tissue: the AIF, the grid and its model curves."""

    aif: np.ndarray  # 1/s, (N,)
    tr: float
    grid_mtt: np.ndarray  # (G_m,)
    grid_tau: np.ndarray  # (G_t,)
    curves: np.ndarray  # (G_m * G_t, N) unit-flow model curves
    norms2: np.ndarray  # (G_m * G_t,)


def prepare(aif: np.ndarray, *, tr: float) -> ExpFitOperator:
    aif = np.asarray(aif, dtype=np.float64)
    grid_mtt = np.geomspace(*MTT_BOUNDS_S, N_GRID_MTT)
    step = DELAY_STEP_TR * tr
    grid_tau = np.arange(DELAY_BOUNDS_S[0], DELAY_BOUNDS_S[1] + 1e-9, step)
    shifted = np.stack([delayed(aif, tr=tr, tau=tau) for tau in grid_tau])  # (G_t, N)
    curves = exp_convolution(shifted[None, :, :], tr=tr, mtt=grid_mtt[:, None])  # (G_m, G_t, N)
    curves = curves.reshape(-1, aif.size)
    return ExpFitOperator(aif=aif, tr=float(tr), grid_mtt=grid_mtt, grid_tau=grid_tau, curves=curves,
                          norms2=np.einsum("gn,gn->g", curves, curves))


@dataclass(frozen=True)
class ExpFit:
    """Per-voxel fit: flow F (1/s), MTT (s), delay tau (s), residual sum of squares, valid (bool)."""

    flow: np.ndarray
    mtt: np.ndarray
    delay: np.ndarray
    sse: np.ndarray
    valid: np.ndarray


def fit(op: ExpFitOperator, curves: np.ndarray) -> ExpFit:
    """Fit tissue curves (delta R2*, 1/s, (n_vox, N)); voxels with NaN or no positive fit are invalid."""
    c = np.asarray(curves, dtype=np.float64)
    finite = np.all(np.isfinite(c), axis=1)
    c0 = np.where(finite[:, None], c, 0.0)
    proj = c0 @ op.curves.T  # (n_vox, G)
    score = np.where(proj > 0, proj * proj / op.norms2, -np.inf)
    best = np.argmax(score, axis=1)
    n_tau = op.grid_tau.size
    m0 = op.grid_mtt[best // n_tau]
    tau0 = op.grid_tau[best % n_tau]
    n = c.shape[0]
    flow = np.empty(n)
    mtt = np.empty(n)
    tau = np.empty(n)
    sse = np.empty(n)
    h_logm = float(np.log(op.grid_mtt[1] / op.grid_mtt[0]))
    h_tau = float(op.grid_tau[1] - op.grid_tau[0])
    _kernels._expfit_refine(c0, op.aif, op.tr, np.log(m0), tau0, h_logm, h_tau,
                            np.log(MTT_BOUNDS_S[0]), np.log(MTT_BOUNDS_S[1]), DELAY_BOUNDS_S[0], DELAY_BOUNDS_S[1],
                            N_REFINE_ROUNDS, flow, mtt, tau, sse)
    valid = finite & np.isfinite(score[np.arange(n), best]) & (flow > 0)
    nan = np.where(valid, 1.0, np.nan)
    return ExpFit(flow=flow * nan, mtt=mtt * nan, delay=tau * nan, sse=sse * nan, valid=valid)
