"""``negspace study``: the command line of a study (see the package docstring).

    negspace study                                   # the documented default study (make study)
    negspace study --spec study.json                 # a study file (StudySpec fields)
    negspace study --base "Write a poem." --base "Write a haiku." --tune-base "Write a math problem." \\
                   --seeds 1,2,3 --arms plain-t1.0,plain-t1.4,history,guided --nodes 4 --rounds 5
    negspace study --model qwen2.5-coder-1.5b       # on the optional 1.5B model (spec field ``model``)
    negspace study --list-arms                       # every named arm and what it is

A rerun of the same command resumes the same folder (``<out>/<name>-<digest of the spec>``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import httpx
from negspace_contracts.errors import NegspaceError
from negspace_contracts.orchestrator import OrchestratorClient
from negspace_models import canonical_name

from negspace_cli import launcher
from negspace_cli.study import arms as arms_mod
from negspace_cli.study.runner import StudyError, reuse_cells, run_cells
from negspace_cli.study.spec import DEFAULT_ARMS, DEFAULT_SEEDS, StudySpec, cell_key, default_spec, load_spec

CALL_TIMEOUT_S = 600.0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, not {text!r}") from None


def add_parser(sub, client_args, stack_args) -> argparse.ArgumentParser:
    st = sub.add_parser("study", help="bases x seeds x arms: is the guidance more diverse than plain sampling "
                                      "at equal quality? (resumable; report + plots)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    client_args(st)
    st.add_argument("--spec", type=Path, default=None, help="a study file (JSON or YAML; StudySpec fields)")
    st.add_argument("--base", action="append", default=None, help="a held-out base instruction (repeatable)")
    st.add_argument("--tune-base", action="append", default=None,
                    help="a base instruction used for tuning, reported apart (repeatable)")
    st.add_argument("--seeds", type=_seeds, default=None, help=f"comma-separated (default {DEFAULT_SEEDS})")
    st.add_argument("--arms", type=_csv, default=None, help=f"comma-separated arm names (default {','.join(DEFAULT_ARMS)})")
    st.add_argument("--nodes", type=int, default=None, help="nodes per run (default 4)")
    st.add_argument("--rounds", type=int, default=None, help="rounds after the bootstrap (default 5: 24 per run)")
    st.add_argument("--max-tokens", type=int, default=None, help="per generation (default 64)")
    st.add_argument("--eval-embedder", default=None, help="evaluation embedder, never the controller's "
                    "(default all-mpnet-base-v2; a hub id or a folder)")
    st.add_argument("--name", default=None, help="study name, the folder's prefix (default study)")
    st.add_argument("--out", type=Path, default=Path("runs"), help="studies folder (default ./runs)")
    st.add_argument("--parallel", type=int, default=3, help="runs at once (default 3)")
    st.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    st.add_argument("--analyze-only", action="store_true", help="measure and report what is generated; run nothing")
    st.add_argument("--list-arms", action="store_true", help="print the named arms and exit")
    st.add_argument("--no-start", action="store_true", help="fail instead of starting a local stack")
    st.add_argument("--quiet", action="store_true", help="no progress bars")
    stack_args(st)
    return st


def build_spec(a: argparse.Namespace) -> StudySpec:
    over = dict(seeds=a.seeds, arms=a.arms, nodes=a.nodes, rounds=a.rounds, max_tokens=a.max_tokens,
                eval_embedder=a.eval_embedder, name=a.name, model=a.model)
    if a.base or a.tune_base:
        over["bases"] = ([{"text": t, "split": "tune"} for t in a.tune_base or []]
                         + [{"text": t, "split": "held_out"} for t in a.base or []])
    if a.spec is not None:
        return load_spec(a.spec, **over)
    return default_spec(**over)


def cmd_study(a: argparse.Namespace, *, reachable, stack_config, raise_stop, err) -> int:
    if a.list_arms:
        for arm in arms_mod.ARMS.values():
            width = max(len(name) for name in arms_mod.ARMS)
            print(f"{arm.name:{width}s} {arm.kind:9s} {arm.doc}")
        return 0
    try:
        spec = build_spec(a)
    except (ValueError, OSError) as exc:
        err(f"bad study: {exc}")
        return 2
    folder = a.out / spec.study_id()
    # The spec decides the model a stack started here loads, so study.json names what ran.
    env_model = os.environ.get("NODE_MODEL", "").strip()
    if env_model and canonical_name(env_model) != spec.model:
        print(f"negspace study: NODE_MODEL={env_model} is not used: this study runs on its spec's model "
              f"{spec.model} (pass --model {env_model} to run it on that one)", file=sys.stderr)
    a.model = spec.model
    if spec.dtype is not None:
        asked = a.dtype or os.environ.get("NODE_DTYPE", "").strip()
        if asked and asked != spec.dtype:
            print(f"negspace study: dtype {asked} is not used: this study's spec says dtype {spec.dtype}",
                  file=sys.stderr)
        a.dtype = spec.dtype
    print(f"negspace study: {len(spec.cells())} runs ({len(spec.bases)} bases x {len(spec.seeds)} seeds x "
          f"{len(spec.arms)} arms, {spec.per_run} instructions each) -> {folder}", file=sys.stderr)
    from negspace_cli.study import analyze  # the evaluation embedder's stack loads only here

    if not a.analyze_only:   # --analyze-only measures what the folder holds and changes no cell
        try:
            reuse_cells(spec, folder)
        except StudyError as exc:
            err(str(exc))
            return 2
    missing = [c for c in spec.cells() if not (folder / "cells" / f"{cell_key(*c)}.json").exists()]
    if a.analyze_only or not missing:
        if not missing:
            print("negspace study: every run is generated; measuring and reporting", file=sys.stderr)
        out = analyze.analyze(folder, spec, n_boot=a.n_boot, quiet=a.quiet)
        print(f"negspace study: report: {out}")
        return 0
    stack = None
    url = a.orchestrator_url
    if asyncio.run(reachable(url)):
        print(f"negspace study: using the stack at {url}; its node must run {spec.model}"
              + (f" in {spec.dtype}" if spec.dtype else "") + " (what study.json records): a running stack "
              "keeps the model and dtype it was started with", file=sys.stderr)
    else:
        if a.no_start:
            err(f"no orchestrator answers at {url} (start one with `negspace up`)")
            return 1
        print(f"negspace: no orchestrator at {url}: starting the local stack (no trainer)", file=sys.stderr)
        stack = launcher.Stack(stack_config(a), services=tuple(s for s in launcher.SERVICES if s != "trainer"))
        url = stack.urls["orchestrator"]
    code = launcher.run_on_stack(stack, lambda: asyncio.run(_generate(spec, url, folder, a.parallel, a.quiet)),
                                 on_sigterm=raise_stop, errors=(StudyError, NegspaceError), err=err,
                                 interrupted="interrupted (rerun the same command to resume)")
    if code:
        return code
    out = analyze.analyze(folder, spec, n_boot=a.n_boot, quiet=a.quiet)
    print(f"negspace study: report: {out}")
    return 0


async def _generate(spec: StudySpec, url: str, folder: Path, parallel: int, quiet: bool) -> None:
    token = launcher.resolve_api_token()
    async with OrchestratorClient(url, token=token, timeout=httpx.Timeout(CALL_TIMEOUT_S, connect=10.0)) as orch:
        await run_cells(spec, orch, folder, parallel=parallel, quiet=quiet)
