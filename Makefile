# mixprec_ops: `make test` and `make bench` each set themselves up from a fresh clone (venv, torch, build).
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
BENCH_ARGS ?=
PIP := $(VPY) -m pip install -q --disable-pip-version-check

.PHONY: venv install test bench wheel clean

$(VENV)/.deps-$(TORCH_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==$(TORCH_VERSION) numpy pytest ninja setuptools wheel tqdm matplotlib
	touch $@

venv: $(VENV)/.deps-$(TORCH_VERSION)

# Non-editable install: tests and benchmarks import the built package, as users do.
install: venv
	$(PIP) --no-build-isolation --no-deps .

test: install
	TRITON_INTERPRET=1 $(VENV)/bin/pytest tests

bench: install
	$(VPY) -m bench $(BENCH_ARGS)

wheel: venv
	$(VPY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info mixprec_ops/_C*.so mixprec_ops/_build_info.py
