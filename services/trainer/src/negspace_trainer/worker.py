"""One job in its own process: ``python -m negspace_trainer.worker JOB_DIR``.

The service writes ``JOB_DIR/request.json`` (and ``dataset.jsonl`` for inline and file datasets)
and polls the files this process writes:

- ``progress.json``  stage, step, total_steps, losses (rewritten atomically as training runs)
- ``result.json``    ``{"eval": {"tuned": ..., "base": ...}, "metrics": ...}`` on success
- ``error.json``     ``{"error": "..."}`` when the job fails for a reason the worker can name
- ``adapter/`` (LoRA) or ``model/`` (full), ``metrics.json``: the artifacts

stdout/stderr go to ``JOB_DIR/worker.log`` (the service redirects them).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from negspace_contracts.trainer import ChatRecord, JobRequest

from negspace_trainer import local_tasks


class JobError(Exception):
    """A failure the job's owner can act on; its message becomes the job's ``error``."""


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, default=str, allow_nan=False))
    tmp.replace(path)


def _log(message: str) -> None:
    print(f"[negspace trainer {time.strftime('%H:%M:%S')}] {message}", flush=True)


def json_safe(value: Any) -> Any:
    """lm-eval's results as they are, except non-finite floats (JSON has no NaN) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:  # numpy scalars
        return json_safe(value.item())
    except AttributeError:
        return str(value)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class Progress:
    def __init__(self, job_dir: Path) -> None:
        self.path = job_dir / "progress.json"
        self.state: dict[str, Any] = {"stage": "starting", "step": 0, "total_steps": None, "losses": []}
        self.flush()

    def update(self, **fields: Any) -> None:
        self.state.update(fields)
        self.flush()

    def loss(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.state["losses"].append({"step": step, "loss": loss})
        self.flush()

    def flush(self) -> None:
        _write_json(self.path, self.state)


# -- dataset ------------------------------------------------------------------------------------

def _parse_jsonl(lines: list[str], source: str) -> list[dict]:
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = ChatRecord.model_validate_json(line)
        except ValueError as exc:
            first = str(exc).splitlines()
            detail = "; ".join(s.strip() for s in first[1:3]) or str(exc)
            raise JobError(f"dataset {source}, line {number}: not a chat record "
                           f'{{"messages": [{{"role", "content"}}, ...]}} ({detail})') from None
        records.append(record.model_dump())
    if not records:
        raise JobError(f"dataset {source} has no records: it needs at least one "
                       '{"messages": [...]} line')
    return records


def load_records(job_dir: Path, request: JobRequest) -> list[dict]:
    """The job's ``dataset.jsonl`` (inline records, a checked file, or a run's Q/A dataset, all
    written by the service), or the http(s) URL the service checked against
    ``--dataset-url-prefixes``. Redirects are not followed: they could lead outside the prefixes."""
    local = job_dir / "dataset.jsonl"
    if local.is_file():
        return _parse_jsonl(local.read_text().splitlines(), "dataset.jsonl")
    source = request.dataset.path
    if source is None or not source.startswith(("http://", "https://")):
        raise JobError("the job has no dataset file (the service did not write dataset.jsonl)")
    import httpx

    try:
        response = httpx.get(source, timeout=60.0, follow_redirects=False)
        if response.is_redirect:
            raise JobError(f"dataset URL {source} redirects to {response.headers.get('location')!r}; the "
                           "trainer does not follow redirects (they could leave its "
                           "--dataset-url-prefixes): give the final URL")
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise JobError(f"cannot download dataset {source}: {exc}") from None
    return _parse_jsonl(response.text.splitlines(), source)


# -- evaluation ---------------------------------------------------------------------------------

def checked_include_path(include_path: str) -> Path:
    """The service checked ``eval.include_path`` at POST /jobs; checked again here against the
    folders it allows now (``--task-dirs`` may have changed across a restart, or a symlink been
    swapped since), because lm-eval imports Python from there."""
    from negspace_contracts.errors import BadRequestError

    from negspace_trainer.sources import TASK_DIRS_ENV, check_include_path

    allowed = [Path(d) for d in os.environ.get(TASK_DIRS_ENV, "").split(os.pathsep) if d]
    if not allowed:
        raise JobError(f"eval.include_path {include_path!r}: the worker was started without "
                       f"{TASK_DIRS_ENV} (the folders it may load task YAML from), so it loads none")
    try:
        return check_include_path(include_path, [d.resolve() for d in allowed])
    except BadRequestError as exc:
        raise JobError(exc.message) from None


def task_manager(job_dir: Path, request: JobRequest):
    """lm-eval's TaskManager over its own tasks, the shipped local ones and the job's include_path;
    unknown task names fail here, before any training."""
    from lm_eval.tasks import TaskManager

    include = [str(local_tasks.materialize(job_dir / "tasks"))]
    if request.eval and request.eval.include_path:
        include.append(str(checked_include_path(request.eval.include_path)))
    manager = TaskManager(include_path=include)
    if request.eval:
        known = set(manager.all_tasks)
        unknown = [t for t in request.eval.tasks if t not in known]
        if unknown:
            raise JobError(f"unknown eval task(s) {', '.join(unknown)}: lm-eval knows no such task. "
                           f"Local tasks shipped (offline): {', '.join(local_tasks.shipped_task_names())}; "
                           "hub tasks such as tinyGSM8k or gsm8k work where their data is reachable; "
                           "or pass eval.include_path with your own task YAML")
    return manager


def evaluate(request: JobRequest, manager, model_args: dict[str, Any], device: str) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    spec = request.eval
    assert spec is not None
    out = simple_evaluate(model="hf", model_args=model_args, tasks=list(spec.tasks),
                          num_fewshot=spec.num_fewshot, limit=spec.limit, batch_size=spec.batch_size,
                          device=device, task_manager=manager, log_samples=False,
                          random_seed=request.training.seed)
    if out is None:
        raise JobError("lm-eval returned no results")
    return json_safe(out["results"])


# -- training -----------------------------------------------------------------------------------

def train(job_dir: Path, request: JobRequest, records: list[dict], base_path: str,
          progress: Progress, device: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t = request.training
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # fp32 weights on CPU (bf16 training on CPU is slow and lossy); bf16 on a GPU that has it.
    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)

    peft_config = None
    if request.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=request.lora.r, lora_alpha=request.lora.alpha,
                                 lora_dropout=request.lora.dropout,
                                 target_modules=list(request.lora.target_modules), task_type="CAUSAL_LM")

    config = SFTConfig(
        output_dir=str(job_dir / "checkpoints"),
        num_train_epochs=t.epochs, learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation,
        max_steps=t.max_steps, max_length=t.max_length, seed=t.seed, data_seed=t.seed,
        use_cpu=device == "cpu", bf16=use_bf16, report_to=[], logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)

    class _ProgressCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            progress.update(stage="training", step=0, total_steps=state.max_steps)

        def on_step_end(self, args, state, control, **kw):
            progress.update(step=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                progress.loss(state.global_step, float(logs["loss"]))
                _log(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")

    try:
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[_ProgressCallback()])
    except ValueError as exc:
        raise JobError(f"cannot set up training: {exc}") from None
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    _log(f"{request.method}: {trainable:,} trainable of {total:,} parameters; {len(records)} records")
    output = trainer.train()
    num_tokens = None
    for entry in trainer.state.log_history:
        if "num_tokens" in entry:
            num_tokens = entry["num_tokens"]
    runtime = output.metrics.get("train_runtime")
    progress.update(stage="saving")
    target = job_dir / ("adapter" if request.method == "lora" else "model")
    trainer.save_model(str(target))
    tokenizer.save_pretrained(str(target))
    return {
        "method": request.method, "records": len(records), "steps": trainer.state.global_step,
        "train_runtime_s": runtime, "train_loss": output.training_loss,
        "train_tokens": num_tokens,  # non-padding tokens seen (TRL's num_tokens)
        "tokens_per_second": (num_tokens / runtime) if num_tokens and runtime else None,
        "trainable_params": trainable, "total_params": total, "device": device,
        "artifact": target.name,
    }


def run(job_dir: Path) -> dict[str, Any]:
    request = JobRequest.model_validate_json((job_dir / "request.json").read_text())
    progress = Progress(job_dir)
    threads = os.environ.get("NEGSPACE_TRAINER_THREADS")
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    records = load_records(job_dir, request)
    _log(f"dataset: {len(records)} records")
    manager = None
    if request.eval:
        progress.update(stage="checking eval tasks")
        manager = task_manager(job_dir, request)

    progress.update(stage="loading model")
    from negspace_models import ModelResolutionError, resolve_model

    try:
        base = resolve_model(request.base_model)
    except ModelResolutionError as exc:
        raise JobError(f"base_model: {exc}") from None
    _log(f"base model: {base.path}")
    started = time.monotonic()
    metrics = train(job_dir, request, records, base.path, progress, device)
    metrics["train_wall_s"] = time.monotonic() - started
    metrics["peak_rss_mb"] = peak_rss_mb()
    if device == "cuda":
        metrics["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics["base_model"] = base.path
    _write_json(job_dir / "metrics.json", metrics)

    results: dict[str, Any] = {}
    if request.eval and manager is not None:
        progress.update(stage="evaluating tuned model")
        if request.method == "lora":
            tuned_args = {"pretrained": base.path, "peft": str(job_dir / "adapter")}
        else:
            tuned_args = {"pretrained": str(job_dir / "model")}
        results["tuned"] = evaluate(request, manager, tuned_args, device)
        _log(f"tuned: {json.dumps(results['tuned'])}")
        if request.compare_base:
            progress.update(stage="evaluating base model")
            results["base"] = evaluate(request, manager, {"pretrained": base.path}, device)
            _log(f"base: {json.dumps(results['base'])}")
        metrics["eval"] = results
        _write_json(job_dir / "metrics.json", metrics)
    progress.update(stage="done")
    return {"eval": results, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m negspace_trainer.worker JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[0]).resolve()
    try:
        result = run(job_dir)
    except JobError as exc:
        _log(f"failed: {exc}")
        _write_json(job_dir / "error.json", {"error": str(exc)})
        return 1
    except Exception as exc:  # noqa: BLE001  (reported to the job, with the traceback in the log)
        traceback.print_exc()
        _write_json(job_dir / "error.json", {"error": f"{type(exc).__name__}: {exc}"[:4000]})
        return 1
    _write_json(job_dir / "result.json", result)
    _log("succeeded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
