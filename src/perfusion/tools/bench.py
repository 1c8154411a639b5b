"""`perfusion bench`: speed and memory on standard phantom volumes, as a table and as stable JSON.

Volumes (``VOLUMES``): the clinical 128 x 128 x 24 slices x 80 frames and the high-resolution
256 x 256 x 30 x 120, each in int16 and float32, with their brain masks. They are stacks of the
synthetic phantom's 5-slice slabs (``phantom.make_phantom``, a new noise seed per slab) on a 240 mm
field of view, written once into a cache folder and reused.

What is measured, each as the median of ``repeats`` runs:
- end to end: ``perfusion analyze VOL --mask BRAIN --no-html`` in a fresh process (import, load, motion
  screening, mask, AIF, maps, writing the maps and report.json), for the default method and leakage
  correction and for ``--method osvd --leakage bsw``; the peak resident memory of that process
  (/proc VmHWM, polled every 20 ms), also as a multiple of the input's size in float32;
- stages: the analysis's own stage timings (report.json ``timings_s``) of the same runs, and of one
  run per other deconvolution method and leakage method on the clinical volume, as voxels per second
  over the voxels analysed;
- numba compilation: the same command on a small phantom twice, each in a fresh process, with an
  empty NUMBA_CACHE_DIR (cold: every kernel compiles and is cached) and then that filled cache (warm).

The JSON (``--json FILE``) has a schema tag and only plain keys, so CI can diff two runs.
Wall times depend on the machine and on whatever else runs on it; ratios between runs of the same
machine are the figure to compare.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "perfusion-bench/1"

#: name -> (x, y, slices, frames)
VOLUMES = {"clinical": (128, 128, 24, 80), "high": (256, 256, 30, 120)}
DTYPES = ("int16", "float32")
FOV_MM = 240.0
SLAB_MM = 120.0
TE_S = 0.025
TR_S = 1.5

#: The two configurations of the issue's targets, by name: extra ``perfusion analyze`` arguments.
CONFIGS = {"default": [], "osvd-bsw": ["--method", "osvd", "--leakage", "bsw"]}
#: One run each on the clinical volume for the other kernels' throughput (motion screening off:
#: the stage timings are what they are for).
KERNEL_CONFIGS = {
    **{f"{m}-residue": ["--method", m, "--motion-correct", "off"] for m in ("csvd", "ssvd", "tikhonov", "osvd")},
    **{f"model-{lk}": ["--leakage", lk, "--motion-correct", "off"] for lk in ("none", "bsw", "bidirectional")},
}
#: Masks written beside each volume (the phantom's): the brain for --mask; a lesion and normal white
#: matter for the peer benchmark's lesion/normal check (benchmarks/peers).
MASKS = ("brain", "lesion_hyper", "nawm")
#: Bump when the volumes' content changes, so cached copies are rebuilt.
VOLUME_VERSION = 2


@dataclass(frozen=True)
class Volume:
    name: str
    dtype: str
    folder: Path

    @property
    def dsc(self) -> Path:
        return self.folder / "dsc.nii.gz"

    @property
    def brain(self) -> Path:
        return self.folder / "brain.nii.gz"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return VOLUMES[self.name]

    @property
    def input_mb(self) -> float:
        """Size of the series in float32, MB (10^6 bytes)."""
        x, y, z, t = self.shape
        return x * y * z * t * 4 / 1e6


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "perfusion" / "bench"


def build_volume(name: str, dtype: str, cache: Path) -> Volume:
    """The standard volume ``name`` in ``dtype``, built into ``cache`` unless already there."""
    import numpy as np

    from perfusion.io import write_json, write_nifti
    from perfusion.tools.phantom import PhantomSpec, make_phantom

    if name not in VOLUMES or dtype not in DTYPES:
        raise ValueError(f"unknown volume {name!r} / dtype {dtype!r}")
    folder = cache / f"{name}-{dtype}"
    vol = Volume(name, dtype, folder)
    stamp = folder / "volume.json"
    spec = {"version": VOLUME_VERSION, "shape": list(VOLUMES[name]), "dtype": dtype}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and vol.dsc.is_file() and vol.brain.is_file():
        return vol
    x, y, z, t = VOLUMES[name]
    slabs: list[np.ndarray] = []
    masks: dict[str, list[np.ndarray]] = {k: [] for k in MASKS}
    seed = 0
    while sum(s.shape[2] for s in slabs) < z:
        ph = make_phantom(PhantomSpec(matrix=x, n_frames=t, seed=seed, tr=TR_S, te=TE_S))
        slabs.append(ph.signal)
        for k in MASKS:
            masks[k].append(ph.masks[k])
        seed += 1
    signal = np.concatenate(slabs, axis=2)[:, :, :z]
    del slabs
    affine = np.diag([FOV_MM / x, FOV_MM / y, SLAB_MM / z, 1.0])
    affine[:3, 3] = [-FOV_MM / 2, -FOV_MM / 2, -SLAB_MM / 2]
    # built in a hidden folder beside its final place (the same filesystem: os.replace cannot move a
    # folder across filesystems), which then takes the final folder's place
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{dtype}.partial-", dir=cache))
    try:
        write_nifti(tmp / "dsc.nii.gz", signal, affine, tr=TR_S, dtype=np.dtype(dtype),
                    description="perfusion bench phantom")
        for k in MASKS:
            write_nifti(tmp / f"{k}.nii.gz", np.concatenate(masks[k], axis=2)[:, :, :z], affine, dtype=np.uint8)
        write_json(tmp / "dsc.json", {"EchoTime": TE_S, "RepetitionTime": TR_S})
        write_json(tmp / "volume.json", spec)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return vol


def _perfusion_cmd() -> list[str]:
    return [sys.executable, "-m", "perfusion"]


def run_analyze(vol: Volume, out: Path, extra: list[str], env: dict | None = None) -> dict:
    """One ``perfusion analyze`` in a fresh process: wall s, peak RSS MB, and report.json's timings."""
    cmd = [*_perfusion_cmd(), "analyze", str(vol.dsc), "--mask", str(vol.brain), "--out", str(out), "--force",
           "-q", "--no-html", *extra]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
        peak_kb = 0
        while proc.poll() is None:
            peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            msg = err.read().decode(errors="replace").strip()[-400:]
            raise RuntimeError(f"perfusion analyze failed on {vol.dsc} ({' '.join(extra)}): {msg}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024.0, "timings_s": report.get("timings_s", {}),
            "voxels": int(report.get("n_voxels_analysed", 0))}


def _vm_hwm_kb(pid: int) -> int:
    """The process's peak resident memory so far (Linux /proc VmHWM, kB; 0 where unreadable). Not
    getrusage's ru_maxrss: Linux carries that across fork and exec, so a child reports the parent's
    size when the parent is the larger (this process holds whole volumes)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def measure_config(vol: Volume, config: str, extra: list[str], *, repeats: int, work: Path,
                   progress=None) -> tuple[dict, list[dict]]:
    runs = []
    for _ in range(repeats):
        runs.append(run_analyze(vol, work / f"{vol.name}-{vol.dtype}-{config}", extra))
        if progress:
            progress()
    e2e = {"volume": vol.name, "dtype": vol.dtype, "config": config, "args": " ".join(extra),
           "wall_s_median": round(_median([r["wall_s"] for r in runs]), 3),
           "wall_s_runs": [round(r["wall_s"], 3) for r in runs],
           "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
           "input_float32_mb": round(vol.input_mb, 1)}
    e2e["peak_over_input"] = round(e2e["peak_rss_mb"] / vol.input_mb, 2)
    stages = []
    names = list(runs[0]["timings_s"])
    voxels = runs[0]["voxels"]
    for stage in names:
        s = _median([r["timings_s"].get(stage, float("nan")) for r in runs])
        stages.append({"volume": vol.name, "dtype": vol.dtype, "config": config, "stage": stage,
                       "seconds_median": round(s, 4), "voxels": voxels,
                       "voxels_per_s": round(voxels / s) if s > 0 else None})
    e2e["analysis_s_median"] = round(sum(st["seconds_median"] for st in stages
                                         if st["stage"] not in ("load", "motion", "anat")), 3)
    return e2e, stages


def measure_osvd_floor(vol: Volume, aif_tsv: Path, *, repeats: int) -> dict:
    """In this process, on the volume's brain voxels (delta R2*, float64): oSVD (projection and the
    per-voxel threshold search, ``deconvolution.deconvolve``) against the practical floor, one matrix
    product of the curves with a fixed-threshold (csvd, P = 0.1) pseudo-inverse (N x 2N), computed
    once outside the timing, with BLAS on all cores. Both warm; medians of ``repeats``."""
    import numpy as np

    from perfusion.io import load_mask, load_series
    from perfusion.quantify import deconvolution, signal

    s = load_series(vol.dsc)
    brain = load_mask(vol.brain, s, what="brain mask")
    flat = s.data.reshape(-1, s.n_frames)[brain.ravel()]
    base = signal.find_baseline(flat.mean(axis=0, dtype=np.float64), tr=s.tr)
    keep = slice(base.start, s.n_frames)
    c, _ = signal.to_delta_r2s(flat[:, keep], te=s.te, baseline=slice(0, base.stop - base.start))
    c = np.asarray(c, dtype=np.float64)
    del flat
    aif = np.loadtxt(aif_tsv, skiprows=1, usecols=1)
    op = deconvolution.prepare(aif, tr=s.tr, method="osvd")
    fixed = deconvolution.prepare(aif, tr=s.tr, method="csvd")
    w = np.zeros_like(fixed.s)
    w[: fixed.k_max] = 1.0 / fixed.s[: fixed.k_max]
    pinv = (fixed.u[: fixed.n_t] * w) @ fixed.vt  # (N, 2N): residue = c @ pinv
    deconvolution.deconvolve(op, c[:2048])  # compiled / cached kernels loaded
    t_osvd, t_floor = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        deconvolution.deconvolve(op, c)
        t_osvd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _ = c @ pinv
        t_floor.append(time.perf_counter() - t0)
    o, f = _median(t_osvd), _median(t_floor)
    return {"volume": vol.name, "dtype": vol.dtype, "voxels": int(c.shape[0]), "frames": int(c.shape[1]),
            "osvd_s": round(o, 6), "floor_s": round(f, 6), "ratio": round(o / f, 2)}


def measure_compile(work: Path) -> dict:
    """Cold (empty numba cache) and warm (filled cache) ``perfusion analyze`` of the small demo-size
    phantom, each in a fresh process."""
    from perfusion.io import staged_output
    from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

    case = work / "compile-case"
    with staged_output(case, force=True) as stage:
        write_phantom(make_phantom(PhantomSpec()), stage)
    dsc = next(case.glob("*_dsc.nii.gz"))
    cache = work / "numba-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    out: dict[str, Any] = {}
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        subprocess.run([*_perfusion_cmd(), "analyze", str(dsc), "--out", str(work / "compile-out"), "--force", "-q",
                        "--no-html"], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out[f"{label}_s"] = round(time.perf_counter() - t0, 3)
    out["compile_s"] = round(out["cold_s"] - out["warm_s"], 3)
    out["case"] = "sample phantom 64 x 64 x 5 x 80"
    return out


def machine() -> dict:
    import numba
    import numpy

    from perfusion import __version__
    return {"perfusion": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "numba": numba.__version__, "cpus": os.cpu_count(),
            # numba.config sets its NUMBA_* names from the environment at import: mypy cannot see them
            "numba_threads": int(numba.config.NUMBA_NUM_THREADS),  # type: ignore[attr-defined]
            "platform": platform.platform(), "processor": platform.machine()}


def run_bench(*, volumes: list[str], dtypes: list[str], repeats: int, kernels: bool, compile_time: bool,
              cache: Path, on_step=None) -> dict:
    """Every measurement; returns the JSON-able result."""
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="perfusion-bench-"))
    result: dict[str, Any] = {
        "schema": SCHEMA, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "settings": {"repeats": repeats, "volumes": volumes, "dtypes": dtypes},
        "volumes": {}, "end_to_end": [], "stages": [], "osvd_floor": [], "compile": None}
    step = on_step or (lambda msg: None)
    try:
        if compile_time:
            step("numba compile: cold and warm cache")
            result["compile"] = measure_compile(work)
        for name in volumes:
            for dtype in dtypes:
                step(f"volume {name} {dtype}: building or reading the cache")
                vol = build_volume(name, dtype, cache)
                result["volumes"][f"{name}-{dtype}"] = {"shape": list(vol.shape), "dtype": dtype,
                                                         "input_float32_mb": round(vol.input_mb, 1)}
                # one untimed run: the page cache holds the file and numba's cache the kernels
                run_analyze(vol, work / "warmup", ["--motion-correct", "off"])
                if dtype == dtypes[0]:
                    step(f"{name}: oSVD against one fixed-threshold matrix product")
                    result["osvd_floor"].append(measure_osvd_floor(vol, work / "warmup" / "aif.tsv", repeats=repeats))
                for config, extra in CONFIGS.items():
                    step(f"{name} {dtype}: analyze {config} x {repeats}")
                    e2e, stages = measure_config(vol, config, extra, repeats=repeats, work=work)
                    result["end_to_end"].append(e2e)
                    result["stages"] += stages
                if kernels and name == "clinical" and dtype == dtypes[0]:
                    for config, extra in KERNEL_CONFIGS.items():
                        step(f"{name} {dtype}: analyze {config}")
                        _, stages = measure_config(vol, config, extra, repeats=max(1, repeats // 2), work=work)
                        result["stages"] += stages
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
