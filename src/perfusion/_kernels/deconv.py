"""numba kernels of the deconvolution and the model fit: small loops, no validation, no I/O, no fastmath.

Each kernel has a plain numpy twin in ``tests/naive.py`` and is compared with it at rtol 1e-10.
The public wrappers that validate arguments live in the domain modules. Every kernel is serial over
the voxels it is given; the callers run chunks of voxels on threads (parallel.run_chunks).
"""

from __future__ import annotations

import numpy as np

from perfusion._kernels.jit import kernel
from perfusion._kernels.rows import row_finite

#: The oSVD search's tile: its voxels, one per column of each per-voxel array (row, voxel), so that every
#: inner loop runs across voxels: numba's loop vectoriser turns it into vector instructions while each
#: voxel's sums keep the order written (a sum along one voxel's residue would need reordering, which no
#: kernel allows). A tile's residue arrays hold OSVD_TILE_VALUES values each: 128 voxels at L = 160, 160 kB
#: an array, the tile's four (two working residues, the kept ones, the coefficients) within a 1 MB L2
#: cache; between 16 and 128 voxels, a multiple of 16. On the clinical volume (L = 156) 128 voxels ran
#: 8-14 % faster than 64, and 64 twice as fast as 16.
OSVD_TILE_VALUES = 20480


@kernel
def _tile_lanes(length, n_vox):
    """Voxels per tile for residues of ``length`` samples (OSVD_TILE_VALUES), at most n_vox, at least 1."""
    lanes = min(max(OSVD_TILE_VALUES // length // 16 * 16, 16), 128)
    return max(min(lanes, n_vox), 1)


@kernel
def _group_bounds(ends, k_max):
    """[0, k_1, k_2, ...]: the truncations k <= k_max that end a group of equal singular values
    (``ends[k - 1]``), ascending, after a leading 0; group g holds the terms bounds[g] .. bounds[g + 1] - 1."""
    bounds = np.empty(k_max + 1, np.int64)
    bounds[0] = 0
    n = 0
    for k in range(k_max):
        if ends[k]:
            n += 1
            bounds[n] = k + 1
    return bounds[: n + 1]


@kernel
def _tile_coefficients(xt, s, v0, nv, cf, bad):
    """The coefficients of the tile's voxels v0 .. v0 + nv - 1, cf[i, w] = xt[i, v0 + w] / s[i] for
    i < cf.shape[0], and bad[w]: 0 where every projection of voxel v0 + w (every row of xt) is finite,
    NaN where one is inf or NaN (the sum of x * 0: arithmetic, so the check runs across voxels in one loop)."""
    for w in range(nv):
        bad[w] = 0.0
    for i in range(cf.shape[0]):
        si = s[i]
        for w in range(nv):
            x = xt[i, v0 + w]
            bad[w] += x * 0.0
            cf[i, w] = x / si
    for i in range(cf.shape[0], xt.shape[0]):
        for w in range(nv):
            bad[w] += xt[i, v0 + w] * 0.0


@kernel
def _add_terms(bb, cf, vt, k0, k1, nv):
    """bb[:, w] += cf[i, w] * vt[i] for i = k0 .. k1 - 1, one term at a time (each voxel's residue is the
    running sum of its terms in order, as the numpy twin's prefix sums)."""
    for i in range(k0, k1):
        for r in range(bb.shape[0]):
            v = vt[i, r]
            for w in range(nv):
                bb[r, w] += cf[i, w] * v


@kernel
def _group_pass(src, dst, c1, v1, c2, v2, nv, sacc, macc):
    """The tile's residues with two more terms, dst = src + c1[w] * v1 + c2[w] * v2 added in that order
    (a group of one passes zeros as c2; src and dst (L, nv), one voxel per column), and per voxel the sum
    over t >= 2 of |b[t] - 2 b[t-1] + b[t-2]| of the new residue in the order of t (sacc; each second
    difference taken as a difference of first differences) and its max (macc): the oscillation index's
    parts, in the same pass over the rows.
    Long because four rows go per step (the last rows one by one): each voxel's running sum, max and
    first difference then stay in registers across them, which measured 1.7x faster than one row per step."""
    n = src.shape[0]
    for w in range(nv):
        y0 = (src[0, w] + c1[w] * v1[0]) + c2[w] * v2[0]
        y1 = (src[1, w] + c1[w] * v1[1]) + c2[w] * v2[1]
        dst[0, w] = y0
        dst[1, w] = y1
        sacc[w] = 0.0
        macc[w] = y1 if y1 > y0 else y0
    r = 2
    while r + 3 < n:
        a1, a2, b1, b2 = v1[r], v2[r], v1[r + 1], v2[r + 1]
        e1, e2, f1, f2 = v1[r + 2], v2[r + 2], v1[r + 3], v2[r + 3]
        for w in range(nv):
            p1 = dst[r - 1, w]
            d = p1 - dst[r - 2, w]
            y0 = (src[r, w] + c1[w] * a1) + c2[w] * a2
            y1 = (src[r + 1, w] + c1[w] * b1) + c2[w] * b2
            y2 = (src[r + 2, w] + c1[w] * e1) + c2[w] * e2
            y3 = (src[r + 3, w] + c1[w] * f1) + c2[w] * f2
            dst[r, w] = y0
            dst[r + 1, w] = y1
            dst[r + 2, w] = y2
            dst[r + 3, w] = y3
            d0 = y0 - p1
            d1 = y1 - y0
            d2 = y2 - y1
            d3 = y3 - y2
            acc = sacc[w] + abs(d0 - d)
            acc = acc + abs(d1 - d0)
            acc = acc + abs(d2 - d1)
            sacc[w] = acc + abs(d3 - d2)
            m = macc[w]
            m = y0 if y0 > m else m
            m = y1 if y1 > m else m
            m = y2 if y2 > m else m
            macc[w] = y3 if y3 > m else m
        r += 4
    while r < n:
        a1, a2 = v1[r], v2[r]
        for w in range(nv):
            y0 = (src[r, w] + c1[w] * a1) + c2[w] * a2
            dst[r, w] = y0
            p1 = dst[r - 1, w]
            sacc[w] += abs((y0 - p1) - (p1 - dst[r - 2, w]))
            m = macc[w]
            macc[w] = y0 if y0 > m else m
        r += 1


@kernel
def _take(sacc, macc, first, length, oi_target, take, nv):
    """take[w]: the tile's voxel w takes this group end, the first always (``first``), a later one where
    its oscillation index sacc / (length macc) <= oi_target with macc > 0 (OI = inf otherwise)."""
    if first:
        take[:nv] = True
        return
    for w in range(nv):
        m = macc[w]
        take[w] = (m > 0.0) & (sacc[w] / (length * m) <= oi_target)


@kernel
def _save(bb, kept, which, nv):
    """kept[w] = bb[:, w] for the tile's voxels w where which[w] (a few voxels: one column each)."""
    for w in range(nv):
        if which[w]:
            for r in range(bb.shape[0]):
                kept[w, r] = bb[r, w]


@kernel
def _osvd_tile(cf, zero, vt, bounds, nv, oi_target, work, kept, sacc, macc, take, took, best):
    """The search for one tile of nv voxels (columns), from their coefficients cf (terms, voxels): for
    each group end k in ``bounds`` in turn, the residue b_k (the running sum of the terms) and its
    oscillation index OI = sacc / (L macc); a voxel takes k at the first group end and at every later
    one with OI <= oi_target, a max that is not > 0 counting as OI = inf. On return best[w] holds the
    voxel's k and kept[w] its residue (0 and zeros where no group ends within k_max).
    The residues alternate between work[0] and work[1], so that b_k is still whole after the next group's
    pass: a voxel's residue is saved only where it took k and not the next group end (about once per
    voxel on the clinical volume, one column), not at every k it takes (about 30 times per voxel, as a
    vector pass over the tile: 5-10 % slower in all)."""
    length = work.shape[1]
    src = work[0]
    dst = work[1]
    src[:, :nv] = 0.0
    kept[:nv, :] = 0.0
    best[:nv] = 0
    took[:nv] = False
    for g in range(bounds.shape[0] - 1):
        k0 = bounds[g]
        k1 = bounds[g + 1]
        if k1 - k0 > 2:  # a group of more than two (rare): its first members are added in place
            _save(src, kept, took, nv)
            took[:nv] = False
            _add_terms(src, cf, vt, k0, k1 - 2, nv)
        if k1 - k0 >= 2:
            _group_pass(src, dst, cf[k1 - 2], vt[k1 - 2], cf[k1 - 1], vt[k1 - 1], nv, sacc, macc)
        else:
            _group_pass(src, dst, cf[k0], vt[k0], zero, vt[k0], nv, sacc, macc)
        _take(sacc, macc, g == 0, length, oi_target, take, nv)
        for w in range(nv):
            took[w] = took[w] and not take[w]  # took the last group end, not this one: save b_{k0}
        _save(src, kept, took, nv)
        for w in range(nv):
            best[w] = k1 if take[w] else best[w]
            took[w] = take[w]
        src, dst = dst, src
    _save(src, kept, took, nv)


@kernel
def _osvd_search(xt, s, vt, ends, k_max, oi_target, out_b, out_k):
    """Per-voxel oSVD truncation search.

    xt: (L, n_vox) projections U^T c of each tissue curve, one voxel per column; s: (L,) singular
    values, descending; vt: (L, L) right singular vectors as rows; ends: (L,) uint8, 1 where a group of
    equal singular values ends (only there is the truncated subspace independent of the SVD's arbitrary
    basis within a degenerate pair). For the truncations k = 1 .. k_max that end a group, the residue is
    b_k = sum_{i<k} vt[i] x[i] / s[i], summed in the order of i; the kernel keeps the largest such k whose
    oscillation index OI = sum_{t>=2} |b[t] - 2 b[t-1] + b[t-2]| / (L max b) is at or below
    ``oi_target`` (that is, the smallest relative threshold P), or the first group's end where none is
    (OI = inf where max b <= 0). Writes b into out_b (n_vox, L) and k into out_k (n_vox,). Voxels with a
    projection that is not finite give NaN b and k = 0. Voxels go a tile at a time (_tile_lanes,
    _osvd_tile). Serial over voxels: the caller runs chunks on threads (nogil).
    """
    length, n_vox = xt.shape
    bounds = _group_bounds(ends, k_max)
    lanes = _tile_lanes(length, n_vox)
    cf = np.empty((bounds[-1], lanes))
    zero = np.zeros(lanes)
    work = np.empty((2, length, lanes))
    kept = np.empty((lanes, length))
    sacc = np.empty(lanes)
    macc = np.empty(lanes)
    take = np.empty(lanes, np.bool_)
    took = np.empty(lanes, np.bool_)
    best = np.empty(lanes, np.int64)
    bad = np.empty(lanes)
    for v0 in range(0, n_vox, lanes):
        nv = min(lanes, n_vox - v0)
        _tile_coefficients(xt, s, v0, nv, cf, bad)
        _osvd_tile(cf, zero, vt, bounds, nv, oi_target, work, kept, sacc, macc, take, took, best)
        for w in range(nv):
            if bad[w] == 0.0:
                out_k[v0 + w] = best[w]
                out_b[v0 + w] = kept[w]
            else:
                out_k[v0 + w] = 0
                out_b[v0 + w] = np.nan


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
