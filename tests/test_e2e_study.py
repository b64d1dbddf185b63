"""``negspace study`` end to end on the real services (launcher: bundled SmolLM2 on vLLM, MiniLM +
Qdrant local mode, SQLite) and the real evaluation embedder (all-mpnet-base-v2): a tiny grid runs,
is measured and reported; a rerun of the same command generates nothing and starts no stack."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.vllm]


def test_tiny_study_end_to_end_and_resume(local_stack, capsys):
    out_root = local_stack.out
    args = ["study", "--base", "Write a poem.", "--tune-base", "Write a math problem.", "--seeds", "1",
            "--arms", "plain-t0.7,plain-t1.2,retry-only,guided", "--nodes", "2", "--rounds", "1",
            "--max-tokens", "24", "--parallel", "2", "--n-boot", "200", "--engine", "vllm", "--kv-cache-gib", "1",
            "--quiet", *local_stack.flags]
    rc = local_stack.main(args)
    first = capsys.readouterr().err
    assert rc == 0, f"{first[-4000:]}\n{local_stack.logs()}"
    assert "starting the local stack" in first

    (folder,) = list(out_root.iterdir())
    data = json.loads((folder / "study.json").read_text())
    assert len(data["cells"]) == 2 * 4 and all(c["status"] == "completed" for c in data["cells"].values())
    cells = [json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))]
    assert len(cells) == 8 and all(len(c["texts"]) == 4 for c in cells)
    guided = [c for c in cells if c["arm"] == "guided"]
    assert all(c["config"]["negative_format"] == "augment" and c["config"]["similarity_quantile"] == 0.5
               for c in guided)
    res = data["results"]
    assert res["eval_embedder"] == "all-mpnet-base-v2" and res["cells_measured"] == 8
    for split in ("held_out", "tune"):
        part = res[split]
        assert part["n_cases"] == 1
        for arm, row in part["arms"].items():
            assert math.isfinite(row["vendi"]["mean"]) and 1.0 <= row["vendi"]["mean"] <= 4.0 + 1e-6, arm
            assert 0.0 <= row["on_topic_rate"]["mean"] <= 1.0
        assert set(part["comparisons"]) == {"retry-only", "guided"}
    report = (folder / "report.md").read_text()
    assert "Held-out bases (the evidence)" in report and "Tuning bases" in report
    for name in res["figures"].values():
        assert (folder / name).stat().st_size > 0

    # the same command again: every run exists, so no stack starts and nothing is generated
    rc = local_stack.main(args)
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "every run is generated" in err and "starting the local stack" not in err
    again = json.loads((folder / "study.json").read_text())
    assert {k: c["run_id"] for k, c in again["cells"].items()} == {k: c["run_id"] for k, c in data["cells"].items()}
