"""Deconvolution of tissue curves by the arterial input: prepare once, apply per voxel chunk.

Model (Ostergaard 1996, MRM 36:715): c(t) = int_0^t a(u) b(t - u) du with b = F R, discretised on
the frame grid as c = dt A b (the time step dt = TR must appear). With a and c in 1/s (delta R2*),
b is in 1/s. Methods:

- ``ssvd``: lower-triangular Toeplitz A (N x N), truncated SVD at P = 0.2 (Ostergaard 1996).
- ``csvd``: block-circulant A (L x L, L = 2N, curves zero-padded; Wu 2003, MRM 50:164), P = 0.1.
  Insensitive to a delay of the tissue relative to the AIF.
- ``osvd``: as ``csvd`` with the threshold chosen per voxel as the smallest P whose residue has an
  oscillation index at or below the target (Wu 2003).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _kernels

METHODS = ("osvd", "csvd", "ssvd")

#: Fixed relative SVD thresholds P (fraction of the largest singular value).
DEFAULT_THRESHOLD = {"ssvd": 0.2, "csvd": 0.1}

#: oSVD oscillation-index target (Wu 2003 quote 0.095; FAIR, osipy and PyPeT use 0.035).
#: The value is chosen by measurement on the phantom; see the README's accuracy table.
DEFAULT_OI_TARGET = 0.095

#: oSVD never keeps singular values below this fraction of the largest.
OSVD_MIN_THRESHOLD = 0.005


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
            oi_target: float | None = None) -> Deconvolver:
    """Build the deconvolution operator for an AIF (delta R2*, 1/s, shape (N,)) sampled every ``tr`` s."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    aif = np.asarray(aif, dtype=np.float64)
    if aif.ndim != 1 or not np.all(np.isfinite(aif)):
        raise ValueError("the AIF must be a finite 1-D curve")
    if not np.any(aif > 0):
        raise ValueError("the AIF has no positive value")
    u, s, vt = np.linalg.svd(aif_matrix(aif, tr=tr, method=method))
    if method == "osvd":
        p = None
        target = DEFAULT_OI_TARGET if oi_target is None else float(oi_target)
        k_max = int(np.count_nonzero(s >= OSVD_MIN_THRESHOLD * s[0]))
    else:
        p = DEFAULT_THRESHOLD[method] if threshold is None else float(threshold)
        if not 0 < p < 1:
            raise ValueError(f"the SVD threshold must lie in (0, 1), got {p}")
        target = None
        k_max = int(np.count_nonzero(s >= p * s[0]))
    return Deconvolver(method=method, tr=float(tr), n_t=aif.size, u=u, s=s, vt=vt, k_max=max(k_max, 1),
                       threshold=p, oi_target=target)


@dataclass(frozen=True)
class Residues:
    """F R(t) per voxel in 1/s, shape (n_vox, L), and the number of singular values kept (n_vox,)."""

    residue: np.ndarray
    k: np.ndarray


def deconvolve(op: Deconvolver, curves: np.ndarray) -> Residues:
    """Deconvolve tissue curves (delta R2*, 1/s, shape (n_vox, N)) with a prepared operator."""
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != op.n_t:
        raise ValueError(f"curves must have shape (n_vox, {op.n_t}), got {c.shape}")
    if op.method != "ssvd":
        c = np.concatenate([c, np.zeros((c.shape[0], op.length - op.n_t))], axis=1)
    x = c @ op.u  # row v holds U^T c_v
    if op.method == "osvd":
        out = np.empty_like(x)
        k = np.empty(x.shape[0], dtype=np.int64)
        _kernels._osvd_search(x, op.s, op.vt, op.k_max, op.oi_target, out, k)
        return Residues(residue=out, k=k)
    w = np.zeros_like(op.s)
    w[: op.k_max] = 1.0 / op.s[: op.k_max]
    residue = (x * w) @ op.vt
    k = np.where(np.all(np.isfinite(c), axis=1), op.k_max, 0)
    return Residues(residue=residue, k=k)
