"""``report.md`` of a study, from the ``results`` that ``analyze`` wrote into ``study.json``."""

from __future__ import annotations

import math
from typing import Any

from negspace_cli.study.spec import StudySpec


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(d: dict[str, Any] | None, digits: int = 3, key: str = "estimate") -> str:
    if not d:
        return "n/a"
    est = d.get(key, d.get("mean"))
    if est is None or not math.isfinite(est):
        return "n/a"
    return f"{est:.{digits}f} [{_f(d.get('ci_low'), digits)}, {_f(d.get('ci_high'), digits)}]"


def _headline(res: dict[str, Any]) -> list[str]:
    arms, comps = res.get("arms", {}), res.get("comparisons", {})
    lines = ["| arm | kind | Vendi | on-topic | valid | Vendi of on-topic + valid | Vendi / plain curve | "
             "on-topic - plain T1.0 | Vendi / history | Vendi / retry-only | Vendi / verbalized | "
             "Vendi / its ablation (the CFG part) | decode rows / instr. | node s / instr. | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = sorted(arms, key=lambda a: (arms[a]["kind"] != "plain", -(arms[a]["vendi"]["mean"] or 0)))
    for a in order:
        row, comp = arms[a], comps.get(a, {})
        r = comp.get("ratio_to_curve")
        ratio = _ci(r) + ("*" if r and r.get("where") == "clamped" else "") if r else "(curve)"
        vp = comp.get("vs_plain_t1.0", {}).get("on_topic_diff")
        vh = comp.get("vs_history", {}).get("vendi_ratio")
        vr = comp.get("vs_retry-only", {}).get("vendi_ratio")
        vv = comp.get("vs_verbalized", {}).get("vendi_ratio")
        ab = comp.get("vs_ablation")
        ablation = f"{_ci(ab['vendi_ratio'])} (`{ab['arm']}`)" if ab else "-"
        node_s = row.get("node_seconds_per_instruction", {}).get("mean")
        tgt = comp.get("target")
        target = "n/a" if not tgt else ("**met**" if tgt["met"] else "no")
        lines.append(f"| `{a}` | {row['kind']} | {_ci(row['vendi'], 2, 'mean')} | {_ci(row['on_topic_rate'], 2, 'mean')} "
                     f"| {_f(row['validity_rate']['mean'], 2)} | {_ci(row.get('vendi_quality'), 2, 'mean')} "
                     f"| {ratio} | {_ci(vp, 3) if vp else '-'} "
                     f"| {_ci(vh) if vh else '-'} | {_ci(vr) if vr else '-'} | {_ci(vv) if vv else '-'} | {ablation} "
                     f"| {_f(row['rows_per_instruction']['mean'], 0)} | {_f(node_s, 1)} | {target} |")
    return lines


def _measures(res: dict[str, Any]) -> list[str]:
    arms = res.get("arms", {})
    keys = ["vendi", "vendi_quality", "mean_pairwise_distance", "compression_ratio", "distinct_2", "self_bleu",
            "on_topic_rate", "validity_rate", "quality_rate", "attempts_per_instruction", "tokens_per_instruction",
            "node_seconds_per_instruction"]
    lines = ["| arm | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for a, row in arms.items():
        lines.append(f"| `{a}` | " + " | ".join(_f(row[k]["mean"], 3) for k in keys) + " |")
    return lines


def _split(title: str, res: dict[str, Any], figures: dict[str, str], split: str, note: str) -> list[str]:
    lines = [f"## {title}", ""]
    if not res or not res.get("n_cases"):
        return lines + [res.get("note", "no complete case yet") if res else "not in this study", ""]
    lines += [note, "", f"Bases: {'; '.join(repr(b) for b in res['bases'])}. {res['n_cases']} cases "
              "(base x seed), every arm on every case.", ""]
    lines += _headline(res)
    lines += ["", "Vendi / plain curve: the arm's mean Vendi over the plain-sampling frontier's Vendi at the arm's "
              "mean on-topic rate (95% CI of a paired bootstrap that resamples whole base instructions). `*`: the arm is more on topic than the "
              "most on-topic plain arm, so the ratio is to that point (an understatement). The other ratios and "
              "differences are paired over the same cases.", ""]
    if f"diversity_vs_quality_{split}" in figures:
        lines += [f"![diversity vs quality]({figures[f'diversity_vs_quality_{split}']})", ""]
    if f"per_case_ratios_{split}" in figures:
        lines += [f"![per-case ratios]({figures[f'per_case_ratios_{split}']})", ""]
    lines += ["Every measure (means over cases):", "", *_measures(res), ""]
    curve = res.get("curve") or []
    if curve:
        lines += ["The plain-sampling frontier: " + ", ".join(f"`{p['label']}` ({p['x']:.2f}, {p['y']:.2f})"
                                                            for p in curve), ""]
    return lines


def _winner(arm: str, comp: dict[str, Any]) -> str:
    """``arm`` with what its CFG part did: none (no CFG), or its ratio to its ablation."""
    if not comp["target"].get("uses_cfg", True):
        return f"`{arm}` (no CFG: a prompting/acceptance method)"
    ab = comp.get("vs_ablation")
    if not ab:
        return f"`{arm}` (CFG; its ablation was not run)"
    r = ab["vendi_ratio"]
    part = "contributes" if r["ci_low"] > 1.0 else "is not shown to contribute"
    return f"`{arm}` (CFG {part}: Vendi / `{ab['arm']}` {_ci(r)})"


def render(spec: StudySpec, result: dict[str, Any]) -> str:
    figures = result.get("figures", {})
    lines = [f"# negspace study `{spec.study_id()}`", "",
             f"Analyzed {result['analyzed_at']}; {result['cells_measured']} of {result['cells_total']} runs "
             f"measured. Each run accepts {spec.per_run} instructions ({spec.nodes} nodes x {spec.rounds + 1} "
             f"rounds, max_tokens {spec.max_tokens}), generated by `{spec.model}`. Seeds {spec.seeds}. Evaluation embedder "
             f"`{result['eval_embedder']}` (not the controller's). Bootstrap resamples: {result['n_boot']}.", ""]
    t = result["target"]
    lines += ["**Target** (issue: the method must measurably diversify): on held-out bases, an arm's Vendi is "
              f">= {t['ratio']:.2f}x the plain curve's at the same on-topic rate with the CI above 1, its on-topic "
              f"rate no more than {t['on_topic_slack']} below plain sampling at T=1.0, and its Vendi above "
              f"{' and '.join(t['baselines'])} on the same cases (CI above 1) at an on-topic rate no more than "
              f"{t['on_topic_slack']} below theirs. Any non-plain arm may meet it; a winner without CFG is "
              "named as such, and a CFG arm's Vendi over its ablation without negatives says whether the CFG part "
              "contributes.", ""]
    held = result.get("held_out", {})
    met = [_winner(a, c) for a, c in held.get("comparisons", {}).items() if c["target"]["met"]]
    if held.get("n_cases"):
        lines += [f"**Verdict on the held-out bases: {'met by ' + '; '.join(met) if met else 'no arm meets it'}.**", ""]
    lines += _split("Held-out bases (the evidence)", held, figures, "held_out",
                    "These bases were not used to choose any configuration.")
    lines += _split("Tuning bases (used to choose configurations: not evidence)", result.get("tune", {}), figures,
                    "tune", "Configurations were compared on these bases; their numbers are optimistic.")
    lines += ["## Arms", "", "| arm | kind | what |", "|---|---|---|"]
    for a in spec.resolved_arms():
        lines.append(f"| `{a.name}` | {a.kind} | {a.doc} |")
    lines += ["", "## Files", "", "`study.json` (the spec, every run id, every measure and comparison), "
              "`cells/*.json` (each run's instructions, config and cost), `measures.json`.", ""]
    return "\n".join(lines)
