"""Which dtype the node's ``auto`` should pick on CPU: the vLLM engine in float32 vs bfloat16.

    python -m negspace_bench.node.bench_dtype                       (make bench-dtype)
    python -m negspace_bench.node.bench_dtype --models smollm2-135m --dtypes float32,bfloat16

For each model x dtype, in its own process (one vLLM engine per process, started and stopped;
``--passes 2`` measures each model's dtypes twice in A-B-B-A order, against drifting load):
16 concurrent plain chat requests of exactly ``--tokens`` tokens, then 4 concurrent guided
requests with 3 negatives of ``--guided-tokens`` tokens (EOS ignored, greedy, guidance scale 3),
aggregate tokens/s, best of ``--repeats``. Prints a table per model and records it as the
"node-dtype-MODEL" section of docs/benchmarks.md (one per model, so measuring one model keeps the
other's figures), with the CPU's bf16 flags (the rule in ``negspace_node.dtype``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

from negspace_bench.node.bench import NEGATIVE_TEXTS, TOPICS, _chat


async def measure(model: str, dtype: str, tokens: int, guided_tokens: int, repeats: int, kv_gib: float) -> dict:
    from negspace_node.engines.base import GenerationRequest
    from negspace_node.engines.vllm.engine import VLLMEngine
    from negspace_node.settings import NodeSettings

    settings = NodeSettings(model=model, dtype=dtype, max_model_len=1024, max_num_seqs=40, kv_cache_gib=kv_gib,
                            seed=0)
    engine = VLLMEngine(settings)
    started = time.perf_counter()
    await engine.start()
    if engine.state != "ready":
        raise SystemExit(f"vLLM engine did not start: {engine.error}")
    out = {"model": model, "dtype": dtype, "startup_s": time.perf_counter() - started,
           "load_start": os.getloadavg()[0]}
    engine._eos = frozenset()          # fixed-length generations: the stop checkers ignore EOS
    tok = engine.tokenizer
    prompts = [_chat(tok, f"Write one short question about {t}.") for t in TOPICS]
    negs = [_chat(tok, t) for t in NEGATIVE_TEXTS]

    def request(i: int, negatives: int, max_tokens: int) -> GenerationRequest:
        return GenerationRequest(prompt_ids=prompts[i % len(prompts)], negative_ids=negs[i % 5:i % 5 + negatives],
                                 max_tokens=max_tokens, temperature=0.0, guidance_scale=3.0 if negatives else 1.0)

    async def rate(requests) -> float:
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(engine.generate(r) for r in requests))
            best = max(best, sum(len(o[0].token_ids) for o in outs) / (time.perf_counter() - t0))
        return best

    try:
        await rate([request(0, 3, 4)])                                      # warm-up
        out["plain16"] = await rate([request(i, 0, tokens) for i in range(16)])
        out["guided4x3"] = await rate([request(i, 3, guided_tokens) for i in range(4)])
        greedy = await engine.generate(request(0, 0, 24))
        out["sample"] = tok.decode(greedy[0].token_ids, skip_special_tokens=True)
    finally:
        await engine.stop()
    out["load_end"] = os.getloadavg()[0]
    return out


def render(rows: list[dict], flags: list[str], tokens: int, guided_tokens: int, repeats: int) -> str:
    lines = [
        f"CPU bf16 units: {', '.join(flags) or 'none'}. vLLM CPU engine, in-process, one engine per process; "
        f"16 concurrent plain chat requests of exactly {tokens} tokens, and 4 concurrent guided requests with "
        f"3 negatives of {guided_tokens} tokens (greedy, scale 3, EOS ignored); aggregate tokens/s, best of "
        f"{repeats}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}. The machine is shared (load average at each start and end in the table): compare rows of "
        "one model, measured minutes apart.",
        "",
        "| model | dtype | plain, 16 concurrent | guided 3 negatives, 4 concurrent | engine start | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['plain16']:.1f} | {r['guided4x3']:.1f} | "
                     f"{r['startup_s']:.0f} s | {r['load_start']:.1f} -> {r['load_end']:.1f} |")
    lines.append("")
    by_dtype: dict[str, list[dict]] = {}
    for r in rows:
        by_dtype.setdefault(r["dtype"], []).append(r)
    if "bfloat16" in by_dtype and "float32" in by_dtype:
        def ratio(key: str) -> float:  # bfloat16's mean over float32's, each over its passes
            return (sum(r[key] for r in by_dtype["bfloat16"]) / len(by_dtype["bfloat16"])
                    / (sum(r[key] for r in by_dtype["float32"]) / len(by_dtype["float32"])))

        lines.append(f"- {rows[0]['model']}: bfloat16 / float32 = {ratio('plain16'):.2f}x plain, "
                     f"{ratio('guided4x3'):.2f}x guided (means over {len(by_dtype['float32'])} pass(es)).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m negspace_bench.node.bench_dtype", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-1.5b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--guided-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--passes", type=int, default=1, help="measure each model's dtypes this often (A-B-B-A)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One OpenMP thread, as in bench-node: on a shared 2-core machine spinning OpenMP threads collapse
    # throughput, which would swamp the dtype difference being measured.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.one:
        result = asyncio.run(measure(*args.one, args.tokens, args.guided_tokens, args.repeats, args.kv_cache_gib))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    from negspace_node.dtype import cpu_bf16_flags
    from negspace_servekit.benchdoc import log, publish

    for model in args.models.split(","):
        rows = []
        dtypes = args.dtypes.split(",")
        for dtype in [d for p in range(args.passes) for d in (dtypes if p % 2 == 0 else dtypes[::-1])]:
            log(f"{model} {dtype} ...")
            cmd = [sys.executable, "-m", "negspace_bench.node.bench_dtype", "--one", model, dtype, "--tokens",
                   str(args.tokens), "--guided-tokens", str(args.guided_tokens), "--repeats", str(args.repeats),
                   "--kv-cache-gib", str(args.kv_cache_gib)]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)    # the engine's log stays visible
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not found:
                raise SystemExit(f"{model} {dtype} failed (exit code {done.returncode}; its log is above)")
            rows.append(json.loads(found[-1][7:]))
            r = rows[-1]
            log(f"{model} {dtype}: plain {r['plain16']:.1f}, guided {r['guided4x3']:.1f} tokens/s, "
                f"start {r['startup_s']:.0f} s; sample: {r['sample']!r}")
        publish(f"node-dtype-{model}", render(rows, cpu_bf16_flags(), args.tokens, args.guided_tokens,
                                              args.repeats), record=not args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
