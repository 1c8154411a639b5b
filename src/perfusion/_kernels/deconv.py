"""numba kernels: small loops, no validation, no I/O, no fastmath.

Each kernel has a plain numpy twin in ``tests/naive.py`` and is compared with it at rtol 1e-10.
The public wrappers that validate arguments live in the domain modules.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from perfusion._kernels.cache import configure as _configure_cache

_configure_cache()  # before the first @njit: numba picks each kernel's cache folder when it decorates it


@njit(cache=True, nogil=True)
def _oscillation_index(b):
    """Wu 2003 oscillation index of one residue b (length L >= 2):
    OI = 1 / (L max b) * sum_{t>=2} |b[t] - 2 b[t-1] + b[t-2]|; +inf where max b <= 0.
    One pass, four partial sums (independent additions overlap in the CPU; without fastmath the
    compiler may not reorder one running sum itself), so the sum's rounding differs from a plain loop's
    in the last bits."""
    n = b.shape[0]
    fmax = max(b[0], b[1])
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    i = 2
    while i + 3 < n:
        a0 += abs(b[i] - 2.0 * b[i - 1] + b[i - 2])
        a1 += abs(b[i + 1] - 2.0 * b[i] + b[i - 1])
        a2 += abs(b[i + 2] - 2.0 * b[i + 1] + b[i])
        a3 += abs(b[i + 3] - 2.0 * b[i + 2] + b[i + 1])
        m = max(max(b[i], b[i + 1]), max(b[i + 2], b[i + 3]))
        if m > fmax:
            fmax = m
        i += 4
    while i < n:
        a0 += abs(b[i] - 2.0 * b[i - 1] + b[i - 2])
        if b[i] > fmax:
            fmax = b[i]
        i += 1
    if not fmax > 0.0:
        return np.inf
    return ((a0 + a1) + (a2 + a3)) / (n * fmax)


@njit(cache=True, nogil=True)
def _row_finite(row):
    """True when every value of a 1-D row is finite."""
    for i in range(row.shape[0]):
        if not np.isfinite(row[i]):
            return False
    return True


@njit(cache=True, nogil=True)
def _osvd_search(x, s, vt, ends, k_max, oi_target, out_b, out_k):
    """Per-voxel oSVD truncation search.

    x: (n_vox, L) projections U^T c of each tissue curve; s: (L,) singular values, descending;
    vt: (L, L) right singular vectors as rows; ends: (L,) uint8, 1 where a group of equal singular
    values ends (only there is the truncated subspace independent of the SVD's arbitrary basis within
    a degenerate pair). For the truncations k = 1 .. k_max that end a group, the residue is
    b_k = sum_{i<k} vt[i] x[i] / s[i]; the kernel keeps the largest such k whose oscillation index is
    at or below ``oi_target`` (that is, the smallest relative threshold P), or the first group's end
    where none is. Writes b into out_b (n_vox, L) and k into out_k (n_vox,). Rows of x that hold a NaN
    give NaN b and k = 0. Serial over voxels: the caller runs chunks on threads (nogil).
    """
    n_vox, length = x.shape
    b = np.empty(length)
    for v in range(n_vox):
        if not _row_finite(x[v]):
            for i in range(length):
                out_b[v, i] = np.nan
            out_k[v] = 0
            continue
        for i in range(length):
            b[i] = 0.0
        best = 0
        for k in range(k_max):
            coef = x[v, k] / s[k]
            for i in range(length):
                b[i] += coef * vt[k, i]
            if ends[k] and (best == 0 or _oscillation_index(b) <= oi_target):
                best = k + 1
        for i in range(length):
            b[i] = 0.0
        for k in range(best):
            coef = x[v, k] / s[k]
            for i in range(length):
                b[i] += coef * vt[k, i]
        for i in range(length):
            out_b[v, i] = b[i]
        out_k[v] = best



# --- gamma-residue model refinement (modelfit.py)


@njit(cache=True, nogil=True)
def _gamma_model_sse(c, cc, tr, table, t0, dt_table, il, logm, tau):
    """Flow F >= 0 (projected) and residual of the unit-flow model at (shape il, log MTT, tau): the
    unit response Y interpolated linearly in log MTT from ``table`` (uniform grid t0 + k dt_table),
    read at t_k - tau by linear interpolation in time (0 before the first sample). O(N).

    Sample k reads Y at k - tau / tr, so every sample falls the same fraction g past a table index
    k + off: the four interpolation weights are the same for all k. Requires the table to extend at
    least 2 samples past N - 1 - tau / tr (modelfit.extension guarantees it within DELAY_BOUNDS_S;
    past the end the last pair would be used with the same weights)."""
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
    shift = tau / tr
    k0 = int(np.ceil(shift))  # first sample with k - shift >= 0
    if k0 < 0:
        k0 = 0
    off = int(np.floor(-shift))
    g = -shift - off
    w00 = (1.0 - g) * (1.0 - f)
    w01 = (1.0 - g) * f
    w10 = g * (1.0 - f)
    w11 = g * f
    t_a = table[il, j]
    t_b = table[il, j + 1]
    yy0 = 0.0
    yy1 = 0.0
    yc0 = 0.0
    yc1 = 0.0
    k_end = min(n, m - 1 - off)  # samples whose pair (i, i + 1) lies inside the table
    k = k0
    while k + 1 < k_end:  # two samples per step: two independent running sums
        i = k + off
        y0 = (w00 * t_a[i] + w01 * t_b[i]) + (w10 * t_a[i + 1] + w11 * t_b[i + 1])
        y1 = (w00 * t_a[i + 1] + w01 * t_b[i + 1]) + (w10 * t_a[i + 2] + w11 * t_b[i + 2])
        yy0 += y0 * y0
        yc0 += y0 * c[k]
        yy1 += y1 * y1
        yc1 += y1 * c[k + 1]
        k += 2
    while k < n:  # the last sample, and any past the table's end (the last pair, as documented)
        i = min(k + off, m - 2)
        y0 = (w00 * t_a[i] + w01 * t_b[i]) + (w10 * t_a[i + 1] + w11 * t_b[i + 1])
        yy0 += y0 * y0
        yc0 += y0 * c[k]
        k += 1
    yy = yy0 + yy1
    yc = yc0 + yc1
    if yy <= 0.0 or yc <= 0.0:
        return 0.0, cc
    flow = yc / yy
    return flow, cc - flow * yc


@njit(cache=True, nogil=True)
def _prior_penalty(logm, tau, prior):
    """Weak-prior penalty (in units of the noise variance) of log MTT and tau, each a half-normal on
    either side of its centre: prior = (centre of log MTT, 1 / SD below it, 1 / SD above it, centre of
    tau, 1 / SD below it, 1 / SD above it); a 1 / SD of 0 leaves that side flat.
    Penalty a^2 + b^2 with a = (logm - prior[0]) / SD of its side, b likewise for tau."""
    a = logm - prior[0]
    a = a * prior[1] if a < 0.0 else a * prior[2]
    b = tau - prior[3]
    b = b * prior[4] if b < 0.0 else b * prior[5]
    return a * a + b * b


@njit(cache=True, nogil=True)
def _refine_one(c, cc, tr, table, t0, dt_table, il, log_m, tau, flow, sse, s2, prior, h_logm, h_tau,
                lo_logm, hi_logm, lo_tau, hi_tau, rounds):
    """``rounds`` rounds of parabolic steps in log MTT then tau (steps h, halved each round) on the
    exact model for one voxel, on the objective J = sse + s2 * _prior_penalty (s2 the voxel's noise
    variance times the prior's weight; 0: least squares); a step is kept only if it lowers J.
    Returns the updated (log_m, tau, flow, sse), sse the plain residual."""
    h0 = h_logm
    h1 = h_tau
    obj = sse + s2 * _prior_penalty(log_m, tau, prior)
    for r in range(rounds):
        for d in range(2):
            h = h0 if d == 0 else h1
            lo = lo_logm if d == 0 else lo_tau
            hi = hi_logm if d == 0 else hi_tau
            xc = log_m if d == 0 else tau
            xm = max(xc - h, lo)
            xp = min(xc + h, hi)
            if d == 0:
                _, sm = _gamma_model_sse(c, cc, tr, table, t0, dt_table, il, xm, tau)
                _, sp = _gamma_model_sse(c, cc, tr, table, t0, dt_table, il, xp, tau)
                sm += s2 * _prior_penalty(xm, tau, prior)
                sp += s2 * _prior_penalty(xp, tau, prior)
            else:
                _, sm = _gamma_model_sse(c, cc, tr, table, t0, dt_table, il, log_m, xm)
                _, sp = _gamma_model_sse(c, cc, tr, table, t0, dt_table, il, log_m, xp)
                sm += s2 * _prior_penalty(log_m, xm, prior)
                sp += s2 * _prior_penalty(log_m, xp, prior)
            denom = sm - 2.0 * obj + sp
            step = 0.0
            if denom > 0.0:
                step = 0.5 * (sm - sp) / denom
                if step > 1.0:
                    step = 1.0
                elif step < -1.0:
                    step = -1.0
            xn = min(max(xc + h * step, lo), hi)
            if d == 0:
                fn, sn = _gamma_model_sse(c, cc, tr, table, t0, dt_table, il, xn, tau)
                on = sn + s2 * _prior_penalty(xn, tau, prior)
            else:
                fn, sn = _gamma_model_sse(c, cc, tr, table, t0, dt_table, il, log_m, xn)
                on = sn + s2 * _prior_penalty(log_m, xn, prior)
            if on < obj:
                obj = on
                sse = sn
                flow = fn
                if d == 0:
                    log_m = xn
                else:
                    tau = xn
        h0 *= 0.5
        h1 *= 0.5
    return log_m, tau, flow, sse


@njit(cache=True, nogil=True)
def _parabola_step(f_minus, f0, f_plus):
    """Vertex offset (grid steps, within [-1, 1]) of the parabola through three equally spaced points;
    0 where it is not convex."""
    denom = f_minus - 2.0 * f0 + f_plus
    if not denom > 0.0:
        return 0.0
    return min(max(0.5 * (f_minus - f_plus) / denom, -1.0), 1.0)


@njit(cache=True, nogil=True)
def _grid_sse(q, cc, g):
    """Residual of grid curve g with its projected flow (F >= 0), from its normalised projection q[g]."""
    p = np.float64(q[g])
    if p > 0.0:
        return cc - p * p
    return cc


@njit(cache=True, nogil=True)
def _model_select(c, cc, q, s2, pen, prior, norms, log_mtts, taus, tr, table, t0, dt_table, n_lam, n_shapes,
                  h_logm, h_tau, lo_logm, hi_logm, lo_tau, hi_tau, rounds, out_flow, out_logm, out_il, out_tau,
                  out_sse):
    """The model fit from the grid projections on, per voxel (modelfit's module docstring).

    q: (n_vox, G) float32 projections <c, y_g> / |y_g| on the unit-norm grid curves, laid out as
    (shape, MTT, tau) with len(log_mtts) x len(taus) points per shape; norms: (G,) |y_g|. Objective
    J = residual + s2[v] * penalty: s2 (n_vox,) the weight of the prior (noise variance x weight; 0:
    least squares), pen (G,) the prior penalty of each grid point (_prior_penalty at its log MTT and
    tau), prior the same penalty's parameters for the refinement. The grid point of least J is each
    shape's best (the residual of a flow F >= 0 is cc - q^2 where q > 0, else cc); of the ``n_shapes``
    shapes with the least best J (ties: lower index first), each is refined: one parabolic step in log
    MTT and in tau on the grid's J, kept if the exact model's J is then lower, then ``rounds`` exact
    rounds (``_refine_one``). The candidate of least J wins (ties: the earlier). Writes the plain
    residual into out_sse. Serial over voxels: the caller runs chunks on threads (nogil)."""
    gm = log_mtts.shape[0]
    gt = taus.shape[0]
    per_shape = gm * gt
    dlogm = log_mtts[1] - log_mtts[0]
    dtau = taus[1] - taus[0]
    best_g = np.empty(n_lam, np.int64)
    top = np.empty(n_lam)
    used = np.empty(n_lam, np.bool_)
    for v in range(c.shape[0]):
        qv = q[v]
        w = s2[v]
        ccv = cc[v]
        for l in range(n_lam):
            base = l * per_shape
            bi = base
            bj = _grid_sse(qv, ccv, base) + w * pen[base]
            for g in range(base + 1, base + per_shape):
                jg = _grid_sse(qv, ccv, g) + w * pen[g]
                if jg < bj:
                    bj = jg
                    bi = g
            best_g[l] = bi
            top[l] = bj
            used[l] = False
        r_flow = 0.0
        r_logm = 0.0
        r_tau = 0.0
        r_sse = np.inf
        r_obj = np.inf
        r_il = -1
        for rank in range(min(n_shapes, n_lam)):
            il = -1
            for l in range(n_lam):
                if not used[l] and (il < 0 or top[l] < top[il]):
                    il = l
            used[il] = True
            g0 = best_g[il]
            im = (g0 - il * per_shape) // gt
            it = (g0 - il * per_shape) - im * gt
            s0 = _grid_sse(qv, ccv, g0)
            j0 = s0 + w * pen[g0]
            step_m = 0.0
            if im > 0 and im < gm - 1:
                step_m = _parabola_step(_grid_sse(qv, ccv, g0 - gt) + w * pen[g0 - gt], j0,
                                        _grid_sse(qv, ccv, g0 + gt) + w * pen[g0 + gt])
            step_t = 0.0
            if it > 0 and it < gt - 1:
                step_t = _parabola_step(_grid_sse(qv, ccv, g0 - 1) + w * pen[g0 - 1], j0,
                                        _grid_sse(qv, ccv, g0 + 1) + w * pen[g0 + 1])
            logm = log_mtts[im] + step_m * dlogm
            tau = taus[it] + step_t * dtau
            f_ref, s_ref = _gamma_model_sse(c[v], ccv, tr, table, t0, dt_table, il, logm, tau)
            if s_ref + w * _prior_penalty(logm, tau, prior) < j0:
                flow = f_ref
                sse = s_ref
            else:
                p0 = np.float64(qv[g0])
                flow = p0 / norms[g0] if p0 > 0.0 else 0.0
                logm = log_mtts[im]
                tau = taus[it]
                sse = s0
            logm, tau, flow, sse = _refine_one(c[v], ccv, tr, table, t0, dt_table, il, logm, tau, flow, sse, w,
                                               prior, h_logm, h_tau, lo_logm, hi_logm, lo_tau, hi_tau, rounds)
            obj = sse + w * _prior_penalty(logm, tau, prior)
            if r_il < 0 or obj < r_obj:
                r_flow, r_logm, r_tau, r_sse, r_obj, r_il = flow, logm, tau, sse, obj, il
        out_flow[v] = r_flow
        out_logm[v] = r_logm
        out_tau[v] = r_tau
        out_sse[v] = r_sse
        out_il[v] = r_il


# --- Tikhonov / GCV


@njit(cache=True, nogil=True)
def _tikhonov_gcv(x, s, vt, mus, out_b, out_mu):
    """Per-voxel Tikhonov deconvolution with mu chosen by generalised cross-validation.

    x: (n_vox, L) projections U^T c of each tissue curve (U square, so the residual lies in their
    span); s: (L,) singular values; vt: (L, L) right singular vectors as rows; mus: (n_mu,) candidate
    mu. Filter factors f_i = s_i^2 / (s_i^2 + mu^2), taken as 0 where s_i == 0. For each mu,
    GCV = sum_i (1 - f_i)^2 x_i^2 / (sum_i (1 - f_i))^2, both sums of 1 - f_i = mu^2 / (s_i^2 + mu^2)
    (= L - sum f_i, without the cancellation); the smallest GCV wins, the first in grid order on a
    tie. Writes b = sum_i vt[i] x_i s_i / (s_i^2 + mu^2) into out_b (n_vox, L) and the chosen mu into
    out_mu (n_vox,). Rows of x that hold a NaN or inf, or where no GCV is finite, give NaN b and mu.
    Serial over voxels: the caller runs chunks on threads (nogil).
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
    for v in range(n_vox):
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
