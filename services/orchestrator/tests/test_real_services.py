"""Acceptance 3: the real services as local processes (bundled models) complete a small guided run
and its baseline, and return instructions, metrics and a Q/A dataset.

Starts ``python -m negspace_node --engine vllm`` (bundled SmolLM2-135M, 1 GiB KV cache),
``python -m negspace_controller`` (bundled MiniLM, Qdrant in memory) and
``python -m negspace_orchestrator`` on free 127.0.0.1 ports; every process log is kept under
the test's tmp_path and printed when a step fails.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from negspace_contracts.orchestrator import OrchestratorClient, QARequest, RunConfig
from negspace_servekit.testing import free_port, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.vllm]

for _pkg in ("negspace_node", "negspace_controller", "vllm"):
    if importlib.util.find_spec(_pkg) is None:
        pytestmark.append(pytest.mark.skip(reason=f"{_pkg} is not installed"))


class Proc:
    def __init__(self, name: str, args: list[str], tmp: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return f"--- {self.name} log ---\n" + self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


async def wait_run(client: OrchestratorClient, run_id: str, procs: list[Proc], timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        run = await client.runs.get(run_id)
        if run.status in ("completed", "failed", "cancelled", "paused"):
            assert run.status == "completed", f"{run}\n" + "\n".join(p.tail() for p in procs)
            return run
        assert time.monotonic() < deadline, f"run still {run.status}: {run.progress}"
        await asyncio.sleep(1)


async def test_real_services_guided_baseline_metrics_and_qa(tmp_path):
    # NEGSPACE_HOME stays as it is: the bundled model is prepared there once (make setup)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("NEGSPACE_API_TOKEN", None)
    node_port, ctl_port, orch_port = free_port(), free_port(), free_port()
    procs: list[Proc] = []
    try:
        node = Proc("node", ["negspace_node", "--engine", "vllm", "--port", str(node_port),
                             "--kv-cache-gib", "1", "--max-model-len", "1024", "--max-num-seqs", "16"],
                    tmp_path, env)
        ctl = Proc("controller", ["negspace_controller", "--port", str(ctl_port), "--qdrant-path", ":memory:"],
                   tmp_path, env)
        procs += [node, ctl]
        orch = Proc("orchestrator", ["negspace_orchestrator", "--port", str(orch_port),
                                     "--node-url", f"http://127.0.0.1:{node_port}",
                                     "--controller-url", f"http://127.0.0.1:{ctl_port}",
                                     "--db", str(tmp_path / "orch.db"), "--data-dir", str(tmp_path / "exports")],
                    tmp_path, env)
        procs.append(orch)
        await wait_healthy(f"http://127.0.0.1:{ctl_port}", ctl.proc, timeout=300, describe=ctl.tail, poll_s=0.5)
        await wait_healthy(f"http://127.0.0.1:{node_port}", node.proc, timeout=600, describe=node.tail, poll_s=0.5)
        await wait_healthy(f"http://127.0.0.1:{orch_port}", orch.proc, timeout=60, describe=orch.tail, poll_s=0.5)

        async with OrchestratorClient(f"http://127.0.0.1:{orch_port}", timeout=600) as client:
            guided = (await client.runs.create(RunConfig(
                base_instruction="Write a math word problem about trains.", nodes=2, rounds=1,
                max_tokens=48, seed=1))).id
            run = await wait_run(client, guided, procs, 900)
            assert run.progress.accepted == 4
            insts = await client.runs.instructions(guided)
            assert len(insts) == 4 and all(i.text.strip() for i in insts)
            assert all(i.max_similarity is not None and i.guidance_scale is not None
                       for i in insts if i.round == 1)

            base = (await client.runs.create(RunConfig(
                base_instruction="Write a math word problem about trains.", mode="baseline",
                match_run=guided, nodes=2, max_tokens=48, seed=1))).id
            await wait_run(client, base, procs, 900)
            assert len(await client.runs.instructions(base)) == 4

            for rid in (guided, base):
                m = await client.runs.metrics(rid)
                assert m.n == 4 and m.semantic_diversity is not None

            qa = await client.runs.qa(guided, QARequest(max_tokens=96))
            assert qa.total == 4 and qa.converted + qa.rejected == 4
            assert qa.converted >= 1, "the bundled model produced no parseable Question/Answer pair"
            records = await client.runs.qa_records(guided)
            assert len(records) == qa.converted
            assert Path(qa.jsonl_path).read_text().count("\n") == qa.converted
            import datasets
            assert datasets.load_from_disk(qa.dataset_path).num_rows == qa.converted
    finally:
        for p in reversed(procs):
            p.stop()
