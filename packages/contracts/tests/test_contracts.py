"""Wire-model rules that every service relies on, and client error mapping."""

from __future__ import annotations

import math

import httpx
import pytest
from negspace_contracts import ConnectionFailedError, TimeoutError_, is_retryable
from negspace_contracts.controller import DenseRequest, EmbedRequest, PointIn, SimilarRequest
from negspace_contracts.errors import RateLimitError, ServiceUnavailableError, error_class_for
from negspace_contracts.node import ChatCompletionRequest, ChatMessage, CompletionRequest, NodeClient
from negspace_contracts.orchestrator import RunConfig
from negspace_contracts.trainer import DatasetSpec, JobRequest
from pydantic import ValidationError


def chat(**kw):
    return ChatCompletionRequest(messages=[ChatMessage(role="user", content="hi")], **kw)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5])
def test_guidance_scale_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValidationError, match="guidance_scale"):
        chat(guidance_scale=bad)


def test_guided_requests_need_one_choice_and_at_most_16_negatives():
    with pytest.raises(ValidationError, match="n must be 1"):
        chat(n=2, negative_prompts=["x"])
    with pytest.raises(ValidationError):
        chat(negative_prompts=["x"] * 17)
    assert chat(negative_prompts=["x"] * 16, guidance_scale=3.0).guidance_scale == 3.0


def test_node_requests_reject_empty_input_and_unknown_fields():
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="")
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "a"}], "bogus": 1})
    assert chat(stream=True, stream_options={"include_usage": True}).stream_options.include_usage
    with pytest.raises(ValidationError, match="stream_options is only allowed with stream=true"):
        chat(stream_options={"include_usage": True})


def test_controller_requests_validate_ids_texts_and_sizes():
    with pytest.raises(ValidationError):
        PointIn(id=-1, text="a")
    with pytest.raises(ValidationError):
        PointIn(id=1, text="   ")
    with pytest.raises(ValidationError):
        EmbedRequest(texts=[])
    with pytest.raises(ValidationError):
        EmbedRequest(texts=["ok", ""])
    for bad in ({"k": 0}, {"knn": 0}):
        with pytest.raises(ValidationError):
            DenseRequest(**bad)
    with pytest.raises(ValidationError):
        SimilarRequest(text="a", threshold=0)


def test_run_config_rules():
    assert RunConfig(base_instruction="Write a math problem.").nodes == 4
    for bad in ({"rounds": -1}, {"nodes": 0}, {"nodes": 10_000}, {"similarity_threshold": 0},
                {"similarity_threshold": 1.5}, {"base_instruction": "  "}):
        with pytest.raises(ValidationError):
            RunConfig(**{"base_instruction": "x", **bad})
    with pytest.raises(ValidationError, match="size or match_run"):
        RunConfig(base_instruction="x", mode="baseline")
    with pytest.raises(ValidationError, match="baseline runs only"):
        RunConfig(base_instruction="x", size=3)
    assert RunConfig(base_instruction="x", mode="baseline", size=3).size == 3


def test_run_config_sampling_bounds_mirror_the_node():
    for ok in (0.0, 1e-5, 0.7, 2.0):
        assert RunConfig(base_instruction="x", temperature=ok).temperature == ok
    for bad in (1e-30, 9e-6, -0.1, 2.01, float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="temperature"):
            RunConfig(base_instruction="x", temperature=bad)
    with pytest.raises(ValidationError, match="write 0"):
        RunConfig(base_instruction="x", temperature=1e-30)
    for bad in (0.0, -1.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="top_p"):
            RunConfig(base_instruction="x", top_p=bad)
    # the node takes what a run sends: every RunConfig value is a valid node request value
    from negspace_contracts.node import CompletionRequest

    for t, p in ((0.0, 1e-9), (1e-5, 1.0), (2.0, 0.5)):
        run = RunConfig(base_instruction="x", temperature=t, top_p=p)
        CompletionRequest(prompt="x", temperature=run.temperature, top_p=run.top_p)


def test_job_dataset_needs_exactly_one_source_and_assistant_turns():
    with pytest.raises(ValidationError, match="exactly one"):
        DatasetSpec()
    with pytest.raises(ValidationError, match="empty"):
        DatasetSpec(records=[])
    with pytest.raises(ValidationError, match="assistant"):
        DatasetSpec(records=[{"messages": [{"role": "user", "content": "q"}]}])
    job = JobRequest(dataset={"records": [{"messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]}]})
    assert job.lora.r == 32 and job.lora.alpha == 64 and job.method == "lora"


def test_status_codes_map_to_retryable_classes():
    assert error_class_for(503) is ServiceUnavailableError
    assert error_class_for(502) is ServiceUnavailableError
    assert error_class_for(429) is RateLimitError
    assert is_retryable(RateLimitError("x")) and not is_retryable(ValueError())


async def test_transport_failures_become_typed_errors():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)

    async with NodeClient("http://node", transport=httpx.MockTransport(refuse)) as c:
        with pytest.raises(ConnectionFailedError):
            await c.models.list()
    async with NodeClient("http://node", transport=httpx.MockTransport(slow)) as c:
        with pytest.raises(TimeoutError_):
            await c.chat.create(chat())


async def test_errors_from_non_negspace_bodies_still_carry_the_text():
    async with NodeClient("http://node", transport=httpx.MockTransport(
            lambda r: httpx.Response(502, text="bad gateway from proxy"))) as c:
        with pytest.raises(ServiceUnavailableError, match="bad gateway"):
            await c.models.list()


async def test_timeouts_default_to_the_clients_and_none_means_no_read_limit():
    seen = []

    def record(request):
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"object": "list", "data": []})

    async with NodeClient("http://node", timeout=7.0, transport=httpx.MockTransport(record)) as c:
        await c.models.list()
        await c.call("GET", "/v1/models", None, timeout=None)
        await c.call("GET", "/v1/models", None, timeout=2.0)
    assert seen[0]["read"] == 7.0
    assert seen[1]["read"] is None and seen[1]["connect"] == 5.0
    assert seen[2]["read"] == 2.0
