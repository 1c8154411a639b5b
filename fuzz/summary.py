"""The summary of one fuzz run from libFuzzer's log: executions, speed, coverage, crashes.

    python fuzz/summary.py LOG

Exit status 0 only when the run finished its time with no crash, timeout or out-of-memory input
(``make fuzz`` pipes the fuzzer's output through tee, so its exit status is decided here).
"""

import re
import sys
from pathlib import Path


def summarize(log: str) -> tuple[list[str], bool]:
    """Summary lines and whether the run was clean."""
    stats = dict(re.findall(r"^stat::(\w+):\s*(\S+)", log, re.M))
    status = re.findall(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\S+).*?exec/s: (\d+)", log, re.M)
    artifacts = re.findall(r"Test unit written to (\S+)", log)
    failures = re.findall(r"^==\d+== ERROR: libFuzzer: (.*)$|^=== Uncaught Python exception: ===$", log, re.M)
    done = bool(re.search(r"^Done \d+ runs in \d+ second", log, re.M))
    lines = []
    if status:
        runs, _, cov, ft, corp, _ = status[-1]
        lines.append(f"coverage: {cov} edges, {ft} features, corpus {corp} (entries/bytes)")
    if stats:
        lines.append(f"executions: {stats.get('number_of_executed_units', '?')} at "
                     f"{stats.get('average_exec_per_sec', '?')}/s; peak RSS {stats.get('peak_rss_mb', '?')} MB; "
                     f"new corpus entries {stats.get('new_units_added', '?')}")
    clean = done and not artifacts and not failures
    if artifacts:
        lines.append("crashes found: " + " ".join(artifacts)
                     + "  (replay: .venv/bin/python fuzz/target.py FILE; once fixed, add it to fuzz/regressions/)")
    elif failures:
        lines.append("crashes found: the fuzzer failed without writing an input; see the log above")
    elif not done:
        lines.append("crashes found: none, but the run did not finish (interrupted?)")
    else:
        lines.append("crashes found: none")
    return lines, clean


def main() -> int:
    log = Path(sys.argv[1]).read_text(encoding="utf-8", errors="replace")
    lines, clean = summarize(log)
    print("fuzz summary: " + ("clean" if clean else "FAILED"))
    for line in lines:
        print("  " + line)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
