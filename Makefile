# Two commands for a fresh Linux machine with Python 3.10+:
#   make demo   set up .venv and train t-HNE on the embedded default data set
#   make test   set up .venv and run every check CI runs
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch==2.13.0: on a machine with a local CPU wheel pip takes that one; elsewhere PyPI's default build,
# which runs on CPU and on CUDA. Installed before the package so that its `torch>=2.1` pulls nothing more.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test export readme clean-runs

setup: $(BIN)/.installed

$(BIN)/.installed: settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,sweep]"
	touch $@

demo: setup
	$(BIN)/thne train --config demo --out runs/demo

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash .ci/checks

export: setup
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/python .ci/readme.py

readme: setup
	$(BIN)/python .ci/readme.py
