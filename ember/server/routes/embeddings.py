"""The embeddings route: POST /v1/embeddings (logic in ember.server.serving.embeddings)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ember.server.routes import ERROR_RESPONSES
from ember.server.serving.base import json_response
from ember.server.serving.embeddings import EmbeddingRequest, EmbeddingResponse
from ember.server.state import get_state

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    """Embed one or more inputs (strings or token ids) with an embedding model."""
    state = get_state(request)
    serving = state.require_embeddings()
    return json_response(await serving.create(body, state.generator_names))
