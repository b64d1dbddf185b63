"""What a study runs: base instructions (tuning or held out) x seeds x arms, and the size every
run shares. Written to ``study.json`` with every result, so a study folder says how it was made.

``study_id`` is a digest of the spec: the same command writes to the same folder and resumes it.
``model`` (the generating node's model, a known name such as ``qwen2.5-coder-1.5b``) joins the digest
only when it is not the default bundled model, so the folders of studies made before the field
existed keep their ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from negspace_contracts.orchestrator import RunConfig
from negspace_models import DEFAULT_MODEL, canonical_name
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from negspace_cli.study import arms as arms_mod

Split = Literal["tune", "held_out"]

#: The documented default study (``make study``): 8 base instructions from different domains; the
#: first 3 tune the method, the other 5 are held out and only ever reported.
DEFAULT_BASES: list[tuple[str, Split]] = [
    ("Write a math problem.", "tune"),
    ("Write a poem.", "tune"),
    ("Write a Python programming task.", "tune"),
    ("Write a question about world history.", "held_out"),
    ("Write a travel planning request.", "held_out"),
    ("Write a science experiment for students.", "held_out"),
    ("Write a business email task.", "held_out"),
    ("Write a question about healthy eating.", "held_out"),
]
DEFAULT_SEEDS = [1, 2, 3]
#: Every arm of the default study: the plain curve, the baselines, the reference and the
#: configuration the held-out study supports as the default.
DEFAULT_ARMS = ["plain-t0.7", "plain-t1.0", "plain-t1.2", "plain-t1.4", "plain-t1.2-p1", "plain-t1.5-minp0.1",
                "plain-t2.0-minp0.1", "retry-only", "history", "reference", "reference-calibrated", "guided",
                "random-negatives", "default"]


class Base(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., min_length=1)
    split: Split = "held_out"


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "study"
    bases: list[Base] = Field(..., min_length=1)
    seeds: list[int] = Field(..., min_length=1)
    arms: list[str] = Field(..., min_length=1)
    custom_arms: dict[str, dict[str, Any]] = Field(default_factory=dict)
    nodes: int = Field(4, ge=1)
    rounds: int = Field(5, ge=0, description="Guided rounds after the bootstrap: nodes x (rounds + 1) per run.")
    max_tokens: int = Field(64, ge=1)
    eval_embedder: str = "all-mpnet-base-v2"
    model: str = Field(DEFAULT_MODEL, description="The generating (node) model the study runs on: a known name "
                                                  "(python -m negspace_models list), a hub id or a folder.")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="The node's weights dtype for a stack the study starts (None: --dtype, else NODE_DTYPE, "
                          "else auto). Set it to reproduce a study across machines: auto is bfloat16 on CPUs with "
                          "bf16 units and float32 elsewhere.")

    reuse: list[str] = Field(
        default_factory=list,
        description="Study folders (ids, beside this study's folder) whose finished runs this study takes "
                    "instead of generating them again: a cell is taken when that study ran the same base, seed "
                    "and arm with the same run config on the same model and dtype. Not part of the study id "
                    "(a taken run is the run this study would make), so adding it keeps a study's folder.")

    @field_validator("model")
    @classmethod
    def _canonical_model(cls, v: str) -> str:
        return canonical_name(v) or DEFAULT_MODEL

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError("seeds must be distinct non-negative integers")
        return v

    @model_validator(mode="after")
    def _check(self):
        if len({b.text for b in self.bases}) != len(self.bases):
            raise ValueError("base instructions must be distinct")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError("arms must be distinct")
        for arm in self.resolved_arms():   # every arm must make a valid run
            self.run_config(arm, self.bases[0].text, self.seeds[0])
        return self

    @property
    def per_run(self) -> int:
        return self.nodes * (self.rounds + 1)

    def resolved_arms(self) -> list[arms_mod.Arm]:
        return arms_mod.resolve(self.arms, self.custom_arms)

    def run_config(self, arm: arms_mod.Arm, base: str, seed: int) -> RunConfig:
        """The arm's run for one case; every arm accepts exactly ``per_run`` instructions."""
        body: dict[str, Any] = {**arm.config, "base_instruction": base, "seed": seed, "nodes": self.nodes,
                                "rounds": self.rounds, "max_tokens": self.max_tokens, "mode": arm.mode}
        if arm.mode == "baseline":
            body["size"] = self.per_run
        return RunConfig.model_validate(body)

    def study_id(self) -> str:
        body = self.model_dump(mode="json")
        if body["model"] == DEFAULT_MODEL:     # the ids of studies made before the field existed
            del body["model"]
        if body["dtype"] is None:              # likewise
            del body["dtype"]
        del body["reuse"]                      # where runs come from, not what they are
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return f"{self.name}-{digest[:10]}"

    def cells(self) -> list[tuple[int, int, str]]:
        """(base index, seed, arm name) for every run, in the order they run: a case's arms together,
        and the first seed of every base before the second seed of any, so a study stopped early
        holds whole cases spread over as many bases (the bootstrap's clusters) as possible."""
        return [(b, s, a) for s in self.seeds for b in range(len(self.bases)) for a in self.arms]


def cell_key(base: int, seed: int, arm: str) -> str:
    return f"b{base}-s{seed}-{arm}"


def default_spec(**over: Any) -> StudySpec:
    body: dict[str, Any] = {"bases": [{"text": t, "split": s} for t, s in DEFAULT_BASES], "seeds": DEFAULT_SEEDS,
                            "arms": DEFAULT_ARMS}
    body.update({k: v for k, v in over.items() if v is not None})
    return StudySpec.model_validate(body)


def load_spec(path: Path, **over: Any) -> StudySpec:
    """A study file: JSON (or YAML when PyYAML is installed) with the StudySpec fields; bases may be
    plain strings (held out) or {"text", "split"}."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        body = yaml.safe_load(text)
    else:
        body = json.loads(text)
    body["bases"] = [{"text": b} if isinstance(b, str) else b for b in body.get("bases", [])]
    body.update({k: v for k, v in over.items() if v is not None})
    return StudySpec.model_validate(body)
