"""A plain numpy reference of the SVD deconvolution family, timed: numpy, scipy and nibabel only, no
perfusion import (runs in perfusion's venv, or any with numpy and nibabel).

Over the masked voxels, as rows of an (n_vox, n_t) float64 array processed in chunks:

- delta R2*(t) = -ln(S / S0) / TE, S0 the mean of the baseline frames, S/S0 floored at 1e-3;
- optional leakage correction ``--leakage bsw`` (Boxerman, Schmainda, Weisskoff 2006, AJNR 27:859),
  ungated: dR2* = K1 ref - K2 int ref by linear least squares, ref the mean delta R2* of the
  non-enhancing voxels (mean of the last 10 frames within 1 baseline SD of the baseline), corrected
  curve = dR2* + K2 int ref (trapezoid running integral, s);
- block-circulant deconvolution (Wu 2003, MRM 50:164): the AIF zero-padded to L = 2N, circulant
  matrix dt A, one SVD; curves zero-padded to L;
  - ``--method csvd``: truncation at a fixed P (default 0.1) of the largest singular value, one
    matrix product for all voxels;
  - ``--method osvd``: per voxel the smallest P (largest number k of kept singular values, not below
    P = 0.005, truncating only between groups of equal singular values) whose residue has an
    oscillation index OI = 1 / (L max b) sum |b[t] - 2 b[t-1] + b[t-2]| at or below the target
    (default 0.095, perfusion's DEFAULT_OI_TARGET; Wu 2003 quotes 0.095, osipy uses 0.035), found by
    growing the residue one singular value at a time for all voxels of a chunk at once;
- CBV = kH / rho * trapezoid(c) / trapezoid(aif) * 100 (mL/100 g), CBF = kH / rho * max_t b(t) *
  6000 (mL/100 g/min), kH = 0.733, rho = 1.04 g/mL (Rempp 1994); MTT = CBV / CBF * 60 (s; the central
  volume theorem, NaN where CBF <= 0).

Writes cbv.nii.gz, cbf.nii.gz and mtt.nii.gz (float32, NaN outside the mask) into --out.

Prints one JSON line: wall_s (process start to end), load_s, compute_s (after loading, before
saving), save_s, voxels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _common import frame_range, load_aif, process_age_s  # noqa: E402

KH = (1 - 0.45) / (1 - 0.25)  # large- / small-vessel haematocrit correction (Rempp 1994)
RHO = 1.04  # g/mL, brain density
MIN_RATIO = 1e-3  # S/S0 floor before the log
OSVD_MIN_P = 0.005  # oSVD never keeps singular values below this fraction of the largest
LATE_FRAMES = 10  # BSW non-enhancing test: mean of the last 10 frames ...
ENHANCEMENT_SD = 1.0  # ... within 1 baseline SD of the baseline


def trapezoid(y: np.ndarray, dx: float) -> np.ndarray:
    """Trapezoid integral along the last axis."""
    return dx * (y.sum(axis=-1) - 0.5 * (y[..., 0] + y[..., -1]))


def running_integral(y: np.ndarray, dx: float) -> np.ndarray:
    """Trapezoid running integral along the last axis, 0 at the first sample."""
    out = np.zeros_like(y)
    out[..., 1:] = np.cumsum(0.5 * dx * (y[..., 1:] + y[..., :-1]), axis=-1)
    return out


def delta_r2s(signal: np.ndarray, *, te: float, bl: slice) -> np.ndarray:
    s0 = signal[:, bl].mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.log(np.maximum(signal / s0, MIN_RATIO)) / te


def circulant_svd(aif: np.ndarray, *, tr: float):
    n = aif.size
    length = 2 * n
    pad = np.concatenate([aif, np.zeros(n)])
    idx = (np.arange(length)[:, None] - np.arange(length)[None, :]) % length
    return np.linalg.svd(tr * pad[idx])


def oscillation_index(b: np.ndarray) -> np.ndarray:
    """Wu 2003 OI of residues b (n, L); +inf where max b <= 0."""
    fmax = b.max(axis=1)
    acc = np.abs(b[:, 2:] - 2.0 * b[:, 1:-1] + b[:, :-2]).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(fmax > 0, acc / (b.shape[1] * fmax), np.inf)


def deconvolve_csvd(x: np.ndarray, s: np.ndarray, vt: np.ndarray, p: float) -> np.ndarray:
    """x = U^T c per row (n, L) -> residues (n, L) with singular values >= p s_max kept."""
    k = int(np.count_nonzero(s >= p * s[0]))
    return (x[:, :k] / s[:k]) @ vt[:k]


def deconvolve_osvd(x: np.ndarray, s: np.ndarray, vt: np.ndarray, oi_target: float) -> np.ndarray:
    """Per row, the residue with the most singular values kept (at a group end, s >= OSVD_MIN_P s_max)
    whose OI <= oi_target; the first group's residue where none is."""
    ends = np.ones(s.size, bool)
    ends[:-1] = s[1:] < s[:-1] * (1.0 - 1e-8)  # circulant singular values come in equal pairs
    k_max = int(np.count_nonzero(s >= OSVD_MIN_P * s[0]))
    while k_max > 1 and not ends[k_max - 1]:
        k_max -= 1
    b = np.zeros_like(x)
    best = np.zeros_like(x)
    have = np.zeros(x.shape[0], bool)
    for k in range(k_max):
        b += np.outer(x[:, k] / s[k], vt[k])
        if ends[k]:
            ok = ~have | (oscillation_index(b) <= oi_target)
            best[ok] = b[ok]
            have |= ok
    return best


def bsw_correct(c: np.ndarray, ref: np.ndarray, *, tr: float) -> np.ndarray:
    """Ungated BSW: least squares c = K1 ref - K2 int ref per row, returns c + K2 int ref."""
    q = -running_integral(ref, tr)
    x = np.stack([ref, q], axis=1)  # (n_t, 2)
    coef = np.linalg.solve(x.T @ x, x.T @ c.T)  # (2, n)
    return c - coef[1][:, None] * q[None, :]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dsc", type=Path, help="4-D DSC NIfTI")
    ap.add_argument("--mask", type=Path, required=True, help="brain mask NIfTI on the DSC grid")
    ap.add_argument("--te", type=float, required=True, help="echo time, s")
    ap.add_argument("--tr", type=float, required=True, help="repetition time, s")
    ap.add_argument("--aif", type=Path, required=True, help="a .npy or TSV (delta_r2s column) of delta R2*, 1/s")
    ap.add_argument("--first-frame", type=int, default=0, help="drop frames before this one")
    ap.add_argument("--baseline", type=frame_range, default=None,
                    help="baseline frames START:STOP of the series (default: 10 from --first-frame)")
    ap.add_argument("--method", choices=("csvd", "osvd"), default="osvd")
    ap.add_argument("--threshold", type=float, default=0.1, help="csvd: P, fraction of the largest singular value")
    ap.add_argument("--oi-target", type=float, default=0.095, help="osvd: oscillation index target")
    ap.add_argument("--leakage", choices=("none", "bsw"), default="none")
    ap.add_argument("--chunk", type=int, default=16384, help="voxels per chunk")
    ap.add_argument("--out", type=Path, required=True, help="output folder (cbv.nii.gz, cbf.nii.gz, mtt.nii.gz)")
    args = ap.parse_args(argv)

    import nibabel as nib

    t0 = time.perf_counter()
    img = nib.load(args.dsc)
    data = np.asarray(img.dataobj)
    mask = np.asarray(nib.load(args.mask).dataobj) > 0
    t1 = time.perf_counter()
    c1 = time.process_time()

    if data.ndim != 4 or mask.shape != data.shape[:3]:
        raise SystemExit(f"{args.dsc}: shape {data.shape} and mask {mask.shape} do not match")
    rows = data[mask][:, args.first_frame:]  # (n_vox, n_t), the file's dtype
    n_vox, n_t = rows.shape
    aif = load_aif(args.aif, n_t=n_t, tr=args.tr, first_frame=args.first_frame)
    baseline = args.baseline or (args.first_frame, args.first_frame + 10)
    bl = slice(baseline[0] - args.first_frame, baseline[1] - args.first_frame)
    if bl.start < 0 or bl.stop > n_t:
        raise SystemExit(f"--baseline {baseline} lies outside frames {args.first_frame}..{args.first_frame + n_t - 1}")
    u, s, vt = circulant_svd(aif, tr=args.tr)
    area_aif = trapezoid(aif, args.tr)
    ref = None
    if args.leakage == "bsw":
        ne = np.zeros(n_vox, bool)
        ref_sum = np.zeros(n_t)
        for lo in range(0, n_vox, args.chunk):
            sig = rows[lo:lo + args.chunk].astype(np.float64)
            base = sig[:, bl]
            late = sig[:, -LATE_FRAMES:].mean(axis=1)
            ok = late - base.mean(axis=1) <= ENHANCEMENT_SD * base.std(axis=1, ddof=1)
            ne[lo:lo + args.chunk] = ok
            ref_sum += delta_r2s(sig[ok], te=args.te, bl=bl).sum(axis=0)
        ref = ref_sum / max(int(ne.sum()), 1)
    cbv = np.empty(n_vox)
    cbf = np.empty(n_vox)
    for lo in range(0, n_vox, args.chunk):
        c = delta_r2s(rows[lo:lo + args.chunk].astype(np.float64), te=args.te, bl=bl)
        if ref is not None:
            c = bsw_correct(c, ref, tr=args.tr)
        cbv[lo:lo + args.chunk] = KH / RHO * 100.0 * trapezoid(c, args.tr) / area_aif
        x = np.concatenate([c, np.zeros_like(c)], axis=1) @ u  # row v: U^T c_v
        if args.method == "csvd":
            b = deconvolve_csvd(x, s, vt, args.threshold)
        else:
            b = deconvolve_osvd(x, s, vt, args.oi_target)
        cbf[lo:lo + args.chunk] = KH / RHO * 6000.0 * b.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mtt = np.where(cbf > 0, cbv / cbf * 60.0, np.nan)  # s: mL/100 g over mL/100 g/min
    t2 = time.perf_counter()
    c2 = time.process_time()

    args.out.mkdir(parents=True, exist_ok=True)
    for name, values in (("cbv", cbv), ("cbf", cbf), ("mtt", mtt)):
        vol = np.full(mask.shape, np.nan, np.float32)
        vol[mask] = values
        nib.save(nib.Nifti1Image(vol, img.affine), args.out / f"{name}.nii.gz")
    t3 = time.perf_counter()

    print(json.dumps({
        "tool": f"numpy-{args.method}", "numpy_version": np.__version__, "python": sys.version.split()[0],
        "wall_s": process_age_s(), "load_s": t1 - t0, "compute_s": t2 - t1, "save_s": t3 - t2,
        "compute_cpu_s": c2 - c1,
        "voxels": int(n_vox), "frames": int(n_t),
        "settings": {"method": args.method, "threshold": args.threshold if args.method == "csvd" else None,
                     "oi_target": args.oi_target if args.method == "osvd" else None, "leakage": args.leakage,
                     "aif": str(args.aif), "first_frame": args.first_frame, "baseline_frames": list(baseline),
                     "te_s": args.te, "tr_s": args.tr},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
