"""``python -m negspace_bench.controller.embed``: texts/s of the real embedder, torch vs ONNX Runtime.

Through ``SentenceTransformerEmbedder.encode`` (what the controller calls: the truncation-length
tokenisation, the model, the normalisation), on instruction-like texts of 10-30 tokens, at each
batch size; the two backends alternate in ``--rounds`` short rounds and the median round is
reported, so a load change on a shared machine hits both alike. Prints a markdown table.

``--startup N``: instead, the controller's restart with the ONNX backend: seconds from starting
``python -m negspace_controller`` (defaults, the bundled model unless ``--model``, an empty embedded
store) to its first ``/health`` 200, then SIGKILL; N runs of each start path, alternating, after
one unmeasured start that exports the graph and writes its manifest into a temporary
``$NEGSPACE_HOME``: ``manifest`` (tokenizers + ONNX Runtime, no torch) and ``torch``
(``--no-embed-manifest``: through sentence-transformers, as every start was before).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from negspace_controller.st_embed import SentenceTransformerEmbedder
from negspace_servekit.testing import wait_healthy

START_PATHS = {"manifest": [], "torch": ["--no-embed-manifest"]}

VERBS = ["Write a math problem", "Write a short poem", "Ask a question", "Tell a story", "Explain",
         "Give three tips", "Summarise the history", "Describe a recipe"]
TOPICS = ["apples", "trains", "the moon", "taxes", "a lost dog", "prime numbers", "rainy days", "jazz",
          "volcanoes", "chess openings", "tidal energy", "medieval castles", "bees", "sourdough bread"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(VERBS)} about {rng.choice(TOPICS)} for a {rng.choice(['child', 'student', 'expert'])}"
            f" in {rng.integers(2, 9)} sentences, item {i}." for i in range(n)]


def rate(emb: SentenceTransformerEmbedder, pool: list[str], batch: int, seconds: float) -> float:
    emb.batch_size = batch
    done, start, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = pool[start:start + batch]
        emb.encode(chunk)
        done += len(chunk)
        start = (start + batch) % (len(pool) - batch)
    return done / (time.perf_counter() - t0)


def start_once(model: str, home: Path, flags: list[str], log: Path) -> float:
    """Seconds from the process start to its first /health 200 (then it is killed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"NEGSPACE_HOME": str(home), "HF_HUB_OFFLINE": "1", "CONTROLLER_DEVICE": "cpu"}
    env.pop("NEGSPACE_API_TOKEN", None)
    with tempfile.TemporaryDirectory(dir=home) as store, open(log, "a") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "negspace_controller", "--port", str(port), "--embedder",
                                 model, "--qdrant-path", store, *flags], env=env, stdout=out, stderr=out)
        try:
            asyncio.run(wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=600, poll_s=0.05,
                                     describe=lambda: log.read_text()[-3000:]))
            return time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def startup(model: str, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home, log = Path(tmp), Path(tmp) / "controller.log"
        first = start_once(model, home, START_PATHS["torch"], log)  # exports, writes the manifest
        got: dict[str, list[float]] = {name: [] for name in START_PATHS}
        load0 = os.getloadavg()[0]
        for _ in range(runs):
            for name, flags in START_PATHS.items():
                got[name].append(start_once(model, home, flags, log))
                print(f"{name}: {got[name][-1]:.2f} s", flush=True)
        print("| start path | median s to healthy | runs (s) |\n|---|---|---|")
        for name, secs in got.items():
            print(f"| {name} | {float(np.median(secs)):.2f} | {', '.join(f'{s:.2f}' for s in secs)} |")
        print(f"first start (export + manifest) {first:.1f} s; load average (1 min) {load0:.2f} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end, {os.cpu_count()} cores")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_bench.controller.embed")
    p.add_argument("--model", default="", help="embedder setting (default: the bundled MiniLM)")
    p.add_argument("--batches", default="1,6,16,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per backend, batch size and round")
    p.add_argument("--startup", type=int, metavar="N", default=0,
                   help="measure N controller restarts per start path (manifest, torch) instead")
    args = p.parse_args(argv)
    if args.startup:
        startup(args.model, args.startup)
        return 0
    embs = {"torch": SentenceTransformerEmbedder(args.model, backend="torch", device="cpu"),
            "onnx": SentenceTransformerEmbedder(args.model, backend="onnx", device="cpu")}
    assert embs["onnx"].backend == "onnx", "the ONNX backend did not load (see the log)"
    pool = texts(4096)
    for emb in embs.values():
        emb.encode(pool[:64])  # warm-up
    load0 = os.getloadavg()[0]
    lines = ["| batch | torch texts/s | onnx texts/s | onnx / torch |", "|---|---|---|---|"]
    for batch in (int(b) for b in args.batches.split(",")):
        got = {name: [] for name in embs}
        for _ in range(args.rounds):
            for name, emb in embs.items():
                got[name].append(rate(emb, pool, batch, args.seconds))
        t, o = (float(np.median(got[n])) for n in ("torch", "onnx"))
        lines.append(f"| {batch} | {t:.0f} | {o:.0f} | {o / t:.2f}x |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    print(f"load average (1 min) {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end, "
          f"{os.cpu_count()} cores; {embs['onnx'].onnx.threads} threads each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
