"""Measure a study's generated sets and write its results: ``study.json`` (every number),
``report.md`` and plots.

Per split (held-out bases, reported; tuning bases, shown apart), over the cases (base x seed) that
have every arm:
- each arm's mean measures (diversity, quality, cost), with a bootstrap CI of each mean;
- every bootstrap below resamples whole base instructions (a cluster bootstrap: the seeds of one
  base are not independent), and pairs arms on the same cases;
- the headline: each non-plain arm's Vendi over the plain-sampling curve's Vendi at the arm's
  on-topic rate (``stats.ratio_to_curve``; paired bootstrap over cases; right of the curve's range
  the ratio is to the curve's most on-topic point, which understates the arm: flagged);
- each arm against the in-prompt history, retry-only and verbalized baselines
  (``stats.matched_comparison``), and each CFG arm against its ablation without negatives
  (``arms.ABLATIONS``): the CFG part's contribution;
- the target check for every non-plain arm (a winner without CFG counts, and is said to have none):
  ratio >= 1.10 with the CI above 1, on-topic rate no more than 0.05 below plain sampling at T=1.0,
  and Vendi above history, retry-only and verbalized on the same cases (ratio CI above 1) at an
  on-topic rate no more than 0.05 below theirs.

Measures are cached in ``measures.json`` (per cell and embedder), so a rerun only measures new cells.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from negspace_cli.study import arms as arms_mod
from negspace_cli.study import plots, stats
from negspace_cli.study.runner import load_results, write_json
from negspace_cli.study.spec import StudySpec

TARGET_RATIO = 1.10
ON_TOPIC_SLACK = 0.05
MATCH_BASELINES = ("history", "retry-only", "verbalized")  # the target: above all three
TABLE_MEASURES = ("vendi", "on_topic_rate", "validity_rate", "quality_rate", "vendi_quality",
                  "mean_pairwise_distance", "compression_ratio", "distinct_2", "self_bleu")
COST_MEASURES = ("attempts_per_instruction", "tokens_per_instruction", "rows_per_instruction",
                 "node_seconds_per_instruction")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _flat(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "per_text"}


def measure_cells(folder: Path, spec: StudySpec, evaluator=None, quiet: bool = False) -> dict[str, dict[str, Any]]:
    """``{cell key: measures}`` for every generated cell (cached in ``measures.json``)."""
    from negspace_cli.follow import make_bar
    from negspace_cli.study import measures

    results = load_results(folder)
    cache_path = folder / "measures.json"
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    embedder = spec.eval_embedder
    missing = [r for r in results if cache.get(r["key"], {}).get("embedder_setting") != embedder]
    if missing:
        if evaluator is None:
            _log(f"negspace study: loading the evaluation embedder {embedder}")
            evaluator = measures.Evaluator(embedder)
        if getattr(evaluator, "is_controller_embedder", False):
            _log("negspace study: WARNING: the evaluation embedder is the controller's: the study grades "
                 "itself with the model it steers by")
        evaluator.embed(sorted({t for r in missing for t in [*r["texts"], r["base_text"]]}))  # one batch
        bar = make_bar(len(missing), "measuring", "set", disable=quiet)
        for r in missing:
            m = measures.measure_set(evaluator, r["texts"], r["base_text"])
            cache[r["key"]] = {**_flat(m), "embedder_setting": embedder,
                               "invalid_reasons": _reasons(m.get("per_text", {}))}
            bar.update(1)
        bar.close()
        write_json(cache_path, cache)
    out = {}
    for r in results:
        m = dict(cache[r["key"]])
        n = max(1, len(r["texts"]))
        c = r["cost"]
        m.update(attempts_per_instruction=c["attempts"] / n, tokens_per_instruction=c["generated_tokens"] / n,
                 rows_per_instruction=c["decode_rows"] / n, node_seconds_per_instruction=c["node_seconds"] / n,
                 wall_seconds=c.get("wall_seconds"))
        out[r["key"]] = {**m, "_cell": {k: r[k] for k in ("base", "base_text", "split", "seed", "arm", "kind", "run_id")}}
    return out


def _reasons(per_text: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for reason in per_text.get("invalid_reason", []):
        if reason:
            counts[reason] += 1
    return dict(counts)


def _mean_ci(values: list[float], n_boot: int, seed: int = 0) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    reps = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    return {"mean": float(v.mean()), "ci_low": float(np.quantile(reps, 0.025)),
            "ci_high": float(np.quantile(reps, 0.975)), "n": int(v.size)}


def base_of(case: str) -> str:
    """A case id ``b<base>-s<seed>`` -> its base: the cluster a bootstrap resamples whole (the seeds of
    one base are not independent cases)."""
    return case.split("-s")[0]


def analyze_split(cells: dict[str, dict[str, Any]], spec: StudySpec, split: str, n_boot: int) -> dict[str, Any]:
    arms = {a.name: a for a in spec.resolved_arms()}
    by_arm: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for m in cells.values():
        c = m["_cell"]
        if c["split"] == split and c["arm"] in arms:
            by_arm[c["arm"]][f"b{c['base']}-s{c['seed']}"] = m
    if not by_arm:
        return {"n_cases": 0}
    complete = set.intersection(*(set(v) for v in by_arm.values())) if len(by_arm) == len(arms) else set()
    cases = sorted(complete)
    bases = sorted({m["_cell"]["base_text"] for m in cells.values() if m["_cell"]["split"] == split})
    out: dict[str, Any] = {"n_cases": len(cases), "cases": cases, "bases": bases,
                           "incomplete_arms": sorted(a for a in arms if a not in by_arm)}
    if not cases:
        out["note"] = "no case has every arm yet"
        return out
    values = {a: {c: by_arm[a][c] for c in cases} for a in by_arm}
    table = {}
    for a, per_case in values.items():
        row = {k: _mean_ci([per_case[c].get(k) for c in cases], n_boot) for k in TABLE_MEASURES + COST_MEASURES}
        row["kind"] = arms[a].kind
        row["doc"] = arms[a].doc
        row["invalid_reasons"] = dict(sum((_counter(per_case[c].get("invalid_reasons", {})) for c in cases),
                                          _counter({})))
        table[a] = row
    out["arms"] = table
    plain = {a: values[a] for a in values if arms[a].kind == "plain"}
    ref_plain = arms_mod.PLAIN_REFERENCE_ARM
    comparisons: dict[str, Any] = {}
    if plain:
        curve = stats.frontier((table[a]["on_topic_rate"]["mean"], table[a]["vendi"]["mean"], a) for a in plain)
        out["curve"] = curve
        for a in values:
            if arms[a].kind == "plain":
                continue
            comp: dict[str, Any] = {"ratio_to_curve": stats.ratio_to_curve(
                values[a], plain, n_boot=n_boot, clamp_right=True, cluster=base_of)}
            if ref_plain in values:
                comp["vs_plain_t1.0"] = stats.matched_comparison(values[a], values[ref_plain], n_boot=n_boot,
                                                                 cluster=base_of)
            for b in MATCH_BASELINES:
                if b in values and b != a:
                    comp[f"vs_{b}"] = stats.matched_comparison(values[a], values[b], n_boot=n_boot,
                                                               cluster=base_of)
            ablation = arms_mod.ABLATIONS.get(a)
            if ablation in values:
                comp["vs_ablation"] = {"arm": ablation, **stats.matched_comparison(
                    values[a], values[ablation], n_boot=n_boot, cluster=base_of)}
            comp["target"] = _target(a, arms[a].kind, comp)
            comparisons[a] = comp
        out["per_case_ratio"] = {a: {k: v["ratio"] for k, v in stats.per_case_ratio_to_curve(
            values[a], plain, clamp_right=True).items()} for a in values if arms[a].kind != "plain"}
    out["comparisons"] = comparisons
    return out


def _counter(d: dict[str, int]):
    from collections import Counter

    return Counter(d)


def _target(name: str, kind: str, comp: dict[str, Any]) -> dict[str, Any]:
    """Which parts of the issue's target this arm meets. Any non-plain arm can meet it (the issue:
    "if the winner uses no CFG at all, say so plainly"); ``uses_cfg`` says whether it guides."""
    r = comp["ratio_to_curve"]
    checks: dict[str, bool | None] = {
        "ratio_ge_1.10": bool(r["estimate"] >= TARGET_RATIO) if math.isfinite(r["estimate"]) else False,
        "ratio_ci_above_1": bool(r["ci_low"] > 1.0) if math.isfinite(r["ci_low"]) else False,
        "in_curve_range": bool(r["in_range"]),
    }
    vp = comp.get("vs_plain_t1.0")
    checks["on_topic_within_0.05_of_plain_t1.0"] = (
        bool(vp["on_topic_diff"]["estimate"] >= -ON_TOPIC_SLACK) if vp else None)
    for b in MATCH_BASELINES:
        v = comp.get(f"vs_{b}")
        checks[f"beats_{b}"] = (bool(v["vendi_ratio"]["ci_low"] > 1.0
                                     and v["on_topic_diff"]["estimate"] >= -ON_TOPIC_SLACK) if v else None)
    met = kind != "plain" and all(v is not False for v in checks.values()) and checks["in_curve_range"]
    return {"checks": checks, "met": bool(met), "uses_cfg": kind in ("guided", "reference")}


def analyze(folder: Path, spec: StudySpec, *, n_boot: int = 2000, quiet: bool = False, evaluator=None) -> Path:
    cells = measure_cells(folder, spec, evaluator=evaluator, quiet=quiet)
    result: dict[str, Any] = {"analyzed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                              "eval_embedder": spec.eval_embedder, "n_boot": n_boot,
                              "cells_measured": len(cells), "cells_total": len(spec.cells()),
                              "target": {"ratio": TARGET_RATIO, "on_topic_slack": ON_TOPIC_SLACK,
                                         "baselines": list(MATCH_BASELINES)}}
    figures: dict[str, str] = {}
    for split in ("held_out", "tune"):
        res = analyze_split(cells, spec, split, n_boot)
        result[split] = res
        if res.get("arms") and res.get("curve"):
            figures.update(_plots(folder, split, res))
    result["figures"] = figures
    result["cells"] = {k: {kk: vv for kk, vv in v.items()} for k, v in cells.items()}
    state_path = folder / "study.json"
    data = json.loads(state_path.read_text()) if state_path.exists() else {}
    data["results"] = result
    write_json(state_path, data)
    from negspace_cli.study.report import render

    report = folder / "report.md"
    report.write_text(render(spec, result))
    return report


def _plots(folder: Path, split: str, res: dict[str, Any]) -> dict[str, str]:
    points = {}
    for a, row in res["arms"].items():
        points[a] = {"x": row["on_topic_rate"]["mean"], "y": row["vendi"]["mean"], "kind": row["kind"],
                     "x_err": (row["on_topic_rate"]["ci_low"], row["on_topic_rate"]["ci_high"]),
                     "y_err": (row["vendi"]["ci_low"], row["vendi"]["ci_high"])}
    dq = folder / f"diversity_vs_quality_{split}.png"
    label = "held-out bases" if split == "held_out" else "tuning bases"
    plots.diversity_vs_quality(dq, points, res["curve"],
                               title=f"Vendi vs on-topic rate, {label} ({res['n_cases']} cases)")
    out = {f"diversity_vs_quality_{split}": dq.name}
    if res.get("per_case_ratio"):
        pc = folder / f"per_case_ratios_{split}.png"
        plots.per_case_ratios(pc, res["per_case_ratio"], title=f"Vendi / plain curve per case, {label}")
        out[f"per_case_ratios_{split}"] = pc.name
    return out
