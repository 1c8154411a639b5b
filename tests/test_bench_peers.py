"""`make bench`'s table (benchmarks/peers/bench_peers.py) from given run times: ratios of medians, the
per-round range, the cold start as a difference, memory over the input, a missing osipy named with the
way to install it. No process is started and no speed asserted."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "bench_peers.py"
_spec = importlib.util.spec_from_file_location("bench_peers", _PATH)
peers = importlib.util.module_from_spec(_spec)
sys.modules["bench_peers"] = peers  # dataclasses look their module up there
_spec.loader.exec_module(peers)


def _tool(name, walls, peaks=None):
    t = peers.Tool(name, lambda out: ["true"])
    t.runs = [{"wall_s": w, "cpu_s": w, "peak_rss_mb": p} for w, p in zip(walls, peaks or [100.0] * len(walls))]
    return t


@pytest.fixture
def tools():
    return {"analyze": _tool("analyze", [6.0, 5.0, 7.0], [300, 320, 310]),
            "analyze_osvd_bsw": _tool("analyze_osvd_bsw", [4.0, 4.0, 4.0], [250, 250, 250]),
            "analyze_html": _tool("analyze_html", [9.0, 8.0, 10.0], [400, 380, 390]),
            "numpy_csvd": _tool("numpy_csvd", [4.0, 5.0, 3.5]),
            "cold": _tool("cold", [30.0, 26.0, 31.0])}


def test_rows_are_ratios_of_medians_with_per_round_ranges(tools):
    rows = {r["row"]: r for r in (peers.target_row(t, tools, input_mb=125.8, missing={}) for t in peers.TARGETS)}
    r = rows["analyze --no-html / numpy cSVD script"]
    assert r["value"] == pytest.approx(6.0 / 4.0) and r["met"] is True  # 1.5 <= 1.5
    assert r["cpu_value"] == pytest.approx(6.0 / 4.0)  # the fake runs' CPU equals their wall
    assert (r["low"], r["high"]) == pytest.approx((1.0, 7.0 / 3.5))  # round 2: 5/5, round 3: 7/3.5
    assert rows["analyze (with report.html) / script"]["met"] is False  # 9/4 = 2.25 > 2
    cold = rows["cold start: empty numba cache - warm, s"]
    assert cold["value"] == pytest.approx(30.0 - 6.0) and (cold["low"], cold["high"]) == pytest.approx((21.0, 24.0))
    mem = rows["peak RSS / input in float32"]
    assert mem["numerator"] == "analyze_html" and mem["value"] == pytest.approx(390 / 125.8)
    assert mem["met"] is False


def test_missing_osipy_is_a_row_that_says_how_to_install_it(tools):
    missing = {"osipy": "osipy: not installed (run benchmarks/peers/setup_osipy.sh)"}
    rows = [peers.target_row(t, tools, input_mb=125.8, missing=missing) for t in peers.TARGETS]
    osipy = next(r for r in rows if r["numerator"] == "osipy")
    assert osipy["value"] is None and "met" not in osipy and "setup_osipy.sh" in osipy["note"]
    lines = peers.format_table(rows)
    assert len(lines) == 2 + len(peers.TARGETS)
    assert any("osipy: not installed (run benchmarks/peers/setup_osipy.sh)" in ln for ln in lines)
    assert sum(ln.endswith("NOT met") for ln in lines) == 3  # report.html, cold start, memory
    assert sum(ln.endswith("  met") for ln in lines[2:]) == 2  # below the header


def test_osipy_yaml_gives_te_in_ms_and_the_mask(tmp_path):
    text = peers.osipy_yaml(te_s=0.025, mask=tmp_path / "brain.nii.gz")
    assert "modality: dsc" in text and "te: 25\n" in text and f"mask: {tmp_path / 'brain.nii.gz'}" in text
