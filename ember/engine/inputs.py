"""The prompt forms `LLM.generate` and `LLMEngine.add_request` accept (vLLM's names).

One prompt is text, a list of token ids, `{"prompt": text}` (TextPrompt) or
`{"prompt_token_ids": ids}` (TokensPrompt); a batch is a list of these, forms mixed. Parsing
checks only the shape; the token-id range and the context length are checked by
`LLMEngine.process_prompt`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TypedDict

from ember.types import InvalidRequestError


class TextPrompt(TypedDict):
    """A prompt given as text (tokenized by the engine)."""

    prompt: str


class TokensPrompt(TypedDict):
    """A prompt given as token ids."""

    prompt_token_ids: list[int]


Prompt = str | Sequence[int] | TextPrompt | TokensPrompt
"""One prompt in any accepted form."""

ACCEPTED_FORMS = ("a prompt must be a string, a list of token ids (integers), "
                  "{'prompt': <string>} or {'prompt_token_ids': <list of integers>}; "
                  "several prompts are a list of these (forms may be mixed)")


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        bad = next((v for v in value if not _is_token_id(v)), None)
        return f"a list containing {type(bad).__name__} {bad!r}" if value else "an empty list"
    return f"{type(value).__name__} {value!r}"


def _error(value: object, where: str) -> InvalidRequestError:
    prefix = f"{where}: " if where else ""
    return InvalidRequestError(f"{prefix}{ACCEPTED_FORMS}; got {_describe(value)}", "prompt")


def _is_token_id(value: object) -> bool:
    # NOTE: numpy / torch integer scalars are Integral too; bools are not token ids. The
    # exact-int test first: the ABC check is slow on long prompts.
    return type(value) is int or (isinstance(value, numbers.Integral)
                                  and not isinstance(value, bool))


def _token_ids(value: object) -> list[int] | None:
    """The value as a list of ints, or None when it is not a list of integers."""
    if not isinstance(value, (list, tuple)) or not all(_is_token_id(t) for t in value):
        return None
    return [int(t) for t in value]


def parse_prompt(prompt: object, where: str = "") -> str | list[int]:
    """One prompt as text or token ids; InvalidRequestError (stating the accepted forms)
    for anything else. `where` prefixes the message (e.g. 'prompts[2]')."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        if set(prompt) == {"prompt"} and isinstance(prompt["prompt"], str):
            return prompt["prompt"]
        if set(prompt) == {"prompt_token_ids"}:
            ids = _token_ids(prompt["prompt_token_ids"])
            if ids is not None:
                return ids
            raise _error(prompt["prompt_token_ids"], f"{where}['prompt_token_ids']" if where
                         else "prompt_token_ids")
        raise _error(prompt, where)
    ids = _token_ids(prompt)
    if ids is None:
        raise _error(prompt, where)
    return ids


def parse_prompts(prompts: object) -> list[str | list[int]]:
    """A prompt or a batch of prompts as a list of texts / token-id lists, in order.

    A flat list of integers is ONE prompt of token ids; a list of anything else is a batch
    (an empty list is an empty batch).
    """
    if isinstance(prompts, (str, dict)):
        return [parse_prompt(prompts)]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(_is_token_id(t) for t in prompts):
            return [parse_prompt(prompts)]
        if any(_is_token_id(t) for t in prompts):
            # NOTE: ids mixed with other things: report it as one malformed id list.
            raise _error(prompts, "")
        return [parse_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    raise _error(prompts, "")
