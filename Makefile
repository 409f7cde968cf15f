# Two set-up commands: `make demo` and `make test`. Both create .venv when absent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: demo test lint install install-test clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first: on these machines torch==$(TORCH_VERSION) is a local CPU build; elsewhere it comes from PyPI.
# With it installed, the package's `torch>=2.4` floor is already satisfied and pip pulls nothing more.
install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e .

install-test: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[test]"

demo: install
	$(VENV)/bin/pitlm demo

test: install-test
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check pitlm tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
