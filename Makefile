# Two commands do all set-up on a fresh machine:
#   make demo   - the studio on its local endpoint, http://127.0.0.1:7860
#   make test   - the whole test suite (what CI runs)
# and `make check` runs its fast tier: the tests that start no process, on the venv alone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PORT ?= 8080
# The sagemaker SDK (Triton image lookup) needs importlib-metadata<7, which nvidia-pytriton in
# .venv cannot share: it gets its own environment, used by `python -m deploy`.
SDK_VENV := build/sagemaker-sdk
SDK_INSTALLED := $(SDK_VENV)/.installed

.PHONY: venv sdk-venv compiler chromium tiny-models real-weights check test demo triton endpoint bench bench-full-size load deploy-plan clean

venv: $(INSTALLED)

$(INSTALLED): requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The project itself (sdserve, studio, deploy, serving), editable: imported by its one name.
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $@

sdk-venv: $(SDK_INSTALLED)

$(SDK_INSTALLED): deploy/sdk-requirements.txt
	test -d $(SDK_VENV) || $(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SDK_VENV)/bin/python -m pip install --quiet -r deploy/sdk-requirements.txt
	touch $@

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_INSTALL := $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq

# A C compiler for serving/loopback_bind.c (keeps the local Triton's SageMaker port on loopback).
compiler:
	@command -v cc >/dev/null || { $(APT_INSTALL) gcc libc6-dev; }

# Debian's chromium for the browser tests (Playwright's own browser download cannot work here).
chromium:
	@command -v chromium >/dev/null || { $(APT_INSTALL) chromium; }

# Tiny random-weight pipelines, built offline; real weights already present are kept.
tiny-models: $(INSTALLED)
	$(PY) -m serving.weights tiny --keep-existing

real-weights: $(INSTALLED)
	$(PY) -m serving.weights hub

# The tiers: a test that starts Triton, a diffusers pipeline, the studio, chromium, moto's server
# or any other process carries the mark that says so (pyproject.toml; tests/process_support.py
# fails one that does not). `make check` runs the tests with none of these marks, in a minute or
# two, and prints the slowest so that it stays quick.
FAST_TIER := not (triton or pipeline or studio or browser or aws or process)

check: $(INSTALLED)
	$(PY) -m pytest -n 2 -m "$(FAST_TIER)" --durations=15

# Everything, on TEST_WORKERS pytest-xdist workers: one test file to a worker at a time (a file's
# servers start once; the files on the shared endpoint go together), the heaviest first
# (tests/conftest.py groups and orders them).
# One CPU thread per torch process: three workers and their Triton stubs already share two cores,
# and torch's own pool of one thread per core only makes them wait on each other (17m55s -> 14m21s).
TEST_WORKERS ?= 3
TEST_THREADS ?= 1

test: $(INSTALLED) $(SDK_INSTALLED) compiler chromium tiny-models
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30

# The four models on a plain local Triton (KServe v2 HTTP on 127.0.0.1:8000).
triton: $(INSTALLED) tiny-models
	$(PY) -m serving.local_triton --model-repository serving/models --http-port 8000

ENDPOINT_ARGS ?=

endpoint: $(INSTALLED) compiler tiny-models
	$(PY) -m serving.local_endpoint --port $(PORT) $(ENDPOINT_ARGS)

demo: $(INSTALLED) compiler tiny-models
	$(PY) -m studio

bench: $(INSTALLED) compiler tiny-models
	$(PY) -m bench.pipelines
	$(PY) -m bench.local_endpoint --json build/bench-endpoint.json
	$(PY) -m bench.studio --json build/bench-studio.json

# The serving path at full size (random weights of the real architectures) through the local
# endpoint and Triton: some 40 GB of disk and an hour or more of CPU, so not part of `make test`.
# BENCH_ARGS="--models sd_base" for one model.
BENCH_ARGS ?=

bench-full-size: $(INSTALLED) compiler
	nice -n 19 $(PY) -m bench.full_size --json build/bench-full-size.json $(BENCH_ARGS)

# Simulated designers on the studio and its local endpoint, optionally with faults:
# make load LOAD_ARGS="--designers 4 --seconds 60 --faults all"
LOAD_ARGS ?=

load: $(INSTALLED) compiler tiny-models
	$(PY) -m bench.load $(LOAD_ARGS)

deploy-plan: $(INSTALLED)
	$(PY) -m deploy plan

# The studio image's lock (Dockerfile: pip install --require-hashes): studio/requirements.txt's
# whole closure, each pin with the sha256 of its files, resolved for the image's platform, which
# is why this needs a CPython 3.11 on linux x86-64. pip-tools is pinned so that the same inputs
# give the same lock; this machine's pip settings (extra indexes, local wheel folders,
# constraints) are kept out, so the lock holds only what the package index serves.
PIP_TOOLS := build/pip-tools
PIP_TOOLS_VERSION := 7.6.2

.PHONY: studio-lock
studio-lock:
	$(PYTHON) -c 'import platform as p, sys; sys.exit(None if (p.python_implementation(), sys.version_info[:2], p.system(), p.machine()) == ("CPython", (3, 11), "Linux", "x86_64") else "make studio-lock: needs CPython 3.11 on linux x86-64, as in the image")'
	test -d $(PIP_TOOLS) || $(PYTHON) -m venv $(PIP_TOOLS)
	$(PIP_TOOLS)/bin/python -m pip install --quiet pip-tools==$(PIP_TOOLS_VERSION)
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
		$(PIP_TOOLS)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --output-file studio/requirements.lock studio/requirements.txt

clean:
	rm -rf $(VENV) build test-artifacts serving/models/*/1/checkpoint
