"""The first analysis on a machine (issue 20): numba compiles the kernels it calls and keeps them in its
cache; the command line says so once, and ``perfusion warmup`` (run by ``make install``) compiles them
ahead, with the argument types the analyses give them.

Real processes with a temporary NUMBA_CACHE_DIR, no mocks. The cold runs compile for real: one cache
is filled once for the module (about 20 s of CPU), and each test reads what that sequence printed.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perfusion.cli.console import COMPILE_NOTICE

SRC = Path(__file__).resolve().parents[1] / "src"
#: A cold compile on a loaded 2-core machine took up to 100 s here; a hang still shows.
TIMEOUT_S = 600
#: The cheapest analysis (fewest kernels): the notice's first run.
FAST = ["--method", "osvd", "--leakage", "none", "--motion-correct", "off", "--no-html"]


def _run(args, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT")}
    env.update(PYTHONPATH=str(SRC), NUMBA_CACHE_DIR=str(cache), NUMBA_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "perfusion", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=TIMEOUT_S)


def _notices(proc: subprocess.CompletedProcess) -> int:
    return sum(line == COMPILE_NOTICE for line in proc.stderr.splitlines())


@pytest.fixture(scope="module")
def cold_sequence(phantom_case, tmp_path_factory):
    """One empty cache through: a cold analysis, the same again, a quiet one that compiles one more
    kernel, ``perfusion warmup``, a default analysis with ROIs, and warmup again. Each process by name."""
    tmp = tmp_path_factory.mktemp("cold")
    cache, out = tmp / "numba-cache", tmp / "out"
    dsc, roi = phantom_case["dsc"], phantom_case["lesion_hyper"]
    runs = {}
    runs["cold"] = _run(["analyze", dsc, "--out", out, "--force", *FAST], cache)
    runs["again"] = _run(["analyze", dsc, "--out", out, "--force", *FAST], cache)
    runs["quiet_new_kernel"] = _run(["analyze", dsc, "--out", out, "--force", *FAST[2:], "--method", "tikhonov",
                                     "-q"], cache)
    runs["warmup"] = _run(["warmup"], cache)
    runs["after_warmup"] = _run(["analyze", dsc, "--out", out, "--force", "--roi", roi, "--no-html"], cache)
    runs["warmup_again"] = _run(["warmup"], cache)
    return cache, runs


def test_a_cold_cache_is_said_once_before_the_compilation(cold_sequence):
    _, runs = cold_sequence
    cold = runs["cold"]
    assert cold.returncode == 0, cold.stderr
    assert _notices(cold) == 1 and cold.stderr.strip() == COMPILE_NOTICE, cold.stderr


def test_a_warm_cache_says_nothing(cold_sequence):
    _, runs = cold_sequence
    assert runs["again"].returncode == 0 and runs["again"].stderr == "", runs["again"].stderr


def test_quiet_says_nothing_even_when_compiling(cold_sequence):
    """-q prints only errors, as for the cache-folder note; the tikhonov kernel was compiled here."""
    _, runs = cold_sequence
    assert runs["quiet_new_kernel"].returncode == 0 and runs["quiet_new_kernel"].stderr == ""


def test_warmup_compiles_every_kernel_the_analyses_use(cold_sequence):
    """warmup compiles what the first runs had not (saying so once); afterwards numba's cache holds a
    version of every kernel, and a default analysis with a lesion ROI (more kernels than FAST) compiles
    nothing: the warmer's argument types are the pipeline's. A second warmup compiles nothing."""
    from perfusion._kernels.jit import needs_compile

    cache, runs = cold_sequence
    warm = runs["warmup"]
    assert warm.returncode == 0 and _notices(warm) == 1 and warm.stderr.strip() == COMPILE_NOTICE, warm.stderr
    assert "compiled in" in warm.stdout and str(cache) in warm.stdout, warm.stdout
    assert needs_compile(cache) == []
    after = runs["after_warmup"]
    assert after.returncode == 0 and after.stderr == "", after.stderr
    again = runs["warmup_again"]
    assert again.returncode == 0 and again.stderr == "" and "already compiled" in again.stdout, again.stdout


def test_needs_compile_reads_the_folder_it_is_given(cold_sequence, tmp_path):
    """An empty folder lacks every kernel; a copy of the warm cache lacking one kernel's index names
    that kernel; warm_if_needed then says so once and fills it (a warmup process with that folder),
    and says nothing when nothing is missing."""
    from perfusion._kernels.jit import all_kernels, needs_compile
    from perfusion.tools.warm import warm_if_needed

    cache, _ = cold_sequence
    assert needs_compile(tmp_path / "empty") == list(all_kernels())
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    for index in copy.rglob("deconv._tikhonov_gcv-*.nbi"):
        index.unlink()
    assert needs_compile(copy) == ["deconv._tikhonov_gcv"]
    said: list[int] = []
    assert warm_if_needed(str(copy), on_compile=lambda: said.append(1)) is True
    assert said == [1] and needs_compile(copy) == []
    assert warm_if_needed(str(copy), on_compile=lambda: said.append(1)) is False and said == [1]


def test_every_kernel_is_registered():
    """Every function decorated ``@kernel`` in perfusion._kernels is in the registry that needs_compile
    and the warmer read (jit.all_kernels), and nothing else is."""
    from perfusion._kernels.jit import all_kernels

    decorated = set()
    for path in sorted((SRC / "perfusion" / "_kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "kernel" for d in node.decorator_list):
                decorated.add(f"{path.stem}.{node.name}")
    assert set(all_kernels()) == decorated
