"""Golden test (issue 19, written before the restructuring): the sample phantom analysed through the
command line with its defaults gives the same maps and the same report.json keys as recorded in
tests/data/golden.json.

Maps are compared by summary numbers, not by bytes: the NaN count exactly, the 1/10/50/90/99th percentiles
of the finite voxels to 1e-5 and their mean to 1e-3 (relative). The last bits of float sums differ between
CPUs (SIMD width), and on another machine a voxel on a decision's edge (the model fit's oSVD fallback) may
fall the other way, moving a mean by up to about 1e-3 but no percentile; a change of behaviour moves these
numbers by far more. The keys are every key path of
report.json (list items by position, timings and the per-run creation time left out). To record the
golden file again after an intended change: PERFUSION_GOLDEN_WRITE=1 pytest tests/test_golden.py, and
say why in the commit.

The case runs with --gamma-maps (issue 20: the gv_* maps became opt-in; the record holds them, and
tests/test_gamma_maps.py checks that every other output is the same without the flag). Key paths added
to report.json since the record are ADDED_KEYS, each with its reason.
"""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from perfusion.cli.app import main

GOLDEN = Path(__file__).parent / "data" / "golden.json"
RTOL = 1e-5  # percentiles and rCBV medians
MEAN_RTOL = 1e-3
PERCENTILES = (1, 10, 50, 90, 99)
SKIP_KEYS = ("timings", "created_utc", "software")  # per run or per version, not behaviour
#: Key paths report.json gained after the golden record was made, and why.
ADDED_KEYS = {
    "parameters.gamma_maps": "issue 20: --gamma-maps (Config.gamma_maps) writes the gv_* maps",
    "aif.gamma_variate.tissue_fitted": "issue 20: which voxels the tissue fit ran on (tissue_valid_fraction's)",
    "aif.gamma_variate.tissue_fitted_voxels": "issue 20: how many (tissue_valid_fraction's denominator)",
    "case": "issue 21: the case's label and scan date, as the user gave them (save(label=, scan_date=))",
    "case.label": "issue 21: see case",
    "case.scan_date": "issue 21: see case",
}


def _summary(path: Path) -> dict:
    v = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    finite = v[np.isfinite(v)]
    return {"shape": list(v.shape), "nan": int(v.size - finite.size), "mean": float(finite.mean()) if finite.size else None,
            "percentiles": [float(x) for x in np.percentile(finite, PERCENTILES)] if finite.size else None}


def _keys(obj, prefix="") -> list[str]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in SKIP_KEYS:
                continue
            out.append(prefix + k)
            out += _keys(v, prefix + k + ".")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _keys(v, f"{prefix}{i}.")
    return out


def test_sample_phantom_matches_the_golden_record(phantom_case, tmp_path):
    out = tmp_path / "out"
    rois = [a for k in ("lesion_hyper", "lesion_hypo") for a in ("--roi", str(phantom_case[k]))]
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), *rois, "--no-html", "-q", "--gamma-maps"]) == 0
    report = json.loads((out / "report.json").read_text())
    got = {"maps": {p.name: _summary(p) for p in sorted(out.glob("*.nii.gz"))},
           "report_keys": sorted(_keys(report)),
           "verdicts": {r["name"]: [r["verdict"], r["rcbv_median"]] for r in report["rois"]}}
    if os.environ.get("PERFUSION_GOLDEN_WRITE"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden record written")
    want = json.loads(GOLDEN.read_text())
    assert set(ADDED_KEYS) <= set(got["report_keys"])
    assert [k for k in got["report_keys"] if k not in ADDED_KEYS] == want["report_keys"]
    assert sorted(got["maps"]) == sorted(want["maps"])
    for name, w in want["maps"].items():
        g = got["maps"][name]
        assert g["shape"] == w["shape"] and g["nan"] == w["nan"], name
        if w["mean"] is not None:
            assert g["mean"] == pytest.approx(w["mean"], rel=MEAN_RTOL, abs=1e-9), name
            assert g["percentiles"] == pytest.approx(w["percentiles"], rel=RTOL, abs=1e-9), name
    for name, (verdict, rcbv) in want["verdicts"].items():
        assert got["verdicts"][name][0] == verdict and got["verdicts"][name][1] == pytest.approx(rcbv, rel=RTOL)
