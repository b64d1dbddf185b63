"""``negspace``: the command line.

    negspace up [--background] [--engine vllm|transformers] [--logs DIR] [--<svc>-port N]
    negspace down
    negspace run --base "..." --nodes 4 --rounds 3 [--baseline]
    negspace runs
    negspace experiment --base "Write a math problem." --nodes 4 --rounds 3 [--out runs]
    negspace study [--spec FILE | --base ... --seeds 1,2,3 --arms a,b,c] [--out runs]
    negspace export RUN_ID --format hf|parquet|jsonl --out DIR [--push-to-hub REPO]

The orchestrator URL comes from --orchestrator-url or $NEGSPACE_ORCHESTRATOR_URL (default
http://127.0.0.1:8000); the bearer token from $NEGSPACE_API_TOKEN, else $NEGSPACE_HOME/api-token
(which `negspace up` creates when neither exists, and gives to every service).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from negspace_contracts.errors import NegspaceError
from negspace_contracts.orchestrator import (
    MAX_RUNS_PAGE_SIZE,
    RUNS_PAGE_SIZE,
    OrchestratorClient,
    RunConfig,
)
from negspace_models import DEFAULT_MODEL, canonical_name
from pydantic import ValidationError

from negspace_cli import launcher
from negspace_cli.experiment import DEFAULT_EVAL_TASK, ExperimentConfig, ExperimentError, run_experiment
from negspace_cli.follow import follow_run
from negspace_cli.study import command as study_command

DEFAULT_ORCHESTRATOR_URL = "http://127.0.0.1:8000"
EXPERIMENT_CALL_TIMEOUT_S = 3600.0


def _err(msg: str) -> None:
    print(f"negspace: error: {msg}", file=sys.stderr, flush=True)


# ---- stack options shared by `up` and `experiment` ------------------------------------------
def _add_stack_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("local stack (negspace up)")
    g.add_argument("--host", default="127.0.0.1", help="interface the services bind (default 127.0.0.1)")
    for svc in launcher.SERVICES:
        g.add_argument(f"--{svc}-port", type=int, default=launcher.DEFAULT_PORTS[svc],
                       help=f"default {launcher.DEFAULT_PORTS[svc]}")
    g.add_argument("--engine", choices=["vllm", "transformers"], default=None,
                   help="node engine (default: vllm when importable, else transformers)")
    g.add_argument("--kv-cache-gib", type=float, default=None, help="node: vLLM CPU KV cache size")
    g.add_argument("--model", default=None, metavar="NAME",
                   help="node: the generating model, a known name (`python -m negspace_models list`: "
                        "smollm2-135m, the default, or qwen2.5-coder-1.5b, prepared once on first use), a hub id "
                        "or a local folder (default: NODE_MODEL, else the bundled smollm2-135m)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                   help="node: the weights' dtype (default: NODE_DTYPE, else auto: bfloat16 on CPUs with bf16 units "
                        "for bf16 checkpoints, else float32)")
    g.add_argument("--logs", type=Path, default=None, help="log folder (default $NEGSPACE_HOME/logs)")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="Qdrant, SQLite, exports and trainer jobs here (default: each service's, under $NEGSPACE_HOME)")
    g.add_argument("--health-timeout", type=float, default=600.0, help="seconds to wait for every /health")
    g.add_argument("--grace", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL on stop")


def _stack_config(a: argparse.Namespace) -> launcher.StackConfig:
    return launcher.StackConfig(host=a.host, ports={s: getattr(a, f"{s}_port") for s in launcher.SERVICES},
                                logs_dir=a.logs, data_dir=a.data_dir, engine=a.engine, node_kv_cache_gib=a.kv_cache_gib,
                                node_model=a.model, node_dtype=a.dtype,
                                health_timeout_s=a.health_timeout, grace_s=a.grace)


class _Stop(KeyboardInterrupt):
    """SIGTERM while a command holds a stack: handled like Ctrl-C (the stack stops, the command
    says how to resume) instead of a traceback."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _print_urls(stack: launcher.Stack) -> None:
    print("negspace: every service is healthy", flush=True)
    for name, url in stack.urls.items():
        print(f"  {name:<13} {url}   (API: {url}/docs)", flush=True)
    print(f"  logs          {stack.config.resolved_logs_dir}", flush=True)


def cmd_up(a: argparse.Namespace) -> int:
    pidfile = launcher.pid_file()
    state = launcher.read_state(pidfile)
    if state and launcher.pid_alive(int(state.get("pid", 0))):
        _err(f"a launcher is already running (pid {state['pid']}, {pidfile}); `negspace down` stops it")
        return 1
    if a.background:
        return _up_background(a, pidfile)
    stack = launcher.Stack(_stack_config(a))
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    supervised = a.supervised
    try:
        stack.spawn()
        if supervised:
            launcher.write_state(pidfile, stack.state(status="starting"))
        stack.wait_healthy()
        _print_urls(stack)
        if supervised:
            launcher.write_state(pidfile, stack.state(status="ready"))
        else:
            print("negspace: Ctrl-C stops them all", flush=True)
        while True:
            dead = stack.first_dead()
            if dead is not None:
                _err(f"{dead.name} exited with code {dead.proc.returncode} (log: {dead.log_path}):\n"
                     f"{launcher.log_tail(dead.log_path)}")
                return 1
            time.sleep(1.0)
    except _Stop as exc:
        print(f"negspace: {exc}: stopping every service", file=sys.stderr, flush=True)
        return 0
    except launcher.LaunchError as exc:
        _err(str(exc))
        return 1
    finally:
        # a second Ctrl-C must not interrupt the shutdown itself
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        stack.stop()
        if supervised:
            with contextlib.suppress(FileNotFoundError):
                pidfile.unlink()
        for s, h in old.items():
            signal.signal(s, h)


def _up_background(a: argparse.Namespace, pidfile: Path) -> int:
    argv = [sys.executable, "-m", "negspace_cli", "up", "--supervised", "--host", a.host,
            "--health-timeout", str(a.health_timeout), "--grace", str(a.grace)]
    for svc in launcher.SERVICES:
        argv += [f"--{svc}-port", str(getattr(a, f"{svc}_port"))]
    if a.engine:
        argv += ["--engine", a.engine]
    if a.kv_cache_gib is not None:
        argv += ["--kv-cache-gib", str(a.kv_cache_gib)]
    if a.model:
        argv += ["--model", a.model]
    if a.dtype:
        argv += ["--dtype", a.dtype]
    if a.data_dir is not None:
        argv += ["--data-dir", str(a.data_dir.resolve())]
    logs = a.logs or launcher.negspace_home() / "logs"
    argv += ["--logs", str(logs)]
    logs.mkdir(parents=True, exist_ok=True)
    sup_log = logs / "launcher.log"
    try:   # a download shows here, in the foreground, and does not eat the health wait below
        launcher.Stack(_stack_config(a)).prepare_node_model()
    except launcher.LaunchError as exc:
        _err(str(exc))
        return 1
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    with sup_log.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    print(f"negspace: launcher started in the background (pid {proc.pid}, log {sup_log})", file=sys.stderr)
    deadline = time.monotonic() + a.health_timeout + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _err(f"the launcher exited with code {proc.returncode}:\n{launcher.log_tail(sup_log)}")
            return 1
        state = launcher.read_state(pidfile)
        if state and state.get("status") == "ready":
            print("negspace: every service is healthy (`negspace down` stops them)")
            for name, s in state["services"].items():
                print(f"  {name:<13} {s['url']}   (API: {s['url']}/docs)")
            print(f"  logs          {logs}")
            return 0
        time.sleep(0.5)
    _err("the stack was not ready in time; stopping it")
    launcher.down(pidfile, a.grace)
    return 1


def cmd_down(a: argparse.Namespace) -> int:
    if not launcher.down(launcher.pid_file(), a.grace):
        print(f"negspace: no background launcher is running ({launcher.pid_file()} not found)", file=sys.stderr)
        return 0
    print("negspace: stopped", file=sys.stderr)
    return 0


# ---- run / runs ------------------------------------------------------------------------------
def _orch(a: argparse.Namespace) -> OrchestratorClient:
    return OrchestratorClient(a.orchestrator_url, token=launcher.resolve_api_token())


async def _run(a: argparse.Namespace) -> int:
    kwargs = dict(base_instruction=a.base, nodes=a.nodes, max_tokens=a.max_tokens, seed=a.seed)
    if a.baseline:
        if (a.size is None) == (a.match_run is None):
            _err("--baseline needs exactly one of --size N or --match-run RUN_ID")
            return 2
        cfg = RunConfig(mode="baseline", size=a.size, match_run=a.match_run, rounds=a.rounds, **kwargs)
    else:
        cfg = RunConfig(mode="guided", rounds=a.rounds, **kwargs)
    async with _orch(a) as client:
        created = await client.runs.create(cfg)
        print(f"negspace: run {created.id} ({cfg.mode}) submitted to {a.orchestrator_url}", file=sys.stderr)
        run = await follow_run(client, created.id, desc=f"{cfg.mode} {created.id}")
        if run.status != "completed":
            _err(f"run {run.id} ended {run.status}: {run.error}")
            return 1
        metrics = await client.runs.metrics(run.id)
    print(json.dumps({"run": run.id, "status": run.status, "accepted": run.progress.accepted,
                      "attempts": run.progress.attempts, "metrics": metrics.model_dump(mode="json")}, indent=2))
    return 0


def _positive_int(text: str) -> int:
    """``negspace runs --limit``: a whole number of runs, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


async def _runs(a: argparse.Namespace) -> int:
    runs = []
    async with _orch(a) as client:  # GET /runs is paginated: follow the pages, up to --limit runs
        page_size = min(a.limit, MAX_RUNS_PAGE_SIZE) if a.limit else RUNS_PAGE_SIZE
        async with contextlib.aclosing(client.runs.iterate(page_size=page_size)) as pages:
            async for r in pages:
                runs.append(r)
                if a.limit and len(runs) >= a.limit:
                    break
    if a.json:
        print(json.dumps([r.model_dump(mode="json") for r in runs], indent=2))
        return 0
    if not runs:
        print("no runs")
        return 0
    print(f"{'id':<26} {'mode':<9} {'status':<10} {'accepted':>8} {'nodes':>5} {'rounds':>6}  created  base")
    for r in runs:
        created = r.created_at.strftime("%Y-%m-%d %H:%M") if r.created_at else "-"
        target = f"{r.progress.accepted}/{r.progress.target}" if r.progress.target else str(r.progress.accepted)
        base = r.config.base_instruction.replace("\n", " ")
        print(f"{r.id:<26} {r.mode:<9} {r.status:<10} {target:>8} {r.config.nodes:>5} {r.config.rounds:>6}  "
              f"{created}  {base[:40]}")
    return 0


# ---- experiment ----------------------------------------------------------------------------
async def _reachable(url: str) -> bool:
    async with OrchestratorClient(url, timeout=5.0) as c:
        try:
            h = await c.health()
        except NegspaceError:
            return False
    return h.status == "ok"


def _warn_running_stack(url: str, model: str) -> None:
    print(f"negspace: warning: an orchestrator already answers at {url}; its node keeps the model it was "
          f"started with, --model {model} applies only to a stack this command starts", file=sys.stderr)


def cmd_experiment(a: argparse.Namespace) -> int:
    cfg = ExperimentConfig(base=a.base, nodes=a.nodes, rounds=a.rounds, max_tokens=a.max_tokens, seed=a.seed,
                           qa_max_tokens=a.qa_max_tokens, guidance_start=a.guidance_start,
                           guidance_step=a.guidance_step, max_retries=a.max_retries,
                           similarity_threshold=a.similarity_threshold, negatives_k=a.negatives, negative_format=a.negative_format,
                           train_max_steps=a.train_steps,
                           eval_tasks=[t for t in a.eval_tasks.split(",") if t], eval_limit=a.eval_limit or None,
                           skip_training=a.skip_training, train_seeds=a.train_seeds, export=not a.no_export,
                           model=canonical_name(a.model or os.environ.get("NODE_MODEL")) or DEFAULT_MODEL)
    stack = None
    orchestrator_url = a.orchestrator_url
    if asyncio.run(_reachable(orchestrator_url)):
        if a.model:
            _warn_running_stack(orchestrator_url, a.model)
    else:
        if a.no_start:
            _err(f"no orchestrator answers at {orchestrator_url} (start one with `negspace up`)")
            return 1
        print(f"negspace: no orchestrator at {orchestrator_url}: starting the local stack", file=sys.stderr)
        # without training the trainer is not needed
        services = tuple(s for s in launcher.SERVICES if not (a.skip_training and s == "trainer"))
        stack = launcher.Stack(_stack_config(a), services=services)
        orchestrator_url = stack.urls["orchestrator"]
    report: list[Path] = []
    code = launcher.run_on_stack(
        stack, lambda: report.append(asyncio.run(_experiment(cfg, orchestrator_url, a.out, a.quiet))),
        on_sigterm=_raise_stop, errors=(ExperimentError, NegspaceError), err=_err)
    if code:
        return code
    print(f"negspace: report: {report[0] / 'report.md'}")
    return 0


async def _experiment(cfg, orchestrator_url, out_root, quiet):
    # Q/A conversion answers when the whole run is converted: minutes, not the clients' default 60 s
    long = httpx.Timeout(EXPERIMENT_CALL_TIMEOUT_S, connect=10.0)
    token = launcher.resolve_api_token()  # the env's, or the one `negspace up` wrote
    async with OrchestratorClient(orchestrator_url, timeout=long, token=token) as orch:
        return await run_experiment(cfg, orch, Path(out_root), quiet=quiet)


def cmd_results(a: argparse.Namespace) -> int:
    import shutil

    from negspace_cli.experiment import readme_snippet

    try:
        m = json.loads((a.experiment / "metrics.json").read_text())
    except FileNotFoundError:
        _err(f"{a.experiment / 'metrics.json'} does not exist: give the folder `negspace experiment` wrote")
        return 1
    a.plot_dir.mkdir(parents=True, exist_ok=True)
    plot = a.plot_dir / f"demo-{(m.get('figures') or {}).get('map', 'embedding_map.png')}"
    shutil.copyfile(a.experiment / "embedding_map.png", plot)
    rel = os.path.relpath(plot, a.relative_to)
    print(readme_snippet(m, rel))
    return 0


# ---- export --------------------------------------------------------------------------------
async def _export(a: argparse.Namespace) -> int:
    from negspace_cli import export as export_mod

    try:
        async with _orch(a) as client:
            await export_mod.export_run(client, a.run_id, a.format, a.out, license=a.license)
        if a.push_to_hub:
            url = export_mod.push_to_hub(a.out, a.push_to_hub, private=a.private)
            print(f"negspace: pushed {a.out} to {url}", file=sys.stderr)
    except export_mod.ExportError as exc:
        _err(str(exc))
        return 1
    return 0


# ---- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="negspace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def client_args(sp):
        sp.add_argument("--orchestrator-url", default=os.environ.get("NEGSPACE_ORCHESTRATOR_URL")
                        or DEFAULT_ORCHESTRATOR_URL, help="default $NEGSPACE_ORCHESTRATOR_URL or "
                        f"{DEFAULT_ORCHESTRATOR_URL}")

    up = sub.add_parser("up", help="start the four services as local processes")
    _add_stack_args(up)
    up.add_argument("--background", action="store_true", help="return once healthy; `negspace down` stops it")
    up.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop a stack started with `negspace up --background`")
    down.add_argument("--grace", type=float, default=20.0)
    down.set_defaults(func=cmd_down)

    run = sub.add_parser("run", help="submit a run and follow it")
    client_args(run)
    run.add_argument("--base", required=True, help="base instruction")
    run.add_argument("--nodes", type=int, default=4)
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--max-tokens", type=int, default=150)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--baseline", action="store_true", help="plain sampling (needs --size or --match-run)")
    run.add_argument("--size", type=int, default=None, help="baseline: number of instructions")
    run.add_argument("--match-run", default=None, help="baseline: as many as this run")
    run.set_defaults(func=lambda a: asyncio.run(_run(a)))

    runs = sub.add_parser("runs", help="list runs (oldest first)")
    client_args(runs)
    runs.add_argument("--json", action="store_true")
    runs.add_argument("--limit", type=_positive_int, default=None,
                      help="show at most this many runs, oldest first (default: all, fetched page by page)")
    runs.set_defaults(func=lambda a: asyncio.run(_runs(a)))

    ex = sub.add_parser("experiment", help="guided run vs baseline: data, Q/A, training, eval, report")
    client_args(ex)
    ex.add_argument("--base", required=True)
    ex.add_argument("--nodes", type=int, default=4)
    ex.add_argument("--rounds", type=int, default=3)
    ex.add_argument("--max-tokens", type=int, default=64)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--guidance-start", type=float, default=ExperimentConfig.guidance_start,
                    help="CFG scale of a guided round's first attempt (1 = no guidance)")
    ex.add_argument("--guidance-step", type=float, default=ExperimentConfig.guidance_step,
                    help="added to the scale on each retry of a too-similar instruction")
    ex.add_argument("--max-retries", type=int, default=ExperimentConfig.max_retries)
    ex.add_argument("--similarity-threshold", type=float, default=ExperimentConfig.similarity_threshold)
    ex.add_argument("--negatives", type=int, default=ExperimentConfig.negatives_k, help="negatives per generation")
    ex.add_argument("--negative-format", choices=["raw", "augment"], default=ExperimentConfig.negative_format,
                    help="raw: dense-region instructions are negative prompts as they are (the reference); "
                         "augment: wrapped in the augmentation prompt like the positive")
    ex.add_argument("--qa-max-tokens", type=int, default=160)
    ex.add_argument("--train-steps", type=int, default=10, help="LoRA max_steps per adapter")
    ex.add_argument("--eval-tasks", default=DEFAULT_EVAL_TASK, help="comma-separated lm-eval tasks")
    ex.add_argument("--eval-limit", type=int, default=ExperimentConfig.eval_limit, help="items per task (0 = all)")
    ex.add_argument("--train-seeds", type=_positive_int, default=ExperimentConfig.train_seeds,
                    help="adapters per dataset, one per training seed; the report gives the mean and a 95%% "
                         "interval of tuned - base and guided - baseline")
    ex.add_argument("--no-export", action="store_true", help="skip the hf export (export/guided, export/baseline)")
    ex.add_argument("--skip-training", action="store_true")
    ex.add_argument("--out", type=Path, default=Path("runs"), help="experiments folder (default ./runs)")
    ex.add_argument("--no-start", action="store_true", help="fail instead of starting a local stack")
    ex.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_stack_args(ex)
    ex.set_defaults(func=cmd_experiment)

    st = study_command.add_parser(sub, client_args, _add_stack_args)
    st.set_defaults(func=lambda a: study_command.cmd_study(a, reachable=_reachable, stack_config=_stack_config,
                                                           raise_stop=_raise_stop, err=_err))
    exp = sub.add_parser("export", help="a run's instructions and Q/A pairs as a dataset with its card")
    client_args(exp)
    exp.add_argument("run_id")
    exp.add_argument("--format", choices=["hf", "parquet", "jsonl"], default="hf",
                     help="hf: a datasets.load_from_disk folder; parquet/jsonl: one file per config")
    exp.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    exp.add_argument("--license", default="other", help="the dataset card's license (a Hub license id)")
    exp.add_argument("--push-to-hub", metavar="REPO", default=None,
                     help="also upload the folder to this Hub dataset repo (needs $HF_TOKEN or a login)")
    exp.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    exp.set_defaults(func=lambda a: asyncio.run(_export(a)))

    res = sub.add_parser("results", help="print a README results section from an experiment folder")
    res.add_argument("experiment", type=Path, help="runs/<id>")
    res.add_argument("--plot-dir", type=Path, default=Path("docs/images"), help="where the map plot is copied")
    res.add_argument("--relative-to", type=Path, default=Path("."), help="links relative to this folder")
    res.set_defaults(func=cmd_results)
    show_defaults(p)
    return p


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default after its help (unless the help
    already says what the default is: "default 4", "default $NEGSPACE_...")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and its subcommands ``HelpFormatter``: each option's ``--help`` line ends with
    its default (an option without help text gets one, so its default shows too)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in dict.fromkeys(action.choices.values()):
                show_defaults(sp)
        elif action.option_strings and action.default is not argparse.SUPPRESS and not action.help:
            action.help = " "


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NegspaceError as exc:
        _err(f"{exc.message}")
        return 1
    except ValidationError as exc:  # a bad option value: say which, exit 2 like argparse
        _err("; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
