# Set-up entry points. `make demo` and `make test` each create or refresh the virtual
# environment first: torch is installed BEFORE the package, so pip never resolves torch
# itself (an unpinned resolve downloads a CUDA build, gigabytes). On this CPU machine
# `torch==2.13.0` is a local CPU wheel. GPU users:
#   make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128 EXTRAS=slides,distributed,app,dev,encoders,gpu
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= slides,distributed,app,dev,encoders
PY := $(VENV)/bin/python
STAMP := $(VENV)/.histostudio-installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint app clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -c "import torch, studio; print('histostudio ready: torch', torch.__version__)"
	touch $(STAMP)

APP ?= 0

demo: venv
	$(VENV)/bin/histostudio demo --out demo_output
	@if [ "$(APP)" = "1" ]; then $(VENV)/bin/histostudio app; else echo "open the studio in a browser: make app (or: make demo APP=1)"; fi

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

app: venv
	$(VENV)/bin/histostudio app

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo_output .pytest_cache
