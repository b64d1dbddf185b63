"""The experiment's stages against a fake orchestrator app: artifacts, numbers, report."""

from __future__ import annotations

import json
import math

import pytest
from negspace_cli.experiment import ExperimentConfig, ExperimentError, run_experiment


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


async def test_experiment_writes_every_artifact_with_consistent_numbers(orch, fake_state, tmp_path, capsys):
    cfg = ExperimentConfig(base="Write a math problem.", nodes=3, rounds=2, train_max_steps=4, eval_limit=5)
    out = await run_experiment(cfg, orch, tmp_path, quiet=True)

    assert out == tmp_path / "run-1"
    for name in ("guided.jsonl", "baseline.jsonl", "qa/guided.jsonl", "qa/baseline.jsonl", "metrics.json",
                 "report.md", "embedding_map.png", "diversity_per_round.png", "guidance_scales.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    guided, baseline = lines(out / "guided.jsonl"), lines(out / "baseline.jsonl")
    assert len(guided) == len(baseline) == 3 * 3
    assert [g["text"] for g in guided] == [i.text for i in fake_state.instructions["run-1"]]
    assert len(lines(out / "qa/guided.jsonl")) == 9

    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"]["guided"]["n"] == len(guided) and m["metrics"]["baseline"]["n"] == len(baseline)
    assert m["counts"] == {"guided": 9, "baseline": 9, "guided_attempts": fake_state.runs["run-1"].progress.attempts,
                           "baseline_attempts": 9}
    # both runs' metrics came from ONE comparison (one basis fitted on the union, by the controller)
    assert fake_state.compare_requests == [("run-1", "run-2")] and fake_state.metrics_requests == []
    assert m["pca_basis"].startswith("fitted on guided + baseline")
    # per-round metrics: one entry per round, n = nodes
    assert set(m["per_round"]["guided"]) == {"0", "1", "2"}
    assert all(v["n"] == 3 for v in m["per_round"]["guided"].values())
    # eval: base once (compare_base only on the guided job), each tuned model
    assert fake_state.train_requests["run-1"].compare_base is True
    assert fake_state.train_requests["run-2"].compare_base is False
    assert fake_state.train_requests["run-1"].training.max_steps == 4
    assert fake_state.train_requests["run-1"].eval.limit == 5
    assert m["eval"] == {"guided-tuned": {"negspace_arith/exact_match,first-number": 0.2},
                         "base": {"negspace_arith/exact_match,first-number": 0.05},
                         "baseline-tuned": {"negspace_arith/exact_match,first-number": 0.1}}
    # guidance scales: guided rounds > 0 only, from the attempt events
    assert m["guidance_scales"]["attempts"] and all(r > 0 for r, _ in m["guidance_scales"]["attempts"])
    for label in ("guided", "baseline"):
        for k, v in m["metrics"][label].items():
            if isinstance(v, float):
                assert math.isfinite(v), (label, k)

    report = (out / "report.md").read_text()
    sd_g = m["metrics"]["guided"]["semantic_diversity"]
    assert f"| semantic_diversity | {sd_g:.4f} |" in report
    for row in ("mst_diversity", "hull_volume", "vendi_score", "distinct_1", "distinct_2"):
        assert f"| {row} |" in report
    assert "| task/metric | base | baseline-tuned | guided-tuned |" in report
    assert "| negspace_arith/exact_match,first-number | 0.0500 | 0.1000 | 0.2000 |" in report
    for fig in ("embedding_map.png", "diversity_per_round.png", "guidance_scales.png"):
        assert f"]({fig})" in report

    # the README's results section comes from the same numbers
    from negspace_cli import __main__ as cli

    assert cli.main(["results", str(out), "--plot-dir", str(tmp_path / "docs" / "images"),
                     "--relative-to", str(tmp_path / "docs")]) == 0
    snippet = capsys.readouterr().out
    assert snippet.startswith("## Results") and f"| semantic_diversity | {sd_g:.4f} |" in snippet
    assert "](images/demo-embedding_map.png)" in snippet
    assert (tmp_path / "docs" / "images" / "demo-embedding_map.png").is_file()
    assert cli.main(["results", str(tmp_path / "nothing")]) == 1


async def test_without_a_comparison_the_report_says_what_is_missing(orch, fake_state, tmp_path):
    fake_state.compare_down = True  # the orchestrator cannot reach the controller for the comparison
    cfg = ExperimentConfig(base="b", nodes=2, rounds=1, skip_training=True)
    out = await run_experiment(cfg, orch, tmp_path, quiet=True)
    m = json.loads((out / "metrics.json").read_text())
    assert m["pca_basis"] == "each run's own" and m["eval"] == {}
    assert not (out / "embedding_map.png").exists()
    assert fake_state.metrics_requests[0][1] is None
    assert "training and evaluation skipped" in (out / "report.md").read_text()
    assert "no comparison of the two runs (controller (compare): down)" in (out / "report.md").read_text()


async def test_a_failed_run_stops_the_experiment_with_its_error(orch, fake_state, tmp_path):
    fake_state.fail_run = True
    with pytest.raises(ExperimentError, match="guided run run-1 ended failed: boom"):
        await run_experiment(ExperimentConfig(base="b", nodes=2, rounds=1), orch, tmp_path, quiet=True)


async def test_a_run_whose_qa_keeps_no_pair_stops_with_the_rejections(orch, fake_state, tmp_path):
    fake_state.qa_none = True  # seen in a compose run: the 135M model's 4 pairs of a run all rejected
    with pytest.raises(ExperimentError, match=r"Q/A of the guided run run-1 produced no pairs \(4 of 4 rejected: "
                                              r"\{'unparseable': 4\}\)"):
        await run_experiment(ExperimentConfig(base="b", nodes=2, rounds=1), orch, tmp_path, quiet=True)


async def test_failed_training_still_writes_the_data_report_and_fails(orch, fake_state, tmp_path):
    fake_state.fail_train = True
    with pytest.raises(ExperimentError, match=r"training job job-run-1 \(guided\) ended failed: worker died"):
        await run_experiment(ExperimentConfig(base="b", nodes=2, rounds=2), orch, tmp_path, quiet=True)
    out = tmp_path / "run-1"
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"]["guided"]["n"] == 6 and m["training"]["guided"]["status"] == "failed"
    report = (out / "report.md").read_text()
    assert "| semantic_diversity |" in report and "training/evaluation failed" in report


def test_eval_scores_keep_metrics_and_drop_lm_eval_bookkeeping():
    from negspace_cli.analysis import eval_scores

    lm_eval_results = {"negspace_arith": {"alias": "negspace_arith", "exact_match,first-number": 0.25,
                                          "exact_match_stderr,first-number": 0.1, "sample_len": 10,
                                          "num_fewshot": 0}}
    assert eval_scores({"results": lm_eval_results}) == {"negspace_arith/exact_match,first-number": 0.25}
    assert eval_scores(lm_eval_results) == {"negspace_arith/exact_match,first-number": 0.25}


async def test_following_jobs_rides_out_a_restart_and_gives_up_after_the_outage_budget():
    from negspace_cli.follow import follow_jobs
    from negspace_contracts.errors import BadRequestError, ConnectionFailedError, ServiceUnavailableError
    from negspace_contracts.trainer import Job

    def job(status: str) -> Job:
        return Job.model_validate({"id": "j1", "status": status, "name": "x", "created_at": "2026-01-01T00:00:00Z",
                                   "request": {"dataset": {"records": [{"messages": [
                                       {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]}}})

    answers = [job("running"), ConnectionFailedError("refused"), ServiceUnavailableError("trainer: down"),
               job("running"), job("succeeded")]

    async def get_job(_key):
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    jobs = await follow_jobs(get_job, ["guided"], quiet=True, poll_s=0.01)
    assert jobs["guided"].status == "succeeded" and answers == []

    async def always_down(_key):
        raise ConnectionFailedError("refused")

    with pytest.raises(ConnectionFailedError):
        await follow_jobs(always_down, ["guided"], quiet=True, poll_s=0.01, outage_s=0.1)

    async def refused(_key):
        raise BadRequestError("no such run")

    with pytest.raises(BadRequestError):  # not retryable: raised at once
        await follow_jobs(refused, ["guided"], quiet=True, poll_s=0.01)


async def test_requests_are_repeated_while_the_orchestrator_is_away_and_errors_that_waiting_cannot_fix_are_not():
    from negspace_cli.experiment import retry_while_down
    from negspace_contracts.errors import ConflictError, ConnectionFailedError, ServiceUnavailableError

    answers = [ConnectionFailedError("refused"), ServiceUnavailableError("node down"), "done"]
    calls = 0

    async def call():
        nonlocal calls
        calls += 1
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    assert await retry_while_down(call, "Q/A", pause_s=0.01) == "done" and calls == 3

    async def conflict():
        raise ConflictError("run is running")

    with pytest.raises(ConflictError):
        await retry_while_down(conflict, "Q/A", pause_s=0.01)

    async def away():
        raise ConnectionFailedError("refused")

    with pytest.raises(ConnectionFailedError):
        await retry_while_down(away, "Q/A", outage_s=0.05, pause_s=0.01)


async def test_seeds_intervals_rejections_and_exports(orch, fake_state, tmp_path):
    import datasets
    from negspace_cli.experiment import seed_interval, t95

    fake_state.qa_rejections = {"echo": 2, "truncated": 1}
    # per-seed scores: guided 0.2 + (-0.02, 0, +0.04), baseline 0.1 + (0, 0.01, 0.02)
    for s, (g, b) in zip((7, 8, 9), ((-0.02, 0.0), (0.0, 0.01), (0.04, 0.02)), strict=True):
        fake_state.seed_jitter[("run-1", s)] = g
        fake_state.seed_jitter[("run-2", s)] = b
    cfg = ExperimentConfig(base="Write a math problem.", nodes=2, rounds=1, seed=7, train_seeds=3, train_max_steps=2)
    out = await run_experiment(cfg, orch, tmp_path, quiet=True)
    m = json.loads((out / "metrics.json").read_text())
    # one job per (run, seed), each with its seed; the base evaluated once
    # the first seed is the run's own job, the others (run, seed) jobs
    assert sorted(fake_state.seed_requests) == ["run-1", "run-1@8", "run-1@9", "run-2", "run-2@8", "run-2@9"]
    assert [fake_state.seed_requests[k].training.seed for k in ("run-1", "run-1@8", "run-1@9")] == [7, 8, 9]
    assert [r.compare_base for r in fake_state.seed_requests.values()].count(True) == 1
    key = "negspace_arith/exact_match,first-number"
    es = m["eval_seeds"]
    assert es["seeds"] == [7, 8, 9]
    assert es["scores"]["guided-tuned"]["9"][key] == pytest.approx(0.24)
    assert es["stderr"]["guided-tuned"]["7"][key] == 0.05 and es["base_stderr"][key] == 0.02
    gb = es["differences"]["guided - baseline"][key]
    diffs = [0.1 - 0.02, 0.1 - 0.01, 0.1 + 0.02]
    sd = float(__import__("numpy").std(diffs, ddof=1))
    half = t95(2) * math.sqrt(sd ** 2 / 3 + math.hypot(0.05, 0.05) ** 2)
    assert gb["mean"] == pytest.approx(sum(diffs) / 3) and gb["n"] == 3
    assert (gb["lo"], gb["hi"]) == (pytest.approx(gb["mean"] - half), pytest.approx(gb["mean"] + half))
    tb = es["differences"]["guided-tuned - base"][key]
    assert tb["mean"] == pytest.approx(0.2 + 0.02 / 3 - 0.05) and tb["lo"] < tb["mean"] < tb["hi"]
    assert m["eval"]["guided-tuned"][key] == pytest.approx(0.2 + 0.02 / 3)
    # one seed: a normal interval from lm-eval's stderr
    one = seed_interval([0.1], [0.05])
    assert (one["lo"], one["hi"]) == (pytest.approx(0.1 - 1.96 * 0.05), pytest.approx(0.1 + 1.96 * 0.05))
    report = (out / "report.md").read_text()
    assert "| task/metric | guided-tuned - base | baseline-tuned - base | guided - baseline |" in report
    assert f"| {key} | " in report and f"{gb['mean']:+.4f} [{gb['lo']:+.4f}, {gb['hi']:+.4f}]" in report
    assert "sample_len" not in report and "training seeds 7, 8, 9" in report
    # rejection reasons per dataset
    assert m["qa"]["guided"]["rejections"] == {"echo": 2, "truncated": 1}
    assert "| guided | 7 | 4 | 3 | echo 2, truncated 1 |" in report
    # the hf export of both datasets, loadable, with its card
    assert m["exports"] == {"guided": "export/guided", "baseline": "export/baseline"}
    for label, rid in (("guided", "run-1"), ("baseline", "run-2")):
        dd = datasets.load_from_disk(str(out / "export" / label))
        assert dd["instructions"]["text"] == [i.text for i in fake_state.instructions[rid]]
        assert dd["qa"].num_rows == 4 and (out / "export" / label / "README.md").is_file()
