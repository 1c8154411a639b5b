"""numba kernels of the deconvolution and the model fit: small loops, no validation, no I/O, no fastmath.

Each kernel has a plain numpy twin in ``tests/naive.py`` and is compared with it at rtol 1e-10.
The public wrappers that validate arguments live in the domain modules. Every kernel is serial over
the voxels it is given; the callers run chunks of voxels on threads (parallel.run_chunks).
"""

from __future__ import annotations

import numpy as np

from perfusion._kernels.jit import kernel
from perfusion._kernels.rows import row_finite


@kernel
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


@kernel
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
        if not row_finite(x[v]):
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


# --- gamma-residue model fit (modelfit.py)

#: The model fit's scalar settings, packed into one float64 array by :func:`pack_fit`; its indices.
#: FIT_TR: frame spacing (s); FIT_T0, FIT_DT_TABLE: the response table's first log MTT and its step;
#: FIT_H_LOGM, FIT_H_TAU: the first refinement steps in log MTT and in tau (s), halved each round;
#: FIT_LO_*, FIT_HI_*: the bounds of log MTT and of tau (s); FIT_N_SHAPES: shapes refined per voxel;
#: FIT_ROUNDS: exact refinement rounds. (The counts are whole numbers stored as floats.)
(FIT_TR, FIT_T0, FIT_DT_TABLE, FIT_H_LOGM, FIT_H_TAU, FIT_LO_LOGM, FIT_HI_LOGM, FIT_LO_TAU, FIT_HI_TAU, FIT_N_SHAPES,
 FIT_ROUNDS) = range(11)
FIT_SIZE = 11
#: Columns of the model fit's output, one (n_vox, OUT_SIZE) float64 array: flow F of the unit-flow model
#: (1/s), log MTT (MTT in s), delay tau (s), the plain residual (sum of squares, 1/s^2) and the shape's
#: index into the grid's lambdas (a whole number).
OUT_FLOW, OUT_LOGM, OUT_TAU, OUT_SSE, OUT_SHAPE = range(5)
OUT_SIZE = 5


def pack_fit(*, tr: float, t0: float, dt_table: float, h_logm: float, h_tau: float, lo_logm: float, hi_logm: float,
             lo_tau: float, hi_tau: float, n_shapes: int, rounds: int) -> np.ndarray:
    """The model fit's settings as the float64 array (FIT_SIZE,) the kernels read by the FIT_* indices
    (plain Python: called once per fit, not per voxel)."""
    fit = np.empty(FIT_SIZE)
    fit[FIT_TR], fit[FIT_T0], fit[FIT_DT_TABLE] = tr, t0, dt_table
    fit[FIT_H_LOGM], fit[FIT_H_TAU] = h_logm, h_tau
    fit[FIT_LO_LOGM], fit[FIT_HI_LOGM], fit[FIT_LO_TAU], fit[FIT_HI_TAU] = lo_logm, hi_logm, lo_tau, hi_tau
    fit[FIT_N_SHAPES], fit[FIT_ROUNDS] = n_shapes, rounds
    return fit


@kernel
def _gamma_model_sse(c, cc, tr, table, t0, dt_table, il, logm, tau):
    """Flow F >= 0 (projected) and residual of the unit-flow model at (shape il, log MTT, tau): the
    unit response Y interpolated linearly in log MTT from ``table`` (uniform grid t0 + k dt_table),
    read at t_k - tau by linear interpolation in time (0 before the first sample). O(N).

    Sample k reads Y at k - tau / tr, so every sample falls the same fraction g past a table index
    k + off: the four interpolation weights are the same for all k. Requires the table to extend at
    least 2 samples past N - 1 - tau / tr (modelfit.extension guarantees it within DELAY_BOUNDS_S;
    past the end the last pair would be used with the same weights). One function of about 60 lines:
    the weights, the two running sums and the tail loop share a dozen locals."""
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


@kernel
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


@kernel
def _refine_one(c, cc, table, fit, il, log_m, tau, flow, sse, s2, prior):
    """FIT_ROUNDS rounds of parabolic steps in log MTT then tau (first steps FIT_H_LOGM, FIT_H_TAU,
    halved each round; within the FIT_LO/HI bounds) on the exact model for one voxel, on the objective
    J = sse + s2 * _prior_penalty (s2 the voxel's noise variance times the prior's weight; 0: least
    squares); a step is kept only if it lowers J. Returns the updated (log_m, tau, flow, sse), sse the
    plain residual. One function of about 60 lines: the model fit's hot loop, and with its step in a
    function of its own (not inlined by numba) the whole fit took 15 % longer."""
    tr, t0, dt_table = fit[FIT_TR], fit[FIT_T0], fit[FIT_DT_TABLE]
    h0, h1 = fit[FIT_H_LOGM], fit[FIT_H_TAU]
    lo_logm, hi_logm, lo_tau, hi_tau = fit[FIT_LO_LOGM], fit[FIT_HI_LOGM], fit[FIT_LO_TAU], fit[FIT_HI_TAU]
    obj = sse + s2 * _prior_penalty(log_m, tau, prior)
    for _ in range(int(fit[FIT_ROUNDS])):
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


@kernel
def _parabola_step(f_minus, f0, f_plus):
    """Vertex offset (grid steps, within [-1, 1]) of the parabola through three equally spaced points;
    0 where it is not convex."""
    denom = f_minus - 2.0 * f0 + f_plus
    if not denom > 0.0:
        return 0.0
    return min(max(0.5 * (f_minus - f_plus) / denom, -1.0), 1.0)


@kernel
def _grid_sse(q, cc, g):
    """Residual of grid curve g with its projected flow (F >= 0), from its normalised projection q[g]."""
    p = np.float64(q[g])
    if p > 0.0:
        return cc - p * p
    return cc


@kernel
def _best_per_shape(qv, ccv, w, pen, per_shape, best_g, top):
    """One voxel's grid pick: for each shape i (best_g.shape[0] of them, per_shape grid points each),
    the grid point of least J = _grid_sse + w * pen (the first on a tie) into best_g[i], its J into top[i]."""
    for i in range(best_g.shape[0]):
        base = i * per_shape
        bi = base
        bj = _grid_sse(qv, ccv, base) + w * pen[base]
        for g in range(base + 1, base + per_shape):
            jg = _grid_sse(qv, ccv, g) + w * pen[g]
            if jg < bj:
                bj = jg
                bi = g
        best_g[i] = bi
        top[i] = bj


@kernel
def _next_shape(top, used):
    """The shape not yet used whose best J (top) is least, the lower index on a tie; marked used."""
    il = -1
    for i in range(top.shape[0]):
        if not used[i] and (il < 0 or top[i] < top[il]):
            il = i
    used[il] = True
    return il


@kernel
def _grid_start(cv, ccv, qv, w, il, g0, grid, table, prior, fit):
    """Where one voxel's refinement of shape il starts, from its best grid point g0: one parabolic step
    in log MTT and in tau on the grid's J (inside the grid only), kept if the exact model's J is then
    below g0's; else g0 itself with its projected flow. Returns (log_m, tau, flow, sse)."""
    pen, norms, log_mtts, taus = grid
    gm = log_mtts.shape[0]
    gt = taus.shape[0]
    im = (g0 - il * gm * gt) // gt
    it = (g0 - il * gm * gt) - im * gt
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
    logm = log_mtts[im] + step_m * (log_mtts[1] - log_mtts[0])
    tau = taus[it] + step_t * (taus[1] - taus[0])
    f_ref, s_ref = _gamma_model_sse(cv, ccv, fit[FIT_TR], table, fit[FIT_T0], fit[FIT_DT_TABLE], il, logm, tau)
    if s_ref + w * _prior_penalty(logm, tau, prior) < j0:
        return logm, tau, f_ref, s_ref
    p0 = np.float64(qv[g0])
    return log_mtts[im], taus[it], p0 / norms[g0] if p0 > 0.0 else 0.0, s0


@kernel
def _model_select(c, cc, q, s2, grid, table, prior, fit, out):
    """The model fit from the grid projections on, per voxel (modelfit's module docstring).

    c (n_vox, N) curves, cc (n_vox,) their sums of squares; q: (n_vox, G) float32 projections
    <c, y_g> / |y_g| on the unit-norm grid curves, laid out as (shape, MTT, tau); grid = (pen, norms,
    log_mtts, taus): pen (G,) the prior penalty of each grid point (_prior_penalty at its log MTT and
    tau), norms (G,) |y_g|, and the grid's log MTTs and taus (s), len(log_mtts) x len(taus) points
    per shape; table (G_l shapes, T, N + extension) the unit responses; fit the FIT_* settings.
    Objective J = residual + s2[v] * penalty: s2 (n_vox,) the weight of the prior (noise variance x
    weight; 0: least squares), prior the penalty's parameters. The grid point of least J is each
    shape's best (_best_per_shape); of the FIT_N_SHAPES shapes with the least best J (ties: lower
    index first), each is refined (_grid_start, then _refine_one). The candidate of least J wins
    (ties: the earlier). Writes out (n_vox, OUT_SIZE) by the OUT_* columns, the residual plain.
    Serial over voxels: the caller runs chunks on threads (nogil)."""
    n_lam = table.shape[0]
    per_shape = grid[2].shape[0] * grid[3].shape[0]
    best_g = np.empty(n_lam, np.int64)
    top = np.empty(n_lam)
    used = np.empty(n_lam, np.bool_)
    for v in range(c.shape[0]):
        w = s2[v]
        _best_per_shape(q[v], cc[v], w, grid[0], per_shape, best_g, top)
        used[:] = False
        r_flow = 0.0
        r_logm = 0.0
        r_tau = 0.0
        r_sse = np.inf
        r_obj = np.inf
        r_il = -1
        for _ in range(min(int(fit[FIT_N_SHAPES]), n_lam)):
            il = _next_shape(top, used)
            logm, tau, flow, sse = _grid_start(c[v], cc[v], q[v], w, il, best_g[il], grid, table, prior, fit)
            logm, tau, flow, sse = _refine_one(c[v], cc[v], table, fit, il, logm, tau, flow, sse, w, prior)
            obj = sse + w * _prior_penalty(logm, tau, prior)
            if r_il < 0 or obj < r_obj:
                r_flow, r_logm, r_tau, r_sse, r_obj, r_il = flow, logm, tau, sse, obj, il
        out[v, OUT_FLOW] = r_flow
        out[v, OUT_LOGM] = r_logm
        out[v, OUT_TAU] = r_tau
        out[v, OUT_SSE] = r_sse
        out[v, OUT_SHAPE] = r_il


# --- Tikhonov / GCV


@kernel
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
        finite = row_finite(x[v])
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
