"""Deconvolution of tissue curves by the arterial input: prepare once, apply per voxel chunk.

Model (Ostergaard 1996, MRM 36:715): c(t) = int_0^t a(u) b(t - u) du with b = F R, discretised on
the frame grid as c = dt A b (the time step dt = TR must appear). With a and c in 1/s (delta R2*),
b is in 1/s. Methods:

- ``ssvd``: lower-triangular Toeplitz A (N x N), truncated SVD at P = 0.2 (Ostergaard 1996).
- ``csvd``: block-circulant A (L x L, L = 2N, curves zero-padded; Wu 2003, MRM 50:164), P = 0.1.
  Insensitive to a delay of the tissue relative to the AIF.
- ``osvd``: as ``csvd`` with the threshold chosen per voxel as the smallest P whose residue has an
  oscillation index at or below the target (Wu 2003), P taken between groups of equal singular
  values only (``DEGENERATE_RTOL``).
- ``tikhonov``: the ``csvd`` matrix (so also delay-insensitive) with Tikhonov regularisation instead
  of truncation, b = V diag(s_i / (s_i^2 + mu^2)) U^T c, that is filter factors
  f_i = s_i^2 / (s_i^2 + mu^2); mu is chosen per voxel from a fixed grid by generalised
  cross-validation, GCV(mu) = ||c - A b_mu||^2 / (L - sum_i f_i)^2 (Golub, Heath and Wahba 1979,
  Technometrics 21:215; for DSC, Sourbron 2004, Phys Med Biol 49:3307).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perfusion._kernels import deconv as _kernels
from perfusion._kernels import parallel as _parallel

METHODS = ("osvd", "csvd", "ssvd", "tikhonov")

#: Fixed relative SVD thresholds P (fraction of the largest singular value).
DEFAULT_THRESHOLD = {"ssvd": 0.2, "csvd": 0.1}

#: oSVD oscillation-index target (Wu 2003 quote 0.095; FAIR, osipy and PyPeT use 0.035).
#: The value is chosen by measurement on the phantom; see the README's accuracy table.
DEFAULT_OI_TARGET = 0.095

#: Voxels per chunk of the per-voxel kernels (one chunk per thread at a time: _kernels/parallel.py).
CHUNK = _parallel.CHUNK

#: oSVD never keeps singular values below this fraction of the largest.
OSVD_MIN_THRESHOLD = 0.005

#: Singular values closer than this (relative) count as one degenerate group. A circulant matrix's
#: singular values are the moduli of the AIF's DFT, so all but the DC (and Nyquist) term come in equal
#: pairs (to ~1e-15); within a pair the SVD's singular vectors are an arbitrary rotation, so a
#: truncation that keeps one of the two depends on LAPACK's choice. oSVD truncates between groups only.
DEGENERATE_RTOL = 1e-8


def group_ends(s: np.ndarray) -> np.ndarray:
    """uint8 (L,): 1 at the last index of each run of singular values equal within DEGENERATE_RTOL."""
    s = np.asarray(s, dtype=np.float64)
    ends = np.ones(s.size, np.uint8)
    ends[:-1] = s[1:] < s[:-1] * (1.0 - DEGENERATE_RTOL)
    return ends

#: Tikhonov mu grid, as fractions of the largest singular value s_max: TIKHONOV_N_MU values spaced
#: geometrically (ratio 1.19) over TIKHONOV_MU_RANGE. At mu = s_max every filter factor is at most
#: 1/2, which flattens any residue; mu = 1e-3 s_max passes (f >= 0.96) every component that oSVD's
#: floor OSVD_MIN_THRESHOLD keeps. On noise-free data GCV picks the low end; on OSIPI's SNR-200 curves
#: it picks 0.04 - 0.2 s_max, well inside the grid.
TIKHONOV_MU_RANGE = (1e-3, 1.0)
TIKHONOV_N_MU = 40


@dataclass(frozen=True)
class Deconvolver:
    """What does not depend on the tissue data: the SVD of the AIF matrix and the options."""

    method: str
    tr: float  # s
    n_t: int
    u: np.ndarray  # (L, L)
    s: np.ndarray  # (L,)
    vt: np.ndarray  # (L, L)
    k_max: int
    threshold: float | None
    oi_target: float | None
    mus: np.ndarray | None = None  # tikhonov: (n_mu,) candidate mu, ascending, same unit as s
    ends: np.ndarray | None = None  # osvd: (L,) uint8, 1 where a group of equal singular values ends

    @property
    def length(self) -> int:
        return int(self.s.shape[0])


def aif_matrix(aif: np.ndarray, *, tr: float, method: str) -> np.ndarray:
    """The convolution matrix dt A for ``aif`` (1/s, shape (N,)): (N, N) Toeplitz or (2N, 2N) circulant."""
    a = np.asarray(aif, dtype=np.float64)
    n = a.size
    if method == "ssvd":
        idx = np.arange(n)[:, None] - np.arange(n)[None, :]
        mat = np.where(idx >= 0, a[np.clip(idx, 0, n - 1)], 0.0)
    else:
        length = 2 * n
        pad = np.concatenate([a, np.zeros(length - n)])
        idx = (np.arange(length)[:, None] - np.arange(length)[None, :]) % length
        mat = pad[idx]
    return tr * mat


def prepare(aif: np.ndarray, *, tr: float, method: str = "osvd", threshold: float | None = None,
            oi_target: float | None = None, mu_grid: np.ndarray | None = None) -> Deconvolver:
    """Build the deconvolution operator for an AIF (delta R2*, 1/s, shape (N,)) sampled every ``tr`` s.

    ``mu_grid`` (tikhonov only): candidate mu as fractions of the largest singular value, positive
    and finite, shape (n_mu,); default TIKHONOV_N_MU values geometric over TIKHONOV_MU_RANGE.
    ``threshold`` and ``oi_target`` do not apply to tikhonov and are ignored, as ``threshold`` is for osvd.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    aif = np.asarray(aif, dtype=np.float64)
    if aif.ndim != 1 or not np.all(np.isfinite(aif)):
        raise ValueError("the AIF must be a finite 1-D curve")
    if not np.any(aif > 0):
        raise ValueError("the AIF has no positive value")
    u, s, vt = np.linalg.svd(aif_matrix(aif, tr=tr, method=method))
    if method == "tikhonov":
        rel = np.geomspace(*TIKHONOV_MU_RANGE, TIKHONOV_N_MU) if mu_grid is None else np.asarray(mu_grid, float)
        if rel.ndim != 1 or rel.size == 0 or not np.all(np.isfinite(rel) & (rel > 0)):
            raise ValueError("the Tikhonov mu grid must be a non-empty 1-D array of positive finite values")
        return Deconvolver(method=method, tr=float(tr), n_t=aif.size, u=u, s=s, vt=vt,
                           k_max=int(np.count_nonzero(s > 0)), threshold=None, oi_target=None,
                           mus=np.sort(rel) * s[0])
    if method == "osvd":
        target = DEFAULT_OI_TARGET if oi_target is None else float(oi_target)
        ends = group_ends(s)
        k_max = int(np.count_nonzero(s >= OSVD_MIN_THRESHOLD * s[0]))
        while k_max > 1 and not ends[k_max - 1]:  # never split a group at the floor
            k_max -= 1
        return Deconvolver(method=method, tr=float(tr), n_t=aif.size, u=u, s=s, vt=vt, k_max=max(k_max, 1),
                           threshold=None, oi_target=target, ends=ends)
    p = DEFAULT_THRESHOLD[method] if threshold is None else float(threshold)
    if not 0 < p < 1:
        raise ValueError(f"the SVD threshold must lie in (0, 1), got {p}")
    k_max = int(np.count_nonzero(s >= p * s[0]))
    return Deconvolver(method=method, tr=float(tr), n_t=aif.size, u=u, s=s, vt=vt, k_max=max(k_max, 1),
                       threshold=p, oi_target=None)


@dataclass(frozen=True)
class Residues:
    """F R(t) per voxel in 1/s, shape (n_vox, L), and the number of singular values kept (n_vox,).

    For tikhonov, ``mu`` holds the regularisation parameter GCV chose per voxel (n_vox,), in the unit
    of the singular values (those of dt A: dimensionless), NaN where the curve is not finite; ``k``
    is then the number of singular values at or above mu (those with filter factor >= 1/2).
    """

    residue: np.ndarray
    k: np.ndarray
    mu: np.ndarray | None = None


def deconvolve(op: Deconvolver, curves: np.ndarray) -> Residues:
    """Deconvolve tissue curves (delta R2*, 1/s, shape (n_vox, N)) with a prepared operator."""
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != op.n_t:
        raise ValueError(f"curves must have shape (n_vox, {op.n_t}), got {c.shape}")
    n = c.shape[0]
    out = np.empty((n, op.length))
    k = np.empty(n, dtype=np.int64)
    if op.method == "osvd":
        ut = np.ascontiguousarray(op.u[: op.n_t].T)  # (L, N): the curves are zero-padded, so U's first N rows

        def osvd_chunk(sl):
            xt = ut @ c[sl].T  # column v holds U^T c_v: the kernel works across voxels
            _kernels._osvd_search(xt, op.s, op.vt, op.ends, op.k_max, op.oi_target, out[sl], k[sl])

        _parallel.run_chunks(osvd_chunk, n, CHUNK)
        return Residues(residue=out, k=k)
    if op.method == "tikhonov":
        u = op.u[: op.n_t]
        mu = np.empty(n)

        def tikhonov_chunk(sl):
            _kernels._tikhonov_gcv(c[sl] @ u, op.s, op.vt, op.mus, out[sl], mu[sl])

        _parallel.run_chunks(tikhonov_chunk, n, CHUNK)
        with np.errstate(invalid="ignore"):
            k[:] = np.count_nonzero(op.s[None, :] >= mu[:, None], axis=1)  # 0 where mu is NaN
        return Residues(residue=out, k=k, mu=mu)
    w = np.zeros_like(op.s)
    w[: op.k_max] = 1.0 / op.s[: op.k_max]
    pinv = (op.u[: op.n_t] * w) @ op.vt  # (N, L): the truncated pseudo-inverse (U's first N rows: zero padding)

    def work(sl):
        out[sl] = c[sl] @ pinv

    _parallel.run_chunks(work, n, CHUNK)
    k = np.where(np.all(np.isfinite(c), axis=1), op.k_max, 0)
    return Residues(residue=out, k=k)


def residual_sse(op: Deconvolver, curves: np.ndarray, residue: np.ndarray) -> np.ndarray:
    """Residual sum of squares (1/s^2, (n_vox,)) of the deconvolution's fit over the N frames:
    c - (dt A b)[:N], with dt A = U diag(s) V^T (its rows beyond N predict the zero padding and are not
    data). NaN where the residue is not finite."""
    c = np.asarray(curves, dtype=np.float64)
    out = np.empty(c.shape[0])
    model_t = ((op.u[: op.n_t] * op.s) @ op.vt).T  # (L, N): (dt A)[:N] from its SVD, transposed; one product

    def work(sl):
        r = c[sl] - residue[sl] @ model_t
        out[sl] = np.einsum("vn,vn->v", r, r)

    _parallel.run_chunks(work, c.shape[0], CHUNK)
    return out
