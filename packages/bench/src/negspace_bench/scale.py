"""``python -m negspace_bench.scale`` (``make bench-scale``): the orchestration path at scale.

One guided run of ``--nodes`` x ``--rounds`` (+ the bootstrap round) against a node that answers
instantly: the node service started with ``--engine fake`` (the test fake: a deterministic
sentence per request, no model), so what is measured is everything around generation: the real
orchestrator (SQLite, events, locks, HTTP) and the real controller (MiniLM embeddings, Qdrant
local mode, the density index). Reports instructions/s over the run, per-stage p50/p99 (the
controller's own stage histograms from its /metrics, and the HTTP latency of each controller
route as the controller timed it), and each service's resident memory at the end.

``--profile DIR`` starts the orchestrator and the controller under yappi (wall clock, every
thread) and writes one ``<service>.pstats`` per service plus a text summary of the top
functions to DIR when they stop (``pip install yappi``; not needed otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from negspace_cli import launcher
from negspace_contracts.controller import ControllerClient, PointIn
from negspace_contracts.orchestrator import (
    TERMINAL_RUN_STATUSES,
    GuidanceSchedule,
    OrchestratorClient,
    RunConfig,
)

from negspace_bench.load import group_cpu_s, group_rss_mib, log

SERVICES = ("node", "controller", "orchestrator")
_PROFILE = """
import runpy, signal, sys, yappi
out, mod = sys.argv[1], sys.argv[2]
sys.argv = [mod] + sys.argv[3:]
def _exit(sig):  # uvicorn re-raises SIGTERM after a clean shutdown: exit normally so stats are written
    raise SystemExit(0)
signal.raise_signal = _exit
yappi.set_clock_type("wall")
yappi.start(builtins=False)
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    yappi.stop()
    stats = yappi.get_func_stats()
    stats.save(out + ".pstats", type="pstat")
    with open(out + ".txt", "w") as f:
        stats.sort("tsub").print_all(out=f, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 10),
                                                    3: ("ttot", 10), 4: ("tavg", 10)})
"""


def histogram_quantiles(metrics_text: str, name: str, label: str) -> dict[str, dict[str, float]]:
    """{label value: {count, mean_ms, p50_ms, p99_ms}} from a Prometheus histogram's buckets
    (quantiles are the upper bound of the bucket that reaches them: coarse, never optimistic)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    pat = re.compile(rf'^{name}_(bucket|sum|count)\{{(.*?)\}} ([0-9.e+-]+|NaN)$')
    for line in metrics_text.splitlines():
        m = pat.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = labels.get(label, "")
        val = float(m.group(3))
        if m.group(1) == "bucket":
            le = labels.get("le", "+Inf")
            buckets.setdefault(key, []).append((float("inf") if le == "+Inf" else float(le), val))
        elif m.group(1) == "sum":
            sums[key] = val
        else:
            counts[key] = val
    out = {}
    for key, bs in buckets.items():
        total = counts.get(key, 0.0)
        if not total:
            continue
        bs.sort()

        def q(frac: float, bs=bs, total=total) -> float:
            for le, c in bs:
                if c >= frac * total:
                    return le * 1e3
            return float("inf")

        out[key] = {"count": total, "mean_ms": sums.get(key, 0.0) / total * 1e3, "p50_ms": q(0.5),
                    "p99_ms": q(0.99)}
    return out


async def guided_run(orch: OrchestratorClient, cfg: RunConfig, poll_s: float = 2.0) -> dict:
    t0 = time.perf_counter()
    run = await orch.runs.create(cfg)
    target = cfg.nodes * (cfg.rounds + 1)
    samples: list[tuple[float, int, float | None]] = []  # (elapsed, accepted, eta the run reported)
    while True:
        await asyncio.sleep(poll_s)
        run = await orch.runs.get(run.id)
        elapsed = time.perf_counter() - t0
        samples.append((elapsed, run.progress.accepted, getattr(run.progress, "eta_seconds", None)))
        if len(samples) % 10 == 0:
            log(f"  {run.progress.accepted}/{target} instructions after {elapsed:.0f} s "
                f"({run.progress.accepted / elapsed:.1f}/s)")
        if run.status in TERMINAL_RUN_STATUSES:
            break
    wall = time.perf_counter() - t0
    if run.status != "completed":
        raise RuntimeError(f"run {run.id} ended {run.status}: {run.error}")
    attempts = 0
    async for ev in orch.runs.events(run.id):
        attempts += ev.type == "attempt"
    # rate over each tenth of the run: does it fall as the collection grows?
    tenths = []
    prev_t, prev_a = 0.0, 0
    for t, a, _ in samples:
        if a - prev_a >= max(1, target // 10):
            tenths.append((a, (a - prev_a) / (t - prev_t)))
            prev_t, prev_a = t, a
    return {"id": run.id, "accepted": run.progress.accepted, "attempts": attempts, "wall_s": wall,
            "instr_per_s": run.progress.accepted / wall, "tenths": tenths, "samples": samples}


WORDS = ("write explain compare describe list design imagine plan a the short detailed simple poem story "
         "recipe question essay guide letter dialogue about for on of ocean city garden robot history music "
         "river winter market teacher planet bridge library forest kitchen train island museum festival "
         "volcano desert village engine painting science friendship storm harbor mountain").split()


async def accept_path(ctl: ControllerClient, workers: int, total: int, seed: int = 7) -> dict:
    """What the controller sustains when callers use ``/accept`` (check + insert in one atomic call,
    embeddings batched across callers) instead of ``/similar`` then ``/points`` under their own lock:
    ``workers`` concurrent slots, each ``dense`` then ``accept`` (up to 2 rejected tries, then forced),
    on a fresh collection, ``total`` instructions."""
    name = "scale-accept"
    await ctl.collections.create(name)
    rng = random.Random(seed)
    counter = iter(range(10 ** 9))
    done = 0
    lat: list[float] = []

    async def worker() -> None:
        nonlocal done
        while done < total:
            await ctl.collections.dense(name, k=3, knn=5)
            slot = next(counter)
            for attempt in range(3):
                text = " ".join(rng.choice(WORDS) for _ in range(10))
                t = time.perf_counter()
                r = await ctl.collections.accept(name, PointIn(id=slot, text=text, payload={"attempt": attempt}),
                                                 threshold=0.9, force=attempt == 2)
                lat.append(time.perf_counter() - t)
                if r.accepted:
                    done += 1
                    break

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    wall = time.perf_counter() - t0
    info = await ctl.collections.get(name)
    return {"workers": workers, "accepted": info.count, "wall_s": wall, "instr_per_s": info.count / wall,
            "p50_ms": float(np.percentile(np.asarray(lat) * 1e3, 50)),
            "p99_ms": float(np.percentile(np.asarray(lat) * 1e3, 99))}


def markdown(a: argparse.Namespace, started: str, res: dict, stages: dict, routes: dict,
             rss: dict[str, float], acc: dict | None, ctl: dict) -> str:
    lines = [
        "## Scale: one long guided run, instant node (`make bench-scale`)", "",
        f"{started}; shared with other engineers' jobs while measured. One guided run of {a.nodes} nodes x "
        f"{a.rounds} rounds (+ bootstrap) = {res['accepted']:,} instructions. The node is the **test fake** "
        "(`--engine fake`: instant, deterministic sentences), so this measures the real orchestrator "
        "(SQLite, events, HTTP; each guided slot judged and inserted by one `/accept` call) and the real controller "
        f"(bundled MiniLM on {ctl.get('embed_backend', '?')}, Qdrant {ctl.get('qdrant_engine', '?')} on disk, the "
        f"{ctl.get('index_mode', 'exact')} density index, {ctl.get('blas_threads', '?')} BLAS thread(s)) "
        "with nothing waiting on a GPU.", "",
        f"**{res['instr_per_s']:.1f} instructions/s** ({res['accepted']:,} accepted of {res['attempts']:,} "
        f"attempts in {res['wall_s']:.0f} s; target >= 100/s: "
        f"{'met' if res['instr_per_s'] >= 100 else 'NOT met'}).", "",
        "Rate per tenth of the run (instructions reached: instructions/s over that tenth): "
        + ", ".join(f"{n:,}: {r:.1f}" for n, r in res["tenths"]) + ".", "",
        "CPU per accepted instruction over the run (user + system, each service's process group): "
        + ", ".join(f"{k} {v / res['accepted'] * 1e3:.2f} ms" for k, v in res["cpu_s"].items())
        + f"; {sum(res['cpu_s'].values()):.1f} CPU-s in {res['wall_s']:.0f} s of wall time on {os.cpu_count()} cores.", "",
        "Controller stages (its own histograms; p50/p99 are bucket upper bounds):", "",
        "| stage | count | mean (ms) | p50 (ms) | p99 (ms) |", "|---|---:|---:|---:|---:|"]
    for name, s in sorted(stages.items()):
        lines.append(f"| {name} | {s['count']:,.0f} | {s['mean_ms']:.2f} | {s['p50_ms']:g} | {s['p99_ms']:g} |")
    lines += ["", "Controller routes as the controller timed them:", "",
              "| route | count | mean (ms) | p50 (ms) | p99 (ms) |", "|---|---:|---:|---:|---:|"]
    for name, s in sorted(routes.items()):
        lines.append(f"| {name} | {s['count']:,.0f} | {s['mean_ms']:.2f} | {s['p50_ms']:g} | {s['p99_ms']:g} |")
    if acc:
        lines += ["", f"The same controller driven through `POST /collections/{{name}}/accept` (check + insert as "
                  f"one atomic call, embeddings batched across callers) by {acc['workers']} concurrent slots, "
                  f"each `dense` then `accept`, no orchestrator: **{acc['instr_per_s']:.1f} instructions/s** "
                  f"({acc['accepted']:,} in {acc['wall_s']:.0f} s; accept p50 {acc['p50_ms']:.0f} ms, p99 "
                  f"{acc['p99_ms']:.0f} ms): the controller's own ceiling on this path, without the "
                  "orchestrator's work around it."]
    lines += ["", f"Load average when it ended: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other "
              "engineers' jobs included)."]
    lines += ["", "Resident memory at the end (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--rounds", type=int, default=156, help="64 x (156 + 1) = 10,048 instructions")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--no-accept-phase", dest="accept_phase", action="store_false",
                   help="skip the direct /accept measurement after the run")
    p.add_argument("--profile", type=Path, default=None, help="run orchestrator + controller under yappi")
    p.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md alone")
    a = p.parse_args(argv)

    from negspace_servekit.benchdoc import machine_line, publish
    from negspace_servekit.testing import free_ports

    started = machine_line()
    with tempfile.TemporaryDirectory(prefix="negspace-bench-scale-") as tmp:
        root = Path(tmp)
        # the trainer is not started: its port only fills the orchestrator's --trainer-url
        ports = dict(zip((*SERVICES, "trainer"), free_ports(len(SERVICES) + 1), strict=True))
        cfg = launcher.StackConfig(ports=ports, logs_dir=root / "logs", data_dir=root / "data", engine="fake",
                                   api_token=os.urandom(24).hex())
        commands = {}
        if a.profile:
            a.profile.mkdir(parents=True, exist_ok=True)
            for svc in ("controller", "orchestrator"):
                cmd = cfg.command(svc)
                commands[svc] = [cmd[0], "-c", _PROFILE, str(a.profile.resolve() / svc), cmd[2], *cmd[3:]]
        stack = launcher.Stack(cfg, services=SERVICES, echo=log, commands=commands)
        log("starting node (fake engine), controller (MiniLM), orchestrator")
        try:
            stack.start()
            run_cfg = RunConfig(base_instruction="Write a math problem.", mode="guided", nodes=a.nodes,
                                rounds=a.rounds, max_tokens=a.max_tokens, seed=1,
                                guidance=GuidanceSchedule(start=2.0, step=0.5, max_retries=2))

            async def go() -> dict:
                async with OrchestratorClient(stack.urls["orchestrator"], token=cfg.api_token,
                                              timeout=600.0) as orch:
                    return await guided_run(orch, run_cfg)

            log(f"guided run: {a.nodes} nodes x {a.rounds} rounds")
            cpu0 = {name: group_cpu_s(svc.pid) for name, svc in stack.services.items() if svc.pid}
            res = asyncio.run(go())
            res["cpu_s"] = {name: group_cpu_s(stack.services[name].pid) - c for name, c in cpu0.items()}
            acc = None
            if a.accept_phase:
                log(f"controller /accept path: {a.nodes} concurrent slots, {res['accepted']} instructions")

                async def direct() -> dict:
                    async with ControllerClient(stack.urls["controller"], token=cfg.api_token, timeout=600.0) as ctl:
                        return await accept_path(ctl, a.nodes, res["accepted"])

                acc = asyncio.run(direct())
            metrics = httpx.get(stack.urls["controller"] + "/metrics", timeout=30,
                                headers={"Authorization": f"Bearer {cfg.api_token}"}).text
            stages = histogram_quantiles(metrics, "negspace_controller_stage_seconds", "stage")
            routes = {k: v for k, v in histogram_quantiles(metrics, "negspace_http_request_duration_seconds",
                                                           "route").items() if k.startswith("/collections")}
            rss = {name: group_rss_mib(svc.pid) for name, svc in stack.services.items() if svc.pid}
            ctl_info = httpx.get(stack.urls["controller"] + "/health", timeout=30).json().get("info", {})
        except BaseException:
            for f in sorted((root / "logs").glob("*.log")):
                print(f"--- {f.name}\n{launcher.log_tail(f)}", file=sys.stderr)
            raise
        finally:
            stack.stop()
    md = markdown(a, started, res, stages, routes, rss, acc, ctl_info)
    publish("scale", md, record=not a.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
