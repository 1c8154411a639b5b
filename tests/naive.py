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
