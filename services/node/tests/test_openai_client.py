"""The official ``openai`` client and the typed NodeClient against the real app in-process,
with the transformers engine on the bundled model (guidance extras through ``extra_body``)."""

from __future__ import annotations

import httpx
import openai
import pytest
from negspace_contracts.errors import BadRequestError, NotFoundError
from negspace_contracts.node import ChatCompletionRequest, Guidance, NodeClient
from negspace_node.app import create_app
from negspace_node.engines.base import GenerationRequest
from negspace_node.engines.reference import reference_generate
from negspace_node.engines.transformers import TransformersEngine
from negspace_node.settings import NodeSettings
from negspace_node.testing import chat_ids, serving

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Write a question about the ocean."}]
NEGATIVES = ["sharks", "Describe waves."]


@pytest.fixture
async def app(smol):
    model, tok = smol
    settings = NodeSettings(engine="transformers", max_model_len=512)
    app = create_app(settings, engine=TransformersEngine(settings, model=model, tokenizer=tok))
    async with serving(app):
        yield app


def openai_client(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://node/v1", api_key="x", max_retries=0,
                              http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))


async def test_openai_client_guided_chat_matches_the_reference(app, smol):
    model, tok = smol
    async with openai_client(app) as client:
        await _guided_chat_matches_the_reference(client, model, tok)


async def _guided_chat_matches_the_reference(client, model, tok):
    models = await client.models.list()
    name = models.data[0].id
    assert name == "SmolLM2-135M-Instruct"
    reply = await client.chat.completions.create(
        model=name, messages=MESSAGES, max_tokens=8, temperature=0,
        extra_body={"negative_prompts": NEGATIVES, "guidance_scale": 3.0, "guidance_space": "logits"})
    expected = reference_generate(model, tok, GenerationRequest(
        prompt_ids=chat_ids(tok, MESSAGES[0]["content"]), negative_ids=[chat_ids(tok, n) for n in NEGATIVES],
        max_tokens=8, temperature=0, guidance=Guidance(scale=3.0)))
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.model_extra["guidance"] == {"scale": 3.0, "num_negatives": 2, "space": "logits", "combine": "min",
                                             "alpha": None, "max_tokens": None}

    plain = await client.completions.create(model=name, prompt="The capital of France is", max_tokens=4,
                                            temperature=0, n=1)
    assert plain.choices[0].text.strip() and plain.usage.completion_tokens == 4


async def test_openai_client_error_path(app):
    async with openai_client(app) as client:
        await _error_path(client)


async def _error_path(client):
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "does not exist" in missing.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=4096)
    assert "max_tokens" in too_long.value.message
    with pytest.raises(openai.UnprocessableEntityError) as too_many:
        await client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                             extra_body={"negative_prompts": ["x"] * 17})
    assert "negative_prompts" in too_many.value.message


async def test_node_client_contract_with_the_real_engine(app):
    async with NodeClient("http://node", transport=httpx.ASGITransport(app=app)) as client:
        assert (await client.health()).status == "ok"
        reply = await client.chat.create(ChatCompletionRequest(
            messages=MESSAGES, negative_prompts=NEGATIVES, guidance=Guidance(scale=2.0, space="logprobs"),
            temperature=0.7, seed=5, max_tokens=6))
        again = await client.chat.create(ChatCompletionRequest(
            messages=MESSAGES, negative_prompts=NEGATIVES, guidance=Guidance(scale=2.0, space="logprobs"),
            temperature=0.7, seed=5, max_tokens=6))
        assert reply.text == again.text and reply.guidance.space == "logprobs"
        with pytest.raises(NotFoundError):
            await client.chat.create(ChatCompletionRequest(messages=MESSAGES, model="nope"))
        with pytest.raises(BadRequestError, match="shorten it"):
            await client.chat.create(ChatCompletionRequest(messages=MESSAGES, negative_prompts=["word " * 600]))
