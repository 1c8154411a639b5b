"""numba kernels of the per-voxel curve steps (signal, aif, leakage, gammafit): small loops over the
rows of an (n_vox, n_t) array, no validation, no I/O, no fastmath.

Each kernel has a plain numpy twin in ``tests/naive_curves.py`` and is compared with it at rtol 1e-10
(tests/test_kernels_curves.py). Curves may be float32 or float64; every value is taken to float64
before use. A division by 0 gives inf or NaN, as in numpy (jit.py). Every kernel is serial over the
rows it is given; the domain modules, which also validate the arguments, run chunks of rows on
threads (parallel.run_chunks).

Why kernels here: each step is a handful of numpy passes over the whole (n_vox, n_t) array, every
pass allocating a temporary of that size; one loop per row does all of them while the row is in
cache, and writes only the outputs.
"""

from __future__ import annotations

import numpy as np

from perfusion._kernels.jit import kernel
from perfusion._kernels.rows import row_finite


@kernel
def _sum_block(a, lo, n):
    """Sum of a[lo:lo + n] as numpy sums a block of up to 128 values: in order below 8 values, else 8
    running sums, combined pairwise, then the remainder in order."""
    if n < 8:
        s = 0.0
        for i in range(n):
            s += a[lo + i]
        return s
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        s += a[lo + i]
        i += 1
    return s


@kernel
def _halves(n):
    """numpy's split of more than 128 values: the first half rounded down to a multiple of 8."""
    n2 = n // 2
    return n2 - n2 % 8


# numpy halves a sum of more than 128 values recursively; numba's cache fails on recursive
# functions (a segfault when the cached code is loaded), so three levels are written out: exact up
# to about 1000 values, blocks of 8 running sums beyond.


@kernel
def _sum_1(a, lo, n):
    if n <= 128:
        return _sum_block(a, lo, n)
    n2 = _halves(n)
    return _sum_block(a, lo, n2) + _sum_block(a, lo + n2, n - n2)


@kernel
def _sum_2(a, lo, n):
    if n <= 128:
        return _sum_block(a, lo, n)
    n2 = _halves(n)
    return _sum_1(a, lo, n2) + _sum_1(a, lo + n2, n - n2)


@kernel
def _sum(a, lo, n):
    """Sum of a[lo:lo + n] in numpy's order (pairwise summation), so that a sum over a row equals
    numpy's (np.sum, mean, std over a contiguous axis) to the last bit for rows of up to about 1000
    values; the 8 running sums of a block do not wait on each other."""
    if n <= 128:
        return _sum_block(a, lo, n)
    n2 = _halves(n)
    return _sum_2(a, lo, n2) + _sum_2(a, lo + n2, n - n2)


@kernel
def _mean_ssd(x, n, work):
    """Mean of x[:n] and the sum of squared deviations from it, each as numpy computes them
    (x.mean(), ((x - x.mean()) ** 2).sum()); work (>= n,) is overwritten."""
    mean = _sum(x, 0, n) / n
    for i in range(n):
        d = x[i] - mean
        work[i] = d * d
    return mean, _sum(work, 0, n)


# --- signal.py


@kernel
def _delta_r2s(sig, base, te, min_ratio, out, out_s0, out_ratio_min, out_ratio_sd):
    """S(t) -> delta R2*(t) = -ln(max(S / S0, min_ratio)) / te per row, S0 the mean of the frames
    ``base`` (int array, at least one frame); NaN rows where S0 is not positive.

    sig (n_vox, n_t) signal, a.u.; te s. Writes out (n_vox, n_t) 1/s (float32 or float64), out_s0,
    and the statistics of the plain ratio r = S / S0 (no floor, whatever S0): out_ratio_min = min_t r
    (NaN if any r is NaN) and out_ratio_sd = SD of r over ``base`` (ddof 1), each (n_vox,).
    """
    n_vox, n_t = sig.shape
    nb = base.shape[0]
    x = np.empty(nb)
    work = np.empty(nb)
    for v in range(n_vox):
        for j in range(nb):
            x[j] = sig[v, base[j]]
        s0 = _sum(x, 0, nb) / nb
        out_s0[v] = s0
        ok = s0 > 0.0
        rmin = np.inf
        has_nan = False
        for i in range(n_t):
            r = np.float64(sig[v, i]) / s0
            if r < rmin:
                rmin = r
            elif np.isnan(r):
                has_nan = True
            if ok:
                if r < min_ratio:
                    r = min_ratio
                out[v, i] = -np.log(r) / te
            else:
                out[v, i] = np.nan
        out_ratio_min[v] = np.nan if has_nan else rmin
        for j in range(nb):
            x[j] = x[j] / s0
        _, ssd = _mean_ssd(x, nb, work)
        out_ratio_sd[v] = np.sqrt(ssd / (nb - 1))


# --- aif.py


@kernel
def _peak_width_moment(y, work):
    """A finite row y's first maximum and its frame, the frames at or above half of it, and the first
    moment sum t y+ / sum y+ (frames, y+ = max(y, 0)); work (>= n_t,) is overwritten."""
    n_t = y.shape[0]
    peak_frame = 0
    peak = y[0]
    pos_t = 0.0
    for i in range(n_t):
        x = y[i]
        if x > peak:
            peak = x
            peak_frame = i
        pos = x if x > 0.0 else 0.0
        work[i] = pos
        pos_t += pos * i
    pos = _sum(work, 0, n_t)
    half = 0.5 * peak
    n_above = 0
    for i in range(n_t):
        if y[i] >= half:
            n_above += 1
    return peak, peak_frame, n_above, pos_t / pos


@kernel
def _curve_features(c, base, tr, out_peak, out_peak_frame, out_area, out_fwhm, out_first_moment,
                    out_irregularity, out_cnr, out_finite):
    """Shape features of each row of c (n_vox, n_t), delta R2* 1/s, frames every tr s; a row with a
    non-finite value is read as all zeros and flagged in out_finite.

    peak (1/s) and peak_frame: the first maximum; area = tr sum c (1/s * s); fwhm: the number of
    frames at or above half the peak; first_moment = sum t c+ / sum c+ (frames, c+ = max(c, 0)),
    NaN where c+ is 0, +inf for a non-finite row; irregularity = sum (second difference)^2 /
    (area / tr)^2, +inf for a non-finite row; cnr = peak / SD of c over the frames ``base`` (ddof 1),
    0 where that is not finite.
    """
    n_vox, n_t = c.shape
    nb = base.shape[0]
    y = np.empty(n_t)
    work = np.empty(n_t)
    for v in range(n_vox):
        if not row_finite(c[v]):
            out_finite[v] = False
            out_peak[v] = 0.0
            out_peak_frame[v] = 0
            out_area[v] = 0.0 * tr
            out_fwhm[v] = n_t
            out_first_moment[v] = np.inf
            out_irregularity[v] = np.inf
            out_cnr[v] = 0.0
            continue
        out_finite[v] = True
        for i in range(n_t):
            y[i] = c[v, i]
        peak, peak_frame, n_above, first_moment = _peak_width_moment(y, work)
        for i in range(n_t - 2):
            d2 = (y[i + 2] - y[i + 1]) - (y[i + 1] - y[i])
            work[i] = d2 * d2
        rough = _sum(work, 0, n_t - 2)
        area = _sum(y, 0, n_t) * tr
        a = area / tr
        for j in range(nb):
            work[j] = y[base[j]]
        _, ssd = _mean_ssd(work, nb, work)
        cnr = peak / np.sqrt(ssd / (nb - 1))
        out_peak[v] = peak
        out_peak_frame[v] = peak_frame
        out_area[v] = area
        out_fwhm[v] = n_above
        out_first_moment[v] = first_moment
        out_irregularity[v] = rough / (a * a)
        out_cnr[v] = cnr if np.isfinite(cnr) else 0.0


# --- leakage.py


@kernel
def _residue_fixed_kep(c, ukg, uk_t, q, dof, var_factor, out_ka, out_se, out_r2, out_leakage, out_corrected):
    """Residue-domain leakage correction with one kep for all voxels (leakage.residue_domain).

    c (n_vox, n_t) delta R2* 1/s; ukg (n_t, k + 1): the k left singular vectors of the AIF matrix that
    the truncated SVD keeps, U_k, as columns, then g, with Ka = g . c; uk_t (k, n_t) = U_k^T, so that
    the residual of the truncated fit is c - tr A b = c - U_k U_k^T c; q (n_t,): the leakage integral
    int a(u) exp(-kep (t - u)) du (s). Per row: Ka, SE(Ka) = sqrt(resid2 / dof * var_factor) with
    resid2 = |c - tr A b|^2, r2 = 1 - resid2 / SST (NaN where SST is 0), leakage Ka q and corrected
    c + Ka q. A row with a non-finite value, or a non-finite Ka, gets NaN everywhere.
    (The products run along the contiguous axis with one running sum per column: they vectorise
    without reordering any sum.)
    """
    n_vox, n_t = c.shape
    k = uk_t.shape[0]
    coef = np.empty(k + 1)
    y = np.empty(n_t)
    resid = np.empty(n_t)
    for v in range(n_vox):
        ka = np.nan
        if row_finite(c[v]):
            for i in range(n_t):
                y[i] = c[v, i]
            coef[:] = 0.0
            for i in range(n_t):
                for j in range(k + 1):
                    coef[j] += ukg[i, j] * y[i]
            ka = coef[k]
        if not np.isfinite(ka):
            out_ka[v] = np.nan
            out_se[v] = np.nan
            out_r2[v] = np.nan
            for i in range(n_t):
                out_leakage[v, i] = np.nan
                out_corrected[v, i] = np.nan
            continue
        for i in range(n_t):
            resid[i] = y[i]
        for j in range(k):
            for i in range(n_t):
                resid[i] -= uk_t[j, i] * coef[j]
        for i in range(n_t):
            resid[i] = resid[i] * resid[i]
        resid2 = _sum(resid, 0, n_t)
        _, sst = _mean_ssd(y, n_t, resid)
        out_ka[v] = ka
        out_se[v] = np.sqrt(resid2 / dof * var_factor)
        out_r2[v] = 1.0 - resid2 / sst if sst > 0.0 else np.nan
        for i in range(n_t):
            lk = ka * q[i]
            out_leakage[v, i] = lk
            out_corrected[v, i] = y[i] + lk


@kernel
def _two_regressor_shared(c, r, q, rr, qq, rq, solvable, dof, var_factor, gate_k, out_k1, out_k2, out_se,
                          out_r2, out_leakage, out_corrected, out_applied):
    """Least squares c ~ k1 r - k2 q per row with r, q (n_t,) shared by all rows (leakage.bsw), and
    the gate.

    rr, qq, rq: the products of r and q; ``solvable``: the 2 x 2 normal equations are (else every
    row is NaN). Per row: k1, k2, SSE = max(c.c - k1 c.r + k2 c.q, 0), SE(k2) = sqrt(SSE / dof *
    var_factor), r2 = 1 - SSE / SST (NaN where SST is 0). gate_k < 0: no gate, the leakage k2 q is
    added to every valid row; else only where |k2| > gate_k SE, other valid rows get leakage 0 and
    the curve unchanged. out_applied says where it was added. A row with a non-finite value, or a
    non-finite k2, gets NaN everywhere and applied False.
    """
    n_vox, n_t = c.shape
    det = rr * qq - rq * rq
    y = np.empty(n_t)
    work = np.empty(n_t)
    for v in range(n_vox):
        ok = solvable and row_finite(c[v])
        k1 = np.nan
        k2 = np.nan
        yr = 0.0
        yq = 0.0
        yy = 0.0
        if ok:
            for i in range(n_t):
                y[i] = c[v, i]
                yr += y[i] * r[i]
                yq += y[i] * q[i]
                yy += y[i] * y[i]
            k1 = (qq * yr - rq * yq) / det
            k2 = (rq * yr - rr * yq) / det
        if not (ok and np.isfinite(k2)):
            out_k1[v] = np.nan
            out_k2[v] = np.nan
            out_se[v] = np.nan
            out_r2[v] = np.nan
            out_applied[v] = False
            for i in range(n_t):
                out_leakage[v, i] = np.nan
                out_corrected[v, i] = np.nan
            continue
        sse = yy - k1 * yr + k2 * yq
        if sse < 0.0:
            sse = 0.0
        se = np.sqrt(sse / dof * var_factor)
        _, sst = _mean_ssd(y, n_t, work)
        out_k1[v] = k1
        out_k2[v] = k2
        out_se[v] = se
        out_r2[v] = 1.0 - sse / sst if sst > 0.0 else np.nan
        apply = gate_k < 0.0 or abs(k2) > gate_k * se
        out_applied[v] = apply
        for i in range(n_t):
            if apply:
                lk = k2 * q[i]
                out_leakage[v, i] = lk
                out_corrected[v, i] = y[i] + lk
            else:
                out_leakage[v, i] = 0.0
                out_corrected[v, i] = y[i]


#: The bidirectional fit's least determinant of its 2 x 2 normal equations, as a fraction of rr qq
#: (leakage._two_regressor_fit's test): below it the row is not solvable (NaN).
DET_MIN = 1e-12


@kernel
def _parabola_vertex(f_minus, f0, f_plus):
    """Vertex offset in grid steps, within [-1, 1], of the parabola through three equally spaced values
    (0 where it does not open upwards or the offset is NaN): leakage._parabola_step for one row."""
    denom = f_minus - 2.0 * f0 + f_plus
    step = 0.5 * (f_minus - f_plus) / denom if denom > 0.0 else 0.0
    if np.isnan(step):
        return 0.0
    return min(max(step, -1.0), 1.0)


@kernel
def _profile_kep(yr, yl, grid, rl, ll, det, rr, kep_max, gain):
    """One row's kep (1/s) of least residual in y ~ k1 r - k2 L_kep on the grid (G,), refined by one
    parabolic step: yr = y . r, yl (G,) = y . L_kep for each grid kep; rl, ll, det (G,) = r . L_kep,
    L_kep . L_kep and rr ll - rl^2; rr = r . r. The gain b^T G^-1 b (SSE = y . y - gain) of each grid
    kep is written to gain (G,), -inf where not finite; its first maximum j, then the parabola through
    the SSE at j - 1, j, j + 1 when j is inside the grid; clipped to [0, kep_max]. The arithmetic is
    leakage.bidirectional's numpy form, term by term, so the same products give the same kep."""
    n_grid = grid.shape[0]
    j = 0
    for g in range(n_grid):
        x = (ll[g] * (yr * yr) - 2.0 * rl[g] * yr * yl[g] + rr * (yl[g] * yl[g])) / det[g]
        gain[g] = x if np.isfinite(x) else -np.inf
        if gain[g] > gain[j]:
            j = g
    step = 0.0
    if 0 < j < n_grid - 1:
        step = _parabola_vertex(-gain[j - 1], -gain[j], -gain[j + 1])
    return min(max(grid[j] + step * (grid[1] - grid[0]), 0.0), kep_max)


@kernel
def _exp_integral_row(x, tr, kep, out):
    """int_0^t x(u) exp(-kep (t - u)) du at the sample times of one row x (n_t,), piecewise linear
    between samples, frames every tr s, kep 1/s, into out (n_t,): leakage.exp_integral's recursion
    with its arithmetic (the series for phi0, phi1 where kep tr < 1e-4)."""
    z = kep * tr
    e = np.exp(-z)
    if z < 1e-4:
        phi0 = 1.0 - z / 2.0 + z * z / 6.0
        phi1 = 0.5 - z / 6.0 + z * z / 24.0
    else:
        phi0 = -np.expm1(-z) / z
        phi1 = (z + np.expm1(-z)) / (z * z)
    y = 0.0
    out[0] = 0.0
    for k in range(x.shape[0] - 1):
        y = e * y + tr * (x[k] * phi0 + (x[k + 1] - x[k]) * phi1)
        out[k + 1] = y


@kernel
def _k2_noise(r, q, rr, qq, rq, det, wb, inv_nb):
    """Noise terms of k2 = h . y in y ~ k1 r - k2 q (leakage._two_regressor_noise for one row):
    h = (rq r - rr q) / det; returns h^T M h and tr(P M), P the projection on r and q, M the
    covariance of delta R2* noise with the S0 error shared by all frames (wb (n_t,): 1 / n_b on the
    baseline frames, inv_nb = 1 / n_b; zeros and 0 for white noise). See leakage._noise_terms."""
    n_t = r.shape[0]
    sr = 0.0
    sq = 0.0
    for i in range(n_t):
        sr += r[i]
        sq += q[i]
    a = (qq * sr - rq * sq) / det  # P 1 = a r + b q
    b = (rr * sq - rq * sr) / det
    hh = 0.0
    h1 = 0.0
    hw = 0.0
    p1 = 0.0
    pw = 0.0
    for i in range(n_t):
        h = (rq * r[i] - rr * q[i]) / det
        hh += h * h
        h1 += h
        hw += h * wb[i]
        p = a * r[i] + b * q[i]
        p1 += p
        pw += p * wb[i]
    return hh - 2.0 * h1 * hw + inv_nb * h1 * h1, 2.0 - 2.0 * pw + inv_nb * p1


@kernel
def _bidirectional_row_nan(v, out_k1, out_k2, out_kep, out_se, out_r2, out_leakage, out_corrected, out_valid):
    """Row v of _bidirectional_profile's outputs for a row that is not valid: NaN, valid False."""
    out_k1[v] = np.nan
    out_k2[v] = np.nan
    out_kep[v] = np.nan
    out_se[v] = np.nan
    out_r2[v] = np.nan
    out_valid[v] = False
    for i in range(out_leakage.shape[1]):
        out_leakage[v, i] = np.nan
        out_corrected[v, i] = np.nan


@kernel
def _bidirectional_profile(c, yr, yl, ref, grid, rl, ll, det_grid, rr, tr, kep_max, wb, inv_nb, trace_m,
                           out_k1, out_k2, out_kep, out_se, out_r2, out_leakage, out_corrected, out_valid):
    """The bidirectional leakage model's profile fit per row (leakage.bidirectional, method "profile"):
    c ~ k1 ref - k2 L_kep, L_kep = int_0^t ref(u) exp(-kep (t - u)) du.

    c (n_vox, n_t) delta R2* 1/s; yr (n_vox,) = c . ref and yl (n_vox, G) = c . L_kep on the kep grid
    (G,) 1/s, from the caller's product; rl, ll, det_grid, rr as in _profile_kep; tr s; wb, inv_nb as
    in _k2_noise; trace_m = tr(M). Per row: kep (_profile_kep), L at that kep (_exp_integral_row), k1,
    k2 from the 2 x 2 normal equations (solvable where det > DET_MIN rr qq), SSE = max(c.c - k1 c.ref
    + k2 c.L, 0), SE(k2) = sqrt(SSE / dof * h^T M h) with dof = max(tr(M) - tr(PM) - 1, 1) (one more
    degree of freedom spent on kep), r2 = 1 - SSE / SST (NaN where SST is 0), leakage k2 L and
    corrected c + k2 L. A row with a non-finite value, no solution or a non-finite k2 gets NaN
    everywhere and valid False.
    """
    n_vox, n_t = c.shape
    y = np.empty(n_t)
    q = np.empty(n_t)
    work = np.empty(n_t)
    gain = np.empty(grid.shape[0])
    for v in range(n_vox):
        if not row_finite(c[v]):
            _bidirectional_row_nan(v, out_k1, out_k2, out_kep, out_se, out_r2, out_leakage, out_corrected, out_valid)
            continue
        kep = _profile_kep(yr[v], yl[v], grid, rl, ll, det_grid, rr, kep_max, gain)
        _exp_integral_row(ref, tr, kep, q)
        qq = 0.0
        rq = 0.0
        cr = 0.0
        cq = 0.0
        cc = 0.0
        for i in range(n_t):
            y[i] = c[v, i]
            qq += q[i] * q[i]
            rq += ref[i] * q[i]
            cr += y[i] * ref[i]
            cq += y[i] * q[i]
            cc += y[i] * y[i]
        det = rr * qq - rq * rq
        k1 = (qq * cr - rq * cq) / det
        k2 = (rq * cr - rr * cq) / det
        if not (det > DET_MIN * rr * qq and np.isfinite(k2)):
            _bidirectional_row_nan(v, out_k1, out_k2, out_kep, out_se, out_r2, out_leakage, out_corrected, out_valid)
            continue
        sse = max(cc - k1 * cr + k2 * cq, 0.0)
        var_factor, trace_pm = _k2_noise(ref, q, rr, qq, rq, det, wb, inv_nb)
        _, sst = _mean_ssd(y, n_t, work)
        out_k1[v] = k1
        out_k2[v] = k2
        out_kep[v] = kep
        out_se[v] = np.sqrt(sse / max(trace_m - trace_pm - 1.0, 1.0) * var_factor)
        out_r2[v] = 1.0 - sse / sst if sst > 0.0 else np.nan
        out_valid[v] = True
        for i in range(n_t):
            lk = k2 * q[i]
            out_leakage[v, i] = lk
            out_corrected[v, i] = y[i] + lk


# --- gammafit.py


@kernel
def _select(a, n, k):
    """The k-th smallest of a[:n] (0-based), by Hoare's selection in place: afterwards a[k] holds it,
    a[:k] values at or below it and a[k + 1:n] values at or above it. Finite values only."""
    left = 0
    right = n - 1
    while right > left:
        mid = (left + right) // 2  # median of three as the pivot
        if a[mid] < a[left]:
            a[mid], a[left] = a[left], a[mid]
        if a[right] < a[left]:
            a[right], a[left] = a[left], a[right]
        if a[right] < a[mid]:
            a[right], a[mid] = a[mid], a[right]
        pivot = a[mid]
        i = left
        j = right
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            right = j
        elif k >= i:
            left = i
        else:
            break
    return a[k]


@kernel
def _median(a, n):
    """Median of a[:n] (n >= 1, finite values), the mean of the two middle values for even n, as
    numpy's; a[:n] is reordered."""
    hi = _select(a, n, n // 2)
    if n % 2 == 1:
        return hi
    lo = a[0]
    for i in range(1, n // 2):
        if a[i] > lo:
            lo = a[i]
    return 0.5 * (lo + hi)


@kernel
def _above_noise(d, n, peak, min_snr):
    """peak >= min_snr * noise SD, the SD 1.4826 median(d[:n]) / sqrt 2 (d: |first differences|,
    n >= 1; d[:n] is reordered). Counting d against the median that would make the two sides equal
    settles almost every row in one pass; the median itself is found only where the middle values lie
    within 1e-9 of that (rounding moves the comparison by a few 1e-16)."""
    if min_snr > 0.0:
        x = peak * np.sqrt(2.0) / (min_snr * 1.4826)
        x_lo = x * (1.0 - 1e-9)
        x_hi = x * (1.0 + 1e-9)
        n_lo = 0
        n_hi = 0
        for i in range(n):
            if d[i] <= x_lo:
                n_lo += 1
            if d[i] >= x_hi:
                n_hi += 1
        if n_lo >= n // 2 + 1:  # both middle values (ranks (n - 1) // 2 and n // 2) are below
            return True
        if n_hi >= n - (n - 1) // 2:  # both are above
            return False
    return peak >= min_snr * (1.4826 * _median(d, n) / np.sqrt(2.0))


@kernel
def _n_finite(y, lo, hi):
    """The finite values of y[lo:hi]."""
    n_ok = 0
    for i in range(lo, hi):
        if np.isfinite(y[i]):
            n_ok += 1
    return n_ok


@kernel
def _crossing(t, row, i, level):
    """Time where a row (non-finite read as 0) crosses ``level`` between frames i and i + 1 (linear
    interpolation, clipped to the interval)."""
    c0 = np.float64(row[i])
    c1 = np.float64(row[i + 1])
    if not np.isfinite(c0):
        c0 = 0.0
    if not np.isfinite(c1):
        c1 = 0.0
    w = (level - c0) / (c1 - c0) if c1 != c0 else 0.5
    if w < 0.0:
        w = 0.0
    elif w > 1.0:
        w = 1.0
    return t[i] + w * (t[i + 1] - t[i])


#: The gamma-variate window rules' settings, packed into one float64 array by :func:`pack_windows`;
#: its indices. WIN_RISE, WIN_TAIL: the foot and the tail levels as fractions of the peak; WIN_PRE:
#: frames kept before the foot (a whole number); WIN_MIN_SNR: the peak's least height in noise SDs
#: for a bolus; WIN_M_MIN: the smallest m (s); WIN_ALPHA_LO, WIN_ALPHA_HI: alpha's bounds;
#: WIN_FWHM_PER_SD: 2 sqrt(2 ln 2).
WIN_RISE, WIN_TAIL, WIN_PRE, WIN_MIN_SNR, WIN_M_MIN, WIN_ALPHA_LO, WIN_ALPHA_HI, WIN_FWHM_PER_SD = range(8)
WIN_SIZE = 8


def pack_windows(*, rise_fraction: float, tail_fraction: float, pre_frames: int, min_snr: float, m_min: float,
                 alpha_lo: float, alpha_hi: float, fwhm_per_sd: float) -> np.ndarray:
    """The window rules' settings as the float64 array (WIN_SIZE,) _gv_windows reads by the WIN_*
    indices (plain Python: called once per fit, not per voxel)."""
    win = np.empty(WIN_SIZE)
    win[WIN_RISE], win[WIN_TAIL], win[WIN_PRE], win[WIN_MIN_SNR] = rise_fraction, tail_fraction, pre_frames, min_snr
    win[WIN_M_MIN], win[WIN_ALPHA_LO], win[WIN_ALPHA_HI], win[WIN_FWHM_PER_SD] = m_min, alpha_lo, alpha_hi, fwhm_per_sd
    return win


@kernel
def _peak(row):
    """The first largest finite sample of a row: (frame, value); (0, NaN) where none is finite."""
    ip = 0
    peak = -np.inf
    any_finite = False
    for i in range(row.shape[0]):
        x = np.float64(row[i])
        if np.isfinite(x):
            any_finite = True
            if x > peak:
                peak = x
                ip = i
    if not any_finite:
        peak = np.nan
    return ip, peak


@kernel
def _shows_bolus(row, peak, min_snr, diffs):
    """A bolus: the peak at least min_snr noise SDs (_above_noise), from the |first differences| of
    finite neighbours; diffs (>= n_t - 1,) is work space."""
    n_d = 0
    for i in range(row.shape[0] - 1):
        a = np.float64(row[i])
        b = np.float64(row[i + 1])
        if np.isfinite(a) and np.isfinite(b):
            diffs[n_d] = abs(b - a)
            n_d += 1
    return peak > 0.0 and n_d > 0 and _above_noise(diffs, n_d, peak, min_snr)


@kernel
def _foot_and_tail(row, ip, peak, rise_fraction, tail_fraction):
    """Frames of a row around its peak at frame ip, finite samples only: before it, the last below
    rise_fraction x peak (foot) and the last below half the peak (i_up); after it, one past the first
    below tail_fraction x peak (hi; n_t if none) and the first below half the peak (i_dn). -1 where
    there is none. Returns (foot, i_up, hi, i_dn)."""
    n_t = row.shape[0]
    rise_level = rise_fraction * peak
    half = 0.5 * peak
    tail_level = tail_fraction * peak
    foot = -1
    i_up = -1
    for i in range(ip):
        x = np.float64(row[i])
        if np.isfinite(x):
            if x < rise_level:
                foot = i
            if x < half:
                i_up = i
    hi = n_t
    i_dn = -1
    for i in range(n_t - 1, ip, -1):
        x = np.float64(row[i])
        if np.isfinite(x):
            if x < tail_level:
                hi = i + 1
            if x < half:
                i_dn = i
    return foot, i_up, hi, i_dn


@kernel
def _start_alpha(t, row, ip, foot, i_up, i_dn, hi, half, fwhm_per_sd):
    """alpha's start value, from the width at half the peak (half) where the row falls through it
    inside the window: alpha = (fwhm_per_sd m / FWHM)^2, m = t[ip] - t[foot]; else 3; within [1, 10]."""
    n_t = row.shape[0]
    has_dn = i_dn >= 0 and i_dn < hi
    if i_up < 0:
        i_up = n_t - 1
    t_up = _crossing(t, row, min(max(i_up, 0), n_t - 2), half)
    t_dn = _crossing(t, row, min(max(i_dn - 1 if i_dn >= 0 else -1, 0), n_t - 2), half)
    m = t[ip] - t[foot]
    alpha = 3.0
    if has_dn and t_dn > t_up:
        z = fwhm_per_sd * m / (t_dn - t_up)
        alpha = z * z
    if np.isnan(alpha):
        alpha = 3.0
    return min(max(alpha, 1.0), 10.0)


@kernel
def _gv_window_one(row, t, win, diffs, p0, lower, upper):
    """One row's window, start and bounds (_gv_windows): writes p0, lower, upper (4,), returns
    (lo, hi, n_used); diffs (>= n_t - 1,) is work space."""
    ip, peak = _peak(row)
    bolus = _shows_bolus(row, peak, win[WIN_MIN_SNR], diffs)
    foot, i_up, hi, i_dn = _foot_and_tail(row, ip, peak, win[WIN_RISE], win[WIN_TAIL])
    if not (bolus and foot >= 0):
        for j in range(4):
            p0[j] = 1.0
            lower[j] = 0.0
            upper[j] = 2.0
        return 0, 0, 0
    lo = max(foot - max(int(win[WIN_PRE]), ip - foot), 0)
    p0[0] = peak
    p0[1] = t[foot]
    p0[2] = t[ip] - t[foot]
    p0[3] = _start_alpha(t, row, ip, foot, i_up, i_dn, hi, 0.5 * peak, win[WIN_FWHM_PER_SD])
    lower[0] = 0.0
    lower[1] = t[lo]
    lower[2] = win[WIN_M_MIN]
    lower[3] = win[WIN_ALPHA_LO]
    upper[0] = np.inf
    upper[1] = t[ip]
    upper[2] = t[hi - 1] - t[lo]
    upper[3] = win[WIN_ALPHA_HI]
    return lo, hi, _n_finite(row, lo, hi)


@kernel
def _gv_windows(c, t, win, out_lo, out_hi, out_p0, out_lower, out_upper, out_n_used):
    """Fit window [lo, hi), start values and bounds of the gamma-variate fit for each row of c
    (n_vox, n_t), delta R2* 1/s at times t (s); the rules are set out in gammafit's module docstring,
    their settings in win (WIN_*, pack_windows).

    Writes out_lo, out_hi (n_vox,) frames, out_p0, out_lower, out_upper (n_vox, 4) of (A 1/s, t0 s,
    m s, alpha), and out_n_used, the finite samples in the window. Rows without a bolus or a foot
    get lo = hi = 0 with placeholder start (1) and bounds (0, 2).
    """
    diffs = np.empty(max(c.shape[1] - 1, 1))
    for v in range(c.shape[0]):
        lo, hi, n_used = _gv_window_one(c[v], t, win, diffs, out_p0[v], out_lower[v], out_upper[v])
        out_lo[v] = lo
        out_hi[v] = hi
        out_n_used[v] = n_used


# gamma-variate fit: the Levenberg-Marquardt rules
# Levenberg-Marquardt for C(t) = A (x/m)^alpha exp(alpha (1 - x/m)), x = t - t0 > 0, else 0: the
# gamma variate K x^alpha exp(-x/beta) with peak A = C(t0 + m), m = alpha beta (Madsen 1992, Phys Med
# Biol 37:1597). Parameters p = (A, t0, m, alpha), boxed by lower/upper; the twin is
# tests/naive.py::gamma_fit. Public wrapper: perfusion.quantify.gammafit.fit_gamma_variate.

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


@kernel
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


@kernel
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


@kernel
def _gv_sse_keep(y, t, lo, hi, p, lg, e):
    """The model's SSE (twin: tests/naive.py gamma_fit), keeping for each finite sample
    after t0 its ln u + 1 - u in lg and exp(alpha (ln u + 1 - u)) in e, for _gv_normal_kept."""
    acc = 0.0
    for i in range(lo, hi):
        yi = np.float64(y[i])
        if np.isfinite(yi):
            x = t[i] - p[1]
            f = 0.0
            if x > 0.0:
                u = x / p[2]
                lg[i] = np.log(u) + 1.0 - u
                e[i] = np.exp(p[3] * lg[i])
                f = p[0] * e[i]
            r = yi - f
            acc += r * r
    return acc


@kernel
def _gv_normal_kept(y, t, lo, hi, p, lg, e, h, g, jac):
    """The Gauss-Newton normal equations J^T J, J^T r with ln u + 1 - u and the exponential read from lg and e, as
    _gv_sse_keep left them at the same p: no logarithm or exponential is computed again."""
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
        f = p[0] * e[i]
        jac[0] = e[i]
        jac[1] = f * p[3] * (1.0 - 1.0 / u) / p[2]
        jac[2] = f * p[3] * (u - 1.0) / p[2]
        jac[3] = f * lg[i]
        r = yi - f
        for a in range(4):
            g[a] += jac[a] * r
            for b in range(4):
                h[a, b] += jac[a] * jac[b]


@kernel
def _gv_scale(y, lo, hi, sse):
    """The SSE's scale S = the starting SSE + sum y^2 over the finite samples of y[lo:hi] (GV_SSE_ROUND)."""
    scale = sse
    for i in range(lo, hi):
        yi = np.float64(y[i])
        if np.isfinite(yi):
            scale += yi * yi
    return scale


@kernel
def _gv_predicted(h, g, delta):
    """The SSE decrease the linear model predicts for the step delta: delta . (2 g - h delta)."""
    pred = 0.0
    for i in range(4):
        hd = 0.0
        for j in range(4):
            hd += h[i, j] * delta[j]
        pred += delta[i] * (2.0 * g[i] - hd)
    return pred


@kernel
def _gv_small_step(delta, p):
    """The step delta moves every parameter by at most GV_XTOL of its scale (A: |A|; t0, m: m; alpha: alpha)."""
    return (abs(delta[0]) <= GV_XTOL * abs(p[0]) and abs(delta[1]) <= GV_XTOL * p[2]
            and abs(delta[2]) <= GV_XTOL * p[2] and abs(delta[3]) <= GV_XTOL * p[3])


@kernel
def _gv_fit_one_kept(y, t, lo, hi, p0, lower, upper, max_iter, p, lg_a, e_a, lg_b, e_b):
    """One voxel's bounded Levenberg-Marquardt fit with the model
    terms of the SSE at the current parameters kept for the normal equations, which then need no
    logarithm or exponential: about half of them per step. lg_a, e_a, lg_b, e_b (n_t,): work space.
    Returns (SSE, iterations, status), the fitted parameters in p."""
    if _n_finite(y, lo, hi) <= 4:
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
    lg, e, lg_new, e_new = lg_a, e_a, lg_b, e_b  # model terms at p and at p_new
    sse = _gv_sse_keep(y, t, lo, hi, p, lg, e)
    scale = _gv_scale(y, lo, hi, sse)
    lam = GV_LAM0
    nu = 2.0
    status = 0
    it = 0
    need_j = True
    while it < max_iter:
        it += 1
        if need_j:
            _gv_normal_kept(y, t, lo, hi, p, lg, e, h, g, jac)
            need_j = False
        if not _gv_step(h, g, lam, p, lower, upper, a, b, delta, p_new):
            status = -2
            break
        sse_new = _gv_sse_keep(y, t, lo, hi, p_new, lg_new, e_new)
        if sse_new <= sse + GV_SSE_ROUND * np.sqrt(sse * scale):
            # the step taken (after projection) and the decrease the linear model predicts for it
            for i in range(4):
                delta[i] = p_new[i] - p[i]
            pred = _gv_predicted(h, g, delta)
            rho = min(max((sse - sse_new) / pred, 0.0), 1.0) if pred > 0.0 else 0.0
            small = _gv_small_step(delta, p)
            for i in range(4):
                p[i] = p_new[i]
            lg, lg_new = lg_new, lg
            e, e_new = e_new, e
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


@kernel
def _gv_fit(curves, t, lo, hi, p0, lower, upper, max_iter, out_p, out_sse, out_iter, out_status):
    """Per-voxel bounded LM fit of the gamma variate (twin: tests/naive.py gamma_fit), the model terms of
    each SSE evaluation kept for the normal equations (_gv_fit_one_kept). curves (n_vox, n_t) 1/s at
    times t (s); lo, hi (n_vox,) the windows; p0, lower, upper (n_vox, 4) the start and the bounds of
    (A 1/s, t0 s, m s, alpha). Writes out_p (n_vox, 4), out_sse, out_iter and out_status (n_vox,).
    The rows share their work space."""
    n_vox, n_t = curves.shape
    lg_a = np.empty(n_t)
    e_a = np.empty(n_t)
    lg_b = np.empty(n_t)
    e_b = np.empty(n_t)
    for v in range(n_vox):
        if hi[v] <= lo[v]:  # no window: what _gv_fit_one returns for fewer than 5 samples
            for j in range(4):
                out_p[v, j] = np.nan
            out_sse[v] = np.nan
            out_iter[v] = 0
            out_status[v] = -1
            continue
        sse, it, status = _gv_fit_one_kept(curves[v], t, lo[v], hi[v], p0[v], lower[v], upper[v], max_iter,
                                           out_p[v], lg_a, e_a, lg_b, e_b)
        out_sse[v] = sse
        out_iter[v] = it
        out_status[v] = status


# --- aif.py: k-means


@kernel
def _kmeans_assign(x, cent, out_labels):
    """Nearest centroid of each row of x (n, d) among cent (k, d) by squared Euclidean distance, the
    first on a tie (np.argmin). Each distance is summed in numpy's order (``_sum``), so the labels
    equal numpy's ``argmin(sum((x[:, None] - cent[None]) ** 2, axis=2), axis=1)`` to the last bit.
    Returns whether any label changed."""
    n, d = x.shape
    k = cent.shape[0]
    changed = False
    sq = np.empty(d)
    for v in range(n):
        best = -1
        best_d = np.inf
        for j in range(k):
            for i in range(d):
                diff = x[v, i] - cent[j, i]
                sq[i] = diff * diff
            dist = _sum(sq, 0, d)
            if best < 0 or dist < best_d:
                best = j
                best_d = dist
        if out_labels[v] != best:
            changed = True
            out_labels[v] = best
    return changed
