"""OpenAI API routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ember.server.protocol import (ChatCompletionRequest, ChatCompletionResponse,
                                   ChatCompletionStreamResponse, CompletionRequest,
                                   CompletionResponse, CompletionStreamResponse, ModelCard,
                                   ModelList)
from ember.server.routes import ERROR_RESPONSES, stream_response
from ember.server.serving import Servings
from ember.server.serving.base import json_response
from ember.server.errors import APIError
from ember.server.state import AppState, get_servings, get_state

router = APIRouter(tags=["OpenAI"])
ServingsDep = Annotated[Servings, Depends(get_servings)]


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> JSONResponse:
    """The served models (the generator and its aliases, then the embedding models)."""
    return json_response(ModelList(data=served_cards(get_state(request))))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    """One model by name (404 if it is not served)."""
    state = get_state(request)
    cards = {c.id: c for c in served_cards(state)}
    if model_id in cards:
        return json_response(cards[model_id])
    if state.generator_names:
        state.require().ctx.resolve_model(model_id or "\0")  # the generator's 404
    raise APIError(404, f"the model {model_id!r} does not exist", param="model",
                   code="model_not_found")


def served_cards(state: AppState) -> list[ModelCard]:
    """Cards of every served model (503 while loading)."""
    cards = state.require().ctx.model_list().data if state.generator_names else []
    if state.config.server.embedding_models:
        cards += state.require_embeddings().model_cards()
    return cards


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=stream_response(CompletionStreamResponse,
                                       "A completion, or with stream=true SSE chunks")
             | ERROR_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request,
                            servings: ServingsDep) -> Response:
    """Complete one or more prompts."""
    return await servings.completions.create(body, request)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=stream_response(ChatCompletionStreamResponse,
                                       "A chat completion, or with stream=true SSE chunks")
             | ERROR_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 servings: ServingsDep) -> Response:
    """Answer a conversation using the model's chat template."""
    return await servings.chat.create(body, request)
