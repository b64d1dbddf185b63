"""The transformers engine: the exact reference implementation and the CPU/GPU fallback.

One request is decoded as ONE left-padded batch: the positive prompt and its negatives (or,
for plain sampling with ``n > 1``, ``n`` copies of the positive) with an attention mask,
explicit ``position_ids`` and a KV cache, so every decoding step is one forward pass over
all rows. The guidance math is ``negspace_node.guidance`` (shared with every engine); the
sampled token is appended to every row of its group. Finished groups are dropped from the
batch (and from the cache).

Requests run one at a time in a single worker thread, so the event loop stays free to answer
/health, /metrics and back-pressure while the model computes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from negspace_models import resolve_model, served_model_name

from negspace_node.dtype import resolve_dtype
from negspace_node.engines.base import (
    Engine,
    EngineError,
    GenerationOutput,
    GenerationRequest,
    RequestFailedError,
    TextSink,
)
from negspace_node.engines.stopping import StopChecker, eos_token_ids
from negspace_node.guidance import guided_batch, make_generator, request_step, sample_batch

log = logging.getLogger("negspace.node")


class GenerationCancelled(Exception):
    """The caller went away; the worker stopped decoding for it."""


def torch_dtype(name: str, device: str, path: str = "") -> torch.dtype | str:
    """``auto``: the checkpoint's dtype on GPU; on CPU the rule in ``negspace_node.dtype`` (bfloat16
    with bf16 units and bf16 weights, else float32)."""
    name = resolve_dtype(name, path, on_cpu=device == "cpu")
    if name == "auto":
        return "auto"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(path: str, dtype: str = "auto", device: str | None = None):
    """Load a causal LM and its tokenizer (hub id or local folder); eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, device, path))
    model.to(device).eval()
    return model, tokenizer


@dataclass
class _Group:
    rows: list[int]                 # row indices in the current batch: [positive, *negatives]
    checker: StopChecker
    generator: torch.Generator
    guided: bool
    tokens: list[int] = field(default_factory=list)


def _pad_id(tokenizer, model) -> int:
    for value in (tokenizer.pad_token_id, getattr(model.generation_config, "pad_token_id", None),
                  tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


@torch.inference_mode()
def generate_batched(model, tokenizer, request: GenerationRequest, *, eos_ids=None,
                     cancel: threading.Event | None = None, on_text: TextSink | None = None) -> list[GenerationOutput]:
    """Decode ``request`` as one padded, KV-cached batch; return ``request.n`` outputs
    (``on_text``: see ``TextSink``, called from this thread)."""
    from transformers import DynamicCache

    device = model.device
    if eos_ids is None:
        eos_ids = eos_token_ids(tokenizer, model.config, model.generation_config)
    guided = request.guided
    prompts: list[list[int]] = []
    groups: list[_Group] = []
    for choice in range(1 if guided else request.n):
        members = [request.prompt_ids, *request.negative_ids] if guided else [request.prompt_ids]
        rows = list(range(len(prompts), len(prompts) + len(members)))
        prompts.extend(list(m) for m in members)
        seed = None if request.seed is None else request.seed + choice
        checker = StopChecker(tokenizer, eos_ids, request.stop, request.max_tokens, len(request.prompt_ids),
                              on_text=None if on_text is None else functools.partial(on_text, choice))
        groups.append(_Group(rows, checker, make_generator(seed, device), guided))

    width = max(len(p) for p in prompts)
    pad = _pad_id(tokenizer, model)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)

    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    active = list(groups)
    position = 0                        # completion position being decoded (same for all groups)
    while True:
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled()
        logits = out.logits[:, -1, :]
        guide_now = request.guides_at(position)
        steps = [request_step(request, g.rows, g.guided and guide_now, g.generator) for g in active]
        try:          # every group of the step in one batched pass on the device, one host read
            tokens, ok = sample_batch(guided_batch(logits, steps), steps)
            step_tokens, ok = tokens.tolist(), ok.tolist()
        except Exception as exc:  # noqa: BLE001 - this request's draw, not the engine, failed
            raise RequestFailedError(f"drawing token {position} failed: {type(exc).__name__}: {exc}") from exc
        if not all(ok):
            raise RequestFailedError(f"drawing token {position} failed: no token has a finite score")
        for g, token in zip(active, step_tokens, strict=True):
            g.checker.add(token)
        position += 1
        # Past the guidance interval the negatives carry nothing: their rows leave the batch too.
        interval_over = guided and position == request.guidance.max_tokens
        still = [i for i, g in enumerate(active) if not g.checker.finished]
        if not still:
            break
        if interval_over:
            for g in active:
                g.rows, g.guided = g.rows[:1], False
        if len(still) < len(active) or interval_over:   # drop finished groups' rows from batch and cache
            keep_rows = [r for i in still for r in active[i].rows]
            index = torch.tensor(keep_rows, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask = mask.index_select(0, index)
            renumbered, start = [], 0
            for i in still:
                size = len(active[i].rows)
                active[i].rows = list(range(start, start + size))
                start += size
                renumbered.append(active[i])
            step_tokens = [step_tokens[i] for i in still]
            active = renumbered
        next_ids = torch.tensor([[t] for g, t in zip(active, step_tokens, strict=True) for _ in g.rows],
                                dtype=torch.long, device=device)
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
        positions = (mask.sum(-1, keepdim=True) - 1)
        out = model(input_ids=next_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [g.checker.output() for g in groups]


class TransformersEngine(Engine):
    """Hugging Face transformers, one request at a time in a worker thread.

    ``model`` and ``tokenizer`` may be given already loaded (tests share one per module);
    otherwise ``start()`` resolves ``settings.model`` and loads it with ``settings.dtype``.
    """

    name = "transformers"

    def __init__(self, settings, *, model=None, tokenizer=None) -> None:
        super().__init__()
        self.settings = settings
        self._model = model
        self._tokenizer = tokenizer
        self._name = served_model_name(settings.model, settings.served_model_name)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="negspace-transformers")
        self._in_flight = 0
        self._eos: frozenset[int] = frozenset()
        self._max_len = settings.max_model_len

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            if self._model is None or self._tokenizer is None:
                self.status_detail = f"resolving model {self.settings.model or 'bundled'!r}"
                resolved = await asyncio.to_thread(resolve_model, self.settings.model)
                self.status_detail = f"loading {resolved.path} ({self.settings.dtype})"
                log.info("transformers engine: %s", self.status_detail)
                self._model, self._tokenizer = await asyncio.to_thread(load_model, resolved.path,
                                                                       self.settings.dtype)
            model = self._model
            self._eos = eos_token_ids(self._tokenizer, model.config, model.generation_config)
            limit = getattr(model.config, "max_position_embeddings", None)
            self._max_len = min(self.settings.max_model_len, limit) if limit else self.settings.max_model_len
            self.state, self.status_detail = "ready", None
            log.info("transformers engine ready: %s on %s, %s, context %d", self._name, model.device,
                     model.dtype, self._max_len)
        except Exception as exc:  # noqa: BLE001 - the reason goes to /health
            log.exception("transformers engine failed to start")
            self.fail(f"could not load model {self.settings.model or 'bundled'!r}: {type(exc).__name__}: {exc}")

    async def stop(self) -> None:
        await super().stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def generate(self, request: GenerationRequest, *, on_text: TextSink | None = None) -> list[GenerationOutput]:
        self.ensure_ready()
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        try:
            future = loop.run_in_executor(self._executor, self._run, request, cancel, on_text)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                cancel.set()       # the client went away: the worker stops at its next step
                raise
        finally:
            self._in_flight -= 1

    def _run(self, request: GenerationRequest, cancel: threading.Event,
             on_text: TextSink | None = None) -> list[GenerationOutput]:
        if cancel.is_set():
            raise GenerationCancelled()
        if self.state != "ready":
            raise EngineError(f"engine {self.name} is {self.state}: {self.error or ''}")
        return generate_batched(self._model, self._tokenizer, request, eos_ids=self._eos, cancel=cancel,
                                on_text=on_text)
