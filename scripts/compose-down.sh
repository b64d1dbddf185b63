#!/usr/bin/env bash
# `make compose-down`: stop and remove the stack's containers and network; VOLUMES=1 also removes
# its volumes (runs, models cache, Qdrant data). A dockerd that compose-up started is stopped too.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/compose-lib.sh
if docker info >/dev/null 2>&1; then
  if [ -f .env ]; then
    dc down --remove-orphans ${VOLUMES:+--volumes}
  else  # no .env: the token is irrelevant for `down`
    NEGSPACE_API_TOKEN=unused dc down --remove-orphans ${VOLUMES:+--volumes}
  fi
  left=$(docker ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT")
  [ -z "$left" ] || { echo "compose-down: still running: $left" >&2; exit 1; }
fi
if [ -f "$STATE_DIR/dockerd.pid" ]; then
  pid=$(cat "$STATE_DIR/dockerd.pid")
  if kill -0 "$pid" 2>/dev/null; then
    echo "compose-down: stopping the dockerd compose-up started (pid $pid)"
    kill "$pid"; for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  rm -f "$STATE_DIR/dockerd.pid"
fi
echo "compose-down: nothing of project $COMPOSE_PROJECT is running"
