"""POST /tokenize and POST /detokenize (vLLM-compatible shapes)."""

from __future__ import annotations

import asyncio

from fastapi import Request

from ember.server.errors import APIError, bad_request
from ember.server.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                   TokenizeResponse)
from ember.server.serving.base import ServingContext
from ember.server.serving.chat import render_chat
from ember.server.serving.guards import check_text
from ember.server.limits import PRINCIPAL_KEY


class TokenizeServing:
    """Text or chat messages <-> token ids with the served model's tokenizer."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def _rate_limit(self, request: Request) -> None:
        """/tokenize and /detokenize count against the caller's request rate too."""
        principal = request.scope.get("state", {}).get(PRINCIPAL_KEY, "anonymous")
        try:
            self.ctx.rate_limiter.acquire(principal, 0)
        except APIError:
            self.ctx.metrics.rejected.labels("rate_limit").inc()
            raise

    async def tokenize_async(self, body: TokenizeRequest, request: Request) -> TokenizeResponse:
        """`tokenize` after the rate limit, off the event loop (a long text takes a while)."""
        self._rate_limit(request)
        return await asyncio.to_thread(self.tokenize, body)

    async def detokenize_async(self, body: DetokenizeRequest,
                               request: Request) -> DetokenizeResponse:
        self._rate_limit(request)
        return await asyncio.to_thread(self.detokenize, body)

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.ctx.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages",
                              "prompt" if body.prompt is None else "messages")
        tokenizer = self.ctx.engine.tokenizer
        if body.messages is not None:
            ids = render_chat(tokenizer, body.messages, body.add_generation_prompt is not False)
        else:
            check_text(body.prompt or "", "prompt")
            ids = tokenizer.encode(body.prompt or "",
                                   add_special_tokens=body.add_special_tokens is not False)
        strs = ([self.ctx.token_texts.text(i) for i in ids] if body.return_token_strs else None)
        return TokenizeResponse(count=len(ids), max_model_len=self.ctx.engine.max_model_len,
                                tokens=ids, token_strs=strs)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.resolve_model(body.model)
        vocab = self.ctx.engine.vocab_size
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is not in the vocabulary (0..{vocab - 1})",
                              "tokens")
        return DetokenizeResponse(prompt=self.ctx.engine.tokenizer.decode(body.tokens))
