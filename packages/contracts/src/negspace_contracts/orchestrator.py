"""Orchestrator API: guided and baseline runs, their instructions, events, Q/A and training."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model, field_validator, model_validator

from negspace_contracts._http import Resource, ServiceClient
from negspace_contracts.common import StrictModel
from negspace_contracts.controller import MetricsRequest, MetricsResponse
from negspace_contracts.node import Guidance, GuidanceCombine, GuidanceSpace
from negspace_contracts.trainer import ChatRecord, Job, JobRequest, JobStatus

# Run sizes, from measurements (docs/benchmarks.md): a run's instructions live in one controller
# collection, measured up to 10^6 points (bench-controller, approximate mode); one round sends
# ``nodes`` requests at once, and a node replica queues 256 before it answers 429 (its --max-queue
# default), so one replica takes a whole round of the largest run (bench-scale ran 256 nodes).
MAX_RUN_INSTRUCTIONS = 1_000_000
MAX_NODES = 256
MAX_ROUNDS = 10_000
MAX_BASELINE_SIZE = MAX_RUN_INSTRUCTIONS
# POST /runs/{id}/qa answers when the whole run is converted: allow long runs, but never wait forever.
QA_TIMEOUT_S = 3600.0
# GET /runs pages: the default and the largest page.
RUNS_PAGE_SIZE = 100
MAX_RUNS_PAGE_SIZE = 1000

RunMode = Literal["guided", "baseline"]
RunStatus = Literal["queued", "running", "paused", "completed", "failed", "cancelled"]
TERMINAL_RUN_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class GuidanceSchedule(StrictModel):
    """The guidance scale schedule and how the node combines the negatives (see the node README)."""

    start: float = Field(1.0, ge=0.0, le=100.0,
                         description="Scale of a slot's first attempt (1.0 = plain: guided only on retries).")
    step: float = Field(0.5, ge=0.0, le=100.0, description="Added to the scale on every retry.")
    max_retries: int = Field(5, ge=0, le=50, description="Retries while the text is too similar.")
    space: GuidanceSpace = Field("logits", description="logits (the reference) or logprobs.")
    combine: GuidanceCombine = Field("min", description="How the negatives are combined: min (the "
                                                        "reference), mean or max.")
    alpha: float | None = Field(None, ge=0.0, le=1.0,
                                description="Plausibility restriction: only tokens with positive-branch "
                                            "probability >= alpha x its top probability may win. None = off.")
    max_tokens: int | None = Field(None, ge=0, le=4096,
                                   description="Guide only the first N tokens of each attempt (a guidance "
                                               "interval); None = every token.")

    def at(self, retry: int) -> Guidance:
        """The ``Guidance`` of a slot's attempt after ``retry`` novelty retries: scale ``start + step x
        retry``, the other options as given (the one value the node's processor receives)."""
        return Guidance(scale=self.start + self.step * retry, space=self.space, combine=self.combine,
                        alpha=self.alpha, max_tokens=self.max_tokens)


class NegativesSpec(StrictModel):
    k: int = Field(3, ge=0, le=16, description="Negatives per generation (0 = none).")
    knn: int = Field(5, ge=1, le=100, description="Neighbours used for density.")
    source: Literal["dense", "random"] = Field(
        "dense", description="dense (the method): the controller's densest instructions; random: k accepted "
                             "instructions of the run drawn at random (isolates the density selection).")
    use: Literal["guidance", "prompt"] = Field(
        "guidance", description="guidance (the method): the node's negative prompts under CFG; prompt: the "
                                "instructions are listed in the positive prompt, which asks for something "
                                "different, and no CFG is used (the in-prompt history baseline).")
    assign: Literal["shared", "sample"] = Field(
        "shared", description="shared (the reference): every slot of a round gets the k densest instructions "
                              "(concurrent slots get the same k); sample: each slot draws its own k from the "
                              "densest `pool` with a per-(node, round) seed, so the nodes of one round are "
                              "pushed away from different texts. source dense only.")
    pool: int = Field(8, ge=2, le=100, description="assign sample: how many of the densest instructions "
                                                   "each slot draws its k from (must exceed k).")

    @model_validator(mode="after")
    def _pool(self):
        if self.assign == "sample":
            if self.source != "dense":
                raise ValueError("negatives.assign 'sample' draws from the densest instructions: it needs "
                                 "negatives.source 'dense' (source 'random' is already a per-slot draw)")
            if self.k > 0 and self.pool <= self.k:
                raise ValueError(f"negatives.pool ({self.pool}) must be larger than negatives.k ({self.k}) "
                                 "with assign 'sample', or every slot gets the same k")
        return self


#: The default on-topic floor of the two-sided rule: a cosine of the controller's embedder
#: (all-MiniLM-L6-v2) between an attempt and the run's base instruction. Chosen on the study's
#: labelled set (negspace_cli/study/calibration.jsonl, 10 bases, on/off-topic rewrites), see
#: services/orchestrator/README.md ("The method's options"); the lead tunes it.
ON_TOPIC_FLOOR = 0.3


class AcceptanceSpec(StrictModel):
    """When an attempt is accepted, and which attempt a slot keeps when its retries run out."""

    rule: Literal["novel", "two-sided"] = Field(
        "novel", description="novel (the reference): accept when the controller finds the text not too "
                             "similar to the run's instructions; two-sided: also require it to be on topic "
                             "(cosine to the base instruction >= on_topic_min, the controller's embedder).")
    on_topic_min: float = Field(ON_TOPIC_FLOOR, gt=-1.0, lt=1.0, allow_inf_nan=False,
                                description="two-sided: the floor on the cosine between the attempt and the run's "
                                            "base instruction (controller embedder). Default ON_TOPIC_FLOOR.")
    on_topic_retries: int = Field(3, ge=0, le=50,
                                  description="two-sided: retries of a slot while its text is off topic (its own "
                                              "budget, beside guidance.max_retries for too-similar texts; the "
                                              "scale does not rise on an off-topic retry).")
    keep: Literal["last", "best"] = Field(
        "last", description="When a slot's retries run out: last (the reference) forces its last attempt in; "
                            "best keeps the least similar of its on-topic attempts (with rule novel every "
                            "attempt counts as on topic), or the most on-topic one when none is.")


class TwoStageSpec(StrictModel):
    """``prompting: two-stage``: an angle first, then the instruction conditioned on it."""

    angle_temperature: float = Field(1.2, ge=1e-5, le=2.0, allow_inf_nan=False,
                                     description="Sampling temperature of the angle (high: varied angles).")
    angle_top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    angle_max_tokens: int = Field(16, ge=2, le=64, description="Token budget of the angle (a few words).")
    avoid_used: int = Field(16, ge=0, le=64,
                            description="List up to this many angles of the run's accepted instructions in the "
                                        "angle prompt and ask for a new one (0 = do not list).")
    prompt: Literal["angle", "topic"] = Field(
        "angle", description="Wording of both stages. 'angle' (the first, kept so committed runs keep their "
                             "meaning): 'Name ONE specific angle ...' then 'Write it from this angle: A'. "
                             "'topic': asks for a topic in English, then 'The augmented instruction must be "
                             "about this topic: A', and says to write the instruction, not what it asks for "
                             "(on the 1.5B the first wording read 'angle' geometrically on a poem base and "
                             "wrote the questions themselves on a question base).")


class VerbalizedSpec(StrictModel):
    """``prompting: verbalized`` (Zhang et al. 2025, Verbalized Sampling): one request asks for
    ``candidates`` instructions each with a probability; one is kept, drawn by those probabilities."""

    candidates: int = Field(5, ge=2, le=10, description="Candidate instructions asked for in one reply.")
    max_tokens: int | None = Field(None, ge=16, le=4096,
                                   description="Token budget of the reply; None = max_tokens x candidates "
                                               "(at most 4096).")


#: ``preset: "reference"``: the seed method exactly (firstbatchxyz/cohere-aya-expedition, dria.py):
#: scale 1.0 then +0.5 per retry, at most 5 retries, threshold 0.9 on the embedder's cosine, 3 dense
#: negatives (knn 5) as raw instructions, min over raw logits, T 1.0, top-p 0.9, 150 tokens.
REFERENCE_PRESET: dict[str, Any] = {
    "max_tokens": 150, "temperature": 1.0, "top_p": 0.9, "min_p": 0.0,
    "guidance": {"start": 1.0, "step": 0.5, "max_retries": 5, "space": "logits", "combine": "min",
                 "alpha": None, "max_tokens": None},
    "similarity_threshold": 0.9, "similarity_quantile": None,
    "negatives": {"k": 3, "knn": 5, "source": "dense", "use": "guidance", "assign": "shared"},
    "negative_format": "raw",
    "acceptance": {"rule": "novel", "keep": "last"}, "prompting": "direct",
}
PRESETS: dict[str, dict[str, Any]] = {"reference": REFERENCE_PRESET}


def _merge_preset(preset: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The preset's values under the fields the caller gave (nested specs merge field by field)."""
    out = dict(preset)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


class RunConfig(StrictModel):
    preset: Literal["reference"] | None = Field(
        None, description="Fill every field the request leaves out from a named configuration: "
                          "'reference' is the seed method exactly (REFERENCE_PRESET). Fields given "
                          "explicitly win.")
    base_instruction: str = Field(..., max_length=8000)
    mode: RunMode = "guided"
    nodes: int = Field(4, ge=1, le=MAX_NODES)
    rounds: int = Field(3, ge=0, le=MAX_ROUNDS)
    max_tokens: int = Field(150, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False,
                               description="0 = greedy; otherwise 1e-5 to 2 (the node's bounds: below "
                                           "1e-5 vLLM and the node decode greedily anyway).")
    top_p: float = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False)
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                         description="Drop tokens below min_p x the top token's probability (after "
                                     "temperature); 0 = off.")
    guidance: GuidanceSchedule = Field(default_factory=GuidanceSchedule)
    similarity_threshold: float = Field(0.9, gt=0.0, le=1.0,
                                        description="Too similar: max cosine to the run's instructions >= this.")
    similarity_quantile: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Calibrated threshold: too similar when the max cosine reaches this quantile of the "
                    "run's own nearest-neighbour similarities (the same meaning whatever the embedder); "
                    "until the run has 2 instructions similarity_threshold applies. None = the absolute "
                    "similarity_threshold.")
    negatives: NegativesSpec = Field(default_factory=NegativesSpec)
    use_previous_generation: bool = False
    acceptance: AcceptanceSpec = Field(default_factory=AcceptanceSpec,
                                       description="The acceptance rule and the attempt kept when retries run "
                                                   "out (guided runs).")
    prompting: Literal["direct", "two-stage", "verbalized"] = Field(
        "direct", description="direct (the reference): one request writes the instruction; two-stage: a short "
                              "angle within the base first (two_stage), then the instruction at `temperature` "
                              "conditioned on it; verbalized: one request lists several candidates with "
                              "probabilities (verbalized) and one is drawn by them with the slot's seed.")
    two_stage: TwoStageSpec = Field(default_factory=TwoStageSpec, description="prompting two-stage only.")
    verbalized: VerbalizedSpec = Field(default_factory=VerbalizedSpec, description="prompting verbalized only.")
    negative_format: Literal["raw", "augment", "superset", "superset-list"] = Field(
        "raw", description="raw (the reference): each dense-region instruction is a negative prompt "
                           "as it is; augment: wrapped in the augmentation prompt like the positive; "
                           "superset: the positive prompt plus the instruction marked as already "
                           "written (guidance then subtracts only the pull toward it); superset-list: "
                           "one negative, the positive plus every chosen instruction as already written.")
    augmentation_prompt: str | None = Field(None, max_length=8000,
                                            description="None: the project's default prompt.")
    round_mode: Literal["concurrent", "sequential"] | None = Field(
        None, description="None: the orchestrator's --round-mode.")
    seed: int = Field(0, ge=0)
    size: int | None = Field(None, ge=1, le=MAX_BASELINE_SIZE,
                             description="Baseline only: number of instructions.")
    match_run: str | None = Field(None, description="Baseline only: produce as many as this run (and "
                                                     "live on its controller, so the two compare).")
    colocate_with: str | None = Field(
        None, max_length=200,
        description="A run id: put this run's collection on that run's controller replica, so "
                    "GET /runs/{id}/compare can compare the two (a baseline with match_run does so "
                    "by itself). None: the orchestrator routes it by its collection name.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        preset = data.get("preset") if isinstance(data, dict) else None
        if isinstance(preset, str) and preset in PRESETS:  # anything else: the field's own 422
            return _merge_preset(PRESETS[preset], data)
        return data

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if 0.0 < v < 1e-5:
            raise ValueError("temperature must be 0 (greedy) or at least 1e-5; a smaller one is greedy "
                             "decoding anyway, so write 0")
        return v

    @field_validator("base_instruction")
    @classmethod
    def _base(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("base_instruction must not be empty")
        return v

    @model_validator(mode="after")
    def _mode_fields(self):
        if self.mode == "baseline":
            if (self.size is None) == (self.match_run is None):
                raise ValueError("a baseline run needs exactly one of size or match_run")
        elif self.size is not None or self.match_run is not None:
            raise ValueError("size and match_run apply to baseline runs only")
        elif self.nodes * (self.rounds + 1) > MAX_RUN_INSTRUCTIONS:
            raise ValueError(f"nodes x (rounds + 1) = {self.nodes * (self.rounds + 1):,} instructions is more "
                             f"than one run may produce ({MAX_RUN_INSTRUCTIONS:,}, the collection size the "
                             "controller is measured at): use fewer rounds or nodes, or several runs")
        return self


class RunCreated(StrictModel):
    id: str
    status: RunStatus


class RunProgress(StrictModel):
    round: int = 0
    rounds: int = 0
    accepted: int = 0
    attempts: int = 0
    target: int | None = None
    eta_seconds: float | None = None


class Run(StrictModel):
    id: str
    status: RunStatus
    mode: RunMode
    config: RunConfig
    progress: RunProgress = Field(default_factory=RunProgress)
    error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    collection: str | None = None
    controller: str | None = Field(None, description="The controller replica holding the collection "
                                                      "(recorded at creation, never changed).")
    train_job_id: str | None = None


class RunList(StrictModel):
    """One page of ``GET /runs``, in creation order (oldest first). ``next_after`` is the id to
    pass as ``?after=`` for the next page; ``None`` on the last page. Runs created meanwhile come
    after every existing run, so paging never skips or repeats one."""

    runs: list[Run]
    next_after: str | None = None


class Instruction(StrictModel):
    id: str
    node: int
    round: int
    text: str
    guidance_scale: float | None
    attempt: int
    max_similarity: float | None
    angle: str | None = Field(None, exclude_if=lambda v: v is None,
                              description="prompting two-stage: the angle the instruction was written from.")
    on_topic: float | None = Field(None, exclude_if=lambda v: v is None,
                                   description="acceptance two-sided: the controller-embedder cosine to the base.")


def _is_none(value: object) -> bool:
    return value is None


#: An event key that is left out of the JSON while it has no value (``"seed" in data`` says whether it is given).
OptionalKey = Field(None, exclude_if=_is_none)


class EventData(BaseModel):
    """A typed event payload. Read its fields as attributes; it also reads like the JSON object it
    is on the wire (``data["round"]``, ``data.get("error")``, ``"seed" in data``, ``set(data)``: its
    keys), so a reader written against the JSON keeps working. Unknown keys (a newer server's) are
    ignored."""

    model_config = ConfigDict(extra="ignore")
    event_type: ClassVar[str]

    def _wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def __getitem__(self, key: str) -> Any:
        wire = self._wire()
        if key not in wire:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._wire() else default

    def keys(self) -> list[str]:
        return list(self._wire())

    def __contains__(self, key: object) -> bool:
        return key in self._wire()

    def __iter__(self):  # type: ignore[override]  # the keys, as a dict's
        return iter(self._wire())

    def __len__(self) -> int:
        return len(self._wire())


class StatusData(EventData):
    """The run's status changed (``completed`` adds the counts; ``queued`` after a resume, a reason)."""

    event_type: ClassVar[str] = "status"
    status: RunStatus
    error: str | None = OptionalKey
    reason: str | None = OptionalKey
    accepted: int | None = OptionalKey
    attempts: int | None = OptionalKey


class AttemptData(EventData):
    """One generation, once judged (accepted or not; ``empty`` when the node returned no text, or a
    verbalized reply with no parseable candidate). ``on_topic``: its cosine to the base (two-sided
    rule); ``angle``: the two-stage angle it was written from; ``kept``: a repeat of an earlier
    attempt's event, now forced in as the slot's best when its retries ran out (no new generation)."""

    event_type: ClassVar[str] = "attempt"
    node: int
    round: int
    attempt: int
    scale: float | None = None
    negatives: int = 0
    max_similarity: float | None = None
    similar: bool | None = None
    accepted: bool = False
    empty: bool = False
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float = 0.0
    node_url: str | None = None
    on_topic: float | None = OptionalKey
    angle: str | None = OptionalKey
    kept: bool | None = OptionalKey


class RoundData(EventData):
    """Every node finished a round (written once per round, also across restarts)."""

    event_type: ClassVar[str] = "round"
    round: int
    rounds: int
    accepted: int
    attempts: int


class QAData(EventData):
    """One instruction converted to a Q/A pair or rejected (``reason``: why; None when converted)."""

    event_type: ClassVar[str] = "qa"
    instruction_id: str
    status: Literal["converted", "rejected"]
    reason: str | None = None
    done: int
    total: int
    converted: int
    rejected: int


#: The ``train`` event status of a job the trainer answers 404 for (it lost it).
LOST_JOB = "lost"


class TrainData(EventData):
    """The run's training job (or its job for ``seed``) was created or changed status or step."""

    event_type: ClassVar[str] = "train"
    job_id: str
    status: JobStatus | Literal["lost"]
    seed: int | None = OptionalKey
    step: int | None = OptionalKey
    total_steps: int | None = OptionalKey
    error: str | None = OptionalKey


class _Event(BaseModel):
    run_id: str
    seq: int = 0


class StatusEvent(_Event):
    type: Literal["status"] = "status"
    data: StatusData


class AttemptEvent(_Event):
    type: Literal["attempt"] = "attempt"
    data: AttemptData


class RoundEvent(_Event):
    type: Literal["round"] = "round"
    data: RoundData


class QAEvent(_Event):
    type: Literal["qa"] = "qa"
    data: QAData


class TrainEvent(_Event):
    type: Literal["train"] = "train"
    data: TrainData


#: One server-sent event of ``GET /runs/{id}/events`` (``seq`` increases; resume with ``after``):
#: ``{"type", "run_id", "seq", "data"}``, ``type`` choosing the payload. The stream ends when the
#: run is completed, failed or cancelled.
RunEvent = Annotated[StatusEvent | AttemptEvent | RoundEvent | QAEvent | TrainEvent, Field(discriminator="type")]
RunEventData = StatusData | AttemptData | RoundData | QAData | TrainData
RUN_EVENT: TypeAdapter[RunEvent] = TypeAdapter(RunEvent)


def run_event(run_id: str, seq: int, data: RunEventData) -> RunEvent:
    """The event that carries ``data``."""
    return RUN_EVENT.validate_python({"type": data.event_type, "run_id": run_id, "seq": seq, "data": data})


class QARequest(StrictModel):
    max_tokens: int = Field(300, ge=16, le=4096)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    self_consistency: bool = Field(
        False, description="For tasks with checkable (numeric) answers: answer each parsed question once more "
                           "(another seed) and keep the pair only when both answers end in the same number; "
                           "a disagreeing pair is rejected as 'inconsistent'. A pair without a number in both "
                           "answers is kept and counted as unchecked. One more generation per pair.")
    export_dir: str | None = Field(
        None, max_length=4096,
        description="Where to write qa.jsonl and the datasets folder: a folder inside the orchestrator's "
                    "--data-dir, given relative to it (e.g. 'my-export') or as an absolute path inside it. "
                    "Default: <data-dir>/<run id>/qa.")


class QAResult(StrictModel):
    run_id: str
    total: int
    converted: int
    rejected: int
    rejections: dict[str, int] = Field(
        default_factory=dict,
        description="Rejected records per reason: unparseable, empty, echo (the answer restates the question), "
                    "truncated (cut at max_tokens), language (another script than the base instruction), "
                    "bare_number (a bare number where the question asks to explain), inconsistent "
                    "(self-consistency: a second answer disagreed).")
    consistency: dict[str, int] | None = Field(
        None, description="With self_consistency: pairs whose second answer agreed / disagreed / had no number "
                          "to compare (unchecked), over the pairs checked by this call.")
    jsonl_path: str | None = None
    dataset_path: str | None = None


EXPORT_FORMATS = ("hf", "parquet", "jsonl")
ExportFormat = Literal["hf", "parquet", "jsonl"]


class ExportRequest(StrictModel):
    format: ExportFormat = Field("hf", description="hf: a datasets.load_from_disk folder (splits instructions "
                                                   "and qa); parquet or jsonl: one file per config. Each "
                                                   "comes with a README.md dataset card.")
    export_dir: str | None = Field(
        None, max_length=4096,
        description="A folder inside the orchestrator's --data-dir (relative to it, or absolute inside it). "
                    "Default: <data-dir>/<run id>/export-<format>.")
    license: str = Field("other", max_length=100, description="The card's license (a Hub license id).")


class ExportResult(StrictModel):
    run_id: str
    format: ExportFormat
    path: str
    files: list[str]
    instructions: int
    qa: int


class RoundPoint(StrictModel):
    """An accepted instruction on the 2 principal axes of both runs' embeddings."""

    x: float
    y: float
    round: int | None = None


class RunDiversity(StrictModel):
    run_id: str
    metrics: MetricsResponse
    per_round: dict[int, MetricsResponse] = Field(default_factory=dict,
                                                  description="Each round's accepted instructions.")
    points: list[RoundPoint] = Field(default_factory=list, description="The 2-D map (empty without one).")


class RunComparison(StrictModel):
    """``GET /runs/{id}/compare?with=OTHER``: both runs measured by the controller on one PCA basis
    fitted on the union of their embeddings, so hull volumes and the map compare alike."""

    run: RunDiversity
    other: RunDiversity
    pca_basis: Literal["shared", "own"] = Field(
        ..., description="shared: one 4-D basis fitted on both runs; own: too few points, each its own.")
    notes: dict[str, str] = Field(default_factory=dict)


#: The fields of a trainer ``JobRequest`` that ``POST /runs/{id}/train`` takes (the orchestrator
#: adds the dataset, the name and the idempotency key).
TRAIN_FIELDS = ("base_model", "method", "lora", "training", "eval", "compare_base")
#: ``POST /runs/{id}/train``'s body: ``JobRequest``'s training fields, defined once there.
TrainRequest = create_model("TrainRequest", __base__=StrictModel, __module__=__name__,
                            **{k: (JobRequest.model_fields[k].annotation, JobRequest.model_fields[k])
                               for k in TRAIN_FIELDS})


class _Runs(Resource):
    async def create(self, config: RunConfig) -> RunCreated:
        return await self._client.call("POST", "/runs", RunCreated,
                                       json_body=config.model_dump(mode="json", exclude_none=True))

    async def get(self, run_id: str) -> Run:
        return await self._client.call("GET", f"/runs/{run_id}", Run)

    async def list(self, status: RunStatus | None = None, *, limit: int | None = None,
                   after: str | None = None) -> RunList:
        """One page of runs in creation order (``limit``: the server's default 100, at most 1000;
        ``after``: a run id, normally the previous page's ``next_after``)."""
        params: dict[str, Any] = {}
        if status:
            params["status"] = status
        if limit is not None:
            params["limit"] = limit
        if after is not None:
            params["after"] = after
        return await self._client.call("GET", "/runs", RunList, params=params or None)

    async def iterate(self, status: RunStatus | None = None, *,
                      page_size: int = RUNS_PAGE_SIZE) -> AsyncIterator[Run]:
        """Every run (with ``status``, if given) in creation order, fetching pages as needed."""
        after: str | None = None
        while True:
            page = await self.list(status, limit=page_size, after=after)
            for run in page.runs:
                yield run
            if page.next_after is None:
                return
            after = page.next_after

    async def cancel(self, run_id: str) -> Run:
        return await self._client.call("POST", f"/runs/{run_id}/cancel", Run)

    async def resume(self, run_id: str) -> Run:
        return await self._client.call("POST", f"/runs/{run_id}/resume", Run)

    async def instructions(self, run_id: str) -> list[Instruction]:
        response = await self._client.send("GET", f"/runs/{run_id}/instructions")
        return [Instruction.model_validate_json(line) for line in response.text.splitlines() if line.strip()]

    async def metrics(self, run_id: str, request: MetricsRequest | None = None) -> MetricsResponse:
        """The controller's diversity metrics of the run; ``request`` can fix the PCA basis so
        the hull volumes of a guided run and its baseline compare alike."""
        if request is None:
            return await self._client.call("GET", f"/runs/{run_id}/metrics", MetricsResponse)
        return await self._client.call("POST", f"/runs/{run_id}/metrics", MetricsResponse, json_body=request)

    async def compare(self, run_id: str, other: str) -> RunComparison:
        """``run_id`` and ``other`` measured on one footing (see ``RunComparison``): the shared PCA
        basis, each run's and each round's metrics, the 2-D map."""
        return await self._client.call("GET", f"/runs/{run_id}/compare", RunComparison, params={"with": other})

    async def qa(self, run_id: str, request: QARequest | None = None) -> QAResult:
        return await self._client.call("POST", f"/runs/{run_id}/qa", QAResult,
                                       json_body=request or QARequest(), timeout=QA_TIMEOUT_S)

    async def qa_records(self, run_id: str) -> list[ChatRecord]:
        response = await self._client.send("GET", f"/runs/{run_id}/qa")
        return [ChatRecord.model_validate_json(line) for line in response.text.splitlines() if line.strip()]

    async def export(self, run_id: str, request: ExportRequest | None = None) -> ExportResult:
        """Write the run's datasets and card inside the orchestrator's --data-dir."""
        return await self._client.call("POST", f"/runs/{run_id}/export", ExportResult,
                                       json_body=request or ExportRequest(), timeout=QA_TIMEOUT_S)

    async def export_archive(self, run_id: str, format: ExportFormat = "hf", *, license: str = "other") -> bytes:
        """The same export as a tar archive (``GET /runs/{id}/export``), to unpack where the caller is."""
        response = await self._client.send("GET", f"/runs/{run_id}/export",
                                           params={"format": format, "license": license}, timeout=QA_TIMEOUT_S)
        return response.content

    async def train(self, run_id: str, request: TrainRequest | None = None, *, seed: int | None = None) -> Job:
        """The run's training job (one per run); with ``seed``, the run's job for that seed (one
        per (run, seed), its ``training.seed`` set to it): repeating the call returns that job."""
        return await self._client.call("POST", f"/runs/{run_id}/train", Job,
                                       json_body=request or TrainRequest(),
                                       params={"seed": seed} if seed is not None else None)

    async def train_job(self, run_id: str, *, seed: int | None = None) -> Job:
        """The run's training job (or its job for ``seed``) as the trainer reports it now."""
        return await self._client.call("GET", f"/runs/{run_id}/train", Job,
                                       params={"seed": seed} if seed is not None else None)

    async def events(self, run_id: str, *, after: int = 0) -> AsyncIterator[RunEvent]:
        """Follow ``GET /runs/{id}/events`` (server-sent events) until the stream ends."""
        data: list[str] = []
        async for line in self._client.stream_lines("GET", f"/runs/{run_id}/events",
                                                    params={"after": after}):
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line.strip() and data:
                yield RUN_EVENT.validate_json("\n".join(data))
                data = []


class OrchestratorClient(ServiceClient):
    """``OrchestratorClient(url).runs.create(RunConfig(base_instruction=...))``."""

    def __init__(self, base_url: str, **kw) -> None:
        super().__init__(base_url, **kw)
        self.runs = _Runs(self)
