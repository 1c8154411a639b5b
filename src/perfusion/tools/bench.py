"""`perfusion bench`: speed and memory on standard phantom volumes, as a table and as stable JSON.

Volumes (``VOLUMES``): the clinical 128 x 128 x 24 slices x 80 frames and the high-resolution
256 x 256 x 30 x 120, each in int16 and float32, with their brain masks. They are stacks of the
synthetic phantom's 5-slice slabs (``phantom.make_phantom``, a new noise seed per slab) on a 240 mm
field of view, written once into a cache folder and reused.

What is measured (a ``Plan``), each over ``repeats`` runs, the configurations of one volume taking
turns (A B C A B C ...) so that a drift of the machine's load hits all of them alike:
- end to end: ``perfusion analyze VOL --mask BRAIN --no-html`` in a fresh process (import, load, motion
  screening, mask, AIF, maps, writing the maps and report.json), for the default method and leakage
  correction and for ``--method osvd --leakage bsw``; the peak resident memory of that process
  (/proc VmHWM, polled every 20 ms), also as a multiple of the input's size in float32;
- stages: the analysis's own stage timings (report.json ``timings_s``) of the same runs, and of runs
  of every other deconvolution and leakage method on the clinical volume, as voxels per second over
  the voxels analysed;
- oSVD against one fixed-threshold matrix product, in this process;
- numba compilation: the same command on a small phantom twice, each in a fresh process, with an
  empty NUMBA_CACHE_DIR (cold: every kernel compiles and is cached) and then that filled cache (warm).

Every timed row keeps all its run times and their median, minimum and maximum, so that a reader can
tell noise from a change. The machine's state is recorded beside them: the 1-minute load average
before the start and the CPU time stolen by the hypervisor during the run (/proc/stat), and whether
either says the machine was busy (``machine_state``).

A saved result can be the baseline of a later one (``compare``): each stage and end-to-end row is
matched by its key, volume-dtype/config/stage, and the medians are compared.

The JSON (``--json FILE``) has a schema tag and only plain keys, so CI can diff two runs.
Wall times depend on the machine and on whatever else runs on it; ratios between runs of the same
machine are the figure to compare.
"""

from __future__ import annotations

import json
import math
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

SCHEMA = "perfusion-bench/2"

#: name -> (x, y, slices, frames)
VOLUMES = {"clinical": (128, 128, 24, 80), "high": (256, 256, 30, 120)}
DTYPES = ("int16", "float32")
FOV_MM = 240.0
SLAB_MM = 120.0
TE_S = 0.025
TR_S = 1.5

#: The two configurations of the issue's targets, by name: extra ``perfusion analyze`` arguments.
CONFIGS = {"default": [], "osvd-bsw": ["--method", "osvd", "--leakage", "bsw"]}
#: Runs on the clinical volume for the other kernels' throughput (motion screening off: the stage
#: timings are what they are for); stage rows only.
KERNEL_CONFIGS = {
    **{f"{m}-residue": ["--method", m, "--motion-correct", "off"] for m in ("csvd", "ssvd", "tikhonov", "osvd")},
    **{f"model-{lk}": ["--leakage", lk, "--motion-correct", "off"] for lk in ("none", "bsw", "bidirectional")},
}
#: Masks written beside each volume (the phantom's): the brain for --mask; a lesion and normal white
#: matter for the peer benchmark's lesion/normal check (benchmarks/peers).
MASKS = ("brain", "lesion_hyper", "nawm")
#: Bump when the volumes' content changes, so cached copies are rebuilt.
VOLUME_VERSION = 2
#: Stages of report.json ``timings_s`` that are not the analysis proper (reading and preparing the input).
NOT_ANALYSIS = ("load", "motion", "anat")

#: The machine counts as busy when its 1-minute load average before the start exceeds this per CPU ...
LOAD_BUSY_PER_CPU = 0.5
#: ... or when the hypervisor took more than this share of the CPU time during the run (steal, %).
STEAL_BUSY_PCT = 5.0
#: Baseline comparison: a row is judged only when it is at least this long (s) on one side and a
#: slowdown only when it adds at least this much: a few ms of scheduling make any ratio below it.
FLOOR_S = 0.02


@dataclass(frozen=True)
class Plan:
    """What one ``run_bench`` measures. ``configs``: names in CONFIGS timed end to end; ``kernels``:
    the KERNEL_CONFIGS too (clinical volume, first dtype); ``warmup``: one untimed run per volume first
    (the file in the page cache, the kernels in numba's cache; the oSVD floor needs its AIF)."""

    volumes: list[str]
    dtypes: list[str]
    repeats: int = 3
    configs: tuple[str, ...] = tuple(CONFIGS)
    kernels: bool = True
    compile_time: bool = True
    osvd_floor: bool = True
    warmup: bool = True


def quick_plan(repeats: int = 3) -> Plan:
    """``perfusion bench --quick``: the clinical int16 volume, the default configuration only, ``repeats``
    runs for a spread; no warm-up run (the median of three absorbs a first run that reads the file from
    disk), no oSVD floor, no other kernels, no compile measurement. About ``repeats`` analyses."""
    return Plan(volumes=["clinical"], dtypes=["int16"], repeats=repeats, configs=("default",), kernels=False,
                compile_time=False, osvd_floor=False, warmup=False)


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


def spread(values: list[float], digits: int = 4) -> dict:
    """Median, minimum and maximum of run times (s), rounded: the spread that tells noise from a change."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": round(_median(vals), digits), "min": round(min(vals), digits), "max": round(max(vals), digits)}


def measure_volume(vol: Volume, configs: dict[str, list[str]], *, repeats: int, work: Path,
                   step=None) -> dict[str, list[dict]]:
    """``repeats`` rounds of one ``run_analyze`` per configuration, in turn (A B C A B C ...): a drift
    of the machine's load hits every configuration alike. Returns each configuration's runs."""
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for i in range(repeats):
        if step:
            step(f"{vol.name} {vol.dtype}: round {i + 1}/{repeats} of {', '.join(configs)}")
        for config, extra in configs.items():
            runs[config].append(run_analyze(vol, work / f"{vol.name}-{vol.dtype}-{config}", extra))
    return runs


def summarise_end_to_end(vol: Volume, config: str, extra: list[str], runs: list[dict]) -> dict:
    """The end-to-end row of one configuration: wall and analysis seconds (all runs, median, min, max)
    and the peak resident memory (the largest of the runs), also over the input's size in float32."""
    walls = [r["wall_s"] for r in runs]
    analysis = [sum(v for k, v in r["timings_s"].items() if k not in NOT_ANALYSIS) for r in runs]
    w, a = spread(walls, 3), spread(analysis, 3)
    peak = max(r["peak_rss_mb"] for r in runs)
    return {"volume": vol.name, "dtype": vol.dtype, "config": config, "args": " ".join(extra),
            "wall_s_median": w["median"], "wall_s_min": w["min"], "wall_s_max": w["max"],
            "wall_s_runs": [round(x, 3) for x in walls],
            "analysis_s_median": a["median"], "analysis_s_runs": [round(x, 3) for x in analysis],
            "peak_rss_mb": round(peak, 1), "peak_rss_mb_runs": [round(r["peak_rss_mb"], 1) for r in runs],
            "input_float32_mb": round(vol.input_mb, 1), "peak_over_input": round(peak / vol.input_mb, 2)}


def summarise_stages(vol: Volume, config: str, runs: list[dict]) -> list[dict]:
    """One row per stage of report.json ``timings_s``: all run times, median, min, max, and the
    throughput at the median over the voxels analysed."""
    rows = []
    voxels = runs[0]["voxels"]
    for stage in runs[0]["timings_s"]:
        times = [r["timings_s"].get(stage, float("nan")) for r in runs]
        s = spread(times)
        med = s["median"]
        rows.append({"volume": vol.name, "dtype": vol.dtype, "config": config, "stage": stage,
                     "seconds_median": med, "seconds_min": s["min"], "seconds_max": s["max"],
                     "seconds_runs": [round(t, 4) for t in times], "voxels": voxels,
                     "voxels_per_s": round(voxels / med) if med else None})
    return rows


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
    o, f = spread(t_osvd, 6), spread(t_floor, 6)
    return {"volume": vol.name, "dtype": vol.dtype, "voxels": int(c.shape[0]), "frames": int(c.shape[1]),
            "osvd_s": o["median"], "osvd_s_min": o["min"], "osvd_s_max": o["max"],
            "osvd_s_runs": [round(t, 6) for t in t_osvd],
            "floor_s": f["median"], "floor_s_min": f["min"], "floor_s_max": f["max"],
            "floor_s_runs": [round(t, 6) for t in t_floor], "ratio": round(o["median"] / f["median"], 2)}


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


def load_avg_1min() -> float | None:
    """The 1-minute load average; None where the system does not keep one."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def read_proc_stat(path: str = "/proc/stat") -> str | None:
    """The text of /proc/stat; None where there is none (not Linux)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_steal_jiffies(text: str | None) -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs from /proc/stat's ``cpu`` line (user nice system idle
    iowait irq softirq steal ...); None without that line or its steal field."""
    for line in (text or "").splitlines():
        fields = line.split()
        if fields[:1] == ["cpu"]:
            try:
                ticks = [int(x) for x in fields[1:9]]
            except ValueError:
                return None
            return (ticks[7], sum(ticks)) if len(ticks) == 8 else None
    return None


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of CPU time the hypervisor took between two readings of ``cpu_steal_jiffies``, %."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * max(after[0] - before[0], 0) / (after[1] - before[1])


def machine_state(*, load_avg: float | None, cpus: int | None, steal_pct: float | None) -> dict:
    """Busy or not, from the load average before the start (above LOAD_BUSY_PER_CPU per CPU) and the CPU
    steal over the run (above STEAL_BUSY_PCT %); either may be None (not measurable here: not judged).
    ``why``: a phrase for the warning, None when not busy."""
    why = []
    if load_avg is not None and cpus and load_avg > LOAD_BUSY_PER_CPU * cpus:
        why.append(f"load average {load_avg:.2f} on {cpus} CPUs before the start")
    if steal_pct is not None and steal_pct > STEAL_BUSY_PCT:
        why.append(f"{steal_pct:.1f} % of the CPU time stolen by the hypervisor during the run")
    return {"busy": bool(why), "load_avg": None if load_avg is None else round(load_avg, 2),
            "steal_pct": None if steal_pct is None else round(steal_pct, 2), "why": "; ".join(why) or None}


def count_steps(plan: Plan) -> int:
    """How many times ``run_bench`` calls its ``on_step`` for ``plan`` (a progress bar's total): the
    compile measurement, then per volume and dtype its build, the oSVD floor (first dtype) and each round
    of the configurations. Rounds take about the same time, so the count makes a fair time estimate."""
    per_volume = [1 + (plan.osvd_floor and dtype == plan.dtypes[0]) + plan.repeats for dtype in plan.dtypes]
    return int(plan.compile_time) + len(plan.volumes) * sum(per_volume)


def run_bench(plan: Plan, *, cache: Path, on_step=None) -> dict:
    """Every measurement of ``plan``; returns the JSON-able result, the machine's state included."""
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="perfusion-bench-"))
    load_before, stat_before = load_avg_1min(), cpu_steal_jiffies(read_proc_stat())
    result: dict[str, Any] = {
        "schema": SCHEMA, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "settings": {"repeats": plan.repeats, "volumes": plan.volumes, "dtypes": plan.dtypes,
                                           "configs": list(plan.configs), "kernels": plan.kernels,
                                           "warmup": plan.warmup or plan.osvd_floor},
        "volumes": {}, "end_to_end": [], "stages": [], "osvd_floor": [], "compile": None}
    step = on_step or (lambda msg: None)
    try:
        if plan.compile_time:
            step("numba compile: cold and warm cache")
            result["compile"] = measure_compile(work)
        for name in plan.volumes:
            for dtype in plan.dtypes:
                _bench_volume(plan, name, dtype, cache=cache, work=work, result=result, step=step)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steal = steal_percent(stat_before, cpu_steal_jiffies(read_proc_stat()))
    result["machine"].update(machine_state(load_avg=load_before, cpus=os.cpu_count(), steal_pct=steal))
    return result


def _bench_volume(plan: Plan, name: str, dtype: str, *, cache: Path, work: Path, result: dict, step) -> None:
    """One volume in one dtype: build or read it, the optional warm-up and oSVD floor, then the
    configurations in turn; the rows go into ``result``."""
    step(f"volume {name} {dtype}: building or reading the cache")
    vol = build_volume(name, dtype, cache)
    result["volumes"][f"{name}-{dtype}"] = {"shape": list(vol.shape), "dtype": dtype,
                                             "input_float32_mb": round(vol.input_mb, 1)}
    if plan.warmup or plan.osvd_floor:
        # one untimed run: the page cache holds the file and numba's cache the kernels
        run_analyze(vol, work / "warmup", ["--motion-correct", "off"])
    if plan.osvd_floor and dtype == plan.dtypes[0]:
        step(f"{name}: oSVD against one fixed-threshold matrix product")
        result["osvd_floor"].append(measure_osvd_floor(vol, work / "warmup" / "aif.tsv", repeats=plan.repeats))
    configs = {c: CONFIGS[c] for c in plan.configs}
    if plan.kernels and name == "clinical" and dtype == plan.dtypes[0]:
        configs.update(KERNEL_CONFIGS)
    runs = measure_volume(vol, configs, repeats=plan.repeats, work=work, step=step)
    for config, extra in configs.items():
        if config in plan.configs:
            result["end_to_end"].append(summarise_end_to_end(vol, config, extra, runs[config]))
        result["stages"] += summarise_stages(vol, config, runs[config])


# ------------------------------------------------------------------------- against a saved baseline


def median_rows(result: dict) -> dict[str, float | None]:
    """Each end-to-end row's median wall (s) and each stage's median (s) by key
    ``volume-dtype/config/end_to_end`` or ``volume-dtype/config/STAGE``; KeyError or TypeError when
    ``result`` is not shaped as ``run_bench``'s."""
    rows: dict[str, float | None] = {}
    for r in result["end_to_end"]:
        rows[f"{r['volume']}-{r['dtype']}/{r['config']}/end_to_end"] = _seconds(r["wall_s_median"])
    for r in result["stages"]:
        rows[f"{r['volume']}-{r['dtype']}/{r['config']}/{r['stage']}"] = _seconds(r["seconds_median"])
    return rows


def _seconds(value: Any) -> float | None:
    """A median from JSON: a finite number >= 0, None (NaN written as null), else TypeError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise TypeError(f"{value!r} is not a time in s")
    return float(value)


def load_baseline(path: Path) -> dict:
    """A saved ``perfusion bench --json`` result of this schema; ValueError with a short reason
    (unreadable, not JSON, another schema, not a bench result) otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError("is not JSON") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"has schema {schema!r}, not {SCHEMA!r}: measure the baseline again with this version")
    try:
        median_rows(data)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"is not a perfusion bench result ({type(exc).__name__}: {exc})") from None
    return data


def compare(result: dict, baseline: dict, *, fail_above: float | None = None, floor_s: float = FLOOR_S) -> dict:
    """Each row's median now against the baseline's (ratio now / baseline; above 1 slower). Status:
    "slower" when the ratio exceeds ``fail_above`` and the row got at least ``floor_s`` slower (a
    failure); "short" when both medians are under ``floor_s`` (not judged: noise); "ok"; "only in
    baseline" / "only now" for rows on one side and "no value" for a NaN median (listed, never failed)."""
    now, base = median_rows(result), median_rows(baseline)
    rows = []
    for key in [*base, *(k for k in now if k not in base)]:
        b, n = base.get(key), now.get(key)
        ratio = n / b if b and n is not None else None
        if key not in base or key not in now:
            status = "only now" if key not in base else "only in baseline"
        elif b is None or n is None:
            status = "no value"
        elif max(b, n) < floor_s:
            status = "short"
        elif fail_above is not None and n - b >= floor_s and (ratio is None or ratio > fail_above):
            status = "slower"
        else:
            status = "ok"
        rows.append({"key": key, "baseline_s": b, "now_s": n, "ratio": None if ratio is None else round(ratio, 3),
                     "status": status})
    failed = [r["key"] for r in rows if r["status"] == "slower"]
    return {"fail_above": fail_above, "floor_s": floor_s, "rows": rows, "failed": failed,
            "baseline_machine": {k: baseline.get("machine", {}).get(k) for k in ("cpus", "processor", "platform")},
            "baseline_created_utc": baseline.get("created_utc")}
