"""When a sequence ends, and what text it returns: shared by every engine.

A sequence ends when the positive branch emits an end-of-sequence token (``finish_reason
"stop"``, the token is not returned), when its text contains one of the request's stop strings
(``"stop"``; the text is cut before the stop string, and the token ids after the token that
completed it are dropped), or after ``max_tokens`` tokens (``"length"``).

For streaming, ``stable_text()`` is the part of the text that no later token can change, and a
checker built with ``on_text`` calls it each time that part grows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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

    #: Characters a tokenizer's ``clean_up_tokenization_spaces`` may still rewrite at the end of
    #: the text (it drops the space in " n't", " 's", " ." ... once the next token arrives).
    CLEANUP_HOLD = 4

    def __init__(self, tokenizer, eos_ids: Iterable[int], stops: Iterable[str], max_tokens: int,
                 prompt_tokens: int, on_text: Callable[[str], None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.stops = tuple(s for s in stops if s)
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._text: str | None = None
        self.on_text = on_text
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        if getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._hold += self.CLEANUP_HOLD
        self._stable = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> bool:
        """Record ``token``; return True when the sequence is finished."""
        finished = self._add(token)
        if self.on_text is not None and not finished:
            text = self.stable_text()
            if len(text) > self._stable:
                self._stable = len(text)
                self.on_text(text)
        return finished

    def stable_text(self) -> str:
        """The text so far that no later token can change: all of it once finished; while
        running, without a trailing incomplete UTF-8 character (decoded as U+FFFD) and without
        the last characters a stop string (or the tokenizer's space clean-up) could still cut."""
        if self.finished:
            return self.output().text
        text = self.decode().rstrip("\ufffd")
        return text[:max(0, len(text) - self._hold)]

    def _add(self, token: int) -> bool:
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
