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
