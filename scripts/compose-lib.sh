# Shared by scripts/compose-up.sh, compose-down.sh and the compose tests (sourced, not run).
# The compose project, its files and where this machine keeps the engine's log and pid.
COMPOSE_PROJECT=${COMPOSE_PROJECT:-negspace}
STATE_DIR=${NEGSPACE_COMPOSE_STATE:-.negspace/compose}

env_get() {  # env_get KEY: the value in .env (empty when absent)
  [ -f .env ] && sed -n "s/^$1=//p" .env | tail -n 1 || true
}

env_set() {  # env_set KEY VALUE: replace or append the line in .env
  if grep -q "^$1=" .env 2>/dev/null; then
    local tmp; tmp=$(mktemp); awk -v k="$1" -v v="$2" -F= '$1 == k {print k "=" v; next} {print}' .env > "$tmp"
    cat "$tmp" > .env; rm -f "$tmp"
  else
    printf '%s=%s\n' "$1" "$2" >> .env
  fi
}

compose_files() {  # the -f/--profile arguments: CPU nodes, embedded Qdrant unless NEGSPACE_QDRANT=server
  local args=(-p "$COMPOSE_PROJECT" -f docker-compose.yml)
  [ "$(env_get NEGSPACE_QDRANT)" = server ] || args+=(-f docker-compose.embedded.yml)
  args+=(--profile cpu)
  printf '%s\n' "${args[@]}"
}

dc() {  # docker-compose with this project's files
  local args; mapfile -t args < <(compose_files)
  docker-compose "${args[@]}" "$@"
}
