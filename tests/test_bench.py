"""`perfusion bench` on a small volume: the JSON it writes and the table it prints (not a timing test:
no assertion on any speed, only that every measurement is there and sane). The busy-machine rule and
the baseline comparison are tested on numbers given to them (tests/test_bench_compare.py)."""

import json

import nibabel as nib
import numpy as np
import pytest

from perfusion.tools import bench
from perfusion.cli.app import main


@pytest.fixture
def small_bench(monkeypatch):
    """The "clinical" volume shrunk to 48 x 48 x 7 x 40 and one extra kernel configuration."""
    monkeypatch.setitem(bench.VOLUMES, "clinical", (48, 48, 7, 40))
    monkeypatch.setattr(bench, "KERNEL_CONFIGS", {"csvd-residue": ["--method", "csvd", "--motion-correct", "off"]})


def test_build_volume_is_a_stack_of_phantom_slabs_and_is_cached(small_bench, tmp_path):
    vol = bench.build_volume("clinical", "float32", tmp_path)
    img = nib.load(vol.dsc)
    assert img.shape == (48, 48, 7, 40) and img.get_data_dtype() == np.float32
    assert np.allclose(img.header.get_zooms(), (5.0, 5.0, bench.SLAB_MM / 7, bench.TR_S))
    brain = np.asarray(nib.load(vol.brain).dataobj).astype(bool)
    assert brain.shape == (48, 48, 7) and 0.4 < brain.mean() < 0.8
    lesion = np.asarray(nib.load(vol.folder / "lesion_hyper.nii.gz").dataobj).astype(bool)
    nawm = np.asarray(nib.load(vol.folder / "nawm.nii.gz").dataobj).astype(bool)
    assert lesion.any() and nawm.any() and not (lesion & nawm).any() and not (lesion & ~brain).any()
    data = np.asarray(img.dataobj)
    assert not np.array_equal(data[..., 0, :], data[..., 5, :])  # slab 2 has its own noise
    assert json.loads((vol.folder / "dsc.json").read_text()) == {"EchoTime": bench.TE_S, "RepetitionTime": bench.TR_S}
    mtime = vol.dsc.stat().st_mtime_ns
    assert bench.build_volume("clinical", "float32", tmp_path).dsc.stat().st_mtime_ns == mtime  # reused


def test_bench_command_writes_stable_json(small_bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--volumes", "clinical", "--dtypes", "int16", "--repeats", "2", "--no-compile",
                 "--json", str(out), "--cache", str(tmp_path / "cache")])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["schema"] == bench.SCHEMA
    assert set(res) >= {"machine", "settings", "volumes", "end_to_end", "stages", "osvd_floor", "compile"}
    assert set(res["machine"]) >= {"busy", "load_avg", "steal_pct", "cpus"} and isinstance(res["machine"]["busy"], bool)
    fl = res["osvd_floor"][0]
    assert fl["voxels"] > 5000 and fl["osvd_s"] > 0 and fl["floor_s"] > 0 and fl["ratio"] == pytest.approx(fl["osvd_s"] / fl["floor_s"], rel=0.05, abs=0.01)
    assert len(fl["osvd_s_runs"]) == len(fl["floor_s_runs"]) == 2 and fl["osvd_s_min"] <= fl["osvd_s"] <= fl["osvd_s_max"]
    assert res["volumes"]["clinical-int16"]["shape"] == [48, 48, 7, 40]
    e2e = {r["config"]: r for r in res["end_to_end"]}
    assert set(e2e) == set(bench.CONFIGS)
    for r in e2e.values():
        assert len(r["wall_s_runs"]) == len(r["analysis_s_runs"]) == len(r["peak_rss_mb_runs"]) == 2
        assert r["wall_s_min"] == min(r["wall_s_runs"]) <= r["wall_s_median"] <= r["wall_s_max"] == max(r["wall_s_runs"])
        assert 0 < r["analysis_s_median"] < r["wall_s_median"]
        assert r["peak_rss_mb"] > 50 and r["peak_over_input"] == pytest.approx(r["peak_rss_mb"] / r["input_float32_mb"], rel=0.01)
    stages = {(r["config"], r["stage"]): r for r in res["stages"]}
    for config in ("default", "osvd-bsw", "csvd-residue"):
        for stage in ("delta_r2s", "aif", "deconvolution", "leakage"):
            r = stages[(config, stage)]
            assert r["voxels"] > 5000 and r["voxels_per_s"] > 0
            assert len(r["seconds_runs"]) == 2 and r["seconds_min"] <= r["seconds_median"] <= r["seconds_max"]
    printed = capsys.readouterr().out
    assert "end to end" in printed and "osvd-bsw" in printed and str(out) in printed
    assert "min-max" in printed and "spread %" in printed
    # the progress bar's total (issue 21) is the number of steps the run announces
    steps = [line for line in printed.splitlines() if line.startswith(("volume ", "clinical", "numba compile"))]
    plan = bench.Plan(volumes=["clinical"], dtypes=["int16"], repeats=2, compile_time=False)
    assert len(steps) == bench.count_steps(plan) == 4, steps
    assert bench.count_steps(bench.quick_plan(3)) == 4 and bench.count_steps(bench.Plan(["clinical", "high"],
                                                                                       ["int16", "float32"])) == 19


def test_bench_refuses_an_unknown_volume(tmp_path, capsys):
    assert main(["bench", "--volumes", "huge", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "huge" in err and len(err.splitlines()) == 1
