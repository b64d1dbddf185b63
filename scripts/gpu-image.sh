#!/usr/bin/env bash
# `make gpu-image` / `make test-gpu-image`: the GPU node image, built and smoke-tested on a machine
# without a GPU (the CUDA wheels come from PyPI; nothing here needs a device).
#   build   the Docker engine and base image as `make compose-up` makes them, then
#           negspace-node:gpu from services/node/Dockerfile with ENGINE_EXTRA=vllm
#           (requirements/lock-gpu.txt, gcc + Python headers, non-root, health check)
#   test    deploy/gpu/smoke.py inside the image, as its non-root user, with the node's tests
#           mounted read-only (pytest added in a throwaway layer: negspace-node:gpu-smoke)
# Logs: .negspace/compose/gpu-image-build.log, gpu-image-test.log.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/compose-lib.sh
SCRIPT=gpu-image
IMAGE=${GPU_IMAGE:-negspace-node:gpu}
mkdir -p "$STATE_DIR"
source scripts/docker-lib.sh
ensure_engine

case "${1:-build}" in
build)
  base=${NEGSPACE_BASE_IMAGE:-$(env_get NEGSPACE_BASE_IMAGE)}
  [ -n "$base" ] || base=$(pick_base_image)
  ensure_base_image "$base"
  stage_pip_ca
  log "building $IMAGE on $base (CUDA wheels: several GB the first time; log: $STATE_DIR/gpu-image-build.log)"
  t0=$(date +%s)
  nice -n 10 docker build -f services/node/Dockerfile --build-arg BASE_IMAGE="$base" \
    --build-arg ENGINE_EXTRA=vllm --build-arg TORCH_SPEC= --build-arg TORCH_INDEX_URL= -t "$IMAGE" . \
    >"$STATE_DIR/gpu-image-build.log" 2>&1 \
    || { tail -n 40 "$STATE_DIR/gpu-image-build.log"; echo "$SCRIPT: the build failed; see $STATE_DIR/gpu-image-build.log" >&2; exit 1; }
  log "built $IMAGE in $(( $(date +%s) - t0 )) s: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
  ;;
test)
  docker image inspect "$IMAGE" >/dev/null 2>&1 || { echo "$SCRIPT: no $IMAGE; run make gpu-image first" >&2; exit 1; }
  pins=$(grep -E '^(pytest|pytest-asyncio|pytest-timeout)==' requirements/lock.txt | tr '\n' ' ')
  printf 'FROM %s\nUSER root\nRUN pip install --no-cache-dir %s\nUSER negspace\n' "$IMAGE" "$pins" \
    | docker build -q -t "$IMAGE-smoke" - >"$STATE_DIR/gpu-image-test.log" 2>&1 \
    || { cat "$STATE_DIR/gpu-image-test.log"; echo "$SCRIPT: could not add pytest to $IMAGE" >&2; exit 1; }
  log "smoke test of $IMAGE without a GPU (log: $STATE_DIR/gpu-image-test.log)"
  t0=$(date +%s)
  docker run --rm --network none \
    -v "$PWD/services/node/tests:/smoke/services/node/tests:ro" -v "$PWD/deploy/gpu/smoke.py:/smoke/smoke.py:ro" \
    "$IMAGE-smoke" python /smoke/smoke.py 2>&1 | tee -a "$STATE_DIR/gpu-image-test.log"
  rc=${PIPESTATUS[0]}
  log "smoke test exit $rc in $(( $(date +%s) - t0 )) s"
  exit "$rc"
  ;;
*) echo "usage: $0 build|test" >&2; exit 2 ;;
esac
