"""`perfusion bench`'s judgement, on numbers given to it: the busy-machine rule (load average, CPU steal
read from /proc/stat text), the comparison against a saved baseline (medians, the noise floor, rows on one
side), and the command's contract around --baseline and --fail-above (exit 0, 2, 3) on a tiny volume.
No assertion on any speed."""

import json

import pytest

from perfusion.cli.app import main
from perfusion.tools import bench

# ------------------------------------------------------------------ the machine: load and CPU steal

PROC_STAT = """cpu  {user} 0 {system} {idle} 0 0 0 {steal} 0 0
cpu0 1 0 1 1 0 0 0 0 0 0
intr 12345
"""


def _stat(user, system, idle, steal):
    return PROC_STAT.format(user=user, system=system, idle=idle, steal=steal)


def test_cpu_steal_is_read_from_the_aggregate_cpu_line():
    assert bench.cpu_steal_jiffies(_stat(100, 50, 800, 50)) == (50, 1000)
    assert bench.cpu_steal_jiffies("cpu  1 2 3 4\n") is None  # an old kernel: no steal field
    assert bench.cpu_steal_jiffies("intr 1\n") is None and bench.cpu_steal_jiffies(None) is None
    assert bench.cpu_steal_jiffies("cpu  a b c d e f g h\n") is None


def test_steal_percent_over_the_run():
    before, after = (50, 1000), (110, 2000)  # 60 of 1000 ticks stolen
    assert bench.steal_percent(before, after) == pytest.approx(6.0)
    assert bench.steal_percent(None, after) is None and bench.steal_percent(before, None) is None
    assert bench.steal_percent(after, after) is None  # no time passed


@pytest.mark.parametrize("load,cpus,steal,busy", [
    (0.4, 2, 0.0, False),  # 0.2 per CPU
    (1.0, 2, 0.0, False),  # exactly 0.5 per CPU: not above
    (1.2, 2, 0.0, True),
    (0.1, 2, 6.0, True),  # the hypervisor took 6 %
    (0.1, 2, 4.9, False),
    (None, 2, None, False),  # neither measurable (not Linux): nothing judged
    (3.0, None, None, False),
])
def test_machine_state_busy_rule(load, cpus, steal, busy):
    state = bench.machine_state(load_avg=load, cpus=cpus, steal_pct=steal)
    assert state["busy"] is busy and set(state) == {"busy", "load_avg", "steal_pct", "why"}
    assert (state["why"] is not None) is busy
    if busy and load and load > 1:
        assert "load average" in state["why"]


def test_the_readers_work_or_say_none_here():
    """On this machine (Linux or not) the readers return numbers or None, never fail."""
    text = bench.read_proc_stat()
    pair = bench.cpu_steal_jiffies(text)
    assert pair is None or (pair[0] >= 0 and pair[1] > 0)
    assert bench.read_proc_stat("/nonexistent/stat") is None
    load = bench.load_avg_1min()
    assert load is None or load >= 0


# ------------------------------------------------------------------ against a saved baseline


def _result(wall: float, stages: dict[str, float], config: str = "default") -> dict:
    """A minimal result of this schema: one end-to-end row and its stages on clinical int16."""
    return {"schema": bench.SCHEMA, "machine": {"cpus": 2, "processor": "x86_64"},
            "end_to_end": [{"volume": "clinical", "dtype": "int16", "config": config, "wall_s_median": wall}],
            "stages": [{"volume": "clinical", "dtype": "int16", "config": config, "stage": k, "seconds_median": v}
                       for k, v in stages.items()]}


def _status(cmp: dict) -> dict[str, str]:
    return {r["key"]: r["status"] for r in cmp["rows"]}


def test_compare_fails_a_slower_row_and_passes_the_rest():
    base = _result(10.0, {"deconvolution": 2.0, "aif": 0.5, "maps": 0.005, "old_stage": 1.0})
    now = _result(11.0, {"deconvolution": 4.0, "aif": 0.55, "maps": 0.015, "new_stage": 0.3})
    cmp = bench.compare(now, base, fail_above=1.5)
    st = _status(cmp)
    assert st == {"clinical-int16/default/end_to_end": "ok", "clinical-int16/default/deconvolution": "slower",
                  "clinical-int16/default/aif": "ok", "clinical-int16/default/maps": "short",
                  "clinical-int16/default/old_stage": "only in baseline", "clinical-int16/default/new_stage": "only now"}
    assert cmp["failed"] == ["clinical-int16/default/deconvolution"]
    row = next(r for r in cmp["rows"] if r["key"].endswith("deconvolution"))
    assert row["baseline_s"] == 2.0 and row["now_s"] == 4.0 and row["ratio"] == 2.0
    json.dumps(cmp, allow_nan=False)  # plain JSON


def test_compare_noise_floor_and_no_threshold():
    base = _result(10.0, {"brain_mask": 0.012, "maps": 0.019})
    now = _result(10.5, {"brain_mask": 0.025, "maps": 0.030})  # 2x and 1.6x, but only 13 and 11 ms slower
    cmp = bench.compare(now, base, fail_above=1.2)
    assert cmp["failed"] == [] and set(_status(cmp).values()) == {"ok"}
    slow = _result(30.0, {"brain_mask": 0.5, "maps": 0.019})
    assert bench.compare(slow, base)["failed"] == []  # no --fail-above: compared, never failed
    assert len(bench.compare(slow, base, fail_above=1.5)["failed"]) == 2


def test_compare_a_null_median_is_listed_not_failed():
    base = _result(10.0, {"aif": 0.5})
    base["stages"][0]["seconds_median"] = None  # a NaN median, written as null
    cmp = bench.compare(_result(10.0, {"aif": 9.0}), base, fail_above=1.1)
    assert _status(cmp)["clinical-int16/default/aif"] == "no value" and cmp["failed"] == []


@pytest.mark.parametrize("text,reason", [
    ("{not json", "is not JSON"),
    (b"\xff\xfe\x00", "is not JSON"),
    ('{"schema": "perfusion-bench/1", "end_to_end": [], "stages": []}', "perfusion-bench/1"),
    ("[1, 2]", "schema None"),
    ('{"schema": "perfusion-bench/2", "stages": []}', "not a perfusion bench result"),
    ('{"schema": "perfusion-bench/2", "end_to_end": [], "stages": [{"volume": "x"}]}', "not a perfusion bench"),
    ('{"schema": "perfusion-bench/2", "end_to_end": [{"volume": "c", "dtype": "int16", "config": "d", '
     '"wall_s_median": "fast"}], "stages": []}', "not a perfusion bench result"),
])
def test_load_baseline_refuses_what_is_not_a_result_of_this_schema(tmp_path, text, reason):
    path = tmp_path / "base.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=reason):
        bench.load_baseline(path)
    with pytest.raises(ValueError, match="cannot be read"):
        bench.load_baseline(tmp_path / "missing.json")


def test_quick_plan_is_one_volume_one_configuration():
    plan = bench.quick_plan()
    assert (plan.volumes, plan.dtypes, plan.configs, plan.repeats) == (["clinical"], ["int16"], ("default",), 3)
    assert not (plan.kernels or plan.compile_time or plan.osvd_floor or plan.warmup)


# ------------------------------------------------------------------ the command's contract


@pytest.mark.parametrize("extra,says", [
    (["--baseline", "{missing}"], "cannot be read"),
    (["--baseline", "{bad}", "--fail-above", "1.5"], "is not JSON"),
    (["--baseline", "{old}"], "perfusion-bench/1"),
    (["--fail-above", "1.5"], "--fail-above needs --baseline"),
    (["--baseline", "{old}", "--fail-above", "0.5"], "--fail-above 0.5: must be"),
    (["--baseline", "{old}", "--fail-above", "nan"], "--fail-above nan: must be"),
])
def test_bad_baseline_or_threshold_is_one_line_exit_2_before_any_work(tmp_path, capsys, extra, says):
    files = {"missing": tmp_path / "missing.json", "bad": tmp_path / "bad.json", "old": tmp_path / "old.json"}
    files["bad"].write_text("{")
    files["old"].write_text(json.dumps({"schema": "perfusion-bench/1", "end_to_end": [], "stages": []}))
    args = [a.format(**files) for a in extra]
    cache = tmp_path / "cache"
    code = main(["bench", "--quick", "--cache", str(cache), "--json", str(tmp_path / "out.json"), *args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
    if "--baseline" in extra and not says.startswith("--fail-above"):
        assert args[extra.index("--baseline") + 1] in lines[0]  # names the file
    assert not cache.exists() and not (tmp_path / "out.json").exists()  # nothing built, measured or written


@pytest.fixture
def tiny_bench(monkeypatch, tmp_path_factory):
    """The "clinical" volume shrunk to 48 x 48 x 7 x 40, and a cache shared by the tests below."""
    monkeypatch.setitem(bench.VOLUMES, "clinical", (48, 48, 7, 40))
    return tmp_path_factory.getbasetemp() / "bench-tiny-cache"


def _scaled(result: dict, factor: float) -> dict:
    """``result`` with every median multiplied by ``factor``: a crafted baseline."""
    out = json.loads(json.dumps(result))
    for r in out["end_to_end"]:
        r["wall_s_median"] *= factor
    for r in out["stages"]:
        r["seconds_median"] = r["seconds_median"] * factor if r["seconds_median"] is not None else None
    return out


def test_baseline_comparison_passes_then_fails_with_exit_3(tiny_bench, tmp_path, capsys, monkeypatch):
    first = tmp_path / "first.json"
    assert main(["bench", "--quick", "--repeats", "1", "--cache", str(tiny_bench), "--json", str(first)]) == 0
    res = json.loads(first.read_text())
    assert res["schema"] == "perfusion-bench/2" and res["settings"]["configs"] == ["default"]
    assert [r["config"] for r in res["end_to_end"]] == ["default"] and res["compile"] is None
    assert res["osvd_floor"] == [] and len(res["end_to_end"][0]["wall_s_runs"]) == 1
    capsys.readouterr()

    slow = tmp_path / "slow.json"  # a baseline 10x slower than this run: nothing regressed
    slow.write_text(json.dumps(_scaled(res, 10.0)))
    second = tmp_path / "second.json"
    monkeypatch.setattr(bench, "load_avg_1min", lambda: 99.0)  # and a busy machine
    assert main(["bench", "--quick", "--repeats", "1", "--cache", str(tiny_bench), "--json", str(second),
                 "--baseline", str(slow), "--fail-above", "1.5"]) == 0
    out, err = capsys.readouterr()
    assert "against the baseline" in out and "no row slower than 1.5" in out
    warning = [ln for ln in err.splitlines() if "busy" in ln]
    assert len(warning) == 1 and "load average 99.00" in warning[0]
    res2 = json.loads(second.read_text())
    assert res2["machine"]["busy"] is True and res2["machine"]["load_avg"] == 99.0
    cmp = res2["comparison"]
    assert cmp["baseline"] == str(slow) and cmp["fail_above"] == 1.5 and cmp["failed"] == []
    assert {r["status"] for r in cmp["rows"]} <= {"ok", "short"}

    fast = tmp_path / "fast.json"  # a baseline 100x faster: every row long enough regressed
    fast.write_text(json.dumps(_scaled(res, 0.01)))
    third = tmp_path / "third.json"
    assert main(["bench", "--quick", "--repeats", "1", "--cache", str(tiny_bench), "--json", str(third),
                 "--baseline", str(fast), "--fail-above", "1.5"]) == 3
    out = capsys.readouterr().out
    assert "slower than 1.5 x the baseline" in out and "clinical-int16/default/end_to_end" in out
    cmp = json.loads(third.read_text())["comparison"]  # the JSON is written before the exit
    assert "clinical-int16/default/end_to_end" in cmp["failed"]
