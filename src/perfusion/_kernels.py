"""numba kernels: small loops, no validation, no I/O, no fastmath.

Each kernel has a plain numpy twin in ``tests/naive.py`` and is compared with it at rtol 1e-10.
The public wrappers that validate arguments live in the domain modules.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True)
def _oscillation_index(b):
    """Wu 2003 oscillation index of one residue b (length L):
    OI = 1 / (L max b) * sum_{t>=2} |b[t] - 2 b[t-1] + b[t-2]|; +inf where max b <= 0."""
    n = b.shape[0]
    fmax = -np.inf
    for i in range(n):
        if b[i] > fmax:
            fmax = b[i]
    if not fmax > 0.0:
        return np.inf
    acc = 0.0
    for i in range(2, n):
        acc += abs(b[i] - 2.0 * b[i - 1] + b[i - 2])
    return acc / (n * fmax)


@njit(cache=True, parallel=True)
def _osvd_search(x, s, vt, k_max, oi_target, out_b, out_k):
    """Per-voxel oSVD truncation search.

    x: (n_vox, L) projections U^T c of each tissue curve; s: (L,) singular values, descending;
    vt: (L, L) right singular vectors as rows. For k = 1 .. k_max singular values kept, the residue
    is b_k = sum_{i<k} vt[i] x[i] / s[i]; the kernel keeps the largest k whose oscillation index is
    at or below ``oi_target`` (that is, the smallest relative threshold P), or k = 1 where none is.
    Writes b into out_b (n_vox, L) and k into out_k (n_vox,). Rows of x that hold a NaN give NaN b
    and k = 0.
    """
    n_vox, length = x.shape
    for v in prange(n_vox):
        finite = True
        for i in range(length):
            if not np.isfinite(x[v, i]):
                finite = False
                break
        if not finite:
            for i in range(length):
                out_b[v, i] = np.nan
            out_k[v] = 0
            continue
        b = np.zeros(length)
        best = 0
        for k in range(k_max):
            coef = x[v, k] / s[k]
            for i in range(length):
                b[i] += coef * vt[k, i]
            if k == 0 or _oscillation_index(b) <= oi_target:
                best = k + 1
                for i in range(length):
                    out_b[v, i] = b[i]
        out_k[v] = best


# --- exponential-residue model fit (modelfit.py)


@njit(cache=True, nogil=True)
def _expfit_model(aif, tr, mtt, tau, out):
    """Unit-flow model curve: int a(u - tau) exp(-(t - u)/mtt) du at the samples, the delayed AIF
    linearly interpolated (0 before the first sample, the last value after the end)."""
    n = aif.shape[0]
    e = np.exp(-tr / mtt)
    i0 = mtt * (1.0 - e)
    i1 = tr * i0 - mtt * mtt * (1.0 - e * (1.0 + tr / mtt))
    prev = 0.0
    y = 0.0
    out[0] = 0.0
    for k in range(n):
        # a(t_k - tau) by linear interpolation
        x = k - tau / tr
        if x <= 0.0:
            cur = aif[0] if x == 0.0 else 0.0
        elif x >= n - 1:
            cur = aif[n - 1]
        else:
            j = int(np.floor(x))
            w = x - j
            cur = aif[j] * (1.0 - w) + aif[j + 1] * w
        if k > 0:
            y = e * y + prev * i0 + (cur - prev) / tr * i1
            out[k] = y
        prev = cur


@njit(cache=True, nogil=True)
def _expfit_sse(c, aif, tr, logm, tau, buf):
    """Residual sum of squares and flow F of curve c for (log mtt, tau), F projected out (F >= 0)."""
    _expfit_model(aif, tr, np.exp(logm), tau, buf)
    yy = 0.0
    yc = 0.0
    cc = 0.0
    for i in range(c.shape[0]):
        yy += buf[i] * buf[i]
        yc += buf[i] * c[i]
        cc += c[i] * c[i]
    if yy <= 0.0 or yc <= 0.0:
        return cc, 0.0
    f = yc / yy
    return cc - f * yc, f


@njit(cache=True, parallel=True)
def _expfit_refine(c, aif, tr, logm0, tau0, h_logm, h_tau, lo_logm, hi_logm, lo_tau, hi_tau, rounds,
                   out_f, out_m, out_tau, out_sse):
    """Per voxel: alternating parabolic steps in log mtt and tau from (logm0, tau0), each round
    halving the steps; a step is taken only if it lowers the residual. Writes F, mtt, tau, SSE."""
    n_vox, n = c.shape
    for v in prange(n_vox):
        buf = np.empty(n)
        x0 = logm0[v]
        x1 = tau0[v]
        f0, flow = _expfit_sse(c[v], aif, tr, x0, x1, buf)
        h0 = h_logm
        h1 = h_tau
        for r in range(rounds):
            for d in range(2):
                h = h0 if d == 0 else h1
                xc = x0 if d == 0 else x1
                lo = lo_logm if d == 0 else lo_tau
                hi = hi_logm if d == 0 else hi_tau
                xm = max(xc - h, lo)
                xp = min(xc + h, hi)
                if d == 0:
                    fm, _ = _expfit_sse(c[v], aif, tr, xm, x1, buf)
                    fp, _ = _expfit_sse(c[v], aif, tr, xp, x1, buf)
                else:
                    fm, _ = _expfit_sse(c[v], aif, tr, x0, xm, buf)
                    fp, _ = _expfit_sse(c[v], aif, tr, x0, xp, buf)
                denom = fm - 2.0 * f0 + fp
                if denom > 0.0:
                    step = 0.5 * h * (fm - fp) / denom
                    if step > h:
                        step = h
                    elif step < -h:
                        step = -h
                elif fp < fm:
                    step = h
                else:
                    step = -h
                xn = min(max(xc + step, lo), hi)
                if d == 0:
                    fn, fl = _expfit_sse(c[v], aif, tr, xn, x1, buf)
                else:
                    fn, fl = _expfit_sse(c[v], aif, tr, x0, xn, buf)
                if fn < f0:
                    f0 = fn
                    flow = fl
                    if d == 0:
                        x0 = xn
                    else:
                        x1 = xn
            h0 *= 0.5
            h1 *= 0.5
        out_f[v] = flow
        out_m[v] = np.exp(x0)
        out_tau[v] = x1
        out_sse[v] = f0
