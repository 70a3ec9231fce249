#!/usr/bin/env bash
# Docker smoke test: build the CPU image and run it for real on a loopback port.
#
#   bash tests/docker/smoke.sh            (from any directory; run by .ci/run after the unit tests)
#
# Checks, in order: /readyz turns ready with the real MobileNetV2 backbone (its fingerprint equals the
# host's); skimage's chelsea is classified "Egyptian cat" in the bootstrapped `imagenet` domain with the
# host's probability; adapter uploads without / with a wrong admin token are refused and store nothing;
# an upload with the token (read from a mounted secret file) is accepted and classifies like the host;
# the container runs as uid 10001 and its HEALTHCHECK turns healthy; `docker stop` during a 32-image
# request answers the request and exits 0 (no SIGKILL); a new container on the same volume still
# serves the uploaded domain. Containers run hardened like docker-compose.yml: read-only root, a /tmp
# tmpfs, no capabilities, no-new-privileges.
#
# Engine: an engine answering on DOCKER_HOST (or the default socket) is used as it is. Otherwise this
# script installs docker.io if needed, starts its own dockerd (no bridge, no firewall changes, its own
# socket) and stops only that one at the end. It prints "SKIP: <why>" and exits 0 only when no engine
# can be started. Base image: MD_SMOKE_BASE_IMAGE if set, else a local Debian bookworm + Python 3.11 made
# with debootstrap and `docker import` (this network cannot pull images), cached as a tarball.
#
# Environment:
#   MD_SMOKE_PYTHON      the project's venv python on the host (default: <repo>/.venv/bin/python)
#   MD_DOCKER_CACHE      cache dir kept between runs (default /var/cache/multidomain-docker):
#                        bookworm-py.tar (base image) and data-root/ (layers + BuildKit's pip cache)
#   MD_SMOKE_BASE_IMAGE  base image to build from instead of the local debootstrap one
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${MD_SMOKE_PYTHON:-$REPO/.venv/bin/python}"
CACHE="${MD_DOCKER_CACHE:-/var/cache/multidomain-docker}"
DOCKER="${DOCKER:-/usr/bin/docker}"
export DOCKER
IMAGE="multidomain:smoke"
LOCAL_BASE="local/bookworm-py:base"
RUN_ID="md-smoke-$$"
VOLUME="$RUN_ID-store"
GRACE_S=30
WORK="$(mktemp -d /tmp/md-smoke.XXXXXX)"
STARTED_DOCKERD_PID=""
CONTAINERS=()
T0=$(date +%s)

log() { echo "smoke: $*"; }
skip() { echo "SKIP: $*"; exit 0; }
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    for c in "${CONTAINERS[@]}"; do
        if [ "$rc" -ne 0 ] && "$DOCKER" inspect "$c" > /dev/null 2>&1; then
            echo "---- logs of $c (last 60 lines)" >&2
            "$DOCKER" logs --tail 60 "$c" >&2 2>&1
        fi
        "$DOCKER" rm -f "$c" > /dev/null 2>&1
    done
    "$DOCKER" volume rm -f "$VOLUME" > /dev/null 2>&1
    if [ -n "$STARTED_DOCKERD_PID" ]; then
        log "stopping the engine this script started (pid $STARTED_DOCKERD_PID)"
        kill -TERM "$STARTED_DOCKERD_PID" 2> /dev/null
        # dockerd stops its containers and containerd on SIGTERM; wait for it, by its pid only.
        for _ in $(seq 1 60); do kill -0 "$STARTED_DOCKERD_PID" 2> /dev/null || break; sleep 0.5; done
    fi
    # --one-file-system: a failed debootstrap may leave proc/sys mounted inside the rootfs.
    rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT

# The host side imports this checkout's packages even when MD_SMOKE_PYTHON is another checkout's venv.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ -x "$PY" ] || fail "no project venv python at $PY (run 'make install' or set MD_SMOKE_PYTHON)"
[ "$(uname -m)" = "x86_64" ] || skip "the image pins x86_64 wheels; this machine is $(uname -m)"

# ---- engine ------------------------------------------------------------------------------------------
engine_up() { "$DOCKER" info > /dev/null 2>&1; }

start_engine() {
    if [ ! -x "$DOCKER" ] || ! command -v dockerd > /dev/null 2>&1; then
        if [ "$(id -u)" -ne 0 ] || ! command -v apt-get > /dev/null 2>&1; then
            skip "no Docker engine running and no way to install one (need root and apt-get)"
        fi
        log "installing docker.io"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io > "$WORK/apt.log" 2>&1 \
            || { apt-get update -q > /dev/null 2>&1 \
                && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io > "$WORK/apt.log" 2>&1; } \
            || skip "no Docker engine running and docker.io cannot be installed (see apt-get)"
    fi
    [ "$(id -u)" -eq 0 ] || skip "no Docker engine running and starting dockerd needs root"
    local sock="/run/multidomain-docker/docker.sock"
    # An engine left behind by an interrupted run holds the data root: use it (it is not ours to stop).
    if DOCKER_HOST="unix://$sock" "$DOCKER" info > /dev/null 2>&1; then
        export DOCKER_HOST="unix://$sock"
        log "using the engine an earlier run left on $sock"
        return 0
    fi
    mkdir -p "$CACHE/data-root" /run/multidomain-docker
    # No bridge and no iptables: containers use the host network and the host's firewall is untouched.
    dockerd --data-root "$CACHE/data-root" --exec-root /run/multidomain-docker/exec \
        --pidfile /run/multidomain-docker/docker.pid -H "unix://$sock" \
        --bridge=none --iptables=false --ip6tables=false > "$CACHE/dockerd.log" 2>&1 &
    STARTED_DOCKERD_PID=$!
    export DOCKER_HOST="unix://$sock"
    for _ in $(seq 1 120); do
        engine_up && return 0
        kill -0 "$STARTED_DOCKERD_PID" 2> /dev/null || break
        sleep 0.5
    done
    tail -5 "$CACHE/dockerd.log" >&2 || true
    kill -TERM "$STARTED_DOCKERD_PID" 2> /dev/null || true
    STARTED_DOCKERD_PID=""
    skip "dockerd did not start (see $CACHE/dockerd.log)"
}

if engine_up; then
    log "using the running Docker engine"
else
    start_engine
    [ -z "$STARTED_DOCKERD_PID" ] || log "started dockerd (pid $STARTED_DOCKERD_PID, data root $CACHE/data-root)"
fi

# ---- base image -------------------------------------------------------------------------------------
BASE_IMAGE="${MD_SMOKE_BASE_IMAGE:-}"
if [ -z "$BASE_IMAGE" ]; then
    BASE_IMAGE="$LOCAL_BASE"
    if ! "$DOCKER" image inspect "$LOCAL_BASE" > /dev/null 2>&1; then
        if [ ! -s "$CACHE/bookworm-py.tar" ]; then
            command -v debootstrap > /dev/null 2>&1 \
                || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap > "$WORK/apt.log" 2>&1 \
                || fail "debootstrap is needed to make the local base image (apt-get install debootstrap)"
            log "making the base image with debootstrap (about 2 minutes, cached afterwards)"
            rootfs="$WORK/rootfs"
            debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
                bookworm "$rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 \
                || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
            rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
            mkdir -p "$CACHE"
            tar -C "$rootfs" -cf "$CACHE/bookworm-py.tar.tmp" . && mv "$CACHE/bookworm-py.tar.tmp" "$CACHE/bookworm-py.tar"
            rm -rf "$rootfs"
        fi
        "$DOCKER" import "$CACHE/bookworm-py.tar" "$LOCAL_BASE" > /dev/null
    fi
fi
log "base image $BASE_IMAGE"

# ---- build ------------------------------------------------------------------------------------------
SECRET_ARGS=()
CA_BUNDLE="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
[ -s "$CA_BUNDLE" ] && SECRET_ARGS=(--secret "id=pipca,src=$CA_BUNDLE")
log "building $IMAGE (CPU target)"
OLD_IMAGE_ID=$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE" 2> /dev/null || true)
B0=$(date +%s)
DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" "${SECRET_ARGS[@]}" -t "$IMAGE" "$REPO" > "$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; fail "docker build failed"; }
BUILD_S=$(( $(date +%s) - B0 ))
# The previous build's image is now untagged: drop it so the cached data root does not grow per run
# (the layers this build reused stay). In an engine this script started, also cap BuildKit's cache.
if [ -n "$OLD_IMAGE_ID" ] && [ "$OLD_IMAGE_ID" != "$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    "$DOCKER" image rm "$OLD_IMAGE_ID" > /dev/null 2>&1 || true
fi
[ -z "$STARTED_DOCKERD_PID" ] || "$DOCKER" builder prune -f --keep-storage 20GB > /dev/null 2>&1 || true
SIZE_BYTES=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
log "built in ${BUILD_S}s; image size $(( SIZE_BYTES / 1000000 )) MB"

# The image must not carry a token, and must not run as root.
if "$DOCKER" image inspect -f '{{json .Config.Env}}' "$IMAGE" | grep -q 'MD_ADMIN_TOKEN'; then
    fail "the image has an MD_ADMIN_TOKEN baked in"
fi
[ "$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")" = "10001:10001" ] || fail "the image's USER is not 10001"

# ---- run --------------------------------------------------------------------------------------------
R0=$(date +%s)
"$PY" "$REPO/tests/docker/smoke_client.py" prepare "$WORK"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
SMOKE_ADMIN_TOKEN="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')"
export SMOKE_ADMIN_TOKEN
# The token as a secret file (MD_ADMIN_TOKEN_FILE), the way Docker/Kubernetes secrets arrive.
printf '%s\n' "$SMOKE_ADMIN_TOKEN" > "$WORK/admin_token"
chmod 0644 "$WORK/admin_token"
"$DOCKER" volume create "$VOLUME" > /dev/null

run_server() {  # name, extra docker-run args...
    local name="$1"; shift
    CONTAINERS+=("$name")
    "$DOCKER" run -d --name "$name" --network host --stop-timeout "$GRACE_S" \
        -v "$VOLUME:/var/lib/multidomain" \
        -e MD_HOST=127.0.0.1 -e "MD_PORT=$PORT" -e MD_TORCH_THREADS=2 \
        --health-interval 2s --health-start-period 600s \
        --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
        "$@" "$IMAGE" > /dev/null
}

log "first container (empty volume: bootstraps the ImageNet backbone)"
run_server "$RUN_ID-a" -v "$WORK/admin_token:/run/secrets/md_admin_token:ro" \
    -e MD_ADMIN_TOKEN_FILE=/run/secrets/md_admin_token
"$PY" "$REPO/tests/docker/smoke_client.py" first-run "$URL" "$WORK" "$RUN_ID-a"

[ "$("$DOCKER" exec "$RUN_ID-a" id -u)" = "10001" ] || fail "the server does not run as uid 10001"
log "the server runs as uid 10001"
# The image's HEALTHCHECK (/readyz) must turn healthy; the interval is shortened with --health-interval.
for _ in $(seq 1 60); do
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$RUN_ID-a")
    [ "$health" = "healthy" ] && break
    [ "$health" = "unhealthy" ] && fail "HEALTHCHECK says unhealthy"
    sleep 1
done
[ "$health" = "healthy" ] || fail "HEALTHCHECK still '$health'"
log "HEALTHCHECK: healthy"

"$PY" "$REPO/tests/docker/smoke_client.py" stop-in-flight "$URL" "$WORK" "$RUN_ID-a" "$GRACE_S"

log "second container on the same volume (token from MD_ADMIN_TOKEN this time)"
run_server "$RUN_ID-b" -e "MD_ADMIN_TOKEN=$SMOKE_ADMIN_TOKEN"
"$PY" "$REPO/tests/docker/smoke_client.py" after-restart "$URL" "$WORK" "$RUN_ID-b"
"$DOCKER" stop -t "$GRACE_S" "$RUN_ID-b" > /dev/null
[ "$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$RUN_ID-b")" = "0" ] || fail "second container did not exit 0"
RUN_S=$(( $(date +%s) - R0 ))

log "PASS: build ${BUILD_S}s, run ${RUN_S}s, total $(( $(date +%s) - T0 ))s, image $IMAGE $(( SIZE_BYTES / 1000000 )) MB"
