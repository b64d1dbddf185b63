"""Numbers behind the report: lm-eval score and stderr extraction.

The diversity metrics, the PCA basis both datasets share and the 2-D map are the controller's
(``POST /compare``, reached through the orchestrator's ``GET /runs/{id}/compare?with=``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


_NOT_SCORES = frozenset({"samples", "sample_len", "num_fewshot"})


def eval_scores(result: Mapping[str, Any] | None) -> dict[str, float]:
    """Flatten lm-eval's results (``{"results": {task: {"exact_match,first-number": x, ...}}}``,
    or the ``results`` mapping itself) to ``{"task/metric,filter": value}``, stderr left out."""
    if not result:
        return {}
    res = result.get("results", result)
    out: dict[str, float] = {}
    if not isinstance(res, Mapping):
        return out
    for task, metrics in res.items():
        if not isinstance(metrics, Mapping):
            continue
        for name, value in metrics.items():
            v = _numeric(value)
            # Scores only: lm-eval's results also carry bookkeeping numbers (sample_len = how
            # many items ran, samples, num_fewshot) that are not metrics.
            if v is None or "stderr" in name or name in _NOT_SCORES:
                continue
            out[f"{task}/{name}"] = v
    return out


def eval_stderrs(result: Mapping[str, Any] | None) -> dict[str, float]:
    """lm-eval's stderrs keyed like ``eval_scores`` (``acc_stderr,none`` -> ``task/acc,none``)."""
    if not result:
        return {}
    res = result.get("results", result)
    out: dict[str, float] = {}
    if not isinstance(res, Mapping):
        return out
    for task, metrics in res.items():
        if not isinstance(metrics, Mapping):
            continue
        for name, value in metrics.items():
            v = _numeric(value)
            if v is None or "_stderr" not in name:
                continue
            out[f"{task}/{name.replace('_stderr', '', 1)}"] = v
    return out
