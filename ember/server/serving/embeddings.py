"""POST /v1/embeddings: OpenAI semantics over the server's embedding models.

`input` is a string, a list of strings, a list of token ids, or a list of id lists;
`encoding_format` 'float' or 'base64' (little-endian float32, as the OpenAI API);
`dimensions` only where the model allows it (all-MiniLM-L6-v2 has no Matryoshka training:
only its native width is accepted); `truncate_prompt_tokens` (vLLM's extension) keeps the last
N tokens of a longer input, which is otherwise refused with 400 naming the limit. Requests are
routed by `model` among the embedders this server loaded (404 for any other name).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ember.engine.embedder import Embedder
from ember.server.errors import APIError, bad_request, from_invalid_request
from ember.server.protocol import ModelCard
from ember.server.serving.base import new_id
from ember.server.serving.embed_batcher import EmbedBatcher
from ember.types import InvalidRequestError

MAX_INPUTS = 2048
"""Most inputs in one request (the OpenAI API's limit)."""


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings request (plus vLLM's truncate_prompt_tokens)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    id: str = Field(default_factory=lambda: new_id("embd"))
    created: int = Field(default_factory=lambda: int(time.time()))


@dataclass
class EmbeddingServing:
    """The server's embedding models by served name. Concurrent requests to one model are
    packed into shared forward passes by its `EmbedBatcher` (one pass at a time per model, in
    a worker thread, so the event loop keeps serving)."""

    embedders: dict[str, Embedder]
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.batchers = {name: EmbedBatcher(emb) for name, emb in self.embedders.items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.embedders)

    def model_cards(self) -> list[ModelCard]:
        return [ModelCard(id=name, created=self.created, root=emb.name,
                          max_model_len=emb.max_model_len)
                for name, emb in self.embedders.items()]

    def resolve(self, name: str | None, generators: tuple[str, ...] = ()) -> str:
        """The embedder a request names (None / "": the only one, when there is one)."""
        if not name and len(self.embedders) == 1:
            return next(iter(self.embedders))
        if name in self.embedders:
            return name
        if name in generators:
            raise bad_request(f"the model {name!r} is a generation model; embedding models "
                              f"here: {', '.join(self.embedders)}", param="model")
        if not name:
            raise bad_request(f"`model` is required: one of {', '.join(self.embedders)}",
                              param="model")
        raise APIError(404, f"the model {name!r} does not exist; embedding models here: "
                            f"{', '.join(repr(m) for m in self.embedders)}",
                       param="model", code="model_not_found")

    async def create(self, body: EmbeddingRequest,
                     generators: tuple[str, ...] = ()) -> EmbeddingResponse:
        name = self.resolve(body.model, generators)
        embedder = self.embedders[name]
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise bad_request(f"the model {name!r} does not support `dimensions` other than "
                              f"its native {embedder.dim} (it is not trained for shortened "
                              "embeddings)", param="dimensions")
        seqs = _token_lists(body.input, embedder)
        try:
            vectors = await self.batchers[name].embed(seqs, body.truncate_prompt_tokens)
        except InvalidRequestError as exc:
            raise from_invalid_request(exc) from exc
        used = sum(min(len(s), body.truncate_prompt_tokens or len(s)) for s in seqs)
        return EmbeddingResponse(
            data=[EmbeddingData(index=i, embedding=_encode(v, body.encoding_format))
                  for i, v in enumerate(vectors)],
            model=name, usage=EmbeddingUsage(prompt_tokens=used, total_tokens=used))


def _token_lists(value: str | list[str] | list[int] | list[list[int]],
                 embedder: Embedder) -> list[list[int]]:
    """The request's inputs as token id lists (texts tokenized with [CLS] ... [SEP])."""
    items: list[Any]
    if isinstance(value, str):
        items = [value]
    elif value and all(isinstance(x, int) for x in value):
        items = [value]  # one input as token ids
    else:
        items = list(value)
    if not items:
        raise bad_request("`input` must not be empty", param="input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"`input` has {len(items)} items; at most {MAX_INPUTS} per request",
                          param="input")
    if all(isinstance(x, str) for x in items):
        return embedder.tokenize(items)
    if any(isinstance(x, str) for x in items):
        raise bad_request("`input` mixes strings and token ids", param="input")
    return [list(x) for x in items]


def _encode(vector: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":
        # NOTE: the OpenAI API's base64 is the raw little-endian float32 bytes.
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
