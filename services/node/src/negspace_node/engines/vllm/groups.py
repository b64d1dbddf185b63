"""The registry that links the engine thread, the scheduler and the logits processor.

vLLM's batch updates carry no request id, so every member of a guided group carries its identity
in ``SamplingParams.extra_args[GROUP_KEY] = {"id": ..., "role": 0..size-1, "size": ...}``
(role 0 is the positive). Everything else a group needs (scale, space, combine, alpha, guidance interval,
temperature, top-p, min-p and its seeded generator) lives in a ``GroupState`` registered here by the engine before the members
are added, so the processor (same process: the engine runs in-process) can look it up, and the
processor and scheduler report problems back through it. Plain requests carry no group key.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

GROUP_KEY = "negspace_cfg"


@dataclass
class GroupState:
    group_id: str
    size: int                                 # 1 positive + negatives
    scale: float
    space: str
    temperature: float
    top_p: float
    generator: torch.Generator
    seed: int | None = None                   # seeds the device generator (``generator_on``)
    combine: str = "min"                      # how the negatives are combined
    alpha: float | None = None                # plausibility restriction (None/0 = off)
    max_tokens: int | None = None             # guide completion positions < max_tokens only
    min_p: float = 0.0
    tokens: list[int] = field(default_factory=list)   # the token forced at each step
    error: str | None = None

    _device_generators: dict = field(default_factory=dict, repr=False)

    def generator_on(self, device) -> torch.Generator:
        """The group's seeded generator on ``device`` (the logits' device): ``generator`` itself
        when it lives there, else one made once from ``seed``."""
        device = torch.device(device)
        if self.generator is not None and self.generator.device.type == device.type:
            return self.generator
        if device not in self._device_generators:
            from negspace_node.guidance import make_generator

            self._device_generators[device] = make_generator(self.seed, device)
        return self._device_generators[device]

    def fail(self, reason: str) -> None:
        if self.error is None:                # keep the first reason
            self.error = reason


class GroupRegistry:
    def __init__(self) -> None:
        self._groups: dict[str, GroupState] = {}
        self._lock = threading.Lock()

    def register(self, state: GroupState) -> None:
        with self._lock:
            self._groups[state.group_id] = state

    def get(self, group_id: str) -> GroupState | None:
        return self._groups.get(group_id)

    def discard(self, group_id: str) -> None:
        with self._lock:
            self._groups.pop(group_id, None)

    def fail(self, group_id: str, reason: str) -> None:
        state = self._groups.get(group_id)
        if state is not None:
            state.fail(reason)

    def __len__(self) -> int:
        return len(self._groups)


#: One registry per process: the processor and scheduler instances vLLM builds find it here.
REGISTRY = GroupRegistry()


def group_of(sampling_params) -> tuple[str, int, int] | None:
    """(group id, role, size) of a request's SamplingParams, or None for a plain request."""
    extra = getattr(sampling_params, "extra_args", None)
    if not extra:
        return None
    info = extra.get(GROUP_KEY)
    if info is None:
        return None
    return str(info["id"]), int(info["role"]), int(info["size"])


def guides_at(state: GroupState, position: int) -> bool:
    """Whether completion position ``position`` of the group is guided (see GenerationRequest)."""
    return state.max_tokens is None or position < state.max_tokens
