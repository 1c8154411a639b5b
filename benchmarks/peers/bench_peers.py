"""Side-by-side peer benchmark (issue 8): perfusion against osipy and a plain numpy implementation of
the same method, on the same volume in the same run. Runs in perfusion's venv.

    python benchmarks/peers/bench_peers.py VOLUME_FOLDER [--repeats 3] [--json out.json] [--skip-osipy]

VOLUME_FOLDER holds dsc.nii.gz, brain.nii.gz and dsc.json (EchoTime, RepetitionTime in s); optional
lesion / normal-tissue masks (default lesion_hyper.nii.gz and nawm.nii.gz there, as the phantom names
them) add a lesion/normal CBV check. Each repetition runs, one after the other (so that load on the
machine drifts over all of them alike), each as a fresh process:

- ``perfusion analyze DSC --mask BRAIN --method osvd --leakage bsw --motion-correct off --no-html -q``: end to end;
- perfusion's compute only: ``case.load_inputs`` (load), ``pipeline.analyze`` (compute),
  ``report.outputs.write_result`` + ``report.html.write_html`` (save), same options, timed inside a process;
- ``osipy_run.py`` in benchmarks/.venv-osipy: osipy's oSVD with its leakage correction, given
  perfusion's AIF (aif.tsv, delta R2* in 1/s) and perfusion's steady-state start and baseline frames;
- ``numpy_svd.py --method osvd --leakage bsw`` (the same method written plainly) and
  ``numpy_svd.py --method csvd`` (fixed threshold P = 0.1, no leakage: the plain floor).

A first perfusion run (not timed) gives the AIF and baseline that the peers are handed. Reported:
median times, the ratios peer / perfusion (end to end: the wall of each process from outside;
compute: load and save excluded), and whether the maps agree (Pearson r of CBV and CBF over the brain
voxels, median voxel-wise ratio peer / perfusion, lesion/normal median CBV). An extra osipy run with
its leakage correction off (not timed) separates its deconvolution from its leakage correction.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OSIPY_VENV = HERE.parent / ".venv-osipy"

#: Targets of issue 8: osipy / perfusion, same input, same run.
TARGET_END_TO_END = 5.0
TARGET_COMPUTE = 20.0

PERFUSION_OPTIONS = {"method": "osvd", "leakage": "bsw", "motion_correct": "off"}


# --- one perfusion compute-only run, in its own process (`bench_peers.py _perfusion_compute ...`)

def perfusion_compute(dsc: Path, mask: Path, out: Path) -> dict:
    """Time load_inputs, analyze and the writing of the outputs in this process; return the JSON fields."""
    import warnings

    t0 = time.perf_counter()
    import perfusion
    from perfusion.case import load_inputs, make_config
    from perfusion.io import staged_output
    from perfusion.pipeline import analyze
    from perfusion.report.outputs import write_result
    from perfusion.report.html import write_html

    t_import = time.perf_counter() - t0
    config = make_config(**PERFUSION_OPTIONS)
    t1 = time.perf_counter()
    inputs, _ = load_inputs(dsc=dsc, mask=mask, aif="auto", reference=None, rois=[], te=None, tr=None)
    t2, c2 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = analyze(inputs, config)
    t3, c3 = time.perf_counter(), time.process_time()
    with staged_output(out, force=False) as stage:
        write_result(result, inputs, stage)
        write_html(stage)
    t4 = time.perf_counter()
    sys.path.insert(0, str(HERE))
    from _common import process_age_s

    return {"tool": "perfusion", "perfusion_version": getattr(perfusion, "__version__", "?"),
            "wall_s": process_age_s(), "import_s": t_import, "load_s": t2 - t1, "compute_s": t3 - t2,
            "save_s": t4 - t3, "compute_cpu_s": c3 - c2, "voxels": int(result.brain.sum()), "frames": int(result.time_s.size)}


# --- the benchmark

def read_sidecar(folder: Path) -> tuple[float, float]:
    meta = json.loads((folder / "dsc.json").read_text())
    te, tr = float(meta["EchoTime"]), float(meta["RepetitionTime"])
    if te > 1 or tr > 20:
        raise SystemExit(f"{folder / 'dsc.json'}: EchoTime {te}, RepetitionTime {tr}: give them in seconds")
    return te, tr


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_json(cmd: list[str], *, what: str) -> tuple[dict, dict]:
    """Run a command that prints one JSON line last; return ({wall_outside_s, cpu_outside_s}, the JSON)."""
    t0, c0 = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = {"wall_outside_s": time.perf_counter() - t0, "cpu_outside_s": _children_cpu_s() - c0}
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"{what} printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, json.loads(lines[-1])


def run_cli(cmd: list[str], *, what: str) -> dict:
    """Run a command; return {wall_outside_s, cpu_outside_s} (CPU: user + system of the process tree)."""
    t0, c0 = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = {"wall_outside_s": time.perf_counter() - t0, "cpu_outside_s": _children_cpu_s() - c0}
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall


def agreement(ref_dir: Path, peer_dir: Path, brain, lesion=None, normal=None) -> dict:
    """CBV and CBF of a peer against perfusion's, over brain voxels finite in both."""
    import nibabel as nib
    import numpy as np

    out = {}
    for name in ("cbv", "cbf"):
        a = np.asarray(nib.load(ref_dir / f"{name}.nii.gz").dataobj, dtype=np.float64)
        b = np.asarray(nib.load(peer_dir / f"{name}.nii.gz").dataobj, dtype=np.float64)
        ok = brain & np.isfinite(a) & np.isfinite(b)
        entry = {"voxels_compared": int(ok.sum())}
        if ok.sum() > 2:
            entry["pearson_r"] = float(np.corrcoef(a[ok], b[ok])[0, 1])
            pos = ok & (a > 0)
            entry["median_ratio_peer_over_perfusion"] = float(np.median(b[pos] / a[pos])) if pos.any() else None
        if lesion is not None and normal is not None:
            def lesion_normal(x):
                lo, no = x[lesion & ok], x[normal & ok]
                return float(np.median(lo) / np.median(no)) if lo.size and no.size and np.median(no) > 0 else None
            entry["lesion_over_normal_perfusion"] = lesion_normal(a)
            entry["lesion_over_normal_peer"] = lesion_normal(b)
        out[name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_perfusion_compute"]:  # internal: one compute-only run in a fresh process
        dsc, mask, out = (Path(a) for a in argv[1:4])
        print(json.dumps(perfusion_compute(dsc, mask, out)))
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("volume", type=Path, help="folder with dsc.nii.gz, brain.nii.gz, dsc.json")
    ap.add_argument("--repeats", "-r", type=int, default=3, help="repetitions of each tool (median reported)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (default: WORK/bench_peers.json)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the outputs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch outputs")
    ap.add_argument("--skip-osipy", action="store_true", help="no osipy (a machine without benchmarks/.venv-osipy)")
    ap.add_argument("--osipy-venv", type=Path, default=DEFAULT_OSIPY_VENV, help="osipy's venv")
    ap.add_argument("--lesion", type=Path, default=None, help="lesion mask (default VOLUME/lesion_hyper.nii.gz if present)")
    ap.add_argument("--normal", type=Path, default=None, help="normal-tissue mask (default VOLUME/nawm.nii.gz if present)")
    args = ap.parse_args(argv)

    vol = args.volume
    dsc, brain_path = vol / "dsc.nii.gz", vol / "brain.nii.gz"
    for p in (dsc, brain_path, vol / "dsc.json"):
        if not p.exists():
            raise SystemExit(f"{p}: missing; the volume folder needs dsc.nii.gz, brain.nii.gz and dsc.json")
    te, tr = read_sidecar(vol)
    osipy_python = args.osipy_venv / "bin" / "python"
    if not args.skip_osipy and not osipy_python.exists():
        raise SystemExit(f"{args.osipy_venv}: no osipy venv; run benchmarks/peers/setup_osipy.sh "
                         "(or pass --skip-osipy)")
    lesion_path = args.lesion or (vol / "lesion_hyper.nii.gz" if (vol / "lesion_hyper.nii.gz").exists() else None)
    normal_path = args.normal or (vol / "nawm.nii.gz" if (vol / "nawm.nii.gz").exists() else None)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_peers_"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    perfusion_cli = str(Path(py).parent / "perfusion")
    from perfusion.quantify.deconvolution import DEFAULT_OI_TARGET

    def perfusion_cmd(out: Path) -> list[str]:
        return [perfusion_cli, "analyze", str(dsc), "--mask", str(brain_path), "--method", "osvd", "--leakage", "bsw",
                "--motion-correct", "off", "--no-html", "--out", str(out), "-q"]

    # reference run (not timed): the AIF and the frames the peers are handed; warms the file cache and numba's
    ref_dir = work / "perfusion-ref"
    shutil.rmtree(ref_dir, ignore_errors=True)
    run_cli(perfusion_cmd(ref_dir), what="perfusion (reference run)")
    report = json.loads((ref_dir / "report.json").read_text())
    first, stop = int(report["baseline"]["start_frame"]), int(report["baseline"]["stop_frame"])
    aif_tsv = ref_dir / "aif.tsv"
    peer_common = [str(dsc), "--mask", str(brain_path), "--te", str(te), "--tr", str(tr), "--aif", str(aif_tsv),
                   "--first-frame", str(first), "--baseline", f"{first}:{stop}"]

    tools: dict[str, list[str] | None] = {
        "perfusion": None,  # the CLI, below
        "perfusion_compute": [py, str(Path(__file__).resolve()), "_perfusion_compute", str(dsc), str(brain_path)],
        "numpy_osvd": [py, str(HERE / "numpy_svd.py"), *peer_common, "--method", "osvd", "--leakage", "bsw",
                       "--oi-target", str(DEFAULT_OI_TARGET)],
        "numpy_csvd": [py, str(HERE / "numpy_svd.py"), *peer_common, "--method", "csvd", "--threshold", "0.1"],
    }
    if not args.skip_osipy:
        tools["osipy"] = [str(osipy_python), str(HERE / "osipy_run.py"), *peer_common]

    runs: dict[str, list[dict]] = {name: [] for name in tools}
    load_before = os.getloadavg()
    for i in range(args.repeats):
        for name, cmd in tools.items():
            out = work / f"{name}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "perfusion":
                runs[name].append(run_cli(perfusion_cmd(out), what="perfusion analyze"))
            elif name == "perfusion_compute":
                wall, js = run_json([*cmd, str(out)], what="perfusion compute-only")
                runs[name].append({**wall, **js})
            else:
                wall, js = run_json([*cmd, "--out", str(out)], what=name)
                runs[name].append({**wall, **js})
            if i < args.repeats - 1:
                shutil.rmtree(out, ignore_errors=True)
            print(f"  repeat {i + 1}/{args.repeats} {name:18s} {runs[name][-1]['wall_outside_s']:7.2f} s wall "
                  f"{runs[name][-1]['cpu_outside_s']:7.2f} s CPU",
                  file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    def med(name: str, key: str):
        vals = [r[key] for r in runs.get(name, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    summary = {name: {k: med(name, k) for k in ("wall_outside_s", "cpu_outside_s", "wall_s", "load_s", "compute_s", "save_s",
                                   "compute_cpu_s")}
               for name in runs}
    e2e_ref = summary["perfusion"]["wall_outside_s"]
    compute_ref = summary["perfusion_compute"]["compute_s"]
    ratios = {}
    for name in runs:
        if name.startswith("perfusion"):
            continue
        s = summary[name]
        ratios[name] = {"end_to_end": s["wall_outside_s"] / e2e_ref, "compute": s["compute_s"] / compute_ref,
                        # CPU seconds (user + system, all threads): steadier than wall on a loaded machine,
                        # but a multi-threaded tool's CPU exceeds its wall on an idle one
                        "end_to_end_cpu": s["cpu_outside_s"] / summary["perfusion"]["cpu_outside_s"],
                        "compute_cpu": s["compute_cpu_s"] / summary["perfusion_compute"]["compute_cpu_s"]}

    # agreement of the maps (last repetition of each)
    import nibabel as nib
    import numpy as np

    brain = np.asarray(nib.load(brain_path).dataobj) > 0
    lesion = np.asarray(nib.load(lesion_path).dataobj) > 0 if lesion_path else None
    normal = np.asarray(nib.load(normal_path).dataobj) > 0 if normal_path else None
    last = args.repeats - 1
    perf_dir = work / f"perfusion-{last}"
    agree = {name: agreement(perf_dir, work / f"{name}-{last}", brain, lesion, normal)
             for name in runs if name not in ("perfusion", "perfusion_compute")}
    if not args.skip_osipy:  # osipy's deconvolution alone: its leakage correction off (not timed)
        out = work / "osipy-noleak"
        shutil.rmtree(out, ignore_errors=True)
        run_json([*tools["osipy"], "--leakage", "off", "--out", str(out)], what="osipy (leakage off)")
        agree["osipy_leakage_off"] = agreement(perf_dir, out, brain, lesion, normal)

    result = {
        "volume": str(vol), "te_s": te, "tr_s": tr, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after},
        "perfusion_options": PERFUSION_OPTIONS, "peer_inputs": {"aif": "perfusion's aif.tsv (reference run)",
                                                                "first_frame": first, "baseline_frames": [first, stop]},
        "osipy": None if args.skip_osipy else {k: v for k, v in runs["osipy"][-1].items()
                                               if k in ("osipy_version", "python", "settings")},
        "median": summary, "ratios_peer_over_perfusion": ratios,
        "targets": None if args.skip_osipy else {
            "osipy_end_to_end": {"target": TARGET_END_TO_END, "measured": ratios["osipy"]["end_to_end"],
                                 "met": ratios["osipy"]["end_to_end"] >= TARGET_END_TO_END},
            "osipy_compute": {"target": TARGET_COMPUTE, "measured": ratios["osipy"]["compute"],
                              "met": ratios["osipy"]["compute"] >= TARGET_COMPUTE}},
        "agreement": agree, "runs": runs,
    }
    json_path = args.json or work / "bench_peers.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")

    # table
    voxels = runs["perfusion_compute"][-1]["voxels"]
    print(f"\n{vol}: {voxels} brain voxels, TE {te} s, TR {tr} s; median of {args.repeats}; "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'tool':18s} {'end-to-end s':>12s} {'load s':>7s} {'compute s':>9s} {'save s':>7s} {'e2e CPU s':>9s} "
          f"{'compute CPU s':>13s} {'x e2e':>6s} {'x compute':>9s} {'x e2e CPU':>9s} {'x compute CPU':>13s}")
    for name in runs:
        s = summary[name]
        fmt = lambda v, w: f"{v:{w}.2f}" if v is not None else " " * (w - 1) + "-"  # noqa: E731
        r = ratios.get(name, {})
        print(f"{name:18s} {fmt(s['wall_outside_s'], 12)} {fmt(s['load_s'], 7)} {fmt(s['compute_s'], 9)} "
              f"{fmt(s['save_s'], 7)} {fmt(s['cpu_outside_s'], 9)} {fmt(s['compute_cpu_s'], 13)} "
              f"{fmt(r.get('end_to_end'), 6)} {fmt(r.get('compute'), 9)} {fmt(r.get('end_to_end_cpu'), 9)} "
              f"{fmt(r.get('compute_cpu'), 13)}")
    print("(medians per column; x: peer / perfusion, above 1 perfusion is faster; perfusion's end to end is the CLI, "
          "its compute pipeline.analyze; CPU: user + system over all threads)")
    print("\nagreement with perfusion's maps (brain voxels): Pearson r, median voxel ratio peer/perfusion"
          + (", lesion/normal median (perfusion | peer)" if lesion is not None and normal is not None else ""))
    for name, a in agree.items():
        for m in ("cbv", "cbf"):
            e = a[m]
            ln = (f"  {e['lesion_over_normal_perfusion']:.2f} | {e['lesion_over_normal_peer']:.2f}"
                  if e.get("lesion_over_normal_peer") is not None else "")
            print(f"  {name:18s} {m}: r {e.get('pearson_r', float('nan')):.4f}  "
                  f"ratio {e.get('median_ratio_peer_over_perfusion') or float('nan'):.4f}{ln}")
    if result["targets"]:
        t = result["targets"]
        print(f"\ntargets: osipy/perfusion end to end {t['osipy_end_to_end']['measured']:.1f}x (>= {TARGET_END_TO_END:g}: "
              f"{'met' if t['osipy_end_to_end']['met'] else 'NOT met'}), compute {t['osipy_compute']['measured']:.1f}x "
              f"(>= {TARGET_COMPUTE:g}: {'met' if t['osipy_compute']['met'] else 'NOT met'})")
    print(f"JSON: {json_path}")
    if not args.keep and args.work is None:
        for p in work.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
