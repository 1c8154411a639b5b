"""The command line's conventions (issue 21): help and usage without Python types, -q on every command
that prints, usage errors in the tool's one-line format, masks checked before the series is decoded,
tables readable at 80 and 120 columns, analyze's --label / --scan-date, report.json's warnings on the
terminal, and the progress bar only on a terminal. Real files in temporary folders, the commands run
through perfusion.cli.app.main, typer's CliRunner or a real process."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import nibabel as nib
import numpy as np
import pytest
import typer

from perfusion.cli.app import app, main

#: What typer 0.29 prints for a Python annotation (``dsc... <list[Path]>``, ``--aif <str>``): none may show.
PYTHON_TYPES = re.compile(r"<(list\[|str>|path>|int>|float>|bool>|Path)|list\[|Path\]|str>")

#: The commands that print nothing but what they exist for, so take no -q: ``version`` prints the version.
NO_QUIET = {"version"}


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _help(capsys, monkeypatch, columns: int, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main([*args, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("columns", [80, 120])
def test_help_shows_no_python_types_and_consistent_usage(capsys, monkeypatch, columns):
    names = sorted(_commands())
    assert {"analyze", "validate", "bench", "dicom-inspect", "batch", "compare"} <= set(names)
    for name in [None, *names]:
        text = _help(capsys, monkeypatch, columns, *([name] if name else []))
        assert not PYTHON_TYPES.search(text), (name, PYTHON_TYPES.search(text).group(0))
        usage = text.splitlines()[0]
        assert usage.startswith(f"Usage: perfusion {name + ' ' if name else ''}[OPTIONS]"), usage
        assert "{" not in usage and "}" not in usage and usage == usage.rstrip(), usage
        assert max(len(line) for line in text.splitlines()) <= columns, name
    analyze = " ".join(_help(capsys, monkeypatch, 120, "analyze").split())
    assert "Usage: perfusion analyze [OPTIONS] DSC..." in analyze
    for shown in ("--roi PATH", "--te SECONDS", "--tr SECONDS", "--method TEXT", "--aif-voxels INTEGER",
                  "--threshold FLOAT", "--weeks-since-radiation WEEKS", "--scan-date YYYY-MM-DD", "--label TEXT"):
        assert shown in analyze, shown
    roi_help = analyze.split("--roi PATH", 1)[1].split("--method", 1)[0]
    assert "(repeatable)" in roi_help
    assert "Usage: perfusion convert [OPTIONS] DICOM_DIR OUT" in _help(capsys, monkeypatch, 80, "convert")
    assert "Usage: perfusion dicom-inspect [OPTIONS] DIR" in _help(capsys, monkeypatch, 80, "dicom-inspect")


def test_every_command_that_prints_takes_quiet():
    for name, command in _commands().items():
        flags = {o for p in command.params for o in getattr(p, "opts", [])}
        if name in NO_QUIET:
            assert "-q" not in flags
            continue
        assert {"-q", "--quiet"} <= flags, name


def test_quiet_commands_print_nothing(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "ph"), "-q"]) == 0
    assert (tmp_path / "ph" / "sub-phantom_dsc.nii.gz").is_file()
    assert capsys.readouterr().out == ""
    assert main(["phantom", str(tmp_path / "ph2")]) == 0
    assert "Phantom written to" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["analyze", "x.nii.gz", "--out", "o", "--bogus"], "No such option: --bogus"),
    (["analyze"], "Missing argument 'DSC'"),
    (["analyze", "x.nii.gz"], "Missing option '--out'"),
    (["analyze", "x.nii.gz", "--out", "o", "--te", "abc"], "Invalid value for '--te'"),
    (["bench", "--repeats", "many"], "Invalid value for '--repeats'"),
    (["validate", "--json"], "Option '--json' requires an argument"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line_exit_2(capsys, args, words):
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and captured.out == "", err
    command = args[0] if args[0] in _commands() else None
    see = f"(see 'perfusion {command} --help')" if command else "(see 'perfusion --help')"
    assert err.startswith("perfusion: error: ") and err.endswith(see) and words in err, err
    assert "Usage:" not in err and "Traceback" not in err and "╭" not in err


def test_perfusion_alone_shows_the_help(capsys):
    assert main([]) == 2  # click's convention for a group called without a command
    err = capsys.readouterr().err
    assert err.startswith("Usage: perfusion [OPTIONS] COMMAND [ARGS]...") and "perfusion: error" not in err


def test_usage_errors_in_a_real_process_and_through_cli_runner():
    from typer.testing import CliRunner

    proc = subprocess.run([sys.executable, "-m", "perfusion", "analyze", "--roi"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "perfusion: error: Option '--roi' requires an argument (see 'perfusion analyze --help')\n"
    result = CliRunner().invoke(app, ["validate", "--tolerance-scale", "x"])
    assert result.exit_code == 2
    assert "perfusion: error: Invalid value for '--tolerance-scale'" in result.output
    assert "Usage:" not in result.output


# ------------------------------------------------------------------ masks before the series is decoded


def _broken_series(folder, *, gz: bool):
    """A 64 x 64 x 20 x 60 series whose header is sound and whose data is cut short (``gz``: a gzip
    stream cut after its header): reading the data fails, reading the header does not."""
    folder.mkdir()
    img = nib.Nifti1Image(np.ones((64, 64, 20, 60), np.int16), np.diag([2.0, 2.0, 5.0, 1.0]))
    full = folder / "full.nii"
    nib.save(img, full)
    raw = full.read_bytes()[:352 + 10_000]  # the header and a little of the 9.8 MB of data
    full.unlink()
    path = folder / ("sub-01_dsc.nii.gz" if gz else "sub-01_dsc.nii")
    if gz:
        import gzip

        blob = gzip.compress(raw)
        path.write_bytes(blob[: len(blob) - 8])  # no end-of-stream: a truncated download
    else:
        path.write_bytes(raw)
    (folder / "sub-01_dsc.json").write_text(json.dumps({"EchoTime": 0.03, "RepetitionTime": 1.5}))
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_shape_roi_is_refused_before_the_series_is_decoded(tmp_path, capsys, gz):
    dsc = _broken_series(tmp_path / "in", gz=gz)
    roi = tmp_path / "roi-left.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64, 19), np.uint8), np.diag([2.0, 2.0, 5.0, 1.0])), roi)
    out = tmp_path / "out"
    assert main(["analyze", str(dsc), "--out", str(out), "--roi", str(roi), "-q"]) == 4
    err = capsys.readouterr().err.strip()
    assert err == (f"perfusion: error: {roi}: ROI shape (64, 64, 19) differs from the DSC series {dsc.name} "
                   "(64, 64, 20); resample the mask onto the DSC grid")
    assert not out.exists()
    # the evidence that the series' data was never read: read, it fails with another error
    good = tmp_path / "roi-ok.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64, 20), np.uint8), np.diag([2.0, 2.0, 5.0, 1.0])), good)
    assert main(["analyze", str(dsc), "--out", str(out), "--roi", str(good), "-q"]) == 4
    err = capsys.readouterr().err
    assert "not a readable NIfTI file" in err and str(dsc) in err


def test_every_mask_option_is_checked_first_and_a_missing_mask_too(tmp_path, capsys):
    dsc = _broken_series(tmp_path / "in", gz=False)
    bad = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32, 20), np.uint8), np.diag([2.0, 2.0, 5.0, 1.0])), bad)
    shifted = tmp_path / "shifted.nii.gz"
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    affine[0, 3] = 10.0
    nib.save(nib.Nifti1Image(np.ones((64, 64, 20), np.uint8), affine), shifted)
    for flag, what in (("--mask", "brain mask"), ("--aif", "AIF mask"), ("--reference", "reference mask"),
                       ("--vof", "VOF mask")):
        assert main(["analyze", str(dsc), "--out", str(tmp_path / "o"), flag, str(bad), "-q"]) == 4
        assert f"{bad}: {what} shape (32, 32, 20) differs" in capsys.readouterr().err, flag
    assert main(["analyze", str(dsc), "--out", str(tmp_path / "o"), "--roi", str(shifted), "-q"]) == 4
    assert f"{shifted}: ROI affine differs from the DSC series" in capsys.readouterr().err
    missing = tmp_path / "nowhere.nii.gz"
    assert main(["analyze", str(dsc), "--out", str(tmp_path / "o"), "--roi", str(missing), "-q"]) == 4
    assert capsys.readouterr().err.strip() == f"perfusion: error: {missing}: ROI not found; check the path"


# ---------------------------------------------------- analyze: tables, warnings, --label and --scan-date

LONG_ROI = "roi-left_frontal_enhancing_rim"


@pytest.fixture(scope="module")
def long_roi_case(phantom_case, tmp_path_factory):
    """The phantom case with its hyperperfused lesion as a probability map (0.9 inside: a loader warning
    in report.json) named ``LONG_ROI``."""
    folder = tmp_path_factory.mktemp("long") / "case"
    shutil.copytree(phantom_case["dsc"].parent, folder)
    img = nib.load(phantom_case["lesion_hyper"])
    prob = (np.asarray(img.dataobj) > 0) * np.float32(0.9)
    nib.save(nib.Nifti1Image(prob.astype(np.float32), img.affine), folder / f"{LONG_ROI}.nii.gz")
    return {"dsc": folder / phantom_case["dsc"].name, "roi": folder / f"{LONG_ROI}.nii.gz",
            "hypo": folder / phantom_case["lesion_hypo"].name}


def _table_cells(text: str, column: int, *, folded: bool) -> list[str]:
    """The lesion table's cells of one column (1: ROI, 6: verdict), each row's lines joined: a folded
    name without a space, wrapped words with one. A row starts where its voxels column is set."""
    body = text.split("Lesion ROIs", 1)[1].split("┡", 1)[1].split("└", 1)[0].splitlines()[1:]
    rows: list[list[str]] = []
    for line in body:
        parts = line.split("│")
        if parts[2].strip():
            rows.append([])
        rows[-1].append(parts[column].strip())
    return [("" if folded else " ").join(x for x in row if x) for row in rows]


@pytest.mark.parametrize("columns", [80, 120])
def test_lesion_table_fits_and_keeps_names_and_verdicts(long_roi_case, tmp_path, capsys, monkeypatch, columns):
    from perfusion.verdicts import VERDICT_LABEL

    monkeypatch.setenv("COLUMNS", str(columns))
    out = tmp_path / "out"
    assert main(["analyze", str(long_roi_case["dsc"]), "--out", str(out), "--roi", str(long_roi_case["roi"]),
                 "--roi", str(long_roi_case["hypo"]), "--weeks-since-radiation", "4", "--no-html",
                 "--label", "case 12", "--scan-date", "2024-02-29"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    table = text.split("Lesion ROIs", 1)[1].split("└", 1)[0]
    assert max(len(line) for line in table.splitlines()) <= columns
    assert "…" not in text
    assert _table_cells(text, 1, folded=True) == [LONG_ROI, "roi-lesion_hypo"]
    assert _table_cells(text, 6, folded=False) == [VERDICT_LABEL["possible_recurrence_or_pseudoprogression"],
                                     VERDICT_LABEL["likely_treatment_effect"]]
    report = json.loads((out / "report.json").read_text())
    assert report["case"] == {"label": "case 12", "scan_date": "2024-02-29"}
    # report.json's warnings, each on the terminal (the probability-map ROI gives one), none on stderr
    assert any(f"{LONG_ROI}.nii.gz: the ROI holds values between 0 and 1" in w for w in report["warnings"])
    printed = [line[len("warning: "):] for line in text.splitlines() if line.startswith("warning: ")]
    assert printed == report["warnings"]
    assert f"Warnings ({len(report['warnings'])};" in text
    assert "perfusion: warning" not in captured.err and "elapsed" not in captured.err  # no bar when not a terminal


@pytest.mark.parametrize("date", ["2024-02-30", "29.02.2024", "2024-2-3", "yesterday"])
def test_scan_date_must_be_a_date(phantom_case, tmp_path, capsys, date):
    out = tmp_path / "o"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--scan-date", date, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"perfusion: error: --scan-date {date!r}: not a date; give it as YYYY-MM-DD (e.g. 2024-03-15)"
    assert not out.exists()


def test_quiet_analyze_prints_no_warnings(long_roi_case, tmp_path, capsys):
    assert main(["analyze", str(long_roi_case["dsc"]), "--out", str(tmp_path / "o"), "--roi",
                 str(long_roi_case["roi"]), "--no-html", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "warning" not in captured.err


def test_progress_bar_on_a_terminal_only(long_roi_case, tmp_path):
    """On a terminal (a pseudo-terminal here) analyze shows its stages with elapsed and remaining time on
    stderr; the bar is gone at the end, and stdout's summary is the same as without it."""
    import pty

    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-m", "perfusion", "analyze", str(long_roi_case["dsc"]), "--out",
                           str(tmp_path / "o"), "--roi", str(long_roi_case["roi"]), "--no-html"],
                          stdout=subprocess.PIPE, stderr=slave, text=True, env=env)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    for stage in ("loading the series and masks", "analysing (deconvolution, leakage, ROIs)",
                  "writing maps and report.json"):
        assert stage in shown, shown[-2000:]
    assert "elapsed, about" in shown and "left" in shown
    assert "Lesion ROIs" in proc.stdout and "elapsed" not in proc.stdout


# ------------------------------------------------------------------------ the other tables at 80 columns


def _bench_result() -> dict:
    machine = {"perfusion": "0.1.0", "cpus": 2, "processor": "x86_64", "python": "3.11", "numpy": "2", "numba": "0.6",
               "numba_threads": 2, "load_avg": 0.1, "steal_pct": 0.0, "busy": False}
    e2e = {"volume": "clinical", "dtype": "float32", "config": "osvd-bsw-with-a-long-name", "wall_s_median": 12.34,
           "wall_s_min": 12.0, "wall_s_max": 13.0, "analysis_s_median": 10.5, "peak_rss_mb": 812.0,
           "peak_over_input": 3.21}
    stage = {"volume": "clinical", "dtype": "float32", "config": "osvd-bsw-with-a-long-name", "stage": "reference_rois",
             "seconds_median": 1.234, "seconds_min": 1.2, "seconds_max": 1.3, "voxels_per_s": 2.5e6}
    return {"machine": machine, "settings": {"repeats": 3}, "end_to_end": [e2e], "stages": [stage]}


@pytest.mark.parametrize("columns", [80, 120])
def test_bench_and_dicom_inspect_tables_fit(capsys, monkeypatch, columns, tmp_path):
    """bench's tables fold within the width; dicom-inspect's ten columns are a table from 110 columns up
    and one line per series below (folded into 80, every header and the frame order broke mid-word), its
    words whole either way."""
    from perfusion.cli.bench import print_tables
    from perfusion.cli.console import console
    from perfusion.cli.dicom_inspect import WIDE_TABLE, print_dicom_inspect

    monkeypatch.setenv("COLUMNS", str(columns))
    print_tables(_bench_result(), console())
    text = capsys.readouterr().out
    tables = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert tables and max(len(line) for line in tables) <= columns
    assert "…" not in text
    for word in ("osvd-bsw-with-a-long-name", "reference_rois"):
        assert any(word in column for column in _columns(text)), word
    series = {"series_number": 1201, "n_files": 1920, "frames": 80, "slices_per_frame": 24, "matrix": [128, 128],
              "echo_time_s": 0.03, "echoes": [], "repetition_time_s": 1.5, "ordering_key": "TemporalPositionIdentifier",
              "interval_median_s": 1.5, "interval_min_s": 1.49, "interval_max_s": 1.51, "errors": [],
              "warnings": ["one"], "notes": [], "timing_source": None, "dsc_candidate": True}
    print_dicom_inspect({"series": [series], "dsc_series": 1201}, None, tmp_path)
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= columns and "…" not in text
    if columns >= WIDE_TABLE:
        assert any("TemporalPositionIdentifier" in column for column in _columns(text))
    else:
        flat = " ".join(text.split())  # wrapped at spaces: compare the words
        assert ("series 1201: files 1920; frames 80; slices 24; matrix 128x128; TE 0.03; TR 1.5; frame order "
                "TemporalPositionIdentifier; interval (range) 1.5 (1.49-1.51); checks 1 warning") in flat


def _columns(text: str) -> list[str]:
    """Every table column's body cells, top to bottom, joined without spaces (a folded word whole)."""
    tables: list[dict[int, str]] = []
    for line in text.splitlines():
        if line.startswith("┡"):
            tables.append({})
        elif line.startswith("│") and tables:
            for i, part in enumerate(line.split("│")[1:-1]):
                tables[-1][i] = tables[-1].get(i, "") + part.replace(" ", "")
    return [column for table in tables for column in table.values()]


def test_make_install_says_what_it_installs():
    """`make install` / `make demo` announce the quiet pip install (a few silent minutes otherwise) and the
    kernels' compilation, each before the command it announces (make -n: nothing is run)."""
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["make", "-n", "-B", "-C", str(root), "install", "PYTHON=python3"], capture_output=True,
                          text=True, check=True)
    lines = proc.stdout.splitlines()
    pip = next(i for i, line in enumerate(lines) if "pip install --quiet" in line)
    said = next(i for i, line in enumerate(lines) if "installing perfusion and its dependencies into .venv" in line)
    assert said < pip and "(first run: a few minutes)" in lines[said]
    warm = next(i for i, line in enumerate(lines) if line.endswith("perfusion warmup"))
    assert any("compiling the numerical kernels" in line for line in lines[pip:warm])
