"""The OpenAI Batch line formats.

Input line:  {"custom_id": str, "method": "POST", "url": "/v1/...", "body": {...}}
Output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
              "error": {"code", "message"} | null}

A request the server would have answered (also with a 4xx) has a `response`; a line that is
not a request at all (bad JSON, no custom_id, duplicate custom_id, wrong method, unknown url)
has an `error` instead.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

KNOWN_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
"""Endpoints of the OpenAI Batch API; `executor.ENDPOINTS` says which ones this build runs."""

DUPLICATE_CODE = "duplicate_custom_id"
"""Error code of a repeated custom_id (the first occurrence runs, later ones are errors)."""


@dataclass(frozen=True)
class BatchLine:
    """One well-formed input line."""

    line_no: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineError:
    """An input line that cannot be run; written as an error line."""

    line_no: int
    custom_id: str | None
    code: str
    message: str


def parse_line(line_no: int, raw: bytes | str, served_urls: frozenset[str] | set[str],
               endpoint: str | None = None) -> BatchLine | LineError:
    """Parse one input line (1-based `line_no`); `endpoint`: the only url allowed (server
    batches are created for one endpoint)."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return LineError(line_no, None, "invalid_json", f"line {line_no}: not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return LineError(line_no, None, "invalid_line",
                         f"line {line_no}: expected a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(line_no, None, "missing_custom_id",
                         f"line {line_no}: custom_id must be a non-empty string")

    def fail(code: str, message: str) -> LineError:
        return LineError(line_no, custom_id, code, f"line {line_no}: {message}")

    method = obj.get("method", "POST")
    if method != "POST":
        return fail("invalid_method", f"method must be 'POST', got {method!r}")
    url = obj.get("url")
    if not isinstance(url, str):
        return fail("invalid_url", f"url must be one of {', '.join(KNOWN_URLS)}")
    if endpoint is not None and url != endpoint:
        return fail("mismatched_url", f"url {url!r} differs from the batch's endpoint "
                                      f"{endpoint!r}")
    if url not in served_urls:
        if url in KNOWN_URLS:
            return fail("unsupported_url", f"{url} is not served by the models loaded here "
                                           f"(served: {', '.join(sorted(served_urls))}; "
                                           "/v1/embeddings needs an embedding model)")
        return fail("invalid_url", f"url {url!r} is not a batch endpoint; use one of "
                                   f"{', '.join(KNOWN_URLS)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return fail("invalid_body", "body must be a JSON object")
    return BatchLine(line_no, custom_id, url, body)


def new_line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_line(custom_id: str, status_code: int, request_id: str,
                  body: dict[str, Any]) -> dict[str, Any]:
    """The output line of a request that was answered (any status)."""
    return {"id": new_line_id(), "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": None}


def error_line(err: LineError) -> dict[str, Any]:
    """The output line of an input line that could not be run."""
    return {"id": new_line_id(), "custom_id": err.custom_id, "response": None,
            "error": {"code": err.code, "message": err.message}}


def is_failure(line: dict[str, Any]) -> bool:
    """Whether an output line belongs in the error file (no 200 response)."""
    response = line.get("response")
    return line.get("error") is not None or not response or response.get("status_code") != 200
