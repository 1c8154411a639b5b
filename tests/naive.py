"""Slow, obviously correct numpy twins of the numba kernels in perfusion._kernels."""

import numba
import numpy as np

#: numba's JIT is off (NUMBA_DISABLE_JIT=1, ``make test-nojit``): the kernels run as plain Python, a few
#: hundred times slower, and the kernel tests shrink their inputs (same cases, fewer voxels).
NOJIT = bool(numba.config.DISABLE_JIT)


def oscillation_index(b):
    b = np.asarray(b, dtype=np.float64)
    fmax = b.max()
    if not fmax > 0:
        return np.inf
    return np.sum(np.abs(b[2:] - 2 * b[1:-1] + b[:-2])) / (b.size * fmax)


def osvd_search(x, s, vt, k_max, oi_target, ends=None):
    """For each voxel, the residue with the largest k <= k_max that ends a group of equal singular values
    (``ends[k - 1]``; every k when None) and whose OI <= target (the first such k if none; k = 0 and a zero
    residue if no group ends within k_max). Voxels with a projection that is not finite: NaN and k = 0."""
    ends = np.ones(len(s), bool) if ends is None else np.asarray(ends, bool)
    n_vox, length = x.shape
    out_b = np.full((n_vox, length), np.nan)
    out_k = np.zeros(n_vox, dtype=np.int64)
    for v in range(n_vox):
        if not np.all(np.isfinite(x[v])):
            continue
        out_b[v] = 0.0
        for k in range(1, k_max + 1):
            if not ends[k - 1]:
                continue
            b = vt[:k].T @ (np.asarray(x[v, :k], np.float64) / s[:k])
            if out_k[v] == 0 or oscillation_index(b) <= oi_target:
                out_b[v], out_k[v] = b, k
    return out_b, out_k



# --- Tikhonov / GCV


def tikhonov_gcv(x, s, vt, mus):
    """For each voxel, the Tikhonov residue at the grid mu of least GCV (first on a tie), and that mu."""
    n_vox, length = x.shape
    out_b = np.full((n_vox, length), np.nan)
    out_mu = np.full(n_vox, np.nan)
    s = np.asarray(s, np.float64)
    nz = s != 0
    for v in range(n_vox):
        xv = np.asarray(x[v], np.float64)
        if not np.all(np.isfinite(xv)):
            continue
        best, best_mu = np.inf, None
        for mu in mus:
            # 1 - f_i with f_i = s_i^2 / (s_i^2 + mu^2), and f_i = 0 where s_i = 0
            one_minus_f = np.where(nz, mu ** 2 / np.where(nz, s ** 2 + mu ** 2, 1.0), 1.0)
            gcv = np.sum((one_minus_f * xv) ** 2) / np.sum(one_minus_f) ** 2  # sum(1 - f) = L - sum(f)
            if gcv < best:
                best, best_mu = gcv, mu
        if best_mu is None:
            continue
        phi = np.where(nz, s / np.where(nz, s ** 2 + best_mu ** 2, 1.0), 0.0)  # s / (s^2 + mu^2)
        out_b[v] = vt.T @ (phi * xv)
        out_mu[v] = best_mu
    return out_b, out_mu


# --- gamma-residue model refinement


def gamma_model_sse(c, tr, table, t0, dt_table, il, logm, tau):
    """Flow and residual of the unit-flow model, written plainly: the response interpolated in log MTT,
    then read at t_k - tau with np.interp (0 before the first sample)."""
    n = c.size
    x = (logm - t0) / dt_table
    j = int(np.clip(np.floor(x), 0, table.shape[1] - 2))
    f = float(np.clip(x - j, 0.0, 1.0))
    resp = table[il, j] * (1 - f) + table[il, j + 1] * f
    xs = np.arange(n) - tau / tr
    y = np.where(xs < 0, 0.0, np.interp(xs, np.arange(resp.size), resp))
    yy, yc, cc = y @ y, y @ c, c @ c
    if yy <= 0 or yc <= 0:
        return 0.0, cc
    return yc / yy, cc - yc / yy * yc


def prior_penalty(logm, tau, prior):
    """((logm - prior[0]) k)^2 + ((tau - prior[3]) j)^2: k = prior[1] below prior[0], prior[2] above;
    j = prior[4] below prior[3], prior[5] above."""
    a, b = logm - prior[0], tau - prior[3]
    return (a * (prior[1] if a < 0 else prior[2])) ** 2 + (b * (prior[4] if b < 0 else prior[5])) ** 2


def gamma_refine(c, tr, table, t0, dt_table, il, log_m, tau, flow, sse, s2, prior, h_logm, h_tau, lo_logm, hi_logm,
                 lo_tau, hi_tau, rounds):
    """Parabolic rounds on J = residual + s2 * prior_penalty; returns log MTT, tau, flow and the plain residual."""
    log_m, tau, flow, sse = (np.array(v, dtype=np.float64) for v in (log_m, tau, flow, sse))
    s2 = np.broadcast_to(np.asarray(s2, dtype=np.float64), log_m.shape)
    for v in range(c.shape[0]):
        h = [h_logm, h_tau]
        lo, hi = [lo_logm, lo_tau], [hi_logm, hi_tau]

        def objective(x):
            f, r = gamma_model_sse(c[v], tr, table, t0, dt_table, il[v], *x)
            return f, r, r + s2[v] * prior_penalty(x[0], x[1], prior)

        obj = sse[v] + s2[v] * prior_penalty(log_m[v], tau[v], prior)
        for _ in range(rounds):
            for d in range(2):
                x = [log_m[v], tau[v]]
                xm, xp = list(x), list(x)
                xm[d] = max(x[d] - h[d], lo[d])
                xp[d] = min(x[d] + h[d], hi[d])
                sm = objective(xm)[2]
                sp = objective(xp)[2]
                denom = sm - 2 * obj + sp
                step = float(np.clip(0.5 * (sm - sp) / denom, -1, 1)) if denom > 0 else 0.0
                xn = list(x)
                xn[d] = min(max(x[d] + h[d] * step, lo[d]), hi[d])
                fn, sn, on = objective(xn)
                if on < obj:
                    obj, sse[v], flow[v], log_m[v], tau[v] = on, sn, fn, xn[0], xn[1]
            h = [h[0] / 2, h[1] / 2]
    return log_m, tau, flow, sse


def model_select(c, q, s2, pen, prior, norms, log_mtts, taus, tr, table, t0, dt_table, n_lam, n_shapes, h_logm, h_tau,
                 lo_logm, hi_logm, lo_tau, hi_tau, rounds):
    """Twin of _kernels._model_select, written with numpy over all voxels at once (the form modelfit had
    before the kernel): J = grid residual + s2 * pen per grid point, per shape the argmin of J, the
    n_shapes best shapes (stable order), a parabolic step on the grid's J, the exact model kept if its
    J is lower, then gamma_refine; the least J wins. Returns flow, log MTT, shape index, tau, residual."""
    c = np.asarray(c, np.float64)
    n = c.shape[0]
    gm, gt = len(log_mtts), len(taus)
    cc = np.einsum("vn,vn->v", c, c)
    s2 = np.asarray(s2, np.float64)
    q64 = q.astype(np.float64)
    j_all = np.where(q64 > 0, cc[:, None] - q64 * q64, cc[:, None]) + s2[:, None] * pen[None, :]
    per = j_all.reshape(n, n_lam, gm * gt)
    best = np.argmin(per, axis=2)
    rows = np.arange(n)
    top = per[rows[:, None], np.arange(n_lam)[None, :], best]
    order = np.argsort(top, axis=1, kind="stable")[:, :n_shapes]

    def sse_at(il, m, tt):
        p = q64[rows, (il * gm + m) * gt + tt]
        return np.where(p > 0, cc - p * p, cc)

    def j_at(il, m, tt):
        return j_all[rows, (il * gm + m) * gt + tt]

    def parabola(fm, f0, fp):
        with np.errstate(divide="ignore", invalid="ignore"):
            d = fm - 2 * f0 + fp
            return np.where(d > 0, np.clip(0.5 * (fm - fp) / d, -1, 1), 0.0)

    result = None
    for rank in range(order.shape[1]):
        il = order[:, rank]
        im, it = np.divmod(best[rows, il], gt)
        s0, j0 = sse_at(il, im, it), j_at(il, im, it)
        inner_m, inner_t = (im > 0) & (im < gm - 1), (it > 0) & (it < gt - 1)
        mm, mp = np.clip(im - 1, 0, gm - 1), np.clip(im + 1, 0, gm - 1)
        tm, tp = np.clip(it - 1, 0, gt - 1), np.clip(it + 1, 0, gt - 1)
        step_m = np.where(inner_m, parabola(j_at(il, mm, it), j0, j_at(il, mp, it)), 0.0)
        step_t = np.where(inner_t, parabola(j_at(il, im, tm), j0, j_at(il, im, tp)), 0.0)
        log_m = np.asarray(log_mtts)[im] + step_m * (log_mtts[1] - log_mtts[0])
        tau = np.asarray(taus)[it] + step_t * (taus[1] - taus[0])
        ex = np.array([gamma_model_sse(c[v], tr, table, t0, dt_table, il[v], log_m[v], tau[v]) for v in range(n)])
        j_ex = ex[:, 1] + s2 * np.array([prior_penalty(log_m[v], tau[v], prior) for v in range(n)])
        use = j_ex < j0
        g0 = (il * gm + im) * gt + it
        p0 = q64[rows, g0]
        flow = np.where(use, ex[:, 0], np.where(p0 > 0, p0 / norms[g0], 0.0))
        log_m = np.where(use, log_m, np.asarray(log_mtts)[im])
        tau = np.where(use, tau, np.asarray(taus)[it])
        sse = np.where(use, ex[:, 1], s0)
        log_m, tau, flow, sse = gamma_refine(c, tr, table, t0, dt_table, il, log_m, tau, flow, sse, s2, prior, h_logm,
                                             h_tau, lo_logm, hi_logm, lo_tau, hi_tau, rounds)
        obj = sse + s2 * np.array([prior_penalty(log_m[v], tau[v], prior) for v in range(n)])
        cand = (flow, log_m, il, tau, sse, obj)
        if result is None:
            result = cand
        else:
            better = obj < result[5]
            result = tuple(np.where(better, a, b) for a, b in zip(cand, result))
    return result[:5]


# --- gamma-variate fit

from perfusion._kernels.curves import (  # noqa: E402  (the same damping rules and tolerances as the kernel)
    GV_DIAG_FLOOR, GV_FTOL, GV_LAM0, GV_LAM_MAX, GV_LAM_MIN, GV_SSE_FLOOR, GV_SSE_ROUND, GV_XTOL,
)


def gamma_model(t, p):
    """A (x/m)^alpha exp(alpha (1 - x/m)) for x = t - t0 > 0, else 0; p = (A, t0, m, alpha)."""
    amp, t0, m, alpha = p
    x = np.asarray(t, dtype=np.float64) - t0
    u = np.where(x > 0, x / m, 1.0)
    return np.where(x > 0, amp * np.exp(alpha * (np.log(u) + 1.0 - u)), 0.0)


def gamma_jacobian(t, p):
    """(n, 4): derivatives of gamma_model by A, t0, m, alpha; 0 where t <= t0."""
    amp, t0, m, alpha = p
    x = np.asarray(t, dtype=np.float64) - t0
    u = np.where(x > 0, x / m, 1.0)
    lg = np.log(u) + 1.0 - u
    e = np.exp(alpha * lg)
    f = amp * e
    jac = np.stack([e, f * alpha * (1.0 - 1.0 / u) / m, f * alpha * (u - 1.0) / m, f * lg], axis=1)
    return np.where((x > 0)[:, None], jac, 0.0)


def gamma_fit(curves, t, lo, hi, p0, lower, upper, max_iter):
    """Bounded Levenberg-Marquardt per voxel, the twin of _kernels_curves._gv_fit. Each trial step is one
    iteration: solve (H + lam D) delta = g (parameters on a bound that g pushes out are held), clip
    to the bounds; take it unless the SSE rises beyond rounding (Nielsen's lam update, J
    recomputed, stop on MINPACK's step and predicted-decrease tests or an SSE at rounding), else
    lam *= nu, nu *= 2."""
    n_vox = curves.shape[0]
    out_p = np.full((n_vox, 4), np.nan)
    out_sse = np.full(n_vox, np.nan)
    out_iter = np.zeros(n_vox, dtype=np.int64)
    out_status = np.full(n_vox, -1, dtype=np.int64)
    for v in range(n_vox):
        y = np.asarray(curves[v, lo[v]:hi[v]], dtype=np.float64)
        tt = t[lo[v]:hi[v]]
        keep = np.isfinite(y)
        y, tt = y[keep], tt[keep]
        if y.size <= 4:
            continue
        p = np.clip(p0[v], lower[v], upper[v]).astype(np.float64)
        sse = np.sum((y - gamma_model(tt, p)) ** 2)
        scale = np.sum(y ** 2) + sse  # of the rounding floor
        lam, nu, status, it, need_j = GV_LAM0, 2.0, 0, 0, True
        while it < max_iter:
            it += 1
            if need_j:
                jac = gamma_jacobian(tt, p)
                h = jac.T @ jac
                g = jac.T @ (y - gamma_model(tt, p))
                need_j = False
            diag = np.maximum(np.diag(h), GV_DIAG_FLOOR * np.diag(h).max())
            a, b = h + lam * np.diag(diag), g.copy()
            active = ((p <= lower[v]) & (g < 0)) | ((p >= upper[v]) & (g > 0))  # on a bound, pushed out
            a[active, :] = 0.0
            a[:, active] = 0.0
            a[active, active] = 1.0
            b[active] = 0.0
            try:
                delta = np.linalg.solve(a, b)
            except np.linalg.LinAlgError:
                status = -2
                break
            if not np.all(np.isfinite(delta)):
                status = -2
                break
            p_new = np.clip(p + delta, lower[v], upper[v])
            sse_new = np.sum((y - gamma_model(tt, p_new)) ** 2)
            if sse_new <= sse + GV_SSE_ROUND * np.sqrt(sse * scale):
                step = p_new - p
                pred = step @ (2.0 * g - h @ step)  # the decrease the linear model predicts
                rho = np.clip((sse - sse_new) / pred, 0.0, 1.0) if pred > 0 else 0.0
                small = np.all(np.abs(step) <= GV_XTOL * np.array([abs(p[0]), p[2], p[2], p[3]]))
                p, sse = p_new, sse_new
                lam = max(lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), GV_LAM_MIN)
                nu, need_j = 2.0, True
                if small or pred <= GV_FTOL * sse or sse <= GV_SSE_FLOOR * scale:
                    status = 1
                    break
            else:
                lam *= nu
                nu *= 2.0
                if lam > GV_LAM_MAX:
                    status = 2
                    break
        out_p[v], out_sse[v], out_iter[v], out_status[v] = p, sse, it, status
    return out_p, out_sse, out_iter, out_status
