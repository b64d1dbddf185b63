"""``python -m negspace_bench.load`` (``make bench-load``): one stack under concurrent load.

Starts the four services as local processes (``negspace_cli.launcher``: vLLM node with the bundled
model, controller with MiniLM and Qdrant's embedded engine (edge, the default), orchestrator, trainer; bearer auth on) in a
temporary data folder, then measures, in one run:

1. **Generation**: 1 guided run alone, then ``--runs`` guided runs at once, then their equal-size
   baselines at once. Throughput = accepted instructions (and generated tokens) per second of wall
   time; latency = each generation as the orchestrator timed it (the ``latency_s`` of every
   ``attempt`` event), p50 and p99. The concurrent/solo throughput ratio says how much one stack
   gains from concurrent runs.
2. **Q/A**: every run's conversion at once; pairs per second.
3. **Per endpoint**, closed loop at each ``--concurrency`` for ``--duration`` seconds: the node's
   guided chat completion (3 negatives, 16 tokens), the controller's ``similar`` (embed + search)
   and ``dense``, the orchestrator's ``GET /runs/{id}``; requests per second, p50, p99, errors.
4. **Memory**: each service's resident memory (its whole process group) once healthy and after
   all of the above.

Training is left out (one job runs at a time by design; ``make bench-trainer`` measures it). The
figures are printed and recorded in ``docs/benchmarks.md`` (section ``load``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from negspace_cli import launcher
from negspace_contracts.controller import ControllerClient
from negspace_contracts.node import ChatCompletionRequest, ChatMessage, NodeClient
from negspace_contracts.orchestrator import (
    TERMINAL_RUN_STATUSES,
    AttemptEvent,
    GuidanceSchedule,
    OrchestratorClient,
    QARequest,
    RunConfig,
)

BASES = ["Write a math problem.", "Write a question about history.", "Write a poem prompt.",
         "Write a coding task.", "Write a riddle.", "Write a physics exercise.", "Write a cooking question.",
         "Write a logic puzzle."]


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _group(pgid: int):
    """(``/proc/<pid>`` folder, its stat fields after the command name) of each live process of a group."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:  # field 5: the process group
                yield proc, fields
        except (OSError, ValueError, IndexError):
            continue


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in a process group (a service and its engine processes)."""
    total_kib = 0
    for proc, _ in _group(pgid):
        try:
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total_kib / 1024


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    ticks = sum(int(fields[11]) + int(fields[12]) for _, fields in _group(pgid))  # fields 14, 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def stack_rss(stack: launcher.Stack) -> dict[str, float]:
    return {name: group_rss_mib(svc.pid) for name, svc in stack.services.items() if svc.pid}


def pct_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q)) if samples else float("nan")


async def wait_runs(orch: OrchestratorClient, ids: list[str], poll_s: float = 0.5) -> list:
    while True:
        runs = [await orch.runs.get(i) for i in ids]
        if all(r.status in TERMINAL_RUN_STATUSES for r in runs):
            bad = [f"{r.id}: {r.status} {r.error}" for r in runs if r.status != "completed"]
            if bad:
                raise RuntimeError("runs did not complete: " + "; ".join(bad))
            return runs
        await asyncio.sleep(poll_s)


async def generation_phase(orch: OrchestratorClient, configs: list[RunConfig]) -> dict:
    """Create the runs at once, wait for all; throughput and per-generation latency."""
    t = time.perf_counter()
    ids = [(await orch.runs.create(c)).id for c in configs]
    runs = await wait_runs(orch, ids)
    wall = time.perf_counter() - t
    lat, tokens, attempts = [], 0, 0
    for r in runs:
        async for ev in orch.runs.events(r.id):
            if isinstance(ev, AttemptEvent):
                attempts += 1
                lat.append(ev.data.latency_s)
                tokens += ev.data.completion_tokens or 0
    accepted = sum(r.progress.accepted for r in runs)
    return {"runs": len(runs), "ids": ids, "accepted": accepted, "attempts": attempts, "tokens": tokens,
            "wall_s": wall, "instr_per_s": accepted / wall, "tokens_per_s": tokens / wall,
            "p50_ms": pct_ms(lat, 50), "p99_ms": pct_ms(lat, 99)}


async def closed_loop(call: Callable[[], Awaitable[object]], concurrency: int, duration_s: float) -> dict:
    lat: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                await call()
                lat.append(time.perf_counter() - t)
            except Exception as exc:  # counted and shown: a bench reports failures, it does not hide them
                key = getattr(exc, "error_type", None) or type(exc).__name__
                errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "n": len(lat), "rps": len(lat) / wall, "p50_ms": pct_ms(lat, 50),
            "p99_ms": pct_ms(lat, 99), "errors": errors}


async def run_bench(urls: dict[str, str], token: str | None, a: argparse.Namespace) -> dict:
    def guided(i: int) -> RunConfig:
        return RunConfig(base_instruction=BASES[i % len(BASES)], mode="guided", nodes=a.nodes, rounds=a.rounds,
                         max_tokens=a.max_tokens, seed=i, guidance=GuidanceSchedule(start=2.0, step=0.5,
                                                                                    max_retries=2),
                         negative_format="augment")

    out: dict = {}
    long = 3600.0
    async with OrchestratorClient(urls["orchestrator"], token=token, timeout=long) as orch, \
            ControllerClient(urls["controller"], token=token, timeout=120.0) as ctl, \
            NodeClient(urls["node"], token=token, timeout=600.0) as node:
        log("generation: 1 guided run alone")
        out["solo"] = await generation_phase(orch, [guided(100)])
        log(f"  {out['solo']['accepted']} instructions in {out['solo']['wall_s']:.1f} s")
        log(f"generation: {a.runs} guided runs at once")
        out["guided"] = await generation_phase(orch, [guided(i) for i in range(a.runs)])
        log(f"  {out['guided']['accepted']} instructions in {out['guided']['wall_s']:.1f} s")
        log(f"generation: their {a.runs} baselines at once")
        out["baseline"] = await generation_phase(
            orch, [RunConfig(base_instruction=BASES[i % len(BASES)], mode="baseline", nodes=a.nodes,
                             rounds=a.rounds, max_tokens=a.max_tokens, seed=i, match_run=rid)
                   for i, rid in enumerate(out["guided"]["ids"])])
        log(f"  {out['baseline']['accepted']} instructions in {out['baseline']['wall_s']:.1f} s")

        ids = out["guided"]["ids"] + out["baseline"]["ids"]
        log(f"Q/A: {len(ids)} conversions at once")
        t = time.perf_counter()
        results = await asyncio.gather(*(orch.runs.qa(i, QARequest(max_tokens=a.qa_max_tokens)) for i in ids))
        wall = time.perf_counter() - t
        converted = sum(r.converted for r in results)
        out["qa"] = {"runs": len(ids), "pairs": converted, "rejected": sum(r.rejected for r in results),
                     "wall_s": wall, "pairs_per_s": converted / wall}
        log(f"  {converted} pairs in {wall:.1f} s")

        run = await orch.runs.get(out["guided"]["ids"][0])
        negatives = [i.text for i in (await orch.runs.instructions(run.id))[:3]]
        chat = ChatCompletionRequest(messages=[ChatMessage(role="user", content=f"Rewrite: {BASES[0]}")],
                                     max_tokens=16, temperature=1.0, negative_prompts=negatives,
                                     guidance_scale=2.0)
        probe = negatives[0] if negatives else BASES[0]
        endpoints: dict[str, Callable[[], Awaitable[object]]] = {
            "node: guided chat completion (3 negatives, 16 tokens)": lambda: node.chat.create(chat),
            "controller: similar (embed + search)": lambda: ctl.collections.similar(run.collection, probe, k=1),
            "controller: dense (k=3, knn=5)": lambda: ctl.collections.dense(run.collection, k=3, knn=5),
            "orchestrator: GET /runs/{id}": lambda: orch.runs.get(run.id),
        }
        out["endpoints"] = {}
        for name, call in endpoints.items():
            for c in a.concurrency:
                log(f"{name}: concurrency {c}, {a.duration:.0f} s")
                r = await closed_loop(call, c, a.duration)
                out["endpoints"].setdefault(name, []).append(r)
                log(f"  {r['rps']:.2f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                    f"errors {r['errors'] or 0}")
    return out


def markdown(res: dict, a: argparse.Namespace, started: str, rss: dict[str, dict[str, float]]) -> str:
    solo, g, b, qa = res["solo"], res["guided"], res["baseline"], res["qa"]
    ratio = g["instr_per_s"] / solo["instr_per_s"] if solo["instr_per_s"] else float("nan")
    lines = [
        "## Load (`make bench-load`)", "",
        f"{started}. One stack of local processes (vLLM node on CPU with the bundled SmolLM2-135M, "
        "controller with MiniLM + Qdrant's embedded engine (edge), orchestrator, trainer idle), bearer auth on, "
        f"all on this machine's cores. Runs: {a.nodes} nodes x {a.rounds} rounds (+ bootstrap), "
        f"max_tokens {a.max_tokens}, guidance 2.0 + 0.5 per retry (2 retries), augment negatives.", "",
        "| phase | runs at once | instructions | attempts | wall (s) | instructions/s | tokens/s | "
        "generation p50 (ms) | generation p99 (ms) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in (("guided, alone", solo), ("guided", g), ("baseline (same sizes)", b)):
        lines.append(f"| {label} | {r['runs']} | {r['accepted']} | {r['attempts']} | {r['wall_s']:.1f} | "
                     f"{r['instr_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    lines += ["", f"Guided throughput with {g['runs']} runs at once is **{ratio:.2f}x** the single run's "
              "(same stack, same run). Generation latency is what the orchestrator timed per chat completion, "
              "so it includes queueing in the node under load.", "",
              f"Q/A: {qa['runs']} conversions at once, {qa['pairs']} pairs ({qa['rejected']} rejected) in "
              f"{qa['wall_s']:.1f} s = {qa['pairs_per_s']:.2f} pairs/s.", "",
              f"Per endpoint, closed loop, {a.duration:.0f} s per row:", "",
              "| endpoint | concurrency | requests | req/s | p50 (ms) | p99 (ms) | errors |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, rows in res["endpoints"].items():
        for r in rows:
            errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
            lines.append(f"| {name} | {r['concurrency']} | {r['n']} | {r['rps']:.2f} | {r['p50_ms']:.0f} | "
                         f"{r['p99_ms']:.0f} | {errs} |")
    lines += ["", "A p99 over fewer than 100 requests is close to the slowest one (the node rows).", "",
              "Resident memory of each service's process group (MiB), once healthy and after all of the above:",
              "", "| service | after start | after the load | growth |", "|---|---:|---:|---:|"]
    for name in rss["start"]:
        before, after = rss["start"][name], rss["end"].get(name, float("nan"))
        lines.append(f"| {name} | {before:.0f} | {after:.0f} | {after - before:+.0f} |")
    busy = os.getloadavg()[0]
    lines += ["", f"Load average when it ended: {busy:.1f} on {os.cpu_count()} cores (the node, the embedder and "
              "the bench share them)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=4, help="guided runs at once (and as many baselines)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--qa-max-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--duration", type=float, default=15.0, help="seconds per endpoint row")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md alone")
    a = p.parse_args(argv)

    # a repository tool: servekit is the services' package, not a dependency of the CLI itself
    from negspace_servekit.benchdoc import machine_line, publish
    from negspace_servekit.testing import free_ports

    started = machine_line()
    with tempfile.TemporaryDirectory(prefix="negspace-bench-load-") as tmp:
        root = Path(tmp)
        ports = dict(zip(launcher.SERVICES, free_ports(4), strict=True))
        cfg = launcher.StackConfig(ports=ports, logs_dir=root / "logs", data_dir=root / "data",
                                   node_kv_cache_gib=a.kv_cache_gib, api_token=os.urandom(24).hex())
        stack = launcher.Stack(cfg, echo=log)
        log("starting the stack (model loading takes a minute)")
        try:
            stack.start()
            rss = {"start": stack_rss(stack)}
            res = asyncio.run(run_bench(stack.urls, cfg.api_token, a))
            rss["end"] = stack_rss(stack)
        except BaseException:
            for f in sorted((root / "logs").glob("*.log")):
                print(f"--- {f.name}\n{launcher.log_tail(f)}")
            raise
        finally:
            stack.stop()
    md = markdown(res, a, started, rss)
    publish("load", md, record=not a.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
