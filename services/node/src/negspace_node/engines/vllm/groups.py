"""A guided group's state travels WITH its requests, in ``SamplingParams.extra_args``.

vLLM's batch updates carry no request id, but every added row carries its ``SamplingParams``
(``BatchUpdate.added``: index, params, prompt ids, live output ids). So every member of a guided
group carries the whole group in ``extra_args[GROUP_KEY]``: its identity (``id``, ``role``
0..size-1 with 0 the positive, ``size``) and everything the draw needs (its ``Guidance``: scale,
space, combine, alpha, the interval ``max_tokens``; temperature, top-p, min-p and the ``seed``). The
logits processor rebuilds a ``GroupState`` (with its seeded generator on the logits' device)
from the first member it sees, wherever vLLM runs it: in this process, or in each worker process
of a tensor-parallel engine (where every rank gets the same all-gathered logits and the same
seed, so every rank draws the same token). Nothing has to be registered beforehand. Plain
requests carry no group key.

Problems travel back in the tokens: a processor that cannot guide a group forces tokens on
which its members disagree (see ``processor.py``), and the engine fails the request because its
members diverged. ``REPORTS`` only adds the reason where the reporter shares the engine's
process (the gang scheduler always does; the processor does without tensor parallelism); it is
never needed for correctness.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from negspace_contracts.node import Guidance

GROUP_KEY = "negspace_cfg"
#: What ``extra_args[GROUP_KEY]`` must hold; ``group_args`` writes it, ``GroupState.from_args`` reads it.
FIELDS = ("id", "role", "size", "guidance", "temperature", "top_p", "min_p", "seed")


def group_args(request, group_id: str, role: int, size: int, seed: int) -> dict:
    """``extra_args`` of one member of the group decoding ``request`` (a GenerationRequest)."""
    return {GROUP_KEY: {
        "id": group_id, "role": role, "size": size, "guidance": request.guidance.model_dump(),
        "temperature": float(request.temperature), "top_p": float(request.top_p), "min_p": float(request.min_p),
        "seed": int(seed)}}


@dataclass
class GroupState:
    """One group, as the processor keeps it (built from a member's ``extra_args``)."""

    group_id: str
    size: int                                 # 1 positive + negatives
    guidance: Guidance                        # scale, space, combine, alpha, interval (max_tokens)
    temperature: float
    top_p: float
    seed: int                                 # seeds the generator on the logits' device
    min_p: float = 0.0
    tokens: list[int] = field(default_factory=list)   # the token forced at each step
    error: str | None = None

    _generators: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_args(cls, info: dict) -> GroupState:
        return cls(group_id=str(info["id"]), size=int(info["size"]),
                   guidance=Guidance.model_validate(info["guidance"]), temperature=float(info["temperature"]),
                   top_p=float(info["top_p"]), seed=int(info["seed"]), min_p=float(info["min_p"]))

    def generator_on(self, device) -> torch.Generator:
        """The group's generator on ``device`` (the logits' device), made once from ``seed``."""
        device = torch.device(device)
        if device not in self._generators:
            from negspace_node.guidance import make_generator

            self._generators[device] = make_generator(self.seed, device)
        return self._generators[device]

    def guides_at(self, position: int) -> bool:
        """Whether completion position ``position`` is guided (see ``GenerationRequest.guides_at``)."""
        return self.guidance.guides_at(position)

    def fail(self, reason: str) -> None:
        if self.error is None:                # keep the first reason
            self.error = reason
            REPORTS.report(self.group_id, reason)


class Reports:
    """Why a group failed, for the engine's error message (best effort, see the module docstring)."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self._lock = threading.Lock()

    def report(self, group_id: str, reason: str) -> None:
        with self._lock:
            self._reasons.setdefault(group_id, reason)

    def get(self, group_id: str) -> str | None:
        return self._reasons.get(group_id)

    def discard(self, group_id: str) -> None:
        with self._lock:
            self._reasons.pop(group_id, None)

    def __len__(self) -> int:
        return len(self._reasons)


REPORTS = Reports()


def group_info(sampling_params) -> dict | None:
    """``extra_args[GROUP_KEY]`` of a request's SamplingParams, or None for a plain request."""
    extra = getattr(sampling_params, "extra_args", None)
    return extra.get(GROUP_KEY) if extra else None


def group_of(sampling_params) -> tuple[str, int, int] | None:
    """(group id, role, size) of a request's SamplingParams, or None for a plain request."""
    info = group_info(sampling_params)
    if info is None:
        return None
    return str(info["id"]), int(info["role"]), int(info["size"])
