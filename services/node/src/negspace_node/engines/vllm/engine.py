"""The vLLM engine: continuous batching with classifier-free guidance groups kept together.

One in-process vLLM ``LLMEngine`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the scheduler, the model
runner and the logits processor live in this process) is driven by ONE dedicated thread:

    loop: take new requests from the inbox and add them (ALL members of a group between two
          steps, so a step can never start with part of a group) -> step() -> for every request
          with new tokens: check, feed the stop checker, abort what has finished (before the next
          step) -> resolve the asyncio futures of finished requests.

Concurrent requests share every step (continuous batching); nothing is serialized per request.

- Plain requests (no negatives, or ``guidance_scale == 1``) use vLLM's own sampler, seeded via
  ``SamplingParams.seed`` (choice ``i`` of ``n`` uses ``seed + i``, one vLLM request each).
- A guided request is a group of 1 + N vLLM requests (positive, then negatives) whose
  ``SamplingParams.extra_args`` carry the group: its identity AND its whole guidance state
  (``groups.group_args``), so the logits processor (``processor.py``) needs nothing else, in
  whichever process vLLM runs it. They are greedy, ignore EOS and skip detokenization: the
  processor draws the guided token for the group and forces it on every member.
  ``GangScheduler`` (``scheduler.py``) admits a group only whole and reserves KV blocks so that
  no member can be preempted.
- Past the guidance interval (``guidance_max_tokens``) the negatives carry nothing: they are
  aborted (their rows and KV blocks freed) and the positive decodes on alone.
- Stopping is ``negspace_node.engines.stopping.StopChecker`` on the positive's tokens (EOS, stop
  strings, max_tokens), exactly as in the transformers engine; when it says stop, every member
  still running is aborted before the next step.
- Checks: the processor refuses an incomplete or out-of-step group (and forces its members to
  disagree); after each step every member still decoding must have received the same token as
  the positive; at the end every negative's tokens must be a prefix of the positive's. Any
  violation, or a failure the scheduler or processor reported (``groups.REPORTS``), fails THAT
  request with ``GuidanceGroupError`` (its members are aborted); other requests are unaffected.
- If the loop thread dies the engine goes to state "error" with the reason (``/health``), every
  waiting request gets ``EngineError`` (503) and so does every later one.

GPU: the same code runs with the CUDA ``vllm`` package; ``VLLM_USE_V2_MODEL_RUNNER=0`` is set
before vLLM is imported because the V2 model runner has a different logits-processor interface.
With ``tensor_parallel_size > 1`` the model runners (and the processor) live in vLLM's worker
processes; the engine core (scheduler) stays in this process. ``check_installed_vllm`` and
``check_supported`` refuse at start-up, by name, what guidance cannot run on: a vLLM without the V1
runner or without the VLLM_USE_V2_MODEL_RUNNER=0 opt-out, no device, and the configurations below
(see the README's GPU section).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field

from negspace_contracts.errors import BadRequestError
from negspace_models import resolve_model, served_model_name

from negspace_node.dtype import resolve_dtype
from negspace_node.engines.base import (
    Engine,
    EngineError,
    GenerationOutput,
    GenerationRequest,
    GuidanceGroupError,
    RequestFailedError,
    TextSink,
)
from negspace_node.engines.stopping import StopChecker, eos_token_ids
from negspace_node.engines.vllm.groups import REPORTS, group_args

log = logging.getLogger("negspace.node.vllm")

PROCESSOR = "negspace_node.engines.vllm.processor:CFGLogitsProcessor"
SCHEDULER = "negspace_node.engines.vllm.scheduler.GangScheduler"
GiB = 1 << 30


class UnsupportedConfigError(RuntimeError):
    """vLLM was configured in a way guidance cannot run on: the engine refuses to start."""


#: Environment vLLM must see before it is imported, and why (``configure_environment``).
REQUIRED_ENV = {
    # The engine core (scheduler) runs in this process: requests added by the engine thread reach
    # the scheduler between two steps (no arrival race), and aborts land before the next step.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # One V1 logits-processor implementation for CPU and GPU (V2 has another interface).
    "VLLM_USE_V2_MODEL_RUNNER": "0",
}


def configure_environment() -> None:
    """Set ``REQUIRED_ENV``; refuse (``UnsupportedConfigError``) if the operator asked otherwise."""
    for name, value in REQUIRED_ENV.items():
        given = os.environ.get(name)
        if given is not None and given.strip().lower() not in (value, "false" if value == "0" else value):
            raise UnsupportedConfigError(
                f"{name}={given} is not supported by the negspace node (guidance needs {name}={value}: see "
                f"the node README, 'vLLM on GPU'); unset it")
        os.environ[name] = value


#: Where vLLM keeps each model runner's logits-processor interface. The node's processor is a V1
#: one; vLLM 0.32 has both runners and VLLM_USE_V2_MODEL_RUNNER=0 picks V1 (node README table).
V1_PROCESSOR_INTERFACE = "vllm.v1.sample.logits_processor"
V2_PROCESSOR_INTERFACE = "vllm.v1.worker.gpu.sample.logits_processor.interface"


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def runner_problem(*, has_v1: bool, has_v2: bool, knows_opt_out: bool, version: str) -> str | None:
    """Why the installed vLLM cannot run the node's V1 processor, or None."""
    if not has_v1:
        return (f"vLLM {version} has no V1 logits-processor interface ({V1_PROCESSOR_INTERFACE}), the only "
                "one the guidance processor implements; install vllm 0.32.* (requirements/lock-gpu.txt)")
    if has_v2 and not knows_opt_out:
        return (f"vLLM {version} has the V2 model runner's logits-processor interface "
                f"({V2_PROCESSOR_INTERFACE}) and no longer reads VLLM_USE_V2_MODEL_RUNNER=0, the setting "
                "the node needs to keep vLLM on the V1 runner its guidance processor implements; install "
                "vllm 0.32.* (requirements/lock-gpu.txt; node README, 'vLLM versions')")
    return None


def check_installed_vllm() -> None:
    """Refuse at start-up, by name, what would otherwise fail obscurely inside vLLM: a vLLM whose
    runner cannot take the V1 processor (``runner_problem``), or no device to run on (the CUDA
    build on a machine without a visible NVIDIA GPU). Call after ``configure_environment``."""
    import vllm
    import vllm.envs as envs

    version = getattr(vllm, "__version__", "?")
    problem = runner_problem(has_v1=_has_module(V1_PROCESSOR_INTERFACE), has_v2=_has_module(V2_PROCESSOR_INTERFACE),
                             knows_opt_out="VLLM_USE_V2_MODEL_RUNNER" in getattr(envs, "environment_variables", {}),
                             version=version)
    if problem:
        raise UnsupportedConfigError(problem)
    from vllm.platforms import current_platform

    if current_platform.is_unspecified():
        raise UnsupportedConfigError(
            f"no device for vLLM {version}: this is the CUDA build and no NVIDIA GPU is visible to this "
            "process. Give the container a GPU (docker run --gpus all; compose reserves one per node; "
            "Kubernetes: nvidia.com/gpu), or run a CPU node (the vllm-cpu image, or NODE_ENGINE=transformers)")


def check_supported(vllm_config) -> None:
    """Refuse, before any model is loaded, a vLLM configuration guidance cannot run on."""
    parallel = vllm_config.parallel_config
    problems = []
    if vllm_config.use_v2_model_runner:
        problems.append("vLLM would run its V2 model runner despite VLLM_USE_V2_MODEL_RUNNER=0 (HiSparse "
                        "attention or watermarking force it), whose logits-processor interface the guidance "
                        "processor does not implement")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is on (vLLM runs no custom logits processor with it)")
    if parallel.pipeline_parallel_size > 1 or parallel.data_parallel_size > 1:
        problems.append(f"pipeline ({parallel.pipeline_parallel_size}) or data ({parallel.data_parallel_size}) "
                        "parallelism is not supported (tensor parallelism is)")
    if vllm_config.scheduler_config.enable_chunked_prefill:
        problems.append("chunked prefill is on (a partly prefilled member would get a logits row)")
    if vllm_config.scheduler_config.async_scheduling:
        problems.append("async scheduling is on (a finished group's aborts must land before the next step)")
    if problems:
        raise UnsupportedConfigError("guidance cannot run on this vLLM configuration: " + "; ".join(problems))


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_args(settings, model_path: str, *, max_num_batched_tokens: int | None = None,
                enable_prefix_caching: bool = True):
    """The vLLM ``EngineArgs`` for the node settings (guidance needs the flags marked below)."""
    from vllm import EngineArgs

    cpu = _on_cpu()
    dtype = resolve_dtype(settings.dtype, model_path, on_cpu=cpu)   # auto on CPU: negspace_node.dtype's rule
    budget = max_num_batched_tokens or max(settings.max_model_len, 4096)
    budget = max(budget, settings.max_model_len, settings.max_num_seqs)
    kwargs = dict(
        model=model_path,
        tokenizer=model_path,
        served_model_name=served_model_name(settings.model, settings.served_model_name),
        dtype=dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=budget,
        tensor_parallel_size=settings.tensor_parallel_size,
        enable_chunked_prefill=False,        # guidance: a partly prefilled row would get logits
        async_scheduling=False,              # guidance: aborts must land before the next step
        scheduler_cls=SCHEDULER,             # guidance: whole groups, no preemption
        logits_processors=[PROCESSOR],       # guidance: the cross-row processor
        enable_prefix_caching=enable_prefix_caching,
        seed=settings.seed,
        disable_log_stats=True,
    )
    if cpu:
        # What VLLM_CPU_KVCACHE_SPACE sets, but in bytes (that variable takes whole GiB only).
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=int(settings.kv_cache_gib * GiB))
    else:
        kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization)
    return EngineArgs(**kwargs)


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    job_id: str
    guided: bool
    member_ids: list[str]                       # guided: [positive, *negatives]; plain: one per choice
    checkers: list[StopChecker]                 # guided: one (the positive); plain: one per choice
    tokens: dict[str, list[int]] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)     # member ids vLLM still holds
    active: list[str] = field(default_factory=list)    # guided: members still decoding (positive first)
    started: float = field(default_factory=time.monotonic)


class VLLMEngine(Engine):
    """vLLM with guidance groups; see the module docstring."""

    name = "vllm"

    def __init__(self, settings, *, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True) -> None:
        super().__init__()
        self.settings = settings
        self._name = served_model_name(settings.model, settings.served_model_name)
        self._budget_override = max_num_batched_tokens
        self._prefix_caching = enable_prefix_caching
        self._llm = None
        self._tokenizer = None
        self._eos: frozenset[int] = frozenset()
        self._max_len = settings.max_model_len
        self._budget = 0
        self._max_seqs = settings.max_num_seqs
        self._capacity_blocks = 0
        self._block_size = 16
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._jobs: dict[str, _Job] = {}           # engine thread only
        self._by_member: dict[str, _Job] = {}      # engine thread only
        self._in_flight = 0                        # event loop only
        self._ids = itertools.count()
        self.steps = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            self.status_detail = f"resolving model {self.settings.model or 'bundled'!r}"
            resolved = await asyncio.to_thread(resolve_model, self.settings.model)
            dtype = resolve_dtype(self.settings.dtype, resolved.path, on_cpu=_on_cpu())
            self.status_detail = f"starting vLLM on {resolved.path} (dtype {self.settings.dtype}: {dtype})"
            log.info("vllm engine: %s", self.status_detail)
            # The engine thread builds vLLM AND steps it: vLLM's CPU attention checks that its
            # metadata and its kernels see the same OpenMP thread count, which is per thread.
            loop = asyncio.get_running_loop()
            built = loop.create_future()
            self._thread = threading.Thread(target=self._main, args=(resolved.path, loop, built),
                                            name="negspace-vllm", daemon=True)
            self._thread.start()
            await built
            self.state, self.status_detail = "ready", None
        except UnsupportedConfigError as exc:  # a refusal that names its reason: no traceback
            log.error("vllm engine refused to start: %s", exc)
            self.fail(f"vLLM refused: {exc}")
        except Exception as exc:  # noqa: BLE001 - the reason goes to /health
            log.exception("vllm engine failed to start")
            self.fail(f"could not start vLLM on {self.settings.model or 'bundled'!r}: {type(exc).__name__}: {exc}")

    def _main(self, path: str, loop: asyncio.AbstractEventLoop, built: asyncio.Future) -> None:
        try:
            self._build(path)
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            loop.call_soon_threadsafe(_settle, built, None, exc)
            return
        loop.call_soon_threadsafe(_settle, built, None, None)
        self._run()

    def _build(self, path: str) -> None:
        configure_environment()
        check_installed_vllm()
        from transformers import AutoTokenizer, GenerationConfig
        from vllm.v1.engine.llm_engine import LLMEngine

        args = engine_args(self.settings, path, max_num_batched_tokens=self._budget_override,
                           enable_prefix_caching=self._prefix_caching)
        vllm_config = args.create_engine_config()
        check_supported(vllm_config)
        self._llm = LLMEngine.from_vllm_config(vllm_config, disable_log_stats=True)
        self._max_len = vllm_config.model_config.max_model_len
        self._budget = vllm_config.scheduler_config.max_num_batched_tokens
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except Exception:  # noqa: BLE001 - a model without generation_config.json
            generation_config = None
        self._eos = eos_token_ids(self._tokenizer, vllm_config.model_config.hf_config, generation_config)
        cache = vllm_config.cache_config
        self._block_size = cache.block_size
        self._capacity_blocks = (cache.num_gpu_blocks or 1) - 1
        per_seq = -(-self._max_len // self._block_size)
        full = self._capacity_blocks // per_seq
        log.info("vllm engine ready: %s, context %d, %d KV blocks of %d tokens; %d full-context "
                 "sequences fit (max_num_seqs %d): the gang scheduler admits by KV reservation "
                 "(prompt + max_tokens), so preemption cannot happen%s", self._name, self._max_len,
                 self._capacity_blocks, self._block_size, full, self._max_seqs,
                 "" if full >= self._max_seqs else "; long requests will wait for KV space")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 60)
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                llm.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                log.exception("vllm shutdown")
        await super().stop()

    # -- generation --------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Reject what could never run (the API validates most of this first)."""
        members = [request.prompt_ids, *request.negative_ids] if request.guided else [request.prompt_ids]
        if request.guided and request.n != 1:
            raise BadRequestError("n must be 1 when negative prompts are given")
        for i, ids in enumerate(members):
            if not ids:
                raise BadRequestError("empty prompt" if i == 0 else f"negative prompt {i} is empty")
            if len(ids) + request.max_tokens > self._max_len:
                what = "prompt" if i == 0 else f"negative prompt {i}"
                raise BadRequestError(f"{what} ({len(ids)} tokens) + max_tokens ({request.max_tokens}) "
                                      f"exceeds the context length {self._max_len}")
        if len(members) > self._max_seqs:
            raise BadRequestError(f"{len(members) - 1} negatives need {len(members)} sequences in one "
                                  f"step; this node decodes at most {self._max_seqs} (max_num_seqs)")
        total = sum(len(m) for m in members)
        if request.guided and total > self._budget:
            raise BadRequestError(f"the positive and negative prompts total {total} tokens; a guided "
                                  f"group must be prefilled in one step of at most {self._budget} tokens")
        # The gang scheduler admits a unit (a whole group, or one plain choice) only when its
        # lifetime KV blocks fit: a unit bigger than the whole cache would wait forever. Say so now.
        blocks = sum(-(-(len(m) + request.max_tokens) // self._block_size) for m in members)
        if self._capacity_blocks and blocks > self._capacity_blocks:
            tokens = self._capacity_blocks * self._block_size
            if request.guided:
                raise BadRequestError(f"the group (positive + {len(members) - 1} negatives, each with "
                                      f"max_tokens={request.max_tokens}) needs {blocks} KV blocks but the "
                                      f"node's KV cache holds {self._capacity_blocks} ({tokens} tokens); use "
                                      f"fewer or shorter negatives or a smaller max_tokens", param="max_tokens")
            raise BadRequestError(f"prompt + max_tokens needs {blocks} KV blocks but the node's KV cache "
                                  f"holds {self._capacity_blocks} ({tokens} tokens); use a smaller max_tokens",
                                  param="max_tokens")

    async def generate(self, request: GenerationRequest, *, on_text: TextSink | None = None) -> list[GenerationOutput]:
        self.ensure_ready()
        self.validate(request)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = self._make_job(request, loop, future, on_text)
        self._in_flight += 1
        try:
            self._inbox.put(("add", job))
            self._wake.set()
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                self._inbox.put(("cancel", job.job_id))   # the caller went away: free its rows
                self._wake.set()
                raise
        finally:
            self._in_flight -= 1

    def _make_job(self, request: GenerationRequest, loop, future, on_text: TextSink | None = None) -> _Job:
        job_id = f"ns{next(self._ids)}" + (f"-{request.request_id}" if request.request_id else "")
        if request.guided:
            members = [f"{job_id}-m{i}" for i in range(1 + len(request.negative_ids))]
        else:
            members = [f"{job_id}-c{i}" for i in range(request.n)]
        checkers = [StopChecker(self._tokenizer, self._eos, request.stop, request.max_tokens,
                                len(request.prompt_ids),
                                on_text=None if on_text is None else functools.partial(on_text, choice))
                    for choice in range(1 if request.guided else request.n)]
        return _Job(request, loop, future, job_id, request.guided, members, checkers)

    def _member_params(self, job: _Job) -> list[tuple[str, list[int], object]]:
        """(vLLM request id, prompt ids, SamplingParams) for every member of ``job``."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        r = job.request
        common = dict(max_tokens=r.max_tokens, ignore_eos=True, detokenize=False,
                      output_kind=RequestOutputKind.DELTA)
        if job.guided:
            prompts = [r.prompt_ids, *r.negative_ids]
            size = len(prompts)
            seed = r.seed if r.seed is not None else random.SystemRandom().randrange(2**63)
            return [(rid, list(ids), SamplingParams(
                        temperature=0.0, extra_args=group_args(r, job.job_id, role, size, seed), **common))
                    for role, (rid, ids) in enumerate(zip(job.member_ids, prompts, strict=True))]
        return [(rid, list(r.prompt_ids), SamplingParams(
                    temperature=r.temperature, top_p=r.top_p, min_p=r.min_p,
                    seed=None if r.seed is None else r.seed + choice, **common))
                for choice, rid in enumerate(job.member_ids)]

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self._jobs:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                outputs = self._llm.step()
                self.steps += 1
                self._process(outputs)
        except BaseException as exc:  # noqa: BLE001 - the loop must report, not vanish
            log.exception("vllm engine loop died")
            self.fail(f"engine loop died: {type(exc).__name__}: {exc}")
            error = EngineError(f"engine vllm failed: {type(exc).__name__}: {exc}")
            for job in list(self._jobs.values()):
                self._resolve(job, error=error)
            self._jobs.clear()
            while True:       # nothing queued after the failure may hang
                try:
                    kind, item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add" and not item.loop.is_closed():
                    item.loop.call_soon_threadsafe(_settle, item.future, None, error)
        finally:
            if self._stopping:
                error = EngineError("engine vllm stopped")
                for job in list(self._jobs.values()):
                    self._resolve(job, error=error)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(item)
            elif kind == "cancel":
                job = self._jobs.get(item)
                if job is not None:
                    self._finish(job, error=None, cancelled=True)

    def _add(self, job: _Job) -> None:
        """Add every member of ``job`` now, between two steps: the group enters the queue whole."""
        if job.future.done():           # cancelled before it got here
            return
        if job.guided:
            job.active = list(job.member_ids)
        self._jobs[job.job_id] = job
        try:
            for rid, ids, params in self._member_params(job):
                self._llm.add_request(rid, {"prompt_token_ids": ids}, params)
                job.tokens[rid] = []
                job.running.add(rid)
                self._by_member[rid] = job
        except (ValueError, TypeError) as exc:       # vLLM's input validation
            self._finish(job, error=BadRequestError(f"vLLM refused the request: {exc}"))
        except Exception as exc:  # noqa: BLE001 - this request alone
            log.exception("adding request %s failed", job.job_id)
            self._finish(job, error=RequestFailedError(f"vLLM could not add the request: "
                                                       f"{type(exc).__name__}: {exc}"))

    def _process(self, outputs) -> None:
        touched: dict[str, dict[str, list[int]]] = {}
        for out in outputs:
            job = self._by_member.get(out.request_id)
            if job is None:
                continue
            new = list(out.outputs[0].token_ids) if out.outputs else []
            touched.setdefault(job.job_id, {})[out.request_id] = new
            job.tokens[out.request_id].extend(new)
            if out.finished:
                job.running.discard(out.request_id)
        for job_id, news in touched.items():
            job = self._jobs.get(job_id)
            if job is None:
                continue
            try:
                if job.guided:
                    self._advance_group(job, news)
                else:
                    self._advance_plain(job, news)
            except Exception as exc:  # noqa: BLE001 - one request's bookkeeping must not stop the loop
                log.exception("request %s failed while processing its tokens", job.job_id)
                self._finish(job, error=RequestFailedError(
                    f"request {job.job_id} failed: {type(exc).__name__}: {exc}"))
        # A group the scheduler or processor failed in a step where it produced nothing.
        if REPORTS:
            for job in [j for j in self._jobs.values() if j.guided and REPORTS.get(j.job_id)]:
                self._finish(job, error=GuidanceGroupError(REPORTS.get(job.job_id)))

    def _advance_plain(self, job: _Job, news: dict[str, list[int]]) -> None:
        for checker, rid in zip(job.checkers, job.member_ids, strict=True):
            if checker.finished:
                continue
            for token in news.get(rid, ()):
                if checker.add(token):
                    break
            if not checker.finished and rid not in job.running:
                checker.finish_reason = "length"     # vLLM ended it (context full)
        if all(c.finished for c in job.checkers):
            self._finish(job)

    def _advance_group(self, job: _Job, news: dict[str, list[int]]) -> None:
        reason = REPORTS.get(job.job_id)
        if reason is not None:
            return self._finish(job, error=GuidanceGroupError(reason))
        positive = job.member_ids[0]
        drawn = news.get(positive, [])
        for rid in job.active:
            if news.get(rid, []) != drawn:
                return self._finish(job, error=GuidanceGroupError(
                    f"guidance group {job.job_id}: member {rid} got {news.get(rid, [])} in a step where the "
                    f"positive got {drawn} (the logits processor refused the group; the node's log says why)"))
        checker = job.checkers[0]
        for token in drawn:
            if checker.add(token):
                break
        if checker.finished:
            return self._finish(job)
        if not set(job.active) <= job.running:
            return self._finish(job, error=GuidanceGroupError(
                f"guidance group {job.job_id}: vLLM finished members {sorted(set(job.active) - job.running)} "
                f"before the positive stopped"))
        interval = job.request.guidance.max_tokens
        if interval is not None and len(job.active) > 1 and len(job.tokens[positive]) >= interval:
            # The guidance interval is over: the negatives carry nothing from here on. Abort them
            # (before the next step) so their rows and KV blocks are free; the positive goes on.
            negatives = job.active[1:]
            self._llm.abort_request(negatives)
            job.running.difference_update(negatives)
            job.active = job.active[:1]

    def _finish(self, job: _Job, error: Exception | None = None, cancelled: bool = False) -> None:
        """Abort what vLLM still runs for ``job`` (before the next step) and answer it."""
        if job.running:
            self._llm.abort_request(sorted(job.running))
            job.running.clear()
        for rid in job.member_ids:
            self._by_member.pop(rid, None)
        self._jobs.pop(job.job_id, None)
        if job.guided:
            REPORTS.discard(job.job_id)
        if cancelled:
            return
        if error is None and job.guided:
            lists = [job.tokens[rid] for rid in job.member_ids]
            if any(t != lists[0][:len(t)] for t in lists[1:]):
                error = GuidanceGroupError(f"guidance group {job.job_id}: members' token ids differ at the end")
        if error is not None:
            if isinstance(error, GuidanceGroupError):
                log.error("request %s failed: %s", job.job_id, error)
            return self._resolve(job, error=error)
        self._resolve(job, result=[c.output() for c in job.checkers])

    def _resolve(self, job: _Job, result=None, error: Exception | None = None) -> None:
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)
        except RuntimeError:        # the caller's event loop is closed: nobody is waiting
            pass


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
