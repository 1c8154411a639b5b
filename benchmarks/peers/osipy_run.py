"""osipy's DSC analysis of one series, timed; runs INSIDE benchmarks/.venv-osipy (setup_osipy.sh).

Stages are those of ``osipy.pipeline.DSCPipeline.run`` (osipy 0.1.4), called one by one so that an
external arterial input can be given in delta R2* (the pipeline itself only takes an AIF *signal*,
which it converts with its own fixed baseline):

1. ``osipy.common.io.nifti.load_nifti(dsc, modality=DSC)`` (float64), the mask read as osipy's CLI
   reads it (``nibabel`` dataobj as bool);
2. ``osipy.dsc.signal_to_delta_r2(signal, te_ms, baseline_indices=...)`` over the whole volume;
3. ``osipy.dsc.correct_leakage(delta_r2, aif, time, mask)``: osipy's "BSW" (tissue minus a
   low-enhancement reference regressed on [AIF, cumulative AIF], K1 and K2 both subtracted);
4. ``construct_from_config(DECONVOLVER_REGISTRY, OSVDConfig(oscillation_index=...))`` and
   ``osipy.dsc.compute_perfusion_maps(..., deconvolution_method="oSVD", fitter=..., hematocrit_ratio=0.73)``;
5. CBV and CBF written with ``osipy.common.io.nifti.save_nifti`` on the input's affine.

``--aif auto`` instead runs ``DSCPipeline(DSCPipelineConfig(...)).run(dataset, time, mask=mask)``
unchanged: osipy's own AIF (mean of the brain voxels above the 95th percentile of peak delta R2*).

Prints one JSON line: wall_s (process start to end), load_s, compute_s (after loading, before
saving), save_s, voxels, osipy_version, and the settings used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import frame_range, load_aif, process_age_s  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dsc", type=Path, help="4-D DSC NIfTI")
    ap.add_argument("--mask", type=Path, required=True, help="brain mask NIfTI on the DSC grid")
    ap.add_argument("--te", type=float, required=True, help="echo time, s")
    ap.add_argument("--tr", type=float, required=True, help="repetition time, s")
    ap.add_argument("--aif", default="auto",
                    help="arterial input: a .npy or TSV (delta_r2s column) of delta R2* in 1/s, or 'auto'")
    ap.add_argument("--first-frame", type=int, default=0,
                    help="drop frames before this one (to match perfusion's steady-state start); not with --aif auto")
    ap.add_argument("--baseline", type=frame_range, default=None,
                    help="baseline frames START:STOP of the series (default: osipy's first 10 from --first-frame)")
    ap.add_argument("--oi-target", type=float, default=None, help="oSVD oscillation index (default: osipy's 0.035)")
    ap.add_argument("--leakage", choices=("on", "off"), default="on", help="osipy's leakage correction (default on)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (cbv.nii.gz, cbf.nii.gz)")
    args = ap.parse_args(argv)

    import nibabel as nib
    import numpy as np
    import osipy
    from osipy.common.config import construct_from_config
    from osipy.common.io.nifti import load_nifti, save_nifti
    from osipy.common.types import Modality
    from osipy.dsc import compute_perfusion_maps, correct_leakage, signal_to_delta_r2
    from osipy.dsc.deconvolution.config import DECONVOLVER_REGISTRY, OSVDConfig
    from osipy.pipeline import DSCPipeline, DSCPipelineConfig

    osvd_cfg = OSVDConfig() if args.oi_target is None else OSVDConfig(oscillation_index=args.oi_target)
    te_ms = args.te * 1000.0  # osipy takes TE in ms

    t0 = time.perf_counter()
    dataset = load_nifti(args.dsc, modality=Modality.DSC)
    mask = np.asarray(nib.load(args.mask).dataobj, dtype=bool)
    t1 = time.perf_counter()
    c1 = time.process_time()

    signal = dataset.data
    if signal.ndim != 4 or mask.shape != signal.shape[:3]:
        raise SystemExit(f"{args.dsc}: shape {signal.shape} and mask {mask.shape} do not match")
    if args.aif == "auto":
        if args.first_frame or args.baseline:
            raise SystemExit("--first-frame and --baseline apply to an external --aif only")
        n_t = signal.shape[-1]
        time_s = np.arange(n_t) * args.tr
        cfg = DSCPipelineConfig(te=te_ms, apply_leakage_correction=args.leakage == "on", deconvolution=osvd_cfg)
        pm = DSCPipeline(cfg).run(dataset, time_s, mask=mask).perfusion_maps
        baseline = (0, min(cfg.baseline_frames, n_t // 4))
    else:
        signal = signal[..., args.first_frame:]
        n_t = signal.shape[-1]
        time_s = np.arange(n_t) * args.tr
        aif = load_aif(Path(args.aif), n_t=n_t, tr=args.tr, first_frame=args.first_frame)
        baseline = args.baseline or (args.first_frame, args.first_frame + min(10, n_t // 4))
        bl = np.arange(baseline[0] - args.first_frame, baseline[1] - args.first_frame)
        if bl[0] < 0 or bl[-1] >= n_t:
            raise SystemExit(f"--baseline {baseline} lies outside frames "
                             f"{args.first_frame}..{args.first_frame + n_t - 1}")
        delta_r2 = signal_to_delta_r2(signal, te_ms, baseline_indices=bl)
        if args.leakage == "on":
            delta_r2 = correct_leakage(delta_r2=delta_r2, aif=aif, time=time_s, mask=mask).corrected_delta_r2
        fitter = construct_from_config(DECONVOLVER_REGISTRY, osvd_cfg)
        pm = compute_perfusion_maps(delta_r2=delta_r2, aif=aif, time=time_s, mask=mask, deconvolve=True,
                                    deconvolution_method=osvd_cfg.method, fitter=fitter,
                                    hematocrit_ratio=DSCPipelineConfig.hematocrit_ratio)
    t2 = time.perf_counter()
    c2 = time.process_time()

    args.out.mkdir(parents=True, exist_ok=True)
    # the ParameterMaps carry an identity affine (compute_perfusion_maps): save the arrays on the input's
    for name, pmap in (("cbv", pm.cbv), ("cbf", pm.cbf)):
        save_nifti(np.where(mask, pmap.values, np.nan), args.out / f"{name}.nii.gz", affine=dataset.affine)
    t3 = time.perf_counter()

    print(json.dumps({
        "tool": "osipy", "osipy_version": osipy.__version__, "python": sys.version.split()[0],
        "wall_s": process_age_s(), "load_s": t1 - t0, "compute_s": t2 - t1, "save_s": t3 - t2,
        "compute_cpu_s": c2 - c1,
        "voxels": int(mask.sum()), "frames": int(n_t),
        "settings": {"aif": "osipy auto (95th percentile of peak delta R2*)" if args.aif == "auto" else str(args.aif),
                     "first_frame": args.first_frame, "baseline_frames": list(baseline),
                     "deconvolution": osvd_cfg.model_dump(), "leakage": "osipy bsw (K1, K2)" if args.leakage == "on"
                     else "none", "te_ms": te_ms, "tr_s": args.tr},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
