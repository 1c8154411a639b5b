# perfusion: `make demo` and `make test` set themselves up on a machine with Python >= 3.11 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := sample_data/sub-demo

.PHONY: install demo test browser clean help

help:
	@echo "make demo    set up .venv and analyse the embedded sample case"
	@echo "make test    set up .venv and run the test suite"
	@echo "make install create .venv with the package and its test tools"

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "perfusion needs Python >= 3.11; run: make PYTHON=python3.11 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: install
	$(BIN)/perfusion analyze $(DEMO)/sub-phantom_dsc.nii.gz --out demo_out --force \
	  $(foreach r,$(sort $(wildcard $(DEMO)/roi-*.nii.gz)),--roi $(r))

test: install browser
	$(BIN)/python -m pytest

# Debian's chromium for the report's browser test; a no-op when present, a message when not installable
browser:
	@./tests/ensure-chromium.sh

clean:
	rm -rf $(VENV) demo_out .pytest_cache
