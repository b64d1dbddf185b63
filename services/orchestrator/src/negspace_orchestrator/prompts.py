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


#: ``superset`` negatives: the positive prompt itself plus one existing instruction marked as
#: already written, so ``negative = positive + w_X`` and guidance subtracts only the pull toward X.
ALREADY_WRITTEN_ONE = "\n\nAn augmented instruction that was already written: "
#: ``superset-list``: one negative that lists every chosen instruction as already written.
ALREADY_WRITTEN_MANY = "\n\nAugmented instructions that were already written:\n"


def negative_prompt(config, existing: str, positive: str | None = None) -> str:
    """What a node receives as one negative prompt for an existing (dense-region) instruction.

    ``raw`` (the reference): the instruction itself, so the negative branch predicts what the model
    would write when *given* that instruction. ``augment``: the positive's own request applied to
    the existing instruction, so the negative branch predicts an augmentation near it; everything
    specific to the base is then multiplied by the scale (it sharpens: docs/findings.md).
    ``superset``: the ``positive`` prompt followed by the existing instruction as one already
    written, so the two branches share everything but that instruction and guidance subtracts only
    the pull toward it.
    """
    fmt = config.negative_format
    if fmt == "augment":
        return positive_prompt(augmentation_prompt(config.augmentation_prompt), existing)
    if fmt == "superset":
        if positive is None:
            raise ValueError("the superset form needs the positive prompt")
        return positive + ALREADY_WRITTEN_ONE + " ".join(existing.split())
    return existing


def negative_prompts(config, existing: list[str], positive: str) -> list[str]:
    """Every negative prompt of one generation: one per existing instruction, or (``superset-list``)
    one negative listing them all after the positive prompt."""
    if not existing:
        return []
    if config.negative_format == "superset-list":
        return [positive + ALREADY_WRITTEN_MANY + "".join(f"- {' '.join(t.split())}\n" for t in existing)]
    return [negative_prompt(config, t, positive) for t in existing]


# ---- two-stage intent (prompting: two-stage) -----------------------------------------------------
ANGLE_PROMPT = ("Base instruction: {base}\n\nName ONE specific angle for a new instruction within this base "
                "instruction: a subtopic, setting, audience or kind of task. Answer with the angle only, in "
                "at most six words.")
ANGLE_USED = "\n\nAngles already used (pick a clearly different one):\n"
WITH_ANGLE = "\n\nWrite it from this angle: "


#: ``two_stage.prompt: topic``, the second wording: a topic rather than an "angle" (read
#: geometrically on a poem base by the 1.5B), asked for in English (the hot first wording gave
#: mixed-script angles), and stage two says the reply is the instruction, not what it asks for (on
#: "Write a question about ..." the first wording got the questions themselves).
TOPIC_PROMPT = ("Base instruction: {base}\n\nSuggest ONE specific topic that a new, more specific version of "
                "this instruction could be about: a subtopic, setting or audience. Answer in English with the "
                "topic only, in at most six words.")
TOPIC_USED = "\n\nTopics already used (suggest a clearly different one):\n"
WITH_TOPIC = ("\n\nThe augmented instruction must be about this topic: {topic}\nWrite the instruction itself, "
              "asking for the same kind of thing as the base instruction; do not write what it asks for.")

_STAGE_ONE = {"angle": (ANGLE_PROMPT, ANGLE_USED), "topic": (TOPIC_PROMPT, TOPIC_USED)}


def angle_prompt(base: str, used: list[str], wording: str = "angle") -> str:
    """Stage one: ask for a short angle (``wording`` ``topic``: a topic) within ``base``; with
    ``used``, list them and ask for a new one."""
    head, used_head = _STAGE_ONE[wording]
    prompt = head.format(base=base)
    if used:
        prompt += used_head + "".join(f"- {' '.join(a.split())}\n" for a in used)
    return prompt


def clean_angle(text: str, max_words: int = 12, wording: str = "angle") -> str:
    """The angle as one short line: the first non-empty line, labels, list marks and quotes
    stripped, at most ``max_words`` words ("" when nothing is left)."""
    for line in text.strip().splitlines():
        line = re.sub(r"^\s*(?:[-*#>]+|\d+[.)])\s*", "", line)
        line = re.sub(rf"^\s*[*_]*\s*{wording}\s*[*_]*\s*:\s*", "", line, flags=re.IGNORECASE).strip().strip("*_\"' ")
        if line:
            return " ".join(line.split()[:max_words]).rstrip(".,;:")
    return ""


def with_angle(prompt: str, angle: str, wording: str = "angle") -> str:
    """Stage two: the prompt (positive, or a superset negative) conditioned on the angle."""
    if not angle:
        return prompt
    if wording == "topic":
        return prompt + WITH_TOPIC.format(topic=angle)
    return f"{prompt}{WITH_ANGLE}{angle}"


# ---- verbalized sampling (prompting: verbalized) ------------------------------------------------
VERBALIZED_PROMPT = (
    "\n\nInstead of one answer, write {k} different augmented instructions, each with the probability "
    "(a number between 0 and 1) that you would write it. Use exactly this format, one pair per candidate "
    "and nothing else:\nInstruction: <the instruction>\nProbability: <number>\n")


def verbalized_prompt(positive: str, k: int) -> str:
    """The positive prompt asking for ``k`` candidates with their probabilities (Zhang et al. 2025)."""
    return positive + VERBALIZED_PROMPT.format(k=k)


_VS_PAIR = re.compile(
    r"(?:^|\n)\s*[*_#>\-\s]*(?:\d+\s*[.):]\s*)?[*_]*\s*(?:instruction|candidate)\s*(?:\d+)?\s*[*_]*\s*[:：]"
    r"\s*[*_]*(?P<text>.+?)\s*(?:\n|\(|\[|\s[-–—]\s)\s*[*_#>\-\s]*[*_]*\s*(?:probability|prob\.?|p)\s*[*_]*\s*"
    r"[:=：]?\s*[*_]*\s*(?P<p>\d*\.?\d+)[ \t]*(?P<pct>%?)",
    re.IGNORECASE)


def parse_verbalized(text: str) -> list[tuple[str, float]]:
    """``Instruction: ... / Probability: ...`` pairs -> [(instruction, weight)], in order; pairs with
    an empty instruction or a non-positive probability are dropped; percentages are read as such;
    labels, numbering and quotes are stripped. [] when nothing parses (the attempt counts as empty)."""
    out: list[tuple[str, float]] = []
    for m in _VS_PAIR.finditer(text):
        cand = clean_instruction(m.group("text").strip().strip("*_ "))
        try:
            p = float(m.group("p"))
        except ValueError:
            continue
        if m.group("pct"):
            p /= 100.0
        if cand and p > 0:
            out.append((cand, p))
    return out


def draw_verbalized(candidates: list[tuple[str, float]], seed: int) -> str:
    """One candidate drawn with probability proportional to its stated probability, by ``seed``
    (the slot's attempt seed: a replay draws the same one). "" for no candidates."""
    import random

    if not candidates:
        return ""
    total = sum(p for _, p in candidates)
    x = random.Random(seed).random() * total
    for cand, p in candidates:
        x -= p
        if x < 0:
            return cand
    return candidates[-1][0]


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


# ---- Q/A quality --------------------------------------------------------------------------------
# Why a Q/A pair is rejected (QAResult.rejections counts them; the store keeps one per record).
REJECT_UNPARSEABLE = "unparseable"   # no "Question: ... Answer: ..." pair in the output
REJECT_EMPTY = "empty"               # the instruction, question or answer is empty after cleaning
REJECT_ECHO = "echo"                 # the answer equals or restates the question
REJECT_TRUNCATED = "truncated"       # generation stopped at max_tokens (finish_reason "length")
REJECT_LANGUAGE = "language"         # written in another script than the base instruction
REJECT_BARE_NUMBER = "bare_number"   # a bare number for a question that asks to explain/describe
REJECT_INCONSISTENT = "inconsistent"  # self-consistency: a second answer's final number differs
REJECT_REASONS = (REJECT_UNPARSEABLE, REJECT_EMPTY, REJECT_ECHO, REJECT_TRUNCATED, REJECT_LANGUAGE,
                  REJECT_BARE_NUMBER, REJECT_INCONSISTENT)

# Self-consistency (QARequest.self_consistency): the parsed question is answered once more.
CHECK_PROMPT = "Answer the following question. End your reply with the final answer.\n\n"
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number in an answer ("... so she has 12 apples." -> 12.0), None without one:
    the checkable part of an answer to a math word problem."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def consistent(first: str, second: str) -> bool | None:
    """Do two answers to one question agree? By their final numbers; None when either has none
    (not checkable this way: the pair is kept and counted as unchecked)."""
    a, b = final_number(first), final_number(second)
    if a is None or b is None:
        return None
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))

_WORD = re.compile(r"\w+", re.UNICODE)
_MARKUP = re.compile(r"[*_`#>]+")
_EXPLAIN = re.compile(r"\b(?:explain|describe|why|discuss|justify|compare|elaborate|illustrate|"
                      r"how (?:does|do|did|can|would|is|are))\b", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"^[\s$€£¥~≈=-]*[-+]?\d[\d,]*(?:\.\d+)?\s*%?\s*[.!]?$")
ECHO_OVERLAP = 0.8      # share of the answer's words found in the question ...
ECHO_COVERAGE = 0.6     # ... and of the question's words found in the answer
ECHO_MIN_WORDS = 4      # shorter answers ("5", "Paris") may legitimately reuse the question's words


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_echo(question: str, answer: str) -> bool:
    """The answer equals the question once normalized (case, punctuation, markup), or restates it:
    it has ECHO_MIN_WORDS or more words, at least ECHO_OVERLAP of them are the question's, and it
    covers at least ECHO_COVERAGE of the question's words. "3 cats have 12 legs" for "How many legs
    do 3 cats have?" reuses the question's words but covers too little of it to be a restatement."""
    q, a = _words(question), _words(answer)
    if not a:
        return False
    if a == q:
        return True
    if len(a) < ECHO_MIN_WORDS:
        return False
    qs, as_ = set(q), set(a)
    overlap = sum(w in qs for w in a) / len(a)
    coverage = len(qs & as_) / len(qs) if qs else 0.0
    return overlap >= ECHO_OVERLAP and coverage >= ECHO_COVERAGE


def script_of(text: str) -> str | None:
    """The dominant writing system of ``text``'s letters ("LATIN", "CYRILLIC", "CJK", "ARABIC", ...,
    the first word of each letter's Unicode name), or None without letters. A cheap stand-in for
    language identification: it tells English from Russian or Chinese, not English from French."""
    import unicodedata

    counts: dict[str, int] = {}
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        script = name.split(" ")[0] if name else "OTHER"
        if script in ("HIRAGANA", "KATAKANA", "HANGUL"):
            script = "CJK"
        counts[script] = counts.get(script, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda k: counts[k])


def same_language(reference: str, text: str, min_share: float = 0.5) -> bool:
    """At least ``min_share`` of ``text``'s letters are in ``reference``'s dominant script."""
    ref = script_of(reference)
    if ref is None:
        return True
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return True
    return sum(script_of(ch) == ref for ch in letters) / len(letters) >= min_share


def is_bare_number(question: str, answer: str) -> bool:
    """A bare number (with at most a currency sign, %, a final period) answering a question
    that asks to explain, describe, compare or say why/how."""
    return bool(_EXPLAIN.search(question)) and bool(_BARE_NUMBER.match(_MARKUP.sub("", answer)))


def judge_qa(text: str, *, base_instruction: str, finish_reason: str | None) -> tuple[tuple[str, str] | None, str | None]:
    """Parse one formatter output and check the pair: ``((question, answer), None)`` when it is
    kept, ``(None, reason)`` with one of REJECT_REASONS otherwise (the first that applies)."""
    if finish_reason == "length":
        return None, REJECT_TRUNCATED
    if not _Q.search(text):
        return None, REJECT_UNPARSEABLE
    pair = parse_qa(text)
    if pair is None:
        return None, REJECT_EMPTY
    question, answer = pair
    if not _words(question) or not _MARKUP.sub("", answer).strip():
        return None, REJECT_EMPTY
    if is_echo(question, answer):
        return None, REJECT_ECHO
    if not same_language(base_instruction, question + " " + answer):
        return None, REJECT_LANGUAGE
    if is_bare_number(question, answer):
        return None, REJECT_BARE_NUMBER
    return pair, None
