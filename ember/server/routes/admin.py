"""Operational routes: /health, /metrics, /tokenize, /detokenize."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ember.server.metrics import CONTENT_TYPE
from ember.server.protocol import (DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                                   HealthResponse, TokenizeRequest, TokenizeResponse)
from ember.server.routes import ERROR_RESPONSES
from ember.server.serving import Servings
from ember.server.serving.base import json_response
from ember.server.state import get_servings, get_state

router = APIRouter()
ServingsDep = Annotated[Servings, Depends(get_servings)]


@router.get("/health", response_model=HealthResponse, tags=["Operations"],
            responses={503: {"model": ErrorResponse,
                             "description": "Loading, shutting down, or the engine failed"}})
async def health(request: Request) -> JSONResponse:
    """200 when the model is loaded and requests are taken, 503 otherwise."""
    state = get_state(request)
    if not state.ready:
        return state.not_ready_error().response()
    return json_response(HealthResponse())


@router.get("/metrics", tags=["Operations"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics (names prefixed `ember:`)."""
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             tags=["Tokenizer"])
async def tokenize(body: TokenizeRequest, request: Request,
                   servings: ServingsDep) -> JSONResponse:
    """Token ids of a prompt or of chat messages rendered with the chat template."""
    return json_response(await servings.tokenize.tokenize_async(body, request))


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             tags=["Tokenizer"])
async def detokenize(body: DetokenizeRequest, request: Request,
                     servings: ServingsDep) -> JSONResponse:
    """Text of token ids."""
    return json_response(await servings.tokenize.detokenize_async(body, request))
