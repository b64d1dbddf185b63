#!/usr/bin/env bash
# Regenerate requirements/lock-gpu.txt: the GPU node image's exact packages (CUDA vLLM 0.32 with
# the torch, flashinfer and CUDA runtime wheels it pins, plus what the node itself imports).
# pip's own resolver answers for the image's platform (CPython 3.11, glibc <= 2.36 = Debian
# bookworm, x86_64) against PyPI, so no GPU and no CUDA are needed here; nothing is installed
# (--dry-run --report). Every line carries the sha256 of the wheel pip chose; the Dockerfile
# installs them with --no-deps --require-hashes, then `pip check`.
#   bash scripts/lock-gpu.sh            (~1 min; a scratch venv with a current pip under .negspace/)
set -euo pipefail
cd "$(dirname "$0")/.."
# What the node image needs on top of vllm (services/node/pyproject.toml and its negspace-*
# dependencies: servekit's fastapi/uvicorn/pydantic-settings/prometheus-client, contracts' httpx).
REQS=("vllm==0.32.*" "transformers>=5.16.1,<5.20" accelerate gguf safetensors numpy
      fastapi uvicorn httpx pydantic "pydantic-settings>=2.6" prometheus-client)
INDEX=${LOCK_INDEX_URL:-https://pypi.org/simple}
work=.negspace/lock-gpu
mkdir -p "$work"
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
# the machine's pip.conf (local indexes, a torch cap for the CPU wheel) must not steer this
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
cert=(); [ -f /etc/ssl/certs/ca-certificates.crt ] && cert=(--cert /etc/ssl/certs/ca-certificates.crt)
"$work/venv/bin/python" -m pip install -q --isolated --index-url "$INDEX" "${cert[@]}" --upgrade "pip>=25"
platforms=()
for v in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64
            --platform linux_x86_64)
"$work/venv/bin/python" -m pip install --isolated --dry-run --ignore-installed --quiet \
  --report "$work/report.json" --index-url "$INDEX" "${cert[@]}" \
  --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none "${platforms[@]}" \
  --only-binary=:all: "${REQS[@]}"
python3 - "$work/report.json" requirements/lock-gpu.txt "${REQS[*]}" <<'PY'
import json, sys
report, out, reqs = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for item in json.load(open(report))["install"]:
    meta, info = item["metadata"], item["download_info"]
    rows.append((meta["name"].lower().replace("_", "-"), meta["version"],
                 info["archive_info"]["hashes"]["sha256"], info["url"].rsplit("/", 1)[-1]))
with open(out, "w") as f:
    f.write("# Exact versions of every third-party package in the GPU node image (services/node/Dockerfile,\n"
            "# ENGINE_EXTRA=vllm), made by scripts/lock-gpu.sh: pip's resolver for CPython 3.11 on glibc <= 2.36\n"
            "# x86_64 (Debian bookworm) against PyPI, wheels only, from:\n"
            f"#   {reqs}\n"
            "# Installed with --no-deps --require-hashes; regenerate, never edit by hand.\n")
    for name, version, sha, wheel in sorted(rows):
        f.write(f"{name}=={version} \\\n    --hash=sha256:{sha}  # {wheel}\n")
print(f"lock-gpu: {len(rows)} packages -> {out}")
PY
