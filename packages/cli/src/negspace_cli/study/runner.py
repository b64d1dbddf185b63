"""Run a study's grid through the orchestrator, resumably.

Every cell (base x seed x arm) is one run. ``study.json`` in the study folder records each cell's
run id the moment the run is created, so a rerun (same spec, same folder) follows the runs still
going, fetches the ones that completed and creates only what is missing: nothing is generated
twice. A cell's result (its instructions and its cost, from the run's attempt events) is written
to ``cells/<key>.json`` once its run completed; measuring reads only those files.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from negspace_contracts.errors import NegspaceError
from negspace_contracts.orchestrator import (
    TERMINAL_RUN_STATUSES,
    AttemptEvent,
    OrchestratorClient,
    Run,
    RunConfig,
    RunEvent,
)

from negspace_cli.follow import OutageBudget, make_bar
from negspace_cli.study.spec import StudySpec, cell_key

OUTAGE_S = 600.0
POLL_S = 2.0


class StudyError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    """Atomically (write, fsync, rename): a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@dataclass
class StudyState:
    """``study.json``'s ``cells``: per cell key, its run id, the ids of failed earlier runs and status."""

    path: Path
    spec: StudySpec
    cells: dict[str, dict[str, Any]]

    @classmethod
    def open(cls, folder: Path, spec: StudySpec) -> StudyState:
        path = folder / "study.json"
        if path.exists():
            data = json.loads(path.read_text())
            stored = StudySpec.model_validate(data["spec"])
            if stored.model_dump(exclude={"reuse"}) != spec.model_dump(exclude={"reuse"}):
                raise StudyError(f"{path} holds another study (its spec differs); use another --out or --name")
            return cls(path, spec, data.get("cells", {}))
        return cls(path, spec, {})

    def save(self, extra: dict[str, Any] | None = None) -> None:
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        data.update({"study_id": self.spec.study_id(), "spec": self.spec.model_dump(mode="json"), "cells": self.cells})
        if extra:
            data.update(extra)
        write_json(self.path, data)


def reuse_cells(spec: StudySpec, folder: Path) -> list[str]:
    """Take the finished runs of the studies in ``spec.reuse`` (folders beside ``folder``) for this
    study's missing cells: same base text, seed and arm, the same run config (compared after both
    are read as today's ``RunConfig``, so a field added since with its default still matches) on the
    same model and dtype. The cell file is copied with this study's key and base index and says
    where it came from (``reused_from``); nothing is generated. Returns the keys taken."""
    if not spec.reuse:
        return []
    arms = {a.name: a for a in spec.resolved_arms()}
    missing = {cell_key(*c): c for c in spec.cells() if not (folder / "cells" / f"{cell_key(*c)}.json").exists()}
    taken: list[str] = []
    state: StudyState | None = None
    for source_id in spec.reuse:
        source = folder.parent / source_id
        if source.resolve() == folder.resolve():
            continue
        meta = source / "study.json"
        if not meta.exists():
            raise StudyError(f"reuse: {meta} does not exist (name a study folder beside {folder})")
        other = StudySpec.model_validate(json.loads(meta.read_text())["spec"])
        if other.model != spec.model or other.dtype != spec.dtype:
            _log(f"negspace study: reuse: {source_id} ran on {other.model}/{other.dtype or 'default dtype'}, "
                 f"this study on {spec.model}/{spec.dtype or 'default dtype'}: none of its runs is taken")
            continue
        for path in sorted((source / "cells").glob("*.json")):
            cell = json.loads(path.read_text())
            match = next((k for k, (b, seed, arm) in missing.items()
                          if arm == cell.get("arm") and seed == cell.get("seed")
                          and spec.bases[b].text == cell.get("base_text")), None)
            if match is None:
                continue
            b, seed, arm = missing[match]
            want = spec.run_config(arms[arm], spec.bases[b].text, seed)
            try:
                same = RunConfig.model_validate(cell["config"]) == want
            except ValueError:
                same = False
            if not same:
                continue
            cell.update(key=match, base=b, split=spec.bases[b].split,
                        reused_from=cell.get("reused_from") or f"{source_id}/{cell['key']}")
            write_json(folder / "cells" / f"{match}.json", cell)
            if state is None:
                state = StudyState.open(folder, spec)
            state.cells[match] = {"base": b, "seed": seed, "arm": arm, "failed_runs": [], "run_id": cell["run_id"],
                                  "status": "completed", "reused_from": cell["reused_from"]}
            del missing[match]
            taken.append(match)
    if state is not None:
        state.save()
    if taken:
        _log(f"negspace study: took {len(taken)} finished runs from {', '.join(spec.reuse)} (same base, seed, arm "
             "and run config; cells say reused_from)")
    return taken


def unfinished_elsewhere(spec: StudySpec, folder: Path) -> dict[str, str]:
    """Runs the studies in ``spec.reuse`` started and have not finished (no cell file yet), by this
    study's key (same base text, seed and arm): ``run_cells`` follows such a run instead of creating
    another, once the orchestrator shows it has the same run config."""
    out: dict[str, str] = {}
    wanted = {(spec.bases[b].text, seed, arm): cell_key(b, seed, arm) for b, seed, arm in spec.cells()}
    for source_id in spec.reuse:
        meta = folder.parent / source_id / "study.json"
        if not meta.exists() or meta.parent.resolve() == folder.resolve():
            continue
        data = json.loads(meta.read_text())
        other = StudySpec.model_validate(data["spec"])
        if other.model != spec.model or other.dtype != spec.dtype:
            continue
        for key, c in data.get("cells", {}).items():
            if not c.get("run_id") or (meta.parent / "cells" / f"{key}.json").exists():
                continue
            mine = wanted.get((other.bases[c["base"]].text, c["seed"], c["arm"]))
            if mine:
                out.setdefault(mine, c["run_id"])
    return out


def cost_of(events: list[RunEvent], arm_uses_cfg: bool) -> dict[str, float]:
    """Compute per run from its attempt events: attempts, generated tokens and decode rows (a guided
    attempt at scale != 1 decodes 1 + negatives rows per token), summed node latency. An attempt's
    two-stage angle is in its tokens and latency; a ``kept`` event repeats an earlier attempt's."""
    attempts = tokens = rows = 0
    latency = 0.0
    for ev in events:
        if not isinstance(ev, AttemptEvent):
            continue
        d = ev.data
        if d.kept:  # the repeated event of an attempt kept as the slot's best: no new generation
            continue
        attempts += 1
        n = d.completion_tokens or 0
        tokens += n
        guided = arm_uses_cfg and d.scale is not None and d.scale != 1.0
        rows += n * (1 + d.negatives) if guided else n
        latency += d.latency_s
    return {"attempts": attempts, "generated_tokens": tokens, "decode_rows": rows, "node_seconds": round(latency, 2)}


async def _events(client: OrchestratorClient, run_id: str) -> list[RunEvent]:
    return [ev async for ev in client.runs.events(run_id, after=0)]


async def _wait(client: OrchestratorClient, run_id: str) -> Run:
    budget = OutageBudget(OUTAGE_S)
    while True:
        try:
            run = await client.runs.get(run_id)
            budget.ok()
        except NegspaceError as exc:
            budget.failed(exc)
            await asyncio.sleep(POLL_S)
            continue
        if run.status in TERMINAL_RUN_STATUSES:
            return run
        await asyncio.sleep(POLL_S)


async def run_cells(spec: StudySpec, client: OrchestratorClient, folder: Path, *, parallel: int = 3,
                    quiet: bool = False, max_cells: int | None = None) -> StudyState:
    """Generate every cell that has no result yet (at most ``parallel`` runs at once)."""
    state = StudyState.open(folder, spec)
    state.save()
    arms = {a.name: a for a in spec.resolved_arms()}
    todo = [c for c in spec.cells() if not (folder / "cells" / f"{cell_key(*c)}.json").exists()]
    if max_cells is not None:
        todo = todo[:max_cells]
    done_before = len(spec.cells()) - len([c for c in spec.cells()
                                           if not (folder / "cells" / f"{cell_key(*c)}.json").exists()])
    elsewhere = unfinished_elsewhere(spec, folder)
    bar = make_bar(len(spec.cells()), f"study {spec.study_id()}", "run", disable=quiet)
    bar.update(done_before)
    sem = asyncio.Semaphore(max(1, parallel))
    lock = asyncio.Lock()
    failures: list[str] = []

    async def one(b: int, seed: int, arm_name: str) -> None:
        try:
            await _one(b, seed, arm_name)
        except (NegspaceError, StudyError) as exc:
            failures.append(f"{cell_key(b, seed, arm_name)}: {getattr(exc, 'message', None) or exc}")

    async def _one(b: int, seed: int, arm_name: str) -> None:
        key = cell_key(b, seed, arm_name)
        arm = arms[arm_name]
        async with sem:
            cell = state.cells.setdefault(key, {"base": b, "seed": seed, "arm": arm_name, "failed_runs": []})
            run_id = cell.get("run_id")
            cfg = spec.run_config(arm, spec.bases[b].text, seed)
            run = None
            if not run_id and key in elsewhere:     # a reused study's run still going: follow it
                try:
                    other = await client.runs.get(elsewhere[key])
                    if RunConfig.model_validate(other.config.model_dump(mode="json")) == cfg:
                        run_id = other.id
                        _log(f"negspace study: {key}: following run {run_id} of a reused study")
                        async with lock:
                            cell.update(run_id=run_id, status="running", adopted=True)
                            state.save()
                except NegspaceError:
                    pass
            if run_id:
                try:
                    run = await client.runs.get(run_id)
                except NegspaceError as exc:
                    _log(f"negspace study: {key}: run {run_id} is gone ({exc.message}); creating it again")
                    run_id = None
            if run is not None and run.status in ("failed", "cancelled"):
                cell["failed_runs"].append({"run_id": run_id, "error": run.error})
                run_id = None
            if run_id is None:
                t0 = time.time()
                created = await client.runs.create(cfg)
                run_id = created.id
                async with lock:
                    cell.update(run_id=run_id, created=t0, status="running")
                    state.save()
            run = await _wait(client, run_id)
            if run.status != "completed":
                async with lock:
                    cell["status"] = run.status
                    cell["failed_runs"].append({"run_id": run_id, "error": run.error})
                    cell.pop("run_id", None)
                    state.save()
                failures.append(f"{key}: run {run_id} {run.status}: {run.error}")
                return
            instructions = await client.runs.instructions(run_id)
            if len(instructions) != spec.per_run:
                failures.append(f"{key}: run {run_id} has {len(instructions)} instructions, expected {spec.per_run}")
                return
            events = await _events(client, run_id)
            wall = ((run.updated_at - run.created_at).total_seconds()
                    if run.updated_at and run.created_at else None)
            result = {"key": key, "base": b, "base_text": spec.bases[b].text, "split": spec.bases[b].split,
                      "seed": seed, "arm": arm_name, "kind": arm.kind, "run_id": run_id,
                      "config": run.config.model_dump(mode="json"),
                      "texts": [i.text for i in instructions],
                      "instructions": [i.model_dump(mode="json") for i in instructions],
                      "cost": {**cost_of(events, arm.config.get("negatives", {}).get("use", "guidance") == "guidance"
                                         and arm.kind != "plain"),
                               "wall_seconds": round(wall, 1) if wall is not None else None}}
            write_json(folder / "cells" / f"{key}.json", result)
            async with lock:
                cell["status"] = "completed"
                state.save()
            bar.update(1)
            bar.set_postfix_str(key, refresh=False)

    try:
        await asyncio.gather(*(one(*c) for c in todo))
    finally:
        bar.close()
    if failures:
        raise StudyError("some runs did not complete (rerun the same command to retry them):\n  "
                         + "\n  ".join(failures))
    return state


def load_results(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))]
