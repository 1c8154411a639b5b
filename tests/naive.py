"""Slow, obviously correct numpy twins of the numba kernels in perfusion._kernels."""

import numpy as np


def oscillation_index(b):
    b = np.asarray(b, dtype=np.float64)
    fmax = b.max()
    if not fmax > 0:
        return np.inf
    return np.sum(np.abs(b[2:] - 2 * b[1:-1] + b[:-2])) / (b.size * fmax)


def osvd_search(x, s, vt, k_max, oi_target):
    """For each voxel, the residue with the largest k <= k_max whose OI <= target (k = 1 if none)."""
    n_vox, length = x.shape
    out_b = np.full((n_vox, length), np.nan)
    out_k = np.zeros(n_vox, dtype=np.int64)
    for v in range(n_vox):
        if not np.all(np.isfinite(x[v])):
            continue
        for k in range(1, k_max + 1):
            b = vt[:k].T @ (np.asarray(x[v, :k], np.float64) / s[:k])
            if k == 1 or oscillation_index(b) <= oi_target:
                out_b[v], out_k[v] = b, k
    return out_b, out_k


# --- exponential-residue model fit


def expfit_model(aif, tr, mtt, tau):
    """Unit-flow model curve, written as the plain recursion on the delayed, linearly interpolated AIF."""
    n = aif.size
    t = np.arange(n) * tr
    a = np.interp(t - tau, t, aif, left=0.0, right=aif[-1])
    if tau == 0:
        a = np.asarray(aif, np.float64).copy()
    e = np.exp(-tr / mtt)
    i0 = mtt * (1 - e)
    i1 = tr * i0 - mtt ** 2 * (1 - e * (1 + tr / mtt))
    out = np.zeros(n)
    for k in range(1, n):
        out[k] = e * out[k - 1] + a[k - 1] * i0 + (a[k] - a[k - 1]) / tr * i1
    return out


def expfit_sse(c, aif, tr, logm, tau):
    y = expfit_model(aif, tr, np.exp(logm), tau)
    yy, yc, cc = y @ y, y @ c, c @ c
    if yy <= 0 or yc <= 0:
        return cc, 0.0
    f = yc / yy
    return cc - f * yc, f


def expfit_refine(c, aif, tr, logm0, tau0, h_logm, h_tau, lo_logm, hi_logm, lo_tau, hi_tau, rounds):
    out = []
    for v in range(c.shape[0]):
        x = [logm0[v], tau0[v]]
        f0, flow = expfit_sse(c[v], aif, tr, x[0], x[1])
        h = [h_logm, h_tau]
        lo, hi = [lo_logm, lo_tau], [hi_logm, hi_tau]
        for _ in range(rounds):
            for d in range(2):
                xm, xp = list(x), list(x)
                xm[d] = max(x[d] - h[d], lo[d])
                xp[d] = min(x[d] + h[d], hi[d])
                fm = expfit_sse(c[v], aif, tr, *xm)[0]
                fp = expfit_sse(c[v], aif, tr, *xp)[0]
                denom = fm - 2 * f0 + fp
                if denom > 0:
                    step = float(np.clip(0.5 * h[d] * (fm - fp) / denom, -h[d], h[d]))
                else:
                    step = h[d] if fp < fm else -h[d]
                xn = list(x)
                xn[d] = min(max(x[d] + step, lo[d]), hi[d])
                fn, fl = expfit_sse(c[v], aif, tr, *xn)
                if fn < f0:
                    f0, flow, x = fn, fl, xn
            h = [h[0] * 0.5, h[1] * 0.5]
        out.append((flow, np.exp(x[0]), x[1], f0))
    return np.array(out)
