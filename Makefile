# mixprec_ops: `make test` and `make bench` each set themselves up from a fresh clone (venv, torch, build).
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
BENCH_ARGS ?=
PIP := $(VPY) -m pip install -q --disable-pip-version-check
# Test and example dependencies besides torch; transformers + accelerate only for the Hugging Face Trainer test of
# examples/. Bump DEPS_REV when this list changes so that existing venvs pick the change up.
DEPS := numpy pytest ninja setuptools wheel tqdm matplotlib transformers accelerate
DEPS_REV := 2
# The venv's tools first (ninja above all): /usr/bin/ninja and the venv's ninja discard each other's build log,
# so switching between them recompiles everything.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv install test bench wheel clean

$(VENV)/.deps-$(TORCH_VERSION)-$(DEPS_REV):
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==$(TORCH_VERSION) $(DEPS)
	touch $@

venv: $(VENV)/.deps-$(TORCH_VERSION)-$(DEPS_REV)

# Non-editable install: tests and benchmarks import the built package, as users do.
install: venv
	$(PIP) --no-build-isolation --no-deps .

test: install
	TRITON_INTERPRET=1 $(VENV)/bin/pytest tests

bench: install
	$(VPY) -m bench $(BENCH_ARGS)

# Distribution wheel in dist/: the extension for MIXPREC_CUDA_ARCHS (default 8.0;9.0a;10.0+PTX), tagged
# cp310-abi3-manylinux_X_Y, requiring exactly the torch it was built against (setup.py, MIXPREC_DIST_WHEEL). Builds
# in-tree (build/), so after `make install` ninja's objects are reused; nothing is downloaded.
wheel: venv
	MIXPREC_DIST_WHEEL=1 $(VPY) -m pip wheel --no-build-isolation --no-deps --disable-pip-version-check -w dist .
	@ls -l dist/mixprec_ops-*.whl

clean:
	rm -rf build dist *.egg-info mixprec_ops/_C*.so mixprec_ops/_build_info.py
