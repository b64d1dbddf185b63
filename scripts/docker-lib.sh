# Shared by scripts/compose-up.sh and scripts/gpu-image.sh (sourced, not run): a Docker engine
# (Debian's docker.io, started as root when no daemon answers) and the base image every build uses
# (python:3.11-slim when a registry answers, else local/debian-python:bookworm from debootstrap).
# The caller sets SCRIPT (its name in messages) and STATE_DIR (logs, the dockerd pid).
log() { printf '[%s %s] %s\n' "$SCRIPT" "$(date +%H:%M:%S)" "$*"; }
is_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
  is_root && command -v apt-get >/dev/null || { echo "$SCRIPT: install $* (needs root + apt)" >&2; exit 1; }
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$STATE_DIR/apt.log" 2>&1 \
    || { apt-get update -qq >>"$STATE_DIR/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$STATE_DIR/apt.log" 2>&1; } \
    || { echo "$SCRIPT: apt-get install $* failed; see $STATE_DIR/apt.log" >&2; exit 1; }
}

ensure_engine() {  # docker (and docker-compose) installed, a daemon answering
  command -v docker >/dev/null || apt_install docker.io
  command -v docker-compose >/dev/null || apt_install docker-compose
  if ! docker info >/dev/null 2>&1; then
    local dockerd_bin; dockerd_bin=$(command -v dockerd || true)
    [ -n "$dockerd_bin" ] && is_root || { echo "$SCRIPT: no Docker daemon answers; start one (dockerd as root)" >&2; exit 1; }
    log "starting dockerd (log: $STATE_DIR/dockerd.log)"
    nohup "$dockerd_bin" >"$STATE_DIR/dockerd.log" 2>&1 &
    echo $! > "$STATE_DIR/dockerd.pid"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "$SCRIPT: dockerd did not answer in 60 s; see $STATE_DIR/dockerd.log" >&2; exit 1; }
  fi
}

pick_base_image() {  # prints python:3.11-slim when it is here or can be pulled, else the local base
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 120 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    echo python:3.11-slim
  else
    echo local/debian-python:bookworm
  fi
}

ensure_base_image() {  # ensure_base_image NAME: builds local/debian-python:bookworm when it is missing
  local base=$1 mirror root t0
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
      >"$STATE_DIR/debootstrap.log" 2>&1 || { echo "$SCRIPT: debootstrap failed; see $STATE_DIR/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
           "$root"/usr/share/man/* "$root"/usr/share/locale/*
    tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$base" >/dev/null
    rm -rf "$root"
    log "built $base in $(( $(date +%s) - t0 )) s"
  fi
}

pip_conf() { python3 -m pip config get "global.$1" 2>/dev/null || true; }

stage_pip_ca() {  # pip's CA bundle (an intercepting proxy's) into the build context's pip.conf
  local cert=${PIP_CERT:-$(pip_conf cert)}
  if [ -n "$cert" ] && [ -f "$cert" ] && ! cmp -s "$cert" deploy/compose/local/ca.crt; then
    cp "$cert" deploy/compose/local/ca.crt
    log "pip's CA bundle ($cert) goes into the images' pip.conf"
  fi
}
