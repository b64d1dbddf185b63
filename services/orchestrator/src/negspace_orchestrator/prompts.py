"""Every prompt the orchestrator sends, in one place."""

from __future__ import annotations

import re

DEFAULT_AUGMENTATION_PROMPT = (
    "You rewrite instructions. Read the base instruction below and write ONE augmented instruction "
    "that keeps the base instruction's intent but makes it more specific: add concrete constraints, "
    "parameters and domain detail, and steer it in a new direction that the base does not already "
    "take. Answer with the augmented instruction only: no preamble, no label, no explanation, no "
    "answer to the instruction.\n\nBase instruction: "
)

QA_PROMPT = (
    "Turn the instruction below into exactly ONE question-and-answer pair. The question must be "
    "self-contained and follow the instruction; the answer must answer it correctly and completely. "
    "Write exactly this format and nothing else:\nQuestion: <the question>\nAnswer: <the answer>\n\n"
    "Instruction: "
)

QA_RETRY_SUFFIX = ("\n\nYour reply MUST start with 'Question:' and contain one line starting with "
                   "'Answer:'.")


def augmentation_prompt(config_prompt: str | None) -> str:
    return DEFAULT_AUGMENTATION_PROMPT if config_prompt is None else config_prompt


def positive_prompt(aug_prompt: str, source: str) -> str:
    """The generation prompt: the augmentation prompt followed by the base (or previous) text."""
    return f"{aug_prompt}{source}"


HISTORY_PROMPT = ("\n\nThese instructions already exist. Write one that is clearly different from all of "
                  "them (another topic, setting or kind of task), not a variation of any:\n")


def history_prompt(positive: str, existing: list[str]) -> str:
    """The in-prompt history baseline (no CFG): the positive prompt followed by the existing
    (dense-region) instructions, with a request for something different."""
    if not existing:
        return positive
    return positive + HISTORY_PROMPT + "".join(f"- {' '.join(t.split())}\n" for t in existing)


def negative_prompt(config, existing: str) -> str:
    """What a node receives as one negative prompt for an existing (dense-region) instruction.

    ``raw`` (the reference): the instruction itself, so the negative branch predicts what the model
    would write when *given* that instruction. ``augment``: the positive's own request applied to
    the existing instruction, so the negative branch predicts an augmentation near it, the text
    the guided branch should move away from.
    """
    if config.negative_format == "augment":
        return positive_prompt(augmentation_prompt(config.augmentation_prompt), existing)
    return existing


_LABEL = re.compile(r"^\s*[*_#>\-\s]*(?:(?:base|augmented|rewritten|new|improved)\s+)?"
                    r"(?:instructions?|augmentation|augmented\s+version)\s*[*_]*\s*:\s*[*_]*\s*",
                    re.IGNORECASE)


def clean_instruction(text: str) -> str:
    """Strip labels the model echoed ("Instruction:", "Augmentation:") and surrounding quotes."""
    out = text.strip()
    for _ in range(3):
        new = _LABEL.sub("", out, count=1).strip()
        if new == out:
            break
        out = new
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'":
        out = out[1:-1].strip()
    return out


_Q = re.compile(r"(?:^|\n)\s*[*_#\s]*(?:Q|Question)\s*[*_]*\s*[:：]\s*[*_]*(?P<q>.*?)"
                r"\n?\s*[*_#\s]*(?:A|Answer)\s*[*_]*\s*[:：]\s*[*_]*(?P<a>.*)", re.IGNORECASE | re.DOTALL)
_Q_LABEL = re.compile(r"^\s*[*_]*\s*(?:Q|Question)\s*[*_]*\s*[:：]\s*[*_]*\s*", re.IGNORECASE)
_NEXT_PAIR = re.compile(r"\n\s*[*_#\s]*(?:Q|Question)\s*[*_]*\s*[:：]", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"^[\[<(].*[\]>)]$|^\.\.\.$", re.DOTALL)


def parse_qa(text: str) -> tuple[str, str] | None:
    """``Question: ... Answer: ...`` -> (question, answer); None when the output has no usable pair.

    Only the first pair is kept (a second "Question:" line ends the answer); a repeated label is
    dropped from the question; an answer that is itself a question label or a placeholder such
    as ``[answer]`` does not count.
    """
    m = _Q.search(text)
    if not m:
        return None
    question = m.group("q")
    while (stripped := _Q_LABEL.sub("", question, count=1)) != question:
        question = stripped
    question = question.strip().strip("*_ ").strip()
    answer = m.group("a")
    nxt = _NEXT_PAIR.search(answer)
    if nxt:
        answer = answer[: nxt.start()]
    answer = answer.strip().strip("*_ ").strip()
    if not question or not answer or _Q_LABEL.match(answer) or _PLACEHOLDER.match(answer):
        return None
    return question, answer
