"""Plain numpy twins of the kernels in perfusion._kernels.curves: slow where they must be, obviously
right, and written the way the domain modules computed these values before the kernels (so they
also pin that the kernels changed no result). The gamma-variate LM twin is naive.gamma_fit."""

import numpy as np


# --- signal


def delta_r2s(sig, base, te, min_ratio):
    """Twin of _delta_r2s: (delta R2*, S0, min_t S/S0, SD of S/S0 over the frames ``base``)."""
    s = np.asarray(sig, dtype=np.float64)
    s0 = s[:, base].mean(axis=1)
    ok = s0 > 0
    ratio = np.full_like(s, np.nan)
    ratio[ok] = np.maximum(s[ok] / s0[ok, None], min_ratio)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = s / s0[:, None]
        return -np.log(ratio) / te, s0, np.min(r, axis=1), np.std(r[:, base], axis=1, ddof=1)


# --- aif


def curve_features(c, base, tr):
    """Twin of _curve_features: (peak, peak_frame, area, fwhm, first_moment, irregularity, cnr, finite)."""
    c = np.asarray(c, dtype=np.float64)
    finite = np.all(np.isfinite(c), axis=1)
    c = np.where(finite[:, None], c, 0.0)
    peak_frame = np.argmax(c, axis=1)
    peak = c[np.arange(c.shape[0]), peak_frame]
    area = np.sum(c, axis=1) * tr
    fwhm = np.sum(c >= 0.5 * peak[:, None], axis=1).astype(np.float64)
    pos = np.clip(c, 0.0, None)
    t = np.arange(c.shape[1], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        first_moment = (pos @ t) / np.sum(pos, axis=1)
        d2 = np.diff(c, n=2, axis=1)
        irregularity = np.sum(d2 * d2, axis=1) / (area / tr) ** 2
        cnr = peak / np.std(c[:, base], axis=1, ddof=1)
    cnr = np.where(~finite | ~np.isfinite(cnr), 0.0, cnr)
    return (peak, peak_frame, area, fwhm, np.where(finite, first_moment, np.inf),
            np.where(finite, irregularity, np.inf), cnr, finite)


# --- leakage


def _r2(y, sse):
    sst = np.sum((y - y.mean(axis=1, keepdims=True)) ** 2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / sst, np.nan)


def residue_fixed_kep(c, g, u_tail, q, dof, var_factor):
    """Twin of _residue_fixed_kep: (ka, se, r2, leakage, corrected)."""
    c = np.asarray(c, dtype=np.float64)
    finite = np.all(np.isfinite(c), axis=1)
    y = np.where(finite[:, None], c, 0.0)
    ka = y @ g
    resid2 = np.sum((y @ u_tail) ** 2, axis=1)
    valid = finite & np.isfinite(ka)
    nan = np.where(valid, 1.0, np.nan)
    leak = ka[:, None] * q[None, :]
    return (ka * nan, np.sqrt(resid2 / dof * var_factor) * nan, _r2(y, resid2) * nan,
            np.where(valid[:, None], leak, np.nan), np.where(valid[:, None], y + leak, np.nan))


def two_regressor_shared(c, r, q, rr, qq, rq, solvable, dof, var_factor, gate_k):
    """Twin of _two_regressor_shared: (k1, k2, se, r2, leakage, corrected, applied)."""
    c = np.asarray(c, dtype=np.float64)
    finite = np.all(np.isfinite(c), axis=1)
    y = np.where(finite[:, None], c, 0.0)
    yr, yq = y @ r, y @ q
    det = rr * qq - rq * rq
    with np.errstate(divide="ignore", invalid="ignore"):
        k1 = np.where(solvable, (qq * yr - rq * yq) / det, np.nan)
        k2 = np.where(solvable, (rq * yr - rr * yq) / det, np.nan)
        sse = np.maximum(np.einsum("vt,vt->v", y, y) - k1 * yr + k2 * yq, 0.0)
        se = np.sqrt(sse / dof * var_factor)
    valid = finite & np.isfinite(k2)
    apply = valid & ((gate_k < 0) | (np.abs(k2) > gate_k * se))
    nan = np.where(valid, 1.0, np.nan)
    leak = np.where(apply[:, None], k2[:, None] * q[None, :], 0.0)
    return (k1 * nan, k2 * nan, se * nan, _r2(y, sse) * nan, np.where(valid[:, None], leak, np.nan),
            np.where(valid[:, None], y + leak, np.nan), apply)


# --- gamma-variate windows


def _noise_sd(c, finite):
    """Robust noise SD per row from the median |first difference| of finite neighbours; NaN if none."""
    ok = finite[:, 1:] & finite[:, :-1]
    d = np.where(ok, np.abs(np.diff(np.where(finite, c, 0.0), axis=1)), np.inf)
    d.sort(axis=1)
    n = ok.sum(axis=1)
    rows = np.arange(c.shape[0])
    med = 0.5 * (d[rows, np.maximum(n - 1, 0) // 2] + d[rows, n // 2 - (n == 0)])
    return np.where(n > 0, 1.4826 * med / np.sqrt(2.0), np.nan)


def _crossing(t, c, i, level):
    """Time where c crosses ``level`` between frames i and i + 1 (linear interpolation)."""
    rows = np.arange(c.shape[0])
    c0, c1 = c[rows, i], c[rows, i + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(c1 != c0, (level - c0) / (c1 - c0), 0.5)
    return t[i] + np.clip(w, 0.0, 1.0) * (t[i + 1] - t[i])


def gamma_windows(c, t, *, tr, rise_fraction, tail_fraction, pre_frames, min_snr, m_min, alpha_bounds, fwhm_per_sd):
    """Twin of _gv_windows: (lo, hi, p0, lower, upper, n_used); gammafit's rules, one numpy pass each."""
    c = np.asarray(c, dtype=np.float64)
    n_vox, n_t = c.shape
    rows = np.arange(n_vox)
    idx = np.arange(n_t)
    finite = np.isfinite(c)
    ip = np.argmax(np.where(finite, c, -np.inf), axis=1)
    peak = np.where(finite.any(axis=1), c[rows, ip], np.nan)
    with np.errstate(invalid="ignore"):
        before = finite & (idx < ip[:, None])
        after = finite & (idx > ip[:, None])
        below_rise = before & (c < rise_fraction * peak[:, None])
        below_half = before & (c < 0.5 * peak[:, None])
        fall_half = after & (c < 0.5 * peak[:, None])
        below_tail = after & (c < tail_fraction * peak[:, None])
        bolus = (peak > 0) & (peak >= min_snr * _noise_sd(c, finite))
    has_foot = below_rise.any(axis=1)
    foot = n_t - 1 - np.argmax(below_rise[:, ::-1], axis=1)
    lo = np.maximum(foot - np.maximum(pre_frames, ip - foot), 0)
    hi = np.where(below_tail.any(axis=1), np.argmax(below_tail, axis=1), n_t - 1) + 1
    ok = bolus & has_foot
    i_up = n_t - 1 - np.argmax(below_half[:, ::-1], axis=1)
    i_dn = np.argmax(fall_half, axis=1)
    has_dn = fall_half.any(axis=1) & (i_dn < hi)
    cz = np.where(finite, c, 0.0)
    t_up = _crossing(t, cz, np.clip(i_up, 0, n_t - 2), 0.5 * peak)
    t_dn = _crossing(t, cz, np.clip(i_dn - 1, 0, n_t - 2), 0.5 * peak)
    t0 = t[foot]
    m = t[ip] - t0
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = np.where(has_dn & (t_dn > t_up), (fwhm_per_sd * m / (t_dn - t_up)) ** 2, 3.0)
    alpha = np.clip(np.nan_to_num(alpha, nan=3.0), 1.0, 10.0)
    p0 = np.stack([peak, t0, m, alpha], axis=1)
    lower = np.stack([np.zeros(n_vox), t[lo], np.full(n_vox, m_min), np.full(n_vox, alpha_bounds[0])], axis=1)
    upper = np.stack([np.full(n_vox, np.inf), t[ip], t[hi - 1] - t[lo], np.full(n_vox, alpha_bounds[1])], axis=1)
    lo = np.where(ok, lo, 0).astype(np.int64)
    hi = np.where(ok, hi, 0).astype(np.int64)
    n_used = np.sum((idx >= lo[:, None]) & (idx < hi[:, None]) & finite, axis=1)
    return (lo, hi, np.where(ok[:, None], p0, 1.0), np.where(ok[:, None], lower, 0.0),
            np.where(ok[:, None], upper, 2.0), n_used)


def kmeans(x, init, max_iter=100):
    """Twin of aif.kmeans (the numpy form it had before the _kmeans_assign kernel)."""
    x = np.asarray(x, dtype=np.float64)
    cent = np.array(init, dtype=np.float64, copy=True)
    labels = np.full(x.shape[0], -1)
    for _ in range(max_iter):
        d2 = np.sum((x[:, None, :] - cent[None, :, :]) ** 2, axis=2)
        new = np.argmin(d2, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for k in range(cent.shape[0]):
            members = labels == k
            if members.any():
                cent[k] = x[members].mean(axis=0)
    return labels, cent


# --- leakage: the bidirectional model's profile fit


def bidirectional_profile(c, ref, tr, kep_max, n_grid, baseline):
    """Twin of leakage.bidirectional(method="profile") and its kernel _bidirectional_profile, in the
    numpy form it had before the kernel (every step one array pass over all rows, with the (V, G) grid
    and (V, n_t) temporaries): (k1, k2, kep, se, r2, leakage, corrected, valid)."""
    from perfusion.quantify.leakage import exp_integral

    c = np.asarray(c, dtype=np.float64)
    n_t = c.shape[1]
    finite = np.all(np.isfinite(c), axis=1)
    y = np.where(finite[:, None], c, 0.0)
    # the kep grid: for each grid kep, K1 and K2 from the 2 x 2 normal equations; SSE = y.y - gain
    grid = np.linspace(0.0, kep_max, n_grid)
    lg = exp_integral(ref, tr=tr, kep=grid)  # (G, n_t)
    rr = ref @ ref
    rl = lg @ ref
    ll = np.einsum("gt,gt->g", lg, lg)
    det = rr * ll - rl * rl
    yr = y @ ref
    yl = y @ lg.T  # (V, G)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = (ll * yr[:, None] ** 2 - 2.0 * rl * yr[:, None] * yl + rr * yl ** 2) / det
    gain = np.where(np.isfinite(gain), gain, -np.inf)
    j = np.argmax(gain, axis=1)
    rows = np.arange(y.shape[0])
    inner = (j > 0) & (j < n_grid - 1)
    jm, jp = np.clip(j - 1, 0, n_grid - 1), np.clip(j + 1, 0, n_grid - 1)
    fm, f0, fp = -gain[rows, jm], -gain[rows, j], -gain[rows, jp]
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = fm - 2.0 * f0 + fp
        step = np.clip(np.nan_to_num(np.where(denom > 0, 0.5 * (fm - fp) / denom, 0.0)), -1.0, 1.0)
    kep = np.clip(grid[j] + np.where(inner, step, 0.0) * (grid[1] - grid[0]), 0.0, kep_max)
    # the fit at each row's kep
    q = exp_integral(np.broadcast_to(ref, y.shape), tr=tr, kep=kep)  # (V, n_t)
    r = np.broadcast_to(ref, y.shape)
    rr, qq, rq = (np.einsum("vt,vt->v", a, b) for a, b in ((r, r), (q, q), (r, q)))
    yr, yq = np.einsum("vt,vt->v", y, r), np.einsum("vt,vt->v", y, q)
    det = rr * qq - rq * rq
    ok = det > 1e-12 * rr * qq
    with np.errstate(divide="ignore", invalid="ignore"):
        k1 = np.where(ok, (qq * yr - rq * yq) / det, np.nan)
        k2 = np.where(ok, (rq * yr - rr * yq) / det, np.nan)
        sse = np.maximum(np.einsum("vt,vt->v", y, y) - k1 * yr + k2 * yq, 0.0)
        # SE(k2): k2 = h . y; noise of delta R2* with the S0 error shared by all frames (leakage._noise_terms)
        h = (rq[:, None] * r - rr[:, None] * q) / det[:, None]
        wb = np.zeros(n_t)
        inv_nb = 0.0
        if baseline is not None:
            idx = np.arange(n_t)[baseline]
            wb[idx], inv_nb = 1.0 / idx.size, 1.0 / idx.size
        sr, sq = (np.einsum("vt,t->v", a, np.ones(n_t)) for a in (r, q))
        p_one = ((qq * sr - rq * sq) / det)[:, None] * r + ((rr * sq - rq * sr) / det)[:, None] * q  # P 1
        h1 = h.sum(axis=1)
        var_factor = np.einsum("vt,vt->v", h, h) - 2.0 * h1 * (h @ wb) + inv_nb * h1 * h1
        trace_pm = 2.0 - 2.0 * (p_one @ wb) + inv_nb * (p_one @ np.ones(n_t))
        dof = np.maximum(n_t - 2.0 * wb.sum() + n_t * inv_nb - trace_pm - 1.0, 1.0)
        se = np.sqrt(sse / dof * var_factor)
    valid = finite & ok & np.isfinite(k2)
    nan = np.where(valid, 1.0, np.nan)
    leak = np.where(valid[:, None], k2[:, None] * q, np.nan)
    return (k1 * nan, k2 * nan, kep * nan, se * nan, _r2(y, sse) * nan, leak, np.where(valid[:, None], y + leak, np.nan),
            valid)
