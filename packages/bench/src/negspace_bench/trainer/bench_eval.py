"""``python -m negspace_bench.trainer.bench_eval`` (``make bench-eval``): does the evaluation see what
the data teaches? The same math word problems (generated like ``negspace_mathmc``'s, from another
seed, so none is a test item) are fine-tuned once with their correct answers and once with
corrupted ones (each answer replaced by the wrong-operation result), at the same budget; both
adapters are scored on ``negspace_mathmc`` (log-likelihood multiple choice). The evaluation
discriminates at that budget when the two accuracies differ by more than two stderrs (the
difference's, sqrt(se_a^2 + se_b^2), from lm-eval's per-run stderrs). Each run is one
``negspace_trainer.worker`` job, as the service runs them. The default budget (160 problems, 120
steps of 4, lr 1e-3, all 160 items) is the one that discriminated here (3.2 stderrs; about 40-80
minutes on the 2-core machine, depending on load); 64 problems x 16 steps on 80 items did not
(0.2 stderrs: both adapters stayed at the base model). ``--steps``, ``--records`` and
``--eval-limit`` scale it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from negspace_contracts.trainer import JobRequest
from negspace_servekit.benchdoc import machine_line, publish
from negspace_trainer.local_tasks import TASKS_DIR

TASK = "negspace_mathmc"
TRAIN_SEED = 1013  # not the task's seed: training questions are not test items


def _make_data():
    sys.path.insert(0, str(TASKS_DIR / TASK))
    try:
        import make_data
    finally:
        sys.path.pop(0)
    return make_data


def records(n: int, corrupted: bool) -> list[dict]:
    """``n`` problems with "<answer> <things>." answers; corrupted: the wrong-operation result."""
    md = _make_data()
    rng = random.Random(TRAIN_SEED)
    test_questions = {json.loads(x)["question"] for x in (TASKS_DIR / TASK / "test.jsonl").read_text().splitlines()}
    out: list[dict] = []
    while len(out) < n:
        r = md.item(rng)
        if r["question"] in test_questions:
            continue
        answer = int(r["answer"])
        if corrupted:
            answer = md.compute(md.OTHER_OP[r["op"]], r["a"], r["b"])
            if answer == int(r["answer"]):
                answer += 1
        out.append({"messages": [{"role": "user", "content": f"Question: {r['question']}"},
                                 {"role": "assistant", "content": f"{answer} {r['things']}"}]})
    return out


def run_one(label: str, rows: list[dict], args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"negspace-bench-eval-{label}-") as tmp:
        job_dir = Path(tmp)
        request = JobRequest.model_validate({
            "dataset": {"path": str(job_dir / "dataset.jsonl")}, "method": "lora",
            "lora": {"r": 16, "alpha": 32},
            "training": {"max_steps": args.steps, "batch_size": args.batch_size, "max_length": 96,
                         "learning_rate": args.learning_rate, "seed": 42},
            "eval": {"tasks": [TASK], "limit": args.eval_limit or None, "batch_size": 16},
            "compare_base": args.with_base and label == "correct"})
        (job_dir / "request.json").write_text(request.model_dump_json())
        (job_dir / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        started = time.monotonic()
        print(f"bench-eval: training + evaluating the {label} adapter ({args.steps} steps) ...", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", "negspace_trainer.worker", str(job_dir)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:  # the worker's progress (steps, losses, lm-eval) as it goes
            tail = (tail + [line])[-60:]
            if "] step " in line or "] tuned:" in line or "] base:" in line or "] failed" in line:
                print(f"  {label}: {line.strip()[:160]}", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"{label} run failed:\n{''.join(tail)}")
        m = json.loads((job_dir / "metrics.json").read_text())
        m["wall_s"] = time.monotonic() - started
        return m


def _score(res: dict, which: str) -> tuple[float, float]:
    r = res["eval"][which][TASK]
    return float(r["acc,none"]), float(r["acc_stderr,none"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_bench.trainer.bench_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=160, help="training problems (the same for both adapters)")
    p.add_argument("--steps", type=int, default=120, help="LoRA optimizer steps per adapter")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-limit", type=int, default=0, help=f"{TASK} items (0 = all 160)")
    p.add_argument("--with-base", action="store_true", help="also score the base model")
    p.add_argument("--parallel", action="store_true", help="train and evaluate both adapters at once")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    labels = ("correct", "corrupted")
    if args.parallel:  # two worker processes at once: faster where cores are spare (or shared)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            futures = {label: pool.submit(run_one, label, records(args.records, label == "corrupted"), args)
                       for label in labels}
            results = {label: f.result() for label, f in futures.items()}
    else:
        results = {label: run_one(label, records(args.records, label == "corrupted"), args) for label in labels}
    (acc_c, se_c), (acc_x, se_x) = _score(results["correct"], "tuned"), _score(results["corrupted"], "tuned")
    diff, se = acc_c - acc_x, math.hypot(se_c, se_x)
    verdict = (f"the evaluation discriminates at this budget: {diff:+.3f} is {diff / se:.1f} stderrs"
               if se and abs(diff) > 2 * se else
               f"NOT discriminating at this budget: {diff:+.3f} is {diff / se if se else 0:.1f} stderrs (< 2); "
               "a larger budget (more steps/records) is needed")
    n_items = args.eval_limit or 160
    lines = ["## Evaluation: correct vs corrupted answers (negspace_mathmc)", "",
             f"{machine_line()}. {args.records} one-step math word problems (not test items), LoRA r=16, "
             f"{args.steps} steps, batch {args.batch_size}, lr {args.learning_rate}; once with the correct "
             f"answers, once with each answer replaced by the wrong-operation result; both scored on "
             f"{TASK} ({n_items} items, log-likelihood multiple choice, chance 0.25). 1-min load average "
             f"{load_before:.1f} before.", "",
             "| model | acc | stderr | wall (s) |", "|---|---:|---:|---:|"]
    if args.with_base:
        acc_b, se_b = _score(results["correct"], "base")
        lines.append(f"| base | {acc_b:.4f} | {se_b:.4f} | |")
    lines += [f"| tuned on correct answers | {acc_c:.4f} | {se_c:.4f} | {results['correct']['wall_s']:.0f} |",
              f"| tuned on corrupted answers | {acc_x:.4f} | {se_x:.4f} | {results['corrupted']['wall_s']:.0f} |",
              "", f"Difference {diff:+.4f} +- {se:.4f} (stderr): {verdict}."]
    text = "\n".join(lines)
    publish("eval", text, record=not args.no_record)
    return 0 if se and abs(diff) > 2 * se else 1


if __name__ == "__main__":
    raise SystemExit(main())
