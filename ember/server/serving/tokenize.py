"""POST /tokenize and POST /detokenize (vLLM-compatible shapes)."""

from __future__ import annotations

from ember.server.errors import bad_request
from ember.server.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                   TokenizeResponse)
from ember.server.serving.base import ServingContext
from ember.server.serving.chat import render_chat


class TokenizeServing:
    """Text or chat messages <-> token ids with the served model's tokenizer."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.ctx.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages",
                              "prompt" if body.prompt is None else "messages")
        tokenizer = self.ctx.engine.tokenizer
        if body.messages is not None:
            ids = render_chat(tokenizer, body.messages, body.add_generation_prompt is not False)
        else:
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
