"""Crash consistency of both embedded engines: SIGKILL the controller process while upserts stream in.

Local-mode Qdrant commits every point to its sqlite file on its own; edge writes each update into
its memory-mapped WAL before the call returns (tests/test_store.py). Both folder locks are
flocks, which the kernel releases when the process dies. So a killed controller leaves Qdrant
with every acknowledged batch plus a prefix of the batch in flight. The neighbour lists are durable as
they change (a snapshot from the last clean shutdown + the append-only index log since, see
journal.py), so the restart replays the log instead of the O(n^2 d) rebuild; the points Qdrant
took but the log had not yet seen are inserted normally; replaying the batch in flight completes
it without adding a point twice, and every density equals a brute-force computation from Qdrant. Real processes (``python -m negspace_controller --embedder fake``), real embedded Qdrant.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from negspace_contracts.controller import PointIn
from negspace_controller.index import DensityIndex
from negspace_controller.settings import ControllerSettings
from negspace_controller.store import SEQ_KEY, TEXT_KEY, to_key
from negspace_controller.store_edge import EdgeStore
from negspace_controller.store_qdrant import LocalStore
from negspace_controller.testing import HashingFakeEmbedder
from negspace_servekit.testing import free_port

BATCH = 64
WORDS = ["apple", "pear", "sea", "sky", "math", "poem", "red", "blue", "cat", "dog", "river", "code"]


def batch(i: int) -> list[dict]:
    rng = np.random.default_rng(i)
    return [{"id": i * BATCH + j, "text": " ".join(rng.choice(WORDS, size=4)) + f" item {i * BATCH + j}",
             "payload": {"round": i}} for j in range(BATCH)]


class Controller:
    def __init__(self, qdrant: str, log_path, engine: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k != "NEGSPACE_API_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "negspace_controller", "--port", str(self.port), "--embedder", "fake",
             "--qdrant-path", qdrant, "--qdrant-engine", engine, "--log-level", "info"], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"controller exited {self.proc.returncode}; see {log_path}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"controller not healthy in 60 s; see {log_path}"
            time.sleep(0.1)

    def call(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=30, **kw)

    def stop(self, sig: int) -> int:
        """Send ``sig`` and wait: the exit code (uvicorn re-raises SIGTERM after a clean shutdown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(30)
        finally:
            self.log.close()
        return code


@pytest.fixture
def started():
    procs: list[Controller] = []

    def start(*args) -> Controller:
        procs.append(Controller(*args))
        return procs[-1]

    yield start
    for c in procs:  # a failed test must not leave a process behind
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait(10)


def brute_force_densities(path: str, engine: str, name: str, knn: int) -> dict:
    """Densities from what Qdrant holds on disk, through the index's independent O(n^2) path."""
    store = LocalStore(path, prefix="") if engine == "local" else EdgeStore(path, prefix="")
    try:
        keys, vecs, texts, seqs = [], [], [], []
        for key, vec, payload in store.scan(name, with_vectors=True, batch=1024):
            keys.append(to_key(key))
            vecs.append(vec)
            texts.append(payload[TEXT_KEY])
            seqs.append(payload[SEQ_KEY])
    finally:
        store.close()
    assert len(set(seqs)) == len(seqs), "two points share an insertion sequence"
    idx = DensityIndex(len(vecs[0]), capacity=8, initial_rows=len(keys))
    idx.load(keys, np.stack(vecs), texts, seqs, compute=False)
    return {h.key: h.density for h in idx.dense_bruteforce(len(keys), knn)}


@pytest.mark.parametrize("engine", ["local", "edge"])
def test_sigkill_during_upserts_then_restart_and_replay(tmp_path, started, run_app, engine):
    qdrant = str(tmp_path / "qdrant")
    log = tmp_path / "controller.log"

    async def clean_run() -> None:  # in-process (the same embedder as --embedder fake), closed cleanly
        async with run_app(ControllerSettings(qdrant_path=qdrant, qdrant_engine=engine),
                           embedder=HashingFakeEmbedder()) as (_, client, _r):
            await client.collections.create("run")
            for i in range(2):
                await client.collections.upsert("run", [PointIn(**p) for p in batch(i)])

    # a clean run first, so a snapshot exists and the killed process appends to the log after it
    asyncio.run(clean_run())
    assert list((tmp_path / "qdrant-index").glob("negspace_run.snap-*.npz"))

    # a stream of upserts, killed while one is in flight
    victim = started(qdrant, log, engine)
    acked: list[int] = []
    sent: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        i = 2
        while not stop.is_set():
            sent.append(i)
            try:
                r = victim.call("POST", "/collections/run/points", json={"points": batch(i)})
            except httpx.HTTPError:
                return  # the process died under this request
            assert r.status_code == 200, r.text
            acked.append(i)
            i += 1

    writer = threading.Thread(target=stream, daemon=True)
    writer.start()
    deadline = time.monotonic() + 60
    while len(acked) < 3:
        assert time.monotonic() < deadline and writer.is_alive(), "the upsert stream stalled"
        time.sleep(0.01)
    if engine == "local":
        # kill while Qdrant is half-way through writing a batch (it commits point by point); if that
        # moment is missed, wherever the stream is (embedding, between batches) after 10 s
        storage = sqlite3.connect(f"file:{qdrant}/collection/negspace_run/storage.sqlite?mode=ro", uri=True,
                                  timeout=1)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                try:
                    if storage.execute("SELECT count(*) FROM points").fetchone()[0] % BATCH:
                        break
                except sqlite3.OperationalError:  # busy: the writer holds it
                    pass
        finally:
            storage.close()
    else:  # edge writes a batch in ~1 ms (one update): kill wherever the stream is, a few batches on
        n = len(acked)
        while len(acked) < n + 5 and writer.is_alive():
            time.sleep(0.001)
    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL  # what an OOM kill or a power cut leaves
    stop.set()
    writer.join(30)
    last = sent[-1]
    assert acked == list(range(2, acked[-1] + 1)) and last in (acked[-1], acked[-1] + 1)

    # restart on the same folder: the lock is free, Qdrant holds every acknowledged batch and a
    # prefix of the one in flight; the lists come from snapshot + log, not a rebuild
    again = started(qdrant, log, engine)
    held = again.call("GET", "/collections/run").json()["count"]
    assert (acked[-1] + 1) * BATCH <= held <= (last + 1) * BATCH, (held, acked, last)
    print(f"killed with {held - (acked[-1] + 1) * BATCH} of {BATCH} points of batch {last} in Qdrant"
          if last > acked[-1] else "killed between two batches")
    for _ in range(2):  # the orchestrator replays the batch in flight (maybe twice): no new points
        r = again.call("POST", "/collections/run/points", json={"points": batch(last)})
        assert r.status_code == 200, r.text
        assert again.call("GET", "/collections/run").json()["count"] == (last + 1) * BATCH
    n = (last + 1) * BATCH
    dense = {knn: again.call("POST", "/collections/run/dense", json={"k": n, "knn": knn}).json()["items"]
             for knn in (1, 5)}
    assert again.stop(signal.SIGTERM) in (0, -signal.SIGTERM)

    text = log.read_text()
    restarted = text.split("Started server process")[-1]
    assert "neighbour lists from the index log" in restarted
    assert "rebuilding every neighbour list" not in restarted
    for knn, items in dense.items():
        want = brute_force_densities(qdrant, engine, "negspace_run", knn)
        assert len(items) == len(want) == n
        got = {to_key(i["id"]): i["density"] for i in items}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5)
