"""Statistics for `negspace study`: paired bootstraps over cases and the plain-sampling curve.

Pure numpy. Vocabulary:

* a **case** is one base instruction x one seed; it is the unit of resampling. Every arm is run
  on the same cases, so arms are compared *paired*: a bootstrap replicate draws cases with
  replacement and every arm is evaluated on that same draw. This removes the (large) between-case
  variance -- some base instructions are simply more diverse than others -- from the comparison.
* an **arm** is a run configuration. Its per-case values are ``{case_id: {measure: float}}``
  (``measure`` e.g. ``"vendi"``, ``"on_topic_rate"``, as produced by ``measures.py``).
* the **plain-sampling curve** is the Pareto frontier of the plain arms (temperatures, top_p /
  min_p variants) in (x = on-topic rate, y = Vendi) space, both higher-is-better. Raising the
  temperature buys diversity with on-topic rate, so the frontier runs from the upper left (hot:
  diverse, often off topic) to the lower right (cold: on topic, repetitive). A method is worth
  something only if it sits *above* this curve: more diverse than plain sampling at the same
  on-topic rate. The headline number is ``ratio_to_curve``: arm Vendi / curve Vendi at the arm's
  on-topic rate.

Choices a reviewer should know about:

* estimates are **ratios of means** (mean over cases of the arm's Vendi divided by the mean of
  the other), not means of per-case ratios, which are noisier and biased upwards (Jensen);
* confidence intervals are **percentile** bootstrap intervals over cases (``ci=0.95`` default);
  with few cases (< ~20) they are somewhat too narrow, as percentile intervals are;
* ``share_le_null`` is the share of replicates at or below the null (0 for a difference, 1 for a
  ratio): a one-sided, p-value-like number, not a test statistic. ``p_two_sided`` is
  ``min(1, 2 * min(share_le_null, share_ge_null))``. When several arms are compared, correct for
  it (``holm``);
* **clusters**: cases of the same base instruction (its seeds) are not independent -- they share
  the base's difficulty. Resampling cases then treats 5 seeds x 10 bases as 50 independent units
  and gives too narrow an interval. Pass ``groups`` / ``cluster`` (e.g. the base instruction of
  each case) to resample whole clusters instead (a cluster bootstrap: draw bases with
  replacement, keep all their seeds); the estimate is unchanged, only the interval widens. The
  outputs report ``n_clusters``. With few clusters (< ~10) any bootstrap interval is rough;
  report that number next to the interval;
* the curve is the Pareto frontier of *noisy* plain means: taking the best plain arms favours
  plain sampling slightly (a max of noisy values is biased upwards), which makes the ratio
  conservative. The bootstrap rebuilds the frontier in each replicate, so that selection is part
  of the interval;
* Vendi grows with the number of texts; arms are only comparable at the same n per case.
  ``ratio_to_curve`` and ``matched_comparison`` check an ``"n"`` measure when the rows carry one
  and say so in ``note`` when it differs between arms on a case;
* a case with a NaN (missing / undefined measure) in any arm involved is dropped from that
  comparison, so comparisons stay paired; the dropped case ids are reported;
* the curve is interpolated linearly between frontier points and **never extrapolated**: an
  on-topic rate outside the plain arms' range gives NaN and a flag, and the bootstrap reports the
  share of replicates where that happened (``share_out_of_range``). ``clamp_right=True`` is the one
  documented exception (see ``curve_at``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Interp",
    "curve_at",
    "frontier",
    "holm",
    "matched_comparison",
    "paired_arrays",
    "paired_bootstrap",
    "per_case_ratio_to_curve",
    "ratio_to_curve",
]

CaseValues = Mapping[Any, Mapping[str, float]]   # {case_id: {measure: value}}

_X_KEY = "on_topic_rate"
_Y_KEY = "vendi"
# Tolerance when deciding whether x lies inside the frontier's x-range (float noise of means).
_X_TOL = 1e-12


def _f(value: Any) -> float:
    """A plain Python float (json-serializable), NaN for None."""
    return float("nan") if value is None else float(value)


def _quantiles(values: np.ndarray, ci: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _check_ci(ci: float, n_boot: int) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _group_index(groups: Sequence[Any] | None, n: int) -> tuple[np.ndarray, int]:
    """Cluster label (0..G-1) of each of n cases; every case its own cluster when None."""
    if groups is None:
        return np.arange(n), n
    labels = list(groups)
    if len(labels) != n:
        raise ValueError(f"groups must label every case: {len(labels)} labels for {n} cases")
    codes: dict[Any, int] = {}
    return np.array([codes.setdefault(g, len(codes)) for g in labels], dtype=int), len(codes)


def _resampled_means(values: np.ndarray, gidx: np.ndarray, n_groups: int, draws: np.ndarray) -> np.ndarray:
    """Means over resampled clusters. ``values`` (..., n) over cases, ``gidx`` (n,) cluster of
    each case, ``draws`` (n_boot, G) drawn cluster indices -> (..., n_boot). With singleton
    clusters this is the plain case bootstrap."""
    values = np.asarray(values, dtype=float)
    if n_groups == values.shape[-1] and np.array_equal(gidx, np.arange(n_groups)):
        return values[..., draws].mean(axis=-1)
    flat = values.reshape(-1, values.shape[-1])
    sums = np.stack([np.bincount(gidx, weights=row, minlength=n_groups) for row in flat])
    sums = sums.reshape(values.shape[:-1] + (n_groups,))
    counts = np.bincount(gidx, minlength=n_groups).astype(float)
    return sums[..., draws].sum(axis=-1) / counts[draws].sum(axis=-1)


# --------------------------------------------------------------------------- paired bootstrap

def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                     stat: str = "diff", n_boot: int = 10000, seed: int = 0, ci: float = 0.95,
                     paired: bool = True, groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Bootstrap over cases of ``mean(a) - mean(b)`` (``stat="diff"``) or ``mean(a) / mean(b)``
    (``stat="ratio"``); ``a[i]`` and ``b[i]`` are the same case in two arms.

    ``paired=True`` (the default, and the right choice for a study) resamples case indices once
    per replicate and applies them to both arms. ``paired=False`` resamples ``a`` and ``b``
    independently, as if the arms had been run on unrelated cases; it exists to show (and test)
    how much the pairing buys. Pairs with a NaN in either array are dropped.

    ``groups`` (one label per case, e.g. its base instruction) resamples whole clusters of cases
    instead of single cases (see the module docstring).

    Returns ``{"stat", "estimate", "ci_low", "ci_high", "ci", "share_le_null", "share_ge_null",
    "p_two_sided", "null", "n_cases", "n_clusters", "n_dropped", "n_boot", "paired", "note"}``,
    plain floats and ints. With no complete pair every number is NaN and ``note`` says why.
    """
    if stat not in ("diff", "ratio"):
        raise ValueError(f"stat must be 'diff' or 'ratio', got {stat!r}")
    _check_ci(ci, n_boot)
    a_arr = np.asarray(a, dtype=float).ravel()
    b_arr = np.asarray(b, dtype=float).ravel()
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must cover the same cases: {a_arr.size} vs {b_arr.size} values")
    keep = np.isfinite(a_arr) & np.isfinite(b_arr)
    if groups is not None:
        groups = list(groups)
        if len(groups) != keep.size:
            raise ValueError(f"groups must label every case: {len(groups)} labels for {keep.size} cases")
        groups = [g for g, k in zip(groups, keep, strict=True) if k]
    a_arr, b_arr = a_arr[keep], b_arr[keep]
    n = int(a_arr.size)
    gidx, n_groups = _group_index(groups, n)
    null = 0.0 if stat == "diff" else 1.0
    out: dict[str, Any] = {"stat": stat, "ci": float(ci), "null": null, "n_cases": n,
                           "n_clusters": int(n_groups), "n_dropped": int((~keep).sum()), "n_boot": int(n_boot),
                           "paired": bool(paired), "note": ""}
    nan = float("nan")
    if n == 0:
        out.update(estimate=nan, ci_low=nan, ci_high=nan, share_le_null=nan, share_ge_null=nan,
                   p_two_sided=nan, note="no case with a finite value in both arms")
        return out

    def combine(ma: np.ndarray | float, mb: np.ndarray | float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(ma - mb if stat == "diff" else ma / mb, dtype=float)

    estimate = float(combine(a_arr.mean(), b_arr.mean()))
    rng = np.random.default_rng(seed)
    idx_a = rng.integers(0, n_groups, size=(n_boot, n_groups))
    idx_b = idx_a if paired else rng.integers(0, n_groups, size=(n_boot, n_groups))
    reps = combine(_resampled_means(a_arr, gidx, n_groups, idx_a),
                   _resampled_means(b_arr, gidx, n_groups, idx_b))
    finite = reps[np.isfinite(reps)]
    low, high = _quantiles(reps, ci)
    if finite.size:
        le, ge = float(np.mean(finite <= null)), float(np.mean(finite >= null))
    else:
        le = ge = nan
    out.update(estimate=estimate, ci_low=low, ci_high=high, share_le_null=le, share_ge_null=ge,
               p_two_sided=min(1.0, 2.0 * min(le, ge)) if finite.size else nan)
    if n_groups < 2:
        out["note"] = ("a single case: the interval is degenerate (no between-case variation)" if n < 2
                       else "a single cluster: the interval is degenerate (no between-cluster variation)")
    elif finite.size < reps.size:
        out["note"] = (f"{reps.size - finite.size} of {reps.size} replicates undefined "
                       "(division by a zero mean); interval from the others")
    return out


def holm(p_values: Mapping[str, float] | Sequence[float]) -> dict[Any, float] | list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error), for several arms compared at once.

    Accepts a mapping (returns one with the same keys) or a sequence (returns a list). NaN stays
    NaN and does not count towards the family size.
    """
    keys = list(p_values.keys()) if isinstance(p_values, Mapping) else list(range(len(p_values)))
    values = [float(p_values[k]) for k in keys]
    finite = [(v, k) for v, k in zip(values, keys, strict=True) if math.isfinite(v)]
    finite.sort(key=lambda item: item[0])
    m = len(finite)
    adjusted: dict[Any, float] = {k: float("nan") for k in keys}
    running = 0.0
    for rank, (v, k) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * v))
        adjusted[k] = running
    if isinstance(p_values, Mapping):
        return adjusted
    return [adjusted[k] for k in keys]


# --------------------------------------------------------------------------- frontier and curve

class Interp(NamedTuple):
    """``curve_at``'s answer: the curve's y at x, whether x was inside the frontier's x-range,
    and where it fell: ``"inside"``, ``"left"`` (x below the smallest frontier x), ``"right"``
    (above the largest), ``"clamped"`` (right of the range with ``clamp_right=True``) or
    ``"empty"`` (no frontier)."""

    value: float
    in_range: bool
    where: str


def _as_point(point: Any) -> dict[str, Any]:
    if isinstance(point, Mapping):
        return {"x": _f(point["x"]), "y": _f(point["y"]), "label": point.get("label", "")}
    seq = tuple(point)
    if len(seq) not in (2, 3):
        raise ValueError(f"a point is (x, y), (x, y, label) or a mapping with x, y: {point!r}")
    return {"x": _f(seq[0]), "y": _f(seq[1]), "label": seq[2] if len(seq) == 3 else ""}


def frontier(points: Iterable[Any]) -> list[dict[str, Any]]:
    """The Pareto frontier of ``points`` when higher x AND higher y are better.

    A point is kept unless another point is at least as good in both coordinates and strictly
    better in one. Exact duplicates are kept once (the first label). Points with a NaN are
    ignored. Returns ``[{"x", "y", "label"}]`` sorted by x ascending; along it y is strictly
    decreasing (the upper-left to lower-right trade-off curve).

    Points are ``(x, y)``, ``(x, y, label)`` or mappings with ``x``, ``y`` and optional
    ``label``.
    """
    pts = [p for p in (_as_point(p) for p in points) if math.isfinite(p["x"]) and math.isfinite(p["y"])]
    # Highest x first; among equal x the highest y first, so the first of a tie group wins.
    order = sorted(range(len(pts)), key=lambda i: (-pts[i]["x"], -pts[i]["y"], i))
    kept: list[dict[str, Any]] = []
    best_y = -math.inf
    for i in order:
        p = pts[i]
        # Everything already kept has x >= p.x; p survives only with a strictly higher y.
        if p["y"] > best_y:
            kept.append(p)
            best_y = p["y"]
    kept.reverse()
    return kept


def curve_at(front: Sequence[Mapping[str, Any]], x: float, clamp_right: bool = False) -> Interp:
    """Linear interpolation of the frontier's y at ``x``; never extrapolates by default.

    Outside ``[min x, max x]`` of the frontier the value is NaN and ``in_range`` False. A
    one-point frontier is "in range" only at its own x.

    ``clamp_right=True`` is the one documented exception: for ``x`` right of the range (an arm
    more on-topic than the most on-topic plain arm) it returns the y of the rightmost frontier
    point. Along the frontier y decreases with x, so that point's y is an upper bound on what
    plain sampling would achieve further right if the trade-off continued, and an arm's ratio to
    it is a *conservative* (too low) estimate. It is flagged ``where="clamped"``,
    ``in_range=False``. There is no left clamp: left of the range the curve could rise, so
    clamping would overstate an arm's advantage.
    """
    x = _f(x)
    if not front or not math.isfinite(x):
        return Interp(float("nan"), False, "empty" if not front else "left")
    xs = np.array([p["x"] for p in front], dtype=float)
    ys = np.array([p["y"] for p in front], dtype=float)
    if x < xs[0] - _X_TOL:
        return Interp(float("nan"), False, "left")
    if x > xs[-1] + _X_TOL:
        if clamp_right:
            return Interp(float(ys[-1]), False, "clamped")
        return Interp(float("nan"), False, "right")
    return Interp(float(np.interp(min(max(x, xs[0]), xs[-1]), xs, ys)), True, "inside")


# --------------------------------------------------------------------------- ratio to the curve

def paired_arrays(arms: Mapping[str, CaseValues], keys: Sequence[str]
                  ) -> tuple[list[Any], dict[str, dict[str, np.ndarray]], list[Any]]:
    """Align several arms on the cases they all have with a finite value for every key.

    Returns ``(cases, values, dropped)``: ``values[arm][key]`` is a float array over ``cases``
    (sorted by ``str(case_id)``); ``dropped`` lists the case ids left out.
    """
    all_cases: set[Any] = set()
    for per_case in arms.values():
        all_cases.update(per_case.keys())

    def complete(case: Any) -> bool:
        for per_case in arms.values():
            row = per_case.get(case)
            if row is None:
                return False
            for key in keys:
                v = row.get(key)
                if v is None or not math.isfinite(float(v)):
                    return False
        return True

    ordered = sorted(all_cases, key=str)
    cases = [c for c in ordered if complete(c)]
    dropped = [c for c in ordered if c not in set(cases)]
    values = {name: {key: np.array([float(per_case[c][key]) for c in cases], dtype=float)
                     for key in keys}
              for name, per_case in arms.items()}
    return cases, values, dropped


Cluster = Mapping[Any, Any] | Callable[[Any], Any] | None


def _clusters(cluster: Cluster, cases: Sequence[Any]) -> list[Any] | None:
    if cluster is None:
        return None
    if callable(cluster):
        return [cluster(c) for c in cases]
    missing = [c for c in cases if c not in cluster]
    if missing:
        raise ValueError(f"cluster gives no cluster for cases {missing[:5]}")
    return [cluster[c] for c in cases]


def _n_note(arms: Mapping[str, CaseValues], cases: Sequence[Any]) -> str:
    """A note when the arms have a different number of texts ("n") on some case."""
    differ = []
    for case in cases:
        ns = {float(per_case[case]["n"]) for per_case in arms.values() if "n" in per_case[case]}
        if len(ns) > 1:
            differ.append(case)
    if not differ:
        return ""
    return (f"the number of texts n differs between arms on {len(differ)} case(s) (e.g. {differ[0]}): "
            "Vendi grows with n, so those comparisons are not like for like")


def ratio_to_curve(arm_case_values: CaseValues, plain_case_values_by_arm: Mapping[str, CaseValues],
                   n_boot: int = 10000, seed: int = 0, ci: float = 0.95,
                   x_key: str = _X_KEY, y_key: str = _Y_KEY,
                   clamp_right: bool = False, cluster: Cluster = None) -> dict[str, Any]:
    """The headline: the arm's mean Vendi over the plain-sampling curve's Vendi at the arm's mean
    on-topic rate, with a paired bootstrap over cases.

    ``arm_case_values`` is ``{case_id: {"vendi": ..., "on_topic_rate": ...}}`` for the arm;
    ``plain_case_values_by_arm`` is ``{plain_arm_name: {case_id: {...}}}`` (the temperatures and
    other plain variants). Only cases present, with finite values, in the arm and in every plain
    arm are used. In every replicate the cases are drawn once; the arm's means AND each plain
    arm's means are taken over that same draw, the frontier is rebuilt from the plain means and
    interpolated at the arm's mean on-topic rate (``curve_at``; no extrapolation unless
    ``clamp_right``). Replicates where the arm's on-topic rate falls outside the curve's range
    are not used for the interval (with ``clamp_right`` the right-side ones are, against the
    clamped point); their share is reported either way, and when it is large (say > 5 %) the
    interval describes only the in-range part and should not be reported as is.

    ``cluster`` maps a case id to its cluster (a mapping or a function, e.g. ``lambda case:
    case[0]`` for ``(base, seed)`` ids): whole clusters are resampled (recommended: the base).

    Returns ``{"estimate", "ci_low", "ci_high", "ci", "share_le_null" (share of in-range
    replicates with ratio <= 1), "share_ge_null", "p_two_sided", "share_out_of_range",
    "in_range" (point estimate), "where", "arm_x", "arm_y", "curve_y", "frontier" (list of
    {"x", "y", "label"} from all cases), "n_cases", "n_clusters", "cases_dropped", "n_boot",
    "note"}``.
    """
    _check_ci(ci, n_boot)
    if not plain_case_values_by_arm:
        raise ValueError("ratio_to_curve needs at least one plain arm to build the curve from")
    arm_name = "\x00arm"   # cannot collide with a plain arm's name
    arms = {arm_name: arm_case_values, **plain_case_values_by_arm}
    cases, values, dropped = paired_arrays(arms, [x_key, y_key])
    plain_names = list(plain_case_values_by_arm)
    nan = float("nan")
    out: dict[str, Any] = {"ci": float(ci), "null": 1.0, "n_cases": len(cases), "n_clusters": 0,
                           "cases_dropped": [str(c) for c in dropped], "n_boot": int(n_boot),
                           "clamp_right": bool(clamp_right), "note": ""}
    if not cases:
        out.update(estimate=nan, ci_low=nan, ci_high=nan, share_le_null=nan, share_ge_null=nan,
                   p_two_sided=nan, share_out_of_range=nan, in_range=False, where="empty",
                   arm_x=nan, arm_y=nan, curve_y=nan, frontier=[],
                   note="no case with finite values in the arm and every plain arm")
        return out
    n = len(cases)
    gidx, n_groups = _group_index(_clusters(cluster, cases), n)
    out["n_clusters"] = int(n_groups)
    ax, ay = values[arm_name][x_key], values[arm_name][y_key]
    px = np.stack([values[name][x_key] for name in plain_names])   # (k, n)
    py = np.stack([values[name][y_key] for name in plain_names])

    def one(arm_x: float, arm_y: float, plain_x: np.ndarray, plain_y: np.ndarray
            ) -> tuple[float, Interp, list[dict[str, Any]]]:
        front = frontier(zip(plain_x.tolist(), plain_y.tolist(), plain_names, strict=True))
        at = curve_at(front, arm_x, clamp_right=clamp_right)
        usable = at.in_range or at.where == "clamped"
        ratio = arm_y / at.value if usable and at.value > 0 else nan
        return ratio, at, front

    est, at, front = one(float(ax.mean()), float(ay.mean()), px.mean(axis=1), py.mean(axis=1))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_groups, size=(n_boot, n_groups))
    rax, ray = (_resampled_means(v, gidx, n_groups, idx) for v in (ax, ay))   # (n_boot,)
    rpx, rpy = (_resampled_means(v, gidx, n_groups, idx) for v in (px, py))   # (k, n_boot)
    reps = np.empty(n_boot)
    out_of_range = 0
    for r in range(n_boot):
        ratio, rat, _ = one(float(rax[r]), float(ray[r]), rpx[:, r], rpy[:, r])
        if not rat.in_range:
            out_of_range += 1
        reps[r] = ratio
    low, high = _quantiles(reps, ci)
    finite = reps[np.isfinite(reps)]
    le = float(np.mean(finite <= 1.0)) if finite.size else nan
    ge = float(np.mean(finite >= 1.0)) if finite.size else nan
    out.update(estimate=float(est), ci_low=low, ci_high=high, share_le_null=le, share_ge_null=ge,
               p_two_sided=min(1.0, 2.0 * min(le, ge)) if finite.size else nan,
               share_out_of_range=out_of_range / n_boot, in_range=bool(at.in_range),
               where=at.where, arm_x=float(ax.mean()), arm_y=float(ay.mean()),
               curve_y=float(at.value), frontier=front)
    notes = []
    if not at.in_range:
        notes.append(f"the arm's on-topic rate {ax.mean():.3f} is {at.where} of the plain curve's "
                     f"range [{front[0]['x']:.3f}, {front[-1]['x']:.3f}]"
                     + ("; ratio to the clamped rightmost point (conservative)"
                        if at.where == "clamped" else "; no ratio"))
    if out["share_out_of_range"] > 0.05:
        notes.append(f"{out['share_out_of_range']:.0%} of replicates out of the curve's range: "
                     + ("the interval uses the clamped point for those on the right" if clamp_right
                        else "the interval covers only the in-range ones"))
    if n_groups < 2:
        notes.append("a single case or cluster: the interval is degenerate")
    notes.append(_n_note(arms, cases))
    out["note"] = "; ".join(x for x in notes if x)
    return out


def per_case_ratio_to_curve(arm_case_values: CaseValues,
                            plain_case_values_by_arm: Mapping[str, CaseValues],
                            x_key: str = _X_KEY, y_key: str = _Y_KEY,
                            clamp_right: bool = False) -> dict[str, dict[str, Any]]:
    """For each case: the arm's Vendi over the curve built from the plain arms on that case alone,
    at the arm's on-topic rate on that case. ``{str(case_id): {"ratio", "in_range", "where",
    "x", "y", "curve_y"}}``; ``ratio`` is NaN out of range. Descriptive (the per-case plot): a
    case's curve rests on few texts, so many cases may fall out of range; use ``ratio_to_curve``
    for the estimate."""
    arm_name = "\x00arm"
    arms = {arm_name: arm_case_values, **plain_case_values_by_arm}
    cases, values, _ = paired_arrays(arms, [x_key, y_key])
    names = list(plain_case_values_by_arm)
    result: dict[str, dict[str, Any]] = {}
    for i, case in enumerate(cases):
        front = frontier((values[nm][x_key][i], values[nm][y_key][i], nm) for nm in names)
        x, y = float(values[arm_name][x_key][i]), float(values[arm_name][y_key][i])
        at = curve_at(front, x, clamp_right=clamp_right)
        usable = (at.in_range or at.where == "clamped") and at.value > 0
        result[str(case)] = {"ratio": y / at.value if usable else float("nan"),
                             "in_range": bool(at.in_range), "where": at.where, "x": x, "y": y,
                             "curve_y": float(at.value)}
    return result


# --------------------------------------------------------------------------- arm vs arm

def matched_comparison(arm_a: CaseValues, arm_b: CaseValues, n_boot: int = 10000, seed: int = 0,
                       ci: float = 0.95, x_key: str = _X_KEY, y_key: str = _Y_KEY,
                       extra: Mapping[str, str] | None = None, cluster: Cluster = None) -> dict[str, Any]:
    """Arm A against arm B on the same cases (e.g. guided vs in-prompt history).

    Returns ``{"vendi_ratio": paired_bootstrap(A vendi, B vendi, "ratio"), "on_topic_diff":
    paired_bootstrap(A on-topic, B on-topic, "diff"), "n_cases", "cases_dropped"}``, plus
    ``"{measure}_{stat}"`` for each ``extra={measure: "diff"|"ratio"}``, ``"n_clusters"`` and
    ``"note"``; ``cluster`` as in ``ratio_to_curve``. Cases missing a value
    in either arm for any requested measure are dropped from all comparisons, so every number
    is over the same cases. The same seed is used for every measure, so the replicates draw the
    same cases throughout.
    """
    wanted = {y_key: "ratio", x_key: "diff", **(extra or {})}
    cases, values, dropped = paired_arrays({"a": arm_a, "b": arm_b}, list(wanted))
    groups = _clusters(cluster, cases)
    out: dict[str, Any] = {"n_cases": len(cases), "n_clusters": _group_index(groups, len(cases))[1],
                           "cases_dropped": [str(c) for c in dropped],
                           "note": _n_note({"a": arm_a, "b": arm_b}, cases)}
    for key, stat in wanted.items():
        name = ("vendi_ratio" if key == y_key and stat == "ratio"
                else "on_topic_diff" if key == x_key and stat == "diff" else f"{key}_{stat}")
        out[name] = paired_bootstrap(values["a"][key], values["b"][key], stat=stat,
                                     n_boot=n_boot, seed=seed, ci=ci, groups=groups)
    return out
