"""The study's analysis on synthetic generated sets (a bag-of-words evaluator stands in for the
embedder): every number lands in study.json and report.md, the target check follows its rule."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
from negspace_cli.study import analyze as analyze_mod
from negspace_cli.study.measures import Evaluator
from negspace_cli.study.runner import write_json
from negspace_cli.study.spec import StudySpec, cell_key

TOPIC = ["poem", "verse", "rhyme", "stanza", "ode"]
OFF = ["stock", "engine", "tax", "soccer", "gpu", "court", "bread", "virus", "planet", "tariff"]


def bow(texts):
    out = []
    for t in texts:
        v = np.zeros(128)
        for w in t.lower().split():
            v[int(hashlib.sha1(w.encode()).hexdigest(), 16) % 128] += 1.0
        out.append(v)
    return np.array(out)


def texts_for(arm: str, seed: int, n: int) -> list[str]:
    """Hot plain arms draw from a wide vocabulary and drift off topic; 'wide' is diverse AND on topic."""
    rng = random.Random(f"{arm}-{seed}")
    spread = {"plain-t0.7": 3, "plain-t1.0": 6, "plain-t1.4": 10, "guided": 3, "wide": 10, "history": 4,
              "retry-only": 5, "wide-prompt": 10}[arm]
    off_rate = {"plain-t0.7": 0.0, "plain-t1.0": 0.2, "plain-t1.4": 0.6, "guided": 0.2, "wide": 0.2,
                "history": 0.2, "retry-only": 0.2, "wide-prompt": 0.2}[arm]
    out = []
    for i in range(n):
        words = rng.sample(OFF, 2) if rng.random() < off_rate else ["write", "a", "poem", rng.choice(TOPIC)]
        words += [f"w{rng.randrange(spread * 4)}" for _ in range(3)]
        out.append("Write " + " ".join(words) + f" please {i % 2}")
    return out


def make_study(folder, arms=("plain-t0.7", "plain-t1.0", "plain-t1.4", "guided", "history", "retry-only", "wide"),
               custom=None):
    custom = custom or {"wide": {"kind": "guided", "doc": "synthetic: diverse and on topic", "config": {}}}
    spec = StudySpec.model_validate(dict(
        name="t", bases=[{"text": "Write a poem.", "split": "held_out"}, {"text": "Write a poem about cats.",
                                                                          "split": "held_out"}],
        seeds=[1, 2, 3], arms=list(arms), custom_arms=custom, nodes=4, rounds=2))
    tmp_path = folder
    for b, s, a in spec.cells():
        texts = texts_for(a, s * 10 + b, spec.per_run)
        write_json(tmp_path / "cells" / f"{cell_key(b, s, a)}.json", {
            "key": cell_key(b, s, a), "base": b, "base_text": spec.bases[b].text, "split": "held_out", "seed": s,
            "arm": a, "kind": "plain" if a.startswith("plain") else "guided", "run_id": f"r-{b}-{s}-{a}",
            "config": {}, "texts": texts, "instructions": [],
            "cost": {"attempts": spec.per_run, "generated_tokens": 10 * spec.per_run,
                     "decode_rows": 10 * spec.per_run, "node_seconds": 1.0, "wall_seconds": 2.0}})
    return spec, tmp_path


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path)


def test_analysis_writes_every_number_and_the_report(study):
    spec, folder = study
    evaluator = Evaluator.from_encoder(bow, name="bow-test")
    report = analyze_mod.analyze(folder, spec, n_boot=300, quiet=True, evaluator=evaluator)
    data = json.loads((folder / "study.json").read_text())["results"]
    held = data["held_out"]
    assert held["n_cases"] == 6 and data["cells_measured"] == len(spec.cells()) == 42
    assert set(held["arms"]) == set(spec.arms)
    assert {p["label"] for p in held["curve"]} <= {"plain-t0.7", "plain-t1.0", "plain-t1.4"}
    comp = held["comparisons"]
    assert set(comp) == {"guided", "history", "retry-only", "wide"}
    r = comp["wide"]["ratio_to_curve"]
    assert r["estimate"] > 1.0 and r["ci_low"] <= r["estimate"] <= r["ci_high"]
    # the target's checks are reported one by one
    assert set(comp["wide"]["target"]["checks"]) >= {"ratio_ge_1.10", "ratio_ci_above_1", "beats_history",
                                                      "beats_retry-only", "on_topic_within_0.05_of_plain_t1.0"}
    assert comp["history"]["target"]["met"] is False
    assert held["arms"]["guided"]["rows_per_instruction"]["mean"] == pytest.approx(10.0)
    text = report.read_text()
    assert "Held-out bases (the evidence)" in text and "`wide`" in text and "Verdict on the held-out bases" in text
    for name in data["figures"].values():
        assert (folder / name).stat().st_size > 0 and f"]({name})" in text
    # measures are cached: a second analysis embeds nothing new
    before = evaluator.n_encoded
    analyze_mod.analyze(folder, spec, n_boot=100, quiet=True, evaluator=evaluator)
    assert evaluator.n_encoded == before


def test_a_case_missing_an_arm_is_left_out_of_the_paired_comparison(study):
    spec, folder = study
    (folder / "cells" / f"{cell_key(0, 1, 'history')}.json").unlink()
    analyze_mod.analyze(folder, spec, n_boot=100, quiet=True, evaluator=Evaluator.from_encoder(bow, name="bow"))
    held = json.loads((folder / "study.json").read_text())["results"]["held_out"]
    assert held["n_cases"] == 5 and "b0-s1" not in held["cases"]


def test_the_cfg_part_is_measured_against_its_ablation_and_a_winner_without_cfg_is_named(tmp_path, monkeypatch):
    """A CFG arm is compared with its ablation without negatives (the CFG part's contribution), and
    an arm without CFG can meet the target: the verdict then says it uses none."""
    from negspace_cli.study import arms as arms_mod

    monkeypatch.setitem(arms_mod.ABLATIONS, "wide", "retry-only")
    spec, folder = make_study(tmp_path, arms=("plain-t0.7", "plain-t1.0", "plain-t1.4", "history", "retry-only",
                                              "wide", "wide-prompt"),
                              custom={"wide": {"kind": "guided", "doc": "synthetic CFG arm", "config": {}},
                                      "wide-prompt": {"kind": "baseline", "doc": "synthetic prompt method",
                                                      "config": {}}})
    report = analyze_mod.analyze(folder, spec, n_boot=300, quiet=True,
                                 evaluator=Evaluator.from_encoder(bow, name="bow-test"))
    comp = json.loads((folder / "study.json").read_text())["results"]["held_out"]["comparisons"]
    ab = comp["wide"]["vs_ablation"]
    assert ab["arm"] == "retry-only" and ab["vendi_ratio"]["estimate"] > 1.0
    assert "vs_ablation" not in comp["wide-prompt"] and comp["wide-prompt"]["target"]["uses_cfg"] is False
    assert comp["wide"]["target"]["uses_cfg"] is True
    text = report.read_text()
    assert "Vendi / its ablation (the CFG part)" in text and "(`retry-only`)" in text
    # how the verdict names a winner
    from negspace_cli.study.report import _winner

    assert _winner("wide-prompt", comp["wide-prompt"]).startswith("`wide-prompt` (no CFG")
    assert "CFG contributes: Vendi / `retry-only`" in _winner("wide", comp["wide"])   # its CI is above 1 here
    flat = {**comp["wide"], "vs_ablation": {**ab, "vendi_ratio": {"estimate": 1.01, "ci_low": 0.9, "ci_high": 1.1}}}
    assert "CFG is not shown to contribute" in _winner("wide", flat)
    assert "its ablation was not run" in _winner("wide", {k: v for k, v in comp["wide"].items() if k != "vs_ablation"})
