"""HTTP routes: thin wrappers that parse the body and call the serving classes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ember.server.protocol import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Malformed JSON or an invalid field (`param` names it)"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Rate limit or queue limit reached (see Retry-After)"),
        (503, "Model loading or server shutting down"),
    )
}


def stream_response(model: type[BaseModel], description: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a 200 that is JSON, or with stream=true an SSE stream of `model` chunks."""
    return {200: {
        "description": description,
        "content": {"text/event-stream": {
            # NOTE: each SSE event's `data` is a chunk as JSON, an in-stream error (the
            # stream had started), or the final literal [DONE].
            "schema": {"type": "object", "required": ["data"], "properties": {"data": {
                "anyOf": [{"type": "string", "const": "[DONE]"},
                          {"type": "string", "contentMediaType": "application/json",
                           "contentSchema": {"anyOf": [
                               {"$ref": f"#/components/schemas/{model.__name__}"},
                               {"$ref": "#/components/schemas/ErrorResponse"}]}}]}}},
            "example": "data: {...chunk...}\n\ndata: [DONE]\n\n"}}}}
