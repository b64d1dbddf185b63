"""Numbers behind the report: a shared PCA basis, eval-score extraction, per-round grouping.

The diversity metrics themselves are computed by the controller (``/collections/{c}/metrics``,
reached through the orchestrator's ``/runs/{id}/metrics``); this module only fits the projection
both datasets share, so hull volumes compare alike, and the 2-D map's projection.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

HULL_DIMS = 4  # the controller's hull dimension (negspace_controller.metrics.HULL_DIMS)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, basis dims x d) of the L2-normalised rows' principal axes (the controller's convention)."""
    x = normalize(x)
    if len(x) < dims:
        raise ValueError(f"needs at least {dims} points to fit {dims} principal axes (got {len(x)})")
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dims]


def project(x: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    return (normalize(x) - mean) @ basis.T


def by_round(rows: Iterable[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    out: dict[int, list] = defaultdict(list)
    for r in rows:
        out[int(r["round"])].append(r)
    return dict(sorted(out.items()))


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


def is_finite_metric(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and math.isfinite(float(v)))


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
