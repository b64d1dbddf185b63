"""When a sequence ends, and what text it returns: shared by every engine.

A sequence ends when the positive branch emits an end-of-sequence token (``finish_reason
"stop"``, the token is not returned), when its text contains one of the request's stop strings
(``"stop"``; the text is cut before the stop string, and the token ids after the token that
completed it are dropped), or after ``max_tokens`` tokens (``"length"``).
"""

from __future__ import annotations

from collections.abc import Iterable

from negspace_node.engines.base import GenerationOutput


def eos_token_ids(tokenizer, *configs) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and any model / generation configs given."""
    ids: set[int] = set()
    for source in (tokenizer, *configs):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple, set, frozenset)) else [value])
    return frozenset(int(i) for i in ids)


class StopChecker:
    """Feed it one token at a time; it says when the sequence is finished and builds the output."""

    def __init__(self, tokenizer, eos_ids: Iterable[int], stops: Iterable[str], max_tokens: int,
                 prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.stops = tuple(s for s in stops if s)
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._text: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> bool:
        """Record ``token``; return True when the sequence is finished."""
        if self.finished:
            return True
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return True
        self.token_ids.append(int(token))
        if self.stops:
            text = self.decode()
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self._text = text[:cut]
                self.finish_reason = "stop"
                return True
        if len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"
            return True
        return False

    def decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def output(self) -> GenerationOutput:
        text = self._text if self._text is not None else self.decode()
        return GenerationOutput(token_ids=list(self.token_ids), text=text,
                                finish_reason=self.finish_reason or "length",  # type: ignore[arg-type]
                                prompt_tokens=self.prompt_tokens)
