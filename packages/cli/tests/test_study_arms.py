"""The study's named arms: each is a valid run configuration, and the issue-21 arms say what they test."""

from __future__ import annotations

import pytest
from negspace_cli.study.arms import ARMS, resolve
from negspace_contracts.orchestrator import RunConfig

ISSUE_21 = ("superset", "superset-max", "superset-mean", "superset-rising", "superset-list", "superset-slot",
            "retry-best", "two-sided", "two-sided-superset", "two-stage", "two-stage-superset", "verbalized",
            "verbalized-superset")


def config(name: str) -> RunConfig:
    arm = ARMS[name]
    extra = {"size": 4} if arm.mode == "baseline" else {}
    return RunConfig(base_instruction="Write a poem.", mode=arm.mode, **extra, **arm.config)


@pytest.mark.parametrize("name", list(ARMS))
def test_every_arm_is_a_valid_run_config(name):
    config(name)


def test_issue_21_arms_differ_from_their_neighbours_in_what_they_name():
    assert set(ISSUE_21) <= set(ARMS) and resolve(["superset", "two-stage"])[1].name == "two-stage"
    s = config("superset")
    assert (s.negative_format, s.guidance.combine, s.guidance.start, s.guidance.step, s.negatives.k) == (
        "superset", "min", 2.0, 0.0, 3)
    assert config("superset-max").guidance.combine == "max" and config("superset-mean").guidance.combine == "mean"
    assert config("superset-rising").guidance.step == 0.5
    assert config("superset-list").negative_format == "superset-list"
    slot = config("superset-slot").negatives
    assert (slot.assign, slot.pool, slot.k) == ("sample", 8, 3)
    two = config("two-sided")
    assert (two.acceptance.rule, two.acceptance.keep, two.negatives.k) == ("two-sided", "best", 0)
    assert config("retry-best").acceptance == config("retry-only").acceptance.model_copy(update={"keep": "best"})
    assert config("two-sided-superset").acceptance == two.acceptance
    assert config("two-stage").prompting == "two-stage" and config("two-stage").negatives.k == 0
    assert config("verbalized").prompting == "verbalized" and config("verbalized").negatives.k == 0
    for name in ("two-stage-superset", "verbalized-superset"):
        assert config(name).negative_format == "superset" and config(name).negatives.k == 3
    # every guided issue-21 arm names its ablation without negatives, and that arm exists
    for name in ISSUE_21:
        if ARMS[name].kind == "guided":
            ablation = ARMS[name].doc.split("ablation: ")[-1] if "ablation: " in ARMS[name].doc else "retry-only"
            assert ablation in ARMS and config(ablation).negatives.k == 0, name


def test_each_ablation_is_its_arm_without_negatives():
    """An arm's ablation makes the same run but for the negatives (and what only they use: their
    form and the guidance scale), so 'arm / ablation' is the CFG part's contribution."""
    from negspace_cli.study import arms as arms_mod
    from negspace_contracts.orchestrator import RunConfig

    def body(name):
        cfg = RunConfig.model_validate({**arms_mod.ARMS[name].config, "base_instruction": "Write a poem.", "seed": 1})
        d = cfg.model_dump(mode="json")
        for k in ("negatives", "negative_format", "guidance"):
            d.pop(k)
        return d

    assert arms_mod.ABLATIONS["two-stage-topic-superset"] == "two-stage-topic"
    for arm, ablation in arms_mod.ABLATIONS.items():
        assert arms_mod.ARMS[arm].kind == "guided" and arms_mod.ARMS[ablation].config["negatives"]["k"] == 0
        assert body(arm) == body(ablation), (arm, ablation)
