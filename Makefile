# perfusion: `make demo` and `make test` set themselves up on a machine with Python >= 3.11 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
WARM_STAMP := $(VENV)/.warmup-stamp
DEMO   := sample_data/sub-demo

.PHONY: install demo test test-fast test-nojit lint bench fuzz browser clean help

help:
	@echo "make demo    set up .venv and analyse the embedded sample case"
	@echo "make test    set up .venv, lint the package (ruff, mypy) and run the test suite"
	@echo "make test-fast  the quick subset: kernels against their numpy twins, units and formats, loaders, the CLI contract"
	@echo "make lint    ruff and mypy on the package (settings in pyproject.toml)"
	@echo "make test-nojit  the numba kernels' tests with the JIT off (plain Python, for coverage tools; ~1 min)"
	@echo "make install create .venv with the package and its test tools, and compile the numerical kernels"
	@echo "make browser  install Chromium, Firefox ESR, pdftoppm and dciodvfy (apt-get) for the browser and DICOM tests; optional"
	@echo "make bench   issue 20's speed targets in one table: perfusion vs plain numpy and osipy, cold start, memory"
	@echo "make fuzz    fuzz the NIfTI/sidecar loader with atheris for FUZZ_SECONDS (default 600); crashes in fuzz/crashes/"

install: $(STAMP) $(WARM_STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "perfusion needs Python >= 3.11; run: make PYTHON=python3.11 ..."; exit 1; }
	@echo "make: installing perfusion and its dependencies into $(VENV) (first run: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# Compile the numerical kernels for this machine now, into the numba cache every later run reads
# (perfusion warmup: the analyses of every method on a small phantom, about 20 s of CPU), so that the first
# analysis does not wait for them; redone after a reinstall or a change to a kernel's source (its cache entry
# goes stale with the file). A few seconds when nothing changed.
$(WARM_STAMP): $(STAMP) $(wildcard src/perfusion/_kernels/*.py)
	@echo "make: compiling the numerical kernels for this machine (once; about 20 s)"
	$(BIN)/perfusion warmup
	@touch $(WARM_STAMP)

demo: install
	$(BIN)/perfusion analyze $(DEMO)/sub-phantom_dsc.nii.gz --out demo_out --force \
	  $(foreach r,$(sort $(wildcard $(DEMO)/roi-*.nii.gz)),--roi $(r))

# two workers, each test file on one of them (module fixtures are built once): 5.4 min instead of 7.9 on
# this 2-core machine; PYTEST_ARGS= runs it serially
PYTEST_ARGS ?= -n 2 --dist loadfile
test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick subset while working (about 35 s warm on 2 cores, 280 tests): every numba kernel against its
# numpy twin and the chunked thread loops, units and file formats, the loaders, the command line's
# contract (options, ranges, exit codes, messages) and the package's structure
FAST_TESTS := tests/test_kernels.py tests/test_kernels_curves.py tests/test_parallel.py tests/test_formats.py \
              tests/test_io.py tests/test_cli.py tests/test_config.py tests/test_structure.py
test-fast: install
	$(BIN)/python -m pytest -n 2 $(FAST_TESTS)

# ruff (pycodestyle, pyflakes, bugbear, pyupgrade, import order) and mypy on the package; a few seconds warm
lint: install
	$(BIN)/ruff check src tests
	$(BIN)/mypy

# The numba kernels' tests (each kernel against its numpy twin, and the chunked thread loops) with
# NUMBA_DISABLE_JIT=1: the kernels run as plain Python, so coverage tools see their lines (e.g.
# NOJIT_PYTEST="$(BIN)/coverage run -m pytest" with coverage installed). The tests shrink their inputs
# without the JIT (tests/naive.py NOJIT). numpy scalars warn where the compiled kernels give inf or NaN
# silently (error_model="numpy"): those RuntimeWarnings are not shown.
NOJIT_PYTEST ?= $(BIN)/python -m pytest
NOJIT_TESTS  := tests/test_kernels.py tests/test_kernels_curves.py tests/test_parallel.py tests/test_tikhonov.py \
                tests/test_gammafit.py tests/test_modelfit.py
NOJIT_SELECT := test_kernels or test_parallel or tikhonov_gcv or kernel_matches_twin
test-nojit: install
	NUMBA_DISABLE_JIT=1 $(NOJIT_PYTEST) -q -p no:cacheprovider -W ignore::RuntimeWarning $(NOJIT_TESTS) \
	  -k "$(NOJIT_SELECT)"

# Issue 20's speed targets in one table (benchmarks/peers/bench_peers.py): perfusion analyze (default
# --no-html, --method osvd --leakage bsw --no-html, default with report.html), the plain numpy cSVD
# script, osipy 0.1.4's command line and a cold start (empty numba cache), each a fresh process timed
# from outside, in 5 alternated rounds on the clinical volume (built into benchmarks/.cache) with its
# brain mask; JSON in benchmarks/results/targets.json. osipy needs its own Python 3.12 venv: when
# setup_osipy.sh cannot build it, its row says so and the others still run. The per-stage and kernel
# view is `perfusion bench`.
bench: install
	@mkdir -p benchmarks/results
	@./benchmarks/peers/setup_osipy.sh >/dev/null || echo "make bench: osipy's venv not built; its row will say so"
	$(BIN)/python benchmarks/peers/bench_peers.py --standard clinical-int16 --cache benchmarks/.cache --repeats 5 \
	  --json benchmarks/results/targets.json

# The loader's fuzz target (fuzz/target.py) under atheris for FUZZ_SECONDS; new corpus entries go to
# fuzz/work/corpus/ (gitignored), the committed seeds and regressions are only read, crash inputs land in
# fuzz/crashes/. A summary follows; the exit status is non-zero when the run found a crash.
FUZZ_SECONDS ?= 600
FUZZ_STAMP   := $(VENV)/.fuzz-stamp
FUZZ_FLAGS    = -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
                -artifact_prefix=fuzz/crashes/

$(FUZZ_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[fuzz]'
	@touch $(FUZZ_STAMP)

fuzz: $(FUZZ_STAMP)
	@mkdir -p fuzz/work/corpus fuzz/crashes
	@$(BIN)/python fuzz/run.py $(FUZZ_FLAGS) fuzz/work/corpus fuzz/corpus fuzz/regressions 2>&1 | tee fuzz/work/last-run.log
	@$(BIN)/python fuzz/summary.py fuzz/work/last-run.log

# The report's browser tests (tests/test_browser.py) need Chromium and Firefox (and pdftoppm for the printed
# pages), the DICOM export's validation dciodvfy (dicom3tools, tests/test_dicom_export_extras.py):
# Debian's packages, installed here with apt-get; a no-op when present, a message when not
# installable. Optional and visible: `make test` does not run it (those tests then skip, naming this
# step); CI runs it first (.ci/run).
browser:
	@./tests/ensure-browsers.sh

clean:
	rm -rf $(VENV) demo_out .pytest_cache .mypy_cache .ruff_cache
