"""The public library API (issue 19): the README's "Use from Python" block runs as written on the sample
phantom, gives the command line's verdicts and rCBV with the same options, honours Config.motion_correct,
and writes the same outputs as `perfusion analyze`."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import perfusion
from perfusion.cli.app import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use from Python"):text.index("## Architecture")]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_and_matches_the_command_line(phantom_case, tmp_path):
    env = {"dsc": phantom_case["dsc"], "roi_hyper": phantom_case["lesion_hyper"],
           "roi_hypo": phantom_case["lesion_hypo"], "out": tmp_path / "api"}
    exec(compile(_readme_block(), "README.md", "exec"), env)  # noqa: S102 - the documented example, as written
    assert env["verdicts"]["roi-lesion_hyper"][0] == "likely_recurrence"
    assert env["verdicts"]["roi-lesion_hypo"][0] == "likely_treatment_effect"
    assert np.nanmedian(env["cbv"]) > 0
    cli_out = tmp_path / "cli"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(cli_out), "--roi", str(env["roi_hyper"]),
                 "--roi", str(env["roi_hypo"]), "--method", "osvd", "--motion-correct", "off", "-q"]) == 0
    api_rep = json.loads((tmp_path / "api" / "report.json").read_text())
    cli_rep = json.loads((cli_out / "report.json").read_text())
    for a, c in zip(api_rep["rois"], cli_rep["rois"]):
        assert (a["name"], a["verdict"]) == (c["name"], c["verdict"])
        assert a["rcbv_median"] == pytest.approx(c["rcbv_median"], rel=1e-12)
    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == sorted(p.name for p in cli_out.iterdir())


def test_every_option_is_honoured_from_python(phantom_case):
    """Config.motion_correct was ignored by pipeline.analyze (head motion lived in the command layer);
    perfusion.analyze runs it: 'off' records no screening, 'auto' screens the frames."""
    case = perfusion.load_case(phantom_case["dsc"], rois=[phantom_case["lesion_hyper"]])
    off = perfusion.analyze(case, perfusion.Config(method="osvd", motion_correct="off"))
    auto = perfusion.analyze(case, perfusion.Config(method="osvd", motion_correct="auto"))
    assert off.motion.correction == "off" and off.motion.assessed is False, off.motion
    assert auto.motion.correction == "auto" and auto.motion.assessed is True, auto.motion
    assert off.config.method == "osvd" and off.config.leakage == "bidirectional"  # auto made concrete


def test_library_errors_are_the_command_lines_one_liners(tmp_path):
    with pytest.raises(perfusion.errors.InputError, match="not found"):
        perfusion.load_case(tmp_path / "missing_dsc.nii.gz")
