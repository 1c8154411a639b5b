"""Side-by-side benchmark of issue 20's speed targets (and issue 8's peer comparison): perfusion
against a plain numpy script and osipy, on the same volume and mask, in the same run. Runs in
perfusion's venv.

    python benchmarks/peers/bench_peers.py VOLUME_FOLDER [--repeats 5] [--json out.json] [--skip-osipy]
                                           [--skip-cold] [--details]

VOLUME_FOLDER holds dsc.nii.gz, brain.nii.gz and dsc.json (EchoTime, RepetitionTime in s), e.g. the
clinical volume that ``perfusion bench`` builds (benchmarks/.cache/clinical-int16). Every command is a
fresh process timed from outside (wall from start to exit; CPU and peak resident memory from the
kernel's accounting of that process, ``os.wait4``). Each round runs every command once, in the same
order (A B C ... A B C ...), so that a drift of the machine's load hits all of them alike; the table
gives medians over the rounds and the range of the per-round values:

- ``analyze``: ``perfusion analyze DSC --mask BRAIN --out OUT --no-html`` (the default method);
- ``analyze_osvd_bsw``: the same with ``--method osvd --leakage bsw``;
- ``analyze_html``: the default ``perfusion analyze`` (report.html drawn);
- ``numpy_csvd``: ``numpy_svd.py --method csvd``, the plain numpy fixed-threshold cSVD script (load,
  one matrix product, CBV, CBF and MTT, their saving), handed perfusion's AIF and frames;
- ``osipy``: osipy 0.1.4's own command line (``osipy CONFIG.yaml DSC``, a YAML giving TE and the mask:
  its defaults otherwise, its own AIF), as its users run it, in benchmarks/.venv-osipy;
- ``cold``: ``analyze`` with an empty numba cache (a fresh NUMBA_CACHE_DIR each round).

Before the rounds, one untimed run of each command (the first of them the reference run whose AIF
and frames the numpy script is handed) fills the page cache and numba's cache. ``--details`` adds issue
8's comparison of the same method with the same input: perfusion's compute timed inside its process,
osipy's stages given perfusion's AIF (osipy_run.py), the same oSVD + BSW in numpy, and the maps'
agreement printed (it is always in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OSIPY_VENV = HERE.parent / ".venv-osipy"
SETUP_OSIPY = "benchmarks/peers/setup_osipy.sh"
SCHEMA = "perfusion-targets/1"

#: Issue 20's targets: (row, numerator, denominator, kind, op, target). kind "ratio": median numerator /
#: median denominator; "minus": median numerator - median denominator, s; "memory": peak RSS / input.
TARGETS = (
    ("analyze --no-html / numpy cSVD script", "analyze", "numpy_csvd", "ratio", "<=", 1.5),
    ("analyze --method osvd --leakage bsw --no-html / script", "analyze_osvd_bsw", "numpy_csvd", "ratio", "<=", 1.5),
    ("analyze (with report.html) / script", "analyze_html", "numpy_csvd", "ratio", "<=", 2.0),
    ("osipy 0.1.4 / analyze --no-html", "osipy", "analyze", "ratio", ">=", 5.0),
    ("cold start: empty numba cache - warm, s", "cold", "analyze", "minus", "<=", 15.0),
    ("peak RSS / input in float32", None, None, "memory", "<=", 3.0),
)
#: Issue 8's target for --details: osipy's compute / perfusion's compute, same method and input.
TARGET_COMPUTE = 20.0
PERFUSION_TOOLS = ("analyze", "analyze_osvd_bsw", "analyze_html")
#: perfusion_compute (--details): issue 8's like-for-like options (the peers screen no motion).
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
    from perfusion.report.html import write_html
    from perfusion.report.outputs import write_result

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
            "save_s": t4 - t3, "compute_cpu_s": c3 - c2, "voxels": int(result.brain.sum()),
            "frames": int(result.time_s.size)}


# --- running one command

@dataclass
class Tool:
    """A command of the rotation. ``argv(out)`` builds it for an output folder; ``env(round)`` adds
    variables; ``json_out``: it prints one JSON line last (its own load / compute / save times)."""

    name: str
    argv: object  # Callable[[Path], list[str]]
    json_out: bool = False
    env: object = None  # Callable[[Path], dict] | None: given a scratch folder of its own
    runs: list = field(default_factory=list)


def run_timed(cmd: list[str], *, env: dict | None = None, what: str) -> dict:
    """Run ``cmd`` to its end; wall_s measured from outside, cpu_s (user + system of the process and its
    threads) and peak_rss_mb from the kernel's accounting of that very process (``os.wait4``: exact at exit,
    no polling). Linux's ru_maxrss starts from the parent's size at fork: this harness stays small (no
    numpy before the agreement at the end). Stops the benchmark (SystemExit) when the command fails."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{stderr[-3000:]}")
    rss_mb = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, kB on Linux
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": rss_mb, "stdout": stdout}


def run_tool(tool: Tool, out: Path, scratch: Path) -> dict:
    """One run of ``tool`` into the fresh folder ``out``: its times, and its own JSON fields if it prints them."""
    shutil.rmtree(out, ignore_errors=True)
    env = tool.env(scratch) if tool.env else None
    run = run_timed(tool.argv(out), env=env, what=tool.name)
    stdout = run.pop("stdout")
    if tool.json_out:
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise SystemExit(f"{tool.name} printed no JSON:\n{stdout[-2000:]}")
        run["own"] = json.loads(lines[-1])
    return run


def read_sidecar(folder: Path) -> tuple[float, float]:
    meta = json.loads((folder / "dsc.json").read_text())
    te, tr = float(meta["EchoTime"]), float(meta["RepetitionTime"])
    if te > 1 or tr > 20:
        raise SystemExit(f"{folder / 'dsc.json'}: EchoTime {te}, RepetitionTime {tr}: give them in seconds")
    return te, tr


def nifti_shape(path: Path) -> tuple[list[int], str]:
    """The series' shape and on-disk dtype, from its header only (nibabel reads no data here)."""
    import nibabel as nib

    img = nib.load(path)
    return [int(n) for n in img.shape], str(img.get_data_dtype())


# --- the tools

def perfusion_tools(dsc: Path, brain: Path) -> dict[str, Tool]:
    """The three perfusion configurations of the targets and the cold start (a fresh numba cache)."""
    base = [sys.executable, "-m", "perfusion", "analyze", str(dsc), "--mask", str(brain)]
    return {
        "analyze": Tool("analyze", lambda out: [*base, "--out", str(out), "--no-html"]),
        "analyze_osvd_bsw": Tool("analyze_osvd_bsw", lambda out: [*base, "--out", str(out), "--method", "osvd",
                                                                  "--leakage", "bsw", "--no-html"]),
        "analyze_html": Tool("analyze_html", lambda out: [*base, "--out", str(out)]),
        "cold": Tool("cold", lambda out: [*base, "--out", str(out), "--no-html"],
                     env=lambda scratch: {"NUMBA_CACHE_DIR": str(scratch)}),
    }


def peer_tools(dsc: Path, brain: Path, te: float, tr: float, ref_dir: Path, work: Path, *, osipy_venv: Path | None,
               details: bool) -> dict[str, Tool]:
    """numpy's cSVD script (handed the reference run's AIF and frames), osipy's command line and, with
    ``details``, issue 8's like-for-like tools."""
    report = json.loads((ref_dir / "report.json").read_text())
    first, stop = int(report["baseline"]["start_frame"]), int(report["baseline"]["stop_frame"])
    common = [str(dsc), "--mask", str(brain), "--te", str(te), "--tr", str(tr), "--aif", str(ref_dir / "aif.tsv"),
              "--first-frame", str(first), "--baseline", f"{first}:{stop}"]
    numpy_svd = [sys.executable, str(HERE / "numpy_svd.py"), *common]
    tools = {"numpy_csvd": Tool("numpy_csvd", lambda out: [*numpy_svd, "--method", "csvd", "--threshold", "0.1",
                                                           "--out", str(out)], json_out=True)}
    if osipy_venv is not None:
        config = work / "osipy.yaml"
        config.write_text(osipy_yaml(te_s=te, mask=brain))
        osipy_cli = str(osipy_venv / "bin" / "osipy")
        tools["osipy"] = Tool("osipy", lambda out: [osipy_cli, str(config), str(dsc), "--output", str(out)])
    if details:
        from perfusion.quantify.deconvolution import DEFAULT_OI_TARGET

        tools["perfusion_compute"] = Tool("perfusion_compute", lambda out: [
            sys.executable, str(Path(__file__).resolve()), "_perfusion_compute", str(dsc), str(brain), str(out)],
            json_out=True)
        tools["numpy_osvd"] = Tool("numpy_osvd", lambda out: [*numpy_svd, "--method", "osvd", "--leakage", "bsw",
                                                              "--oi-target", str(DEFAULT_OI_TARGET), "--out", str(out)],
                                   json_out=True)
        if osipy_venv is not None:
            osipy_py = str(osipy_venv / "bin" / "python")
            tools["osipy_stages"] = Tool("osipy_stages", lambda out: [osipy_py, str(HERE / "osipy_run.py"), *common,
                                                                      "--out", str(out)], json_out=True)
    return tools


def osipy_yaml(*, te_s: float, mask: Path) -> str:
    """osipy's run configuration as its users write it (``osipy --dump-defaults dsc``): the echo time (ms)
    and the brain mask; everything else osipy's defaults (oSVD, its leakage correction, its own AIF)."""
    return (f"modality: dsc\npipeline:\n  te: {te_s * 1000.0:g}\ndata:\n  format: nifti\n  mask: {mask}\n"
            "output:\n  format: nifti\nlogging:\n  level: WARNING\n")


def osipy_venv_of(args) -> tuple[Path | None, str | None]:
    """osipy's venv, or None and why not (skipped, or not built)."""
    if args.skip_osipy:
        return None, "osipy: skipped (--skip-osipy)"
    if not (args.osipy_venv / "bin" / "osipy").exists():
        return None, f"osipy: not installed (run {SETUP_OSIPY})"
    return args.osipy_venv, None


# --- the rounds

def run_rounds(tools: dict[str, Tool], *, repeats: int, work: Path, progress) -> None:
    """One untimed run of every tool but the cold start, then ``repeats`` rounds of every tool in turn.
    The last round's outputs are kept (the maps' agreement); the others are removed as they go."""
    for tool in tools.values():
        if tool.name != "cold":
            run_tool(tool, work / f"{tool.name}-warmup", work / "scratch-warmup")
            shutil.rmtree(work / f"{tool.name}-warmup", ignore_errors=True)
            progress(f"warm-up {tool.name}")
    for i in range(repeats):
        for tool in tools.values():
            out, scratch = work / f"{tool.name}-{i}", work / f"scratch-{tool.name}-{i}"
            tool.runs.append(run_tool(tool, out, scratch))
            shutil.rmtree(scratch, ignore_errors=True)
            if i < repeats - 1:
                shutil.rmtree(out, ignore_errors=True)
            r = tool.runs[-1]
            progress(f"round {i + 1}/{repeats} {tool.name:18s} {r['wall_s']:7.2f} s wall {r['cpu_s']:7.2f} s CPU "
                     f"{r['peak_rss_mb']:6.0f} MB")


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def target_row(row: tuple, tools: dict[str, Tool], *, input_mb: float, missing: dict[str, str]) -> dict:
    """One row of the targets table: medians, the value, the range of the per-round values, met or not."""
    label, num, den, kind, op, target = row
    entry = {"row": label, "kind": kind, "target": target, "op": op, "numerator": num, "denominator": den}
    if kind == "memory":
        peaks = {n: [r["peak_rss_mb"] for r in tools[n].runs] for n in PERFUSION_TOOLS if n in tools}
        worst = max(peaks, key=lambda n: _median(peaks[n]))
        per_round = [p / input_mb for p in peaks[worst]]
        entry.update(numerator=worst, num_median=_median(peaks[worst]), den_median=input_mb,
                     value=_median(peaks[worst]) / input_mb, low=min(per_round), high=max(per_round))
    elif num not in tools or den not in tools:
        entry.update(value=None, note=missing.get(num) or missing.get(den) or f"{num} or {den} not run")
        return entry
    else:
        a, b = [r["wall_s"] for r in tools[num].runs], [r["wall_s"] for r in tools[den].runs]
        pairs = list(zip(a, b, strict=True))  # the same round: a drift of the load hits both
        paired = [x / y for x, y in pairs] if kind == "ratio" else [x - y for x, y in pairs]
        value = _median(a) / _median(b) if kind == "ratio" else _median(a) - _median(b)
        ca, cb = _median([r["cpu_s"] for r in tools[num].runs]), _median([r["cpu_s"] for r in tools[den].runs])
        entry.update(num_median=_median(a), den_median=_median(b), value=value, low=min(paired), high=max(paired),
                     cpu_value=ca / cb if kind == "ratio" else ca - cb)
    entry["met"] = entry["value"] <= target if op == "<=" else entry["value"] >= target
    return entry


def format_table(rows: list[dict]) -> list[str]:
    """The targets table as text lines (one per row)."""
    head = f"{'row':56s} {'medians':>20s} {'value':>9s} {'range':>15s} {'CPU':>8s} {'target':>9s}  met"
    lines = [head, "-" * len(head)]
    for r in rows:
        unit = " s" if r["kind"] == "minus" else "x"
        label = f"{r['row']} ({r['numerator']})" if r["kind"] == "memory" else r["row"]
        if r.get("value") is None:
            lines.append(f"{label:56s} {r['note']}")
            continue
        medians = (f"{r['num_median']:.0f} / {r['den_median']:.0f} MB" if r["kind"] == "memory"
                   else f"{r['num_median']:.2f} / {r['den_median']:.2f} s")
        value, rng = f"{r['value']:.2f}{unit}", f"{r['low']:.2f}-{r['high']:.2f}{unit}"
        target = f"{r['op']} {r['target']:g}{unit}"
        cpu = f"{r['cpu_value']:.2f}{unit}" if r.get("cpu_value") is not None else "-"
        lines.append(f"{label:56s} {medians:>20s} {value:>9s} {rng:>15s} {cpu:>8s} {target:>9s}  "
                     f"{'met' if r['met'] else 'NOT met'}")
    return lines


# --- agreement of the maps and issue 8's details

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
            entry["lesion_over_normal_perfusion"] = _lesion_over_normal(a, lesion & ok, normal & ok)
            entry["lesion_over_normal_peer"] = _lesion_over_normal(b, lesion & ok, normal & ok)
        out[name] = entry
    return out


def _lesion_over_normal(x, lesion, normal) -> float | None:
    """Median of ``x`` in the lesion over its median in normal tissue; None when either is empty or <= 0."""
    import numpy as np

    lo, no = x[lesion], x[normal]
    return float(np.median(lo) / np.median(no)) if lo.size and no.size and np.median(no) > 0 else None


#: Whose maps each peer's are compared with (the same method where there is one).
AGREEMENT_PAIRS = {"numpy_csvd": "analyze", "osipy": "analyze", "numpy_osvd": "analyze_osvd_bsw",
                   "osipy_stages": "analyze_osvd_bsw"}


def all_agreement(tools: dict[str, Tool], work: Path, repeats: int, masks: dict) -> dict:
    """The maps of the last round: each peer's against perfusion's (AGREEMENT_PAIRS)."""
    import nibabel as nib
    import numpy as np

    loaded = {k: (np.asarray(nib.load(p).dataobj) > 0 if p else None) for k, p in masks.items()}
    last = repeats - 1
    return {f"{peer} vs {ref}": agreement(work / f"{ref}-{last}", work / f"{peer}-{last}", loaded["brain"],
                                          loaded["lesion"], loaded["normal"])
            for peer, ref in AGREEMENT_PAIRS.items() if peer in tools and ref in tools}


def details_summary(tools: dict[str, Tool]) -> dict:
    """Issue 8's ratios for --details: osipy's stages (perfusion's AIF) and numpy's oSVD + BSW against
    perfusion's same method, end to end (analyze_osvd_bsw, whole process) and compute (inside each
    process: perfusion_compute's pipeline.analyze), with CPU beside wall."""
    def med(name, key, own=False):
        vals = [(r["own"] if own else r)[key] for r in tools[name].runs]
        return _median(vals)

    out = {}
    for peer in ("osipy_stages", "numpy_osvd"):
        if peer in tools:
            out[peer] = {
                "end_to_end": med(peer, "wall_s") / med("analyze_osvd_bsw", "wall_s"),
                "end_to_end_cpu": med(peer, "cpu_s") / med("analyze_osvd_bsw", "cpu_s"),
                "compute": med(peer, "compute_s", True) / med("perfusion_compute", "compute_s", True),
                "compute_cpu": med(peer, "compute_cpu_s", True) / med("perfusion_compute", "compute_cpu_s", True)}
    if "osipy_stages" in out:
        out["osipy_compute_target"] = {"target": TARGET_COMPUTE, "measured": out["osipy_stages"]["compute"],
                                       "met": out["osipy_stages"]["compute"] >= TARGET_COMPUTE}
    return out


def print_details(summary: dict, agree: dict) -> None:
    print("\nissue 8, same method and input (x: peer / perfusion, above 1 perfusion is faster; CPU: user + system):")
    for peer, r in summary.items():
        if peer != "osipy_compute_target":
            print(f"  {peer:14s} end to end {r['end_to_end']:.2f}x (CPU {r['end_to_end_cpu']:.2f}x), "
                  f"compute {r['compute']:.2f}x (CPU {r['compute_cpu']:.2f}x)")
    print("agreement with perfusion's maps (brain voxels, last round): Pearson r, median voxel ratio peer/perfusion, "
          "lesion/normal median (perfusion | peer)")
    for pair, a in agree.items():
        for m in ("cbv", "cbf"):
            e = a[m]
            ln = (f"  {e['lesion_over_normal_perfusion']:.2f} | {e['lesion_over_normal_peer']:.2f}"
                  if e.get("lesion_over_normal_peer") is not None else "")
            print(f"  {pair:34s} {m}: r {e.get('pearson_r', float('nan')):.4f}  "
                  f"ratio {e.get('median_ratio_peer_over_perfusion') or float('nan'):.4f}{ln}")


# --- main

def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("volume", type=Path, nargs="?", help="folder with dsc.nii.gz, brain.nii.gz, dsc.json")
    ap.add_argument("--standard", default=None, metavar="NAME-DTYPE",
                    help="instead of VOLUME: perfusion bench's standard volume, e.g. clinical-int16, built into "
                         "--cache unless already there")
    ap.add_argument("--cache", type=Path, default=HERE.parent / ".cache", help="folder of the standard volumes")
    ap.add_argument("--repeats", "-r", type=int, default=5, help="rounds (median reported; at least 5 for the targets)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (default: WORK/targets.json)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the outputs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch outputs")
    ap.add_argument("--skip-osipy", action="store_true", help="no osipy")
    ap.add_argument("--skip-cold", action="store_true", help="no cold start (each costs a whole compilation)")
    ap.add_argument("--details", action="store_true", help="also issue 8's same-method comparison and the agreement")
    ap.add_argument("--osipy-venv", type=Path, default=DEFAULT_OSIPY_VENV, help="osipy's venv")
    ap.add_argument("--lesion", type=Path, default=None,
                    help="lesion mask (default VOLUME/lesion_hyper.nii.gz if present)")
    ap.add_argument("--normal", type=Path, default=None,
                    help="normal-tissue mask (default VOLUME/nawm.nii.gz if present)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be >= 1")
    if (args.volume is None) == (args.standard is None):
        ap.error("give either VOLUME or --standard NAME-DTYPE")
    return args


def standard_volume(name_dtype: str, cache: Path) -> Path:
    """The folder of perfusion bench's standard volume ``name_dtype`` (e.g. clinical-int16), built if absent."""
    from perfusion.tools.bench import build_volume

    name, _, dtype = name_dtype.partition("-")
    try:
        return build_volume(name, dtype, cache).folder
    except ValueError as exc:
        raise SystemExit(f"--standard {name_dtype}: {exc}") from None


def machine_before() -> tuple[float | None, tuple[int, int] | None]:
    """The load average and /proc/stat's steal counters before the start (perfusion bench's readers)."""
    from perfusion.tools.bench import cpu_steal_jiffies, load_avg_1min, read_proc_stat

    return load_avg_1min(), cpu_steal_jiffies(read_proc_stat())


def machine_after(load_before, stat_before) -> dict:
    """Busy or not (perfusion bench's rule: load average before the start, CPU steal over the run)."""
    from perfusion.tools.bench import cpu_steal_jiffies, load_avg_1min, machine_state, read_proc_stat, steal_percent

    steal = steal_percent(stat_before, cpu_steal_jiffies(read_proc_stat()))
    state = machine_state(load_avg=load_before, cpus=os.cpu_count(), steal_pct=steal)
    after = load_avg_1min()
    return {"cpus": os.cpu_count(), **state, "load_avg_after": None if after is None else round(after, 2)}


def main(argv: list[str] | None = None) -> int:
    """Long because it is the benchmark's script: inputs, the rounds, the table, the JSON, in order."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_perfusion_compute"]:  # internal: one compute-only run in a fresh process
        dsc, mask, out = (Path(a) for a in argv[1:4])
        print(json.dumps(perfusion_compute(dsc, mask, out)))
        return 0
    args = parse_args(argv)
    vol = args.volume or standard_volume(args.standard, args.cache)
    dsc, brain = vol / "dsc.nii.gz", vol / "brain.nii.gz"
    for p in (dsc, brain, vol / "dsc.json"):
        if not p.exists():
            raise SystemExit(f"{p}: missing; the volume folder needs dsc.nii.gz, brain.nii.gz and dsc.json")
    te, tr = read_sidecar(vol)
    shape, dtype = nifti_shape(dsc)
    input_mb = 4.0 * shape[0] * shape[1] * shape[2] * shape[3] / 1e6
    osipy_venv, osipy_missing = osipy_venv_of(args)
    masks = {"brain": brain,
             "lesion": args.lesion or (vol / "lesion_hyper.nii.gz" if (vol / "lesion_hyper.nii.gz").exists() else None),
             "normal": args.normal or (vol / "nawm.nii.gz" if (vol / "nawm.nii.gz").exists() else None)}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_peers_"))
    work.mkdir(parents=True, exist_ok=True)

    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    load_before, stat_before = machine_before()
    ptools = perfusion_tools(dsc, brain)
    ref_dir = work / "reference"
    run_tool(ptools["analyze"], ref_dir, work / "scratch-reference")  # the AIF and frames the script is handed
    progress("reference run (untimed)")
    tools = {k: v for k, v in ptools.items() if k != "cold"}
    tools.update(peer_tools(dsc, brain, te, tr, ref_dir, work, osipy_venv=osipy_venv, details=args.details))
    if not args.skip_cold:
        tools["cold"] = ptools["cold"]
    run_rounds(tools, repeats=args.repeats, work=work, progress=progress)
    machine = machine_after(load_before, stat_before)

    missing = {"osipy": osipy_missing or "", "cold": "cold start: skipped (--skip-cold)"}
    rows = [target_row(row, tools, input_mb=input_mb, missing=missing) for row in TARGETS]
    agree = all_agreement(tools, work, args.repeats, masks)
    summary = details_summary(tools) if args.details else None
    voxels = tools["numpy_csvd"].runs[-1]["own"]["voxels"]
    result = {
        "schema": SCHEMA, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "volume": str(vol), "shape": shape, "dtype": dtype, "brain_voxels": voxels,
        "input_float32_mb": round(input_mb, 1),
        "te_s": te, "tr_s": tr, "repeats": args.repeats, "machine": machine,
        "commands": {name: " ".join(t.argv(Path("OUT"))) for name, t in tools.items()},
        "osipy": osipy_missing or "run", "targets": rows, "agreement": agree, "details": summary,
        "runs": {name: t.runs for name, t in tools.items()},
    }
    json_path = args.json or work / "targets.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nissue 20 targets on {vol} ({'x'.join(map(str, shape))} {dtype}, {voxels} brain voxels): medians of "
          f"{args.repeats} alternated rounds, whole process from outside (wall); range = lowest-highest per round; "
          f"load average {_num(load_before)} before, {_num(machine['load_avg_after'])} after, on {os.cpu_count()} CPUs")
    for line in format_table(rows):
        print(line)
    print("value: from the wall medians; range: each round's own value; CPU: the same from CPU time (user + "
          "system, all threads): steadier on a busy machine, but a multi-threaded tool spends more CPU than wall")
    if machine["busy"]:
        print(f"warning: the machine was busy ({machine['why']}): times are noisier than usual")
    if summary is not None:
        print_details(summary, agree)
    print(f"JSON: {json_path}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
