"""What the controller answers when Qdrant is down, slow, broken, or fails in the middle of a write.

Server mode is exercised against a tiny HTTP stand-in for Qdrant on a real socket (there is no
Qdrant server binary here): a closed port, a server that accepts and never answers, one that
answers 500, one that answers garbage, and one that answers the two questions the controller's
start-up and /health ask (list collections, does a collection exist), for the recovery.
A write whose outcome is unknown (Qdrant applied it, then the answer timed out) is exercised
against real local-mode Qdrant with the faults injected at the client, and against the edge engine
with engine errors injected where its calls go.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from negspace_contracts.controller import MetricsRequest, PointIn
from negspace_contracts.errors import ServiceUnavailableError, is_retryable
from negspace_controller.settings import ControllerSettings
from negspace_controller.store_edge import EdgeStore
from negspace_controller.store_qdrant import LocalStore
from negspace_controller.testing import HashingFakeEmbedder
from negspace_servekit.testing import free_port
from qdrant_client.http.exceptions import ResponseHandlingException

pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning")

TEXTS = [f"write a {w} problem about {x}" for w in ("math", "logic", "poem") for x in ("apples", "sea", "cats")]

# (method, path, json) for every route that needs Qdrant when the collection is not loaded yet
QDRANT_ROUTES = [
    ("PUT", "/collections/c", None),
    ("GET", "/collections/c", None),
    ("DELETE", "/collections/c", None),
    ("POST", "/collections/c/points", {"points": [{"id": 1, "text": "x"}]}),
    ("POST", "/collections/c/points/delete", {"ids": [1]}),
    ("POST", "/collections/c/similar", {"text": "x"}),
    ("POST", "/collections/c/dense", {"k": 1, "knn": 1}),
    ("POST", "/collections/c/metrics", {}),
]


def fake():
    return HashingFakeEmbedder(dimension=32)


class StandIn:
    """A socket that plays a Qdrant server in one of several moods (switchable while running)."""

    def __init__(self, port: int, mode: str) -> None:
        self.mode = mode
        self.release = threading.Event()
        self.requests: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                stand_in.requests.append(f"{self.command} {self.path}")
                if stand_in.mode == "hang":
                    stand_in.release.wait(30)
                    return
                status, body = 200, b"<html>not qdrant</html>"
                if stand_in.mode == "500":
                    status, body = 500, b'{"status": {"error": "Service internal error: disk full"}}'
                elif stand_in.mode == "ok":
                    if self.path.rstrip("/").endswith("/exists"):
                        result: object = {"exists": False}
                    elif self.path.startswith("/collections"):
                        result = {"collections": []}
                    else:
                        status, result = 404, None
                    body = json.dumps({"result": result, "status": "ok", "time": 0.0}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in():
    servers: list[StandIn] = []

    def start(port: int, mode: str) -> StandIn:
        servers.append(StandIn(port, mode))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def server_settings(port: int, timeout: float = 1.0) -> ControllerSettings:
    return ControllerSettings(qdrant_url=f"http://127.0.0.1:{port}", qdrant_timeout_s=timeout,
                              index_snapshots="off")


async def assert_503(raw, method, path, body, *fragments, within: float = 6.0) -> str:
    started = time.monotonic()
    r = await raw.request(method, path, json=body)
    elapsed = time.monotonic() - started
    assert r.status_code == 503, (method, path, r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "service_unavailable" and err["code"] == 503
    for fragment in fragments:
        assert fragment in err["message"], (path, err["message"])
    assert r.headers.get("retry-after"), r.headers
    assert elapsed < within, (path, elapsed)
    return err["message"]


async def test_start_with_qdrant_unreachable_then_it_comes_up(run_app, stand_in):
    """Start-up does not fail: /health is 503 saying why, Qdrant routes are 503 naming Qdrant and
    its URL (retryable for the typed client), /embed still works; once Qdrant answers, all is well."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with run_app(server_settings(port), embedder=fake()) as (app, client, raw):
        h = await raw.get("/health")
        assert h.status_code == 503, h.text
        body = h.json()
        assert body["status"] == "error" and url in body["detail"] and "unreachable" in body["detail"]
        assert body["info"]["qdrant_status"] == "down"
        for method, path, json_body in QDRANT_ROUTES:
            await assert_503(raw, method, path, json_body, f"Qdrant at {url}", "unreachable")
        with pytest.raises(ServiceUnavailableError) as info:
            await client.collections.create("c")
        assert is_retryable(info.value) and url in info.value.message
        assert (await raw.post("/embed", json={"texts": ["no qdrant needed"]})).status_code == 200

        stand_in(port, "ok")
        h = await raw.get("/health")
        assert h.status_code == 200 and h.json()["info"]["qdrant_status"] == "ok", h.text
        r = await raw.get("/collections/nope")  # asks Qdrant again: a plain 404 now
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]


@pytest.mark.parametrize("mode,fragment", [("hang", "did not answer"), ("500", "answered 500"),
                                           ("garbage", "not Qdrant's API")])
async def test_qdrant_slow_or_broken_answers_503_within_the_timeout(run_app, stand_in, mode, fragment):
    port = free_port()
    server = stand_in(port, mode)
    async with run_app(server_settings(port, timeout=1.0), embedder=fake()) as (_, client, raw):
        started = time.monotonic()
        h = await raw.get("/health")
        assert h.status_code == 503 and fragment in h.json()["detail"], h.text
        assert time.monotonic() - started < 4
        msg = await assert_503(raw, "PUT", "/collections/c", None, f"Qdrant at http://127.0.0.1:{port}",
                               within=4)
        if mode == "hang":  # the first call waited the timeout; later ones fail on the short probe
            assert "within 1 s" in msg
        else:
            assert fragment in msg
        # (a hung Qdrant costs 1 s per call: three routes are enough there)
        for method, path, json_body in QDRANT_ROUTES[1:4] if mode == "hang" else QDRANT_ROUTES[1:]:
            await assert_503(raw, method, path, json_body, f"http://127.0.0.1:{port}", within=4)
        assert server.requests, "the stand-in was never asked"


class FlakyClient:
    """Wraps a real QdrantClient: ``down`` fails every call as a refused connection;
    ``applied-then-timeout`` lets writes happen and then loses the answer (the worst case)."""

    WRITES = ("upsert", "delete")

    def __init__(self, inner) -> None:
        self.inner = inner
        self.mode: str | None = None

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.mode == "down":
                raise ResponseHandlingException(httpx.ConnectError("[Errno 111] Connection refused"))
            result = attr(*args, **kwargs)
            if self.mode == "applied-then-timeout" and name in self.WRITES:
                raise ResponseHandlingException(httpx.ReadTimeout("timed out"))
            return result

        return call


def check_index_matches_qdrant(app, store: LocalStore, name: str) -> None:
    """The in-memory index holds exactly Qdrant's points, and /dense's lists equal brute force."""
    index = app.state.controller.collections.loaded[name].index
    held = {k: (p["text"], p["_seq"]) for k, _v, p in store.scan(name)}
    assert {k: (index.texts[index.row_of[k]], index.seq_of(k)) for k in index.keys} == held
    assert len(set(index.seq_of(k) for k in index.keys)) == len(index)
    for knn in (1, 3):
        got = index.dense(len(index), knn)
        want = index.dense_bruteforce(len(index), knn)
        np.testing.assert_allclose([h.density for h in got], [h.density for h in want], rtol=1e-5)


EDGE_IO_ERROR = "Service runtime error: IO Error: Input/output error (os error 5)"
# what each engine's message says: the lost answer of a write, the store's name, a refused call
FRAGMENTS = {"local": ("did not answer", "local Qdrant storage", "unreachable"),
             "edge": ("os error 5", "embedded Qdrant (edge) storage", "Input/output error")}


def flaky_store(engine: str):
    """(store, set_mode, undo): the faults of FlakyClient, injected where each engine's calls go.
    Edge is in-process, so "down" is an engine IO error on every call and "applied-then-timeout"
    a write the engine applied whose call then failed (as when a later chunk of it fails)."""
    if engine == "local":
        store = LocalStore(":memory:")
        flaky = FlakyClient(store.client)
        store.client = flaky

        def set_mode(mode):
            flaky.mode = mode

        def undo():
            store.client = flaky.inner
        return store, set_mode, undo
    store = EdgeStore(":memory:")
    real_call = store._call
    state = {"mode": None}

    def call(what, fn):
        def run():
            if state["mode"] == "down":
                raise Exception(EDGE_IO_ERROR)
            result = fn()
            if state["mode"] == "applied-then-timeout" and what.startswith(("writing", "deleting")) \
                    and "points" in what:
                raise Exception(EDGE_IO_ERROR)
            return result
        return real_call(what, run)

    store._call = call

    def set_mode(mode):
        state["mode"] = mode

    def undo():
        store._call = real_call
    return store, set_mode, undo


@pytest.mark.parametrize("engine", ["local", "edge"])
async def test_write_with_unknown_outcome_is_reconciled_and_replay_adds_nothing(run_app, engine):
    store, set_mode, undo = flaky_store(engine)
    lost, where, refused = FRAGMENTS[engine]
    try:
        async with run_app(ControllerSettings(qdrant_path=":memory:"), embedder=fake(),
                           store=store) as (app, client, raw):
            await client.collections.create("c")
            first = [PointIn(id=i, text=t, payload={"round": 1}) for i, t in enumerate(TEXTS[:5])]
            await client.collections.upsert("c", first)
            batch = [PointIn(id=i + 5, text=t, payload={"round": 2}) for i, t in enumerate(TEXTS[5:])]
            batch.append(PointIn(id=0, text="a replaced text", payload={"round": 2}))

            # Qdrant applies the batch but the answer is lost: 503, and the index is behind Qdrant
            set_mode("applied-then-timeout")
            with pytest.raises(ServiceUnavailableError, match=lost):
                await client.collections.upsert("c", batch)
            set_mode(None)
            assert store.count("c") == len(TEXTS)
            assert len(app.state.controller.collections.loaded["c"].index) == 5

            # Qdrant down: writes and Qdrant-backed reads are 503; in-memory reads still answer
            set_mode("down")
            await assert_503(raw, "POST", "/collections/c/points", {"points": [{"id": 99, "text": "x"}]},
                             where, refused)
            await assert_503(raw, "POST", "/collections/c/metrics", {"filter": {"round": 2}}, refused)
            assert (await raw.post("/collections/c/dense", json={"k": 2, "knn": 2})).status_code == 200
            assert (await raw.post("/collections/c/similar", json={"text": "sea"})).status_code == 200
            set_mode(None)

            # the orchestrator replays the batch: reconciled first, so nothing is added twice
            r = await client.collections.upsert("c", batch)
            assert r.ids == [p.id for p in batch]
            assert (await client.collections.get("c")).count == len(TEXTS) == store.count("c")
            check_index_matches_qdrant(app, store, "c")
            assert (await client.collections.metrics("c", MetricsRequest(filter={"round": 2}))).n == 5

            # a delete applied-then-lost: the next write notices the points are gone
            set_mode("applied-then-timeout")
            with pytest.raises(ServiceUnavailableError):
                await client.collections.delete_points("c", [1, 2])
            set_mode(None)
            await client.collections.upsert("c", [PointIn(id=100, text="after the lost delete")])
            assert (await client.collections.get("c")).count == len(TEXTS) - 2 + 1 == store.count("c")
            check_index_matches_qdrant(app, store, "c")

            # a write that never reached Qdrant: 503, then the next write finds nothing to fix
            set_mode("down")
            with pytest.raises(ServiceUnavailableError):
                await client.collections.upsert("c", [PointIn(id=200, text="never stored")])
            set_mode(None)
            await client.collections.upsert("c", [PointIn(id=201, text="stored")])
            assert 200 not in app.state.controller.collections.loaded["c"].index
            assert (await client.collections.get("c")).count == store.count("c")
            check_index_matches_qdrant(app, store, "c")

            # dropping the collection with Qdrant down: 503, and the in-memory copy is not trusted
            # any more (it may be gone); once Qdrant is back the collection is read again
            set_mode("down")
            await assert_503(raw, "DELETE", "/collections/c", None, refused)
            set_mode(None)
            assert "c" not in app.state.controller.collections.loaded
            assert (await client.collections.get("c")).count == store.count("c")
            check_index_matches_qdrant(app, store, "c")
    finally:
        undo()
        store.close()
