"""negspace_cli.study.stats: known answers for the frontier and its interpolation, and the
bootstraps' behaviour on synthetic data with a known effect."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from negspace_cli.study import stats
from negspace_cli.study.stats import (
    curve_at,
    frontier,
    holm,
    matched_comparison,
    paired_bootstrap,
    per_case_ratio_to_curve,
    ratio_to_curve,
)


def xy(front):
    return [(p["x"], p["y"]) for p in front]


# ------------------------------------------------------------------ frontier

def test_frontier_of_a_monotone_trade_off_keeps_every_point_sorted_by_x():
    # Temperatures 1.5 .. 0.3: on-topic rises, Vendi falls; given out of order.
    pts = [(0.9, 2.0, "T0.3"), (0.5, 6.0, "T1.5"), (0.7, 4.0, "T1.0"), (0.8, 3.0, "T0.7")]
    front = frontier(pts)
    assert xy(front) == [(0.5, 6.0), (0.7, 4.0), (0.8, 3.0), (0.9, 2.0)]
    assert [p["label"] for p in front] == ["T1.5", "T1.0", "T0.7", "T0.3"]


def test_frontier_drops_dominated_points_of_a_non_monotone_input():
    # (0.6, 3.0) is beaten by (0.7, 4.0) in both; (0.85, 1.0) by (0.9, 2.0).
    pts = [(0.5, 6.0), (0.6, 3.0), (0.7, 4.0), (0.85, 1.0), (0.9, 2.0)]
    assert xy(frontier(pts)) == [(0.5, 6.0), (0.7, 4.0), (0.9, 2.0)]


def test_frontier_ties():
    # Same x: the higher y wins. Same y: the higher x wins. Exact duplicate: kept once, first label.
    assert xy(frontier([(0.5, 3.0), (0.5, 5.0)])) == [(0.5, 5.0)]
    assert xy(frontier([(0.4, 5.0), (0.6, 5.0)])) == [(0.6, 5.0)]
    front = frontier([(0.5, 5.0, "a"), (0.5, 5.0, "b"), (0.8, 1.0, "c")])
    assert xy(front) == [(0.5, 5.0), (0.8, 1.0)] and front[0]["label"] == "a"


def test_frontier_accepts_mappings_and_ignores_nan():
    front = frontier([{"x": 0.2, "y": 9.0, "label": "hot"}, (float("nan"), 100.0), (0.9, float("nan")),
                      {"x": 0.9, "y": 1.0}])
    assert xy(front) == [(0.2, 9.0), (0.9, 1.0)] and front[0]["label"] == "hot"
    assert frontier([]) == []


# ------------------------------------------------------------------ interpolation

FRONT = frontier([(0.5, 6.0), (0.7, 4.0), (0.9, 2.0)])


@pytest.mark.parametrize("x, expected", [(0.5, 6.0), (0.6, 5.0), (0.7, 4.0), (0.85, 2.5), (0.9, 2.0)])
def test_curve_at_interpolates_linearly_inside_the_range(x, expected):
    at = curve_at(FRONT, x)
    assert at.in_range and at.where == "inside"
    assert at.value == pytest.approx(expected)


def test_curve_at_never_extrapolates():
    left, right = curve_at(FRONT, 0.49), curve_at(FRONT, 0.95)
    assert math.isnan(left.value) and not left.in_range and left.where == "left"
    assert math.isnan(right.value) and not right.in_range and right.where == "right"
    empty = curve_at([], 0.5)
    assert math.isnan(empty.value) and empty.where == "empty"
    assert math.isnan(curve_at(FRONT, float("nan")).value)


def test_curve_at_clamps_only_to_the_right_and_flags_it():
    right = curve_at(FRONT, 0.95, clamp_right=True)
    assert right.value == 2.0 and not right.in_range and right.where == "clamped"
    left = curve_at(FRONT, 0.3, clamp_right=True)
    assert math.isnan(left.value) and left.where == "left"


def test_curve_at_a_single_point_frontier():
    one = frontier([(0.7, 4.0)])
    assert curve_at(one, 0.7) == (4.0, True, "inside")
    assert not curve_at(one, 0.71).in_range


# ------------------------------------------------------------------ paired bootstrap

def test_paired_bootstrap_known_effect_ratio():
    rng = np.random.default_rng(1)
    base = rng.uniform(5, 15, size=60)                  # strong between-case variation
    a = base * 1.2 * rng.lognormal(0, 0.05, size=60)
    b = base * rng.lognormal(0, 0.05, size=60)
    res = paired_bootstrap(a, b, stat="ratio", n_boot=4000, seed=0)
    assert res["ci_low"] < 1.2 < res["ci_high"]
    assert res["ci_low"] > 1.0
    assert res["share_le_null"] == 0.0
    assert res["estimate"] == pytest.approx(a.mean() / b.mean())
    json.dumps(res)   # plain, serializable values


def test_paired_bootstrap_diff_null_effect_has_ci_containing_zero():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.3, 0.9, size=50)
    a = base + rng.normal(0, 0.03, size=50)
    b = base + rng.normal(0, 0.03, size=50)
    res = paired_bootstrap(a, b, stat="diff", n_boot=4000, seed=0)
    assert res["ci_low"] < 0 < res["ci_high"]
    assert 0.05 < res["share_le_null"] < 0.95
    assert res["p_two_sided"] > 0.05


def test_paired_bootstrap_is_deterministic_under_a_seed():
    a, b = np.arange(1.0, 21.0), np.arange(2.0, 22.0)[::-1]
    r1 = paired_bootstrap(a, b, stat="ratio", n_boot=500, seed=7)
    r2 = paired_bootstrap(a, b, stat="ratio", n_boot=500, seed=7)
    r3 = paired_bootstrap(a, b, stat="ratio", n_boot=500, seed=8)
    assert r1 == r2
    assert (r1["ci_low"], r1["ci_high"]) != (r3["ci_low"], r3["ci_high"])


def test_pairing_removes_between_case_variance():
    # A small consistent effect (+0.02) under large case-to-case variation: the paired interval
    # excludes 0, the unpaired one (arms treated as unrelated samples) cannot see it.
    rng = np.random.default_rng(3)
    base = rng.uniform(0.2, 0.9, size=40)
    a = base + 0.02 + rng.normal(0, 0.005, size=40)
    b = base + rng.normal(0, 0.005, size=40)
    paired = paired_bootstrap(a, b, n_boot=3000, seed=0)
    unpaired = paired_bootstrap(a, b, n_boot=3000, seed=0, paired=False)
    assert paired["estimate"] == pytest.approx(unpaired["estimate"])
    assert paired["ci_low"] > 0
    assert unpaired["ci_low"] < 0 < unpaired["ci_high"]
    assert (paired["ci_high"] - paired["ci_low"]) < 0.2 * (unpaired["ci_high"] - unpaired["ci_low"])


def test_paired_bootstrap_interval_coverage_on_synthetic_data():
    # 95 % intervals for a known mean difference of 0.1 cover it in roughly 95 % of datasets
    # (percentile intervals run a little narrow at n = 40; accept 88-99 %).
    rng = np.random.default_rng(4)
    covered, trials = 0, 200
    for t in range(trials):
        base = rng.uniform(0, 1, size=40)
        a = base + 0.1 + rng.normal(0, 0.1, size=40)
        b = base + rng.normal(0, 0.1, size=40)
        res = paired_bootstrap(a, b, n_boot=1000, seed=t)
        covered += res["ci_low"] <= 0.1 <= res["ci_high"]
    assert 0.88 <= covered / trials <= 0.99


def test_paired_bootstrap_drops_nan_pairs_and_handles_tiny_inputs():
    res = paired_bootstrap([1.0, float("nan"), 3.0], [1.0, 2.0, float("nan")], n_boot=100)
    assert res["n_cases"] == 1 and res["n_dropped"] == 2
    assert res["estimate"] == 0.0 and "single case" in res["note"]
    empty = paired_bootstrap([], [], n_boot=100)
    assert math.isnan(empty["estimate"]) and empty["note"]
    zero = paired_bootstrap([1.0, 2.0], [0.0, 0.0], stat="ratio", n_boot=100)
    assert math.isinf(zero["estimate"]) or math.isnan(zero["estimate"])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0], n_boot=10)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0], stat="mean")


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = holm({"a": 0.5, "b": float("nan"), "c": 0.01})
    assert adj["c"] == pytest.approx(0.02) and adj["a"] == pytest.approx(0.5) and math.isnan(adj["b"])


# ------------------------------------------------------------------ ratio to the curve

TEMPS = {"T1.5": (0.5, 6.0), "T1.0": (0.7, 4.0), "T0.7": (0.8, 3.0), "T0.3": (0.9, 2.0)}


def synthetic_study(n_cases=40, lift=1.2, arm_x=0.75, noise=0.05, seed=0, x_noise=0.01):
    """Plain arms on the curve above (times a per-case difficulty factor), and an arm at on-topic
    `arm_x` whose Vendi is `lift` times the curve there."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.7, 1.3, size=n_cases)
    front = frontier([(x, y, k) for k, (x, y) in TEMPS.items()])
    curve = curve_at(front, arm_x, clamp_right=True).value
    plain = {k: {f"c{i}": {"on_topic_rate": x + rng.normal(0, x_noise),
                           "vendi": y * difficulty[i] * rng.lognormal(0, noise)}
                 for i in range(n_cases)}
             for k, (x, y) in TEMPS.items()}
    arm = {f"c{i}": {"on_topic_rate": arm_x + rng.normal(0, x_noise),
                     "vendi": lift * curve * difficulty[i] * rng.lognormal(0, noise)}
           for i in range(n_cases)}
    return arm, plain


def test_ratio_to_curve_recovers_a_known_lift():
    arm, plain = synthetic_study(lift=1.2)
    res = ratio_to_curve(arm, plain, n_boot=2000, seed=0)
    assert res["ci_low"] < 1.2 < res["ci_high"]
    assert res["ci_low"] > 1.0
    assert res["estimate"] == pytest.approx(1.2, abs=0.05)
    assert res["in_range"] and res["share_out_of_range"] == 0.0
    assert res["n_cases"] == 40 and res["cases_dropped"] == []
    assert [p["label"] for p in res["frontier"]] == ["T1.5", "T1.0", "T0.7", "T0.3"]
    json.dumps(res)


def test_ratio_to_curve_no_lift_gives_an_interval_around_one():
    arm, plain = synthetic_study(lift=1.0, seed=5)
    res = ratio_to_curve(arm, plain, n_boot=2000, seed=0)
    assert res["ci_low"] < 1.0 < res["ci_high"]


def test_ratio_to_curve_is_paired_with_the_plain_arms():
    # The per-case difficulty is shared by the arm and the plain arms; pairing cancels it, so the
    # interval is far narrower than the case-to-case spread of Vendi itself.
    arm, plain = synthetic_study(lift=1.2, noise=0.01)
    res = ratio_to_curve(arm, plain, n_boot=2000, seed=0)
    assert res["ci_high"] - res["ci_low"] < 0.03


def test_ratio_to_curve_out_of_range_is_flagged_not_extrapolated():
    arm, plain = synthetic_study(arm_x=0.97)   # more on topic than the coldest plain arm
    res = ratio_to_curve(arm, plain, n_boot=300, seed=0)
    assert math.isnan(res["estimate"]) and not res["in_range"] and res["where"] == "right"
    assert res["share_out_of_range"] == 1.0 and math.isnan(res["ci_low"])
    assert "right" in res["note"]
    clamped = ratio_to_curve(arm, plain, n_boot=300, seed=0, clamp_right=True)
    assert clamped["where"] == "clamped" and clamped["estimate"] > 1.0
    assert clamped["share_out_of_range"] == 1.0


def test_ratio_to_curve_near_the_edge_reports_the_share_out_of_range():
    arm, plain = synthetic_study(arm_x=0.9)    # exactly at the coldest arm: about half the replicates out
    res = ratio_to_curve(arm, plain, n_boot=1000, seed=0)
    assert 0.05 < res["share_out_of_range"] < 0.95
    assert "replicates out of the curve's range" in res["note"]


def test_ratio_to_curve_determinism_and_dropped_cases():
    arm, plain = synthetic_study(n_cases=10)
    arm["c3"]["vendi"] = float("nan")
    del plain["T1.0"]["c4"]
    r1 = ratio_to_curve(arm, plain, n_boot=500, seed=3)
    r2 = ratio_to_curve(arm, plain, n_boot=500, seed=3)
    assert r1 == r2
    assert r1["n_cases"] == 8 and sorted(r1["cases_dropped"]) == ["c3", "c4"]


def test_ratio_to_curve_with_no_usable_case():
    res = ratio_to_curve({"c0": {"vendi": 1.0}}, {"T1": {"c0": {"vendi": 1.0, "on_topic_rate": 0.5}}},
                         n_boot=10)
    assert res["n_cases"] == 0 and math.isnan(res["estimate"]) and res["note"]
    with pytest.raises(ValueError):
        ratio_to_curve({}, {}, n_boot=10)


def test_per_case_ratio_to_curve():
    arm, plain = synthetic_study(n_cases=5, noise=0.0, x_noise=0.0)
    per_case = per_case_ratio_to_curve(arm, plain)
    assert set(per_case) == {f"c{i}" for i in range(5)}
    assert all(v["in_range"] and v["ratio"] == pytest.approx(1.2) for v in per_case.values())
    arm["c0"]["on_topic_rate"] = 0.2
    assert math.isnan(per_case_ratio_to_curve(arm, plain)["c0"]["ratio"])


# ------------------------------------------------------------------ matched comparison

def test_matched_comparison():
    rng = np.random.default_rng(6)
    base = rng.uniform(4, 10, size=30)
    a = {f"c{i}": {"vendi": 1.3 * base[i], "on_topic_rate": 0.8, "quality_rate": 0.7} for i in range(30)}
    b = {f"c{i}": {"vendi": base[i] * rng.lognormal(0, 0.05), "on_topic_rate": 0.85, "quality_rate": 0.7}
         for i in range(30)}
    b["c0"]["vendi"] = float("nan")
    res = matched_comparison(a, b, n_boot=1000, seed=0, extra={"quality_rate": "diff"})
    assert res["n_cases"] == 29 and res["cases_dropped"] == ["c0"]
    assert res["vendi_ratio"]["ci_low"] > 1.2 and res["vendi_ratio"]["stat"] == "ratio"
    assert res["on_topic_diff"]["estimate"] == pytest.approx(-0.05)
    assert res["quality_rate_diff"]["estimate"] == pytest.approx(0.0)
    json.dumps(res)


def test_module_is_pure_numpy():
    import sys
    source = open(stats.__file__).read()
    for heavy in ("torch", "scipy", "sentence_transformers", "pandas"):
        assert f"import {heavy}" not in source
    assert "numpy" in sys.modules


# ------------------------------------------------------------------ clusters (seeds of one base)

def test_singleton_groups_are_the_plain_case_bootstrap():
    rng = np.random.default_rng(8)
    a, b = rng.normal(1, 0.2, size=25), rng.normal(1, 0.2, size=25)
    assert paired_bootstrap(a, b, n_boot=500, seed=1) == \
        paired_bootstrap(a, b, n_boot=500, seed=1, groups=list(range(25))) | {"n_clusters": 25}


def test_cluster_bootstrap_covers_the_effect_when_seeds_share_their_base():
    # 15 bases x 4 seeds. The effect varies by base; a base's seeds barely differ. Resampling
    # seeds as if independent gives intervals far too narrow for the mean effect over bases;
    # resampling bases covers it at about the nominal rate.
    rng = np.random.default_rng(9)
    hits_case = hits_cluster = 0
    trials = 150
    for t in range(trials):
        effect = rng.normal(0.1, 0.1, size=15)
        groups = np.repeat(np.arange(15), 4)
        base = rng.uniform(0, 1, size=15)[groups]
        b = base + rng.normal(0, 0.01, size=60)
        a = base + effect[groups] + rng.normal(0, 0.01, size=60)
        case = paired_bootstrap(a, b, n_boot=800, seed=t)
        clus = paired_bootstrap(a, b, n_boot=800, seed=t, groups=groups)
        hits_case += case["ci_low"] <= 0.1 <= case["ci_high"]
        hits_cluster += clus["ci_low"] <= 0.1 <= clus["ci_high"]
        assert clus["n_clusters"] == 15 and case["n_clusters"] == 60
    assert hits_cluster / trials >= 0.85
    assert hits_case / trials < hits_cluster / trials - 0.15


def test_groups_must_label_every_case_and_follow_dropped_pairs():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], groups=["x"])
    res = paired_bootstrap([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0], groups=["p", "p", "q", "q"], n_boot=50)
    assert res["n_cases"] == 3 and res["n_clusters"] == 2


def test_ratio_to_curve_and_matched_comparison_take_a_cluster():
    arm, plain = synthetic_study(n_cases=40)
    by_base = {f"c{i}": f"base{i // 4}" for i in range(40)}
    res = ratio_to_curve(arm, plain, n_boot=500, seed=0, cluster=by_base)
    same = ratio_to_curve(arm, plain, n_boot=500, seed=0, cluster=lambda c: by_base[c])
    assert res == same and res["n_clusters"] == 10
    assert res["estimate"] == ratio_to_curve(arm, plain, n_boot=10)["estimate"]   # estimate unchanged
    with pytest.raises(ValueError):
        ratio_to_curve(arm, plain, n_boot=10, cluster={"c0": "x"})
    mc = matched_comparison(arm, plain["T1.0"], n_boot=200, cluster=by_base)
    assert mc["n_clusters"] == 10 and mc["vendi_ratio"]["n_clusters"] == 10


def test_a_different_number_of_texts_per_case_is_noted():
    arm, plain = synthetic_study(n_cases=6)
    for per_case in (arm, *plain.values()):
        for row in per_case.values():
            row["n"] = 20
    assert ratio_to_curve(arm, plain, n_boot=50)["note"] == ""
    arm["c2"]["n"] = 17
    assert "differs" in ratio_to_curve(arm, plain, n_boot=50)["note"]
    assert "differs" in matched_comparison(arm, plain["T1.0"], n_boot=50)["note"]
