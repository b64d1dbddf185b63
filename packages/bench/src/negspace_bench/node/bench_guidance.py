"""Guidance-processor benchmark: time per decode step, per-group host path vs one batched pass.

    python -m negspace_bench.node.bench_guidance            (make bench-guidance)

Runs the real vLLM V1 logits processor (``CFGLogitsProcessor.apply``, as vLLM calls it once per
step) on synthetic float32 logits: every row belongs to a guided group of 4 (a positive and 3
negatives, min combine, scale 3), at 32 / 128 / 256 rows and vocabularies of 49,152 (SmolLM2)
and 151,936 (Qwen2.5), greedy (temperature 0) and top-p (temperature 1, top_p 0.9, seeded).

- before: ``batched = False``, the former path: per group, the rows copied to the host, combined
  and sampled on the CPU (``legacy_combine`` / ``legacy_sample``, a CPU generator);
- after: ``batched = True`` (the default): combine, temperature / min-p / top-p and the draw for
  all groups of the step in one tensor pass on the logits' device (``guided_batch`` /
  ``sample_batch``, per-group seeded generators on the device), one [G] host read.

On a CPU "host copy" is nearly free, so the figures measure the per-group overhead vs the
batched pass; on a GPU the "before" path also pays a device->host copy of every row per step.
Prints a table and records it as the "guidance" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

ROWS = (32, 128, 256)
VOCABS = (49_152, 151_936)
GROUP = 4


def _setup(rows: int, vocab: int, temperature: float, top_p: float, tag: str, device: str = "cpu"):
    import torch
    from negspace_contracts.node import Guidance
    from negspace_node.engines.base import GenerationRequest
    from negspace_node.engines.vllm.groups import group_args
    from negspace_node.engines.vllm.processor import CFGLogitsProcessor
    from vllm.v1.sample.logits_processor import BatchUpdate

    class _Params:            # what the processor reads from SamplingParams: extra_args only
        def __init__(self, extra):
            self.extra_args = extra

    request = GenerationRequest(prompt_ids=[1], negative_ids=[[1]] * (GROUP - 1), temperature=temperature,
                                top_p=top_p, guidance=Guidance(scale=3.0))
    added = []
    for g in range(rows // GROUP):
        outputs: list[int] = []
        for role in range(GROUP):
            added.append((g * GROUP + role, _Params(group_args(request, f"bench-{tag}-{g}", role, GROUP, g)),
                          [1], outputs))
    proc = CFGLogitsProcessor()          # builds every group's state from the params, as in vLLM
    proc.update_state(BatchUpdate(batch_size=rows, removed=[], moved=[], added=added))
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(device)
    return proc, logits


def _time_apply(proc, logits, batched: bool, min_s: float, max_reps: int) -> float:
    proc.batched = batched
    import torch

    sync = torch.cuda.synchronize if logits.device.type == "cuda" else (lambda: None)
    proc.apply(logits.clone())                         # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_s):
        work = logits.clone()
        sync()
        t0 = time.perf_counter()
        proc.apply(work)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(min_s: float, max_reps: int, device: str = "cpu") -> list[dict]:
    results = []
    for vocab in VOCABS:
        for rows in ROWS:
            for mode, temperature, top_p in (("greedy", 0.0, 1.0), ("top-p 0.9", 1.0, 0.9)):
                proc, logits = _setup(rows, vocab, temperature, top_p, f"{vocab}-{rows}-{mode}", device)
                before = _time_apply(proc, logits, False, min_s, max_reps)
                after = _time_apply(proc, logits, True, min_s, max_reps)
                row = {"vocab": vocab, "rows": rows, "mode": mode, "before_ms": before * 1e3,
                       "after_ms": after * 1e3, "speedup": before / after}
                results.append(row)
                print(f"[bench] vocab {vocab:>7,} rows {rows:>3} {mode:<9}: before {row['before_ms']:8.1f} ms  "
                      f"after {row['after_ms']:8.1f} ms  x{row['speedup']:.2f}", flush=True)
    return results


def run_kernel(min_s: float, max_reps: int, device: str) -> list[dict]:
    """Where vLLM cannot be imported (a GPU machine with torch only): time the batched kernel the
    processor calls, ``sample_batch(guided_batch(...))``, on synthetic logits; without the
    processor's bookkeeping and its force step, so a lower bound on the processor's time."""
    import torch
    from negspace_node.guidance import GroupStep, guided_batch, make_generator, sample_batch

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    results = []
    for vocab in VOCABS:
        for rows in ROWS:
            for mode, temperature, top_p in (("greedy", 0.0, 1.0), ("top-p 0.9", 1.0, 0.9)):
                logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(device)
                steps = [GroupStep(rows=list(range(g * GROUP, (g + 1) * GROUP)), scale=3.0,
                                   temperature=temperature, top_p=top_p,
                                   generator=make_generator(g, device) if temperature > 0 else None)
                         for g in range(rows // GROUP)]
                sample_batch(guided_batch(logits, steps), steps)       # warm-up
                times: list[float] = []
                start = time.perf_counter()
                while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_s):
                    sync()
                    t0 = time.perf_counter()
                    sample_batch(guided_batch(logits, steps), steps)
                    sync()
                    times.append(time.perf_counter() - t0)
                row = {"vocab": vocab, "rows": rows, "mode": mode, "after_ms": statistics.median(times) * 1e3}
                results.append(row)
                print(f"[bench] kernel vocab {vocab:>7,} rows {rows:>3} {mode:<9}: {row['after_ms']:8.2f} ms",
                      flush=True)
    return results


def render_kernel(results: list[dict], device: str) -> str:
    import torch
    from negspace_servekit.benchdoc import machine_line

    name = device.upper() if device == "cpu" else torch.cuda.get_device_name(device)
    lines = ["## Node: guidance kernel alone, time per decode step (`make bench-guidance`, no vLLM)", "",
             f"{machine_line()}; torch {torch.__version__}, float32 logits on {name}; groups of {GROUP} rows "
             "(1 positive + 3 negatives, min, scale 3). vLLM was not importable here, so this times only "
             "the batched kernel the processor calls (`sample_batch(guided_batch(...))`: combine, "
             "temperature / top-p, the seeded draw), not the processor's bookkeeping or its force step: a "
             "lower bound on the processor's time per step. GPU target: 256 rows x 152k under 2 ms.", "",
             "| vocab | rows | groups | mode | ms/step |", "|---:|---:|---:|---|---:|"]
    lines += [f"| {r['vocab']:,} | {r['rows']} | {r['rows'] // GROUP} | {r['mode']} | {r['after_ms']:.2f} |"
              for r in results]
    return "\n".join(lines)


def render(results: list[dict], device: str = "cpu") -> str:
    import torch
    from negspace_servekit.benchdoc import machine_line

    lines = ["## Node: guidance processor, time per decode step (`make bench-guidance`)", "",
             f"{machine_line()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32 "
             f"logits on {device.upper() if device == 'cpu' else torch.cuda.get_device_name(device)}; groups of {GROUP} rows (1 positive + 3 negatives, min, scale 3). Median of "
             "repeated `CFGLogitsProcessor.apply` calls. before = per-group host path (legacy), after = "
             "one batched pass on the logits' device.", "",
             "GPU target (256 rows x 152k vocabulary under 2 ms/step): " + (
                 "measured above." if device != "cpu" else
                 "NOT measured (no GPU in the session that recorded this). Run `make bench-guidance` on a GPU "
                 "machine (`--device cuda` is the default there); without vllm it times the batched kernel "
                 "alone (`--kernel-only`, recorded in its own section)."), "",
             "| vocab | rows | groups | mode | before (ms/step) | after (ms/step) | speed-up |",
             "|---:|---:|---:|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['vocab']:,} | {r['rows']} | {r['rows'] // GROUP} | {r['mode']} | "
                     f"{r['before_ms']:.1f} | {r['after_ms']:.1f} | x{r['speedup']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m negspace_bench.node.bench_guidance",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time at least this long per cell")
    parser.add_argument("--max-reps", type=int, default=20)
    parser.add_argument("--device", default=None, help="where the logits live (default: cuda when available)")
    parser.add_argument("--kernel-only", action="store_true",
                        help="time only the batched kernel (automatic when vllm is not importable)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")        # a shared machine: see bench.py
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    import importlib.util

    kernel = args.kernel_only or importlib.util.find_spec("vllm") is None
    if kernel:
        markdown = render_kernel(run_kernel(args.min_seconds, args.max_reps, device), device)
    else:
        markdown = render(run(args.min_seconds, args.max_reps, device), device)
    from negspace_servekit.benchdoc import publish

    section = "guidance-kernel-" + ("cpu" if device == "cpu" else "gpu") if kernel else "guidance"
    publish(section, markdown, record=not args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
