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


@njit(cache=True, nogil=True)
def _row_finite(row):
    """True when every value of a 1-D row is finite."""
    for i in range(row.shape[0]):
        if not np.isfinite(row[i]):
            return False
    return True


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
        if not _row_finite(x[v]):
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



# --- gamma-residue model refinement (modelfit.py)


@njit(cache=True, nogil=True)
def _gamma_model_sse(c, cc, tr, table, t0, dt_table, il, logm, tau):
    """Flow F >= 0 (projected) and residual of the unit-flow model at (shape il, log MTT, tau): the
    unit response Y interpolated linearly in log MTT from ``table`` (uniform grid t0 + k dt_table),
    read at t_k - tau by linear interpolation in time (0 before the first sample). O(N)."""
    n = c.shape[0]
    size = table.shape[1]
    m = table.shape[2]
    x = (logm - t0) / dt_table
    j = int(np.floor(x))
    if j < 0:
        j = 0
    elif j > size - 2:
        j = size - 2
    f = x - j
    if f < 0.0:
        f = 0.0
    elif f > 1.0:
        f = 1.0
    yy = 0.0
    yc = 0.0
    shift = tau / tr
    for k in range(n):
        xs = k - shift
        if xs < 0.0:
            continue
        i = int(np.floor(xs))
        if i > m - 2:
            i = m - 2
        g = xs - i
        if g > 1.0:
            g = 1.0
        lo = table[il, j, i] * (1.0 - f) + table[il, j + 1, i] * f
        hi = table[il, j, i + 1] * (1.0 - f) + table[il, j + 1, i + 1] * f
        y = lo * (1.0 - g) + hi * g
        yy += y * y
        yc += y * c[k]
    if yy <= 0.0 or yc <= 0.0:
        return 0.0, cc
    flow = yc / yy
    return flow, cc - flow * yc


@njit(cache=True, parallel=True)
def _gamma_refine(c, cc, tr, table, t0, dt_table, il, log_m, tau, flow, sse, h_logm, h_tau,
                  lo_logm, hi_logm, lo_tau, hi_tau, rounds):
    """Per voxel, ``rounds`` rounds of parabolic steps in log MTT then tau (steps h, halved each round)
    on the exact model; a step is kept only if it lowers the residual. Updates log_m, tau, flow, sse."""
    n_vox = c.shape[0]
    for v in prange(n_vox):
        h0 = h_logm
        h1 = h_tau
        for r in range(rounds):
            for d in range(2):
                h = h0 if d == 0 else h1
                lo = lo_logm if d == 0 else lo_tau
                hi = hi_logm if d == 0 else hi_tau
                xc = log_m[v] if d == 0 else tau[v]
                xm = max(xc - h, lo)
                xp = min(xc + h, hi)
                if d == 0:
                    _, sm = _gamma_model_sse(c[v], cc[v], tr, table, t0, dt_table, il[v], xm, tau[v])
                    _, sp = _gamma_model_sse(c[v], cc[v], tr, table, t0, dt_table, il[v], xp, tau[v])
                else:
                    _, sm = _gamma_model_sse(c[v], cc[v], tr, table, t0, dt_table, il[v], log_m[v], xm)
                    _, sp = _gamma_model_sse(c[v], cc[v], tr, table, t0, dt_table, il[v], log_m[v], xp)
                denom = sm - 2.0 * sse[v] + sp
                step = 0.0
                if denom > 0.0:
                    step = 0.5 * (sm - sp) / denom
                    if step > 1.0:
                        step = 1.0
                    elif step < -1.0:
                        step = -1.0
                xn = min(max(xc + h * step, lo), hi)
                if d == 0:
                    fn, sn = _gamma_model_sse(c[v], cc[v], tr, table, t0, dt_table, il[v], xn, tau[v])
                else:
                    fn, sn = _gamma_model_sse(c[v], cc[v], tr, table, t0, dt_table, il[v], log_m[v], xn)
                if sn < sse[v]:
                    sse[v] = sn
                    flow[v] = fn
                    if d == 0:
                        log_m[v] = xn
                    else:
                        tau[v] = xn
            h0 *= 0.5
            h1 *= 0.5


# --- Tikhonov / GCV


@njit(cache=True, parallel=True)
def _tikhonov_gcv(x, s, vt, mus, out_b, out_mu):
    """Per-voxel Tikhonov deconvolution with mu chosen by generalised cross-validation.

    x: (n_vox, L) projections U^T c of each tissue curve (U square, so the residual lies in their
    span); s: (L,) singular values; vt: (L, L) right singular vectors as rows; mus: (n_mu,) candidate
    mu. Filter factors f_i = s_i^2 / (s_i^2 + mu^2), taken as 0 where s_i == 0. For each mu,
    GCV = sum_i (1 - f_i)^2 x_i^2 / (sum_i (1 - f_i))^2, both sums of 1 - f_i = mu^2 / (s_i^2 + mu^2)
    (= L - sum f_i, without the cancellation); the smallest GCV wins, the first in grid order on a
    tie. Writes b = sum_i vt[i] x_i s_i / (s_i^2 + mu^2) into out_b (n_vox, L) and the chosen mu into
    out_mu (n_vox,). Rows of x that hold a NaN or inf, or where no GCV is finite, give NaN b and mu.
    """
    n_vox, length = x.shape
    n_mu = mus.shape[0]
    g = np.empty((n_mu, length))  # 1 - f_i per mu: does not depend on the voxel
    den = np.empty(n_mu)
    for j in range(n_mu):
        m2 = mus[j] * mus[j]
        acc = 0.0
        for i in range(length):
            if s[i] == 0.0:
                g[j, i] = 1.0
            else:
                g[j, i] = m2 / (s[i] * s[i] + m2)
            acc += g[j, i]
        den[j] = acc * acc
    for v in prange(n_vox):
        finite = _row_finite(x[v])
        best = np.inf
        jbest = -1
        if finite:
            for j in range(n_mu):
                num = 0.0
                for i in range(length):
                    r = g[j, i] * np.float64(x[v, i])
                    num += r * r
                gcv = num / den[j]
                if gcv < best:
                    best = gcv
                    jbest = j
        if jbest < 0:
            for i in range(length):
                out_b[v, i] = np.nan
            out_mu[v] = np.nan
            continue
        m2 = mus[jbest] * mus[jbest]
        for i in range(length):
            out_b[v, i] = 0.0
        for k in range(length):
            if s[k] == 0.0:
                continue
            coef = np.float64(x[v, k]) * s[k] / (s[k] * s[k] + m2)
            for i in range(length):
                out_b[v, i] += coef * vt[k, i]
        out_mu[v] = mus[jbest]


# --- gamma-variate fit
# Levenberg-Marquardt for C(t) = A (x/m)^alpha exp(alpha (1 - x/m)), x = t - t0 > 0, else 0: the
# gamma variate K x^alpha exp(-x/beta) with peak A = C(t0 + m), m = alpha beta (Madsen 1992, Phys Med
# Biol 37:1597). Parameters p = (A, t0, m, alpha), boxed by lower/upper; the twin is
# tests/naive.py::gamma_fit. Public wrapper: perfusion.gammafit.fit_gamma_variate.

#: Damping (Nielsen 1999, as in Madsen, Nielsen & Tingleff 2004, "Methods for non-linear least
#: squares problems", sec. 3.2): start lam = GV_LAM0; after an accepted step lam *= max(1/3,
#: 1 - (2 rho - 1)^3) with rho = actual / predicted SSE decrease clipped to [0, 1], and nu = 2;
#: after a rejected one lam *= nu, nu *= 2. lam is floored at GV_LAM_MIN; above GV_LAM_MAX the
#: search stops (status 2).
GV_LAM0 = 1e-3
GV_LAM_MIN = 1e-12
GV_LAM_MAX = 1e10
#: A trial step is taken unless it raises the SSE by more than rounding can explain:
#: GV_SSE_ROUND sqrt(SSE S), S = sum y^2 + the starting SSE (a residual r = y - model carries an
#: error of a few machine eps times y, so the SSE one of about 1e-14 sqrt(SSE sum y^2)). Near the
#: minimum, where the SSE no longer resolves the steps, they are taken on the gradient's word; the
#: damping still doubles after each step that does not lower the SSE.
GV_SSE_ROUND = 1e-12
#: Converged (status 1) after a step that moves every parameter by at most GV_XTOL of its scale
#: (A: |A|; t0, m: m; alpha: alpha), or whose predicted SSE decrease is at most GV_FTOL of the SSE
#: (MINPACK's tests; 1.49e-8 = sqrt(machine eps) are its defaults in scipy.optimize.leastsq), or
#: that leaves an SSE below GV_SSE_FLOOR S: a noise-free fit down to rounding. The thresholds sit
#: far above the rounding of what they test, so the kernel and its twin stop at the same step.
GV_XTOL = 1.49012e-8
GV_FTOL = 1.49012e-8
GV_SSE_FLOOR = 1e-24
#: Marquardt scaling D = diag(J^T J), each entry floored at this fraction of the largest.
GV_DIAG_FLOOR = 1e-12


@njit(cache=True, nogil=True)
def _gv_sse(y, t, lo, hi, p):
    """Sum of squared residuals over the finite samples y[lo:hi] at times t[lo:hi] (s)."""
    acc = 0.0
    for i in range(lo, hi):
        yi = np.float64(y[i])
        if np.isfinite(yi):
            x = t[i] - p[1]
            f = 0.0
            if x > 0.0:
                u = x / p[2]
                f = p[0] * np.exp(p[3] * (np.log(u) + 1.0 - u))
            r = yi - f
            acc += r * r
    return acc


@njit(cache=True, nogil=True)
def _gv_normal(y, t, lo, hi, p, h, g, jac):
    """Normal equations over the finite samples y[lo:hi]: h = J^T J (4, 4), g = J^T r (4,), with
    J = d model / d p and r = y - model; jac (4,) is work space."""
    for a in range(4):
        g[a] = 0.0
        for b in range(4):
            h[a, b] = 0.0
    for i in range(lo, hi):
        yi = np.float64(y[i])
        if not np.isfinite(yi):
            continue
        x = t[i] - p[1]
        if not x > 0.0:
            continue  # model and derivatives are 0 before t0
        u = x / p[2]
        lg = np.log(u) + 1.0 - u
        e = np.exp(p[3] * lg)
        f = p[0] * e
        jac[0] = e
        jac[1] = f * p[3] * (1.0 - 1.0 / u) / p[2]
        jac[2] = f * p[3] * (u - 1.0) / p[2]
        jac[3] = f * lg
        r = yi - f
        for a in range(4):
            g[a] += jac[a] * r
            for b in range(4):
                h[a, b] += jac[a] * jac[b]


@njit(cache=True, nogil=True)
def _solve4(a, b, out):
    """Solve a out = b (4 x 4) by Gaussian elimination with partial pivoting; a and b are
    overwritten. Returns False where a pivot is 0 or a result not finite."""
    n = 4
    for k in range(n):
        piv = k
        big = abs(a[k, k])
        for i in range(k + 1, n):
            if abs(a[i, k]) > big:
                piv = i
                big = abs(a[i, k])
        if not (big > 0.0 and np.isfinite(big)):
            return False
        if piv != k:
            for j in range(n):
                tmp = a[k, j]
                a[k, j] = a[piv, j]
                a[piv, j] = tmp
            tmp = b[k]
            b[k] = b[piv]
            b[piv] = tmp
        for i in range(k + 1, n):
            f = a[i, k] / a[k, k]
            for j in range(k, n):
                a[i, j] -= f * a[k, j]
            b[i] -= f * b[k]
    for i in range(n - 1, -1, -1):
        s = b[i]
        for j in range(i + 1, n):
            s -= a[i, j] * out[j]
        out[i] = s / a[i, i]
        if not np.isfinite(out[i]):
            return False
    return True


@njit(cache=True, nogil=True)
def _gv_step(h, g, lam, p, lower, upper, a, b, delta, p_new):
    """One damped trial step: solve (h + lam D) delta = g, D = diag(h) floored at GV_DIAG_FLOOR of
    its largest entry, with delta_i = 0 for a parameter on a bound that g pushes outwards (active
    set); then project p + delta onto [lower, upper] into p_new. False if singular."""
    dmax = 0.0
    for i in range(4):
        if h[i, i] > dmax:
            dmax = h[i, i]
    for i in range(4):
        for j in range(4):
            a[i, j] = h[i, j]
        a[i, i] += lam * max(h[i, i], GV_DIAG_FLOOR * dmax)
        b[i] = g[i]
    for i in range(4):
        if (p[i] <= lower[i] and g[i] < 0.0) or (p[i] >= upper[i] and g[i] > 0.0):
            for j in range(4):
                a[i, j] = 0.0
                a[j, i] = 0.0
            a[i, i] = 1.0
            b[i] = 0.0
    if not _solve4(a, b, delta):
        return False
    for i in range(4):
        p_new[i] = min(max(p[i] + delta[i], lower[i]), upper[i])
    return True


@njit(cache=True, nogil=True)
def _gv_fit_one(y, t, lo, hi, p0, lower, upper, max_iter, p):
    """Levenberg-Marquardt for one curve y (n_t,) on samples lo..hi-1, from p0 clipped to the
    bounds; the result goes into p (4,). Every trial step counts as one iteration; J is recomputed
    after each step taken (GV_SSE_ROUND). Returns (sse, iterations, status): status 1 converged
    (GV_XTOL), 2 every damped step raises the SSE (lam > GV_LAM_MAX), 0 max_iter reached, -1 four
    or fewer finite samples, -2 singular normal equations."""
    n_ok = 0
    for i in range(lo, hi):
        if np.isfinite(y[i]):
            n_ok += 1
    if n_ok <= 4:
        for i in range(4):
            p[i] = np.nan
        return np.nan, 0, -1
    for i in range(4):
        p[i] = min(max(p0[i], lower[i]), upper[i])
    h = np.empty((4, 4))
    a = np.empty((4, 4))
    g = np.empty(4)
    b = np.empty(4)
    jac = np.empty(4)
    delta = np.empty(4)
    p_new = np.empty(4)
    sse = _gv_sse(y, t, lo, hi, p)
    scale = sse
    for i in range(lo, hi):
        yi = np.float64(y[i])
        if np.isfinite(yi):
            scale += yi * yi
    lam = GV_LAM0
    nu = 2.0
    status = 0
    it = 0
    need_j = True
    while it < max_iter:
        it += 1
        if need_j:
            _gv_normal(y, t, lo, hi, p, h, g, jac)
            need_j = False
        if not _gv_step(h, g, lam, p, lower, upper, a, b, delta, p_new):
            status = -2
            break
        sse_new = _gv_sse(y, t, lo, hi, p_new)
        if sse_new <= sse + GV_SSE_ROUND * np.sqrt(sse * scale):
            # the step taken (after projection) and the decrease the linear model predicts for it
            pred = 0.0
            for i in range(4):
                delta[i] = p_new[i] - p[i]
            for i in range(4):
                hd = 0.0
                for j in range(4):
                    hd += h[i, j] * delta[j]
                pred += delta[i] * (2.0 * g[i] - hd)
            rho = min(max((sse - sse_new) / pred, 0.0), 1.0) if pred > 0.0 else 0.0
            small = (abs(delta[0]) <= GV_XTOL * abs(p[0]) and abs(delta[1]) <= GV_XTOL * p[2]
                     and abs(delta[2]) <= GV_XTOL * p[2] and abs(delta[3]) <= GV_XTOL * p[3])
            for i in range(4):
                p[i] = p_new[i]
            sse = sse_new
            lam = max(lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), GV_LAM_MIN)
            nu = 2.0
            need_j = True
            if small or pred <= GV_FTOL * sse or sse <= GV_SSE_FLOOR * scale:
                status = 1
                break
        else:
            lam *= nu
            nu *= 2.0
            if lam > GV_LAM_MAX:
                status = 2
                break
    return sse, it, status


@njit(cache=True, parallel=True)
def _gamma_fit(curves, t, lo, hi, p0, lower, upper, max_iter, out_p, out_sse, out_iter, out_status):
    """Per-voxel bounded LM fit of the gamma variate (see _gv_fit_one).

    curves (n_vox, n_t) delta R2* (1/s); t (n_t,) sample times (s); lo, hi (n_vox,) the fit window
    [lo, hi) in frames; p0, lower, upper (n_vox, 4) start and bounds of (A 1/s, t0 s, m s, alpha).
    Writes out_p (n_vox, 4), out_sse (n_vox,), out_iter and out_status (n_vox,) int."""
    for v in prange(curves.shape[0]):
        sse, it, status = _gv_fit_one(curves[v], t, lo[v], hi[v], p0[v], lower[v], upper[v], max_iter, out_p[v])
        out_sse[v] = sse
        out_iter[v] = it
        out_status[v] = status
