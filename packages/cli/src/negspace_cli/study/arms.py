"""The named arms a study can run: each one is a documented run configuration.

An arm is a partial ``RunConfig`` (everything but the base instruction, the seed and the study's
common size settings). ``kind`` says how the analysis treats it:

- ``plain``: plain sampling (a ``baseline`` run); the plain arms together draw the temperature curve
  every other arm is compared against;
- ``baseline``: a strong non-CFG competitor (in-prompt history, resample-on-similarity);
- ``reference``: the seed method;
- ``guided``: a CFG configuration (the method and its variants).

Shared choices, so that arms differ in one thing at a time:
- every retrying arm (all but the reference and plain ones) judges similarity with the calibrated
  threshold ``similarity_quantile`` = ``CALIBRATED_QUANTILE`` (retry when the new text is closer to
  its nearest neighbour than the median instruction of the run is to its own) and at most 3 retries;
- the guided variants use the ``augment`` form of negatives, dense negatives (k 3, knn 5), scale 2.0
  from the first attempt + 0.5 per retry, unless the arm says otherwise;
- the superset variants (issue 21) are ``superset``: the ``superset`` form of negatives (the positive
  plus one existing instruction as already written), otherwise as ``guided`` but with a flat scale
  2.0 (step 0); each ``superset-*`` arm changes one thing of it;
- the two-sided arms accept only texts on topic as well as novel (cosine to the base >=
  ``ON_TOPIC_FLOOR`` in the controller's embedder, 3 on-topic retries) and keep the best attempt when
  retries run out (``acceptance: {rule: two-sided, keep: best}``); ``retry-best`` is retry-only with
  keep best alone, so the two parts can be told apart;
- ``two-stage`` and ``verbalized`` change only the prompting of retry-only (k 0); ``two-stage`` also
  writes the instruction at T 0.7 after an angle sampled at T 1.2 (the method is both);
- ablations without negatives: every ``superset*`` arm's is ``retry-only`` (with k 0 the scale and the
  form of negatives do nothing, and the retry settings are the same), ``two-sided-superset``'s is
  ``two-sided``, ``two-stage-superset``'s ``two-stage``, ``two-stage-topic-superset``'s
  ``two-stage-topic``, ``verbalized-superset``'s ``verbalized``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ArmKind = Literal["plain", "baseline", "reference", "guided"]

#: The calibrated similarity threshold every retrying arm shares (a quantile of the run's own
#: nearest-neighbour similarities; see RunConfig.similarity_quantile).
CALIBRATED_QUANTILE = 0.5
#: The plain arm the quality bar refers to ("no more than 0.05 below plain sampling at T=1.0").
PLAIN_REFERENCE_ARM = "plain-t1.0"


@dataclass(frozen=True)
class Arm:
    name: str
    kind: ArmKind
    doc: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "baseline" if self.kind == "plain" else "guided"


def _plain(t: float, top_p: float = 0.9, min_p: float = 0.0) -> dict[str, Any]:
    return {"temperature": t, "top_p": top_p, "min_p": min_p}


_RETRY = {"similarity_quantile": CALIBRATED_QUANTILE, "guidance": {"start": 1.0, "step": 0.5, "max_retries": 3}}
_GUIDED = {"similarity_quantile": CALIBRATED_QUANTILE, "negative_format": "augment",
           "negatives": {"k": 3, "knn": 5, "source": "dense", "use": "guidance"},
           "guidance": {"start": 2.0, "step": 0.5, "max_retries": 3}}
_SUPERSET = {"similarity_quantile": CALIBRATED_QUANTILE, "negative_format": "superset",
             "negatives": {"k": 3, "knn": 5, "source": "dense", "use": "guidance"},
             "guidance": {"start": 2.0, "step": 0.0, "max_retries": 3, "combine": "min"}}
_TWO_SIDED = {"acceptance": {"rule": "two-sided", "on_topic_retries": 3, "keep": "best"}}
_TWO_STAGE = {"prompting": "two-stage", "temperature": 0.7, "two_stage": {"angle_temperature": 1.2}}
_VERBALIZED = {"prompting": "verbalized", "verbalized": {"candidates": 5}}
#: The second two-stage wording (prompts.TOPIC_PROMPT) with the cooler first stage of two-stage-cool.
_TWO_STAGE_TOPIC = {"prompting": "two-stage", "temperature": 0.7,
                    "two_stage": {"angle_temperature": 1.0, "angle_top_p": 0.9, "prompt": "topic"}}


def _with(base: dict[str, Any], **over: Any) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


_ARMS = [
    # ---- the plain-sampling curve --------------------------------------------------------------
    Arm("plain-t0.7", "plain", "plain sampling, T 0.7, top-p 0.9", _plain(0.7)),
    Arm("plain-t1.0", "plain", "plain sampling, T 1.0, top-p 0.9 (the seed's sampling settings)", _plain(1.0)),
    Arm("plain-t1.1", "plain", "plain sampling, T 1.1, top-p 0.9", _plain(1.1)),
    Arm("plain-t1.2", "plain", "plain sampling, T 1.2, top-p 0.9", _plain(1.2)),
    Arm("plain-t1.4", "plain", "plain sampling, T 1.4, top-p 0.9", _plain(1.4)),
    Arm("plain-t1.2-p1", "plain", "plain sampling, T 1.2, top-p 1.0", _plain(1.2, 1.0)),
    Arm("plain-t1.5-minp0.1", "plain", "plain sampling, T 1.5, min-p 0.1, top-p 1.0", _plain(1.5, 1.0, 0.1)),
    Arm("plain-t2.0-minp0.1", "plain", "plain sampling, T 2.0, min-p 0.1, top-p 1.0", _plain(2.0, 1.0, 0.1)),
    # ---- baselines a reviewer demands ----------------------------------------------------------
    Arm("retry-only", "baseline", "resample on similarity with no negatives (k 0): rejection alone",
        _with(_RETRY, negatives={"k": 0})),
    Arm("history", "baseline", "in-prompt history: the positive lists the 3 densest instructions and asks "
        "for something different; no CFG; retries as retry-only",
        _with(_RETRY, negatives={"k": 3, "knn": 5, "source": "dense", "use": "prompt"})),
    Arm("reference", "reference", "the seed method exactly (preset reference: scale 1.0 +0.5 per retry, at "
        "most 5, threshold 0.9, raw negatives, min over raw logits)", {"preset": "reference"}),
    Arm("reference-calibrated", "reference", "the reference with its threshold calibrated to the embedder "
        f"(quantile {CALIBRATED_QUANTILE} of the run's nearest-neighbour similarities)",
        {"preset": "reference", "similarity_quantile": CALIBRATED_QUANTILE}),
    # ---- the method and its variants -----------------------------------------------------------
    Arm("guided", "guided", "CFG from the first attempt (scale 2.0, +0.5 per retry, at most 3), 3 dense "
        "negatives in augment form, min over raw logits", _GUIDED),
    Arm("random-negatives", "guided", "as guided, but the negatives are 3 random accepted instructions "
        "(isolates the density selection)", _with(_GUIDED, negatives={"source": "random"})),
    Arm("guided-raw", "guided", "as guided, with the reference's raw negatives", _with(_GUIDED, negative_format="raw")),
    Arm("guided-retry-cfg", "guided", "as guided, but CFG only on retries (scale 1.0 first)",
        _with(_GUIDED, guidance={"start": 1.0})),
    Arm("guided-mean", "guided", "as guided, negatives combined by mean", _with(_GUIDED, guidance={"combine": "mean"})),
    Arm("guided-max", "guided", "as guided, negatives combined by max (away from what ANY negative favours)",
        _with(_GUIDED, guidance={"combine": "max"})),
    Arm("guided-logprobs", "guided", "as guided, in log-probability space",
        _with(_GUIDED, guidance={"space": "logprobs"})),
    Arm("guided-window16", "guided", "as guided, guidance on the first 16 tokens only",
        _with(_GUIDED, guidance={"max_tokens": 16})),
    Arm("guided-alpha", "guided", "as guided, plausibility restriction alpha 0.1",
        _with(_GUIDED, guidance={"alpha": 0.1})),
    Arm("guided-alpha-t1.3", "guided", "as guided-alpha at T 1.3, top-p 1.0 (the restriction keeps the "
        "hotter sampling on topic)", _with(_GUIDED, guidance={"alpha": 0.1}, temperature=1.3, top_p=1.0)),
    Arm("guided-s4", "guided", "as guided with scale 4.0 (+1.0 per retry)", _with(_GUIDED, guidance={"start": 4.0, "step": 1.0})),
    Arm("guided-t1.2", "guided", "as guided at T 1.2", _with(_GUIDED, temperature=1.2)),
    Arm("default", "guided", "a bare POST /runs: RunConfig's defaults as they are now", {}),
    # ---- issue 21: negatives that push away instead of sharpening ----------------------------
    Arm("superset", "guided", "superset negatives (the positive plus one dense instruction marked as already "
        "written: guidance subtracts only the pull toward it), min, flat scale 2.0 (step 0), at most 3 retries; "
        "ablation: retry-only", _SUPERSET),
    Arm("superset-max", "guided", "as superset, negatives combined by max", _with(_SUPERSET, guidance={"combine": "max"})),
    Arm("superset-mean", "guided", "as superset, negatives combined by mean",
        _with(_SUPERSET, guidance={"combine": "mean"})),
    Arm("superset-rising", "guided", "as superset, the scale rising +0.5 per retry",
        _with(_SUPERSET, guidance={"step": 0.5})),
    Arm("superset-list", "guided", "as superset, one negative listing all 3 instructions as already written",
        _with(_SUPERSET, negative_format="superset-list")),
    Arm("superset-slot", "guided", "as superset, each slot draws its own 3 of the 8 densest (per-slot seed), so "
        "the nodes of a round are not pushed from the same texts", _with(_SUPERSET, negatives={"assign": "sample",
                                                                                           "pool": 8})),
    # ---- issue 21: acceptance that keeps quality ---------------------------------------------
    Arm("retry-best", "baseline", "retry-only, keeping the least similar attempt (not the last) when retries "
        "run out", _with(_RETRY, negatives={"k": 0}, acceptance={"keep": "best"})),
    Arm("two-sided", "baseline", "retry-only with the two-sided rule: accept only novel AND on-topic texts "
        "(cosine to the base >= the floor, own budget of 3), keep the best attempt; no negatives",
        _with(_RETRY, negatives={"k": 0}, **_TWO_SIDED)),
    Arm("two-sided-superset", "guided", "superset with the two-sided rule and keep best; ablation: two-sided",
        _with(_SUPERSET, **_TWO_SIDED)),
    # ---- issue 21: prompting methods ---------------------------------------------------------
    Arm("two-stage", "baseline", "two-stage intent: an angle within the base at T 1.2 (new ones asked for), then "
        "the instruction from it at T 0.7; retries as retry-only, no negatives",
        _with(_RETRY, negatives={"k": 0}, **_TWO_STAGE)),
    Arm("two-stage-cool", "baseline", "two-stage with the angle at T 1.0, top-p 0.9 (on the 1.5B pilot, T 1.2 with "
        "top-p 1.0 gave some word-salad angles); no negatives", _with(_RETRY, negatives={"k": 0}, **_with(
            _TWO_STAGE, two_stage={"angle_temperature": 1.0, "angle_top_p": 0.9}))),
    Arm("two-stage-superset", "guided", "two-stage with superset negatives (each carries the same angle), flat "
        "scale 2.0; ablation: two-stage", _with(_SUPERSET, **_TWO_STAGE)),
    Arm("two-stage-topic", "baseline", "two-stage, second wording (a topic in English, then 'the augmented "
        "instruction must be about this topic ... not what it asks for'), topic at T 1.0, top-p 0.9, instruction "
        "at T 0.7; no negatives", _with(_RETRY, negatives={"k": 0}, **_TWO_STAGE_TOPIC)),
    Arm("two-stage-topic-superset", "guided", "two-stage-topic with superset negatives (each carries the same "
        "topic), flat scale 2.0; ablation: two-stage-topic", _with(_SUPERSET, **_TWO_STAGE_TOPIC)),
    Arm("verbalized", "baseline", "verbalized sampling (Zhang et al. 2025): 5 candidates with probabilities in "
        "one reply, one drawn by them; retries as retry-only, no negatives",
        _with(_RETRY, negatives={"k": 0}, **_VERBALIZED)),
    Arm("verbalized-superset", "guided", "verbalized sampling with superset negatives, flat scale 2.0; "
        "ablation: verbalized", _with(_SUPERSET, **_VERBALIZED)),
]
ARMS: dict[str, Arm] = {a.name: a for a in _ARMS}

#: Each CFG arm's ablation without negatives: the same run with k 0 (what the arm would be without
#: the guidance), so a study can say whether the CFG part adds anything (issue 21's "state whether
#: the CFG part contributes").
ABLATIONS: dict[str, str] = {
    **{a: "retry-only" for a in ARMS if (a.startswith("superset") or a.startswith("guided") or a == "random-negatives")
       and a not in ("guided-t1.2", "guided-alpha-t1.3")},   # those two sample hotter: no arm is their ablation
    "two-sided-superset": "two-sided",
    "two-stage-superset": "two-stage",
    "two-stage-topic-superset": "two-stage-topic",
    "verbalized-superset": "verbalized",
}


def resolve(names: list[str], custom: dict[str, dict[str, Any]] | None = None) -> list[Arm]:
    """The arms named, from the catalogue or ``custom`` ({name: {"kind", "doc", "config"}})."""
    custom = custom or {}
    out = []
    for name in names:
        if name in custom:
            c = custom[name]
            out.append(Arm(name, c.get("kind", "guided"), c.get("doc", "custom arm"), dict(c.get("config", {}))))
        elif name in ARMS:
            out.append(ARMS[name])
        else:
            raise ValueError(f"unknown arm {name!r}: use one of {', '.join(ARMS)} or define it in the study file")
    return out
