"""Engine-side output processing: incremental detokenization, stop strings, and merging the n
child engine requests of one user request into `RequestOutput`s.

Detokenization uses the prefix_offset / read_offset technique: each new token decodes only a
short window of recent tokens (O(1) per token, never the whole output), and text is emitted
only when the window does not end in U+FFFD, so a UTF-8 character split across byte-level
tokens is never shown half. Text that could still become a stop string is held back until it
cannot, or until the request finishes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from ember.types import (CompletionOutput, EngineCoreOutput, RequestOutput, RequestStatus,
                         SamplingParams, TokenLogprobs)

logger = logging.getLogger(__name__)

_PROMPT_CONTEXT_TOKENS = 6
"""Prompt tokens decoded as left context of the first output token (so e.g. SentencePiece's
leading-space handling sees the same neighbours as a full decode)."""
_REPLACEMENT_CHAR = "\ufffd"


class DecodesTokens(Protocol):
    """The part of the tokenizer that output processing needs."""

    @property
    def all_special_ids(self) -> frozenset[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns one completion's tokens into text step by step and detects stop strings.

    Args:
        tokenizer: decodes token ids.
        prompt_token_ids: the prompt; its last few tokens are decoding context only.
        params: uses stop, include_stop_str_in_output, skip_special_tokens, min_tokens.
    """

    def __init__(self, tokenizer: DecodesTokens, prompt_token_ids: list[int],
                 params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self._skip_ids = tokenizer.all_special_ids if params.skip_special_tokens else frozenset()
        self.token_ids: list[int] = []
        """Output token ids consumed so far (including a final stop token id)."""
        self.stop_string: str | None = None
        """The stop string that ended the completion, if any."""
        self.finished = False
        # NOTE: with include_stop_str_in_output every emitted character survives a later match,
        # so nothing needs holding back; otherwise a partial stop string must not be shown.
        longest = max((len(s) for s in params.stop), default=0)
        self._holdback = 0 if params.include_stop_str_in_output else max(longest - 1, 0)
        self._window = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0
        """Window tokens before this index were already emitted; those up to `_read_offset`
        are decoded only as left context."""
        self._read_offset = len(self._window)
        self._text = ""
        self._emitted = 0
        self._stop_check_offset = 0

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The last few prompt tokens that produce text."""
        context: list[int] = []
        for tok in reversed(prompt_token_ids):
            if len(context) == _PROMPT_CONTEXT_TOKENS:
                break
            if tok not in self._skip_ids:
                context.append(tok)
        context.reverse()
        return context

    @property
    def output_text(self) -> str:
        """The text that may be shown so far (held-back characters excluded)."""
        return self._text[:self._visible_end()]

    def update(self, new_token_ids: list[int], is_stop_token: bool) -> str | None:
        """Append tokens; return the stop string if one was completed, else None.

        When `is_stop_token`, the last of `new_token_ids` ended the request (EOS or a stop token
        id): it is recorded but its text is not added. After a stop-string match the remaining
        tokens of this call, and any later call, are ignored.
        """
        if self.finished:
            return None
        last = len(new_token_ids) - 1
        for pos, tok in enumerate(new_token_ids):
            self.token_ids.append(tok)
            if (is_stop_token and pos == last) or tok in self._skip_ids:
                continue
            self._text += self._decode_next(tok)
            stop = self._check_stop_strings()
            if stop is not None:
                self.stop_string = stop
                self.finished = True
                return stop
        return None

    def get_delta_text(self, finished: bool = False) -> str:
        """Text not returned before. `finished=True` releases held-back text and any bytes of
        an incomplete character (as `tokenizer.decode` would show them); it is final."""
        if finished and not self.finished:
            self._text += self._flush()
            self.finished = True
        end = self._visible_end()
        delta = self._text[self._emitted:end]
        self._emitted = end
        return delta

    def _visible_end(self) -> int:
        if self.finished:
            return len(self._text)
        return max(self._emitted, len(self._text) - self._holdback)

    def _decode_next(self, token_id: int) -> str:
        """Add one token to the window; return the text it completes (maybe '')."""
        self._window.append(token_id)
        skip = self.params.skip_special_tokens
        prefix_text = self.tokenizer.decode(self._window[self._prefix_offset:self._read_offset],
                                            skip_special_tokens=skip)
        new_text = self.tokenizer.decode(self._window[self._prefix_offset:],
                                         skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""  # an incomplete character (or nothing yet): wait for more tokens
        # Advance: the old read offset becomes the prefix; drop what is no longer needed.
        self._window = self._window[self._read_offset:]
        self._prefix_offset = 0
        self._read_offset = len(self._window)
        return new_text[len(prefix_text):]

    def _flush(self) -> str:
        """Text of window tokens still waiting for the rest of a character."""
        if self._read_offset == len(self._window):
            return ""
        skip = self.params.skip_special_tokens
        prefix_text = self.tokenizer.decode(self._window[self._prefix_offset:self._read_offset],
                                            skip_special_tokens=skip)
        new_text = self.tokenizer.decode(self._window[self._prefix_offset:],
                                         skip_special_tokens=skip)
        self._window = self._window[self._read_offset:]
        self._prefix_offset, self._read_offset = 0, len(self._window)
        return new_text[len(prefix_text):]

    def _check_stop_strings(self) -> str | None:
        """Find the earliest stop string touching the newly added text; truncate there."""
        stops = self.params.stop
        if not stops:
            return None
        if len(self.token_ids) < self.params.min_tokens:
            # NOTE: like stop token ids, stop strings count only from min_tokens on.
            self._stop_check_offset = len(self._text)
            return None
        if len(self._text) == self._stop_check_offset:
            return None
        best: tuple[int, str] | None = None
        for stop in stops:
            # A new match must end in the new text, so it starts at most len-1 chars before it.
            idx = self._text.find(stop, max(0, self._stop_check_offset - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        self._stop_check_offset = len(self._text)
        if best is None:
            return None
        idx, stop = best
        end = idx + len(stop) if self.params.include_stop_str_in_output else idx
        self._text = self._text[:max(end, self._emitted)]
        return stop


@dataclass
class ProcessedOutputs:
    """Result of one `OutputProcessor.process` call."""

    request_outputs: list[RequestOutput] = field(default_factory=list)
    """One per user request that changed in this batch."""
    stop_string_hits: list[str] = field(default_factory=list)
    """Child (engine) request ids that completed a stop string: the engine must finish them."""


@dataclass
class _ChildState:
    """One completion (one engine request) of a user request."""

    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprobs] | None = None

    def reset_delta(self) -> None:
        self.delta_text = ""
        self.delta_token_ids = []
        self.delta_logprobs = [] if self.logprobs is not None else None


@dataclass
class _ParentState:
    """One user request and its n completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    child_ids: list[str]
    children: list[_ChildState]
    prompt_logprobs: list[TokenLogprobs | None] | None
    num_cached_tokens: int = 0


class OutputProcessor:
    """Turns per-step `EngineCoreOutput`s of child engine requests into `RequestOutput`s.

    Each `CompletionOutput` carries the cumulative text / token ids / logprobs and the deltas of
    the latest `process` (or `abort`) call; children that did not change in that call have empty
    deltas. A user request is forgotten once all its children finished.
    """

    def __init__(self, tokenizer: DecodesTokens) -> None:
        self.tokenizer = tokenizer
        self._parents: dict[str, _ParentState] = {}
        self._owners: dict[str, tuple[_ParentState, _ChildState]] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, child_ids: list[str]) -> None:
        """Register a user request whose completion i is the engine request `child_ids[i]`."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already registered")
        if not child_ids or len(set(child_ids)) != len(child_ids):
            raise ValueError(f"child ids must be non-empty and distinct, got {child_ids!r}")
        if any(c in self._owners for c in child_ids):
            raise ValueError(f"a child id of {request_id!r} is already registered")
        children = [
            _ChildState(index=i,
                        detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                           params),
                        logprobs=[] if params.logprobs is not None else None)
            for i in range(len(child_ids))
        ]
        parent = _ParentState(request_id=request_id, prompt=prompt,
                              prompt_token_ids=prompt_token_ids, params=params,
                              child_ids=list(child_ids), children=children,
                              prompt_logprobs=[] if params.prompt_logprobs is not None else None)
        self._parents[request_id] = parent
        for child_id, child in zip(child_ids, children):
            self._owners[child_id] = (parent, child)

    def has_request(self, request_id: str) -> bool:
        """True while the user request is registered and not finished."""
        return request_id in self._parents

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """Apply one step's engine outputs; unknown or already finished children are ignored."""
        result = ProcessedOutputs()
        touched: dict[str, _ParentState] = {}
        for out in outputs:
            owner = self._owners.get(out.request_id)
            if owner is None:
                logger.debug("ignoring output for unknown request %s", out.request_id)
                continue
            parent, child = owner
            if child.finish_reason is not None:
                continue
            if parent.request_id not in touched:
                touched[parent.request_id] = parent
                for c in parent.children:
                    c.reset_delta()
            if self._apply(parent, child, out):
                result.stop_string_hits.append(out.request_id)
        for parent in touched.values():
            request_output = _make_request_output(parent)
            result.request_outputs.append(request_output)
            if request_output.finished:
                self._drop(parent)
        return result

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish all unfinished children with 'abort'; return the final output (None if the
        request is unknown or already finished)."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        for child in parent.children:
            child.reset_delta()
            if child.finish_reason is None:
                child.finish_reason = RequestStatus.FINISHED_ABORTED.finish_reason
                child.delta_text = child.detokenizer.get_delta_text(finished=True)
        self._drop(parent)
        return _make_request_output(parent)

    def _apply(self, parent: _ParentState, child: _ChildState, out: EngineCoreOutput) -> bool:
        """Apply one child output; True when it completed a stop string."""
        if child.index == 0:
            if out.new_prompt_logprobs and parent.prompt_logprobs is not None:
                parent.prompt_logprobs.extend(out.new_prompt_logprobs)
            if out.num_cached_tokens:
                parent.num_cached_tokens = out.num_cached_tokens
        # EOS / stop token ids end with FINISHED_STOPPED and a non-string stop reason.
        is_stop_token = (out.finish_status == RequestStatus.FINISHED_STOPPED
                         and not isinstance(out.stop_reason, str) and bool(out.new_token_ids))
        detok = child.detokenizer
        num_before = len(detok.token_ids)
        stop = detok.update(out.new_token_ids, is_stop_token)
        new_ids = detok.token_ids[num_before:]
        child.delta_token_ids.extend(new_ids)
        if child.logprobs is not None and child.delta_logprobs is not None:
            new_logprobs = (out.new_logprobs or [])[:len(new_ids)]
            child.logprobs.extend(new_logprobs)
            child.delta_logprobs.extend(new_logprobs)
        if stop is not None:
            child.finish_reason, child.stop_reason = "stop", stop
        elif out.finish_status is not None:
            child.finish_reason = out.finish_status.finish_reason
            child.stop_reason = out.stop_reason
        child.delta_text += detok.get_delta_text(finished=child.finish_reason is not None)
        return stop is not None

    def _drop(self, parent: _ParentState) -> None:
        self._parents.pop(parent.request_id, None)
        for child_id in parent.child_ids:
            self._owners.pop(child_id, None)


def _make_request_output(parent: _ParentState) -> RequestOutput:
    """Snapshot of a user request: cumulative values plus this step's deltas."""
    completions = [
        CompletionOutput(
            index=c.index, text=c.detokenizer.output_text, token_ids=list(c.detokenizer.token_ids),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            logprobs=list(c.logprobs) if c.logprobs is not None else None,
            delta_text=c.delta_text, delta_token_ids=list(c.delta_token_ids),
            delta_logprobs=list(c.delta_logprobs) if c.delta_logprobs is not None else None)
        for c in parent.children
    ]
    return RequestOutput(
        request_id=parent.request_id, prompt=parent.prompt,
        prompt_token_ids=parent.prompt_token_ids, outputs=completions,
        finished=all(c.finish_reason is not None for c in parent.children),
        prompt_logprobs=(list(parent.prompt_logprobs) if parent.prompt_logprobs is not None
                         else None),
        num_cached_tokens=parent.num_cached_tokens)
