"""Trainer API: SFT (TRL + PEFT) and evaluation (lm-evaluation-harness) as jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from negspace_contracts._http import Resource, ServiceClient
from negspace_contracts.common import StrictModel

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_JOB_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
MAX_INLINE_RECORDS = 100_000
# Printable ASCII without spaces (a UUID, a hash, "run-<id>-train-<n>").
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]+$"


class ChatTurn(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRecord(StrictModel):
    """One training example in the chat format TRL's SFTTrainer takes."""

    messages: list[ChatTurn] = Field(..., min_length=1)

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, v: list[ChatTurn]) -> list[ChatTurn]:
        if not any(m.role == "assistant" for m in v):
            raise ValueError("a record needs at least one assistant message to learn from")
        return v


class DatasetSpec(StrictModel):
    """Exactly one of: inline ``records`` or a JSONL ``path`` (file path or http(s) URL). The trainer
    never calls the orchestrator: the orchestrator pushes a run's Q/A records inline
    (``POST /runs/{id}/train``)."""

    records: list[ChatRecord] | None = Field(None, max_length=MAX_INLINE_RECORDS)
    path: str | None = Field(
        None, description="A JSONL file of chat records inside one of the trainer's --dataset-dirs "
                          "(a relative path is taken inside the first of them), or an http(s) URL "
                          "under one of its --dataset-url-prefixes (none by default: URLs refused).")

    @model_validator(mode="before")
    @classmethod
    def _no_run_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and "run_id" in data:
            if data["run_id"] is None:  # as a request stored before the field was removed spells it
                return {k: v for k, v in data.items() if k != "run_id"}
            raise ValueError("dataset.run_id is not taken: the trainer does not fetch datasets from the "
                             "orchestrator; the orchestrator pushes a run's Q/A records (POST "
                             "/runs/{id}/train there), or send the records inline or a path")
        return data

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("records", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"dataset needs exactly one of records or path (got {given or 'none'})")
        if self.records is not None and not self.records:
            raise ValueError("dataset.records is empty: send at least one chat record")
        return self


class LoraSpec(StrictModel):
    r: int = Field(32, ge=1, le=1024)
    alpha: int = Field(64, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)


class TrainingSpec(StrictModel):
    """Maps onto TRL's ``SFTConfig`` (field names in comments)."""

    epochs: float = Field(1.0, gt=0)                      # num_train_epochs
    learning_rate: float = Field(2e-4, gt=0, lt=1)        # learning_rate
    batch_size: int = Field(8, ge=1, le=1024)             # per_device_train_batch_size
    gradient_accumulation: int = Field(1, ge=1, le=1024)  # gradient_accumulation_steps
    max_steps: int = Field(-1, ge=-1)                     # max_steps (-1: use epochs)
    max_length: int = Field(512, ge=16, le=32768)         # max_length
    seed: int = Field(42, ge=0)                           # seed

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0:
            raise ValueError("max_steps must be -1 (train for `epochs`) or >= 1")
        return v


class EvalSpec(StrictModel):
    tasks: list[str] = Field(..., min_length=1)
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    include_path: str | None = Field(
        None, description="A folder of lm-eval task YAML (which may import Python via !function) "
                          "inside one of the trainer's --task-dirs (default <workdir>/tasks; a "
                          "relative path is taken inside the first of them).")
    batch_size: int = Field(8, ge=1)


class JobRequest(StrictModel):
    dataset: DatasetSpec
    base_model: str | None = Field(None, description="Hub id or folder; default: bundled SmolLM2-135M.")
    method: Literal["lora", "full"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    eval: EvalSpec | None = None
    compare_base: bool = False
    name: str | None = Field(None, max_length=200)
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=255, pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Makes POST /jobs safe to retry: a repeat with the same key returns the job "
                    "created the first time (200, no new job); the same key with a different "
                    "request is a 409. Keys are kept with the job (across trainer restarts).")


class JobCreated(StrictModel):
    id: str
    status: JobStatus
    replayed: bool = Field(False, description="True when an earlier POST /jobs with the same "
                                              "idempotency_key created this job (answered 200).")


class JobProgress(StrictModel):
    step: int = 0
    total_steps: int | None = None
    stage: str | None = None


class LossPoint(StrictModel):
    step: int
    loss: float


class JobEval(StrictModel):
    tuned: dict[str, Any] | None = None
    base: dict[str, Any] | None = None


class Job(StrictModel):
    id: str
    status: JobStatus
    name: str | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    losses: list[LossPoint] = Field(default_factory=list)
    eval: JobEval = Field(default_factory=JobEval)
    error: str | None = None
    attempt: int = Field(1, ge=1, description="Which attempt this is: a job interrupted by a trainer "
                                              "restart is queued again with attempt + 1 (and fails "
                                              "after the trainer's --max-attempts).")
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request: JobRequest | None = None


class JobList(StrictModel):
    jobs: list[Job]


class Artifact(StrictModel):
    name: str
    path: str
    size_bytes: int


class ArtifactList(StrictModel):
    job_id: str
    root: str
    artifacts: list[Artifact]


class LocalTask(StrictModel):
    name: str
    description: str | None = None
    num_docs: int | None = None
    include_path: str


class TaskList(StrictModel):
    tasks: list[LocalTask]


class _Jobs(Resource):
    async def create(self, request: JobRequest, *, idempotency_key: str | None = None) -> JobCreated:
        """``idempotency_key`` (or ``request.idempotency_key``): retrying with the same key after
        a timeout or a dropped connection returns the job the first try created, never a second."""
        if idempotency_key is not None:
            request = request.model_copy(update={"idempotency_key": idempotency_key})
        return await self._client.call("POST", "/jobs", JobCreated, json_body=request)

    async def get(self, job_id: str) -> Job:
        return await self._client.call("GET", f"/jobs/{job_id}", Job)

    async def list(self, *, idempotency_key: str | None = None) -> JobList:
        """All jobs, or only the one created with ``idempotency_key`` (an empty list if none)."""
        params = {"idempotency_key": idempotency_key} if idempotency_key is not None else None
        return await self._client.call("GET", "/jobs", JobList, params=params)

    async def cancel(self, job_id: str) -> Job:
        return await self._client.call("POST", f"/jobs/{job_id}/cancel", Job)

    async def logs(self, job_id: str) -> str:
        response = await self._client.send("GET", f"/jobs/{job_id}/logs")
        return response.text

    async def artifacts(self, job_id: str) -> ArtifactList:
        return await self._client.call("GET", f"/jobs/{job_id}/artifacts", ArtifactList)


class TrainerClient(ServiceClient):
    """``TrainerClient(url).jobs.create(JobRequest(...))``."""

    def __init__(self, base_url: str, **kw) -> None:
        super().__init__(base_url, **kw)
        self.jobs = _Jobs(self)

    async def tasks(self) -> TaskList:
        return await self.call("GET", "/tasks", TaskList)
