"""``python -m negspace_bench.controller.embed``: texts/s of the real embedder, torch vs ONNX Runtime.

Through ``SentenceTransformerEmbedder.encode`` (what the controller calls: the truncation-length
tokenisation, the model, the normalisation), on instruction-like texts of 10-30 tokens, at each
batch size; the two backends alternate in ``--rounds`` short rounds and the median round is
reported, so a load change on a shared machine hits both alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from negspace_controller.st_embed import SentenceTransformerEmbedder

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_bench.controller.embed")
    p.add_argument("--model", default="", help="embedder setting (default: the bundled MiniLM)")
    p.add_argument("--batches", default="1,6,16,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per backend, batch size and round")
    args = p.parse_args(argv)
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
