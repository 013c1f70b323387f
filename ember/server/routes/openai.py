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
from ember.server.state import get_servings

router = APIRouter(tags=["OpenAI"])
ServingsDep = Annotated[Servings, Depends(get_servings)]


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(servings: ServingsDep) -> JSONResponse:
    """The served model (and its aliases)."""
    return json_response(servings.ctx.model_list())


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model_id: str, servings: ServingsDep) -> JSONResponse:
    """One model by name (404 if it is not served)."""
    name = servings.ctx.resolve_model(model_id or "\0")
    return json_response(next(c for c in servings.ctx.model_list().data if c.id == name))


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
