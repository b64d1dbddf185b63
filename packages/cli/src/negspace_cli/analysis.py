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


def _eval_metrics(result: Mapping[str, Any] | None):
    """(task, metric name, numeric value) for every number in lm-eval's results
    (``{"results": {task: {...}}}`` or the ``results`` mapping itself)."""
    res = (result or {}).get("results", result) if result else None
    if not isinstance(res, Mapping):
        return
    for task, metrics in res.items():
        if isinstance(metrics, Mapping):
            for name, value in metrics.items():
                v = _numeric(value)
                if v is not None:
                    yield task, name, v


def eval_scores(result: Mapping[str, Any] | None) -> dict[str, float]:
    """Flatten lm-eval's results (``{"results": {task: {"exact_match,first-number": x, ...}}}``,
    or the ``results`` mapping itself) to ``{"task/metric,filter": value}``, stderr left out.
    Scores only: lm-eval's results also carry bookkeeping numbers (sample_len = how many items
    ran, samples, num_fewshot) that are not metrics."""
    return {f"{task}/{name}": v for task, name, v in _eval_metrics(result)
            if "stderr" not in name and name not in _NOT_SCORES}


def eval_stderrs(result: Mapping[str, Any] | None) -> dict[str, float]:
    """lm-eval's stderrs keyed like ``eval_scores`` (``acc_stderr,none`` -> ``task/acc,none``)."""
    return {f"{task}/{name.replace('_stderr', '', 1)}": v for task, name, v in _eval_metrics(result)
            if "_stderr" in name}
