"""The method's policy, apart from the crash-safe slot loop that carries it out (``rounds.py``).

Everything here is a pure function of a run's ``RunConfig`` and what a slot has seen so far, so
it is tested without services and a replayed slot decides exactly as the first time did:

- **prompts**: the positive prompt of an attempt (augmentation prompt + base, the in-prompt
  history, the two-stage angle, the verbalized-sampling request) and the reply's text (the
  candidate drawn from a verbalized reply);
- **negatives**: how many dense instructions a slot asks for, which k it uses (``assign``:
  ``shared`` the k densest, ``sample`` its own k of the densest ``pool``), and how they are
  formatted as negative prompts (``prompts.negative_prompts``; a superset negative gets the same
  angle / verbalized request as its positive, so it stays ``positive + X``);
- **the scale schedule**: ``GuidanceSchedule.at(retries)``, one ``Guidance`` value per attempt;
- **acceptance**: novel (the controller's ``/accept`` check) and, with the two-sided rule, on topic
  (cosine to the base >= ``on_topic_min``), each with its own retry budget; and which attempt a
  slot keeps when a budget runs out (``keep``: the last one, or the best one).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from negspace_contracts.node import Guidance
from negspace_contracts.orchestrator import RunConfig

from negspace_orchestrator import prompts
from negspace_orchestrator.fanout import derive_seed
from negspace_orchestrator.store import AttemptRow

MAX_EMPTY_OUTPUTS = 5  # empty (or unparseable) generations tolerated per slot before the run fails
SUPERSET_FORMATS = ("superset", "superset-list")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


@dataclass
class Tally:
    """What a slot has spent: novelty retries (too similar: the scale rises), off-topic attempts
    (two-sided rule: same scale, a new seed) and empty replies (neither budget)."""

    retries: int = 0
    off_topic: int = 0
    empties: int = 0


class Method:
    """The policy of one run (built from its config; cheap, stateless)."""

    def __init__(self, config: RunConfig) -> None:
        self.cfg = config

    # ---- prompts ---------------------------------------------------------------------------
    def positive(self, source: str) -> str:
        """The slot's base positive prompt (augmentation prompt + base or previous text)."""
        return prompts.positive_prompt(prompts.augmentation_prompt(self.cfg.augmentation_prompt), source)

    @property
    def in_prompt(self) -> bool:
        """Negatives listed in the positive (the in-prompt history baseline), not used for CFG."""
        return self.cfg.negatives.use == "prompt"

    def finish(self, prompt: str, angle: str | None) -> str:
        """What every attempt adds after the slot's prompt: the two-stage angle, then the verbalized
        request (applied to the positive and to superset negatives alike)."""
        if angle:
            prompt = prompts.with_angle(prompt, angle, self.cfg.two_stage.prompt)
        if self.cfg.prompting == "verbalized":
            prompt = prompts.verbalized_prompt(prompt, self.cfg.verbalized.candidates)
        return prompt

    def attempt_prompt(self, source: str, negatives: list[str], angle: str | None) -> str:
        prompt = self.positive(source)
        if self.in_prompt:
            prompt = prompts.history_prompt(prompt, negatives)
        return self.finish(prompt, angle)

    def attempt_negatives(self, negatives: list[str], angle: str | None) -> list[str]:
        """The negative prompts an attempt sends: the slot's, with the attempt's own additions
        where a negative contains the positive (superset forms)."""
        if self.in_prompt:
            return []
        if self.cfg.negative_format in SUPERSET_FORMATS:
            return [self.finish(n, angle) for n in negatives]
        return negatives

    def max_tokens(self) -> int:
        if self.cfg.prompting == "verbalized":
            v = self.cfg.verbalized
            return v.max_tokens or min(4096, self.cfg.max_tokens * v.candidates)
        return self.cfg.max_tokens

    def angle_prompt(self, source: str, used: list[str]) -> str:
        return prompts.angle_prompt(source, used, self.cfg.two_stage.prompt)

    def reply_text(self, text: str, seed: int) -> str:
        """The instruction an attempt produced: the reply itself, or (verbalized) one candidate drawn
        by the stated probabilities with the attempt's seed ("" when none parses: counted as empty)."""
        text = text.strip()
        if self.cfg.prompting == "verbalized":
            return prompts.draw_verbalized(prompts.parse_verbalized(text), derive_seed(seed, "verbalized"))
        return text

    # ---- negatives -------------------------------------------------------------------------
    def dense_count(self) -> int:
        """How many of the densest instructions a slot asks the controller for."""
        n = self.cfg.negatives
        return n.pool if n.assign == "sample" else n.k

    def pick_dense(self, texts: list[str], node: int, round_: int) -> list[str]:
        """The slot's k of the controller's densest (densest first): the first k (``shared``), or
        k drawn from them with a per-(node, round) seed (``sample``), kept in density order."""
        n = self.cfg.negatives
        texts = [t for t in texts if t.strip()]
        if n.assign != "sample" or len(texts) <= n.k:
            return texts[:n.k]
        rng = random.Random(derive_seed(self.cfg.seed, "sample-negatives", node, round_))
        return [texts[i] for i in sorted(rng.sample(range(len(texts)), n.k))]

    def pick_random(self, accepted: list[str], node: int, round_: int) -> list[str]:
        """``source: random``: k accepted instructions of the run, drawn with a per-slot seed."""
        pool = sorted({t for t in accepted if t.strip()})
        return random.Random(derive_seed(self.cfg.seed, "random-negatives", node, round_)).sample(
            pool, min(self.cfg.negatives.k, len(pool)))

    def format_negatives(self, texts: list[str], source: str) -> list[str]:
        """The slot's negatives as stored with its attempts: kept as they are for the in-prompt
        history, else formatted as negative prompts (``negative_format``)."""
        if self.in_prompt:
            return texts
        return prompts.negative_prompts(self.cfg, texts, self.positive(source))

    # ---- the scale schedule ----------------------------------------------------------------
    def guidance(self, tally: Tally, cfg_guided: bool) -> Guidance | None:
        """The attempt's guidance (None: plain, e.g. the bootstrap or the in-prompt history)."""
        return self.cfg.guidance.at(tally.retries) if cfg_guided else None

    # ---- acceptance ------------------------------------------------------------------------
    @property
    def two_sided(self) -> bool:
        return self.cfg.acceptance.rule == "two-sided"

    def is_on_topic(self, on_topic: float | None) -> bool:
        """On topic under the run's rule (always, with the one-sided ``novel`` rule)."""
        return not self.two_sided or (on_topic is not None and on_topic >= self.cfg.acceptance.on_topic_min)

    def force_off_topic(self, tally: Tally) -> bool:
        """``keep: last``: an off-topic attempt that spends the on-topic budget is forced in."""
        return self.cfg.acceptance.keep == "last" and tally.off_topic > self.cfg.acceptance.on_topic_retries

    def force_novel(self, tally: Tally) -> bool:
        """``keep: last`` (the reference): the attempt after the last novelty retry is forced in."""
        return self.cfg.acceptance.keep == "last" and tally.retries >= self.cfg.guidance.max_retries

    def exhausted(self, tally: Tally) -> bool:
        """``keep: best``: a budget is spent, so the slot keeps its best attempt instead of trying again."""
        a = self.cfg.acceptance
        return a.keep == "best" and (tally.retries > self.cfg.guidance.max_retries
                                     or (self.two_sided and tally.off_topic > a.on_topic_retries))

    def best(self, attempts: list[AttemptRow]) -> AttemptRow:
        """The attempt a slot keeps when its retries ran out (``keep: best``): the least similar to
        the collection (its ``max_similarity`` when it was checked) among the on-topic ones; when
        none is on topic, the most on-topic one. Ties: the earlier attempt. Reads only persisted
        values, so a replay keeps the same one."""
        texts = [a for a in attempts if a.text]
        if not texts:
            raise ValueError("no attempt with a text to keep")
        on = [a for a in texts if self.is_on_topic(a.on_topic)]
        if on:
            return min(on, key=lambda a: (a.max_similarity if a.max_similarity is not None else -math.inf,
                                          a.attempt))
        return min(texts, key=lambda a: (-(a.on_topic if a.on_topic is not None else -math.inf), a.attempt))
