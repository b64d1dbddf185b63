"""Node benchmark: the vLLM engine's plain vs guided speed, concurrency, and the naive loop.

    python -m negspace_bench.node.bench            (make bench-node)

On the bundled SmolLM2-135M-Instruct (float32), every request generates exactly ``--tokens``
tokens (end-of-sequence is ignored: the engines' stop checkers get no EOS ids and vLLM's
members already run with ignore_eos), so token counts are fixed and rates comparable. Measured
in ONE run, in this order:

1. the naive reference loop (``engines/reference.py``: every branch recomputed from scratch each
   step) with 3 negatives, and the KV-cached transformers engine, before vLLM starts (vLLM
   lowers torch's thread count for the process);
2. the vLLM engine: plain generation, guided with 1, 3 and 8 negatives (one request at a time);
3. the vLLM engine: 1, 4 and 8 concurrent guided requests (1 and 3 negatives each), aggregate
   tokens/s, and 1 vs 8 concurrent plain requests as a control.

Prints a table and records it as the "node" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time

TARGETS = {"guided3_vs_plain": 0.6, "concurrency8_vs_1": 3.0, "speedup_vs_naive": 10.0}
TOPICS = ["the ocean", "volcanoes", "bees", "chess", "rain", "bridges", "music", "the moon"]
NEGATIVE_TEXTS = [
    "Write one short question about fish.",
    "Write one short question about ships and sailors.",
    "Ask about the weather tomorrow.",
    "Write a riddle about numbers.",
    "Describe a forest in one sentence.",
    "Write one short question about cooking pasta.",
    "Name a famous painter.",
    "Write a haiku about winter.",
]


def _chat(tokenizer, text: str) -> list[int]:
    from negspace_node.testing import chat_ids

    return chat_ids(tokenizer, text)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_reference(tokens: int, negatives: int):
    """Naive loop and transformers engine, float32, generating exactly ``tokens`` tokens."""
    import torch
    from negspace_contracts.node import Guidance
    from negspace_models import resolve_model
    from negspace_node.engines.base import GenerationRequest
    from negspace_node.engines.reference import reference_generate
    from negspace_node.engines.transformers import generate_batched, load_model

    # One torch thread, as vLLM's CPU worker uses for serving: the same compute for both, and no
    # OpenMP spin-wait collapse on a shared 2-core machine (seen: 2 threads were ~10x slower).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_model(resolve_model("").path, "float32", device="cpu")
    request = GenerationRequest(prompt_ids=_chat(tokenizer, f"Write one short question about {TOPICS[0]}."),
                                negative_ids=[_chat(tokenizer, t) for t in NEGATIVE_TEXTS[:negatives]],
                                max_tokens=tokens, temperature=0.0, guidance=Guidance(scale=3.0))
    no_eos = frozenset()
    generate_batched(model, tokenizer, GenerationRequest(**{**request.__dict__, "max_tokens": 4}), eos_ids=no_eos)
    out_naive, naive_s = _timed(reference_generate, model, tokenizer, request, eos_ids=no_eos)
    outs_tf, tf_s = _timed(generate_batched, model, tokenizer, request, eos_ids=no_eos)
    out_tf = outs_tf[0]
    assert len(out_naive.token_ids) == len(out_tf.token_ids) == tokens
    same = out_naive.token_ids == out_tf.token_ids
    threads = torch.get_num_threads()
    torch.set_num_threads(previous)
    return {"load": " / ".join(f"{x:.1f}" for x in os.getloadavg()), "naive_s": naive_s, "transformers_s": tf_s, "tokens": tokens, "naive_tokens": out_naive.token_ids,
            "naive_equals_transformers": same, "torch_threads": threads}


async def bench_vllm(tokens: int, kv_gib: float, concurrency_tokens: int):
    from negspace_contracts.node import Guidance
    from negspace_node.engines.base import GenerationRequest
    from negspace_node.engines.vllm.engine import VLLMEngine
    from negspace_node.settings import NodeSettings

    settings = NodeSettings(dtype="float32", max_model_len=1024, max_num_seqs=40, kv_cache_gib=kv_gib, seed=0)
    engine = VLLMEngine(settings)
    start = time.perf_counter()
    await engine.start()
    if engine.state != "ready":
        raise SystemExit(f"vLLM engine did not start: {engine.error}")
    startup_s = time.perf_counter() - start
    engine._eos = frozenset()          # fixed-length generations: the stop checkers ignore EOS
    tok = engine.tokenizer
    prompts = [_chat(tok, f"Write one short question about {t}.") for t in TOPICS]
    negs = [_chat(tok, t) for t in NEGATIVE_TEXTS]

    def request(i: int, negatives: int, max_tokens: int = tokens) -> GenerationRequest:
        return GenerationRequest(prompt_ids=prompts[i % len(prompts)], negative_ids=negs[:negatives],
                                 max_tokens=max_tokens, temperature=0.0, guidance=Guidance(scale=3.0 if negatives else 1.0))

    def note(key: str) -> None:
        print(f"[bench] {key}: {results[key]:.1f} tokens/s", flush=True)

    async def rate(requests, repeats: int = 2) -> tuple[float, list]:
        best, outs = 0.0, []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(engine.generate(r) for r in requests))
            elapsed = time.perf_counter() - t0
            count = sum(len(o[0].token_ids) for o in outs)
            best = max(best, count / elapsed)
        return best, outs

    results: dict = {"startup_s": startup_s, "concurrency_tokens": concurrency_tokens}
    try:
        await rate([request(0, 3)], repeats=1)                      # warm-up
        results["plain"], _ = await rate([request(0, 0)])
        note("plain")
        for n in (1, 3, 8):
            results[f"guided{n}"], outs = await rate([request(0, n)])
            note(f"guided{n}")
            if n == 3:
                results["guided3_tokens"] = outs[0][0].token_ids
                results["guided3_s"] = tokens / results["guided3"]
        for negatives in (1, 3):
            for c in (1, 4, 8):
                key = f"concurrent{c}_{negatives}"
                results[key], _ = await rate([request(i, negatives, concurrency_tokens) for i in range(c)], 1)
                note(key)
        for c in (1, 8):       # control: the same concurrency without guidance
            results[f"concurrent{c}_plain"], _ = await rate([request(i, 0, concurrency_tokens) for i in range(c)], 1)
            note(f"concurrent{c}_plain")
        results["steps"] = engine.steps
    finally:
        await engine.stop()
    return results


def render(ref: dict, v: dict, tokens: int) -> tuple[str, dict]:
    ratios = {
        "guided3_vs_plain": v["guided3"] / v["plain"],
        "concurrency8_vs_1": v["concurrent8_1"] / v["concurrent1_1"],
        "concurrency8_vs_1_neg3": v["concurrent8_3"] / v["concurrent1_3"],
        "concurrency8_vs_1_plain": v["concurrent8_plain"] / v["concurrent1_plain"],
        "speedup_vs_naive": ref["naive_s"] / v["guided3_s"],
    }

    def met(key: str) -> str:
        return "met" if ratios[key] >= TARGETS[key] else "NOT met"

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average {ref['load']} at the start and "
        f"{load} at the end (1/5/15 min), shared with other jobs while measured "
        f"(other helpers were loading the CPU: absolute figures are noisy, ratios are from this one run). "
        f"Bundled SmolLM2-135M-Instruct, float32, vLLM CPU engine (in-process, chunked prefill off, "
        f"gang scheduler + CFG logits processor), greedy, guidance scale 3, exactly {tokens} tokens per "
        f"request ({v['concurrency_tokens']} per request in the concurrency rows), EOS ignored. Single-request "
        f"rates are the best of 2 runs, concurrency rates one run each.",
        "",
        "| measurement | tokens/s |",
        "|---|---|",
        f"| vLLM plain (1 request) | {v['plain']:.1f} |",
        f"| vLLM guided, 1 negative | {v['guided1']:.1f} |",
        f"| vLLM guided, 3 negatives | {v['guided3']:.1f} |",
        f"| vLLM guided, 8 negatives | {v['guided8']:.1f} |",
        *(f"| vLLM {c} concurrent guided request{'s' if c > 1 else ''} ({n} negative{'s' if n > 1 else ''}), "
          f"aggregate | {v[f'concurrent{c}_{n}']:.1f} |" for n in (1, 3) for c in (1, 4, 8)),
        *(f"| vLLM {c} concurrent plain request{'s' if c > 1 else ''} (control), aggregate | "
          f"{v[f'concurrent{c}_plain']:.1f} |" for c in (1, 8)),
        f"| naive recompute loop, 3 negatives ({ref['torch_threads']} torch thread(s)) | {tokens / ref['naive_s']:.1f} |",
        f"| transformers engine (KV cache, padded batch), 3 negatives | {tokens / ref['transformers_s']:.1f} |",
        "",
        "| target | measured | target | |",
        "|---|---|---|---|",
        f"| guided (3 negatives) / plain | {ratios['guided3_vs_plain']:.2f}x | >= 0.6x | {met('guided3_vs_plain')} |",
        f"| 8 concurrent / 1 guided, 1 negative (aggregate tokens/s) | {ratios['concurrency8_vs_1']:.2f}x | >= 3x "
        f"| {met('concurrency8_vs_1')} |",
        f"| 8 concurrent / 1 guided, 3 negatives (aggregate tokens/s) | {ratios['concurrency8_vs_1_neg3']:.2f}x "
        f"| >= 3x | {'met' if ratios['concurrency8_vs_1_neg3'] >= 3 else 'NOT met'} |",
        f"| (control) 8 concurrent / 1 plain | {ratios['concurrency8_vs_1_plain']:.2f}x | | |",
        f"| vLLM guided vs naive loop, 3 negatives, {tokens} tokens (wall time) | {ratios['speedup_vs_naive']:.1f}x "
        f"| >= 10x | {met('speedup_vs_naive')} |",
        "",
        f"The naive loop ({ref['naive_s']:.1f} s) and the vLLM engine ({v['guided3_s']:.2f} s) generated the same "
        f"{tokens} tokens: {'yes' if ref['naive_tokens'] == v['guided3_tokens'] else 'NO'}; naive loop = "
        f"transformers engine: {'yes' if ref['naive_equals_transformers'] else 'NO'}. vLLM start-up "
        f"{v['startup_s']:.0f} s. The naive loop and transformers engine ran before vLLM started "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} for all engines).",
    ]
    return "\n".join(lines), ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m negspace_bench.node.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request (fixed, EOS ignored)")
    parser.add_argument("--concurrency-tokens", type=int, default=32,
                        help="tokens per request in the 1/4/8-concurrent measurements")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One OpenMP thread for every engine (before torch loads): on a shared 2-core machine two
    # spinning OpenMP threads per process collapsed throughput (seen: 10-20x slower).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    print(f"[bench] naive loop and transformers engine, 3 negatives, {args.tokens} tokens ...", flush=True)
    ref = bench_reference(args.tokens, 3)
    print(f"[bench] naive {ref['naive_s']:.1f} s, transformers {ref['transformers_s']:.1f} s", flush=True)
    print("[bench] vLLM engine ...", flush=True)
    v = asyncio.run(bench_vllm(args.tokens, args.kv_cache_gib, args.concurrency_tokens))
    markdown, ratios = render(ref, v, args.tokens)
    from negspace_servekit.benchdoc import publish

    publish("node", markdown, record=not args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
