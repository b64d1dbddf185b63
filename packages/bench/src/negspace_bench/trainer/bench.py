"""``python -m negspace_bench.trainer.bench`` (``make bench-trainer``): LoRA vs full fine-tuning on the
bundled model on this machine: training throughput (non-padding tokens/s, TRL's ``num_tokens``
over the train runtime) and peak memory (worker RSS; GPU peak on a GPU). Each method runs in its
own worker process (the same ``negspace_trainer.worker`` jobs use) so peaks do not mix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from negspace_contracts.trainer import JobRequest
from negspace_servekit.benchdoc import machine_line, publish
from negspace_trainer.local_tasks import TASKS_DIR


def _records() -> list[dict]:
    rows = []
    for name in ("fewshot.jsonl", "test.jsonl"):
        rows += [json.loads(line) for line in (TASKS_DIR / "negspace_arith" / name).read_text().splitlines() if line.strip()]
    return [{"messages": [{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": f"The answer is {r['answer']}."}]} for r in rows]


def run_one(method: str, steps: int, batch_size: int, max_length: int, base_model: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"negspace-bench-{method}-") as tmp:
        job_dir = Path(tmp)
        request = JobRequest.model_validate({
            "dataset": {"path": str(job_dir / "dataset.jsonl")}, "method": method, "base_model": base_model,
            "training": {"max_steps": steps, "batch_size": batch_size, "max_length": max_length,
                         "learning_rate": 2e-4 if method == "lora" else 2e-5}})
        (job_dir / "request.json").write_text(request.model_dump_json())
        (job_dir / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        proc = subprocess.run([sys.executable, "-m", "negspace_trainer.worker", str(job_dir)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads((job_dir / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m negspace_bench.trainer.bench", description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    load_before = os.getloadavg()[0]
    for method in ("lora", "full"):
        m = run_one(method, args.steps, args.batch_size, args.max_length, args.base_model)
        rows.append(m)
        print(f"{method}: {m['tokens_per_second']:.0f} tokens/s, peak RSS {m['peak_rss_mb']:.0f} MiB, "
              f"{m['trainable_params']:,} trainable params, {m['train_runtime_s']:.1f} s", flush=True)
    lora, full = rows
    load_after = os.getloadavg()[0]
    # Before the bench the load is other processes'; after, it includes the bench's own workers.
    load_note = ("other processes shared the CPU: the figures are low and noisy"
                 if load_before > 0.5 else "the machine was otherwise idle")
    gpu = "peak_gpu_mem_mb" in lora
    lines = [
        "## Trainer: LoRA vs full fine-tuning (bundled SmolLM2-135M-Instruct)", "",
        f"{machine_line()}; device {lora['device']}. {args.steps} optimizer steps, batch {args.batch_size}, "
        f"max_length {args.max_length}, short arithmetic chat records; throughput counts non-padding "
        "tokens (TRL `num_tokens`) over the train runtime; memory is the worker process's peak RSS"
        + (" and peak GPU memory allocated." if gpu else ".")
        + f" 1-min load average {load_before:.1f} before, {load_after:.1f} after ({load_note}).", "",
        "| method | trainable params | tokens/s | train time (s) | peak RSS (MiB) |" + (" peak GPU (MiB) |" if gpu else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if gpu else ""),
    ]
    for m in rows:
        lines.append(f"| {m['method']} | {m['trainable_params']:,} | {m['tokens_per_second']:.0f} | "
                     f"{m['train_runtime_s']:.1f} | {m['peak_rss_mb']:.0f} |"
                     + (f" {m['peak_gpu_mem_mb']:.0f} |" if gpu else ""))
    lines += ["", f"LoRA / full throughput: {lora['tokens_per_second'] / full['tokens_per_second']:.2f}x; "
              f"peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x."]
    text = "\n".join(lines)
    publish("trainer", text, record=not args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
